"""Dry runs of a scenario: :func:`begin`/:func:`advance` driven by a scripted, deterministic world.

The world answers every action from a script (see :func:`scripted_outcome`): by default nobody answers a
call, every SMS and notification is sent and a visitor leaves a message at the doorphone. Outcomes arrive
after plausible delays (a no-answer after the ring time, a key press after the prompt, ...) and the
simulated executor calls :func:`advance` as the real one must: as soon as :func:`ready_to_advance` holds,
else at the deadline. No I/O; the CLI (``iim scenario simulate``) prints :func:`format_timeline`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from iim.scenarios.engine import (
    ANSWER_S,
    TERMINAL,
    TTS_CHARS_PER_S,
    Action,
    ActionOutcome,
    Advance,
    Contact,
    IncidentFacts,
    IncidentState,
    PlaceCall,
    Progress,
    RecordMessage,
    SendSms,
    advance,
    begin,
    ready_to_advance,
)
from iim.scenarios.model import ContactRole, Scenario, SenderCondition, TriggerKind
from iim.scenarios.triggers.facts import comms_facts
from iot_bridge.event_types import EventType
from policy_cache.models import DeviceStatus, DeviceType, PresenceState

__all__ = ["SimulatedStep", "SYNTHETIC_CONTACTS", "SYNTHETIC_HOME", "simulate", "synthetic_facts",
           "scripted_outcome", "format_timeline", "timeline_json", "MAX_MOVES"]

INCIDENT_ID = "sim"
MAX_MOVES = 500
#: A person picks up this many seconds into the ring; a failed call is known this fast.
PICK_UP_S = 8
FAIL_S = 3
PRESS_S = 3

SYNTHETIC_CONTACTS = (
    Contact(ContactRole.OWNER, "+79000000001", "synthetic-owner", 0, "Owner"),
    Contact(ContactRole.BACKUP_CONTACT, "+79000000002", "synthetic-backup", 10, "Backup contact"),
    Contact(ContactRole.SECURITY_SERVICE, "+79000000003", "synthetic-security", 20, "Security service"),
)
#: Added to the synthetic contacts of a call or SMS dry run: someone of the household who calls or writes.
SYNTHETIC_MEMBER = Contact(ContactRole.MEMBER, "+79000000004", "synthetic-member", 5, "Member")
SYNTHETIC_HOME = ("sip:speaker@home.invalid",)
#: Who calls or writes in a dry run when the scenario names nobody (a number of nobody in the household).
UNKNOWN_SENDER = "+79000000009"

_CALL_FAILURES = frozenset({ActionOutcome.NO_ANSWER, ActionOutcome.BUSY, ActionOutcome.FAILED,
                            ActionOutcome.REFUSED, ActionOutcome.UNREACHABLE})
_SMS = frozenset({ActionOutcome.SENT, ActionOutcome.DELIVERED, ActionOutcome.UNDELIVERED, ActionOutcome.FAILED,
                  ActionOutcome.REFUSED, ActionOutcome.UNREACHABLE})
_NOTIFY = frozenset({ActionOutcome.SENT, ActionOutcome.DELIVERED, ActionOutcome.FAILED, ActionOutcome.UNREACHABLE})
_RECORD = frozenset({ActionOutcome.RECORDED, ActionOutcome.NO_ANSWER, ActionOutcome.NO_INPUT,
                     ActionOutcome.FAILED, ActionOutcome.REFUSED, ActionOutcome.UNREACHABLE})


@dataclass(frozen=True, slots=True)
class SimulatedStep:
    """One move of the engine: when, what it judged (``outcomes``), what it decided and emitted."""

    offset: timedelta
    at: datetime
    progress: Progress
    reason: str
    actions: tuple[Action, ...]
    notes: tuple[str, ...]
    outcomes: tuple[tuple[Action, ActionOutcome | None], ...]
    deadline: datetime | None

    @property
    def state(self) -> IncidentState:
        return self.progress.state


def synthetic_facts(scenario: Scenario, *, event: EventType | None = None, device_type: DeviceType | None = None,
                    device_name: str | None = None, device_status: DeviceStatus = DeviceStatus.ONLINE,
                    presence: PresenceState = PresenceState.UNKNOWN, time_zone: str = "Europe/Moscow",
                    household_name: str = "Test home", contacts: Sequence[Contact] = SYNTHETIC_CONTACTS,
                    home_targets: Sequence[str] = SYNTHETIC_HOME, occurred_at: datetime | None = None,
                    sender: str | None = None, text: str | None = None) -> IncidentFacts:
    """Facts for a dry run: by default the scenario's first trigger event from a device it accepts, and
    the synthetic owner / backup contact / security service. A call or SMS scenario gets a call or SMS from
    ``sender`` (default: the first contact of a role its sender condition names, else an unknown number), unless
    a device ``event`` or ``device_type`` is asked for."""
    if scenario.trigger.kind is not TriggerKind.DEVICE_EVENT and event is None and device_type is None:
        if contacts is SYNTHETIC_CONTACTS:
            contacts = (*SYNTHETIC_CONTACTS, SYNTHETIC_MEMBER)
        who = sender or _default_sender(scenario, contacts)
        return comms_facts(scenario.trigger.kind, sender=who, household_name=household_name, time_zone=time_zone,
                           presence=presence, contacts=contacts, home_targets=home_targets,
                           at=occurred_at or datetime.now(UTC),
                           text=text if text is not None else " ".join(scenario.trigger.keywords[:1]) or "hello")
    kind = device_type or (scenario.trigger.device_types[0] if scenario.trigger.device_types else DeviceType.SENSOR)
    return IncidentFacts(
        event_type=event or (scenario.trigger.event_types or [EventType.SMOKE])[0], device_type=kind, device_id="synthetic-device",
        device_name=device_name or f"test {kind}", device_status=device_status,
        device_sip_uri=f"sip:{kind}@home.invalid", household_name=household_name, presence=presence,
        time_zone=time_zone, contacts=tuple(contacts), home_targets=tuple(home_targets), occurred_at=occurred_at)


def _default_sender(scenario: Scenario, contacts: Sequence[Contact]) -> str:
    for cond in scenario.conditions:
        if isinstance(cond, SenderCondition) and not cond.negate:
            if cond.numbers:
                return cond.numbers[0]
            named = next((c.msisdn for c in contacts if c.role in cond.roles), None)
            if named is not None:
                return named
    return UNKNOWN_SENDER


def _who(action: Action) -> list[str]:
    """Script keys naming ``action``, most specific first."""
    if isinstance(action, PlaceCall):
        return [action.key, action.destination, str(action.role or "home"), "call"]
    if isinstance(action, SendSms):
        return [action.key, action.msisdn, str(action.role), "sms"]
    if isinstance(action, RecordMessage):
        return [action.key, action.destination, "record"]
    return [action.key, "notify"]


def _fit(action: Action, outcome: ActionOutcome) -> ActionOutcome | None:
    """``outcome`` as this action can have it, or None when it cannot (an SMS cannot press 1)."""
    if isinstance(action, PlaceCall):
        if action.ivr is None:
            if outcome is ActionOutcome.ACKNOWLEDGE:
                return ActionOutcome.ANSWERED  # "owner=acknowledge" on a plain call: they answer
            return outcome if outcome in _CALL_FAILURES or outcome is ActionOutcome.ANSWERED else None
        if outcome is ActionOutcome.ANSWERED:
            return ActionOutcome.NO_INPUT  # picks up, presses nothing valid
        keys = {ActionOutcome(v.value) for v in action.ivr.digits.values()}
        return outcome if outcome in _CALL_FAILURES | keys | {ActionOutcome.NO_INPUT} else None
    allowed = _SMS if isinstance(action, SendSms) else _RECORD if isinstance(action, RecordMessage) else _NOTIFY
    return outcome if outcome in allowed else None


def scripted_outcome(action: Action, script: Mapping[str, ActionOutcome]) -> ActionOutcome:
    """The outcome ``script`` gives ``action``.

    A script maps, most specific first: an action key (``sim/0/1/0``), a destination (``+79000000001``,
    a SIP URI), a role (``owner``, ``backup_contact`` ...; ``home`` for home devices) or a kind (``call``,
    ``sms``, ``notify``, ``record``) to an outcome. An outcome the action cannot have is passed over
    (``owner=false_alarm`` does not apply to the owner's SMS). ``acknowledge`` on a call without IVR means
    it is answered; ``answered`` on an IVR call means no valid key was pressed. Unscripted: calls are not
    answered, SMS and notifications are sent, a recording is made.
    """
    for name in _who(action):
        given = script.get(name)
        fitted = None if given is None else _fit(action, given)
        if fitted is not None:
            return fitted
    if isinstance(action, PlaceCall):
        return ActionOutcome.NO_ANSWER
    return ActionOutcome.RECORDED if isinstance(action, RecordMessage) else ActionOutcome.SENT


def _prompt_s(text: str | None) -> int:
    return math.ceil(len(text or "") / TTS_CHARS_PER_S)


def _arrives_after(action: Action, outcome: ActionOutcome) -> int:
    """Seconds from dispatch until the outcome is known (plausible, deterministic)."""
    if isinstance(action, PlaceCall):
        if outcome is ActionOutcome.NO_ANSWER:
            return action.ring_s
        if outcome in _CALL_FAILURES:
            return FAIL_S
        if action.ivr is None:
            return PICK_UP_S
        if outcome is ActionOutcome.NO_INPUT:
            return PICK_UP_S + action.ivr.tries * (_prompt_s(action.prompt_text) + action.ivr.digit_timeout_s)
        return PICK_UP_S + _prompt_s(action.prompt_text) + PRESS_S
    if isinstance(action, RecordMessage):
        if outcome in (ActionOutcome.RECORDED, ActionOutcome.NO_INPUT):
            return ANSWER_S + _prompt_s(action.prompt_text) + action.max_s
        return FAIL_S
    return 1


def _next_move(step: Advance, script: Mapping[str, ActionOutcome], at: datetime
               ) -> tuple[datetime, dict[str, ActionOutcome], tuple[tuple[Action, ActionOutcome | None], ...]]:
    """When the simulated executor calls advance again, and with which outcomes."""
    assert step.deadline is not None
    arrivals = sorted(
        ((at + timedelta(seconds=_arrives_after(a, o)), n, a, o)
         for n, (a, o) in enumerate((a, scripted_outcome(a, script)) for a in step.actions)),
        key=lambda item: (item[0], item[1]))
    received: dict[str, ActionOutcome] = {}
    when = step.deadline
    for arrival, _, action, outcome in arrivals:
        if arrival > step.deadline:
            break
        received[action.key] = outcome
        if ready_to_advance(step.progress, step.actions, received):
            when = arrival
            break
    judged = tuple((a, received.get(a.key)) for a in step.actions)
    return max(when, at), received, judged


def simulate(scenario: Scenario, facts: IncidentFacts, start: datetime,
             script: Mapping[str, ActionOutcome] | None = None) -> list[SimulatedStep]:
    """The whole run from :func:`begin` to a terminal state (see :func:`scripted_outcome` for ``script``)."""
    script = script or {}
    if facts.occurred_at is None:
        facts = replace(facts, occurred_at=start)  # {time} is when it happened, in every text
    at = start
    step = begin(INCIDENT_ID, scenario, facts, start)
    timeline = [SimulatedStep(timedelta(0), start, step.progress, step.reason, step.actions, step.notes, (),
                              step.deadline)]
    while step.progress.state not in TERMINAL:
        if len(timeline) > MAX_MOVES:
            raise RuntimeError(f"scenario {scenario.name!r} did not end within {MAX_MOVES} moves")
        at, received, judged = _next_move(step, script, at)
        step = advance(INCIDENT_ID, scenario, facts, step.progress, received, at)
        timeline.append(SimulatedStep(at - start, at, step.progress, step.reason, step.actions, step.notes, judged,
                                      step.deadline))
    return timeline


# -- output -----------------------------------------------------------------------------------------------

def _offset(delta: timedelta) -> str:
    total = int(delta.total_seconds())
    hours, rest = divmod(total, 3600)
    return f"+{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _target(action: Action) -> str:
    if isinstance(action, PlaceCall):
        return f"call {action.role or 'home'} {action.destination}"
    if isinstance(action, SendSms):
        return f"sms {action.role} {action.msisdn}"
    if isinstance(action, RecordMessage):
        return f"record at {action.destination}"
    return "notify the household"


def _detail(action: Action) -> str:
    if isinstance(action, PlaceCall):
        parts = [f"ring {action.ring_s} s"]
        if action.ivr is not None:
            keys = " ".join(f"{k}={v}" for k, v in sorted(action.ivr.digits.items()))
            parts.append(f"IVR [{keys}] x{action.ivr.tries}")
        if action.bridge_to:
            keys = "the answerer's keys pass through" if action.bridge_dtmf else "keys filtered"
            parts.append(f"bridged to {action.bridge_to} ({keys})")
        parts.append(f'says "{action.prompt_text}"')
        return ", ".join(parts)
    if isinstance(action, RecordMessage):
        return f'up to {action.max_s} s, says "{action.prompt_text}"'
    return f'"{action.text}"'


def format_timeline(timeline: Sequence[SimulatedStep]) -> str:
    """Readable lines: ``<-`` outcomes judged, ``note:`` engine notes, ``->`` actions emitted."""
    lines: list[str] = []
    pad = " " * 28
    for entry in timeline:
        lines.append(f"{_offset(entry.offset):>9}  {entry.at:%H:%M:%S}  {entry.state:<12}  {entry.reason}")
        lines.extend(f"{pad}<- {_target(a)}: {o or 'no result'}" for a, o in entry.outcomes
                     if o is not None or isinstance(a, PlaceCall | RecordMessage))
        lines.extend(f"{pad}note: {note}" for note in entry.notes)
        lines.extend(f"{pad}-> {_target(a)}: {_detail(a)}  [{a.key}]" for a in entry.actions)
    last = timeline[-1]
    lines.append(f"ended {last.state} after {_offset(last.offset)} "
                 f"({sum(isinstance(a, PlaceCall) for e in timeline for a in e.actions)} call(s), "
                 f"{sum(isinstance(a, SendSms) for e in timeline for a in e.actions)} SMS)")
    return "\n".join(lines) + "\n"


def _action_json(action: Action) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": action.kind, "key": action.key, "step": action.step}
    if isinstance(action, PlaceCall):
        out.update(role=action.role, destination=action.destination, ring_s=action.ring_s,
                   prompt_text=action.prompt_text, bridge_to=action.bridge_to, bridge_dtmf=action.bridge_dtmf,
                   ivr=None if action.ivr is None else action.ivr.model_dump(mode="json"))
    elif isinstance(action, SendSms):
        out.update(role=action.role, msisdn=action.msisdn, text=action.text)
    elif isinstance(action, RecordMessage):
        out.update(destination=action.destination, prompt_text=action.prompt_text, max_s=action.max_s)
    else:
        out.update(text=action.text)
    return out


def timeline_json(timeline: Sequence[SimulatedStep]) -> list[dict[str, Any]]:
    """The timeline as JSON-able dicts (``iim scenario simulate -o json``)."""
    return [{
        "offset_s": int(e.offset.total_seconds()), "at": e.at.isoformat(), "state": e.state.value,
        "step": e.progress.step, "attempt": e.progress.attempt, "reason": e.reason, "notes": list(e.notes),
        "outcomes": [{"key": a.key, "outcome": o} for a, o in e.outcomes],
        "actions": [_action_json(a) for a in e.actions],
        "deadline": None if e.deadline is None else e.deadline.isoformat(),
    } for e in timeline]
