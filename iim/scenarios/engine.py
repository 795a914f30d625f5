"""The escalation engine: pure decisions from (scenario, facts, progress, outcomes, now) to actions.

No I/O, no clock, no asyncio: the executor persists :class:`Progress` (the incident row's ``state``,
``step``, ``attempt``) and the :class:`Advance`'s deadline and reason, performs the actions and calls
:func:`advance` again. The engine regenerates the current group's actions from the same inputs, so the
executor must keep the incident's :class:`Scenario` and :class:`IncidentFacts` as they were when it
opened (edits and contact changes apply to the next incident, not to a running one).

The protocol, per :class:`Advance` returned:

* perform every action, idempotently by ``action.key`` (a key is never emitted twice for an incident);
* if ``deadline`` is None the incident is over (its state is terminal);
* else call :func:`advance` at the deadline with the outcomes received for the current actions;
  it may be called earlier, as soon as :func:`ready_to_advance` says the outcomes decide the group.

States of a live incident:

* ``notifying`` - the actions of group ``step``, attempt ``attempt`` are out; the next :func:`advance`
  judges their outcomes.
* ``open`` - nothing is out; the group ``step`` (attempt ``attempt``) is due at the deadline. This is the
  state before :func:`begin`, during a retry pause and after a wait step. Outcomes passed in this state
  are ignored; calling early only makes the pause shorter.

Retries: when nobody was reached in a group whose call steps allow retries, the engine returns an
Advance with no actions, progress ``open`` at the same step with ``attempt + 1`` and deadline
``now + retry_delay_s``; the :func:`advance` call at that deadline emits the retry. A retry re-places the
group's calls only: its SMS, notifications and recordings went out with the first attempt. The group's
budget is the largest ``retries`` among its call steps and the pause the largest ``retry_delay_s``.

Judging a group (only outcomes keyed by the current actions' keys count; a missing one = no result):

* a person's decision on a call ends the incident: ``acknowledge`` (or ``answered`` on a call without
  IVR: the person heard the alert) -> acknowledged, plus the ``on_acknowledge`` actions (keys
  ``{incident}/ack/{n}``); ``resolved`` -> resolved; ``false_alarm`` -> false_alarm. When one group gets
  several decisions, the safer one wins: acknowledge > escalate > resolved > false_alarm;
* ``escalate`` -> the next group now, without retries;
* otherwise nobody was reached (no_answer, busy, failed, refused, unreachable, no_input, answered on an
  IVR call without a valid key, or nothing): retry (unless every call of the group was refused: it would
  be refused again), else the next group;
* SMS, notification and recording outcomes never stop the escalation.

A group whose steps all yield nothing (a role without contacts, no home device, no device SIP URI) is
skipped within the same call, with a note. Past the last group the incident is exhausted.

Re-arming (:func:`rearm`): a persistent alarm must not call everyone again each time a chain runs out. When
the last ended incident of the same device and hazard was exhausted (nobody acknowledged) less than
``cool_down`` (:data:`REARM_COOL_DOWN`, 30 min) ago and the device has not reported ``cleared`` since, a new
incident of that device and hazard is held (open, no actions) until the cool-down ends, then starts its full
chain; a ``cleared`` meanwhile resolves it. A device that reports cleared and then alarms again, or alarms
after the cool-down, starts a full chain at once. An incident that ended any other way (acknowledged,
false alarm, resolved) never holds the next one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, ClassVar, Literal
from zoneinfo import ZoneInfo

from iim.scenarios.model import (
    CallStep,
    CommsEvent,
    ContactRole,
    IvrCheck,
    IvrOutcome,
    NotifyStep,
    PresenceCondition,
    RecordStep,
    Scenario,
    SenderCondition,
    SmsStep,
    TimeWindowCondition,
    TriggerKind,
    WaitStep,
    render,
)
from iot_bridge.event_types import EventType
from policy_cache.models import DeviceStatus, DeviceType, PresenceState

__all__ = [
    "IncidentState", "TERMINAL", "Contact", "IncidentFacts", "Progress",
    "PlaceCall", "SendSms", "Notify", "RecordMessage", "Action", "ActionOutcome", "Advance",
    "select_scenario", "mismatches", "begin", "advance", "settle", "current_actions", "ready_to_advance",
    "on_repeat_event", "on_cleared", "groups", "deadline_for", "PriorChain", "rearm", "REARM_COOL_DOWN",
    "DEFAULT_CALL_MESSAGE", "EVENT_LABELS", "CALL_SLACK_S", "ANSWER_S", "TTS_CHARS_PER_S", "reopen",
    "event_of", "keyword_in",
]

#: What a call without IVR or message says.
DEFAULT_CALL_MESSAGE = "Alarm: {event} at {household}, reported by {device} at {time}."
#: Seconds added to a call group's deadline: originate, early media, the executor's own latency.
CALL_SLACK_S = 15
#: Seconds to answer a device before recording (or before a bridged call reaches it: a doorphone answers
#: at once); TTS speed used to estimate how long a prompt plays.
ANSWER_S = 5
TTS_CHARS_PER_S = 12
SMS_MAX_CHARS = 1600  # iim.sms_outbox.body
#: After an exhausted chain, how long the same device and hazard alarming again is held instead of re-calling
REARM_COOL_DOWN = timedelta(minutes=30)

EVENT_LABELS: Mapping[str, str] = {
    EventType.SMOKE: "smoke", EventType.CO: "carbon monoxide", EventType.DOORBELL: "doorbell",
    EventType.FALL: "fall", EventType.PULSE: "abnormal pulse", EventType.PANIC: "panic button",
    EventType.WATER_LEAK: "water leak", EventType.INTRUSION: "intrusion", EventType.TAMPER: "tampering",
    EventType.OFFLINE: "no signal", EventType.BATTERY_LOW: "low battery",
    EventType.SELF_TEST_FAILED: "self-test failure",
    CommsEvent.INCOMING_CALL: "incoming call", CommsEvent.INCOMING_SMS: "incoming SMS",
}
_TRIGGER_OF: Mapping[CommsEvent, TriggerKind] = {CommsEvent.INCOMING_CALL: TriggerKind.CALL,
                                                 CommsEvent.INCOMING_SMS: TriggerKind.SMS}


def event_of(value: str) -> EventType | CommsEvent:
    """An incident's ``hazard`` read back: a device's event type, or the call or SMS that started it."""
    try:
        return CommsEvent(value)
    except ValueError:
        return EventType(value)


def keyword_in(keywords: Sequence[str], text: str) -> str | None:
    """The first of ``keywords`` (lower case) that ``text`` holds as a word, or None."""
    words = {w.strip(".,;:!?()[]\"'«»").casefold() for w in text.split()}
    return next((k for k in keywords if k.casefold() in words), None)


class IncidentState(StrEnum):
    OPEN = "open"
    NOTIFYING = "notifying"
    ACKNOWLEDGED = "acknowledged"
    FALSE_ALARM = "false_alarm"
    RESOLVED = "resolved"
    EXHAUSTED = "exhausted"


TERMINAL = frozenset({IncidentState.ACKNOWLEDGED, IncidentState.FALSE_ALARM, IncidentState.RESOLVED,
                      IncidentState.EXHAUSTED})


@dataclass(frozen=True, slots=True)
class Contact:
    role: ContactRole
    msisdn: str  # E.164
    subscriber_id: str
    priority: int  # lower first
    name: str | None = None
    #: the consent purposes this person holds now (``iim.consent``: unrevoked, unexpired)
    consents: frozenset[str] = frozenset()
    #: bound to the triggering device itself (the wearer of a wearable), not only to the household
    device_bound: bool = False


@dataclass(frozen=True, slots=True)
class IncidentFacts:
    """What the engine knows of the incident; snapshot it when the incident opens.

    ``home_targets``: SIP URIs of the household's devices that can ring (``to="home"``); the triggering
    device is never called. ``occurred_at``: the event's time for ``{time}`` (else ``now``).
    ``device_dtmf_open``: the device (a doorphone) opens on a DTMF key sent to its call, so a call bridged
    to it passes the answerer's keys through.

    A call or an SMS (``event_type`` a :class:`CommsEvent`) has no device: ``device_type``, ``device_id`` and
    ``device_status`` are None and ``device_name`` names the sender. ``sender``: the caller or SMS sender in
    E.164 (None for a device event); ``text``: the SMS body, for keyword matching only (never stored).
    """

    event_type: EventType | CommsEvent
    device_type: DeviceType | None
    device_id: str | None
    device_name: str
    device_status: DeviceStatus | None
    device_sip_uri: str | None
    household_name: str
    presence: PresenceState
    time_zone: str
    contacts: tuple[Contact, ...]
    home_targets: tuple[str, ...]
    occurred_at: datetime | None = None
    device_dtmf_open: bool = False
    sender: str | None = None
    text: str | None = None

    @property
    def trigger(self) -> TriggerKind:
        """What kind of trigger these facts are."""
        if isinstance(self.event_type, CommsEvent):
            return _TRIGGER_OF[self.event_type]
        return TriggerKind.DEVICE_EVENT

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (for the incident row); :meth:`from_json` reads it back. The SMS text stays out."""
        return {
            "event_type": self.event_type.value,
            "device_type": None if self.device_type is None else self.device_type.value,
            "device_id": self.device_id, "device_name": self.device_name,
            "device_status": None if self.device_status is None else self.device_status.value,
            "device_sip_uri": self.device_sip_uri, "sender": self.sender,
            "household_name": self.household_name, "presence": self.presence.value, "time_zone": self.time_zone,
            "contacts": [{"role": c.role.value, "msisdn": c.msisdn, "subscriber_id": c.subscriber_id,
                          "priority": c.priority, "name": c.name, "consents": sorted(c.consents),
                          "device_bound": c.device_bound} for c in self.contacts],
            "home_targets": list(self.home_targets),
            "occurred_at": None if self.occurred_at is None else self.occurred_at.isoformat(),
            "device_dtmf_open": self.device_dtmf_open,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IncidentFacts:
        occurred = data.get("occurred_at")
        device_type, device_id, status = data.get("device_type"), data.get("device_id"), data.get("device_status")
        return cls(
            event_type=event_of(data["event_type"]), device_type=None if device_type is None else DeviceType(device_type),
            device_id=None if device_id is None else str(device_id), device_name=str(data["device_name"]),
            device_status=None if status is None else DeviceStatus(status), device_sip_uri=data.get("device_sip_uri"),
            sender=data.get("sender"),
            household_name=str(data["household_name"]), presence=PresenceState(data["presence"]),
            time_zone=str(data["time_zone"]),
            contacts=tuple(Contact(ContactRole(c["role"]), str(c["msisdn"]), str(c["subscriber_id"]),
                                   int(c["priority"]), c.get("name"), frozenset(c.get("consents", ())),
                                   bool(c.get("device_bound", False))) for c in data.get("contacts", ())),
            home_targets=tuple(str(t) for t in data.get("home_targets", ())),
            occurred_at=None if occurred is None else datetime.fromisoformat(occurred),
            device_dtmf_open=bool(data.get("device_dtmf_open", False)),
        )


@dataclass(frozen=True, slots=True)
class Progress:
    """Where an incident is: ``step`` = index of the first step of the current group; ``attempt`` =
    0-based retry count of that group (see the module doc for ``open`` vs ``notifying``)."""

    state: IncidentState
    step: int
    attempt: int


# -- actions ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PlaceCall:
    """Call ``destination`` (E.164, or a SIP URI for a home device).

    ``prompt_text``: what to say once answered (the IVR prompt with ``ivr``, else the alert message).
    ``bridge_to``: connect the answered call to this device (a doorphone) after the prompt; ``bridge_dtmf``:
    the answerer's keys reach that device (it opens the door on its key), else they are filtered out.
    """

    kind: ClassVar[Literal["call"]] = "call"
    key: str
    step: int
    role: ContactRole | None
    destination: str
    ivr: IvrCheck | None
    ring_s: int
    prompt_text: str | None
    bridge_to: str | None = None
    bridge_dtmf: bool = False


@dataclass(frozen=True, slots=True)
class SendSms:
    kind: ClassVar[Literal["sms"]] = "sms"
    key: str
    step: int
    role: ContactRole
    msisdn: str
    text: str


@dataclass(frozen=True, slots=True)
class Notify:
    """A connector notification to the household (app, panel, speaker)."""

    kind: ClassVar[Literal["notify"]] = "notify"
    key: str
    step: int
    text: str


@dataclass(frozen=True, slots=True)
class RecordMessage:
    """Answer ``destination`` (the triggering device), play ``prompt_text``, record up to ``max_s``."""

    kind: ClassVar[Literal["record"]] = "record"
    key: str
    step: int
    destination: str
    prompt_text: str
    max_s: int


Action = PlaceCall | SendSms | Notify | RecordMessage


class ActionOutcome(StrEnum):
    """What happened to an action. An IVR call reports the chosen key's :class:`IvrOutcome` value, or
    ``no_input`` when answered without a valid key."""

    ANSWERED = "answered"
    NO_ANSWER = "no_answer"
    BUSY = "busy"
    FAILED = "failed"
    REFUSED = "refused"  # anti-fraud refused it
    UNREACHABLE = "unreachable"  # switch / SMSC down
    SENT = "sent"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    ACKNOWLEDGE = "acknowledge"
    FALSE_ALARM = "false_alarm"
    ESCALATE = "escalate"
    RESOLVED = "resolved"
    NO_INPUT = "no_input"
    RECORDED = "recorded"


@dataclass(frozen=True, slots=True)
class Advance:
    """The engine's answer: the new progress, what to do now and when to come back (None: never)."""

    progress: Progress
    actions: tuple[Action, ...]
    deadline: datetime | None
    reason: str
    notes: tuple[str, ...] = ()


_DECISIONS: Mapping[ActionOutcome, IvrOutcome] = {
    ActionOutcome.ACKNOWLEDGE: IvrOutcome.ACKNOWLEDGE, ActionOutcome.FALSE_ALARM: IvrOutcome.FALSE_ALARM,
    ActionOutcome.ESCALATE: IvrOutcome.ESCALATE, ActionOutcome.RESOLVED: IvrOutcome.RESOLVED,
}
# Safety first: an alarm confirmed or help asked for beats an all-clear given in the same group.
_PRECEDENCE = (IvrOutcome.ACKNOWLEDGE, IvrOutcome.ESCALATE, IvrOutcome.RESOLVED, IvrOutcome.FALSE_ALARM)
_STOPS: Mapping[IvrOutcome, IncidentState] = {
    IvrOutcome.ACKNOWLEDGE: IncidentState.ACKNOWLEDGED, IvrOutcome.FALSE_ALARM: IncidentState.FALSE_ALARM,
    IvrOutcome.RESOLVED: IncidentState.RESOLVED,
}


# -- selection --------------------------------------------------------------------------------------------

def _aware(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


def _local(now: datetime, zone: str) -> datetime:
    return _aware(now).astimezone(ZoneInfo(zone))


def mismatches(scenario: Scenario, facts: IncidentFacts, now: datetime) -> tuple[str, ...]:
    """Why ``scenario`` does not apply to ``facts`` at ``now`` (empty: it applies)."""
    found: list[str] = []
    if not scenario.enabled:
        found.append("the scenario is disabled")
    found.extend(_trigger_mismatches(scenario, facts))
    local = _local(now, facts.time_zone)
    for i, cond in enumerate(scenario.conditions):
        if isinstance(cond, TimeWindowCondition):
            if not cond.holds(local.time()):
                where = "inside" if cond.negate else "outside"
                found.append(f"condition {i}: local time {local:%H:%M} ({facts.time_zone}) is {where} "
                             f"{cond.start:%H:%M}-{cond.end:%H:%M}")
        elif isinstance(cond, PresenceCondition):
            if facts.presence not in cond.states:
                found.append(f"condition {i}: presence {facts.presence} is not one of "
                             f"{', '.join(s.value for s in cond.states)}")
        elif isinstance(cond, SenderCondition):
            if (why := _sender_mismatch(cond, facts)) is not None:
                found.append(f"condition {i}: {why}")
        elif facts.device_status is None:
            found.append(f"condition {i}: a {facts.trigger} has no device status")
        elif facts.device_status not in cond.statuses:
            found.append(f"condition {i}: device status {facts.device_status} is not one of "
                         f"{', '.join(s.value for s in cond.statuses)}")
    return tuple(found)


def _trigger_mismatches(scenario: Scenario, facts: IncidentFacts) -> list[str]:
    trigger = scenario.trigger
    if trigger.kind is not facts.trigger:
        return [f"trigger: a {facts.trigger} does not start a {trigger.kind} scenario"]
    found: list[str] = []
    if trigger.kind is TriggerKind.DEVICE_EVENT:
        if facts.event_type not in trigger.event_types:
            found.append(f"trigger: event {facts.event_type} is not one of "
                         f"{', '.join(e.value for e in trigger.event_types)}")
        if trigger.device_types and facts.device_type not in trigger.device_types:
            found.append(f"trigger: device type {facts.device_type} is not one of "
                         f"{', '.join(d.value for d in trigger.device_types)}")
    elif trigger.keywords and keyword_in(trigger.keywords, facts.text or "") is None:
        found.append(f"trigger: the SMS holds none of the keywords {', '.join(trigger.keywords)}")
    return found


def _sender_mismatch(cond: SenderCondition, facts: IncidentFacts) -> str | None:
    """Why the sender condition does not hold (None: it holds)."""
    if facts.sender is None:
        return f"a {facts.trigger} has no sender"
    roles = {c.role for c in facts.contacts if c.msisdn == facts.sender}
    matched = facts.sender in cond.numbers or bool(roles & set(cond.roles))
    if matched != cond.negate:
        return None
    wanted = ", ".join([*cond.numbers, *(f"a {r}" for r in cond.roles)])
    return (f"sender {facts.sender} is {'one' if cond.negate else 'none'} of {wanted}"
            + (" (negated)" if cond.negate else ""))


def select_scenario(scenarios: Sequence[Scenario], facts: IncidentFacts, now: datetime) -> Scenario | None:
    """The first enabled scenario whose trigger and conditions match, in the order given.

    The order is the priority: pass the household's own scenarios first, then the tenant-wide ones
    (``iim.scenarios.registry.scenarios_for_household`` returns them so).
    """
    for scenario in scenarios:
        if not mismatches(scenario, facts, now):
            return scenario
    return None


# -- groups and actions -----------------------------------------------------------------------------------

def groups(scenario: Scenario) -> tuple[tuple[int, int], ...]:
    """The groups as ``(first, end)`` step index ranges (end exclusive)."""
    out: list[tuple[int, int]] = []
    start = 0
    for i, step in enumerate(scenario.steps):
        if isinstance(step, WaitStep) or not step.with_next:
            out.append((start, i + 1))
            start = i + 1
    return tuple(out)


def _group_end(scenario: Scenario, first: int) -> int:
    for start, end in groups(scenario):
        if start == first:
            return end
    raise ValueError(f"step {first} does not start a group of scenario {scenario.name!r}")


def _placeholders(facts: IncidentFacts, now: datetime) -> dict[str, str]:
    when = _local(facts.occurred_at or now, facts.time_zone)
    return {"device": facts.device_name, "event": EVENT_LABELS.get(facts.event_type, facts.event_type.value),
            "household": facts.household_name, "sender": _sender_label(facts), "time": f"{when:%H:%M}"}


def _sender_label(facts: IncidentFacts) -> str:
    """Who called or wrote, by name when a contact of the household; a device event's device."""
    if facts.sender is None:
        return facts.device_name
    named = next((c.name for c in facts.contacts if c.msisdn == facts.sender and c.name), None)
    return named or facts.sender


def _contacts(facts: IncidentFacts, role: ContactRole) -> list[Contact]:
    seen: set[str] = set()
    out: list[Contact] = []
    for contact in sorted((c for c in facts.contacts if c.role == role), key=lambda c: c.priority):
        if contact.msisdn not in seen:
            seen.add(contact.msisdn)
            out.append(contact)
    return out


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(slots=True)
class _Builder:
    """Collects a group's actions with their keys ``{incident}/{step}/{attempt}/{n}``."""

    incident_id: str
    first: int
    attempt: int
    actions: list[Action] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def key(self) -> str:
        return f"{self.incident_id}/{self.first}/{self.attempt}/{len(self.actions)}"


def _build_group(incident_id: str, scenario: Scenario, facts: IncidentFacts, first: int, attempt: int,
                 now: datetime) -> _Builder:
    values = _placeholders(facts, now)
    b = _Builder(incident_id, first, attempt)
    for index in range(first, _group_end(scenario, first)):
        step = scenario.steps[index]
        if isinstance(step, CallStep):
            _add_calls(b, step, index, facts, values)
        elif attempt > 0:
            continue  # a retry re-places the calls only
        elif isinstance(step, SmsStep):
            contacts = _contacts(facts, step.to)
            if not contacts:
                b.notes.append(f"step {index}: sms {step.to}: no contact with that role, skipped")
            text = _clip(render(step.text, values), SMS_MAX_CHARS)
            for contact in contacts:
                b.actions.append(SendSms(b.key(), first, step.to, contact.msisdn, text))
        elif isinstance(step, NotifyStep):
            b.actions.append(Notify(b.key(), first, render(step.text, values)))
        elif isinstance(step, RecordStep):
            if facts.device_sip_uri is None:
                b.notes.append(f"step {index}: record_message: the device has no SIP URI, skipped")
            else:
                b.actions.append(RecordMessage(b.key(), first, facts.device_sip_uri, render(step.prompt, values),
                                               step.max_s))
    return b


def _add_calls(b: _Builder, step: CallStep, index: int, facts: IncidentFacts, values: dict[str, str]) -> None:
    if step.ivr is not None:
        prompt: str | None = render(step.ivr.prompt, values)
    else:
        prompt = render(step.message or DEFAULT_CALL_MESSAGE, values)
    bridge_to = facts.device_sip_uri if step.bridge else None
    bridge_dtmf = bridge_to is not None and facts.device_dtmf_open
    if step.to == "home":
        targets = [t for t in dict.fromkeys(facts.home_targets) if t != facts.device_sip_uri]
        if not targets:
            b.notes.append(f"step {index}: call home: no home device can ring, skipped")
        for uri in targets:
            b.actions.append(PlaceCall(b.key(), b.first, None, uri, step.ivr, step.ring_s, prompt, bridge_to,
                                       bridge_dtmf))
        return
    role = ContactRole(step.to)
    contacts = _contacts(facts, role)
    if not contacts:
        b.notes.append(f"step {index}: call {role}: no contact with that role, skipped")
    for contact in contacts:
        b.actions.append(PlaceCall(b.key(), b.first, role, contact.msisdn, step.ivr, step.ring_s, prompt,
                                   bridge_to, bridge_dtmf))


def _call_seconds(call: PlaceCall) -> int:
    seconds = call.ring_s
    if call.ivr is not None:
        prompt_s = math.ceil(len(call.prompt_text or "") / TTS_CHARS_PER_S)
        seconds += call.ivr.tries * (prompt_s + call.ivr.digit_timeout_s)
    elif call.bridge_to is not None:  # answered = the prompt played and the device reached
        seconds += math.ceil(len(call.prompt_text or "") / TTS_CHARS_PER_S) + ANSWER_S
    return seconds


def _record_seconds(record: RecordMessage) -> int:
    return ANSWER_S + math.ceil(len(record.prompt_text) / TTS_CHARS_PER_S) + record.max_s


def deadline_for(actions: Sequence[Action], now: datetime) -> datetime:
    """When a group's outcomes are due: the longest call (ring + IVR) or recording, plus slack; ``now``
    for a group of SMS and notifications only (nothing to wait for)."""
    waits = [_call_seconds(a) for a in actions if isinstance(a, PlaceCall)]
    waits += [_record_seconds(a) for a in actions if isinstance(a, RecordMessage)]
    return now + timedelta(seconds=max(waits) + CALL_SLACK_S) if waits else now


def _describe(action: Action) -> str:
    if isinstance(action, PlaceCall):
        extra = " (IVR)" if action.ivr is not None else " (bridged)" if action.bridge_to else ""
        return f"call {action.role or 'home'} {action.destination}{extra}"
    if isinstance(action, SendSms):
        return f"sms {action.role} {action.msisdn}"
    if isinstance(action, Notify):
        return "notify the household"
    return f"record a message at {action.destination}"


def _group_budget(scenario: Scenario, first: int) -> tuple[int, int]:
    """(retries, retry_delay_s) of a group: the largest among its call steps."""
    calls = [s for s in scenario.steps[first:_group_end(scenario, first)] if isinstance(s, CallStep)]
    return max((s.retries for s in calls), default=0), max((s.retry_delay_s for s in calls), default=0)


def _enter(incident_id: str, scenario: Scenario, facts: IncidentFacts, first: int, attempt: int,
           now: datetime, notes: list[str]) -> Advance:
    """Emit the group starting at ``first`` (skipping empty groups, taking wait steps as pauses)."""
    while first < len(scenario.steps):
        step = scenario.steps[first]
        if isinstance(step, WaitStep):
            return Advance(Progress(IncidentState.OPEN, first + 1, 0), (), now + timedelta(seconds=step.seconds),
                           f"step {first}: wait {step.seconds} s", tuple(notes))
        built = _build_group(incident_id, scenario, facts, first, attempt, now)
        notes.extend(built.notes)
        if built.actions:
            retries, _ = _group_budget(scenario, first)
            label = f"step {first}" if attempt == 0 else f"step {first}, retry {attempt} of {retries}"
            reason = f"{label}: " + " and ".join(_describe(a) for a in built.actions)
            return Advance(Progress(IncidentState.NOTIFYING, first, attempt), tuple(built.actions),
                           deadline_for(built.actions, now), reason, tuple(notes))
        notes.append(f"step {first}: nothing to do in this group, moving on")
        first, attempt = _group_end(scenario, first), 0
    return Advance(Progress(IncidentState.EXHAUSTED, len(scenario.steps), 0), (), None,
                   "exhausted: every step was tried and nobody acknowledged", tuple(notes))


def begin(incident_id: str, scenario: Scenario, facts: IncidentFacts, now: datetime) -> Advance:
    """Open -> notifying with the first group's actions (or exhausted if no group yields any)."""
    return _enter(incident_id, scenario, facts, 0, 0, _aware(now), [])


def current_actions(incident_id: str, scenario: Scenario, facts: IncidentFacts, progress: Progress,
                    now: datetime) -> tuple[Action, ...]:
    """The actions that are out for ``progress`` (empty unless notifying): for a resumed executor.

    ``now`` only renders ``{time}`` when the facts carry no ``occurred_at``.
    """
    if progress.state is not IncidentState.NOTIFYING:
        return ()
    return tuple(_build_group(incident_id, scenario, facts, progress.step, progress.attempt, now).actions)


# -- judging outcomes -------------------------------------------------------------------------------------

def _decision(action: PlaceCall, outcome: ActionOutcome | None) -> IvrOutcome | None:
    if outcome is None:
        return None
    if outcome is ActionOutcome.ANSWERED and action.ivr is None:
        return IvrOutcome.ACKNOWLEDGE  # the person heard the alert (or took the doorphone call)
    return _DECISIONS.get(outcome)


def _ack_actions(incident_id: str, scenario: Scenario, facts: IncidentFacts, step: int,
                 now: datetime, notes: list[str]) -> tuple[Action, ...]:
    values = _placeholders(facts, now)
    out: list[Action] = []
    for i, ack in enumerate(scenario.on_acknowledge):
        if isinstance(ack, NotifyStep):
            out.append(Notify(f"{incident_id}/ack/{len(out)}", step, render(ack.text, values)))
            continue
        contacts = _contacts(facts, ack.to)
        if not contacts:
            notes.append(f"on_acknowledge[{i}]: sms {ack.to}: no contact with that role, skipped")
        text = _clip(render(ack.text, values), SMS_MAX_CHARS)
        for contact in contacts:
            out.append(SendSms(f"{incident_id}/ack/{len(out)}", step, ack.to, contact.msisdn, text))
    return tuple(out)


def _stop(incident_id: str, scenario: Scenario, facts: IncidentFacts, progress: Progress, decision: IvrOutcome,
          who: str, now: datetime, notes: list[str]) -> Advance:
    state = _STOPS[decision]
    actions: tuple[Action, ...] = ()
    if state is IncidentState.ACKNOWLEDGED:
        actions = _ack_actions(incident_id, scenario, facts, progress.step, now, notes)
    reason = f"step {progress.step}: {state} ({who})"
    if actions:
        reason += "; " + " and ".join(_describe(a) for a in actions)
    return Advance(Progress(state, progress.step, progress.attempt), actions, None, reason, tuple(notes))


def advance(incident_id: str, scenario: Scenario, facts: IncidentFacts, progress: Progress,
            outcomes: Mapping[str, ActionOutcome], now: datetime) -> Advance:
    """The next move: judge the current group's outcomes (keyed by action key), or emit what is due."""
    now = _aware(now)
    if progress.state in TERMINAL:
        return Advance(progress, (), None, f"the incident is already {progress.state}: nothing to do")
    if progress.state is IncidentState.OPEN:
        return _enter(incident_id, scenario, facts, progress.step, progress.attempt, now, [])

    first, attempt = progress.step, progress.attempt
    actions = current_actions(incident_id, scenario, facts, progress, now)
    calls = {a.key: a for a in actions if isinstance(a, PlaceCall)}
    decisions: dict[IvrOutcome, str] = {}
    results: list[str] = []
    for call in calls.values():
        outcome = outcomes.get(call.key)
        who = f"{call.role or 'home'} {call.destination}"
        results.append(f"{who}: {outcome or 'no result'}")
        decision = _decision(call, outcome)
        if decision is not None:
            how = "answered" if outcome is ActionOutcome.ANSWERED else f"IVR {decision}"
            decisions.setdefault(decision, f"{who}: {how}")
    # A key press reported for a key of this group that the facts no longer produce (a contact removed
    # since) is still a person's decision.
    prefix, known = f"{incident_id}/{first}/{attempt}/", {a.key for a in actions}
    for key, outcome in sorted(outcomes.items()):
        if key.startswith(prefix) and key not in known and outcome in _DECISIONS:
            decisions.setdefault(_DECISIONS[outcome], f"action {key}: {outcome}")
    for decision in _PRECEDENCE:
        if decision not in decisions:
            continue
        if decision is IvrOutcome.ESCALATE:  # the next group now, no retries
            notes = [f"step {first}: escalation asked ({decisions[decision]})"]
            return _enter(incident_id, scenario, facts, _group_end(scenario, first), 0, now, notes)
        return _stop(incident_id, scenario, facts, progress, decision, decisions[decision], now, [])

    summary = "; ".join(results) if results else "no call in this group"
    notes = [f"step {first}: nobody reached ({summary})"] if calls else []
    retries, delay = _group_budget(scenario, first)
    # A refused call (consent, toll-fraud guard) would be refused again: only a group with a call that was
    # placed is retried, so a refusal never holds the escalation back.
    placed = any(outcomes.get(key) is not ActionOutcome.REFUSED for key in calls)
    if calls and placed and attempt < retries:
        return Advance(Progress(IncidentState.OPEN, first, attempt + 1), (), now + timedelta(seconds=delay),
                       f"step {first}: nobody reached; retry {attempt + 1} of {retries} in {delay} s",
                       tuple(notes))
    return _enter(incident_id, scenario, facts, _group_end(scenario, first), 0, now, notes)


def settle(incident_id: str, scenario: Scenario, facts: IncidentFacts, progress: Progress, decision: IvrOutcome,
           now: datetime, *, by: str = "app") -> Advance:
    """A decision taken outside the calls (the app's "false alarm" button, an operator), by the rules of a
    key press, in any live state. ``escalate`` skips what is running or pending: while notifying or in a
    retry pause it moves to the next group; a group that is due but not yet out (before :func:`begin`,
    after a wait step) is emitted now."""
    now = _aware(now)
    if progress.state in TERMINAL:
        return Advance(progress, (), None, f"the incident is already {progress.state}: {by}'s {decision} ignored")
    if decision is not IvrOutcome.ESCALATE:
        return _stop(incident_id, scenario, facts, progress, decision, f"{by}: {decision}", now, [])
    notes = [f"{by} asked to escalate"]
    due = progress.state is IncidentState.OPEN and progress.attempt == 0
    if due or progress.step >= len(scenario.steps):
        return _enter(incident_id, scenario, facts, progress.step, 0, now, notes)
    return _enter(incident_id, scenario, facts, _group_end(scenario, progress.step), 0, now, notes)


def ready_to_advance(progress: Progress, actions: Sequence[Action], outcomes: Mapping[str, ActionOutcome]) -> bool:
    """Whether the outcomes already decide the current group (call :func:`advance` now, not at the deadline):
    a person's decision arrived, or every call and recording has a final outcome. Never while ``open``."""
    if progress.state is not IncidentState.NOTIFYING:
        return False
    waiting_for = [a for a in actions if isinstance(a, PlaceCall | RecordMessage)]
    if not waiting_for:
        return False
    final = True
    for action in waiting_for:
        outcome = outcomes.get(action.key)
        if isinstance(action, PlaceCall) and _decision(action, outcome) is not None:
            return True
        interim = outcome is ActionOutcome.ANSWERED  # an IVR or a recording still running
        if outcome is None or interim:
            final = False
    return final



def reopen(scenario: Scenario, progress: Progress, *, step_tried: bool) -> Progress:
    """Where an ended incident that an operator reopens resumes: open (nothing out) at the first group not yet
    tried. ``step_tried``: the group at ``progress.step`` placed actions (it ended while that group ran, or in its
    retry pause); then the chain resumes with the group after it, else with that group (it ended before the group
    ran: before :func:`begin`, after a wait step). Groups already tried are not emitted again (their actions keep
    their keys); past the last group the next :func:`advance` ends the incident exhausted. A live incident is
    returned as it is."""
    if progress.state not in TERMINAL:
        return progress
    step = min(progress.step, len(scenario.steps))
    if step_tried:
        step = next((first for first, _ in groups(scenario) if first > step), len(scenario.steps))
    return Progress(IncidentState.OPEN, step, 0)

# -- events on a live incident ----------------------------------------------------------------------------

def on_repeat_event(progress: Progress, event_type: EventType | None = None) -> str:
    """The audit reason for a repeat of the same hazard from the same device: the incident is only updated."""
    what = f"repeat {event_type} event" if event_type is not None else "repeat event"
    if progress.state in TERMINAL:
        return f"{what} after the incident ended ({progress.state}): recorded, no actions"
    return f"{what} while the incident is {progress.state} at step {progress.step}: incident updated, no new actions"


def on_cleared(progress: Progress) -> Progress:
    """A ``cleared`` event resolves a live incident (escalation stops); an ended one stays as it is."""
    if progress.state in TERMINAL:
        return progress
    return Progress(IncidentState.RESOLVED, progress.step, progress.attempt)


# -- re-arming --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PriorChain:
    """The last ended incident of the same device and hazard, as :func:`rearm` needs it."""

    state: IncidentState
    closed_at: datetime
    #: the device reported ``cleared`` after that incident ended
    cleared_since: bool


def rearm(prior: PriorChain | None, now: datetime, cool_down: timedelta = REARM_COOL_DOWN) -> datetime | None:
    """When a new incident of a device and hazard may start its full chain: None = now; else hold it (open,
    no actions) until the returned time. See the module doc for the rule."""
    now = _aware(now)
    if prior is None or prior.state is not IncidentState.EXHAUSTED or prior.cleared_since:
        return None
    until = prior.closed_at + cool_down
    return until if now < until else None
