"""The shipped templates end to end through the simulator, and what the scenario model refuses."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from iim.scenarios.engine import (
    ActionOutcome,
    IncidentState,
    Notify,
    PlaceCall,
    RecordMessage,
    SendSms,
    mismatches,
)
from iim.scenarios.model import ContactRole, Scenario
from iim.scenarios.simulate import SimulatedStep, simulate, synthetic_facts
from iim.scenarios.templates import TEMPLATES, template
from iot_bridge.event_types import EventType
from policy_cache.models import BindingRole, DeviceType

START = datetime(2026, 11, 25, 3, 0, tzinfo=ZoneInfo("Europe/Moscow"))
OWNER, BACKUP, SECURITY = "+79000000001", "+79000000002", "+79000000003"
HOME = "sip:speaker@home.invalid"


def run(name: str, **script: ActionOutcome) -> list[SimulatedStep]:
    sc = TEMPLATES[name]
    return simulate(sc, synthetic_facts(sc), START, script)


def emitted(timeline: list[SimulatedStep]) -> list[tuple[int, str, str]]:
    """(seconds from the start, kind, destination) of every action, in order."""
    out: list[tuple[int, str, str]] = []
    for entry in timeline:
        for a in entry.actions:
            target = a.destination if isinstance(a, PlaceCall | RecordMessage) else (
                a.msisdn if isinstance(a, SendSms) else "household")
            out.append((int(entry.offset.total_seconds()), a.kind, target))
    return out


def test_every_template_is_valid_and_survives_a_json_round_trip() -> None:
    assert set(TEMPLATES) >= {"smoke_co", "doorphone", "wearable_fall", "device_health"}
    for name, sc in TEMPLATES.items():
        assert sc.name == name
        assert sc.enabled
        assert Scenario.model_validate_json(sc.model_dump_json()) == sc
    with pytest.raises(KeyError, match="known: call_announce, device_health, doorphone, smoke_co, sms_keyword, wearable_fall"):
        template("fire")


def test_templates_answer_only_their_own_events() -> None:
    def chosen(event: EventType, device: DeviceType) -> list[str]:
        return [n for n, sc in TEMPLATES.items()
                if not mismatches(sc, synthetic_facts(sc, event=event, device_type=device), START)]

    assert chosen(EventType.SMOKE, DeviceType.SENSOR) == ["smoke_co"]
    assert chosen(EventType.CO, DeviceType.HUB) == ["smoke_co"]
    assert chosen(EventType.DOORBELL, DeviceType.DOORPHONE) == ["doorphone"]
    assert chosen(EventType.DOORBELL, DeviceType.SENSOR) == []
    assert chosen(EventType.FALL, DeviceType.WEARABLE) == ["wearable_fall"]
    assert chosen(EventType.PULSE, DeviceType.WEARABLE) == ["wearable_fall"]
    assert chosen(EventType.WATER_LEAK, DeviceType.SENSOR) == []
    for health in (EventType.OFFLINE, EventType.BATTERY_LOW, EventType.SELF_TEST_FAILED):
        assert chosen(health, DeviceType.SENSOR) == chosen(health, DeviceType.WEARABLE) == ["device_health"]
    assert chosen(EventType.HEARTBEAT, DeviceType.SENSOR) == chosen(EventType.BATTERY_OK, DeviceType.SENSOR) == []


# -- device health -----------------------------------------------------------------------------------------

def test_device_health_at_night_tells_the_household_and_texts_the_owner_then_reminds_a_day_later_calling_nobody(
) -> None:
    sc = TEMPLATES["device_health"]
    timeline = simulate(sc, synthetic_facts(sc, event=EventType.OFFLINE), START, {})
    assert emitted(timeline) == [(0, "notify", "household"), (0, "sms", OWNER), (86_400, "sms", OWNER)]
    first = next(a for a in timeline[0].actions if isinstance(a, SendSms))
    assert "reports no signal since 03:00" in first.text
    assert timeline[-1].state is IncidentState.EXHAUSTED


# -- smoke / CO -------------------------------------------------------------------------------------------

def test_smoke_nobody_answers_owner_then_backup_then_security_then_exhausted() -> None:
    timeline = run("smoke_co")
    assert emitted(timeline) == [
        (0, "call", OWNER), (0, "sms", OWNER),
        (30, "call", BACKUP), (30, "sms", BACKUP),
        (60, "call", SECURITY),
    ]
    assert [e.state for e in timeline] == [IncidentState.NOTIFYING] * 3 + [IncidentState.EXHAUSTED]
    first_call = timeline[0].actions[0]
    assert isinstance(first_call, PlaceCall)
    assert first_call.ivr is not None
    assert "Press 1 to confirm the alarm, 2 if it is a false alarm" in (first_call.prompt_text or "")
    assert first_call.ivr.digits == {"1": "acknowledge", "2": "false_alarm"}


def test_smoke_owner_presses_2_is_a_false_alarm_and_nothing_more_happens() -> None:
    timeline = run("smoke_co", owner=ActionOutcome.FALSE_ALARM)
    assert emitted(timeline) == [(0, "call", OWNER), (0, "sms", OWNER)]
    assert timeline[-1].state is IncidentState.FALSE_ALARM
    assert timeline[-1].deadline is None
    assert timeline[-1].reason == f"step 0: false_alarm (owner {OWNER}: IVR false_alarm)"


def test_smoke_backup_presses_1_acknowledges_and_notifies_the_household() -> None:
    timeline = run("smoke_co", backup_contact=ActionOutcome.ACKNOWLEDGE)
    assert timeline[-1].state is IncidentState.ACKNOWLEDGED
    assert emitted(timeline)[-1] == (51, "notify", "household")
    ack = timeline[-1].actions
    assert len(ack) == 1
    assert isinstance(ack[0], Notify)
    assert ack[0].key == "sim/ack/0"
    assert ack[0].text == "The smoke alarm at Test home was confirmed: help is on the way."
    assert not any(a.destination == SECURITY for e in timeline for a in e.actions if isinstance(a, PlaceCall))


def test_smoke_with_a_busy_owner_moves_on_as_soon_as_the_call_fails() -> None:
    timeline = run("smoke_co", owner=ActionOutcome.BUSY)
    assert emitted(timeline)[2] == (3, "call", BACKUP)


# -- doorphone --------------------------------------------------------------------------------------------

def test_doorphone_nobody_answers_records_a_message_then_notifies_and_texts() -> None:
    timeline = run("doorphone")
    door = "sip:doorphone@home.invalid"
    assert emitted(timeline) == [
        (0, "call", OWNER), (0, "call", HOME),
        (30, "record", door),
        (102, "notify", "household"), (102, "sms", OWNER),
    ]
    calls = [a for a in timeline[0].actions if isinstance(a, PlaceCall)]
    assert all((c.ring_s, c.ivr, c.bridge_to) == (30, None, door) for c in calls)
    assert timeline[-1].state is IncidentState.EXHAUSTED


def test_doorphone_answered_at_home_stops_there() -> None:
    timeline = run("doorphone", home=ActionOutcome.ANSWERED)
    assert emitted(timeline) == [(0, "call", OWNER), (0, "call", HOME)]
    assert timeline[-1].state is IncidentState.ACKNOWLEDGED
    assert timeline[-1].offset == timedelta(seconds=8)


# -- wearable ---------------------------------------------------------------------------------------------

def test_wearable_nobody_answers_checks_in_twice_then_backup_then_security() -> None:
    timeline = run("wearable_fall")
    assert emitted(timeline) == [
        (0, "call", OWNER),
        (90, "call", OWNER),  # the retry, 60 s after the first try rang out
        (120, "call", BACKUP), (120, "sms", BACKUP),
        (150, "call", SECURITY),
    ]
    assert [(e.state, e.progress.attempt) for e in timeline[:3]] == [
        (IncidentState.NOTIFYING, 0), (IncidentState.OPEN, 1), (IncidentState.NOTIFYING, 1)]
    assert timeline[-1].state is IncidentState.EXHAUSTED


def test_wearable_owner_fine_resolves() -> None:
    timeline = run("wearable_fall", owner=ActionOutcome.RESOLVED)
    assert emitted(timeline) == [(0, "call", OWNER)]
    assert timeline[-1].state is IncidentState.RESOLVED


def test_wearable_owner_asking_for_help_escalates_at_once() -> None:
    timeline = run("wearable_fall", owner=ActionOutcome.ESCALATE, backup_contact=ActionOutcome.ACKNOWLEDGE)
    assert [(t, k, d) for t, k, d in emitted(timeline) if k != "notify"] == [
        (0, "call", OWNER), (19, "call", BACKUP), (19, "sms", BACKUP), (41, "sms", OWNER)]
    assert timeline[-1].state is IncidentState.ACKNOWLEDGED
    assert [a.key for a in timeline[-1].actions] == ["sim/ack/0", "sim/ack/1"]


# -- what the model refuses -------------------------------------------------------------------------------

def _scenario(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "s", "trigger": {"event_types": ["smoke"]},
                            "steps": [{"action": "call", "to": "owner"}]}
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("changes", "loc", "message"),
    [
        ({"steps": [{"action": "sms", "to": "owner", "text": "at {address}"}]}, ("steps", 0, "sms", "text"),
         "unknown placeholder {address}: only {device}, {event}, {household}, {sender}, {time} may be used"),
        ({"steps": [{"action": "notify", "text": "{device!r}"}]}, ("steps", 0, "notify", "text"),
         "takes no format spec or conversion"),
        ({"steps": [{"action": "notify", "text": "50% {"}]}, ("steps", 0, "notify", "text"), "bad template"),
        ({"steps": [{"action": "call", "to": "owner", "with_next": True}]}, ("steps",),
         "step 0 (the last) has with_next, but no step follows it"),
        ({"steps": [{"action": "call", "to": "owner", "with_next": True}, {"action": "wait", "seconds": 5},
                    {"action": "call", "to": "owner"}]}, ("steps",), "a wait stands alone"),
        ({"steps": [{"action": "call", "to": "owner",
                     "ivr": {"prompt": "p", "digits": {"12": "acknowledge"}}}]},
         ("steps", 0, "call", "ivr", "digits", "12", "[key]"), "should match pattern"),
        ({"steps": [{"action": "call", "to": "owner", "ivr": {"prompt": "p", "digits": {"1": "hang_up"}}}]},
         ("steps", 0, "call", "ivr", "digits", "1"), "Input should be"),
        ({"steps": [{"action": "call", "to": "owner", "bridge": True,
                     "ivr": {"prompt": "p", "digits": {"1": "acknowledge"}}}]}, ("steps", 0, "call"),
         "either bridges to the device or runs an IVR check"),
        ({"steps": [{"action": "call", "to": "owner", "ring_s": "30"}]}, ("steps", 0, "call", "ring_s"),
         "valid integer"),
        ({"steps": [{"action": "call", "to": "owner", "ring_s": 300}]}, ("steps", 0, "call", "ring_s"),
         "less than or equal to 120"),
        ({"steps": [{"action": "call", "to": "neighbour"}]}, ("steps", 0, "call", "to", "str-enum[ContactRole]"),
         "Input should be 'owner', 'member', 'backup_contact' or 'security_service'"),
        ({"steps": [{"action": "dance"}]}, ("steps", 0), "does not match any of the expected tags"),
        ({"steps": []}, ("steps",), "at least 1 item"),
        ({"trigger": {"event_types": []}}, ("trigger",), "a device_event trigger needs at least one of event_types"),
        ({"trigger": {"kind": "call", "event_types": ["smoke"]}}, ("trigger",), "takes no event_types"),
        ({"trigger": {"kind": "call", "keywords": ["help"]}}, ("trigger",), "keywords belong to an sms trigger"),
        ({"conditions": [{"kind": "sender"}]}, ("conditions", 0, "sender"), "needs numbers or roles"),
        ({"conditions": [{"kind": "sender", "numbers": ["89161234567"]}]}, ("conditions", 0, "sender", "numbers", 0),
         "should match pattern"),
        ({"trigger": {"kind": "call"}, "steps": [{"action": "record_message", "prompt": "x"}]}, (),
         "has no device to record at or bridge to"),
        ({"trigger": {"event_types": ["smoke"], "rooms": ["kitchen"]}}, ("trigger", "rooms"), "Extra inputs"),
        ({"conditions": [{"kind": "time_window", "start": "07:00", "end": "07:00"}]},
         ("conditions", 0, "time_window"), "start != end"),
        ({"on_acknowledge": [{"action": "call", "to": "owner"}]}, ("on_acknowledge", 0), "does not match"),
        ({"on_acknowledge": [{"action": "notify", "text": "x", "with_next": True}]}, ("on_acknowledge",),
         "with_next means nothing here"),
    ],
)
def test_a_bad_scenario_is_refused_with_the_location(changes: dict[str, Any], loc: tuple[Any, ...],
                                                     message: str) -> None:
    with pytest.raises(ValidationError) as info:
        Scenario.model_validate(_scenario(**changes))
    errors = info.value.errors()
    assert any(tuple(e["loc"]) == loc and message in e["msg"] for e in errors), errors


def test_literal_braces_and_every_placeholder_are_accepted() -> None:
    sc = Scenario.model_validate(_scenario(steps=[{"action": "notify", "text": "{{ok}} {device} {event} "
                                                   "{household} {time}"}]))
    assert sc.steps[0].action == "notify"


def test_contact_roles_are_the_binding_roles() -> None:
    assert [r.value for r in ContactRole] == [r.value for r in BindingRole]
