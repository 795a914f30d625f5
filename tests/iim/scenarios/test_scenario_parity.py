"""Simulate = live: every shipped template, run by ``simulate`` and by the worker for the same inputs, does the same.

The live run is the worker end to end (real PostgreSQL, the FreeSWITCH emulator over real sockets, our outbound
IVR server); its action list is read from what the executors did, not from what the engine decided: the
originates the switch received and what each answered call heard (the applications its channel ran), the
bridges the switch made (and the keys that crossed them), the SMS in the outbox, the notifications (settled by
text here: the household has no connector). The simulated list comes from :func:`simulate` on the incident's
own facts, with the world scripted as the emulator's callees behave. Both must be equal, action for action.

Device events enter through the bridge's intake; ``device_health`` runs its first step, then the worker's clock is
moved a day on for the reminder; calls and SMS enter through the trigger intake (a deviceless incident), and
``simulate`` gets the same sender and text (``--sender``/``--text``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import pytest_asyncio

from fs_app.outreach.prompts import speakable
from fs_app.testing import TargetBehaviour
from iim.scenarios import registry as scenario_registry
from iim.scenarios import store
from iim.scenarios.engine import ActionOutcome, Notify, PlaceCall, RecordMessage, SendSms
from iim.scenarios.model import TriggerKind
from iim.scenarios.simulate import INCIDENT_ID, simulate
from iim.scenarios.templates import CALL_ANNOUNCE, SMS_KEYWORD, TEMPLATES
from iim.scenarios.triggers.facts import TriggerOffer, choose
from iim.scenarios.triggers.intake import TriggerIntake
from iim.supervision.watchdog import DeviceWatchdog, WatchdogSettings
from policy_cache import registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import (
    BindingCreate,
    BindingRole,
    DeviceCapability,
    DeviceCreate,
    DeviceStatus,
    DeviceType,
    DeviceUpdate,
    ScenarioCreate,
    SubscriberCreate,
)
from tests.iim.scenarios.test_scenario_worker import GW, Alarms, alarms_rig
from tests.iim.supervision.test_device_supervision import MovableClock
from tests.pg import opened

#: A call the simulated person picked up (heard its prompt).
_PICKED_UP = frozenset({ActionOutcome.ANSWERED, ActionOutcome.ACKNOWLEDGE, ActionOutcome.FALSE_ALARM,
                        ActionOutcome.ESCALATE, ActionOutcome.RESOLVED, ActionOutcome.NO_INPUT})


@dataclass(frozen=True)
class Case:
    """One run: a template, the event and device that trigger it, how the callees behave (emulator, by role:
    ``owner``, ``backup``, ``security``, ``door``) and the same world as a simulate script.

    A call or SMS trigger (``event`` "call" or "sms") has no device: ``sender`` is how the household's member
    appears on the call or SMS ("e164" or "national", ``8...``) and ``text`` what the SMS says."""

    template: str
    event: str
    device: str  # "sensor", "door", "band", or "" for a call or SMS
    callees: Mapping[str, TargetBehaviour]
    script: Mapping[str, ActionOutcome]
    ends: str
    door_dtmf_open: bool = False
    sender: str = "e164"
    text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


#: the visitor talks, then the door hangs up (the conversation is over)
_DOOR = TargetBehaviour.answer(after_ms=100, hangup_after_ms=500)
CASES = {
    "smoke_co-nobody-answers": Case("smoke_co", "smoke", "sensor", {}, {}, "exhausted"),
    "smoke_co-owner-confirms": Case("smoke_co", "smoke", "sensor",
                                    {"owner": TargetBehaviour.answer(after_ms=100, dtmf="1")},
                                    {"owner": ActionOutcome.ACKNOWLEDGE}, "acknowledged"),
    "doorphone-owner-answers": Case("doorphone", "doorbell", "door",
                                    {"owner": TargetBehaviour.answer(after_ms=100), "door": _DOOR},
                                    {"owner": ActionOutcome.ANSWERED}, "acknowledged"),
    "doorphone-owner-opens-by-key": Case("doorphone", "doorbell", "door",
                                         {"owner": TargetBehaviour.answer(after_ms=100, dtmf="5"), "door": _DOOR},
                                         {"owner": ActionOutcome.ANSWERED}, "acknowledged", door_dtmf_open=True),
    "doorphone-nobody-answers": Case("doorphone", "doorbell", "door", {"door": TargetBehaviour.answer(after_ms=100)},
                                     {}, "exhausted"),
    "wearable_fall-fine": Case("wearable_fall", "fall", "band",
                               {"owner": TargetBehaviour.answer(after_ms=100, dtmf="2")},
                               {"owner": ActionOutcome.RESOLVED}, "resolved"),
    "wearable_fall-help-backup-takes-it": Case(
        "wearable_fall", "fall", "band",
        {"owner": TargetBehaviour.answer(after_ms=100, dtmf="1"),
         "backup": TargetBehaviour.answer(after_ms=100, dtmf="1")},
        {"owner": ActionOutcome.ESCALATE, "backup_contact": ActionOutcome.ACKNOWLEDGE}, "acknowledged"),
    # device_health waits a day between its first word and the reminder: the worker's clock is moved on.
    "device_health-offline-and-a-reminder": Case("device_health", "offline", "sensor", {}, {}, "exhausted"),
    "device_health-battery-low-and-a-reminder": Case("device_health", "battery_low", "sensor", {}, {}, "exhausted"),
    "device_health-self-test-failed-and-a-reminder": Case("device_health", "self_test_failed", "sensor", {}, {},
                                                          "exhausted"),
    "call_announce-a-members-call-while-away": Case("call_announce", "call", "", {}, {}, "exhausted"),
    "call_announce-a-members-call-in-national-form": Case("call_announce", "call", "", {}, {}, "exhausted",
                                                          sender="national"),
    "sms_keyword-backup-takes-it": Case("sms_keyword", "sms", "", {"backup": TargetBehaviour.answer(after_ms=100,
                                                                                                     dtmf="1")},
                                        {"backup_contact": ActionOutcome.ACKNOWLEDGE}, "acknowledged",
                                        text="SOS, I fell"),
    "sms_keyword-national-sender-nobody-answers": Case("sms_keyword", "sms", "", {}, {}, "exhausted",
                                                       sender="national", text="help please"),
}


@pytest_asyncio.fixture
async def alarms(app_pool: Pool, pg_db: Any, tmp_path: Path) -> AsyncIterator[Alarms]:
    async with alarms_rig(app_pool, pg_db, tmp_path) as rig:
        yield rig


def _endpoint(destination: str) -> str:
    """How the rig dials a destination (phones through the gateway, devices as ``user/<aor>``)."""
    return GW.format(destination) if destination.startswith("+") else "user/" + destination.removeprefix("sip:")


def _said(arg: str | None) -> str | None:
    """The ``say:`` text an application played (plain in ``playback``, quoted in ``play_and_get_digits``)."""
    if arg is None:
        return None
    if arg.startswith("say:"):
        return arg[4:]
    found = re.search(r"'say:((?:[^'\\]|\\.)*)'", arg)
    return None if found is None else re.sub(r"\\(.)", r"\1", found.group(1))


def _prompt(text: str | None) -> str | None:
    return None if text is None else speakable(text)


async def _live(alarms: Alarms, incident: UUID) -> list[tuple[Any, ...]]:
    """What the executors did for ``incident``, keyed like the engine's actions (``sim/...``)."""
    rows = await alarms.rows("SELECT key, kind, destination FROM iim.incident_action WHERE incident_id = $1",
                             incident)
    sealed = await alarms.rows("SELECT tenant_id, key, msisdn, body, body_key FROM iim.sms_outbox "
                               "WHERE incident_id = $1", incident)
    # Bodies are sealed with the tenant's data key (migration 0028): read them as the sender does.
    outbox = [{"key": s["key"], "msisdn": s["msisdn"], "body": await opened(alarms.pool, s)} for s in sealed]
    emu = alarms.emu
    prefix = f"{incident}/"
    out: list[tuple[Any, ...]] = []
    for row in rows:
        key = INCIDENT_ID + "/" + row["key"].removeprefix(prefix)
        if row["kind"] in ("call", "record"):
            flat = row["key"].replace("/", "-")
            placed = [o for o in emu.originates if o.variables.get("iim_action_key") == flat]
            for o in placed:
                ran = emu.executions_on(o.uuid or "")
                heard = next((_said(e.arg) for e in ran if e.app in ("playback", "play_and_get_digits")), None)
                bridges = [(b.endpoint, "dtmf_type" in b.leg_vars, b.dtmf_passed, b.dtmf_filtered)
                           for b in emu.bridges if b.a_uuid == o.uuid]
                recorded = any(e.app == "record" for e in ran)
                out.append((key, row["kind"], o.endpoints[0], heard, bridges, recorded))
        elif row["kind"] == "sms":
            out += [(key, "sms", s["msisdn"], s["body"]) for s in outbox if s["key"] == row["key"]]
        else:  # settled by text to the household: each fallback SMS carries the notification's text
            texts = {s["body"] for s in outbox if s["key"].startswith(row["key"] + "/sms/")}
            out += [(key, "notify", text) for text in sorted(texts)]
    return sorted(out, key=lambda item: (item[0], str(item[2])))


def _simulated(alarms: Alarms, facts: Any, case: Case, keys_pressed: Mapping[str, str]) -> list[tuple[Any, ...]]:
    """The same list from :func:`simulate` on the incident's own facts and the case's script."""
    timeline = simulate(TEMPLATES[case.template], facts, facts.occurred_at, dict(case.script))
    outcomes = {a.key: o for entry in timeline for a, o in entry.outcomes}
    out: list[tuple[Any, ...]] = []
    for action in (a for entry in timeline for a in entry.actions):
        outcome = outcomes.get(action.key)
        if isinstance(action, PlaceCall):
            picked_up = outcome in _PICKED_UP
            bridges = []
            if picked_up and action.bridge_to is not None:
                pressed = keys_pressed.get(action.destination, "")
                bridges = [(_endpoint(action.bridge_to), action.bridge_dtmf,
                            pressed if action.bridge_dtmf else "", "" if action.bridge_dtmf else pressed)]
            out.append((action.key, "call", _endpoint(action.destination),
                        _prompt(action.prompt_text) if picked_up else None, bridges, False))
        elif isinstance(action, RecordMessage):
            made = outcome in (ActionOutcome.RECORDED, ActionOutcome.NO_INPUT)
            out.append((action.key, "record", _endpoint(action.destination),
                        _prompt(action.prompt_text) if made else None, [], made))
        elif isinstance(action, SendSms):
            out.append((action.key, "sms", action.msisdn, action.text))
        else:
            assert isinstance(action, Notify)
            out.append((action.key, "notify", action.text))
    return sorted(out, key=lambda item: (item[0], str(item[2])))


async def _band(alarms: Alarms) -> str:
    """A wearable in the rig's household (signed like its sensor)."""
    rig = alarms.rig
    band = f"band-{rig.sensor.removeprefix('smoke-')}"
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
        ref = await conn.fetchval("SELECT credential_ref_id FROM iim.device WHERE id = $1", rig.sensor_id)
        await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=rig.household_id, name="Wrist band", type=DeviceType.WEARABLE, external_id=band,
            credential_ref_id=ref, status=DeviceStatus.ONLINE), actor="test")
    return band


async def _door_opens_by_key(alarms: Alarms) -> None:
    rig = alarms.rig
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
        door = await conn.fetchval("SELECT id FROM iim.device WHERE external_id = $1", rig.doorphone)
        await registry.update(conn, registry.DEVICE, door, DeviceUpdate(
            capabilities=frozenset({DeviceCapability.SIP, DeviceCapability.DTMF_OPEN})), actor="test")


async def _member(alarms: Alarms) -> tuple[str, UUID]:
    """A child bound to the rig's household as a member, and the call and SMS templates in that household (the
    shipped ones are never a default for calls and SMS). Returns the child's number and the owner's id."""
    rig = alarms.rig
    child = rig.owner[:-3] + "004"
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=child, display_name="Masha"),
                                    actor="test")
        await registry.create(conn, registry.BINDING, BindingCreate(
            subscriber_id=sub.id, household_id=rig.household_id, role=BindingRole.MEMBER, priority=15), actor="test")
        for template in (CALL_ANNOUNCE, SMS_KEYWORD):
            await scenario_registry.create_scenario(conn, ScenarioCreate(
                household_id=rig.household_id, **template.model_dump(mode="json")), actor="test")
        owner_id = await conn.fetchval("SELECT id FROM iim.subscriber WHERE msisdn = $1", rig.owner)
    return child, owner_id


async def _triggered(alarms: Alarms, case: Case) -> UUID:
    """The call or SMS of ``case`` to the owner, through the trigger intake as the call and SMS paths hand it."""
    child, owner_id = await _member(alarms)
    sender = child if case.sender == "e164" else "8" + child.removeprefix("+7")
    kind = TriggerKind.CALL if case.event == "call" else TriggerKind.SMS
    offer = TriggerOffer(kind, alarms.rig.tenant_id, owner_id, sender, f"{case.event}:parity", datetime.now(UTC),
                         case.text)
    [result] = await TriggerIntake(alarms.pool).handle(offer)
    assert (result.result, result.scenario) == ("opened", case.template)
    assert result.incident_id is not None
    return result.incident_id


async def _found_silent(alarms: Alarms, clock: MovableClock) -> UUID:
    """The rig's sensor supervised (a minute's heartbeat), never heard: the watchdog, its clock moved past the
    interval and the grace, opens the offline incident (its first step is due at the worker's moved now)."""
    rig = alarms.rig
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
        await registry.update(conn, registry.DEVICE, rig.sensor_id, DeviceUpdate(heartbeat_interval_s=60),
                              actor="operator:test")
    watchdog = DeviceWatchdog(alarms.pool, WatchdogSettings(grace_s=30, clock=clock), opener=alarms.worker.begin_in)
    clock.offset = timedelta(seconds=95)
    found = await alarms.rows("SELECT id FROM iim.incident WHERE id = ANY($1::uuid[])", await watchdog.scan())
    [incident] = [r["id"] for r in found]
    await alarms.worker.tick(rig.tenant_id, incident, reason="deadline")
    return incident


async def _told_then_reminded(alarms: Alarms, clock: MovableClock, incident: UUID) -> str:
    """device_health: the first step done (the incident waits a day), then the worker's clock a day on."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        [row] = await alarms.rows("SELECT state::text AS state, step FROM iim.incident WHERE id = $1", incident)
        pending = await alarms.rows("SELECT key FROM iim.incident_action WHERE incident_id = $1 AND outcome IS NULL",
                                    incident)
        if row["state"] == "open" and row["step"] > 0 and not pending:
            break
        assert asyncio.get_running_loop().time() < deadline, f"the first step never ended: {row}, {pending}"
        await asyncio.sleep(0.05)
    clock.offset += timedelta(days=1, seconds=1)
    await alarms.worker.tick(alarms.rig.tenant_id, incident, reason="deadline")  # the wait is over: the reminder
    await alarms.worker.tick(alarms.rig.tenant_id, incident, reason="deadline")  # sent: nothing more to do
    return await alarms.settled(incident)


def test_every_shipped_template_has_a_parity_case() -> None:
    assert {case.template for case in CASES.values()} == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(CASES))
async def test_simulate_and_the_worker_do_the_same(alarms: Alarms, name: str) -> None:
    case = CASES[name]
    rig = alarms.rig
    numbers: Mapping[str, str] = {"owner": rig.owner, "backup": rig.backup, "security": rig.security}
    door_uri = await alarms.rows("SELECT sip_uri FROM iim.device WHERE external_id = $1", rig.doorphone)
    endpoints: dict[str, Callable[[], str]] = {
        **{role: (lambda n=n: GW.format(n)) for role, n in numbers.items()},
        "door": lambda: _endpoint(door_uri[0]["sip_uri"])}
    for role, behaviour in case.callees.items():
        alarms.emu.targets[endpoints[role]()] = behaviour
    if case.door_dtmf_open:
        await _door_opens_by_key(alarms)
    clock = MovableClock()
    alarms.worker.settings.clock = clock

    if case.event in ("call", "sms"):
        incident = await _triggered(alarms, case)
    elif case.event == "offline":  # IIM's own finding: no device posts it
        incident = await _found_silent(alarms, clock)
    else:
        device = {"sensor": rig.sensor, "door": rig.doorphone}.get(case.device) or await _band(alarms)
        incident = await alarms.raise_alarm(case.event, device=device)
    if case.template == "device_health":
        assert await _told_then_reminded(alarms, clock, incident) == case.ends
    else:
        assert await alarms.settled(incident) == case.ends

    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
        loaded = await store.load_incident(conn, incident)
    assert loaded is not None
    facts = loaded.facts
    if case.text is not None:  # the SMS text is never stored: simulate is given it as ``--text``
        facts = replace(facts, text=case.text)
    if facts.sender is not None:  # the sender as stored is E.164 under the tenant's plan, whatever its form
        assert facts.sender == rig.owner[:-3] + "004"
        assert choose([TEMPLATES[case.template]], facts, facts.occurred_at or datetime.now(UTC))[0] is not None
    pressed = {n: case.callees[role].dtmf for role, n in numbers.items() if role in case.callees}
    live = await _live(alarms, incident)
    assert live == _simulated(alarms, facts, case, pressed)
    assert live  # something was done


async def test_a_door_that_does_not_open_by_key_never_gets_the_answerers_keys(alarms: Alarms) -> None:
    rig = alarms.rig
    door = (await alarms.rows("SELECT sip_uri FROM iim.device WHERE external_id = $1", rig.doorphone))[0]["sip_uri"]
    alarms.emu.targets[GW.format(rig.owner)] = TargetBehaviour.answer(after_ms=100, dtmf="5")
    alarms.emu.targets[_endpoint(door)] = _DOOR
    incident = await alarms.raise_alarm("doorbell", device=rig.doorphone)
    assert await alarms.settled(incident) == "acknowledged"
    [bridge] = list(alarms.emu.bridges)
    assert (bridge.endpoint, bridge.dtmf_passed, bridge.dtmf_filtered) == (_endpoint(door), "", "5")
    assert "dtmf_type" not in bridge.leg_vars
    [line] = await alarms.rows("SELECT detail->>'detail' AS detail, detail->>'bridged_to' AS bridged_to "
                               "FROM iim.audit_log WHERE entity_id = $1 AND action = 'incident.call' "
                               "AND detail->>'outcome' = 'answered'", str(incident))
    assert line == {"detail": "bridged", "bridged_to": door}


async def test_an_owner_who_answers_while_the_door_is_offline_has_not_taken_the_visitor(alarms: Alarms) -> None:
    rig = alarms.rig
    door = (await alarms.rows("SELECT sip_uri FROM iim.device WHERE external_id = $1", rig.doorphone))[0]["sip_uri"]
    alarms.emu.targets[GW.format(rig.owner)] = TargetBehaviour.answer(after_ms=100)
    alarms.emu.targets[_endpoint(door)] = TargetBehaviour.not_registered()
    incident = await alarms.raise_alarm("doorbell", device=rig.doorphone)
    assert await alarms.settled(incident) == "exhausted"  # nobody took the visitor: the whole chain ran
    assert not alarms.emu.bridges
    rows = await alarms.rows("SELECT kind, destination, outcome, detail FROM iim.incident_action "
                             "WHERE incident_id = $1 ORDER BY key", incident)
    assert {"kind": "call", "destination": rig.owner, "outcome": "failed", "detail": "bridge_failed"} in rows
    assert [r["kind"] for r in rows if r["kind"] == "record"] == ["record"]  # the visitor was offered a message
