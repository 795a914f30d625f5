"""The change feed: which subscribers changed since a sequence number (role ``iim_cache``, all tenants).

Every committed registry change that can affect routing gets a seq in ``iim.change_log`` (migration 0005
holds the commit-order barrier); the cache follows the feed to reload only what changed:

* :func:`change_watermark` - barrier: the highest committed change seq (waits for in-flight writers);
* :func:`changes_since` - subscribers affected by changes after a seq, and the new seq.
"""

from __future__ import annotations

from uuid import UUID

from policy_cache.db import Connection
from policy_cache.errors import ChangeLogTruncatedError, TenantScopeError

__all__ = ["change_watermark", "changes_since"]

_LOCK_NS = 1229540685  # advisory lock namespace shared with the migrations (key 1: the change sequence)
_CHANGE_KEY = 1


def _require_autocommit(conn: Connection, what: str) -> None:
    if conn.is_in_transaction():
        # The barrier's exclusive lock would be held to the end of the caller's transaction, blocking writers.
        raise TenantScopeError(f"{what} must not run inside an open transaction")


async def change_watermark(conn: Connection) -> int:
    """Barrier: wait for in-flight policy writers, return the highest committed change seq.

    A snapshot taken after this returns contains every change up to that seq.
    """
    _require_autocommit(conn, "change_watermark")
    return int(await conn.fetchval("SELECT iim.change_barrier()"))


async def changes_since(conn: Connection, seq: int) -> tuple[list[UUID], int]:
    """Subscribers affected by changes committed after ``seq``, and the new watermark.

    Returns ``([], seq)`` when nothing changed. Never misses a change whose seq is below the returned
    watermark (see migration 0005 for the commit-order barrier).

    Raises:
        ChangeLogTruncatedError: changes after ``seq`` were pruned; reload everything.
    """
    _require_autocommit(conn, "changes_since")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _LOCK_NS, _CHANGE_KEY)
        pruned = int(await conn.fetchval("SELECT pruned_through FROM iim.change_log_state"))
        if seq < pruned:
            raise ChangeLogTruncatedError(seq, pruned)
        row = await conn.fetchrow(
            """SELECT max(seq) AS max_seq,
                      array(SELECT DISTINCT u FROM iim.change_log c, unnest(c.subscriber_ids) AS u
                            WHERE c.seq > $1) AS ids
               FROM iim.change_log WHERE seq > $1""",
            seq,
        )
    assert row is not None
    if row["max_seq"] is None:
        return [], seq
    return list(row["ids"]), int(row["max_seq"])
