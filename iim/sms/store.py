"""Every statement on the SMS tables (``iim.sms_outbox``, ``iim.sms_inbound``): the outbox's one writer.

Whoever queues an SMS calls :func:`enqueue_sms` (or :func:`enqueue_many`) with a connection in its own tenant
transaction, so the SMS commits with whatever caused it. Besides, only the database writes the outbox (its
functions are in ``policy_cache/functions/``): ``iim.write_action`` queues a scenario decision's SMS inside
``iim.persist_decision``'s one statement (the alarm path pays no round trip for them), and ``iim.sms_claim``
claims due rows for :func:`claim_due`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg

from iim.core.envelope import DataKey
from iim.sms.transport import MoSms
from policy_cache.db import Connection, Pool

__all__ = [
    "QueuedSms", "claim_due", "count_keyed", "enqueue_many", "enqueue_sms", "find_by_smsc_id", "forget_mo_body",
    "lock_for_receipts", "mark_mo_handled", "purge_mo_bodies", "queue_depth", "reseal_bodies", "seal_body",
    "sealed_bodies", "sealed_counts", "store_mo", "subscriber_tenant", "write_outcomes", "write_receipts", "OUTBOX", "INBOUND",
]

# Where a body lives, for its associated data (iim.core.envelope.field_aad): the row is the table's unique key
# within the tenant (the outbox's key, the MO's sms_id), known before the insert.
OUTBOX, INBOUND = "sms_outbox", "sms_inbound"


# Advisory-lock namespace "IIMS" (the migrations, change sequence and audit chains use "IIMM").
_MO_LOCK_NS = 1229540691

_ENQUEUE = """INSERT INTO iim.sms_outbox (key, msisdn, body, flash, incident_id, source, body_key)
              VALUES ($1, $2, $3, $4, $5, $6, $7)
              ON CONFLICT (tenant_id, key) DO NOTHING RETURNING id"""
_ENQUEUE_MANY = """INSERT INTO iim.sms_outbox (key, msisdn, body, incident_id, body_key) VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (tenant_id, key) DO NOTHING"""

# One row at a time by primary key (pipelined with fetchmany, one transaction per tenant): a single
# UPDATE ... FROM unnest(...) lets the planner misjudge how many rows are 'sending' (the statistics of a
# queue table are always stale) and pick a nested loop that is quadratic in the batch.
_UPDATE_OUTCOME = """
UPDATE iim.sms_outbox SET
    status = $3,
    transport = CASE WHEN $4::text IS NULL THEN transport ELSE $8 END,
    smsc_message_ids = CASE WHEN $4::text IS NULL THEN smsc_message_ids ELSE string_to_array($4, chr(31), '') END,
    segments = coalesce($5::int, segments),
    next_attempt_at = CASE WHEN $3 = 'queued' THEN now() + make_interval(secs => $6) ELSE next_attempt_at END,
    sent_at = CASE WHEN $3 = 'sent' THEN now() ELSE sent_at END,
    last_error = $7,
    updated_at = now()
WHERE id = $1 AND attempts = $2 AND status = 'sending'
RETURNING id
"""

_RECEIPT_ROWS = """SELECT id, key, msisdn, status, attempts, incident_id, segments, smsc_message_ids, delivered_ids,
                          receipt_state, receipt_error, last_error
                   FROM iim.sms_outbox WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE"""
_UPDATE_RECEIPT = """UPDATE iim.sms_outbox SET status = $2, delivered_ids = $3, receipt_state = $4,
                            receipt_error = $5, delivered_at = CASE WHEN $2 = 'delivered' THEN now()
                                                                    ELSE delivered_at END,
                            updated_at = now()
                     WHERE id = $1"""

# The body is written only when the destination's subscriber may have SMS read out (a live read_sms
# consent); otherwise NULL from the start: a message nobody consented to have read is never stored. It comes
# sealed ($6, with its key $8 and the clear length $9).
_INSERT_MO = """INSERT INTO iim.sms_inbound (sms_id, content_hash, transport, source, destination, subscriber_id,
                                             body, body_key, body_length, received_at)
                VALUES ($1, $2, $3, $4, $5, (SELECT id FROM iim.subscriber WHERE msisdn = $5),
                        CASE WHEN EXISTS (
                            SELECT 1 FROM iim.consent c
                              JOIN iim.subscriber s ON s.tenant_id = c.tenant_id AND s.id = c.subscriber_id
                             WHERE s.msisdn = $5 AND c.purpose = 'read_sms' AND c.revoked_at IS NULL
                               AND (c.expires_at IS NULL OR c.expires_at > now()))
                        THEN $6::text END,
                        $8, $9, $7)
                ON CONFLICT (tenant_id, sms_id) DO NOTHING
                RETURNING id, sms_id, subscriber_id, received_at"""


@dataclass(frozen=True, slots=True)
class QueuedSms:
    """An SMS to queue with others (:func:`enqueue_many`)."""

    key: str
    msisdn: str
    body: str
    incident_id: UUID | None = None


def seal_body(data_key: DataKey, key: str, body: str) -> str:
    """An outbox body sealed with the tenant's data key for the row ``key`` (as the row stores it)."""
    return data_key.seal(OUTBOX, key, "body", body)


async def enqueue_sms(conn: Connection, *, key: str, msisdn: str, body: str, data_key: DataKey, flash: bool = False,
                      incident_id: UUID | None = None, source: str | None = None) -> UUID:
    """Queue an SMS in the caller's tenant transaction (``tenant_tx``), its body sealed with ``data_key`` (the
    tenant's active key); the same ``key`` returns the first row's id and changes nothing (first write wins),
    so a retried caller never sends twice."""
    row_id: UUID | None = await conn.fetchval(_ENQUEUE, key, msisdn, seal_body(data_key, key, body), flash,
                                              incident_id, source, data_key.key_id)
    if row_id is None:
        row_id = await conn.fetchval("SELECT id FROM iim.sms_outbox WHERE key = $1", key)
    if row_id is None:  # pragma: no cover - the conflicting row is visible in this tenant
        raise LookupError(f"sms_outbox key {key!r} conflicted but is not visible")
    return row_id


async def enqueue_many(conn: Connection, messages: Sequence[QueuedSms], data_key: DataKey) -> None:
    """:func:`enqueue_sms` for several SMS at once, without their ids: one statement for one SMS, one
    pipelined batch for more; keys already queued change nothing."""
    rows = [(m.key, m.msisdn, seal_body(data_key, m.key, m.body), m.incident_id, data_key.key_id) for m in messages]
    if len(rows) == 1:
        await conn.execute(_ENQUEUE_MANY, *rows[0])
    elif rows:
        await conn.executemany(_ENQUEUE_MANY, rows)


async def count_keyed(conn: Connection, prefix: str) -> int:
    """How many SMS of the caller's tenant have a key starting with ``prefix``."""
    return int(await conn.fetchval("SELECT count(*) FROM iim.sms_outbox WHERE starts_with(key, $1)", prefix))


async def mark_mo_handled(conn: Connection, inbound_id: UUID) -> bool:
    """Mark an MO as acted upon (in the caller's tenant transaction); False if it was already."""
    done: UUID | None = await conn.fetchval(
        "UPDATE iim.sms_inbound SET handled_at = now() WHERE id = $1 AND handled_at IS NULL RETURNING id",
        inbound_id)
    return done is not None


async def forget_mo_body(conn: Connection, sms_id: str) -> bool:
    """Forget the stored body of the MO ``sms_id`` now (in the caller's tenant transaction): it will not be
    read out. Its metadata stays. False when no body was stored (or it is gone already)."""
    gone: UUID | None = await conn.fetchval(
        "UPDATE iim.sms_inbound SET body = NULL, body_purged_at = now(), handled_at = coalesce(handled_at, now()) "
        "WHERE sms_id = $1 AND body IS NOT NULL RETURNING id", sms_id)
    return gone is not None


async def purge_mo_bodies(pool: Pool, retention_s: float, *, limit: int = 1000) -> int:
    """Forget the bodies of MO received more than ``retention_s`` ago, every tenant (``iim.sms_purge_bodies``);
    the number forgotten (at most ``limit``)."""
    return int(await pool.fetchval("SELECT iim.sms_purge_bodies(make_interval(secs => $1), $2)",
                                   float(retention_s), limit))


# --- the sender's statements ---------------------------------------------------------------------------------

async def claim_due(pool: Pool, limit: int, lease: timedelta) -> list[asyncpg.Record]:
    """Claim up to ``limit`` due rows of every tenant (``iim.sms_claim``: status ``sending`` for ``lease``)."""
    rows: list[asyncpg.Record] = await pool.fetch("SELECT * FROM iim.sms_claim($1, $2)", limit, lease)
    return rows


async def write_outcomes(conn: Connection, transport: str,
                         outcomes: Sequence[tuple[UUID, int, str, str | None, int | None, float, str | None]]
                         ) -> set[UUID]:
    """Write submit outcomes of one tenant's claimed rows, each (id, attempts, status, part ids joined by
    chr(31) or None, segments, retry delay, error); returns the ids written (a row claimed again since,
    its lease expired, is not)."""
    updated = await conn.fetchmany(_UPDATE_OUTCOME, [(*o, transport) for o in outcomes])
    return {r["id"] for r in updated}


async def queue_depth(pool: Pool) -> int:
    """Rows queued or being sent, all tenants."""
    return int(await pool.fetchval("SELECT iim.sms_queue_depth()"))


async def find_by_smsc_id(pool: Pool, transport: str, ids: list[str]) -> dict[str, tuple[UUID, UUID]]:
    """The rows (tenant, id) that ``transport``'s SMSC message ids belong to, across tenants."""
    found = await pool.fetch("SELECT * FROM iim.sms_find_by_smsc_id($1, $2)", transport, ids)
    return {r["smsc_id"]: (r["tenant_id"], r["id"]) for r in found}


async def lock_for_receipts(conn: Connection, ids: list[UUID]) -> list[asyncpg.Record]:
    """The rows receipts are about, locked in id order, with what applying a receipt reads."""
    rows: list[asyncpg.Record] = await conn.fetch(_RECEIPT_ROWS, ids)
    return rows


async def write_receipts(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Write the receipt state of rows locked by :func:`lock_for_receipts` (dicts of their changed columns)."""
    await conn.executemany(_UPDATE_RECEIPT, [(r["id"], r["status"], r["delivered_ids"], r["receipt_state"],
                                              r["receipt_error"]) for r in rows])


async def subscriber_tenant(pool: Pool, msisdn: str) -> UUID | None:
    """The tenant of the subscriber with this number (None: none, or several tenants have it)."""
    tenant_id: UUID | None = await pool.fetchval("SELECT iim.subscriber_tenant($1)", msisdn)
    return tenant_id


async def store_mo(conn: Connection, mo: MoSms, digest: str, *, dedup_window: float,
                   data_key: DataKey) -> asyncpg.Record | None:
    """Store an MO in the caller's tenant transaction, its body sealed with ``data_key``; None when it is a
    redelivery (same SMSC id, or without one the same content within ``dedup_window`` seconds)."""
    source = mo.source[:32] or "unknown"
    if mo.sms_id:
        sms_id = f"{mo.transport}:{mo.sms_id}"[:200]
        row: asyncpg.Record | None = await conn.fetchrow(
            _INSERT_MO, sms_id, digest, mo.transport, source, mo.destination,
            data_key.seal(INBOUND, sms_id, "body", mo.body), mo.received_at, data_key.key_id, len(mo.body))
        return row
    # No id from the SMSC: the same content within the window is a redelivery. The lock serialises two
    # copies arriving at once (on two connections) so that exactly one is stored.
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _MO_LOCK_NS, digest)
    seen = await conn.fetchval(
        "SELECT 1 FROM iim.sms_inbound WHERE content_hash = $1 AND received_at > now() - make_interval(secs => $2)",
        digest, dedup_window)
    if seen:
        return None
    # A fresh id, not derived from the content: the digest must not outlive the dedup window in the table.
    sms_id = f"h:{uuid4().hex}"
    row = await conn.fetchrow(_INSERT_MO, sms_id, digest, mo.transport, source, mo.destination,
                              data_key.seal(INBOUND, sms_id, "body", mo.body), mo.received_at, data_key.key_id,
                              len(mo.body))
    return row


# --- key rotation: re-sealing bodies with a tenant's new data key ---------------------------------------------

_SEALED = {
    OUTBOX: """SELECT id, key AS row_key, body, body_key FROM iim.sms_outbox
               WHERE body IS NOT NULL AND body_key IS DISTINCT FROM $1 AND id > $2 ORDER BY id LIMIT $3""",
    INBOUND: """SELECT id, sms_id AS row_key, body, body_key FROM iim.sms_inbound
                WHERE body IS NOT NULL AND body_key IS DISTINCT FROM $1 AND id > $2 ORDER BY id LIMIT $3""",
}
_SEALED_COUNTS = {
    OUTBOX: "SELECT body_key, count(*) AS n FROM iim.sms_outbox WHERE body IS NOT NULL GROUP BY body_key",
    INBOUND: "SELECT body_key, count(*) AS n FROM iim.sms_inbound WHERE body IS NOT NULL GROUP BY body_key",
}
_RESEAL = {
    OUTBOX: """UPDATE iim.sms_outbox SET body = $3, body_key = $4
               WHERE id = $1 AND body_key IS NOT DISTINCT FROM $2 AND body IS NOT NULL""",
    INBOUND: """UPDATE iim.sms_inbound SET body = $3, body_key = $4
                WHERE id = $1 AND body_key IS NOT DISTINCT FROM $2 AND body IS NOT NULL""",
}


async def sealed_bodies(conn: Connection, table: str, *, not_key: int, after: UUID, limit: int
                        ) -> list[asyncpg.Record]:
    """Up to ``limit`` rows of ``table`` (:data:`OUTBOX` or :data:`INBOUND`) in the caller's tenant with a body
    not sealed by ``not_key`` (older keys, or clear text from before sealing), after ``after`` in id order:
    ``id, row_key, body, body_key``."""
    rows: list[asyncpg.Record] = await conn.fetch(_SEALED[table], not_key, after, limit)
    return rows


async def sealed_counts(conn: Connection, table: str) -> dict[int | None, int]:
    """How many bodies of ``table`` in the caller's tenant each data key seals (``None``: still in clear)."""
    return {r["body_key"]: int(r["n"]) for r in await conn.fetch(_SEALED_COUNTS[table])}


async def reseal_bodies(conn: Connection, table: str, rows: Sequence[tuple[UUID, int | None, str, int]]) -> None:
    """Write re-sealed bodies, each ``(id, the key it was read with, sealed body, new key)``; a row changed
    meanwhile (purged, forgotten, re-sealed by another run) is left as it is."""
    await conn.executemany(_RESEAL[table], rows)


async def erase_inbound(conn: Connection, subscriber_id: UUID, msisdn: str) -> int:
    """Delete the incoming SMS of a subscriber (also rows left without one, by their destination): erasure."""
    result = await conn.execute("DELETE FROM iim.sms_inbound WHERE subscriber_id = $1 OR destination = $2",
                                subscriber_id, msisdn)
    return int(result.split()[-1])
