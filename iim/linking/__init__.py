"""Account linking: a household links its vendor account to a cloud connector (OAuth2 authorization code + PKCE).

* ``flow``    -- pure: state and PKCE values, the authorization URL, the callback's parameters, the token
  endpoint's answers and the granted scope (never wider than IIM's three).
* ``sealing`` -- tokens and code verifiers sealed at rest under the tenant's data key (the envelope, bound to
  tenant, table, row and column); the old single-key format, only to convert it.
* ``resealing`` -- link secrets re-sealed by key rotation, and converted out of the old format at start.
* ``oauth``   -- the HTTP driver: token exchange, refresh and revocation (RFC 7009), each under a deadline.
* ``store``   -- ``iim.link_state`` and ``iim.account_link`` (migrations 0032, 0039).
* ``service`` -- start, callback, status, revoke, tokens for connectors, the refresher.
* ``http``    -- the callback page on IIM's HTTP site (``GET /oauth2/callback``).
"""
