"""Ready-made scenarios for the three device incidents of the spec (§3.3): smoke/CO, doorphone, wearable; and
device health (a silent sensor, a low battery, a failed self-test: iim.supervision); and
two started by an incoming call or SMS (§9.1.2): ``call_announce``, ``sms_keyword``.

They are complete, validated :class:`~iim.scenarios.model.Scenario` objects: ``iim scenario templates
install --household ID`` stores them as rows of a household, and a worker may fall back on the device ones when
a tenant has defined none (never on the call and SMS ones: a household asks for those by installing them). Calls to a security service are to a contracted service: placing calls to public
emergency numbers is left to people (regulation), never automated here.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from iim.scenarios.model import (
    CallStep,
    ContactRole,
    IvrCheck,
    IvrOutcome,
    NotifyStep,
    PresenceCondition,
    RecordStep,
    Scenario,
    SenderCondition,
    SmsStep,
    Trigger,
    TriggerKind,
    WaitStep,
)
from iot_bridge.event_types import EventType
from policy_cache.models import DeviceType, PresenceState

__all__ = ["TEMPLATES", "template"]

_CONFIRM_ALARM = IvrCheck(
    prompt="Alarm: {event} at {household}, reported by {device} at {time}. "
           "Press 1 to confirm the alarm, 2 if it is a false alarm.",
    digits={"1": IvrOutcome.ACKNOWLEDGE, "2": IvrOutcome.FALSE_ALARM},
)

SMOKE_CO = Scenario(
    name="smoke_co",
    trigger=Trigger(event_types=[EventType.SMOKE, EventType.CO]),
    steps=[
        CallStep(action="call", to=ContactRole.OWNER, ivr=_CONFIRM_ALARM, with_next=True),
        SmsStep(action="sms", to=ContactRole.OWNER,
                text="ALARM: {event} at {household} ({device}) at {time}. We are calling you: "
                     "press 1 to confirm, 2 if it is a false alarm."),
        CallStep(action="call", to=ContactRole.BACKUP_CONTACT, ivr=_CONFIRM_ALARM, with_next=True),
        SmsStep(action="sms", to=ContactRole.BACKUP_CONTACT,
                text="ALARM: {event} at {household} ({device}) at {time} and the owner does not answer. "
                     "We are calling you: press 1 to confirm, 2 if it is a false alarm."),
        CallStep(action="call", to=ContactRole.SECURITY_SERVICE, ring_s=45,
                 message="Automatic alarm: {event} at {household}, reported by {device} at {time}. "
                         "Nobody in the household could be reached."),
    ],
    on_acknowledge=[
        NotifyStep(action="notify", text="The {event} alarm at {household} was confirmed: help is on the way."),
    ],
)

DOORPHONE = Scenario(
    name="doorphone",
    trigger=Trigger(event_types=[EventType.DOORBELL], device_types=[DeviceType.DOORPHONE]),
    steps=[
        CallStep(action="call", to=ContactRole.OWNER, bridge=True, ring_s=30, with_next=True,
                 message="Someone is at the door of {household}."),
        CallStep(action="call", to="home", bridge=True, ring_s=30,
                 message="Someone is at the door of {household}."),
        RecordStep(action="record_message", prompt="Nobody can come to the door right now. "
                                                   "Please leave a message after the tone.", max_s=60),
        NotifyStep(action="notify", text="Missed visitor at {device} at {time}.", with_next=True),
        SmsStep(action="sms", to=ContactRole.OWNER, text="Missed visitor at {household} ({device}) at {time}."),
    ],
)

WEARABLE_FALL = Scenario(
    name="wearable_fall",
    trigger=Trigger(event_types=[EventType.FALL, EventType.PULSE], device_types=[DeviceType.WEARABLE]),
    steps=[
        CallStep(action="call", to=ContactRole.OWNER, retries=1, retry_delay_s=60, ivr=IvrCheck(
            prompt="Your {device} reported {event} at {time}. Press 1 if you need help, 2 if you are fine.",
            digits={"1": IvrOutcome.ESCALATE, "2": IvrOutcome.RESOLVED})),
        CallStep(action="call", to=ContactRole.BACKUP_CONTACT, with_next=True, ivr=IvrCheck(
            prompt="{household}: {device} reported {event} at {time} and the wearer needs help or does "
                   "not answer. Press 1 if you are taking care of it.",
            digits={"1": IvrOutcome.ACKNOWLEDGE})),
        SmsStep(action="sms", to=ContactRole.BACKUP_CONTACT,
                text="{household}: {device} reported {event} at {time}; the wearer needs help or does not "
                     "answer. We are calling you."),
        CallStep(action="call", to=ContactRole.SECURITY_SERVICE, ring_s=45,
                 message="Emergency at {household}: {device} reported {event} at {time}. Neither the wearer nor "
                         "the backup contact confirmed that the wearer is safe."),
    ],
    on_acknowledge=[
        NotifyStep(action="notify", text="Help for the {event} alarm has been confirmed."),
        SmsStep(action="sms", to=ContactRole.OWNER, text="A contact confirmed they are taking care of you."),
    ],
)

# Not an emergency: nobody is called (a household's own scenario may); the household is told at once, reminded a
# day later while the condition lasts, and the incident resolves itself when the device is heard again or reports
# its battery or self-test fine. The day's wait keeps the incident open, so a repeated report joins it.
DEVICE_HEALTH = Scenario(
    name="device_health",
    trigger=Trigger(event_types=[EventType.OFFLINE, EventType.BATTERY_LOW, EventType.SELF_TEST_FAILED]),
    steps=[
        NotifyStep(action="notify", text="{device} at {household}: {event} since {time}. Please check it.",
                   with_next=True),
        SmsStep(action="sms", to=ContactRole.OWNER,
                text="{household}: {device} reports {event} since {time}. Please check it; it protects your home."),
        WaitStep(action="wait", seconds=86_400),
        SmsStep(action="sms", to=ContactRole.OWNER,
                text="Reminder - {household}: {device} still reports {event} (since {time}). Please check it."),
    ],
)

# "My child calls while I am away": the household's speakers (or, without a connected one, the owners' and
# members' phones by SMS) hear who is calling.
CALL_ANNOUNCE = Scenario(
    name="call_announce",
    trigger=Trigger(kind=TriggerKind.CALL),
    conditions=[SenderCondition(kind="sender", roles=[ContactRole.MEMBER]),
                PresenceCondition(kind="presence", states=[PresenceState.AWAY])],
    steps=[NotifyStep(action="notify", text="{sender} is calling {household} ({time}).")],
)

# An SMS with a word for help from someone of the household: the home is told and the backup contact called.
SMS_KEYWORD = Scenario(
    name="sms_keyword",
    trigger=Trigger(kind=TriggerKind.SMS, keywords=["help", "sos", "помогите"]),
    conditions=[SenderCondition(kind="sender", roles=[ContactRole.OWNER, ContactRole.MEMBER])],
    steps=[
        NotifyStep(action="notify", text="{sender} asked {household} for help by SMS at {time}.", with_next=True),
        SmsStep(action="sms", to=ContactRole.BACKUP_CONTACT,
                text="{sender} asked {household} for help by SMS at {time}. We are calling you."),
        CallStep(action="call", to=ContactRole.BACKUP_CONTACT, ivr=IvrCheck(
            prompt="{sender} asked {household} for help by SMS at {time}. Press 1 if you are taking care of it.",
            digits={"1": IvrOutcome.ACKNOWLEDGE})),
    ],
)

TEMPLATES: Mapping[str, Scenario] = MappingProxyType({s.name: s for s in (SMOKE_CO, DOORPHONE, WEARABLE_FALL,
                                                                          DEVICE_HEALTH, CALL_ANNOUNCE, SMS_KEYWORD)})


def template(name: str) -> Scenario:
    """A template by name; :class:`KeyError` naming the known ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"no template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None
