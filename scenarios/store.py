"""PostgreSQL side of incidents: read the facts a decision needs, persist the decision, record outcomes.

Each function runs inside the caller's tenant-scoped transaction. Persisting an ``Advance`` writes the
incident's new progress, one ``incident_action`` row per action (its idempotency key), the jobs that will
perform them, the deadline tick and the audit row together, so a crash leaves either all or none.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from iot_bridge.event_types import EventType
from iot_bridge.intake import IncidentJobs
from policy_cache import audit as audit_log
from policy_cache import jobs, repository
from policy_cache.db import Connection, Pool
from policy_cache.models import DeviceStatus, DeviceType, PresenceState
from scenarios.engine import (
    Action,
    Advance,
    Contact,
    IncidentFacts,
    IncidentState,
    Notify,
    PlaceCall,
    Progress,
    RecordMessage,
    SendSms,
)
from scenarios.model import ContactRole, Scenario

__all__ = ["ActionRow", "IncidentRow", "call_uuid_for", "load_action", "load_incident",
           "load_scenarios", "persist_advance", "record_outcome", "group_outcomes",
           "originate_facts", "claim_originate", "notification_targets", "sms_fallback_numbers", "notify_by_sms", "alarm_text", "NotificationTarget", "due_incidents", "audit", "action_spec"]

#: Namespace for deterministic call UUIDs: the same action key always dials with the same origination_uuid.
_CALL_NS = uuid.UUID("6f1c3f0e-2a4b-4a57-9d0e-1b5c9a7e0c11")

_INCIDENT = """
SELECT i.id, i.household_id, i.device_id, i.hazard, i.state::text AS state, i.scenario, i.step, i.attempt,
       i.deadline, i.first_event_id, i.opened_at,
       d.name AS device_name, d.type::text AS device_type, d.status::text AS device_status, d.sip_uri,
       d.external_id AS device_external_id,
       h.name AS household_name, h.presence::text AS presence, h.time_zone{extra}
  FROM iim.incident i
  JOIN iim.device d ON d.tenant_id = i.tenant_id AND d.id = i.device_id
  JOIN iim.household h ON h.tenant_id = i.tenant_id AND h.id = i.household_id
 WHERE i.id = $1
   FOR UPDATE OF i"""
# Contacts (by escalation priority) and the household's ringing speakers, in the same round trip.
_FACTS = """,
       (SELECT coalesce(json_agg(json_build_object('role', b.role, 'priority', b.priority, 'msisdn', s.msisdn,
                                                   'id', s.id, 'name', s.display_name)
                                 ORDER BY b.priority, s.msisdn), '[]')
          FROM iim.binding b JOIN iim.subscriber s ON s.tenant_id = b.tenant_id AND s.id = b.subscriber_id
         WHERE b.household_id = i.household_id AND (b.device_id IS NULL OR b.device_id = i.device_id)) AS contacts,
       (SELECT coalesce(json_agg(x.sip_uri ORDER BY x.name), '[]') FROM iim.device x
         WHERE x.household_id = i.household_id AND x.enabled AND x.sip_uri IS NOT NULL AND x.type = 'speaker'
           AND 'sip' = ANY (x.capabilities)) AS home,
       (SELECT coalesce(json_agg(json_build_object('id', x.id, 'connector', x.connector, 'ref', x.connector_ref)
                                 ORDER BY x.name), '[]')
          FROM iim.device x WHERE x.household_id = i.household_id AND x.enabled AND x.connector IS NOT NULL
       ) AS notify_targets,
       ARRAY({fallback}) AS sms_fallback"""
# Who gets the text when the smart home cannot be told: the owners and members of the household.
_FALLBACK_NUMBERS = """SELECT DISTINCT s.msisdn FROM iim.binding b
             JOIN iim.subscriber s ON s.tenant_id = b.tenant_id AND s.id = b.subscriber_id
            WHERE b.household_id = {household} AND b.role IN ('owner', 'member') ORDER BY s.msisdn"""
_INCIDENT_LIGHT = _INCIDENT.format(extra="")
_INCIDENT_FULL = _INCIDENT.format(extra=_FACTS.format(fallback=_FALLBACK_NUMBERS.format(household="i.household_id")))


@dataclass(frozen=True, slots=True)
class NotificationTarget:
    """A household device reachable through a smart-home connector."""

    device_id: str
    connector: str
    connector_ref: str


@dataclass(frozen=True, slots=True)
class IncidentRow:
    id: UUID
    state: IncidentState
    progress: Progress
    scenario: Scenario | None
    deadline: datetime | None
    first_event_id: str
    household_id: UUID
    device_id: UUID
    facts: IncidentFacts
    #: Loaded with the facts (``full``) only: what a notification step needs to be settled with its decision.
    notify_targets: tuple[NotificationTarget, ...] | None = None
    sms_fallback: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ActionRow:
    key: str
    incident_id: UUID
    step: int
    kind: str
    destination: str | None
    call_uuid: UUID | None
    dispatched_at: datetime | None
    outcome: str | None
    spec: dict[str, Any]


def call_uuid_for(key: str) -> UUID:
    return uuid.uuid5(_CALL_NS, key)


async def load_incident(conn: Connection, incident_id: UUID, *, full: bool = True) -> IncidentRow | None:
    """The incident (locked for this transaction) with everything the engine decides on.

    ``full=False`` skips what only decisions need (contacts, home devices, the scenario): for executors that
    only check the incident's state before or after performing one action.
    """
    row = await conn.fetchrow(_INCIDENT_FULL if full else _INCIDENT_LIGHT, incident_id)
    if row is None:
        return None
    contacts: tuple[Contact, ...] = ()
    home: tuple[str, ...] = ()
    targets: tuple[NotificationTarget, ...] | None = None
    fallback: tuple[str, ...] | None = None
    if full:
        targets = tuple(NotificationTarget(str(t["id"]), t["connector"], t["ref"]) for t in row["notify_targets"])
        fallback = tuple(row["sms_fallback"])
        contacts = tuple(
            Contact(role=ContactRole(c["role"]), msisdn=c["msisdn"], subscriber_id=str(c["id"]),
                    priority=c["priority"], name=c["name"])
            for c in row["contacts"])
        home = tuple(row["home"])
    facts = IncidentFacts(
        event_type=EventType(row["hazard"]), device_type=DeviceType(row["device_type"]),
        device_id=row["device_external_id"], device_name=row["device_name"],
        device_status=DeviceStatus(row["device_status"]), device_sip_uri=row["sip_uri"],
        household_name=row["household_name"], presence=PresenceState(row["presence"]),
        time_zone=row["time_zone"], contacts=contacts, home_targets=home)
    scenario = Scenario.model_validate(row["scenario"]) if full and row["scenario"] else None
    state = IncidentState(row["state"])
    return IncidentRow(id=row["id"], state=state, progress=Progress(state, row["step"], row["attempt"]),
                       scenario=scenario, deadline=row["deadline"], first_event_id=row["first_event_id"],
                       household_id=row["household_id"], device_id=row["device_id"], facts=facts,
                       notify_targets=targets, sms_fallback=fallback)


async def load_scenarios(conn: Connection, household_id: UUID) -> list[Scenario]:
    """Enabled scenarios for the household first, then the tenant-wide ones."""
    return [Scenario.from_record(r) for r in await repository.scenarios_for_household(conn, household_id)]


def action_spec(action: Action) -> dict[str, Any]:
    """The parameters of an action as stored with its key (the executor performs exactly these)."""
    if isinstance(action, PlaceCall):
        return {"ring_s": action.ring_s, "prompt_text": action.prompt_text,
                "ivr": action.ivr.model_dump(mode="json") if action.ivr is not None else None}
    if isinstance(action, SendSms):
        return {"text": action.text}
    if isinstance(action, RecordMessage):
        return {"prompt_text": action.prompt_text, "max_s": action.max_s}
    if isinstance(action, Notify):
        return {"text": action.text}
    raise TypeError(f"unknown action {action!r}")


def _action_fields(action: Action) -> tuple[str, str | None]:
    if isinstance(action, PlaceCall):
        return "call", action.destination
    if isinstance(action, SendSms):
        return "sms", action.msisdn
    if isinstance(action, RecordMessage):
        return "record", action.destination
    if isinstance(action, Notify):
        return "notify", None
    raise TypeError(f"unknown action {action!r}")


async def persist_advance(conn: Connection, tenant_id: UUID, incident: IncidentRow, advance: Advance, *,
                          scenario: Scenario | None, now: datetime, actor: str = "scenario-engine"
                          ) -> list[tuple[str, str]]:
    """Write the decision; returns the (kind, outcome) of the actions settled here rather than by a job."""
    settled: list[tuple[str, str]] = []
    state = advance.progress.state
    closed = state not in (IncidentState.OPEN, IncidentState.NOTIFYING)
    await conn.execute(
        """UPDATE iim.incident SET state = $2::iim.incident_state, step = $3, attempt = $4, deadline = $5,
                  reason = $6, updated_at = now(), closed_at = CASE WHEN $7 THEN now() END,
                  scenario = coalesce($8::jsonb, scenario), scenario_id = scenario_id
            WHERE id = $1""",
        incident.id, state.value, advance.progress.step, advance.progress.attempt, advance.deadline,
        advance.reason[:1000], closed, scenario.model_dump(mode="json") if scenario is not None else None)
    queries = jobs.queries_for(conn)
    for action in advance.actions:
        kind, destination = _action_fields(action)
        if isinstance(action, SendSms):
            # An SMS is only a row in the outbox (the SMS sender delivers it): written here, in the decision's
            # own transaction, so it cannot be lost between the decision and a job.
            inserted = await conn.fetchval(
                """INSERT INTO iim.incident_action (key, incident_id, step, kind, destination, spec, outcome, detail,
                                                    finished_at)
                   VALUES ($1, $2, $3, 'sms', $4, $5::jsonb, 'queued', 'queued in the SMS outbox', now())
                   ON CONFLICT (tenant_id, key) DO NOTHING RETURNING key""",
                action.key, incident.id, action.step, destination, action_spec(action))
            if inserted is not None:
                await conn.execute(
                    """INSERT INTO iim.sms_outbox (key, msisdn, body, incident_id) VALUES ($1, $2, $3, $4)
                       ON CONFLICT (tenant_id, key) DO NOTHING""", action.key, action.msisdn, action.text[:1600],
                    incident.id)
                settled.append(("sms", "queued"))
            continue
        if isinstance(action, Notify):
            targets = incident.notify_targets
            if targets is None:
                targets = tuple(await notification_targets(conn, incident.household_id))
            if not targets:
                # Nothing in the household listens to a connector: the fallback text is decided right here,
                # with the decision, instead of a job that would find the same.
                inserted = await conn.fetchval(
                    """INSERT INTO iim.incident_action (key, incident_id, step, kind, spec)
                       VALUES ($1, $2, $3, 'notify', $4::jsonb) ON CONFLICT (tenant_id, key) DO NOTHING
                       RETURNING key""", action.key, incident.id, action.step, action_spec(action))
                if inserted is not None:
                    settled.append(("notify", await notify_by_sms(
                        conn, tenant_id, incident, action.key, action.text or alarm_text(incident),
                        "no connected device", contacts=incident.sms_fallback)))
                continue
        inserted = await conn.fetchval(
            """INSERT INTO iim.incident_action (key, incident_id, step, kind, destination, spec, call_uuid)
               VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7) ON CONFLICT (tenant_id, key) DO NOTHING RETURNING key""",
            action.key, incident.id, action.step, kind, destination, action_spec(action),
            call_uuid_for(action.key) if kind in ("call", "record") else None)
        if inserted is not None:
            payload = json.dumps({"tenant": str(tenant_id), "incident": str(incident.id), "key": action.key})
            await queries.enqueue(IncidentJobs.ACTION, payload.encode(), priority=20, dedupe_key=f"act:{action.key}",
                                  on_conflict="skip")
    await audit(conn, tenant_id, actor, f"incident.{state.value}", incident.id, {
        "reason": advance.reason, "step": advance.progress.step, "attempt": advance.progress.attempt,
        "actions": [{"key": a.key, "kind": _action_fields(a)[0]} for a in advance.actions],
        "notes": list(advance.notes)}, event_id=incident.first_event_id)
    return settled


def alarm_text(incident: IncidentRow) -> str:
    """What an SMS or notification says when its scenario step gives no text."""
    return f"IIM alarm: {incident.facts.event_type.value}"


async def notify_by_sms(conn: Connection, tenant_id: UUID, incident: IncidentRow, key: str, text: str,
                        detail: str, *, contacts: Sequence[str] | None = None) -> str:
    """Settle a notification the smart home did not take: text the household's owners and members instead
    (one outbox row each) and record the outcome on its action; returns it (``sms_fallback`` or ``skipped``).
    ``contacts``: the numbers when the caller already has them (a fully loaded incident)."""
    if contacts is None:
        contacts = await sms_fallback_numbers(conn, incident.household_id)
    for n, msisdn in enumerate(contacts):
        await conn.execute(
            """INSERT INTO iim.sms_outbox (key, msisdn, body, incident_id) VALUES ($1, $2, $3, $4)
               ON CONFLICT (tenant_id, key) DO NOTHING""", f"{key}/sms/{n}", msisdn, text[:1600], incident.id)
    outcome = "sms_fallback" if contacts else "skipped"
    await record_outcome(conn, key, outcome, detail)
    await audit(conn, tenant_id, "scenario-engine", "incident.notify", incident.id,
                {"key": key, "outcome": outcome, "detail": detail, "devices": []}, event_id=incident.first_event_id)
    return outcome


async def audit(conn: Connection, tenant_id: UUID, actor: str, action: str, incident_id: UUID,
                detail: dict[str, Any], *, event_id: str | None = None, call_uuid: UUID | None = None) -> None:
    correlation: dict[str, str] = {}
    if event_id:
        correlation["event_id"] = event_id
    if call_uuid:
        correlation["call_id"] = str(call_uuid)
    await audit_log.stage(conn, actor=actor, action=action, entity="incident", entity_id=incident_id,
                          detail=detail, correlation=correlation)


async def due_incidents(pool: Pool, limit: int) -> list[tuple[UUID, UUID]]:
    """(tenant, incident) of live incidents whose deadline has passed, oldest first, across tenants."""
    return [(r["tenant_id"], r["id"]) for r in await pool.fetch("SELECT * FROM iim.due_incidents($1)", limit)]


async def group_outcomes(conn: Connection, incident_id: UUID, progress: Progress) -> list[ActionRow]:
    """The actions of the incident's current group (keys ``{incident}/{step}/{attempt}/n``)."""
    prefix = f"{incident_id}/{progress.step}/{progress.attempt}/"
    rows = await conn.fetch(
        """SELECT key, incident_id, step, kind, destination, call_uuid, dispatched_at, outcome, spec
             FROM iim.incident_action WHERE incident_id = $1 AND starts_with(key, $2)""", incident_id, prefix)
    return [_action_row(r) for r in rows]


async def load_action(conn: Connection, key: str) -> ActionRow | None:
    row = await conn.fetchrow(
        """SELECT key, incident_id, step, kind, destination, call_uuid, dispatched_at, outcome, spec
             FROM iim.incident_action WHERE key = $1 FOR UPDATE""", key)
    return _action_row(row) if row is not None else None


def _action_row(row: Any) -> ActionRow:
    return ActionRow(**dict(row))


async def record_outcome(conn: Connection, key: str, outcome: str, detail: str = "") -> None:
    await conn.execute(
        "UPDATE iim.incident_action SET outcome = $2, detail = $3, finished_at = now() WHERE key = $1 "
        "AND outcome IS NULL", key, outcome, detail[:500])


async def originate_facts(conn: Connection, household_id: UUID) -> tuple[tuple[int, int, tuple[str, ...]] | None,
                                                                      frozenset[str]]:
    """The tenant's originate limits (None: no row, use the defaults) and every number and SIP URI an alert
    for this household may reach (its bound contacts and devices), in one round trip."""
    row = await conn.fetchrow(
        """SELECT l.max_concurrent, l.max_per_hour, l.allowed_prefixes,
                  ARRAY(SELECT s.msisdn FROM iim.binding b
                          JOIN iim.subscriber s ON s.tenant_id = b.tenant_id AND s.id = b.subscriber_id
                         WHERE b.household_id = $1
                        UNION
                        SELECT d.sip_uri FROM iim.device d
                         WHERE d.household_id = $1 AND d.sip_uri IS NOT NULL AND d.enabled) AS bound
             FROM (SELECT 1) AS one LEFT JOIN iim.originate_limit l ON true""", household_id)
    assert row is not None
    limits = (None if row["max_concurrent"] is None
              else (int(row["max_concurrent"]), int(row["max_per_hour"]), tuple(row["allowed_prefixes"])))
    return limits, frozenset(row["bound"])


async def claim_originate(conn: Connection, key: str, *, max_concurrent: int, max_per_hour: int
                          ) -> tuple[bool, int, int]:
    """Check the tenant's caps and, under them, mark the call dispatched and count it: (claimed, in flight,
    last hour). One statement under the tenant's originate lock, which is held until the caller commits:
    call it last in the transaction."""
    row = await conn.fetchrow("SELECT claimed, in_flight, last_hour FROM iim.claim_originate($1, $2, $3)",
                              key, max_concurrent, max_per_hour)
    assert row is not None
    return bool(row["claimed"]), int(row["in_flight"]), int(row["last_hour"])


async def notification_targets(conn: Connection, household_id: UUID) -> list[NotificationTarget]:
    """The household's enabled devices behind a connector (cloud speakers, panels, hubs)."""
    rows = await conn.fetch(
        """SELECT id, connector, connector_ref FROM iim.device
            WHERE household_id = $1 AND enabled AND connector IS NOT NULL ORDER BY name""", household_id)
    return [NotificationTarget(str(r["id"]), r["connector"], r["connector_ref"]) for r in rows]


async def sms_fallback_numbers(conn: Connection, household_id: UUID) -> list[str]:
    """Who gets the text when the smart home cannot be told: the owners and members of the household."""
    rows = await conn.fetch(_FALLBACK_NUMBERS.format(household="$1"), household_id)
    return [r["msisdn"] for r in rows]

