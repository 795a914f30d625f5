"""The escalation engine: selection, grouping, retries and pauses, judging outcomes, keys, and its CLI dry run."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iim import cli as iim_cli
from iim.scenarios.engine import (
    REARM_COOL_DOWN,
    TERMINAL,
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
    advance,
    begin,
    current_actions,
    deadline_for,
    groups,
    mismatches,
    on_cleared,
    on_repeat_event,
    ready_to_advance,
    rearm,
    select_scenario,
    settle,
)
from iim.scenarios.model import ContactRole, IvrOutcome, Scenario
from iim.scenarios.templates import TEMPLATES
from iot_bridge.event_types import EventType
from policy_cache.models import DeviceStatus, DeviceType, PresenceState

MSK = ZoneInfo("Europe/Moscow")
T0 = datetime(2026, 11, 25, 3, 0, tzinfo=MSK)
OWNER = Contact(ContactRole.OWNER, "+79000000001", "s-owner", 0, "Anna")
OWNER_2 = Contact(ContactRole.OWNER, "+79000000011", "s-owner-2", 5, "Boris")
BACKUP = Contact(ContactRole.BACKUP_CONTACT, "+79000000002", "s-backup", 10, None)
SECURITY = Contact(ContactRole.SECURITY_SERVICE, "+79000000003", "s-security", 20, "Guard")
IVR_CONFIRM = {"prompt": "Alarm {event} at {household}. Press 1 to confirm, 2 for a false alarm.",
               "digits": {"1": "acknowledge", "2": "false_alarm"}}


def facts(**changes: Any) -> IncidentFacts:
    base = IncidentFacts(
        event_type=EventType.SMOKE, device_type=DeviceType.SENSOR, device_id="dev-1", device_name="Kitchen sensor",
        device_status=DeviceStatus.ONLINE, device_sip_uri=None, household_name="Flat 12",
        presence=PresenceState.AWAY, time_zone="Europe/Moscow", contacts=(OWNER, BACKUP, SECURITY),
        home_targets=("sip:speaker@flat12.local",))
    return replace(base, **changes)


def scenario(steps: list[dict[str, Any]], **fields: Any) -> Scenario:
    data: dict[str, Any] = {"name": "test", "trigger": {"event_types": ["smoke"]}, "steps": steps}
    data.update(fields)
    return Scenario.model_validate(data)


def call(to: str, **extra: Any) -> dict[str, Any]:
    return {"action": "call", "to": to, **extra}


def sms(to: str, **extra: Any) -> dict[str, Any]:
    return {"action": "sms", "to": to, "text": "{event} at {household}", **extra}


def keys(adv: Advance) -> list[str]:
    return [a.key for a in adv.actions]


# -- selection ----------------------------------------------------------------------------------------------

def test_select_takes_the_first_enabled_matching_scenario_in_the_order_given() -> None:
    household_own = scenario([call("owner")], name="household")
    tenant_wide = scenario([call("backup_contact")], name="tenant")
    disabled = scenario([call("owner")], name="disabled", enabled=False)
    assert select_scenario([disabled, household_own, tenant_wide], facts(), T0) is household_own
    assert select_scenario([tenant_wide, household_own], facts(), T0) is tenant_wide
    assert select_scenario([disabled], facts(), T0) is None


def test_trigger_matches_event_and_device_type_and_empty_device_types_mean_any() -> None:
    any_device = scenario([call("owner")], trigger={"event_types": ["smoke", "co"]})
    wearables = scenario([call("owner")], trigger={"event_types": ["fall"], "device_types": ["wearable"]})
    assert not mismatches(any_device, facts(event_type=EventType.CO, device_type=DeviceType.HUB), T0)
    assert mismatches(any_device, facts(event_type=EventType.FALL), T0) == (
        "trigger: event fall is not one of smoke, co",)
    assert mismatches(wearables, facts(event_type=EventType.FALL), T0) == (
        "trigger: device type sensor is not one of wearable",)
    assert not mismatches(wearables, facts(event_type=EventType.FALL, device_type=DeviceType.WEARABLE), T0)


@pytest.mark.parametrize(
    ("utc_time", "inside"),
    [
        ("20:00", True),   # 23:00 in Moscow: the window starts (inclusive)
        ("21:30", True),   # 00:30 in Moscow, after midnight
        ("03:59", True),   # 06:59 in Moscow
        ("04:00", False),  # 07:00 in Moscow: the end is exclusive (in UTC it would still be inside)
        ("19:30", False),  # 22:30 in Moscow (in UTC terms it is not night either)
        ("12:00", False),
    ],
)
def test_time_window_wraps_midnight_in_the_households_zone(utc_time: str, inside: bool) -> None:
    night = scenario([call("owner")], conditions=[{"kind": "time_window", "start": "23:00", "end": "07:00"}])
    day = scenario([call("owner")], conditions=[{"kind": "time_window", "start": "23:00", "end": "07:00",
                                                  "negate": True}])
    hour, minute = map(int, utc_time.split(":"))
    now = datetime(2026, 11, 25, hour, minute, tzinfo=UTC)
    assert (select_scenario([night], facts(), now) is night) == inside
    assert (select_scenario([day], facts(), now) is day) == (not inside)


def test_time_window_follows_daylight_saving_time() -> None:
    evening = scenario([call("owner")], conditions=[{"kind": "time_window", "start": "22:00", "end": "06:00"}])
    new_york = facts(time_zone="America/New_York")
    # 02:30 UTC is 22:30 EDT in July (inside) but 21:30 EST in January (outside).
    assert not mismatches(evening, new_york, datetime(2026, 7, 1, 2, 30, tzinfo=UTC))
    assert mismatches(evening, new_york, datetime(2026, 1, 15, 2, 30, tzinfo=UTC)) == (
        "condition 0: local time 21:30 (America/New_York) is outside 22:00-06:00",)


def test_every_condition_must_hold() -> None:
    away_and_online = scenario([call("owner")], conditions=[
        {"kind": "presence", "states": ["away", "unknown"]},
        {"kind": "device_status", "statuses": ["online"]},
    ])
    assert not mismatches(away_and_online, facts(), T0)
    assert mismatches(away_and_online, facts(presence=PresenceState.HOME), T0) == (
        "condition 0: presence home is not one of away, unknown",)
    assert mismatches(away_and_online, facts(presence=PresenceState.HOME, device_status=DeviceStatus.OFFLINE),
                      T0) == ("condition 0: presence home is not one of away, unknown",
                              "condition 1: device status offline is not one of online")


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        select_scenario([scenario([call("owner")])], facts(), datetime(2026, 11, 25, 3, 0))  # noqa: DTZ001


# -- groups and actions -------------------------------------------------------------------------------------

def test_a_group_runs_at_once_with_deterministic_keys() -> None:
    sc = scenario([call("owner", with_next=True), sms("owner"), call("backup_contact")])
    assert groups(sc) == ((0, 2), (2, 3))
    first = begin("inc-1", sc, facts(), T0)
    assert first.progress == Progress(IncidentState.NOTIFYING, 0, 0)
    assert keys(first) == ["inc-1/0/0/0", "inc-1/0/0/1"]
    placed, texted = first.actions
    assert isinstance(placed, PlaceCall)
    assert isinstance(texted, SendSms)
    assert (placed.role, placed.destination, placed.step) == (ContactRole.OWNER, "+79000000001", 0)
    assert (texted.msisdn, texted.text) == ("+79000000001", "smoke at Flat 12")
    assert first.reason == "step 0: call owner +79000000001 and sms owner +79000000001"
    assert begin("inc-1", sc, facts(), T0) == first  # pure: same inputs, same decision


def test_a_role_with_several_contacts_is_called_all_at_once_by_priority() -> None:
    sc = scenario([call("owner")])
    adv = begin("i", sc, facts(contacts=(OWNER_2, BACKUP, OWNER)), T0)
    assert [(a.key, a.destination) for a in adv.actions if isinstance(a, PlaceCall)] == [
        ("i/0/0/0", "+79000000001"), ("i/0/0/1", "+79000000011")]


def test_a_role_without_contacts_is_skipped_with_a_note_in_the_same_call() -> None:
    sc = scenario([call("owner", with_next=True), sms("owner"), call("backup_contact")])
    adv = begin("i", sc, facts(contacts=(BACKUP,)), T0)
    assert adv.progress == Progress(IncidentState.NOTIFYING, 2, 0)
    assert keys(adv) == ["i/2/0/0"]
    assert adv.notes == ("step 0: call owner: no contact with that role, skipped",
                         "step 1: sms owner: no contact with that role, skipped",
                         "step 0: nothing to do in this group, moving on")


def test_a_scenario_that_reaches_nobody_is_exhausted_at_once() -> None:
    adv = begin("i", scenario([call("owner"), call("home")]), facts(contacts=(), home_targets=()), T0)
    assert adv.progress.state is IncidentState.EXHAUSTED
    assert (adv.actions, adv.deadline) == ((), None)
    assert "step 1: call home: no home device can ring, skipped" in adv.notes


def test_home_calls_ring_every_home_device_but_the_triggering_one() -> None:
    sc = scenario([call("home", bridge=True)])
    doorphone = "sip:door@flat12.local"
    adv = begin("i", sc, facts(device_sip_uri=doorphone,
                               home_targets=("sip:a@flat12.local", doorphone, "sip:b@flat12.local")), T0)
    assert [(a.role, a.destination, a.bridge_to) for a in adv.actions if isinstance(a, PlaceCall)] == [
        (None, "sip:a@flat12.local", doorphone), (None, "sip:b@flat12.local", doorphone)]


def test_recording_needs_the_devices_sip_uri() -> None:
    sc = scenario([{"action": "record_message", "prompt": "Leave a message at {household}", "max_s": 30},
                   call("owner")])
    skipped = begin("i", sc, facts(), T0)
    assert skipped.progress.step == 1
    assert skipped.notes[0] == "step 0: record_message: the device has no SIP URI, skipped"
    recorded = begin("i", sc, facts(device_sip_uri="sip:door@flat12.local"), T0)
    assert recorded.actions == (RecordMessage("i/0/0/0", 0, "sip:door@flat12.local", "Leave a message at Flat 12",
                                              30),)
    assert recorded.deadline == T0 + timedelta(seconds=5 + 3 + 30 + 15)


def test_texts_are_rendered_with_the_event_time_in_the_households_zone() -> None:
    sc = scenario([{"action": "notify", "text": "{event} by {device} at {household}, {time}"}])
    adv = begin("i", sc, facts(event_type=EventType.CO, occurred_at=datetime(2026, 11, 24, 23, 5, tzinfo=UTC)),
                T0)
    assert adv.actions == (Notify("i/0/0/0", 0, "carbon monoxide by Kitchen sensor at Flat 12, 02:05"),)
    assert adv.deadline == T0  # nothing to wait for


def test_call_deadline_covers_ringing_the_ivr_tries_and_slack() -> None:
    sc = scenario([call("owner", ring_s=40, ivr={**IVR_CONFIRM, "tries": 2, "digit_timeout_s": 7})])
    adv = begin("i", sc, facts(), T0)
    placed = adv.actions[0]
    assert isinstance(placed, PlaceCall)
    prompt_s = -(-len(placed.prompt_text or "") // 12)
    assert adv.deadline == T0 + timedelta(seconds=40 + 2 * (prompt_s + 7) + 15)
    assert deadline_for(adv.actions, T0) == adv.deadline


# -- judging outcomes ---------------------------------------------------------------------------------------

def test_nobody_reached_moves_to_the_next_group_and_past_the_last_is_exhausted() -> None:
    sc = scenario([call("owner", with_next=True), sms("owner"), call("backup_contact")])
    first = begin("i", sc, facts(), T0)
    second = advance("i", sc, facts(), first.progress, {"i/0/0/0": ActionOutcome.BUSY, "i/0/0/1": ActionOutcome.SENT},
                     T0 + timedelta(seconds=40))
    assert second.progress == Progress(IncidentState.NOTIFYING, 2, 0)
    assert keys(second) == ["i/2/0/0"]
    assert second.notes == ("step 0: nobody reached (owner +79000000001: busy)",)
    last = advance("i", sc, facts(), second.progress, {}, T0 + timedelta(minutes=2))
    assert last.progress.state is IncidentState.EXHAUSTED
    assert last.notes == ("step 2: nobody reached (backup_contact +79000000002: no result)",)
    assert last.deadline is None


def test_retry_pauses_without_actions_then_replaces_only_the_calls() -> None:
    sc = scenario([call("owner", retries=2, retry_delay_s=120, with_next=True), sms("owner"),
                   call("backup_contact")])
    f = facts()
    adv = begin("i", sc, f, T0)
    now = T0 + timedelta(seconds=45)
    pause = advance("i", sc, f, adv.progress, {"i/0/0/0": ActionOutcome.NO_ANSWER}, now)
    assert pause.progress == Progress(IncidentState.OPEN, 0, 1)
    assert pause.actions == ()
    assert pause.deadline == now + timedelta(seconds=120)
    assert pause.reason == "step 0: nobody reached; retry 1 of 2 in 120 s"
    # Outcomes reported during the pause change nothing; at the deadline the retry goes out.
    retry = advance("i", sc, f, pause.progress, {"i/0/0/0": ActionOutcome.ACKNOWLEDGE}, pause.deadline)
    assert retry.progress == Progress(IncidentState.NOTIFYING, 0, 1)
    assert keys(retry) == ["i/0/1/0"]
    assert all(isinstance(a, PlaceCall) for a in retry.actions)
    assert retry.reason == "step 0, retry 1 of 2: call owner +79000000001"
    pause2 = advance("i", sc, f, retry.progress, {"i/0/1/0": ActionOutcome.FAILED}, now + timedelta(minutes=3))
    assert pause2.progress == Progress(IncidentState.OPEN, 0, 2)
    retry2 = advance("i", sc, f, pause2.progress, {}, now + timedelta(minutes=5))
    assert keys(retry2) == ["i/0/2/0"]
    onwards = advance("i", sc, f, retry2.progress, {}, now + timedelta(minutes=7))
    assert onwards.progress == Progress(IncidentState.NOTIFYING, 2, 0)


def test_escalate_goes_to_the_next_group_now_without_retries() -> None:
    sc = scenario([call("owner", retries=3, ivr={"prompt": "Press 1 for help", "digits": {"1": "escalate"}}),
                   call("backup_contact")])
    adv = begin("i", sc, facts(), T0)
    nxt = advance("i", sc, facts(), adv.progress, {"i/0/0/0": ActionOutcome.ESCALATE}, T0 + timedelta(seconds=20))
    assert nxt.progress == Progress(IncidentState.NOTIFYING, 1, 0)
    assert nxt.notes == ("step 0: escalation asked (owner +79000000001: IVR escalate)",)


def test_a_plain_call_answered_acknowledges_and_runs_on_acknowledge() -> None:
    sc = scenario([call("owner"), call("backup_contact")], on_acknowledge=[
        {"action": "notify", "text": "confirmed at {household}"}, {"action": "sms", "to": "owner", "text": "ok"}])
    adv = begin("i", sc, facts(contacts=(OWNER, OWNER_2, BACKUP)), T0)
    done = advance("i", sc, facts(contacts=(OWNER, OWNER_2, BACKUP)), adv.progress,
                   {"i/0/0/1": ActionOutcome.ANSWERED}, T0 + timedelta(seconds=10))
    assert done.progress == Progress(IncidentState.ACKNOWLEDGED, 0, 0)
    assert done.deadline is None
    assert done.actions == (Notify("i/ack/0", 0, "confirmed at Flat 12"),
                            SendSms("i/ack/1", 0, ContactRole.OWNER, "+79000000001", "ok"),
                            SendSms("i/ack/2", 0, ContactRole.OWNER, "+79000000011", "ok"))
    assert done.reason.startswith("step 0: acknowledged (owner +79000000011: answered); notify the household")


@pytest.mark.parametrize("outcome", [ActionOutcome.ANSWERED, ActionOutcome.NO_INPUT, ActionOutcome.BUSY])
def test_an_ivr_call_without_a_valid_key_reached_nobody(outcome: ActionOutcome) -> None:
    sc = scenario([call("owner", ivr=IVR_CONFIRM), call("backup_contact")])
    adv = begin("i", sc, facts(), T0)
    nxt = advance("i", sc, facts(), adv.progress, {"i/0/0/0": outcome}, T0 + timedelta(minutes=2))
    assert nxt.progress == Progress(IncidentState.NOTIFYING, 1, 0)


@pytest.mark.parametrize(
    ("choices", "state"),
    [
        ({"acknowledge", "false_alarm"}, IncidentState.ACKNOWLEDGED),
        ({"resolved", "false_alarm"}, IncidentState.RESOLVED),
        ({"escalate", "resolved"}, IncidentState.NOTIFYING),  # asked for help: the next group
        ({"false_alarm"}, IncidentState.FALSE_ALARM),
    ],
)
def test_the_safer_decision_wins_within_a_group(choices: set[str], state: IncidentState) -> None:
    ivr = {"prompt": "Press", "digits": {"1": "acknowledge", "2": "false_alarm", "3": "escalate", "4": "resolved"}}
    sc = scenario([call("owner", ivr=ivr), call("backup_contact")])
    f = facts(contacts=(OWNER, OWNER_2, BACKUP))
    adv = begin("i", sc, f, T0)
    outcomes = {f"i/0/0/{n}": ActionOutcome(c) for n, c in enumerate(sorted(choices))}
    assert advance("i", sc, f, adv.progress, outcomes, T0 + timedelta(seconds=30)).progress.state is state


def test_only_the_current_groups_outcomes_count() -> None:
    sc = scenario([call("owner"), call("backup_contact"), call("security_service")])
    adv = begin("i", sc, facts(), T0)
    second = advance("i", sc, facts(), adv.progress, {}, T0 + timedelta(minutes=1))
    stale = {"i/0/0/0": ActionOutcome.ANSWERED, "other/1/0/0": ActionOutcome.ANSWERED,
             "i/1/1/0": ActionOutcome.ANSWERED}
    third = advance("i", sc, facts(), second.progress, stale, T0 + timedelta(minutes=2))
    assert third.progress == Progress(IncidentState.NOTIFYING, 2, 0)


def test_a_key_press_on_a_key_the_facts_no_longer_produce_still_decides() -> None:
    sc = scenario([call("owner", ivr=IVR_CONFIRM), call("backup_contact")])
    f = facts(contacts=(OWNER, OWNER_2))
    adv = begin("i", sc, f, T0)
    fewer = replace(f, contacts=(OWNER,))  # Boris was unbound while his phone rang; he pressed 2
    done = advance("i", sc, fewer, adv.progress, {"i/0/0/1": ActionOutcome.FALSE_ALARM}, T0 + timedelta(seconds=30))
    assert done.progress.state is IncidentState.FALSE_ALARM
    assert done.reason == "step 0: false_alarm (action i/0/0/1: false_alarm)"


def test_sms_notify_and_recording_outcomes_never_stop_the_escalation() -> None:
    sc = scenario([sms("owner", with_next=True), {"action": "notify", "text": "x", "with_next": True},
                   {"action": "record_message", "prompt": "speak"}, call("backup_contact")])
    f = facts(device_sip_uri="sip:door@flat12.local")
    adv = begin("i", sc, f, T0)
    outcomes = {k: ActionOutcome.DELIVERED for k in keys(adv)} | {"i/0/0/2": ActionOutcome.RECORDED}
    nxt = advance("i", sc, f, adv.progress, outcomes, T0 + timedelta(minutes=2))
    assert nxt.progress == Progress(IncidentState.NOTIFYING, 3, 0)
    assert nxt.notes == ()  # no call in the group: nobody was expected to answer


def test_a_wait_step_is_a_pause_before_the_next_group() -> None:
    sc = scenario([call("owner"), {"action": "wait", "seconds": 300}, call("backup_contact")])
    adv = begin("i", sc, facts(), T0)
    wait = advance("i", sc, facts(), adv.progress, {}, T0 + timedelta(minutes=1))
    assert wait.progress == Progress(IncidentState.OPEN, 2, 0)
    assert (wait.actions, wait.deadline, wait.reason) == ((), T0 + timedelta(minutes=6), "step 1: wait 300 s")
    nxt = advance("i", sc, facts(), wait.progress, {}, T0 + timedelta(minutes=6))
    assert keys(nxt) == ["i/2/0/0"]


def test_terminal_incidents_do_not_move() -> None:
    sc = scenario([call("owner")])
    for state in TERMINAL:
        adv = advance("i", sc, facts(), Progress(state, 0, 0), {"i/0/0/0": ActionOutcome.ANSWERED}, T0)
        assert (adv.progress, adv.actions, adv.deadline) == (Progress(state, 0, 0), (), None)


def test_advance_from_open_is_begin() -> None:
    sc = TEMPLATES["smoke_co"]
    assert advance("i", sc, facts(), Progress(IncidentState.OPEN, 0, 0), {}, T0) == begin("i", sc, facts(), T0)


def test_current_actions_regenerate_what_is_out() -> None:
    sc = TEMPLATES["smoke_co"]
    adv = begin("i", sc, facts(), T0)
    assert current_actions("i", sc, facts(), adv.progress, T0) == adv.actions
    assert current_actions("i", sc, facts(), Progress(IncidentState.OPEN, 0, 1), T0) == ()


def test_ready_to_advance_when_a_person_decided_or_every_call_ended() -> None:
    sc = scenario([call("owner", ivr=IVR_CONFIRM, with_next=True), sms("owner"), call("backup_contact")])
    f = facts(contacts=(OWNER, OWNER_2))
    adv = begin("i", sc, f, T0)
    p = adv.progress
    assert not ready_to_advance(p, adv.actions, {})
    assert not ready_to_advance(p, adv.actions, {"i/0/0/0": ActionOutcome.NO_ANSWER, "i/0/0/2": ActionOutcome.SENT})
    assert not ready_to_advance(p, adv.actions, {"i/0/0/0": ActionOutcome.NO_ANSWER,
                                                 "i/0/0/1": ActionOutcome.ANSWERED})  # IVR still running
    assert ready_to_advance(p, adv.actions, {"i/0/0/0": ActionOutcome.NO_ANSWER, "i/0/0/1": ActionOutcome.BUSY})
    assert ready_to_advance(p, adv.actions, {"i/0/0/1": ActionOutcome.FALSE_ALARM})
    assert not ready_to_advance(Progress(IncidentState.OPEN, 0, 1), (), {})
    texts = begin("i", scenario([sms("owner"), call("owner")]), f, T0)
    assert not ready_to_advance(texts.progress, texts.actions, {"i/0/0/0": ActionOutcome.SENT})  # deadline: now


# -- events on a live incident and outside decisions --------------------------------------------------------

def test_a_repeat_alarm_only_updates_the_incident() -> None:
    live = Progress(IncidentState.NOTIFYING, 2, 0)
    assert on_repeat_event(live, EventType.SMOKE) == (
        "repeat smoke event while the incident is notifying at step 2: incident updated, no new actions")
    assert "after the incident ended (false_alarm)" in on_repeat_event(Progress(IncidentState.FALSE_ALARM, 0, 0))


def test_cleared_resolves_a_live_incident_and_leaves_an_ended_one() -> None:
    assert on_cleared(Progress(IncidentState.NOTIFYING, 2, 1)) == Progress(IncidentState.RESOLVED, 2, 1)
    assert on_cleared(Progress(IncidentState.OPEN, 0, 1)) == Progress(IncidentState.RESOLVED, 0, 1)
    ended = Progress(IncidentState.ACKNOWLEDGED, 0, 0)
    assert on_cleared(ended) is ended


def test_settle_applies_an_outside_decision() -> None:
    sc = scenario([call("owner", retries=1), call("backup_contact")],
                  on_acknowledge=[{"action": "notify", "text": "ok"}])
    pause = Progress(IncidentState.OPEN, 0, 1)
    assert settle("i", sc, facts(), pause, IvrOutcome.FALSE_ALARM, T0).progress == Progress(
        IncidentState.FALSE_ALARM, 0, 1)
    acked = settle("i", sc, facts(), Progress(IncidentState.NOTIFYING, 0, 0), IvrOutcome.ACKNOWLEDGE, T0, by="app")
    assert (acked.progress.state, keys(acked)) == (IncidentState.ACKNOWLEDGED, ["i/ack/0"])
    assert keys(settle("i", sc, facts(), pause, IvrOutcome.ESCALATE, T0)) == ["i/1/0/0"]
    assert keys(settle("i", sc, facts(), Progress(IncidentState.OPEN, 0, 0), IvrOutcome.ESCALATE, T0)) == ["i/0/0/0"]
    done = Progress(IncidentState.RESOLVED, 0, 0)
    assert settle("i", sc, facts(), done, IvrOutcome.ACKNOWLEDGE, T0).progress is done


def test_facts_survive_a_json_round_trip() -> None:
    f = facts(device_sip_uri="sip:door@flat12.local", occurred_at=T0)
    assert IncidentFacts.from_json(json.loads(json.dumps(f.to_json()))) == f


# -- the property -------------------------------------------------------------------------------------------

_OUTCOMES = st.one_of(st.none(), st.sampled_from(list(ActionOutcome)))
_RETRYING = scenario([
    call("owner", ivr={"prompt": "p", "digits": {"1": "escalate", "2": "resolved", "3": "acknowledge"}},
         retries=2, with_next=True),
    sms("owner"),
    {"action": "wait", "seconds": 60},
    call("home", retries=1, with_next=True),
    {"action": "notify", "text": "n"},
    call("backup_contact", retries=3),
    call("security_service", ivr=IVR_CONFIRM),
], on_acknowledge=[{"action": "sms", "to": "owner", "text": "ack"}])
_SCENARIOS = [_RETRYING, *TEMPLATES.values()]
_CONTACTS = st.lists(st.sampled_from([OWNER, OWNER_2, BACKUP, SECURITY]), unique=True).map(tuple)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), which=st.integers(0, len(_SCENARIOS) - 1), contacts=_CONTACTS,
       home=st.booleans())
def test_any_outcome_script_ends_within_the_bound_and_never_repeats_a_key(
    data: st.DataObject, which: int, contacts: tuple[Contact, ...], home: bool,
) -> None:
    sc = _SCENARIOS[which]
    f = facts(contacts=contacts, home_targets=("sip:spk@flat12.local",) if home else (),
              device_sip_uri="sip:door@flat12.local")
    max_retries = max((getattr(s, "retries", 0) for s in sc.steps), default=0)
    bound = len(groups(sc)) * (max_retries + 1) * 2
    now = T0
    adv = begin("inc", sc, f, now)
    seen = [a.key for a in adv.actions]
    calls = 0
    while adv.progress.state not in TERMINAL:
        calls += 1
        assert calls <= bound, f"{sc.name}: still {adv.progress} after {bound} advance calls"
        assert adv.deadline is not None
        assert adv.deadline >= now
        outcomes: Mapping[str, ActionOutcome] = {
            a.key: o for a in adv.actions if (o := data.draw(_OUTCOMES, label=a.key)) is not None}
        now = data.draw(st.sampled_from([now, adv.deadline]), label="when")
        adv = advance("inc", sc, f, adv.progress, outcomes, now)
        seen.extend(a.key for a in adv.actions)
    assert len(seen) == len(set(seen))
    assert adv.deadline is None


# -- the CLI dry run ----------------------------------------------------------------------------------------

def test_cli_simulates_a_template_with_a_scripted_answer(capsys: pytest.CaptureFixture[str]) -> None:
    code = iim_cli.main(["scenario", "simulate", "--template", "smoke_co", "--event", "smoke", "--device-type",
                         "sensor", "--at", "2026-11-25T03:00:00+03:00", "--presence", "away",
                         "--answer", "owner=false_alarm"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == ("scenario smoke_co: smoke from sensor 'test sensor' at 2026-11-25T03:00:00+03:00 "
                        "(Europe/Moscow), presence away")
    assert lines[1].split() == ["+0:00:00", "03:00:00", "notifying", "step", "0:", "call", "owner", "+79000000001",
                                "(IVR)", "and", "sms", "owner", "+79000000001"]
    assert any(ln.split()[2:4] == ["false_alarm", "step"] for ln in lines)
    assert "<- call owner +79000000001: false_alarm" in out
    assert lines[-1] == "ended false_alarm after +0:00:21 (1 call(s), 1 SMS)"


def test_cli_simulate_json_from_a_file_says_when_the_scenario_would_not_apply(
    tmp_path: Any, capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "night.json"
    path.write_text(json.dumps({
        "name": "night", "trigger": {"event_types": ["water_leak"]},
        "conditions": [{"kind": "time_window", "start": "23:00", "end": "07:00"}],
        "steps": [call("owner", retries=1, retry_delay_s=30)]}))
    code = iim_cli.main(["scenario", "simulate", "--file", str(path), "--at", "2026-11-25T12:00", "--time-zone",
                         "Asia/Yekaterinburg", "-o", "json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["applies"] is False
    assert report["mismatches"] == ["condition 0: local time 12:00 (Asia/Yekaterinburg) is outside 23:00-07:00"]
    assert [(e["state"], e["offset_s"]) for e in report["timeline"]] == [
        ("notifying", 0), ("open", 30), ("notifying", 60), ("exhausted", 90)]
    assert [a["key"] for e in report["timeline"] for a in e["actions"]] == ["sim/0/0/0", "sim/0/1/0"]


def test_cli_simulate_refuses_bad_input(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "bad", "trigger": {"event_types": ["smoke"]},
                                "steps": [sms("owner", text="hi {name}")]}))
    assert iim_cli.main(["scenario", "simulate", "--file", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is not a valid scenario" in err
    assert "steps.0.sms.text: Value error, unknown placeholder {name}" in err
    assert iim_cli.main(["scenario", "simulate", "--template", "smoke_co", "--answer", "owner=maybe"]) == 2
    assert "'maybe' is not one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        iim_cli.main(["scenario", "simulate", "--template", "smoke_co", "--file", str(path)])


def test_cli_lists_and_shows_templates(capsys: pytest.CaptureFixture[str]) -> None:
    assert iim_cli.main(["scenario", "templates", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split() == ["NAME", "EVENTS", "DEVICES", "STEPS", "ON_ACKNOWLEDGE"]
    assert [ln.split()[0] for ln in listed[1:]] == list(TEMPLATES)
    assert iim_cli.main(["scenario", "templates", "show", "doorphone"]) == 0
    assert Scenario.model_validate_json(capsys.readouterr().out) == TEMPLATES["doorphone"]


# -- re-arming ---------------------------------------------------------------------------------------------

_ENDED = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)


def test_a_new_alarm_with_no_earlier_chain_starts_at_once() -> None:
    assert rearm(None, _ENDED) is None


def test_a_persistent_alarm_within_the_cool_down_after_an_exhausted_chain_is_held_until_it_ends() -> None:
    prior = PriorChain(IncidentState.EXHAUSTED, _ENDED, cleared_since=False)
    assert rearm(prior, _ENDED + timedelta(minutes=5)) == _ENDED + REARM_COOL_DOWN
    assert rearm(prior, _ENDED + timedelta(seconds=1), timedelta(minutes=10)) == _ENDED + timedelta(minutes=10)


def test_an_alarm_after_the_cool_down_starts_a_full_chain() -> None:
    prior = PriorChain(IncidentState.EXHAUSTED, _ENDED, cleared_since=False)
    assert rearm(prior, _ENDED + REARM_COOL_DOWN) is None


def test_an_alarm_after_the_device_reported_cleared_starts_a_full_chain() -> None:
    prior = PriorChain(IncidentState.EXHAUSTED, _ENDED, cleared_since=True)
    assert rearm(prior, _ENDED + timedelta(minutes=1)) is None


@pytest.mark.parametrize("state", [IncidentState.ACKNOWLEDGED, IncidentState.FALSE_ALARM, IncidentState.RESOLVED])
def test_a_chain_that_ended_with_a_person_or_a_clear_never_holds_the_next(state: IncidentState) -> None:
    assert rearm(PriorChain(state, _ENDED, cleared_since=False), _ENDED + timedelta(minutes=1)) is None
