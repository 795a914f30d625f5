"""Key rotation without downtime: re-wrap data keys under a new master key; give a tenant a new data key and
re-seal its rows in batches: SMS bodies (:data:`SEALED_TABLES`) and account-link secrets (tokens, code verifiers:
:mod:`iim.linking.resealing`, which also converts those still in the old format when the old key is given).

Both are safe while services run: a service unwraps with any master it is given (current and previous), and
opens a field with the key id stored beside it, so rows sealed with the old and the new data key are both
readable throughout. Each step is one short tenant transaction; every rotation is audited with its actor.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from iim.core.envelope import CipherError
from iim.keys import store as key_store
from iim.keys.keyring import Keyring, KeyUnavailable
from iim.linking import store as link_store
from iim.linking.resealing import reseal_tenant
from iim.linking.sealing import Sealer
from iim.sms import store as sms_store
from policy_cache import audit
from policy_cache.db import Pool, tenant_tx

__all__ = ["DataKeyRotation", "KeyInfo", "MasterRewrap", "SEALED_TABLES", "TenantKeys", "rewrap_master",
           "rotate_data_key", "tenant_keys"]

log = logging.getLogger(__name__)

#: Tables whose sensitive column is sealed (column ``body``, key id in ``body_key``).
SEALED_TABLES = (sms_store.OUTBOX, sms_store.INBOUND)

#: ``progress(table, rows)`` after each batch; a coroutine is awaited (the admin API's job writes it down).
Progress = Callable[[str, int], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class MasterRewrap:
    tenant_id: UUID
    rewrapped: int
    unchanged: int


@dataclass(frozen=True, slots=True)
class DataKeyRotation:
    tenant_id: UUID
    key_id: int
    resealed: dict[str, int]
    unreadable: int


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: int
    master_key_id: str
    created_at: datetime
    rows: int  # sealed fields (every sealed table) this key opens


@dataclass(frozen=True, slots=True)
class TenantKeys:
    tenant_id: UUID
    active_key_id: int | None
    keys: list[KeyInfo]
    clear_rows: int  # sensitive fields not sealed yet (from before sealing)
    legacy_rows: int = 0  # link secrets still sealed with the old link token key (IIM_LINK_TOKEN_KEY_REF)


async def tenant_keys(pool: Pool, tenant_id: UUID) -> TenantKeys:
    """A tenant's data keys (ids and master fingerprints, never a key) and how many sealed rows each opens."""
    async with tenant_tx(pool, tenant_id, readonly=True) as conn:
        rows = await key_store.keys(conn)
        counts: dict[int | None, int] = {}
        for table in SEALED_TABLES:
            for key_id, n in (await sms_store.sealed_counts(conn, table)).items():
                counts[key_id] = counts.get(key_id, 0) + n
        links = await link_store.sealed_counts(conn)
    for key_id, n in links.items():
        if key_id is not None:
            counts[key_id] = counts.get(key_id, 0) + n
    keys = [KeyInfo(r["key_id"], r["master_key_id"], r["created_at"], counts.get(r["key_id"], 0)) for r in rows]
    return TenantKeys(tenant_id, keys[-1].key_id if keys else None, keys, counts.get(None, 0), links.get(None, 0))


async def rewrap_master(pool: Pool, keyring: Keyring, tenant_id: UUID, *, actor: str) -> MasterRewrap:
    """Re-wrap every data key of ``tenant_id`` not yet wrapped by the keyring's current master key."""
    current = keyring.master.key_id
    rewrapped = unchanged = 0
    async with tenant_tx(pool, tenant_id) as conn:
        for row in await key_store.keys(conn):
            if row["master_key_id"] == current:
                unchanged += 1
                continue
            key = keyring.unwrap(tenant_id, row["key_id"], row["wrapped"], row["master_key_id"])
            if await key_store.rewrap(conn, row["key_id"], row["master_key_id"], key.rewrap(keyring.master), current):
                rewrapped += 1
        if rewrapped:
            await audit.append(conn, tenant_id, actor=actor, action="keys.master_rewrapped", entity="tenant_data_key",
                               entity_id=str(tenant_id), detail={"master_key_id": current, "rewrapped": rewrapped})
    return MasterRewrap(tenant_id, rewrapped, unchanged)


async def rotate_data_key(pool: Pool, keyring: Keyring, tenant_id: UUID, *, actor: str, batch: int = 500,
                          new_key: bool = True, started: Callable[[int], Awaitable[None] | None] | None = None,
                          progress: Progress | None = None,
                          legacy: Sealer | None = None) -> DataKeyRotation:
    """Give ``tenant_id`` a new data key (unless ``new_key`` is False: only finish re-sealing with the active
    one) and re-seal every row sealed with an older key, or still in clear, ``batch`` rows a transaction;
    account-link secrets still in the old format too, with ``legacy`` (the old link token key) when given.

    New fields are sealed with the new key by every service within its keyring's active-key TTL; rows a
    service sealed with the old key meanwhile are caught by running this again with ``new_key=False``.
    ``started(key_id)`` once the key exists; ``progress(table, rows)`` after each batch (the admin API's job;
    either may be a coroutine function).
    """
    async with tenant_tx(pool, tenant_id) as conn:
        active = await key_store.active_key(conn)
        key_id = (active["key_id"] if active is not None else 0) + (1 if new_key or active is None else 0)
        if active is None or key_id != active["key_id"]:
            await keyring.create(conn, tenant_id, key_id)
            await audit.append(conn, tenant_id, actor=actor, action="keys.data_key_rotated",
                               entity="tenant_data_key", entity_id=str(key_id),
                               detail={"key_id": key_id, "previous_key_id": active["key_id"] if active else None})
    keyring.forget(tenant_id)
    if started is not None:
        await _called(started(key_id))
    resealed: dict[str, int] = {}
    unreadable = 0
    for table in SEALED_TABLES:
        count, bad = await _reseal_table(pool, keyring, tenant_id, table, key_id, batch, progress)
        resealed[table] = count
        unreadable += bad
    links, bad = await reseal_tenant(pool, keyring, tenant_id, key_id=key_id, legacy=legacy, batch=batch,
                                     progress=progress)
    resealed.update(links)
    unreadable += bad
    async with tenant_tx(pool, tenant_id) as conn:
        await audit.append(conn, tenant_id, actor=actor, action="keys.rows_resealed", entity="tenant_data_key",
                           entity_id=str(key_id), detail={"key_id": key_id, "resealed": resealed,
                                                          "unreadable": unreadable})
    log.info("tenant %s: rows re-sealed with data key %d", tenant_id, key_id,
             extra={"resealed": resealed, "unreadable": unreadable})
    return DataKeyRotation(tenant_id, key_id, resealed, unreadable)


async def _reseal_table(pool: Pool, keyring: Keyring, tenant_id: UUID, table: str, key_id: int,
                        batch: int, progress: Progress | None) -> tuple[int, int]:
    done = unreadable = 0
    after = UUID(int=0)
    while True:
        async with tenant_tx(pool, tenant_id) as conn:
            new = await keyring.key(conn, tenant_id, key_id)
            rows = await sms_store.sealed_bodies(conn, table, not_key=key_id, after=after, limit=batch)
            if not rows:
                return done, unreadable
            resealed = []
            for row in rows:
                try:
                    clear = row["body"] if row["body_key"] is None else (
                        await keyring.key(conn, tenant_id, row["body_key"])).open(
                            table, row["row_key"], "body", row["body"])
                except (KeyUnavailable, CipherError) as exc:  # left as it is; counted and logged, never guessed
                    unreadable += 1
                    log.error("tenant %s: %s row %s does not open: %s", tenant_id, table, row["id"], exc)
                    continue
                resealed.append((row["id"], row["body_key"], new.seal(table, row["row_key"], "body", clear), key_id))
            await sms_store.reseal_bodies(conn, table, resealed)
            done += len(resealed)
            after = rows[-1]["id"]
        if progress is not None:
            await _called(progress(table, len(resealed)))


async def _called(result: Awaitable[None] | None) -> None:
    if inspect.isawaitable(result):
        await result
