"""The tamper-evident audit log: append through the database function, verify independently in Python.

Every row carries ``row_hash = sha256(prev_hash || canonical_json(row))``, chained per tenant from 32 zero
bytes. Rows chained since migration 0025 commit to their detail through a salted digest
(``detail_sha256 = sha256(detail_salt || detail)`` in :func:`canonical_json_v2`), so a detail can become a
tombstone (salt dropped, digest kept: :func:`tombstone`) and the row still verifies; older rows hash the
detail itself. Appends go through ``iim.audit_append`` (one implementation for every writer; it serialises the
tenant's chain with an advisory lock held to commit, so call it last in a transaction).
:func:`verify_chain` rebuilds the canonical JSON here, from the stored columns, and reports the first row
whose link or hash does not match: an edited row breaks at itself, a deleted or re-hashed row at its
successor. Hot paths :func:`stage` lines instead (no lock) and :class:`AuditFlusher` chains them in
batches. Truncating the tail is only visible against a chain head published elsewhere
(:func:`chain_head`), since a superuser can rewrite anything inside the database.

Privileged events of the service itself, which belong to no tenant (the admin token table reloaded, or a reload
refused), go to one more chain, :data:`SYSTEM_CHAIN` (the nil UUID, which no tenant may take: migration 0041),
through :func:`append_system`. Why a chain of its own rather than a line in every tenant's chain: such an event
concerns no tenant in particular (an admin token reaches every tenant, a refused file names none), a copy per
tenant would grow with the tenants and say nothing to each of them, and a tenant created later would lack it. One
chain, written by the same ``iim.audit_append``, is verified, head-signed and listed like any other (by admins
and unscoped viewers: ``iim audit verify --tenant 00000000-0000-0000-0000-000000000000``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final
from uuid import UUID

import asyncpg

from iim.core.lifecycle import AsyncResource
from policy_cache.db import Connection, Pool, tenant_tx
from policy_cache.models import AuditEntry

__all__ = ["GENESIS_HASH", "SYSTEM_CHAIN", "AuditFlusher", "append", "append_many", "append_system", "canonical_json", "canonical_json_v2",
           "chain_head", "entries", "flush_pending", "is_tombstone", "stage", "tombstone", "verify_chain"]

log = logging.getLogger(__name__)

GENESIS_HASH = bytes(32)
#: The chain of the service's own privileged events (no tenant's): the nil UUID, refused as a tenant id.
SYSTEM_CHAIN: Final = UUID(int=0)


async def append(
    conn: Connection,
    tenant_id: UUID,
    *,
    actor: str,
    action: str,
    entity: str,
    entity_id: str | UUID | None = None,
    detail: Mapping[str, Any] | None = None,
    correlation: Mapping[str, Any] | None = None,
) -> int:
    """Append one audit row in the caller's transaction (inside ``tenant_tx`` for ``tenant_id``).

    Returns the row id. ``detail`` must hold no secrets (the registry passes summaries only).
    """
    row_id = await conn.fetchval(
        "SELECT iim.audit_append($1, $2, $3, $4, $5, $6, $7)",
        tenant_id, actor, action, entity, None if entity_id is None else str(entity_id),
        dict(detail or {}), dict(correlation or {}),
    )
    return int(row_id)


async def append_system(
    pool: Pool,
    *,
    actor: str,
    action: str,
    entity: str,
    entity_id: str | None = None,
    detail: Mapping[str, Any] | None = None,
    correlation: Mapping[str, Any] | None = None,
) -> int:
    """Append one row to :data:`SYSTEM_CHAIN` in a transaction of its own; the row id."""
    async with tenant_tx(pool, SYSTEM_CHAIN) as conn:
        return await append(conn, SYSTEM_CHAIN, actor=actor, action=action, entity=entity, entity_id=entity_id,
                            detail=detail, correlation=correlation)


async def append_many(
    conn: Connection, rows: Sequence[tuple[UUID, str, str, str, str | None, Mapping[str, Any], Mapping[str, Any]]],
) -> None:
    """:func:`append` for many rows of the caller's tenant, pipelined: each row is (tenant_id, actor, action,
    entity, entity_id, detail, correlation)."""
    await conn.executemany("SELECT iim.audit_append($1, $2, $3, $4, $5, $6, $7)", rows)


def _js(value: str) -> str:
    # Escapes exactly like PostgreSQL's to_json(text): \" \\ \b \f \n \r \t, other C0 as \u00xx, rest raw.
    return json.dumps(value, ensure_ascii=False)


def canonical_json(
    *, tenant_id: UUID, id: int, at: datetime, actor: str, action: str, entity: str, entity_id: str | None,
    detail_text: str, correlation_text: str,
) -> str:
    """The hashed form of a row (mirror of ``iim.audit_canonical``); jsonb columns as their jsonb text."""
    stamp = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return (
        '{"action":' + _js(action)
        + ',"actor":' + _js(actor)
        + ',"at":' + _js(stamp)
        + ',"correlation":' + correlation_text
        + ',"detail":' + detail_text
        + ',"entity":' + _js(entity)
        + ',"entity_id":' + ("null" if entity_id is None else _js(entity_id))
        + ',"id":' + str(id)
        + ',"tenant_id":' + _js(str(tenant_id))
        + "}"
    )


def canonical_json_v2(
    *, tenant_id: UUID, id: int, at: datetime, actor: str, action: str, entity: str, entity_id: str | None,
    detail_digest: bytes, correlation_text: str,
) -> str:
    """The hashed form of a row of the second form (mirror of ``iim.audit_canonical_v2``): the detail enters
    through its salted digest, so it can be tombstoned without breaking the chain."""
    stamp = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return (
        '{"action":' + _js(action)
        + ',"actor":' + _js(actor)
        + ',"at":' + _js(stamp)
        + ',"correlation":' + correlation_text
        + ',"detail_sha256":' + _js(detail_digest.hex())
        + ',"entity":' + _js(entity)
        + ',"entity_id":' + ("null" if entity_id is None else _js(entity_id))
        + ',"id":' + str(id)
        + ',"tenant_id":' + _js(str(tenant_id))
        + "}"
    )


def is_tombstone(detail: Mapping[str, Any]) -> bool:
    """A detail replaced by retention or erasure: ``{"tombstone": {...}}`` and nothing else."""
    return set(detail) == {"tombstone"} and isinstance(detail["tombstone"], dict)


_VERIFY_SQL = """
SELECT id, at, actor, action, entity, entity_id, detail::text AS detail_text,
       correlation::text AS correlation_text, prev_hash, row_hash, detail_salt, detail_digest
FROM iim.audit_log WHERE tenant_id = $1 ORDER BY id
"""


def _row_text(tenant_id: UUID, row: asyncpg.Record) -> str | None:
    """The canonical text a stored row hashes to; None when its detail no longer matches its digest (or is
    gone without being a tombstone)."""
    digest = row["detail_digest"]
    if digest is None:
        return canonical_json(
            tenant_id=tenant_id, id=row["id"], at=row["at"], actor=row["actor"], action=row["action"],
            entity=row["entity"], entity_id=row["entity_id"], detail_text=row["detail_text"],
            correlation_text=row["correlation_text"])
    salt = row["detail_salt"]
    if salt is not None:
        if hashlib.sha256(bytes(salt) + row["detail_text"].encode()).digest() != bytes(digest):
            return None
    elif not is_tombstone(json.loads(row["detail_text"])):
        return None
    return canonical_json_v2(
        tenant_id=tenant_id, id=row["id"], at=row["at"], actor=row["actor"], action=row["action"],
        entity=row["entity"], entity_id=row["entity_id"], detail_digest=bytes(digest),
        correlation_text=row["correlation_text"])


async def verify_chain(conn: Connection, tenant_id: UUID, *, prefetch: int = 1000) -> int | None:
    """Recompute the tenant's chain; return the id of the first broken row, or ``None`` if intact.

    Reads through a cursor (a transaction is opened when the connection is not in one). The caller must be
    able to see the tenant's rows: inside ``tenant_tx(conn, tenant_id)``, or as the owner.
    """
    if conn.is_in_transaction():
        return await _verify(conn, tenant_id, prefetch)
    async with conn.transaction(readonly=True, isolation="repeatable_read"):
        return await _verify(conn, tenant_id, prefetch)


async def _verify(conn: Connection, tenant_id: UUID, prefetch: int) -> int | None:
    expected_prev = GENESIS_HASH
    async for row in conn.cursor(_VERIFY_SQL, tenant_id, prefetch=prefetch):
        prev = bytes(row["prev_hash"])
        if prev != expected_prev:
            return int(row["id"])
        text = _row_text(tenant_id, row)
        if text is None:
            return int(row["id"])
        digest = hashlib.sha256(prev + text.encode()).digest()
        if digest != bytes(row["row_hash"]):
            return int(row["id"])
        expected_prev = digest
    return None


async def tombstone(conn: Connection, tenant_id: UUID, ids: Sequence[int], *, reason: str) -> int:
    """Replace the details of these rows of the tenant by tombstones (inside ``tenant_tx``); the chain still
    verifies. Rows chained before migration 0025 are left as they are. Returns how many changed."""
    if not ids:
        return 0
    return int(await conn.fetchval("SELECT iim.audit_tombstone($1, $2::bigint[], $3)", tenant_id, list(ids), reason))


async def chain_head(conn: Connection, tenant_id: UUID) -> tuple[int, bytes] | None:
    """The last (id, row_hash) of the tenant's chain: publish or sign it outside the database."""
    row = await conn.fetchrow(
        "SELECT id, row_hash FROM iim.audit_log WHERE tenant_id = $1 ORDER BY id DESC LIMIT 1", tenant_id)
    return None if row is None else (int(row["id"]), bytes(row["row_hash"]))


async def entries(
    conn: Connection, *, entity: str | None = None, entity_id: str | UUID | None = None, limit: int = 100,
    exclude_actions: Sequence[str] = (),
) -> list[AuditEntry]:
    """The newest audit rows of the transaction's tenant, optionally for one entity (newest first), leaving out
    ``exclude_actions`` (an incident's timeline leaves out who read it: reads must not crowd out its story)."""
    rows = await conn.fetch(
        """SELECT * FROM iim.audit_log
           WHERE ($1::text IS NULL OR entity = $1) AND ($2::text IS NULL OR entity_id = $2)
             AND action <> ALL($4::text[])
           ORDER BY id DESC LIMIT $3""",
        entity, None if entity_id is None else str(entity_id), limit, list(exclude_actions),
    )
    return [AuditEntry.model_validate(dict(r)) for r in rows]


async def stage(
    conn: Connection,
    *,
    actor: str,
    action: str,
    entity: str,
    entity_id: str | UUID | None = None,
    detail: Mapping[str, Any] | None = None,
    correlation: Mapping[str, Any] | None = None,
) -> None:
    """Stage an audit line in the caller's tenant transaction; :class:`AuditFlusher` chains it.

    For hot paths (device events, incident steps): no chain lock is taken here, so concurrent transactions of
    one tenant do not queue behind each other. The line is as durable as the transaction that staged it.
    """
    await conn.execute(
        "INSERT INTO iim.audit_pending (actor, action, entity, entity_id, detail, correlation) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        actor, action, entity, None if entity_id is None else str(entity_id), dict(detail or {}),
        dict(correlation or {}))


async def flush_pending(pool: Pool, *, batch: int = 1000) -> int:
    """Move every staged line into its tenant's chain now; the number moved."""
    moved = 0
    while True:
        n = int(await pool.fetchval("SELECT iim.audit_flush($1)", batch))
        moved += n
        if n < batch:
            return moved


def next_flush_delay(previous: float, moved: int, interval: float, idle_interval: float) -> float:
    """The pause before the next flush round: ``interval`` after a round that chained lines, else doubling
    up to ``idle_interval``."""
    return interval if moved else min(previous * 2, idle_interval)


class AuditFlusher(AsyncResource):
    """Chains staged audit lines every ``interval`` seconds while lines come, backing off to ``idle_interval``
    while rounds find none (and drains them at stop).

    Each round is a PostgreSQL round trip: ten a second on a service with nothing to chain cost IIM and
    PostgreSQL more CPU than a routed call's own work (``benchmarks.realfs_calls``). A line staged after a
    quiet spell is chained within ``idle_interval``.
    """

    def __init__(self, pool: Pool, *, interval: float = 0.1, idle_interval: float = 1.0, batch: int = 1000) -> None:
        self._pool = pool
        self._interval = interval
        self._idle_interval = max(interval, idle_interval)
        self._batch = batch
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-flusher")

    async def _run(self) -> None:
        delay = self._interval
        while True:
            moved = 0
            try:
                moved = await flush_pending(self._pool, batch=self._batch)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # Staged lines stay staged; the next round chains them.
                log.warning("audit flush failed (%s); retrying", type(exc).__name__)
            except Exception:
                log.exception("audit flush failed; retrying")  # a bug must not stop the chaining for good
            delay = next_flush_delay(delay, moved, self._interval, self._idle_interval)
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await flush_pending(self._pool, batch=self._batch)
