"""Per-tenant data keys for field encryption (envelope encryption; the crypto is :mod:`iim.core.envelope`).

* ``store``   - every statement on ``iim.tenant_data_key`` (wrapped keys, never a key in clear).
* ``keyring`` - ``Keyring``: a tenant's active data key and any older one, unwrapped once and cached in memory
  (bounded), so the SMS path pays no key fetch per message; the master keys it unwraps with.
"""
