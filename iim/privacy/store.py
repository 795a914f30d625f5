"""PostgreSQL side of retention and erasure: the cross-tenant purge round, and a subscriber's content found
and removed inside one tenant transaction (recorded messages included: the rows are deleted here, the
files by :mod:`iim.privacy.recordings`). Incoming SMS rows are the SMS store's (``iim.sms.store``); audit
tombstones are the audit chain's (``policy_cache.audit``)."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from iim.privacy.retention import RetentionDefaults
from policy_cache.db import Connection, Pool

__all__ = ["PurgeCount", "PurgedRecording", "Subject", "audit_rows_about", "erase_event_payloads",
           "erase_account_links", "erase_recorded_messages", "flush_staged_audit", "purge_recordings", "purge_round", "subject", "subject_devices"]


@dataclass(frozen=True, slots=True)
class PurgeCount:
    tenant_id: UUID
    kind: str  # sms_body | event_payload | audit_detail
    purged: int


@dataclass(frozen=True, slots=True)
class PurgedRecording:
    tenant_id: UUID
    file_name: str


@dataclass(frozen=True, slots=True)
class Subject:
    """The subscriber whose content is erased."""

    id: UUID
    msisdn: str
    display_name: str | None


async def purge_round(pool: Pool, defaults: RetentionDefaults, *, limit: int, timeout_s: float) -> list[PurgeCount]:
    """One purge round over every tenant (``iim.privacy_purge``), at most ``limit`` rows of each kind."""
    rows = await pool.fetch(
        "SELECT tenant_id, kind, purged FROM iim.privacy_purge(make_interval(secs => $1), make_interval(secs => $2), "
        "make_interval(secs => $3), $4)",
        defaults.sms_body_s, defaults.event_payload_s, defaults.audit_detail_s, limit, timeout=timeout_s)
    return [PurgeCount(r["tenant_id"], r["kind"], int(r["purged"])) for r in rows]


async def purge_recordings(conn: Connection, *, limit: int) -> list[PurgedRecording]:
    """Delete, every tenant, at most ``limit`` recorded messages that are due (``iim.recording_purge``: expired,
    or older than the tenant's ``recording_s``); their files are the caller's to delete before it commits."""
    rows = await conn.fetch("SELECT tenant_id, file_name FROM iim.recording_purge($1)", limit)
    return [PurgedRecording(r["tenant_id"], r["file_name"]) for r in rows]


async def subject(conn: Connection, subscriber_id: UUID) -> Subject | None:
    row = await conn.fetchrow("SELECT id, msisdn, display_name FROM iim.subscriber WHERE id = $1 FOR UPDATE",
                              subscriber_id)
    return None if row is None else Subject(row["id"], row["msisdn"], row["display_name"])


async def subject_devices(conn: Connection, subscriber_id: UUID) -> list[UUID]:
    """The subscriber's devices: those bound to them alone (a wearable), and every device of a household in
    which no other owner or member is bound (their home)."""
    rows = await conn.fetch(
        """SELECT b.device_id AS id FROM iim.binding b WHERE b.subscriber_id = $1 AND b.device_id IS NOT NULL
           UNION
           SELECT d.id FROM iim.device d
            WHERE d.household_id IN (
                  SELECT b.household_id FROM iim.binding b
                   WHERE b.subscriber_id = $1 AND b.role IN ('owner', 'member'))
              AND NOT EXISTS (SELECT 1 FROM iim.binding o
                               WHERE o.household_id = d.household_id AND o.subscriber_id <> $1
                                 AND o.role IN ('owner', 'member'))""", subscriber_id)
    return [r["id"] for r in rows]


async def erase_event_payloads(conn: Connection, device_ids: list[UUID]) -> int:
    """Empty the payloads of these devices' events (the ledger row stays: idempotency and incident history)."""
    if not device_ids:
        return 0
    result = await conn.execute(
        "UPDATE iim.device_event SET payload = '{}'::jsonb, payload_purged_at = now() "
        "WHERE device_id = ANY($1::uuid[]) AND payload_purged_at IS NULL", device_ids)
    return int(result.split()[-1])


async def erase_recorded_messages(conn: Connection, subscriber_id: UUID) -> list[str]:
    """Delete the messages callers left the subscriber (``iim.recorded_message``); their file names, for the
    caller to delete before the transaction commits."""
    rows = await conn.fetch("DELETE FROM iim.recorded_message WHERE subscriber_id = $1 RETURNING file_name",
                            subscriber_id)
    return [r["file_name"] for r in rows]


# The subscriber's own homes: households where they are an owner or member and nobody else is.
_OWN_HOMES = """SELECT b.household_id FROM iim.binding b
                 WHERE b.subscriber_id = $1 AND b.role IN ('owner', 'member')
                   AND NOT EXISTS (SELECT 1 FROM iim.binding o
                                    WHERE o.household_id = b.household_id AND o.subscriber_id <> $1
                                      AND o.role IN ('owner', 'member'))"""


async def erase_account_links(conn: Connection, subscriber_id: UUID, actor: str) -> int:
    """Forget the vendor-account tokens of the subscriber's own homes: each active link revoked here (tokens and
    their key ids dropped, the row kept as history), started linkings deleted. How many links were revoked."""
    await conn.execute(f"DELETE FROM iim.link_state WHERE household_id IN ({_OWN_HOMES})",  # noqa: S608 -- constants
                       subscriber_id)
    status: str = await conn.execute(
        f"""UPDATE iim.account_link SET status = 'revoked', access_token_sealed = NULL, access_token_key = NULL,
                   refresh_token_sealed = NULL, refresh_token_key = NULL, reason = 'erased with the subscriber',
                   actor = $2, changed_at = now()
             WHERE status = 'active' AND household_id IN ({_OWN_HOMES})""",  # noqa: S608 -- constants
        subscriber_id, actor[:200])
    return int(status.split()[-1])


async def flush_staged_audit(conn: Connection) -> None:
    """Chain the staged audit lines now, so the erasure's tombstones reach lines staged a moment ago."""
    await conn.execute("SELECT iim.audit_flush(10000)")


async def audit_rows_about(conn: Connection, who: Subject, device_ids: list[UUID]) -> list[int]:
    """Audit rows of the tenant that may carry the subject's personal content: rows about the subscriber or
    their devices, and rows whose detail names their number or display name."""
    rows = await conn.fetch(
        """SELECT id FROM iim.audit_log
            WHERE detail_salt IS NOT NULL
              AND ((entity = 'subscriber' AND entity_id = $1)
                   OR (entity = 'device' AND entity_id = ANY($2::text[]))
                   OR strpos(detail::text, $3) > 0
                   OR ($4::text IS NOT NULL AND length($4::text) >= 3 AND strpos(detail::text, $4::text) > 0))""",
        str(who.id), [str(d) for d in device_ids], who.msisdn, who.display_name)
    return [int(r["id"]) for r in rows]
