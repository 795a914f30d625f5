"""The checker: what the history, the database and the switch's call log say about each alarm.

Pure: it takes rows and records (wall-clock floats throughout) and returns the verdict. Per alarm and per
incident it finds

* ``lost``: an acknowledged (2xx) alarm with a contact of a step it reached that was never reached (no
  originate for a call, no SMSC submit for an SMS, nothing at the vendor nor a fallback SMS for a
  notification) and no recorded reason (the toll-fraud guard refused it; the switch or the SMSC stayed
  unreachable past the retries; the incident was over before the action was due);
* ``duplicate_calls``: an originate to a contact for a step that already had one, unless every earlier one
  had failed (``-ERR``) by then;
* ``answered_hung_up``: an answered alert call that IIM itself killed (``uuid_kill`` while answered), or hung
  up on its outbound socket before it played or asked anything;
* ``stuck``: an incident neither terminal nor waiting for a deadline that is still ahead (its deadline plus
  the grace: a slack and the longest fault);
* ``hung_requests``: a request with no answer within its client deadline.

Each violation carries its evidence: the alarm, the incident and a timeline of what happened to them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks._chaos.history import TIMEOUT, Op, pairs

TERMINAL_STATES = frozenset({"acknowledged", "false_alarm", "resolved", "exhausted"})
#: Action outcomes that are a recorded reason for a contact not reached.
RECORDED_REASONS = frozenset({"refused", "unreachable"})
#: SMS outbox states that say the SMSC itself refused the message (a reason, not a loss).
SMS_REFUSED = frozenset({"failed", "undelivered"})
#: A completion later than its deadline by more than this counts as hung even if it came.
LATE_S = 0.5


@dataclass(frozen=True, slots=True)
class IncidentRow:
    id: str
    state: str
    step: int
    deadline: float | None
    opened_at: float
    updated_at: float
    closed_at: float | None
    first_event_id: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ActionRow:
    incident_id: str
    key: str
    step: int
    kind: str
    destination: str | None
    call_uuid: str | None
    dispatched_at: float | None
    outcome: str | None
    detail: str
    started_at: float
    finished_at: float | None = None


@dataclass(frozen=True, slots=True)
class CallRecord:
    """One originate the switch received, and what became of its channel."""

    uuid: str
    incident_id: str
    action_key: str
    destination: str
    at: float
    result: str | None = None
    result_at: float | None = None
    answered_at: float | None = None
    killed_by_iim_at: float | None = None
    instance: str = ""
    hung_up_unheard: bool = False  # answered, and IIM hung up its outbound socket before saying anything

    @property
    def step_of_key(self) -> str:
        """``<incident>/<first step>/<attempt>/<n>`` -> the first step of the group."""
        parts = self.action_key.split("/")
        return parts[1] if len(parts) > 1 else ""


@dataclass(frozen=True, slots=True)
class SmsRow:
    key: str
    incident_id: str | None
    msisdn: str
    status: str
    last_error: str | None
    at_smsc: bool


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    target: str
    start: float
    end: float
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    alarm: str | None
    incident: str | None
    detail: str
    timeline: tuple[str, ...] = ()


@dataclass
class Verdict:
    alarms: int = 0
    acked: int = 0
    lost: int = 0
    duplicate_calls: int = 0
    stuck: int = 0
    hung_requests: int = 0
    answered_hung_up: int = 0
    unfinished: int = 0
    incidents: int = 0
    originates: int = 0
    sms: int = 0
    notified: int = 0
    violations: list[Violation] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if k != "violations"}

    def by_kind(self, kind: str) -> list[Violation]:
        return [v for v in self.violations if v.kind == kind]


@dataclass(frozen=True, slots=True)
class Observed:
    """Everything the checker reads."""

    ops: Sequence[Op]
    incidents: Sequence[IncidentRow]
    actions: Sequence[ActionRow]
    calls: Sequence[CallRecord]
    sms: Sequence[SmsRow] = ()
    notified: frozenset[str] = frozenset()  # incident ids the vendor cloud received a notification for
    faults: Sequence[Fault] = ()


def check(obs: Observed, *, now: float, grace_s: float, t0: float | None = None) -> Verdict:
    """The verdict at ``now`` (after the run has drained). A live incident is stuck once ``now`` is past its
    deadline by more than ``grace_s`` plus the longest fault. ``t0``: timelines count from it."""
    origin = t0 if t0 is not None else min((op.t for op in obs.ops), default=now)
    incidents = {i.id: i for i in obs.incidents}
    actions: dict[str, list[ActionRow]] = defaultdict(list)
    for a in obs.actions:
        actions[a.incident_id].append(a)
    calls_by_action: dict[str, list[CallRecord]] = defaultdict(list)
    calls_by_incident: dict[str, list[CallRecord]] = defaultdict(list)
    for c in obs.calls:
        calls_by_action[c.action_key].append(c)
        calls_by_incident[c.incident_id].append(c)
    sms_by_key = {s.key: s for s in obs.sms}
    longest_fault = max((f.end - f.start for f in obs.faults), default=0.0)
    grace = grace_s + longest_fault
    verdict = Verdict(incidents=len(obs.incidents), originates=len(obs.calls),
                      sms=sum(1 for s in obs.sms if s.at_smsc), notified=len(obs.notified))

    def timeline(alarm: str | None, incident_id: str | None) -> tuple[str, ...]:
        return _timeline(obs, origin, alarm, incident_id, actions, calls_by_incident)

    # Requests: acknowledged alarms, and every request that hung.
    acked: dict[str, str | None] = {}
    alarms: set[str] = set()
    for invoke, done in pairs(list(obs.ops)):
        alarms.add(invoke.alarm)
        if done is not None and done.type == "ok":
            acked.setdefault(invoke.alarm, done.incident_id)
        hung = (done is None or (done.type == "info" and done.error == TIMEOUT)
                or done.t - invoke.t > invoke.deadline_s + LATE_S)
        if hung:
            verdict.hung_requests += 1
            waited = "no answer at all" if done is None else f"{done.type} {done.error or done.status} after " \
                                                             f"{done.t - invoke.t:.1f} s"
            verdict.violations.append(Violation(
                "hung_request", invoke.alarm, None,
                f"request {invoke.req} to {invoke.instance} (deadline {invoke.deadline_s:g} s): {waited}",
                timeline(invoke.alarm, None)))
    verdict.alarms, verdict.acked = len(alarms), len(acked)

    # Lost: an acknowledged alarm whose reached steps left a contact unreached without a recorded reason.
    for alarm, incident_id in sorted(acked.items()):
        reasons = _unreached(incident_id, incidents, actions, calls_by_action, sms_by_key, obs.notified)
        if reasons:
            verdict.lost += 1
            verdict.violations.append(Violation("lost", alarm, incident_id, "; ".join(reasons),
                                                timeline(alarm, incident_id)))

    # Duplicates: a contact called again for one step while an earlier call of it had not failed.
    groups: dict[tuple[str, str, str], list[CallRecord]] = defaultdict(list)
    for c in obs.calls:
        groups[(c.incident_id, c.step_of_key, c.destination)].append(c)
    for (incident_id, step, destination), calls in sorted(groups.items()):
        calls.sort(key=lambda c: c.at)
        for n, later in enumerate(calls[1:], start=1):
            live = [c for c in calls[:n] if not _failed_before(c, later.at)]
            if live:
                verdict.duplicate_calls += 1
                first = live[0]
                verdict.violations.append(Violation(
                    "duplicate_call", _alarm_of(incidents.get(incident_id)), incident_id,
                    f"{destination} called again for step {step} at +{later.at - origin:.2f} s (uuid {later.uuid}, "
                    f"via {later.instance or '?'}) while {first.uuid} (+{first.at - origin:.2f} s, via "
                    f"{first.instance or '?'}) had not failed (result {first.result!r})",
                    timeline(_alarm_of(incidents.get(incident_id)), incident_id)))

    # Answered calls IIM hung up itself (once per call: a redial with the same uuid is a duplicate, above).
    seen: set[str] = set()
    for c in obs.calls:
        if c.uuid in seen:
            continue
        seen.add(c.uuid)
        if c.killed_by_iim_at is not None and c.answered_at is not None and c.answered_at <= c.killed_by_iim_at:
            verdict.answered_hung_up += 1
            verdict.violations.append(Violation(
                "answered_hung_up", _alarm_of(incidents.get(c.incident_id)), c.incident_id,
                f"call {c.uuid} to {c.destination} answered at +{c.answered_at - origin:.2f} s, killed by IIM at "
                f"+{c.killed_by_iim_at - origin:.2f} s", timeline(_alarm_of(incidents.get(c.incident_id)),
                                                                   c.incident_id)))
        elif c.hung_up_unheard:
            verdict.answered_hung_up += 1
            verdict.violations.append(Violation(
                "answered_hung_up", _alarm_of(incidents.get(c.incident_id)), c.incident_id,
                f"call {c.uuid} to {c.destination} answered; IIM hung up its outbound socket before playing or "
                f"asking anything", timeline(_alarm_of(incidents.get(c.incident_id)), c.incident_id)))

    # Stuck: not terminal and not waiting for a deadline still ahead (plus the grace).
    for inc in obs.incidents:
        if inc.state in TERMINAL_STATES:
            continue
        if inc.deadline is not None and inc.deadline + grace >= now:
            verdict.unfinished += 1
            continue
        verdict.stuck += 1
        due = "no deadline" if inc.deadline is None else f"deadline +{inc.deadline - origin:.1f} s passed by " \
                                                         f"{now - inc.deadline:.1f} s (grace {grace:.1f} s)"
        verdict.violations.append(Violation(
            "stuck", inc.first_event_id, inc.id, f"state {inc.state} at step {inc.step}: {due}",
            timeline(inc.first_event_id, inc.id)))
    return verdict


def _alarm_of(incident: IncidentRow | None) -> str | None:
    return incident.first_event_id if incident is not None else None


def _failed_before(call: CallRecord, at: float) -> bool:
    return (call.result is not None and call.result.startswith("-ERR") and call.result_at is not None
            and call.result_at <= at)


def _unreached(incident_id: str | None, incidents: dict[str, IncidentRow], actions: dict[str, list[ActionRow]],
               calls_by_action: dict[str, list[CallRecord]], sms_by_key: dict[str, SmsRow],
               notified: frozenset[str]) -> list[str]:
    if incident_id is None:
        return ["acknowledged without an incident id"]
    incident = incidents.get(incident_id)
    if incident is None:
        return ["acknowledged, but no incident row"]
    mine = actions.get(incident_id, [])
    if not mine:
        return [f"incident {incident.state} with no action at all"]
    out = []
    for a in sorted(mine, key=lambda a: a.started_at):
        if a.kind in ("call", "record"):
            if calls_by_action.get(a.key):
                continue
            if a.outcome in RECORDED_REASONS:
                continue
            if a.dispatched_at is None and a.outcome is None and incident.state in TERMINAL_STATES:
                continue  # the incident was over before this call was due
            if a.outcome == "superseded" and any(state in a.detail for state in TERMINAL_STATES):
                continue  # not placed: the incident had ended (not: it had moved on without this contact)
            out.append(f"{a.kind} {a.key} to {a.destination} never reached the switch "
                       f"(dispatched={a.dispatched_at is not None}, outcome={a.outcome}, detail={a.detail!r})")
        elif a.kind == "sms":
            sms = sms_by_key.get(a.key)
            if sms is not None and (sms.at_smsc or sms.status in SMS_REFUSED):
                continue
            if sms is None and a.outcome is None and incident.state in TERMINAL_STATES:
                continue
            state = "no outbox row" if sms is None else f"outbox {sms.status} ({sms.last_error or 'no error'})"
            out.append(f"sms {a.key} to {a.destination} never reached the SMSC: {state}, outcome={a.outcome}")
        elif a.kind == "notify":
            if incident_id in notified:
                continue
            fallback = [s for k, s in sms_by_key.items() if k.startswith(a.key)]
            if fallback and all(s.at_smsc or s.status in SMS_REFUSED for s in fallback):
                continue
            if a.outcome == "skipped":
                continue
            out.append(f"notify {a.key}: nothing at the vendor cloud, fallback SMS "
                       f"{[s.status for s in fallback] or 'none'}, outcome={a.outcome} ({a.detail!r})")
    return out


def _timeline(obs: Observed, origin: float, alarm: str | None, incident_id: str | None,
              actions: dict[str, list[ActionRow]], calls: dict[str, list[CallRecord]]) -> tuple[str, ...]:
    """What happened to one alarm, in time order, seconds from the run's start."""
    lines: list[tuple[float, str]] = []
    for op in obs.ops:
        if op.alarm == alarm:
            what = op.type if op.type == "invoke" else f"{op.type} {op.status or ''} {op.error or ''}".strip()
            lines.append((op.t, f"req {op.req} {what} @{op.instance}"))
    start = min((t for t, _ in lines), default=None)
    end = None
    if incident_id is not None:
        inc = next((i for i in obs.incidents if i.id == incident_id), None)
        if inc is not None:
            lines.append((inc.opened_at,
                          f"incident opened ({inc.state} step {inc.step} at the end; reason {inc.reason!r})"))
            start = inc.opened_at if start is None else min(start, inc.opened_at)
            end = inc.closed_at or inc.updated_at
            if inc.deadline is not None:
                lines.append((inc.deadline, "incident deadline"))
        for a in actions.get(incident_id, []):
            lines.append((a.started_at, f"action {a.key} {a.kind} {a.destination or ''} decided"))
            if a.dispatched_at is not None:
                lines.append((a.dispatched_at, f"action {a.key} dispatched (call {a.call_uuid})"
                              if a.call_uuid else f"action {a.key} dispatched"))
            if a.finished_at is not None:
                lines.append((a.finished_at, f"action {a.key} -> {a.outcome} ({a.detail})"))
        for c in calls.get(incident_id, []):
            lines.append((c.at, f"originate {c.uuid} to {c.destination} via {c.instance or '?'}"))
            if c.result_at is not None:
                lines.append((c.result_at, f"originate {c.uuid} result {c.result}"))
            if c.answered_at is not None:
                lines.append((c.answered_at, f"call {c.uuid} answered"))
            if c.killed_by_iim_at is not None:
                lines.append((c.killed_by_iim_at, f"call {c.uuid} killed by IIM"))
    if start is not None:
        last = max([end or start, *(t for t, _ in lines)])
        for f in obs.faults:
            if f.start <= last + 1 and f.end >= start - 5:
                lines.append((f.start, f"FAULT {f.kind} {f.target} for {f.end - f.start:.1f} s {f.detail}".rstrip()))
    lines.sort(key=lambda x: x[0])
    return tuple(f"+{t - origin:8.2f} {text}" for t, text in lines)


def verdict_json(v: Verdict, *, limit: int = 500) -> dict[str, Any]:
    """The summary and up to ``limit`` violations of each kind, for the run's report file."""
    kinds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for x in v.violations:
        if len(kinds[x.kind]) < limit:
            kinds[x.kind].append(asdict(x))
    return {"summary": v.summary(), "violations": dict(kinds)}
