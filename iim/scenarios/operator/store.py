"""The SQL of the operator's incident views and test calls. Each function runs in the caller's tenant-scoped
transaction (row-level security: another tenant's incident is no row at all)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from iim.scenarios.engine import IncidentState
from iim.scenarios.operator.models import (
    ActionEntry,
    AuditLine,
    EventEntry,
    IncidentQuery,
    IncidentSummary,
    SmsEntry,
    decode_cursor,
)
from policy_cache import audit
from policy_cache.db import Connection

__all__ = ["READ_ACTION", "list_incidents", "incident_summary", "incident_scope", "incident_rows", "IncidentRows", "household_contact",
           "notify_target", "TestClaim", "claim_test_originate", "settle_test_originate"]

_SUMMARY = """
SELECT i.id, i.household_id, i.device_id, coalesce(d.name, i.sender) AS device_name, i.hazard, i.state::text AS state, i.step, i.attempt,
       i.deadline, i.reason, i.scenario->>'name' AS scenario, i.first_event_id, i.event_count, i.opened_at,
       i.updated_at, i.closed_at
  FROM iim.incident i LEFT JOIN iim.device d ON d.tenant_id = i.tenant_id AND d.id = i.device_id"""

#: The audit lines a timeline shows at most (an incident writes a few dozen).
AUDIT_LIMIT = 1000
#: The audit action of an operator's read of incidents (in the audit log, not in the incident's timeline).
READ_ACTION = "incident.read"


def _summary(row: Any) -> IncidentSummary:
    data = dict(row)
    deadline: datetime | None = data.pop("deadline")
    held = deadline is not None and deadline.year == 9999  # 'infinity' (asyncpg's datetime.max)
    data |= {"state": IncidentState(data["state"]), "held": held, "deadline": None if held else deadline}
    return IncidentSummary(**data)


async def list_incidents(conn: Connection, query: IncidentQuery, limit: int) -> list[IncidentSummary]:
    """A page of the tenant's incidents, newest first (keyset: opened_at, id)."""
    after_at, after_id = decode_cursor(query.after) if query.after is not None else (None, None)
    rows = await conn.fetch(
        _SUMMARY + """
         WHERE ($1::uuid IS NULL OR i.household_id = $1)
           AND ($2::text IS NULL OR i.state = $2::iim.incident_state)
           AND ($3::timestamptz IS NULL OR i.opened_at >= $3)
           AND ($4::timestamptz IS NULL OR i.opened_at < $4)
           AND ($5::timestamptz IS NULL OR (i.opened_at, i.id) < ($5, $6::uuid))
         ORDER BY i.opened_at DESC, i.id DESC LIMIT $7""",
        query.household_id, query.state.value if query.state is not None else None, query.since, query.until,
        after_at, after_id, limit)
    return [_summary(r) for r in rows]


async def incident_scope(conn: Connection, incident_id: UUID) -> tuple[UUID | None, UUID | None] | None:
    """The brand and region of the incident's household (None: no such incident)."""
    row = await conn.fetchrow(
        """SELECT h.brand_id, h.region_id FROM iim.incident i
             JOIN iim.household h ON h.tenant_id = i.tenant_id AND h.id = i.household_id
            WHERE i.id = $1""", incident_id)
    return None if row is None else (row["brand_id"], row["region_id"])


async def incident_summary(conn: Connection, incident_id: UUID) -> IncidentSummary | None:
    row = await conn.fetchrow(_SUMMARY + " WHERE i.id = $1", incident_id)
    return _summary(row) if row is not None else None


@dataclass(frozen=True, slots=True)
class IncidentRows:
    events: list[EventEntry]
    actions: list[ActionEntry]
    sms: list[SmsEntry]
    audit: list[AuditLine]


async def incident_rows(conn: Connection, incident_id: UUID) -> IncidentRows:
    """The incident's device events, actions, SMS and chained audit lines (oldest first each)."""
    events = await conn.fetch(
        """SELECT event_id, type, occurred_at, received_at, channel FROM iim.device_event
            WHERE incident_id = $1 ORDER BY received_at, event_id""", incident_id)
    actions = await conn.fetch(
        """SELECT key, step, kind, destination, call_uuid AS call_id, started_at, dispatched_at, sent_at, finished_at,
                  outcome, detail FROM iim.incident_action WHERE incident_id = $1 ORDER BY started_at, key""",
        incident_id)
    sms = await conn.fetch(
        """SELECT key, msisdn, status, attempts, created_at, updated_at, last_error FROM iim.sms_outbox
            WHERE incident_id = $1 ORDER BY created_at, key""", incident_id)
    lines = await audit.entries(conn, entity="incident", entity_id=incident_id, limit=AUDIT_LIMIT,
                                exclude_actions=(READ_ACTION,))
    return IncidentRows(
        events=[EventEntry(**dict(r)) for r in events],
        actions=[ActionEntry(**dict(r)) for r in actions],
        sms=[SmsEntry(**dict(r)) for r in sms],
        audit=[AuditLine(id=a.id, at=a.at, actor=a.actor, action=a.action, detail=a.detail,
                         correlation=a.correlation) for a in reversed(lines)])


async def household_contact(conn: Connection, household_id: UUID, contact: str) -> str | None:
    """The number of the household's bound contact named by subscriber id or number (None: no such contact)."""
    by_id: UUID | None
    try:
        by_id = UUID(contact)
    except ValueError:
        by_id = None
    found: str | None = await conn.fetchval(
        """SELECT s.msisdn FROM iim.binding b JOIN iim.subscriber s ON s.tenant_id = b.tenant_id AND s.id = b.subscriber_id
            WHERE b.household_id = $1 AND (s.id = $2 OR s.msisdn = $3) LIMIT 1""", household_id, by_id, contact)
    return found


async def notify_target(conn: Connection, device_id: UUID, connector: str) -> str | None:
    """The device's reference at ``connector`` (None: no such device behind that connector)."""
    ref: str | None = await conn.fetchval(
        "SELECT connector_ref FROM iim.device WHERE id = $1 AND connector = $2", device_id, connector)
    return ref


@dataclass(frozen=True, slots=True)
class TestClaim:
    claimed: bool
    in_flight: int
    last_hour: int
    at: datetime  # the database's time of the claim: the minute it is counted in


async def claim_test_originate(conn: Connection, max_concurrent: int, max_per_hour: int) -> TestClaim:
    """Count a test call under the tenant's alert-call caps, as an alarm's call is counted. Takes the tenant's
    originate lock until the caller commits: call it last in the transaction."""
    row = await conn.fetchrow("SELECT in_flight, last_hour, now() AS at FROM iim.originate_budget(false)")
    assert row is not None
    in_flight, last_hour = int(row["in_flight"]), int(row["last_hour"])
    if in_flight >= max_concurrent or last_hour >= max_per_hour:
        return TestClaim(False, in_flight, last_hour, row["at"])
    await conn.execute("SELECT iim.count_originates(1)")
    return TestClaim(True, in_flight, last_hour, row["at"])


async def settle_test_originate(conn: Connection, dispatched_at: datetime) -> None:
    """A counted test call ended: it is no longer in flight (as the trigger settles an alarm's call)."""
    await conn.execute(
        """INSERT INTO iim.originate_window AS w (minute, shard, calls, settled)
           VALUES (date_trunc('minute', $1::timestamptz), pg_backend_pid() % 32, 0, 1)
           ON CONFLICT (tenant_id, minute, shard) DO UPDATE SET settled = w.settled + 1""", dispatched_at)
