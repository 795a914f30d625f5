"""Scenarios started by an incoming call or SMS: the pure choice, the durable intake, the call and SMS paths.

The engine and selection run as pure functions; the intake and the worker against real PostgreSQL; the call
through the FreeSWITCH emulator into our outbound server and :class:`PolicyRouter`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from fs_app.outbound import OutboundServer, OutboundSettings
from fs_app.passthrough import make_passthrough_handler
from fs_app.router import PolicyRouter
from fs_app.routing import CallFacts
from fs_app.testing import CallSpec, FreeSwitchEmulator, TargetBehaviour
from iim import cli as iim_cli
from iim.core.metrics import REGISTRY
from iim.keys.keyring import Keyring
from iim.scenarios import registry as scenario_registry
from iim.scenarios import store
from iim.scenarios.engine import Notify, SendSms, mismatches, select_scenario
from iim.scenarios.model import CommsEvent, Scenario, TriggerKind
from iim.scenarios.simulate import simulate, synthetic_facts
from iim.scenarios.templates import CALL_ANNOUNCE, SMOKE_CO, SMS_KEYWORD, TEMPLATES
from iim.scenarios.triggers.facts import TriggerOffer, choose, comms_facts
from iim.scenarios.triggers.intake import TriggerIntake
from iim.scenarios.worker import IncidentWorker, WorkerSettings
from iim.sms.outbox import SmsSender
from iim.sms.smpp import SmppSettings, SmppTransport
from iim.sms.smsc_sim import SmscProcess
from iot_bridge.events import DeviceEvent, body_fingerprint
from iot_bridge.intake import KnownDevice, accept_event
from policy_cache import audit, presence_store, registry
from policy_cache.cache import PolicyCache
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from policy_cache.models import (
    BindingCreate,
    BindingRole,
    PresenceState,
    ScenarioCreate,
    SubscriberCreate,
)
from policy_cache.snapshot import RoutingSnapshot
from policy_cache.store import PgPolicyStore
from tests.alarm_rig import AlarmRig, build_rig
from tests.conftest import eventually
from tests.pg import TEST_MASTER_KEY, opened
from tests.tcp_proxy import TcpFaultProxy

AT = datetime(2026, 12, 6, 15, 0, tzinfo=UTC)
_numbers = itertools.count(300)


# -- the pure side ---------------------------------------------------------------------------------------

def _call(sender: str, presence: PresenceState = PresenceState.AWAY, **kw: Any) -> Any:
    facts = synthetic_facts(CALL_ANNOUNCE, presence=presence, occurred_at=AT, **kw)
    return comms_facts(TriggerKind.CALL, sender=sender, household_name="Flat 12", time_zone="Europe/Moscow",
                       presence=presence, contacts=facts.contacts, home_targets=facts.home_targets, at=AT)


def test_a_members_call_while_away_starts_call_announce_naming_the_caller() -> None:
    facts = _call("+79000000004")
    assert mismatches(CALL_ANNOUNCE, facts, AT) == ()
    first = simulate(CALL_ANNOUNCE, facts, AT, {})[0]
    [notify] = first.actions
    assert isinstance(notify, Notify)
    assert notify.text == "Member is calling Flat 12 (18:00)."


def test_call_announce_waits_for_an_away_household_and_a_member() -> None:
    assert mismatches(CALL_ANNOUNCE, _call("+79000000004", PresenceState.HOME), AT) == (
        "condition 1: presence home is not one of away",)
    [why] = mismatches(CALL_ANNOUNCE, _call("+79000000009"), AT)
    assert why == "condition 0: sender +79000000009 is none of a member"


def test_a_sender_condition_matches_numbers_and_can_be_negated() -> None:
    base = CALL_ANNOUNCE.model_dump(mode="json")
    only = Scenario.model_validate({**base, "conditions": [{"kind": "sender", "numbers": ["+79000000009"]}]})
    anyone_else = Scenario.model_validate({**base, "conditions": [
        {"kind": "sender", "numbers": ["+79000000009"], "negate": True}]})
    assert mismatches(only, _call("+79000000009"), AT) == ()
    assert mismatches(anyone_else, _call("+79000000009"), AT) != ()
    assert mismatches(anyone_else, _call("+79000000008"), AT) == ()


def test_a_call_never_starts_a_device_scenario_nor_a_device_event_a_call_scenario() -> None:
    call = _call("+79000000004")
    assert select_scenario(list(TEMPLATES.values()), synthetic_facts(SMOKE_CO, occurred_at=AT), AT) == SMOKE_CO
    assert mismatches(SMOKE_CO, call, AT) == ("trigger: a call does not start a device_event scenario",)
    device = synthetic_facts(SMOKE_CO, occurred_at=AT)
    assert "trigger: a device_event does not start a call scenario" in mismatches(CALL_ANNOUNCE, device, AT)
    sender_only = Scenario.model_validate({**SMOKE_CO.model_dump(mode="json"), "conditions": [
        {"kind": "sender", "roles": ["owner"]}]})
    assert mismatches(sender_only, device, AT) == ("condition 0: a device_event has no sender",)


@pytest.mark.parametrize(("text", "keyword"), [
    ("HELP please", "help"), ("sos!", "sos"), ("Помогите, пожалуйста", "помогите"), ("a helper came", None),
    ("all good", None)])
def test_an_sms_keyword_matches_whole_words_in_any_case(text: str, keyword: str | None) -> None:
    facts = comms_facts(TriggerKind.SMS, sender="+79000000001", household_name="Flat 12", time_zone="UTC",
                        presence=PresenceState.HOME, contacts=synthetic_facts(SMOKE_CO).contacts, home_targets=(),
                        at=AT, text=text)
    scenario, matched = choose([SMS_KEYWORD], facts, AT)
    assert matched == keyword
    assert (scenario is SMS_KEYWORD) == (keyword is not None)


def test_the_sms_text_is_never_part_of_the_stored_facts() -> None:
    facts = comms_facts(TriggerKind.SMS, sender="+79000000001", household_name="Flat 12", time_zone="UTC",
                        presence=PresenceState.HOME, contacts=(), home_targets=(), at=AT, text="sos secret")
    stored = facts.to_json()
    assert "sos secret" not in json.dumps(stored)
    assert stored["event_type"] == CommsEvent.INCOMING_SMS
    assert type(facts).from_json(stored).sender == "+79000000001"


def test_simulate_runs_sms_keyword_through_the_same_engine() -> None:
    timeline = simulate(SMS_KEYWORD, synthetic_facts(SMS_KEYWORD, occurred_at=AT), AT, {"backup_contact": "acknowledge"})
    kinds = [type(a).__name__ for a in timeline[0].actions]
    assert kinds == ["Notify", "SendSms"]
    assert any(isinstance(a, SendSms) and "Owner asked Test home for help" in a.text for a in timeline[0].actions)
    assert timeline[-1].state == "acknowledged"


# -- against PostgreSQL ------------------------------------------------------------------------------------

@dataclass
class Home:
    rig: AlarmRig
    pool: Pool
    child: str
    child_id: UUID
    owner_id: UUID

    async def rows(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        await audit.flush_pending(self.pool)
        async with tenant_tx(self.pool, self.rig.tenant_id) as conn:
            return [dict(r) for r in await conn.fetch(sql, *args)]

    def offer(self, sender: str, ref: str, kind: TriggerKind = TriggerKind.CALL, text: str | None = None,
              to: UUID | None = None) -> TriggerOffer:
        return TriggerOffer(kind, self.rig.tenant_id, to or self.owner_id, sender, ref, AT, text)


@pytest.fixture
async def home(app_pool: Pool, tmp_path: Path) -> Home:
    """The alarm rig's household (registry presence away), a child bound as member, both call templates in it."""
    n = next(_numbers)
    rig = await build_rig(app_pool, tmp_path, owner=f"+7904{n:04d}001", backup=f"+7904{n:04d}002",
                          security=f"+7904{n:04d}003")
    child = f"+7904{n:04d}004"
    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=child, display_name="Masha"),
                                    actor="test")
        await registry.create(conn, registry.BINDING, BindingCreate(
            subscriber_id=sub.id, household_id=rig.household_id, role=BindingRole.MEMBER, priority=15), actor="test")
        for template in (CALL_ANNOUNCE, SMS_KEYWORD):
            data = template.model_dump(mode="json")
            await scenario_registry.create_scenario(conn, ScenarioCreate(household_id=rig.household_id, **data),
                                                    actor="test")
        owner_id = await conn.fetchval("SELECT id FROM iim.subscriber WHERE msisdn = $1", rig.owner)
    return Home(rig, app_pool, child, sub.id, owner_id)


async def test_a_childs_call_opens_a_deviceless_incident_that_the_worker_announces(home: Home, app_pool: Pool,
                                                                                    pg_db: Any) -> None:
    intake = TriggerIntake(app_pool)
    national = "8" + home.child.removeprefix("+7")  # the switch's caller id, read under the tenant's plan
    [result] = await intake.handle(home.offer(national, "call:c1"))
    assert (result.result, result.scenario) == ("opened", "call_announce")
    [row] = await home.rows("SELECT device_id, hazard, sender, state::text AS state, scenario->>'name' AS name "
                            "FROM iim.incident WHERE id = $1", result.incident_id)
    assert row == {"device_id": None, "hazard": "incoming_call", "sender": home.child, "state": "open",
                   "name": "call_announce"}
    worker = IncidentWorker(app_pool, pg_db.app_url, None, WorkerSettings(heartbeat_timeout=timedelta(seconds=2)),
                            keyring=Keyring(app_pool, TEST_MASTER_KEY))
    async with worker:
        async def ended() -> bool:
            [r] = await home.rows("SELECT state::text AS state FROM iim.incident WHERE id = $1", result.incident_id)
            return r["state"] not in ("open", "notifying")
        deadline = asyncio.get_running_loop().time() + 20
        while not await ended():
            assert asyncio.get_running_loop().time() < deadline, "the triggered incident never ran"
            await asyncio.sleep(0.1)
    # No connector in this home: the announcement reaches the owner and the member by text.
    sealed = await home.rows("SELECT tenant_id, key, msisdn, body, body_key FROM iim.sms_outbox WHERE incident_id = $1 "
                             "ORDER BY msisdn", result.incident_id)
    sms = [{"msisdn": r["msisdn"], "body": await opened(app_pool, r)} for r in sealed]  # bodies are sealed (0028)
    assert [r["msisdn"] for r in sms] == sorted((home.rig.owner, home.child))
    assert all(r["body"].startswith("Masha is calling Flat 12 (") for r in sms)  # {sender}: the contact's name
    lines = await home.rows("SELECT actor, action, detail FROM iim.audit_log WHERE entity = 'incident' "
                            "AND entity_id = $1 ORDER BY id", str(result.incident_id))
    assert (lines[0]["actor"], lines[0]["action"]) == ("scenario-trigger", "incident.triggered")
    assert lines[0]["detail"]["sender"] == home.child
    assert lines[0]["detail"]["presence"] == "away"
    assert "incident.notify" in [r["action"] for r in lines]


async def test_the_same_call_twice_is_one_incident_and_a_second_call_joins_the_live_one(home: Home,
                                                                                       app_pool: Pool) -> None:
    intake = TriggerIntake(app_pool)
    [first] = await intake.handle(home.offer(home.child, "call:a"))
    [again] = await intake.handle(home.offer(home.child, "call:a"))
    [second] = await intake.handle(home.offer(home.child, "call:b"))
    assert (first.result, again.result, second.result) == ("opened", "replayed", "joined")
    assert second.incident_id == first.incident_id
    [row] = await home.rows("SELECT count(*) AS n, max(event_count) AS events FROM iim.incident "
                            "WHERE device_id IS NULL")
    assert row == {"n": 1, "events": 2}


async def test_a_stranger_or_a_withheld_number_starts_nothing(home: Home, app_pool: Pool) -> None:
    intake = TriggerIntake(app_pool)
    [stranger] = await intake.handle(home.offer("+79169999999", "call:s"))
    [withheld] = await intake.handle(home.offer("anonymous", "call:w"))
    assert (stranger.result, withheld.result) == ("no_scenario", "no_sender")
    assert await home.rows("SELECT id FROM iim.incident WHERE device_id IS NULL") == []


async def test_the_trigger_reads_live_presence_not_the_registry_column(home: Home, app_pool: Pool) -> None:
    """The registry says away; the operator's app says someone is home: no announcement."""
    async with tenant_tx(app_pool, home.rig.tenant_id) as conn:
        await presence_store.put_claim(conn, home.rig.household_id, source="app", subject="owner-phone",
                                       state="home", ttl_s=600, actor="test")
    [result] = await TriggerIntake(app_pool).handle(home.offer(home.child, "call:p"))
    assert result.result == "no_scenario"


async def test_a_device_incident_sees_the_resolved_presence(home: Home, app_pool: Pool) -> None:
    async with tenant_tx(app_pool, home.rig.tenant_id) as conn:
        await presence_store.put_claim(conn, home.rig.household_id, source="app", subject="owner-phone",
                                       state="home", ttl_s=600, actor="test")
    raw = home.rig.event("smoke")
    event = DeviceEvent.model_validate(json.loads(raw))
    device = KnownDevice(home.rig.tenant_id, home.rig.sensor_id, home.rig.household_id, home.rig.sensor, "sensor")
    outcome = await accept_event(app_pool, device, event, fingerprint=body_fingerprint(raw), channel="device",
                                 msg_id=None)
    assert outcome.incident_id is not None
    async with tenant_tx(app_pool, home.rig.tenant_id) as conn:
        incident = await store.load_incident(conn, outcome.incident_id)
    assert incident is not None
    assert incident.facts.presence is PresenceState.HOME  # the registry column says away


async def test_an_sms_with_a_keyword_from_the_household_opens_sms_keyword(home: Home, app_pool: Pool) -> None:
    intake = TriggerIntake(app_pool)
    [plain] = await intake.handle(home.offer(home.child, "sms:1", TriggerKind.SMS, "see you at 6"))
    [help_] = await intake.handle(home.offer(home.child, "sms:2", TriggerKind.SMS, "SOS, I fell"))
    assert (plain.result, help_.result, help_.scenario) == ("no_scenario", "opened", "sms_keyword")
    [line] = await home.rows("SELECT detail FROM iim.audit_log WHERE action = 'incident.triggered'")
    assert line["detail"]["keyword"] == "sos"
    assert "fell" not in json.dumps(await home.rows("SELECT * FROM iim.incident"), default=str)


async def test_a_full_queue_drops_the_offer_at_once_instead_of_waiting(app_pool: Pool) -> None:
    intake = TriggerIntake(app_pool, capacity=1, consumers=1)
    offer = TriggerOffer(TriggerKind.CALL, UUID(int=1), UUID(int=2), "+79000000001", "call:x", AT)
    assert intake.offer(offer) is False  # not started: nothing is queued
    async with intake:
        results = [intake.offer(offer) for _ in range(50)]
    assert results[0] is True
    assert False in results


# -- PostgreSQL away: the offer is kept and tried again, until it is too old -----------------------------------

def _counted(result: str, kind: str = "call") -> float:
    return REGISTRY.get_sample_value("iim_scenario_triggers_total", {"kind": kind, "result": result}) or 0.0


@pytest.fixture
async def cut_off(pg_db: Any) -> AsyncIterator[tuple[TcpFaultProxy, Pool]]:
    """A pool whose path to PostgreSQL the test cuts and restores."""
    proxy = TcpFaultProxy(pg_db.app_url)
    await proxy.start()
    pool = await connect_pool(proxy.dsn(), role=DbRole.APP, min_size=1, max_size=2, command_timeout=2.0,
                              acquire_timeout=2.0)
    try:
        yield proxy, pool
    finally:
        await pool.close()
        await proxy.close()


async def test_an_offer_the_store_did_not_take_is_tried_again_and_opens_one_incident_once_it_is_back(
        home: Home, cut_off: tuple[TcpFaultProxy, Pool]) -> None:
    proxy, pool = cut_off
    retried = _counted("retried")
    proxy.cut()
    async with TriggerIntake(pool, timeout_s=1.0, retry_initial_s=0.1, retry_max_s=0.3) as intake:
        assert intake.offer(TriggerOffer(TriggerKind.CALL, home.rig.tenant_id, home.owner_id, home.child,
                                         "call:kept", datetime.now(UTC)))
        await eventually(lambda: _counted("retried") >= retried + 3, timeout=10)
        proxy.restore()
        await asyncio.wait_for(intake.drain(), 15)
    [row] = await home.rows("SELECT first_event_id, sender FROM iim.incident WHERE device_id IS NULL")
    assert row == {"first_event_id": "call:kept", "sender": home.child}


async def test_an_offer_past_its_maximum_age_is_dropped_counted_and_logged(
        home: Home, cut_off: tuple[TcpFaultProxy, Pool], caplog: pytest.LogCaptureFixture) -> None:
    proxy, pool = cut_off
    expired = _counted("expired")
    proxy.cut()
    async with TriggerIntake(pool, timeout_s=1.0, max_age_s=1.0, retry_initial_s=0.2, retry_max_s=0.2) as intake:
        intake.offer(TriggerOffer(TriggerKind.CALL, home.rig.tenant_id, home.owner_id, home.child, "call:late",
                                  datetime.now(UTC)))
        await asyncio.wait_for(intake.drain(), 10)  # given up on, not held forever
        proxy.restore()
        # An offer already that old when its turn comes (a call long over) never reaches the store.
        intake.offer(TriggerOffer(TriggerKind.CALL, home.rig.tenant_id, home.owner_id, home.child, "call:stale",
                                  datetime.now(UTC) - timedelta(hours=1)))
        await asyncio.wait_for(intake.drain(), 10)
    assert _counted("expired") == expired + 2
    assert "past its maximum age of 1 s" in caplog.text
    assert await home.rows("SELECT id FROM iim.incident WHERE device_id IS NULL") == []


async def test_stopping_while_an_offer_waits_to_be_tried_again_does_not_hang_and_counts_it_dropped(
        home: Home, cut_off: tuple[TcpFaultProxy, Pool]) -> None:
    proxy, pool = cut_off
    dropped, retried = _counted("dropped"), _counted("retried")
    proxy.cut()
    intake = TriggerIntake(pool, timeout_s=1.0, consumers=1, retry_initial_s=30.0, retry_max_s=30.0)
    await intake.start()
    for ref in ("call:held", "call:queued"):
        intake.offer(TriggerOffer(TriggerKind.CALL, home.rig.tenant_id, home.owner_id, home.child, ref,
                                  datetime.now(UTC)))
    await eventually(lambda: _counted("retried") > retried, timeout=10)
    await asyncio.wait_for(intake.aclose(), 5)
    assert _counted("dropped") == dropped + 2  # the one waiting for its retry and the one behind it


def test_the_intake_refuses_a_retry_schedule_that_cannot_work(app_pool: Pool) -> None:
    with pytest.raises(ValueError, match="retry_max_s"):
        TriggerIntake(app_pool, retry_initial_s=5.0, retry_max_s=1.0)
    with pytest.raises(ValueError, match="max_age_s"):
        TriggerIntake(app_pool, max_age_s=0)


# -- the call path -------------------------------------------------------------------------------------------

@pytest.fixture
async def switch(pg_db: Any) -> AsyncIterator[tuple[PolicyCache, FreeSwitchEmulator]]:
    cache_store = PgPolicyStore(pg_db.cache_url, connect_timeout=2.0)
    cache = PolicyCache(cache_store, resync_interval=5.0)
    await cache.start(timeout=10)
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.answer(after_ms=0, hangup_after_ms=0), time_scale=0.01)
    yield cache, emu
    await emu.close()
    await cache.aclose()
    await cache_store.aclose()


async def _serve(router: PolicyRouter) -> OutboundServer:
    passthrough = make_passthrough_handler("sofia/gateway/ims/{destination}")
    server = OutboundServer(router, OutboundSettings(port=0, exit_wait=1.0),
                            fallback=passthrough)
    await server.start()
    return server


async def test_a_call_through_the_switch_is_routed_and_starts_its_scenario(
        home: Home, app_pool: Pool, switch: tuple[PolicyCache, FreeSwitchEmulator]) -> None:
    cache, emu = switch
    await eventually(lambda: cache.lookup(home.rig.owner) is not None, timeout=10)
    passthrough = make_passthrough_handler("sofia/gateway/ims/{destination}")
    async with TriggerIntake(app_pool) as intake:
        server = await _serve(PolicyRouter(cache, passthrough, on_inbound=intake.on_call))
        try:
            result = await emu.place_call("127.0.0.1", server.port, CallSpec(
                destination=home.rig.owner.removeprefix("+"), caller_id_number="8" + home.child.removeprefix("+7")))
            assert result.bridged_to is not None  # the call went on as routing decided
            await asyncio.wait_for(intake.drain(), 10)
        finally:
            await server.aclose(drain_timeout=2)
    [row] = await home.rows("SELECT sender, first_event_id FROM iim.incident WHERE device_id IS NULL")
    assert row == {"sender": home.child, "first_event_id": f"call:{result.uuid}"}


async def test_an_observer_that_raises_never_breaks_routing(
        home: Home, switch: tuple[PolicyCache, FreeSwitchEmulator]) -> None:
    cache, emu = switch
    await eventually(lambda: cache.lookup(home.rig.owner) is not None, timeout=10)
    seen: list[str] = []

    def broken(snapshot: RoutingSnapshot, facts: CallFacts) -> None:
        seen.append(facts.caller or "")
        raise RuntimeError("observer bug")

    passthrough = make_passthrough_handler("sofia/gateway/ims/{destination}")
    server = await _serve(PolicyRouter(cache, passthrough, on_inbound=broken))
    try:
        result = await emu.place_call("127.0.0.1", server.port, CallSpec(
            destination=home.rig.owner.removeprefix("+"), caller_id_number=home.child.removeprefix("+")))
    finally:
        await server.aclose(drain_timeout=2)
    assert result.bridged_to is not None
    assert seen == [home.child]


# -- the SMS path --------------------------------------------------------------------------------------------

#: How an SMSC may present the child's number: E.164 digits marked international (TON 1), and the national form
#: ``8904...`` marked national (TON 2) or of unknown type (TON 0), which the transport alone would take for +8904...
_SMPP_SOURCES = {"international": (lambda n: n[1:], 1), "national-ton-national": (lambda n: "8" + n[2:], 2),
                 "national-ton-unknown": (lambda n: "8" + n[2:], 0)}


@pytest.mark.parametrize("form", sorted(_SMPP_SOURCES))
async def test_an_sms_through_the_smpp_simulator_starts_sms_keyword(home: Home, app_pool: Pool, tmp_path: Path,
                                                                     form: str) -> None:
    written, ton = _SMPP_SOURCES[form]
    smsc = SmscProcess(tmp_path / "smsc.jsonl")
    await smsc.start()
    transport = SmppTransport(SmppSettings("127.0.0.1", smsc.port, "iim", "secret", response_timeout=3.0,
                                           reconnect_min=0.05, reconnect_max=0.4))
    try:
        async with TriggerIntake(app_pool) as intake:
            sender = SmsSender(app_pool, transport, poll_interval=0.05, on_mo=intake.on_mo,
                               keyring=Keyring(app_pool, TEST_MASTER_KEY))
            await sender.start()
            try:
                await transport.wait_bound()
                assert await smsc.deliver(destination=home.rig.owner[1:], source=written(home.child),
                                          source_ton=ton, text="Mum, SOS: call me") == 0

                async def opened() -> bool:
                    return bool(await home.rows("SELECT id FROM iim.incident WHERE hazard = 'incoming_sms'"))
                deadline = asyncio.get_running_loop().time() + 15
                while not await opened():
                    assert asyncio.get_running_loop().time() < deadline, "the SMS started no scenario"
                    await asyncio.sleep(0.05)
            finally:
                await sender.aclose()
    finally:
        await smsc.aclose()
    [row] = await home.rows("SELECT sender, scenario->>'name' AS name, starts_with(first_event_id, 'sms:') AS ref "
                            "FROM iim.incident WHERE hazard = 'incoming_sms'")
    assert row == {"sender": home.child, "name": "sms_keyword", "ref": True}


async def test_an_sms_sender_the_plan_cannot_read_falls_back_to_the_transports_reading(home: Home,
                                                                                       app_pool: Pool) -> None:
    """A foreign number without its ``+`` (unknown TON): not a Russian number, so the SMSC's E.164 reading holds."""
    offer = TriggerOffer(TriggerKind.SMS, home.rig.tenant_id, home.owner_id, "447911123456", "sms:f", AT, "sos",
                         sender_guess="+447911123456")
    [result] = await TriggerIntake(app_pool).handle(offer)
    assert result.result == "no_scenario"  # a stranger, but a sender: not "no_sender"
    [national] = await TriggerIntake(app_pool).handle(TriggerOffer(
        TriggerKind.SMS, home.rig.tenant_id, home.owner_id, "8" + home.child[2:], "sms:n", AT, "sos",
        sender_guess="+8" + home.child[2:]))
    assert (national.result, national.scenario) == ("opened", "sms_keyword")  # the plan's reading wins


# -- iim scenario simulate -----------------------------------------------------------------------------------

def test_cli_simulates_a_call_trigger_for_a_sender_and_says_why_a_stranger_would_not_start_it(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert iim_cli.main(["scenario", "simulate", "--template", "call_announce", "--presence", "away",
                         "--sender", "89000000004", "--at", "2026-12-06T18:00:00+03:00", "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["applies"] is True
    assert report["facts"]["sender"] == "+79000000004"
    assert report["timeline"][0]["actions"][0]["text"] == "Member is calling Test home (18:00)."
    assert iim_cli.main(["scenario", "simulate", "--template", "sms_keyword", "--sender", "+79160000000",
                         "--text", "sos", "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mismatches"] == ["condition 0: sender +79160000000 is none of a owner, a member"]
    assert iim_cli.main(["scenario", "simulate", "--template", "call_announce", "--sender", "12ab"]) == 2
    assert "--sender '12ab'" in capsys.readouterr().err
