"""PostgreSQL side of incidents: read the facts a decision needs, persist the decision, record outcomes.

Each function runs inside the caller's tenant-scoped transaction (``claim_originate_now``, ``due_incidents``
and ``prune_originate_windows`` excepted). Persisting an ``Advance`` writes the incident's new progress and
deadline, one ``incident_action`` row per action (its idempotency key) with its SMS rows, the claim of its calls
or the jobs that will perform the rest, and its audit lines together, in one statement
(``iim.persist_decision``), so a crash leaves either all or none. Every statement of the scenario worker is
here; the SMS it queues outside a decision go through ``iim.sms.store``, the outbox's one writer.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal
from uuid import UUID

import asyncpg

from iim.core.envelope import DataKey
from iim.core.numbering import NumberingPlan
from iim.keys.keyring import Keyring
from iim.scenarios import registry as scenario_registry
from iim.scenarios.consent import ConsentRefusal
from iim.scenarios.engine import (
    Action,
    ActionOutcome,
    Advance,
    Contact,
    IncidentFacts,
    IncidentState,
    Notify,
    PlaceCall,
    PriorChain,
    Progress,
    RecordMessage,
    SendSms,
    event_of,
)
from iim.scenarios.model import ContactRole, IvrCheck, Scenario
from iim.sms import store as sms_store
from iot_bridge.intake import IncidentJobs
from policy_cache import audit as audit_log
from policy_cache import errors as store_errors
from policy_cache import jobs
from policy_cache.db import Connection, Pool, tenant_tx
from policy_cache.models import DeviceStatus, DeviceType, PresenceState
from policy_cache.presence import PresenceClaim, resolve_presence

__all__ = ["ActionRow", "IncidentRow", "call_uuid_for", "load_action", "load_incident",
           "load_scenarios", "persist_advance", "record_outcome", "write_outcomes", "OutcomeWrite", "CallClaim",
           "Persisted", "originate_facts", "claim_originate", "claim_originate_now", "notification_targets",
           "sms_fallback_numbers", "notify_by_sms", "alarm_text", "NotificationTarget", "due_incidents",
           "prune_originate_windows", "audit", "audit_line", "action_spec", "decode_action", "clear_incident",
           "exhaust_incident", "mark_sms_undelivered", "queue_action_sms", "retry_call", "text_unreachable",
           "unreachable_retries", "LimitsRow", "call_waited_s", "queue_capped_call", "end_unbegun", "step_tried",
           "reopen_incident", "live_presence"]

#: Namespace for deterministic call UUIDs: the same action key always dials with the same origination_uuid.
_CALL_NS = uuid.UUID("6f1c3f0e-2a4b-4a57-9d0e-1b5c9a7e0c11")

_INCIDENT = """
SELECT i.id, i.household_id, i.device_id, i.hazard, i.state::text AS state, i.scenario, i.step, i.attempt,
       i.deadline, i.first_event_id, i.opened_at, i.sender,
       d.name AS device_name, d.type::text AS device_type, d.status::text AS device_status, d.sip_uri,
       d.external_id AS device_external_id, 'dtmf_open' = ANY (d.capabilities) AS device_dtmf_open,
       -- ``time`` is when it happened, the same on every move (a reminder a day on, a restart): the event's time,
       -- else (a call, an SMS, the watchdog's finding) when the incident was opened, never the worker's now
       coalesce((SELECT e.occurred_at FROM iim.device_event e
                  WHERE e.tenant_id = i.tenant_id AND e.event_id = i.first_event_id), i.opened_at) AS occurred_at,
       h.name AS household_name, h.presence::text AS presence, h.time_zone,
       ({claims}) AS presence_claims, extract(epoch FROM now())::float8 AS db_now{extra}
  FROM iim.incident i
  -- no device: an incident an incoming call or SMS started (0027)
  LEFT JOIN iim.device d ON d.tenant_id = i.tenant_id AND d.id = i.device_id
  JOIN iim.household h ON h.tenant_id = i.tenant_id AND h.id = i.household_id
 WHERE i.id = $1
   FOR UPDATE OF i"""
# Contacts (by escalation priority) and the household's ringing speakers, in the same round trip.
_FACTS = """,
       (SELECT coalesce(json_agg(json_build_object('role', b.role, 'priority', b.priority, 'msisdn', s.msisdn,
                                                   'id', s.id, 'name', s.display_name,
                                                   'device_bound', b.device_id IS NOT NULL,
                                                   'consents', ARRAY(
                                                       SELECT c.purpose FROM iim.consent c
                                                        WHERE c.subscriber_id = s.id AND c.revoked_at IS NULL
                                                          AND (c.expires_at IS NULL OR c.expires_at > now())))
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
       ARRAY({fallback}) AS sms_fallback,
       (SELECT coalesce(json_agg(json_build_object('key', a.key, 'step', a.step, 'kind', a.kind,
                                                   'destination', a.destination, 'call_uuid', a.call_uuid,
                                                   'dispatched_at', a.dispatched_at, 'outcome', a.outcome,
                                                   'spec', a.spec)), '[]')
          FROM iim.incident_action a
         WHERE a.incident_id = i.id AND starts_with(a.key, i.id::text || '/' || i.step || '/' || i.attempt || '/')
       ) AS group_actions,
       (SELECT json_build_array(l.max_concurrent, l.max_per_hour, l.country_codes) FROM iim.originate_limit l
       ) AS originate_limits,
       ({numbering}) AS numbering_plan,
       {allowed} AS originate_allowed,
       {bound} AS bound"""
# Who gets the text when the smart home cannot be told: the owners and members of the household.
_FALLBACK_NUMBERS = """SELECT DISTINCT s.msisdn FROM iim.binding b
             JOIN iim.subscriber s ON s.tenant_id = b.tenant_id AND s.id = b.subscriber_id
            WHERE b.household_id = {household} AND b.role IN ('owner', 'member') ORDER BY s.msisdn"""
# Every number and SIP URI an alert call for the household may reach: its bound contacts and its devices.
_BOUND = """ARRAY(SELECT s.msisdn FROM iim.binding b
                 JOIN iim.subscriber s ON s.tenant_id = b.tenant_id AND s.id = b.subscriber_id
                WHERE b.household_id = {household}
               UNION
               SELECT d.sip_uri FROM iim.device d
                WHERE d.household_id = {household} AND d.sip_uri IS NOT NULL AND d.enabled)"""
# The tenant's allow-list entries that admit one of the household's numbers (a tenant may list many).
_ALLOWED = """ARRAY(SELECT DISTINCT a.prefix FROM iim.originate_allow a
                   JOIN iim.binding b ON b.household_id = {household}
                   JOIN iim.subscriber s ON s.tenant_id = b.tenant_id AND s.id = b.subscriber_id
                  WHERE starts_with(s.msisdn, a.prefix))"""
# The tenant's numbering plan (none: the default), read by the guard for destinations in national form.
_NUMBERING = """SELECT json_build_array(p.country_code, p.trunk_prefix, p.international_prefixes,
                                        p.national_lengths) FROM iim.numbering_plan p"""
_ORIGINATE_FACTS = """SELECT l.max_concurrent, l.max_per_hour, l.country_codes,
                             {allowed} AS allowed, {bound} AS bound, ({numbering}) AS numbering_plan
                        FROM (SELECT 1) AS one LEFT JOIN iim.originate_limit l ON true"""
_ORIGINATE_FACTS = _ORIGINATE_FACTS.format(bound=_BOUND.format(household="$1"), allowed=_ALLOWED.format(household="$1"),
                                           numbering=_NUMBERING)
# The household's live presence claims (policy_cache.presence resolves them over the registry's column).
_CLAIMS = """SELECT coalesce(json_agg(json_build_array(c.source, c.subject, c.state, extract(epoch FROM c.observed_at),
                                                  extract(epoch FROM c.expires_at))), '[]')
             FROM iim.presence_claim c WHERE c.household_id = {household} AND c.expires_at > now()"""
_INCIDENT = _INCIDENT.replace("{claims}", _CLAIMS.format(household="i.household_id"))
_INCIDENT_LIGHT = _INCIDENT.format(extra="")
_LOCK_INCIDENT = "SELECT 1 FROM iim.incident WHERE id = $1 FOR UPDATE"
_INCIDENT_FULL = _INCIDENT.format(extra=_FACTS.format(fallback=_FALLBACK_NUMBERS.format(household="i.household_id"),
                                                      bound=_BOUND.format(household="i.household_id"),
                                                      allowed=_ALLOWED.format(household="i.household_id"),
                                                      numbering=_NUMBERING))

#: A tenant's stored originate limits: max concurrent, max per hour, country codes (None: not set, the
#: service's defaults) and the allow-list entries that matter here (:func:`fs_app.outreach.guard.limits_from`).
LimitsRow = tuple[int | None, int | None, tuple[str, ...] | None, tuple[str, ...]]


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
    #: None for an incident an incoming call or SMS started
    device_id: UUID | None
    facts: IncidentFacts
    #: Loaded with the facts (``full``) only: what a notification step needs to be settled with its decision.
    notify_targets: tuple[NotificationTarget, ...] | None = None
    sms_fallback: tuple[str, ...] | None = None
    #: the actions of the current group (``full`` only)
    group: tuple[ActionRow, ...] | None = None
    #: the tenant's originate limits (:data:`LimitsRow`) and what its alert calls may reach (``full`` only)
    originate_limits: LimitsRow | None = None
    bound: frozenset[str] | None = None
    #: the tenant's numbering plan (``full`` only; None: the default)
    numbering_plan: NumberingPlan | None = None


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

    The full load locks the incident first and reads in a second statement: under READ COMMITTED a statement
    that waited for the lock still reads with the snapshot it started with, so two outcomes of one group
    arriving together each judged the group without the other's (committed meanwhile), neither advanced it,
    and the incident sat until the group's deadline.
    """
    if full:
        await conn.execute(_LOCK_INCIDENT, incident_id)
    row = await conn.fetchrow(_INCIDENT_FULL if full else _INCIDENT_LIGHT, incident_id)
    if row is None:
        return None
    contacts: tuple[Contact, ...] = ()
    home: tuple[str, ...] = ()
    targets: tuple[NotificationTarget, ...] | None = None
    fallback: tuple[str, ...] | None = None
    group: tuple[ActionRow, ...] | None = None
    limits: LimitsRow | None = None
    bound: frozenset[str] | None = None
    numbering: NumberingPlan | None = None
    if full:
        targets = tuple(NotificationTarget(str(t["id"]), t["connector"], t["ref"]) for t in row["notify_targets"])
        fallback = tuple(row["sms_fallback"])
        group = tuple(_group_action(row["id"], a) for a in row["group_actions"])
        most, hourly, plan = row["originate_limits"] or (None, None, None)
        limits = (most, hourly, None if plan is None else tuple(plan), tuple(row["originate_allowed"]))
        bound = frozenset(row["bound"])
        numbering = _numbering(row["numbering_plan"])
        contacts = tuple(
            Contact(role=ContactRole(c["role"]), msisdn=c["msisdn"], subscriber_id=str(c["id"]),
                    priority=c["priority"], name=c["name"], consents=frozenset(c["consents"]),
                    device_bound=c["device_bound"])
            for c in row["contacts"])
        home = tuple(row["home"])
    device = row["device_id"] is not None
    facts = IncidentFacts(
        event_type=event_of(row["hazard"]), device_type=DeviceType(row["device_type"]) if device else None,
        device_id=row["device_external_id"], device_name=row["device_name"] if device else row["sender"],
        device_status=DeviceStatus(row["device_status"]) if device else None, device_sip_uri=row["sip_uri"],
        household_name=row["household_name"],
        presence=live_presence(row["presence"], row["presence_claims"], row["db_now"]),
        time_zone=row["time_zone"], contacts=contacts, home_targets=home, sender=row["sender"],
        occurred_at=row["occurred_at"], device_dtmf_open=bool(row["device_dtmf_open"]))
    scenario = Scenario.model_validate(row["scenario"]) if full and row["scenario"] else None
    state = IncidentState(row["state"])
    return IncidentRow(id=row["id"], state=state, progress=Progress(state, row["step"], row["attempt"]),
                       scenario=scenario, deadline=row["deadline"], first_event_id=row["first_event_id"],
                       household_id=row["household_id"], device_id=row["device_id"], facts=facts,
                       notify_targets=targets, sms_fallback=fallback, group=group, originate_limits=limits,
                       bound=bound, numbering_plan=numbering)


def live_presence(baseline: str, claims: list[list[Any]], now: float) -> PresenceState:
    """The household's presence as routing resolves it (:func:`policy_cache.presence.resolve_presence`): the live
    claims (rows of :data:`_CLAIMS`) over the registry's column, at the database's ``now`` (epoch seconds)."""
    live = [PresenceClaim(source, subject, state, float(observed), float(expires))
            for source, subject, state, observed, expires in claims]
    base: Literal["home", "away", "unknown"] = "home" if baseline == "home" else "away" if baseline == "away" \
        else "unknown"
    return PresenceState(resolve_presence(base, live, now).state)


def _numbering(row: list[Any] | None) -> NumberingPlan | None:
    """The stored plan (its CHECKs are the plan's rules); None when the tenant has none."""
    if row is None:
        return None
    code, trunk, international, lengths = row
    return NumberingPlan(code, trunk, tuple(international), tuple(lengths))


def _group_action(incident_id: UUID, a: dict[str, Any]) -> ActionRow:
    dispatched = a["dispatched_at"]
    return ActionRow(key=a["key"], incident_id=incident_id, step=int(a["step"]), kind=a["kind"],
                     destination=a["destination"], call_uuid=UUID(a["call_uuid"]) if a["call_uuid"] else None,
                     dispatched_at=datetime.fromisoformat(dispatched) if dispatched else None,
                     outcome=a["outcome"], spec=a["spec"])


async def load_scenarios(conn: Connection, household_id: UUID) -> list[Scenario]:
    """Enabled scenarios for the household first, then the tenant-wide ones."""
    return [Scenario.from_record(r) for r in await scenario_registry.scenarios_for_household(conn, household_id)]


#: Action fields stored as columns of ``iim.incident_action`` (``msisdn`` is an SMS's ``destination``); every
#: other field is in ``spec``.
_COLUMNS = frozenset({"key", "step", "destination", "msisdn"})
#: Stored with a call but not an action field: the decision's trace context, so whoever places it joins that trace.
_META = frozenset({"traceparent"})
_KINDS: Mapping[str, type[PlaceCall | SendSms | Notify | RecordMessage]] = {
    "call": PlaceCall, "sms": SendSms, "notify": Notify, "record": RecordMessage}


def _to_json(value: object) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value.value if isinstance(value, StrEnum) else value
    if isinstance(value, IvrCheck):
        return value.model_dump(mode="json")
    raise TypeError(f"an action field of type {type(value).__name__} cannot be stored")


def action_spec(action: Action, *, traceparent: str | None = None) -> dict[str, Any]:
    """Every field of the engine's action that is not a column, as stored with its key: the executor performs
    the action :func:`decode_action` gives back, field for field (a field that cannot be stored raises). A call's
    spec also keeps the ``traceparent`` of the decision that made it."""
    if type(action) not in _KINDS.values():
        raise TypeError(f"unknown action {action!r}")
    spec = {f.name: _to_json(getattr(action, f.name)) for f in dataclasses.fields(action) if f.name not in _COLUMNS}
    if traceparent is not None and isinstance(action, PlaceCall | RecordMessage):
        spec["traceparent"] = traceparent
    return spec


def decode_action(row: ActionRow) -> Action:
    """The engine's action that ``row`` stores (its columns and :func:`action_spec`). A spec field the engine's
    action does not have, or one it needs and the row lacks, raises :class:`ValueError`: never half performed.
    Rows written before a field existed get its default (a call's ``role``: None)."""
    cls = _KINDS.get(row.kind)
    if cls is None:
        raise ValueError(f"action {row.key}: unknown kind {row.kind!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(row.spec) - names - _META)
    if unknown:
        raise ValueError(f"action {row.key}: fields the {row.kind} executor does not know: {', '.join(unknown)}")
    values: dict[str, Any] = {"key": row.key, "step": row.step}
    if "destination" in names:
        values["destination"] = row.destination
    if "msisdn" in names:
        values["msisdn"] = row.destination
    if cls is PlaceCall:
        values["role"] = None
    for name, raw in row.spec.items():
        if name in _META:
            continue
        if name == "ivr":
            values[name] = None if raw is None else IvrCheck.model_validate(raw)
        elif name == "role":
            values[name] = None if raw is None else ContactRole(raw)
        else:
            values[name] = raw
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"action {row.key}: {exc}") from None


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


@dataclass(frozen=True, slots=True)
class OutcomeWrite:
    """An outcome to record on an action that has none yet."""

    key: str
    outcome: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class CallClaim:
    """Alert calls of a decision to claim under the tenant's caps in the decision's own transaction (the
    caller places them after the commit); ``refused``: calls the guard refused before any claim (key ->
    (reason, detail)), written with outcome ``refused`` and an audit line instead."""

    max_concurrent: int
    max_per_hour: int
    refused: Mapping[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Persisted:
    """What writing a decision did: (kind, outcome) of actions settled with it, the calls claimed with it for
    the caller to place after the commit, the calls to claim exactly after the commit (near the tenant's
    caps: :func:`claim_originate_now`), and the guard's refusals written."""

    settled: list[tuple[str, str]]
    claimed: list[str]
    deferred: list[str]
    refused: list[str]
    #: actions refused for want of consent, written now (outcome ``refused`` and a ``consent.refused`` line)
    consent_refused: list[str] = field(default_factory=list)


async def persist_advance(conn: Connection, tenant_id: UUID, incident: IncidentRow, advance: Advance, *,
                          scenario: Scenario | None, now: datetime, actor: str = "scenario-engine",
                          keyring: Keyring, outcomes: Sequence[OutcomeWrite] = (),
                          audit_lines: Sequence[dict[str, Any]] = (), claim: CallClaim | None = None,
                          traceparent: str | None = None,
                          consent_refused: Mapping[str, ConsentRefusal] | None = None) -> Persisted:
    """Write the decision (and ``outcomes``/``audit_lines`` recorded before it) in one statement
    (``iim.persist_decision``). SMS are outbox rows written here; a notification nobody in the household can
    receive is settled here by text; calls are claimed here when ``claim`` is given, else each gets a job,
    like notifications through a connector. Keys already written (a resumed decision) write nothing more.
    ``incident`` is fully loaded (its notification targets and fallback numbers decide how it notifies).
    ``consent_refused`` actions (:mod:`iim.scenarios.consent`) are written failed (``refused``) with one audit
    line each, and neither sent, queued nor claimed."""
    assert incident.notify_targets is not None, "a fully loaded incident"
    assert incident.sms_fallback is not None, "a fully loaded incident"
    state = advance.progress.state
    closed = state not in (IncidentState.OPEN, IncidentState.NOTIFYING)
    settling: dict[str, tuple[str, str]] = {}
    claim_keys: list[str] = []
    job_keys: list[str] = []
    rows: list[dict[str, Any]] = []
    for action in advance.actions:
        kind, destination = _action_fields(action)
        row: dict[str, Any] = {"key": action.key, "incident_id": str(incident.id), "step": action.step, "kind": kind,
                               "destination": destination, "spec": action_spec(action, traceparent=traceparent),
                               "call_uuid": None}
        no_consent = (consent_refused or {}).get(action.key)
        if no_consent is not None:
            if kind in ("call", "record"):
                row["call_uuid"] = str(call_uuid_for(action.key))
            row |= {"outcome": ActionOutcome.REFUSED.value, "detail": no_consent.detail,
                    "audit": [audit_line("consent-guard", "consent.refused", incident.id,
                                         {"key": action.key, "kind": kind, "purpose": no_consent.purpose,
                                          "detail": no_consent.detail}, event_id=incident.first_event_id)]}
            settling[action.key] = (kind, ActionOutcome.REFUSED.value)
        elif isinstance(action, SendSms):
            # An SMS is only a row in the outbox (the SMS sender delivers it): written with the decision, so it
            # cannot be lost between the decision and a job.
            row |= {"outcome": "queued", "detail": "queued in the SMS outbox",
                    "sms": [{"key": action.key, "msisdn": action.msisdn, "body": action.text[:1600]}]}
            settling[action.key] = ("sms", "queued")
        elif isinstance(action, Notify) and not incident.notify_targets:
            # Nothing in the household listens to a connector: the fallback text is decided right here.
            outcome, texts, line = _notify_fallback(incident, action.key, action.text or alarm_text(incident),
                                                    "no connected device", incident.sms_fallback)
            row |= {"outcome": outcome, "detail": "no connected device", "sms": texts, "audit": [line]}
            settling[action.key] = ("notify", outcome)
        elif isinstance(action, Notify):
            job_keys.append(action.key)
        else:
            row["call_uuid"] = str(call_uuid_for(action.key))
            refusal = claim.refused.get(action.key) if claim is not None else None
            if refusal is not None:
                reason, detail = refusal
                row |= {"outcome": ActionOutcome.REFUSED.value, "detail": detail,
                        "audit": [audit_line("toll-fraud-guard", "originate.refused", incident.id,
                                             {"key": action.key, "reason": reason, "detail": detail},
                                             event_id=incident.first_event_id)]}
            elif claim is not None:
                claim_keys.append(action.key)
            else:
                job_keys.append(action.key)
        rows.append(row)
    if any(row.get("sms") for row in rows):
        data_key = await keyring.active(conn, tenant_id)
        for row in rows:
            if row.get("sms"):
                row["sms"] = _sealed(row["sms"], data_key)
    decision_audit = audit_line(actor, f"incident.{state.value}", incident.id, {
        "reason": advance.reason, "step": advance.progress.step, "attempt": advance.progress.attempt,
        "actions": [{"key": a.key, "kind": _action_fields(a)[0]} for a in advance.actions],
        "notes": list(advance.notes)}, event_id=incident.first_event_id)
    payload: dict[str, Any] = {
        "outcomes": [{"key": o.key, "outcome": o.outcome, "detail": o.detail} for o in outcomes],
        "incident": {"id": str(incident.id), "state": state.value, "step": advance.progress.step,
                     "attempt": advance.progress.attempt,
                     "deadline": advance.deadline.isoformat() if advance.deadline is not None else None,
                     "reason": advance.reason, "closed": closed,
                     "scenario": scenario.model_dump(mode="json") if scenario is not None else None},
        "actions": rows, "audit": [*audit_lines, decision_audit]}
    if claim is not None and claim_keys:
        payload["claim"] = {"keys": claim_keys, "max_concurrent": claim.max_concurrent,
                            "max_per_hour": claim.max_per_hour}
    result = await _persist(conn, payload)
    inserted = set(result["inserted"])
    jobs_now = [k for k in job_keys if k in inserted]
    if jobs_now:
        body: list[bytes | None] = [
            json.dumps({"tenant": str(tenant_id), "incident": str(incident.id), "key": k}).encode() for k in jobs_now]
        await jobs.queries_for(conn).enqueue([IncidentJobs.ACTION] * len(jobs_now), body,
                                             [20] * len(jobs_now), dedupe_key=[f"act:{k}" for k in jobs_now],
                                             on_conflict="skip")
    claims = result["claims"]
    return Persisted(settled=[settling[k] for k in settling if k in inserted],
                     claimed=[c["key"] for c in claims if c["claimed"]],
                     deferred=[c["key"] for c in claims if not c["claimed"]],
                     refused=[k for k in (claim.refused if claim is not None else {}) if k in inserted],
                     consent_refused=[k for k in (consent_refused or {}) if k in inserted])


async def write_outcomes(conn: Connection, outcomes: Sequence[OutcomeWrite],
                         audit_lines: Sequence[dict[str, Any]] = ()) -> None:
    """Record outcomes and audit lines when no decision follows them (one statement)."""
    if outcomes or audit_lines:
        await _persist(conn, {"outcomes": [{"key": o.key, "outcome": o.outcome, "detail": o.detail} for o in outcomes],
                              "audit": list(audit_lines)})


async def _persist(conn: Connection, payload: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = await conn.fetchval("SELECT iim.persist_decision($1::jsonb)", payload)
    return result


def alarm_text(incident: IncidentRow) -> str:
    """What an SMS or notification says when its scenario step gives no text."""
    return f"IIM alarm: {incident.facts.event_type.value}"


def _sealed(texts: Sequence[dict[str, Any]], data_key: DataKey) -> list[dict[str, Any]]:
    """Outbox rows for ``iim.write_action`` with their bodies sealed (and the key that sealed them)."""
    return [{"key": t["key"], "msisdn": t["msisdn"], "body": sms_store.seal_body(data_key, t["key"], t["body"]),
             "body_key": data_key.key_id} for t in texts]


async def notify_by_sms(conn: Connection, tenant_id: UUID, incident: IncidentRow, key: str, text: str,
                        detail: str, *, keyring: Keyring) -> str:
    """Settle a notification the smart home did not take: text the household's owners and members instead
    (one outbox row each) and record the outcome on its action; returns it (``sms_fallback`` or ``skipped``)."""
    outcome, texts, line = _notify_fallback(incident, key, text, detail,
                                            await sms_fallback_numbers(conn, incident.household_id))
    if texts:
        await sms_store.enqueue_many(conn, [sms_store.QueuedSms(t["key"], t["msisdn"], t["body"], incident.id)
                                            for t in texts], await keyring.active(conn, tenant_id))
    await write_outcomes(conn, [OutcomeWrite(key, outcome, detail)], [line])
    return outcome


def _notify_fallback(incident: IncidentRow, key: str, text: str, detail: str, contacts: Sequence[str]
                     ) -> tuple[str, list[dict[str, str]], dict[str, Any]]:
    """A notification settled by text: its outcome, the outbox rows (one per number) and its audit line."""
    outcome = "sms_fallback" if contacts else "skipped"
    texts = [{"key": f"{key}/sms/{n}", "msisdn": msisdn, "body": text[:1600]} for n, msisdn in enumerate(contacts)]
    return outcome, texts, audit_line("scenario-engine", "incident.notify", incident.id,
                                      {"key": key, "outcome": outcome, "detail": detail, "devices": []},
                                      event_id=incident.first_event_id)


def audit_line(actor: str, action: str, incident_id: UUID, detail: dict[str, Any], *, event_id: str | None = None,
               call_uuid: UUID | None = None) -> dict[str, Any]:
    """An incident's audit line, correlated by event_id and call uuid, as staged in ``iim.audit_pending``."""
    correlation: dict[str, str] = {}
    if event_id:
        correlation["event_id"] = event_id
    if call_uuid:
        correlation["call_id"] = str(call_uuid)
    return {"actor": actor, "action": action, "entity": "incident", "entity_id": str(incident_id), "detail": detail,
            "correlation": correlation}


async def audit(conn: Connection, tenant_id: UUID, actor: str, action: str, incident_id: UUID,
                detail: dict[str, Any], *, event_id: str | None = None, call_uuid: UUID | None = None) -> None:
    line = audit_line(actor, action, incident_id, detail, event_id=event_id, call_uuid=call_uuid)
    await audit_log.stage(conn, actor=line["actor"], action=line["action"], entity=line["entity"],
                          entity_id=line["entity_id"], detail=line["detail"], correlation=line["correlation"])


async def due_incidents(pool: Pool, limit: int) -> list[tuple[UUID, UUID]]:
    """(tenant, incident) of live incidents whose deadline has passed, oldest first, across tenants."""
    return [(r["tenant_id"], r["id"]) for r in await pool.fetch("SELECT * FROM iim.due_incidents($1)", limit)]


async def unsent_calls(pool: Pool, older_s: float, limit: int) -> list[tuple[UUID, UUID, str]]:
    """(tenant, incident, key) of calls claimed more than ``older_s`` ago and never sent, of live incidents,
    across tenants: their process died between the claim and the originate."""
    rows = await pool.fetch("SELECT * FROM iim.unsent_calls(make_interval(secs => $1), $2)", older_s, limit)
    return [(r["tenant_id"], r["incident_id"], r["key"]) for r in rows]


async def take_over_unsent(conn: Connection, key: str, older_s: float) -> bool:
    """Claim an unsent call again for this worker (its lease, ``dispatched_at``, is renewed): True when no other
    worker took it over or sent it meanwhile."""
    taken = await conn.fetchval(
        "UPDATE iim.incident_action SET dispatched_at = now() WHERE key = $1 AND dispatched_at IS NOT NULL "
        "AND sent_at IS NULL AND finished_at IS NULL AND dispatched_at < now() - make_interval(secs => $2) "
        "RETURNING true", key, older_s)
    return bool(taken)


async def hold_for_unsent(conn: Connection, incident_id: UUID, hold_s: float) -> bool:
    """At its deadline, a group with a call claimed but never sent (its process died between claim and
    originate) is not judged yet: the deadline moves ``hold_s`` ahead so the take-over places the call first
    (otherwise the step passes and that contact is never called). True when it was held."""
    held = await conn.fetchval(
        """UPDATE iim.incident i SET deadline = now() + make_interval(secs => $2)
            WHERE i.id = $1 AND i.state IN ('open', 'notifying')
              AND EXISTS (SELECT 1 FROM iim.incident_action a
                           WHERE a.tenant_id = i.tenant_id AND a.incident_id = i.id
                             AND starts_with(a.key, i.id::text || '/' || i.step || '/' || i.attempt || '/')
                             AND a.kind IN ('call', 'record') AND a.dispatched_at IS NOT NULL
                             AND a.sent_at IS NULL AND a.finished_at IS NULL
                             -- bounded: a call no process manages to send does not hold the step for ever
                             AND a.started_at > now() - interval '5 minutes')
        RETURNING true""", incident_id, hold_s)
    return bool(held)


async def was_sent(conn: Connection, key: str) -> bool:
    """Did the switch accept the call ``key``'s originate (``sent_at``)?"""
    return bool(await conn.fetchval("SELECT sent_at IS NOT NULL FROM iim.incident_action WHERE key = $1", key))


async def mark_sent(pool: Pool, tenant_id: UUID, key: str) -> None:
    """The switch accepted the call's originate: it is never placed again by a worker that takes over."""
    async with tenant_tx(pool, tenant_id) as conn:
        await conn.execute("UPDATE iim.incident_action SET sent_at = now() WHERE key = $1 AND sent_at IS NULL", key)


async def prune_originate_windows(pool: Pool) -> int:
    """Delete the toll-fraud counters no cap reads any more (older than two hours), across tenants."""
    return int(await pool.fetchval("SELECT iim.prune_originate_windows()"))


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


async def originate_facts(conn: Connection, household_id: UUID
                          ) -> tuple[LimitsRow, frozenset[str], NumberingPlan | None]:
    """The tenant's originate limits (:data:`LimitsRow`), every number and SIP URI an alert for this
    household may reach (its bound contacts and devices) and the tenant's numbering plan (None: the
    default), in one round trip."""
    row = await conn.fetchrow(_ORIGINATE_FACTS, household_id)
    assert row is not None
    plan = row["country_codes"]
    limits = (row["max_concurrent"], row["max_per_hour"], None if plan is None else tuple(plan), tuple(row["allowed"]))
    return limits, frozenset(row["bound"]), _numbering(row["numbering_plan"])


async def claim_originate(conn: Connection, key: str, *, max_concurrent: int, max_per_hour: int
                          ) -> tuple[bool, int, int]:
    """Check the tenant's caps and, under them, mark the call dispatched and count it: (claimed, in flight,
    last hour). One statement under the tenant's originate lock, which is held until the caller commits:
    call it last in the transaction."""
    row = await conn.fetchrow("SELECT claimed, in_flight, last_hour FROM iim.claim_originate($1, $2, $3)",
                              key, max_concurrent, max_per_hour)
    assert row is not None
    return bool(row["claimed"]), int(row["in_flight"]), int(row["last_hour"])


async def claim_originate_now(pool: Pool, tenant_id: UUID, key: str, *, max_concurrent: int, max_per_hour: int
                              ) -> tuple[bool, int, int]:
    """:func:`claim_originate` as a statement of its own, committed at once (the tenant's exclusive
    originate lock is never held across a round trip): (claimed, in flight, last hour)."""
    row = await pool.fetchrow("SELECT claimed, in_flight, last_hour FROM iim.claim_originate_in($1, $2, $3, $4)",
                              tenant_id, key, max_concurrent, max_per_hour)
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


async def mark_sms_undelivered(conn: Connection, key: str) -> None:
    """The SMSC did not deliver the SMS action ``key``: its outcome becomes ``undelivered``."""
    await conn.execute("UPDATE iim.incident_action SET outcome = 'undelivered', finished_at = now() "
                       "WHERE key = $1 AND kind = 'sms'", key)


async def clear_incident(conn: Connection, incident_id: UUID, state: IncidentState) -> None:
    """Close the incident in ``state`` because its device reported the hazard cleared."""
    await conn.execute(
        """UPDATE iim.incident SET state = $2::iim.incident_state, reason = 'cleared by the device',
                  updated_at = now(), closed_at = now(), deadline = NULL WHERE id = $1""",
        incident_id, state.value)


async def prior_chain(conn: Connection, incident_id: UUID) -> PriorChain | None:
    """The last ended incident of the same device and hazard as ``incident_id`` (for the re-arm rule)."""
    row = await conn.fetchrow(
        """SELECT p.state::text AS state, p.closed_at,
                  EXISTS (SELECT 1 FROM iim.device_event e
                           WHERE e.tenant_id = p.tenant_id AND e.device_id = p.device_id AND e.type = 'cleared'
                             AND e.received_at > p.closed_at) AS cleared_since
             FROM iim.incident i
             JOIN LATERAL (SELECT * FROM iim.incident p
                            WHERE p.tenant_id = i.tenant_id AND p.device_id = i.device_id AND p.hazard = i.hazard
                              AND p.closed_at IS NOT NULL AND p.id <> i.id
                            ORDER BY p.closed_at DESC LIMIT 1) p ON true
            WHERE i.id = $1""", incident_id)
    if row is None:
        return None
    return PriorChain(IncidentState(row["state"]), row["closed_at"], bool(row["cleared_since"]))


async def hold_incident(conn: Connection, incident_id: UUID, until: datetime, reason: str) -> None:
    """Keep the incident open with no actions until ``until`` (the re-arm cool-down), then it is judged again."""
    await conn.execute("UPDATE iim.incident SET deadline = $2, reason = $3, updated_at = now() WHERE id = $1",
                       incident_id, until, reason)


async def exhaust_incident(conn: Connection, incident_id: UUID, reason: str) -> None:
    """Close the incident as ``exhausted`` (nothing more will be tried) for ``reason``."""
    await conn.execute(
        """UPDATE iim.incident SET state = 'exhausted', reason = $2, updated_at = now(),
                  closed_at = now() WHERE id = $1""", incident_id, reason)


async def queue_action_sms(conn: Connection, tenant_id: UUID, incident: IncidentRow, action: ActionRow, *,
                           keyring: Keyring) -> None:
    """Queue the SMS action ``action`` (its text, else the alarm's) in the outbox under its key."""
    assert action.destination is not None
    text = action.spec.get("text") or alarm_text(incident)
    await sms_store.enqueue_many(conn, [sms_store.QueuedSms(action.key, action.destination, text[:1600],
                                                            incident.id)], await keyring.active(conn, tenant_id))


async def unreachable_retries(conn: Connection, key: str) -> int:
    """How often the call ``key`` found the switch unreachable (counted by the SMS each time sent)."""
    return await sms_store.count_keyed(conn, f"{key}/unreachable/")


async def text_unreachable(conn: Connection, tenant_id: UUID, incident: IncidentRow, key: str, retry: int,
                           msisdn: str, *, keyring: Keyring) -> None:
    """Tell ``msisdn`` by SMS that the call ``key`` could not be placed (its ``retry``-th time) and will be
    tried again."""
    body = (f"IIM alarm: {incident.facts.event_type.value} at {incident.facts.household_name}. "
            "We could not call you; we will try again.")
    await sms_store.enqueue_many(conn, [sms_store.QueuedSms(f"{key}/unreachable/{retry}", msisdn, body, incident.id)],
                                 await keyring.active(conn, tenant_id))


async def retry_call(conn: Connection, tenant_id: UUID, incident_id: UUID, key: str, retry: int, delay: float,
                     *, hold_s: float = 0.0) -> None:
    """Undispatch the call ``key`` and queue its ``retry``-th attempt as an action job due in ``delay`` s; the
    incident's deadline is kept at least ``hold_s`` s away, so its group is not judged (and that contact
    skipped) while the call waits for its retry."""
    await conn.execute("UPDATE iim.incident_action SET dispatched_at = NULL WHERE key = $1", key)
    if hold_s > 0:
        await conn.execute(
            """UPDATE iim.incident SET deadline = greatest(deadline, now() + make_interval(secs => $2))
                WHERE id = $1 AND deadline IS NOT NULL AND state IN ('open', 'notifying')""", incident_id, hold_s)
    payload = json.dumps({"tenant": str(tenant_id), "incident": str(incident_id), "key": key}).encode()
    await jobs.queries_for(conn).enqueue(
        IncidentJobs.ACTION, payload, priority=20, execute_after=timedelta(seconds=delay),
        dedupe_key=f"act:{key}:retry:{retry}", on_conflict="skip")


async def call_waited_s(conn: Connection, key: str) -> float:
    """Seconds since the call ``key`` was decided (how long it has waited for a place under the caps)."""
    waited = await conn.fetchval("SELECT extract(epoch FROM now() - started_at) FROM iim.incident_action "
                                 "WHERE key = $1", key)
    return float(waited or 0.0)


async def queue_capped_call(conn: Connection, tenant_id: UUID, incident_id: UUID, key: str, *, delay: float,
                            hold_s: float, waits: int) -> None:
    """A cap keeps the undispatched call ``key`` from its place: try it again as an action job due in
    ``delay`` s, and keep the incident's deadline at least ``hold_s`` s away so its group is not judged
    (and its call given up) while the call waits. ``waits``: this is the call's n-th wait."""
    await conn.execute(
        """UPDATE iim.incident SET deadline = greatest(deadline, now() + make_interval(secs => $2))
            WHERE id = $1 AND deadline IS NOT NULL AND state IN ('open', 'notifying')""", incident_id, hold_s)
    payload = json.dumps({"tenant": str(tenant_id), "incident": str(incident_id), "key": key,
                          "waits": waits}).encode()
    await jobs.queries_for(conn).enqueue(
        IncidentJobs.ACTION, payload, priority=20, execute_after=timedelta(seconds=delay),
        dedupe_key=f"act:{key}:wait:{waits}", on_conflict="skip")


async def end_unbegun(conn: Connection, incident_id: UUID, state: IncidentState, reason: str) -> None:
    """End an incident whose chain never started (held by the re-arm rule) in ``state`` for ``reason``."""
    await conn.execute(
        """UPDATE iim.incident SET state = $2::iim.incident_state, reason = $3, updated_at = now(),
                  closed_at = now(), deadline = NULL WHERE id = $1""", incident_id, state.value, reason[:1000])


async def step_tried(conn: Connection, incident_id: UUID, step: int) -> bool:
    """Did the group at ``step`` place any action (whatever its attempt)?"""
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM iim.incident_action WHERE incident_id = $1 AND step = $2)", incident_id, step))


async def reopen_incident(conn: Connection, incident_id: UUID, progress: Progress, reason: str, *,
                          held: bool) -> None:
    """Make an ended incident live at ``progress``: due now, or ``held`` (a deadline never due). Raises
    :class:`policy_cache.errors.Conflict` when its device has another live incident of that hazard."""
    try:
        await conn.execute(
            """UPDATE iim.incident SET state = $2::iim.incident_state, step = $3, attempt = $4, reason = $5,
                      deadline = CASE WHEN $6 THEN 'infinity'::timestamptz ELSE now() END, closed_at = NULL,
                      updated_at = now() WHERE id = $1""",
            incident_id, progress.state.value, progress.step, progress.attempt, reason[:1000], held)
    except asyncpg.UniqueViolationError as exc:
        raise store_errors.Conflict("the device has another live incident of this hazard: close that one first",
                                    entity="incident", constraint=exc.constraint_name) from exc
