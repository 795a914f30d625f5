"""The typed meaning of a scenario row (``iim.scenario``: trigger, conditions, steps, on_acknowledge).

A scenario says what starts it (:class:`Trigger`: device events, an incoming call or an incoming SMS), when it
applies (conditions, all of which must hold) and what to do, in order (steps). Consecutive steps joined by ``with_next=True`` form a
*group* that runs at once (smoke: call the owner AND text the owner); the engine moves from group to group
until a person acknowledges, declares a false alarm or says they are fine (see :mod:`iim.scenarios.engine`).

Texts (SMS, notifications, IVR and call prompts) are templates that may use only ``{device}``,
``{event}``, ``{household}``, ``{sender}`` and ``{time}`` (``{sender}``: who called or wrote, by name when they
are a contact of the household; for a device event, the device's name); anything else is refused when the scenario is validated, so
a scenario that was accepted always renders.

The models are frozen and refuse unknown fields. Numbers and booleans are strict (``"30"`` is not 30);
enum values and ``HH:MM`` times are taken from their JSON strings, as stored in jsonb.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from datetime import time
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from iot_bridge.event_types import EventType
from policy_cache.models import DeviceStatus, DeviceType, PresenceState

if TYPE_CHECKING:
    from policy_cache.models import ScenarioRecord

__all__ = [
    "PLACEHOLDERS", "MAX_STEPS",
    "ContactRole", "IvrOutcome", "TemplateText", "render",
    "Trigger", "TriggerKind", "CommsEvent", "TimeWindowCondition", "PresenceCondition", "DeviceStatusCondition",
    "SenderCondition", "Condition", "E164",
    "IvrCheck", "CallStep", "SmsStep", "NotifyStep", "RecordStep", "WaitStep", "Step", "AckStep",
    "Scenario", "check_steps", "check_acknowledge", "definition_of",
]

#: The only placeholders a text template may use.
PLACEHOLDERS = frozenset({"device", "event", "household", "sender", "time"})
MAX_STEPS = 20


class ContactRole(StrEnum):
    """Who a step reaches: every contact of the household bound with this role (``iim.binding_role``)."""

    OWNER = "owner"
    MEMBER = "member"
    BACKUP_CONTACT = "backup_contact"
    SECURITY_SERVICE = "security_service"


class IvrOutcome(StrEnum):
    """What a key press on an IVR check means."""

    ACKNOWLEDGE = "acknowledge"  # a person confirms the alarm and takes over: stop escalating
    FALSE_ALARM = "false_alarm"  # stop: nothing is wrong
    ESCALATE = "escalate"  # go to the next group now (no retries of this one)
    RESOLVED = "resolved"  # the person is fine: stop


def _check_placeholders(text: str) -> str:
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:  # a lone "{" or "}"
        raise ValueError(f"bad template ({exc}); write {{{{ and }}}} for literal braces") from exc
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in PLACEHOLDERS:
            allowed = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
            raise ValueError(f"unknown placeholder {{{field}}}: only {allowed} may be used")
        if spec or conversion:
            raise ValueError(f"placeholder {{{field}}} takes no format spec or conversion")
    return text


#: A text with placeholders, checked when the scenario is validated.
TemplateText = Annotated[str, StringConstraints(min_length=1, max_length=1000),
                         AfterValidator(_check_placeholders)]


def render(template: str, values: dict[str, str]) -> str:
    """Fill a validated template (``values`` has every name of :data:`PLACEHOLDERS`)."""
    return template.format_map(values)


StrictInt = Annotated[int, Field(strict=True)]
StrictBool = Annotated[bool, Field(strict=True)]
DtmfKey = Annotated[str, StringConstraints(pattern=r"^[0-9*#]$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- trigger and conditions -------------------------------------------------------------------------------

class TriggerKind(StrEnum):
    """What starts a scenario (spec 9.1.2: a call, an SMS or an IoT event)."""

    DEVICE_EVENT = "device_event"
    CALL = "call"
    SMS = "sms"


class CommsEvent(StrEnum):
    """The "event" of an incident a call or an SMS started (its ``hazard``); never a device's event type."""

    INCOMING_CALL = "incoming_call"
    INCOMING_SMS = "incoming_sms"


#: A number in E.164 (``+`` and 8 to 15 digits): what a sender is compared as, after the tenant's numbering plan.
E164 = Annotated[str, StringConstraints(pattern=r"^\+[1-9][0-9]{7,14}$")]
Keyword = Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, min_length=1, max_length=40,
                                           pattern=r"^[^\s]+$")]


class Trigger(_Model):
    """What starts the scenario.

    ``device_event`` (the default, so rows stored before calls and SMS existed read unchanged): one of
    ``event_types`` from a device of one of ``device_types`` (empty: any type). ``call``: an incoming call to a
    member of the household. ``sms``: an incoming SMS to one, whose text holds one of ``keywords`` as a word
    (case-insensitive; none: any SMS). Who called or wrote is a :class:`SenderCondition`.
    """

    kind: TriggerKind = TriggerKind.DEVICE_EVENT
    event_types: list[EventType] = Field(default_factory=list)
    device_types: list[DeviceType] = Field(default_factory=list)
    keywords: list[Keyword] = Field(default_factory=list, max_length=20)

    @model_validator(mode="after")
    def _fields_of_the_kind(self) -> Self:
        if self.kind is TriggerKind.DEVICE_EVENT:
            if not self.event_types:
                raise ValueError("a device_event trigger needs at least one of event_types")
            if self.keywords:
                raise ValueError("keywords belong to an sms trigger")
            return self
        if self.event_types or self.device_types:
            raise ValueError(f"a {self.kind} trigger takes no event_types or device_types (they are device events)")
        if self.keywords and self.kind is not TriggerKind.SMS:
            raise ValueError("keywords belong to an sms trigger")
        return self


class TimeWindowCondition(_Model):
    """Holds from ``start`` (inclusive) to ``end`` (exclusive), household local time; start > end wraps
    midnight (23:00-07:00). ``negate`` makes it hold outside the window instead."""

    kind: Literal["time_window"]
    start: time
    end: time
    negate: StrictBool = False

    @model_validator(mode="after")
    def _window(self) -> Self:
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("start and end are local times of the household's zone (no offset)")
        if self.start == self.end:
            raise ValueError("a time window needs start != end")
        return self

    def holds(self, local: time) -> bool:
        t = local.replace(tzinfo=None)
        inside = self.start <= t < self.end if self.start < self.end else (t >= self.start or t < self.end)
        return inside != self.negate


class PresenceCondition(_Model):
    """Holds when the household's presence is one of ``states``."""

    kind: Literal["presence"]
    states: list[PresenceState] = Field(min_length=1)


class DeviceStatusCondition(_Model):
    """Holds when the triggering device's status is one of ``statuses``."""

    kind: Literal["device_status"]
    statuses: list[DeviceStatus] = Field(min_length=1)


class SenderCondition(_Model):
    """Holds when the caller or SMS sender is one of ``numbers`` (E.164) or a contact of the household with one of
    ``roles`` (the child is a ``member``); a device event has no sender, so it never holds there. The sender is
    compared in E.164 under the tenant's numbering plan (``8916...`` is ``+7916...``). ``negate``: anyone else."""

    kind: Literal["sender"]
    numbers: list[E164] = Field(default_factory=list, max_length=50)
    roles: list[ContactRole] = Field(default_factory=list)
    negate: StrictBool = False

    @model_validator(mode="after")
    def _someone(self) -> Self:
        if not self.numbers and not self.roles:
            raise ValueError("a sender condition needs numbers or roles")
        return self


Condition = Annotated[TimeWindowCondition | PresenceCondition | DeviceStatusCondition | SenderCondition,
                      Field(discriminator="kind")]


# -- steps ------------------------------------------------------------------------------------------------

class IvrCheck(_Model):
    """A spoken prompt and what each key means; ``tries`` times ``digit_timeout_s`` to press one."""

    prompt: TemplateText
    digits: dict[DtmfKey, IvrOutcome] = Field(min_length=1, max_length=12)
    tries: StrictInt = Field(default=3, ge=1, le=5)
    digit_timeout_s: StrictInt = Field(default=5, ge=1, le=30)


class CallStep(_Model):
    """Call every contact with role ``to`` (by priority, all at once), or every ringing device of the home.

    Without ``ivr``, an answered call means the person heard the alert (``message``, else a default
    alert text): the incident is acknowledged. ``bridge`` connects the answered call to the triggering
    device instead (a doorphone's intercom). ``retries`` re-places the group's calls when nobody was
    reached, ``retry_delay_s`` after the last attempt ended.
    """

    action: Literal["call"]
    to: ContactRole | Literal["home"]
    ivr: IvrCheck | None = None
    message: TemplateText | None = None
    bridge: StrictBool = False
    ring_s: StrictInt = Field(default=30, ge=5, le=120)
    retries: StrictInt = Field(default=0, ge=0, le=5)
    retry_delay_s: StrictInt = Field(default=60, ge=0, le=3600)
    with_next: StrictBool = False

    @model_validator(mode="after")
    def _one_use_of_the_answer(self) -> Self:
        if self.bridge and self.ivr is not None:
            raise ValueError("a call either bridges to the device or runs an IVR check, not both")
        return self


class SmsStep(_Model):
    """Text every contact with role ``to`` (by priority)."""

    action: Literal["sms"]
    to: ContactRole
    text: TemplateText
    with_next: StrictBool = False


class NotifyStep(_Model):
    """A connector notification to the household (app, panel, speaker)."""

    action: Literal["notify"]
    text: TemplateText
    with_next: StrictBool = False


class RecordStep(_Model):
    """Answer the triggering device (a doorphone), play ``prompt`` and record up to ``max_s`` seconds."""

    action: Literal["record_message"]
    prompt: TemplateText
    max_s: StrictInt = Field(default=60, ge=5, le=300)
    with_next: StrictBool = False


class WaitStep(_Model):
    """Pause the escalation; never grouped with another step."""

    action: Literal["wait"]
    seconds: StrictInt = Field(ge=1, le=86_400)


Step = Annotated[CallStep | SmsStep | NotifyStep | RecordStep | WaitStep, Field(discriminator="action")]
AckStep = Annotated[NotifyStep | SmsStep, Field(discriminator="action")]


def check_steps(steps: Sequence[CallStep | SmsStep | NotifyStep | RecordStep | WaitStep]) -> None:
    """The grouping rules: the last step is not grouped with a next one; a wait step stands alone."""
    if not steps:
        raise ValueError("a scenario needs at least one step")
    last = steps[-1]
    if not isinstance(last, WaitStep) and last.with_next:
        raise ValueError(f"step {len(steps) - 1} (the last) has with_next, but no step follows it")
    for i, step in enumerate(steps[:-1]):
        if not isinstance(step, WaitStep) and step.with_next and isinstance(steps[i + 1], WaitStep):
            raise ValueError(f"step {i} has with_next onto a wait step (step {i + 1}): a wait stands alone")


def check_acknowledge(steps: Sequence[NotifyStep | SmsStep]) -> None:
    """``on_acknowledge`` steps all run at once: ``with_next`` there would suggest an order that does not exist."""
    for i, step in enumerate(steps):
        if step.with_next:
            raise ValueError(f"on_acknowledge[{i}]: with_next means nothing here (they all run at once)")


class Scenario(_Model):
    """A whole scenario. ``on_acknowledge`` runs once a person acknowledges (not on false alarm/resolved)."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    trigger: Trigger
    conditions: list[Condition] = Field(default_factory=list, max_length=20)
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS)
    on_acknowledge: list[AckStep] = Field(default_factory=list, max_length=10)
    enabled: StrictBool = True

    @field_validator("steps")
    @classmethod
    def _grouping(cls, steps: list[CallStep | SmsStep | NotifyStep | RecordStep | WaitStep]
                  ) -> list[CallStep | SmsStep | NotifyStep | RecordStep | WaitStep]:
        check_steps(steps)
        return steps

    @model_validator(mode="after")
    def _no_device_without_a_device(self) -> Self:
        """A call or an SMS has no triggering device: what needs one is refused, not silently skipped."""
        if self.trigger.kind is TriggerKind.DEVICE_EVENT:
            return self
        for i, step in enumerate(self.steps):
            if isinstance(step, RecordStep) or (isinstance(step, CallStep) and step.bridge):
                raise ValueError(f"step {i}: a {self.trigger.kind} trigger has no device to record at or bridge to")
        statuses = [i for i, cond in enumerate(self.conditions) if isinstance(cond, DeviceStatusCondition)]
        if statuses:
            raise ValueError(f"condition {statuses[0]}: a {self.trigger.kind} trigger has no device status")
        return self

    @field_validator("on_acknowledge")
    @classmethod
    def _ack_not_grouped(cls, steps: list[NotifyStep | SmsStep]) -> list[NotifyStep | SmsStep]:
        check_acknowledge(steps)
        return steps

    @classmethod
    def from_record(cls, record: ScenarioRecord) -> Scenario:
        """The typed scenario of a registry row (:class:`policy_cache.models.ScenarioRecord`)."""
        return cls.model_validate(definition_of(record))


def definition_of(record: ScenarioRecord) -> dict[str, Any]:
    """A registry row's fields as the input of :class:`Scenario`."""
    return {"name": record.name, "trigger": record.trigger, "conditions": record.conditions,
            "steps": record.steps, "on_acknowledge": record.on_acknowledge, "enabled": record.enabled}
