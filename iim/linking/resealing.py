"""Link secrets re-sealed: under a tenant's new data key (key rotation), or out of the old format.

The tokens of ``iim.account_link`` and the code verifiers of ``iim.link_state`` are sealed under the tenant's
data key, with its id beside each value. A key rotation re-seals them with the new key like the SMS bodies
(:func:`reseal_tenant` with ``key_id``). Values written before the envelope (one process-wide key,
``IIM_LINK_TOKEN_KEY_REF``, no key id) cannot be opened by a migration: :func:`convert_legacy` opens them with
that key, once, at start, and re-seals them under each tenant's active key; afterwards the old key is no longer
needed. Without it, old-format tokens would each break at their next use: the start is refused instead
(:class:`LegacyTokensWithoutKey`), and old-format started linkings (minutes long) are dropped.

Each batch is one short tenant transaction; a value a renewal replaced meanwhile is left as the renewal wrote it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from uuid import UUID

from iim.core.errors import ConfigError
from iim.keys.keyring import Keyring
from iim.linking import store
from iim.linking.sealing import Sealer, SealError, open_secret, seal_secret
from policy_cache.db import Pool, tenant_tx

__all__ = ["LegacyTokensWithoutKey", "convert_legacy", "reseal_tenant"]

log = logging.getLogger(__name__)


class LegacyTokensWithoutKey(ConfigError):
    """Link tokens still in the old format, and the old key not given: starting would break those links."""


async def reseal_tenant(pool: Pool, keyring: Keyring, tenant_id: UUID, *, key_id: int | None,
                        legacy: Sealer | None, batch: int = 500,
                        progress: Callable[[str, int], Awaitable[None] | None] | None = None,
                        ) -> tuple[dict[str, int], int]:
    """Re-seal ``tenant_id``'s link secrets not sealed by data key ``key_id`` with it (``None``: only those in
    the old format, with the tenant's active key). ``(rows re-sealed by table, values that did not open)``:
    those are left as they are, logged, never guessed."""
    resealed: dict[str, int] = {}
    unreadable = 0
    for table in store.SEALED_COLUMNS:
        done = 0
        after = UUID(int=0)
        while True:
            async with tenant_tx(pool, tenant_id) as conn:
                new = (await keyring.key(conn, tenant_id, key_id) if key_id is not None
                       else await keyring.active(conn, tenant_id))
                rows = await store.sealed_rows(conn, table, not_key=key_id, after=after, limit=batch)
                if not rows:
                    break
                writes = []
                for row_id, values in rows:
                    clear: list[tuple[str, str] | None] = []
                    try:
                        for (column, _, _), value in zip(store.SEALED_COLUMNS[table], values, strict=True):
                            clear.append(None if value is None else (column, await open_secret(
                                conn, keyring, tenant_id, table, row_id, column, value, legacy)))
                    except SealError as exc:
                        unreadable += 1
                        log.error("tenant %s: %s row %s does not open: %s", tenant_id, table, row_id, exc)
                        continue
                    writes.append((row_id, values, tuple(
                        None if c is None else seal_secret(new, table, row_id, c[0], c[1]) for c in clear)))
                written = await store.reseal(conn, table, writes)
                after = rows[-1][0]
            done += written
            if progress is not None:
                reported = progress(table, written)
                if inspect.isawaitable(reported):  # the admin API's rotation job writes its progress down
                    await reported
        resealed[table] = done
    return resealed, unreadable


async def convert_legacy(pool: Pool, keyring: Keyring, legacy: Sealer | None) -> dict[str, int]:
    """At start: every tenant's link secrets still in the old format re-sealed under its data key (with
    ``legacy``, the old key). Without it, old-format started linkings are dropped and old-format tokens refuse
    the start (:class:`LegacyTokensWithoutKey`, before anything is changed). Rows converted, by table."""
    pending = await store.legacy_secrets(pool)
    links = sum(p.links for p in pending)
    if links and legacy is None:
        raise LegacyTokensWithoutKey(
            f"{links} account link(s) in {sum(1 for p in pending if p.links)} tenant(s) still have tokens sealed "
            "with the old link token key: give it once more as IIM_LINK_TOKEN_KEY_REF, so they are re-sealed under "
            "each tenant's data key at start (or by `iim keys rotate --all-tenants --finish`); afterwards it is "
            "no longer needed")
    total: dict[str, int] = {}
    for found in pending:
        if legacy is None:
            async with tenant_tx(pool, found.tenant_id) as conn:
                dropped = await store.delete_legacy_states(conn)
            log.warning("tenant %s: %d started linking(s) in the old format dropped (the old link token key is "
                        "not given): the household starts linking again", found.tenant_id, dropped)
            continue
        resealed, unreadable = await reseal_tenant(pool, keyring, found.tenant_id, key_id=None, legacy=legacy)
        for table, rows in resealed.items():
            total[table] = total.get(table, 0) + rows
        if unreadable:
            log.error("tenant %s: %d link secret(s) in the old format do not open with IIM_LINK_TOKEN_KEY_REF "
                      "(left as they are; those links break at their next use)", found.tenant_id, unreadable)
    if pending and legacy is not None:
        log.warning("link secrets re-sealed under the tenants' data keys: %s", total)
    elif legacy is not None:
        log.info("IIM_LINK_TOKEN_KEY_REF is set but no link secret is in the old format any more: it may be removed")
    return total
