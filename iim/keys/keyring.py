"""``Keyring``: a tenant's data keys, unwrapped once and kept in memory (bounded), for sealing and opening fields.

The hot path (an SMS queued, an MO stored, a claimed SMS opened) asks :meth:`Keyring.active` or
:meth:`Keyring.key`; after the first time both answer from memory: no key fetch, no master-key (KMS) round
trip per message. Which key is *active* (the newest) is re-read at most every ``active_ttl_s``, so a rotation
reaches every process within that time; an older key stays readable as long as rows name it.

The first data key of a tenant is created on first use in its own committed transaction (never in the
caller's, whose rollback would leave a cached key that was never stored).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from uuid import UUID

from cachetools import LRUCache, TTLCache

from iim.core.envelope import CipherError, DataKey, MasterKey, new_data_key_bytes
from iim.core.errors import ConfigError
from iim.core.secrets import SecretResolvers, UnresolvableReference, default_resolvers
from iim.keys import store
from policy_cache.db import Connection, Pool, tenant_tx

__all__ = ["Keyring", "KeyUnavailable", "load_master_keys"]

log = logging.getLogger(__name__)


class KeyUnavailable(LookupError):
    """A sealed field names a data key this tenant does not have, or no known master key unwraps it."""


class Keyring:
    """Data keys of every tenant, unwrapped by the master key (or a previous one, during a master rotation).

    Args:
        pool: the app pool (tenant-scoped): only for creating a tenant's first key.
        master: wraps new and re-wrapped keys.
        previous: older master keys still accepted for unwrapping (until ``iim keys rotate --master`` ran).
        cache_size: unwrapped keys kept (least recently used dropped first).
        active_ttl_s: how long a tenant's active key id is trusted before it is re-read.
    """

    def __init__(self, pool: Pool | None, master: MasterKey, *, previous: Sequence[MasterKey] = (),
                 cache_size: int = 4096, active_ttl_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.master = master
        self._masters = {m.key_id: m for m in (*previous, master)}
        self._keys: LRUCache[tuple[UUID, int], DataKey] = LRUCache(maxsize=cache_size)
        self._active: TTLCache[UUID, int] = TTLCache(maxsize=cache_size, ttl=active_ttl_s, timer=clock)

    def __repr__(self) -> str:
        return f"Keyring(master={self.master.key_id}, cached={len(self._keys)})"

    @property
    def master_ids(self) -> frozenset[str]:
        return frozenset(self._masters)

    def unwrap(self, tenant: UUID, key_id: int, wrapped: bytes, master_key_id: str) -> DataKey:
        """A stored key unwrapped by the master that wrapped it; :class:`KeyUnavailable` without that master."""
        master = self._masters.get(master_key_id)
        if master is None:
            raise KeyUnavailable(f"data key {key_id} of tenant {tenant} is wrapped by master key {master_key_id}, "
                                 f"which is not configured (IIM_MASTER_KEY_REF / IIM_MASTER_KEY_PREVIOUS_REFS)")
        try:
            return master.unwrap(tenant, key_id, bytes(wrapped))
        except CipherError as exc:
            raise KeyUnavailable(f"data key {key_id} of tenant {tenant} does not unwrap: {exc}") from None

    async def active(self, conn: Connection, tenant: UUID) -> DataKey:
        """The key to seal new fields of ``tenant`` with (``conn`` is in that tenant's transaction)."""
        key_id = self._active.get(tenant)
        if key_id is not None:
            cached = self._keys.get((tenant, key_id))
            if cached is not None:
                return cached
        row = await store.active_key(conn)
        if row is None:
            return await self._create_first(tenant)
        key = self._remember(tenant, row)
        self._active[tenant] = key.key_id
        return key

    async def key(self, conn: Connection, tenant: UUID, key_id: int) -> DataKey:
        """The key ``key_id`` of ``tenant`` (to open a field sealed with it)."""
        cached = self._keys.get((tenant, key_id))
        if cached is not None:
            return cached
        row = await store.key_by_id(conn, key_id)
        if row is None:
            raise KeyUnavailable(f"tenant {tenant} has no data key {key_id}")
        return self._remember(tenant, row)

    async def key_in_tenant(self, tenant: UUID, key_id: int) -> DataKey:
        """:meth:`key` for a caller outside a tenant transaction (the SMS sender's claims span tenants)."""
        cached = self._keys.get((tenant, key_id))
        if cached is not None:
            return cached
        async with tenant_tx(self._need_pool(), tenant, readonly=True) as conn:
            return await self.key(conn, tenant, key_id)

    def forget(self, tenant: UUID) -> None:
        """Drop what is cached of ``tenant`` (after a rotation in this process)."""
        self._active.pop(tenant, None)
        for cached in [k for k in self._keys if k[0] == tenant]:
            self._keys.pop(cached, None)

    def _remember(self, tenant: UUID, row: object) -> DataKey:
        key = self.unwrap(tenant, row["key_id"], row["wrapped"], row["master_key_id"])  # type: ignore[index]
        self._keys[(tenant, key.key_id)] = key
        return key

    async def _create_first(self, tenant: UUID) -> DataKey:
        async with tenant_tx(self._need_pool(), tenant) as conn:
            await self.create(conn, tenant, 1)
        async with tenant_tx(self._need_pool(), tenant, readonly=True) as conn:
            row = await store.active_key(conn)
        if row is None:  # pragma: no cover - committed just above
            raise KeyUnavailable(f"tenant {tenant}: the first data key was not stored")
        key = self._remember(tenant, row)
        self._active[tenant] = key.key_id
        log.info("tenant %s: data key %d created", tenant, key.key_id)
        return key

    async def create(self, conn: Connection, tenant: UUID, key_id: int) -> bool:
        """Store a fresh data key ``key_id`` for ``tenant`` in ``conn``'s transaction (not cached until read
        back after commit); False when that id exists already."""
        return await store.insert_key(conn, key_id, self.master.wrap(tenant, key_id, new_data_key_bytes()),
                                      self.master.key_id)

    def _need_pool(self) -> Pool:
        if self.pool is None:
            raise RuntimeError("this keyring has no pool: it cannot create or fetch keys outside a transaction")
        return self.pool


def load_master_keys(ref: str | None, previous_refs: Sequence[str], *, generated_file: Path,
                     resolvers: SecretResolvers | None = None) -> tuple[MasterKey, list[MasterKey]]:
    """The master key from its reference (and the previous ones still accepted for unwrapping).

    Without a reference, a key is generated once into ``generated_file`` (0600) and used from there: a single
    host's data directory then holds the key beside the data (fine for a demo, said in a warning).

    Raises:
        ConfigError: a reference does not resolve, its scheme has no resolver, or the value is not a key.
    """
    found = resolvers or default_resolvers()

    def load(what: str, where: str) -> MasterKey:
        try:
            return MasterKey.from_secret(found.resolve(where))
        except (UnresolvableReference, LookupError, CipherError) as exc:
            raise ConfigError(f"{what}: {exc}") from None

    if ref is None:
        if not generated_file.exists():
            generated_file.parent.mkdir(parents=True, exist_ok=True)
            with open(generated_file, "x", encoding="ascii", opener=lambda p, f: _open_private(p, f)) as fh:
                fh.write(new_data_key_bytes().hex() + "\n")
        log.warning("IIM_MASTER_KEY_REF unset: sensitive fields are sealed with a master key kept in %s; "
                    "in production give it by reference (file:, env: or an installed secret store)", generated_file)
        ref = f"file:{generated_file}"
    current = load("IIM_MASTER_KEY_REF", ref)
    older = [load(f"IIM_MASTER_KEY_PREVIOUS_REFS[{i}]", r) for i, r in enumerate(previous_refs)]
    return current, [m for m in older if m.key_id != current.key_id]


def _open_private(path: str, flags: int) -> int:
    import os

    return os.open(path, flags, 0o600)
