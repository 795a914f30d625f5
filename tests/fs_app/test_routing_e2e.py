"""Subscriber calls through the outbound server, routed by policy from PostgreSQL via the cache,
placed by the FreeSWITCH emulator: every ring mode, quiet hours across a DST change, DND, a blocked
caller, an offline speaker, no-answer fallback, an unknown callee, and PostgreSQL going away."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from opentelemetry.trace import SpanKind

from fs_app.dialstring import DialSettings
from fs_app.esl import Execute, HangupCmd
from fs_app.outbound import OutboundServer, OutboundSettings
from fs_app.passthrough import make_passthrough_handler
from fs_app.router import PolicyRouter
from fs_app.testing import CallResult, CallSpec, FreeSwitchEmulator, TargetBehaviour
from fs_app.testing.media import write_silent_wav
from iim.call_audit import CallDecisionAudit
from policy_cache import audit, registry
from policy_cache.cache import PolicyCache
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import (
    BindingCreate,
    BindingRole,
    ConsentCreate,
    ConsentPurpose,
    DeviceCapability,
    DeviceCreate,
    DeviceStatus,
    DeviceType,
    HouseholdCreate,
    PolicyCreate,
    RingMode,
    SubscriberCreate,
    TenantCreate,
)
from policy_cache.store import PgPolicyStore
from tests.conftest import eventually
from tests.pg import PgDatabase
from tests.tcp_proxy import TcpFaultProxy
from tests.tracing_rig import Spans, is_child

NOON_BERLIN = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
_RIG_NUMBERS = itertools.count(1)
CALLER = "+4930111222"
CONFIRM_PROMPT_MS = 2000


@dataclass
class Line:
    msisdn: str
    speakers: list[str]


class Clock:
    def __init__(self) -> None:
        self.now = NOON_BERLIN

    def __call__(self) -> datetime:
        return self.now


async def _subscriber(pool: Pool, tenant: UUID, n: int, **policy: Any) -> Line:
    """A household with one owner and two SIP speakers (the second registered offline when asked)."""
    offline = policy.pop("offline_speaker", False)
    webrtc = policy.pop("webrtc_speaker", False)  # the first speaker speaks WebRTC only (a browser)
    msisdn = f"+49151{n:07d}"
    speakers = [f"spk{n}a@iim.local", f"spk{n}b@iim.local"]
    async with tenant_tx(pool, tenant) as tx:
        kw: dict[str, Any] = {"actor": "test"}
        home = await registry.create(
            tx, registry.HOUSEHOLD, HouseholdCreate(name=f"home {n}", time_zone="Europe/Berlin"),
            **kw)
        sub = await registry.create(tx, registry.SUBSCRIBER, SubscriberCreate(msisdn=msisdn), **kw)
        for i, aor in enumerate(speakers):
            await registry.create(tx, registry.DEVICE, DeviceCreate(
                household_id=home.id, name=f"speaker {aor}", type=DeviceType.SPEAKER,
                capabilities=frozenset({DeviceCapability.WEBRTC if webrtc and i == 0 else DeviceCapability.SIP}),
                sip_uri=f"sip:{aor}",
                status=DeviceStatus.OFFLINE if offline and i == 1 else DeviceStatus.ONLINE), **kw)
        await registry.create(tx, registry.BINDING, BindingCreate(subscriber_id=sub.id, household_id=home.id,
                                                                  role=BindingRole.OWNER), **kw)
        await registry.create(
            tx, registry.CONSENT,
            ConsentCreate(subscriber_id=sub.id, purpose=ConsentPurpose.ANNOUNCE_CALLS,
                          evidence={"channel": "test"}), **kw)
        await registry.create(tx, registry.POLICY, PolicyCreate(subscriber_id=sub.id, **policy), **kw)
    return Line(msisdn, speakers)


@pytest.fixture(scope="module")
def lines_spec() -> dict[str, dict[str, Any]]:
    quiet = {"quiet_start": time(23, 0), "quiet_end": time(7, 0)}
    return {
        "phone_only": {"ring_mode": RingMode.PHONE_ONLY},
        "home_only": {"ring_mode": RingMode.HOME_ONLY},
        "simultaneous": {"ring_mode": RingMode.SIMULTANEOUS, **quiet},
        "phone_then_home": {"ring_mode": RingMode.PHONE_THEN_HOME},
        "home_then_phone": {"ring_mode": RingMode.HOME_THEN_PHONE},
        "dnd": {"ring_mode": RingMode.SIMULTANEOUS, "dnd": True},
        "blocking": {"ring_mode": RingMode.SIMULTANEOUS, "blocked_callers": [CALLER]},
        "offline": {"ring_mode": RingMode.HOME_ONLY, "offline_speaker": True},
        "webrtc": {"ring_mode": RingMode.HOME_ONLY, "webrtc_speaker": True},
    }


@dataclass
class Rig:
    server: OutboundServer
    cache: PolicyCache
    proxy: TcpFaultProxy
    clock: Clock
    lines: dict[str, Line]
    tenant: UUID
    audit: CallDecisionAudit
    emu: FreeSwitchEmulator

    async def call(self, to: str, *, caller: str = CALLER, emu: FreeSwitchEmulator | None = None) -> CallResult:
        spec = CallSpec(destination=to.removeprefix("+"), caller_id_number=caller)
        return await (emu or self.emu).place_call("127.0.0.1", self.server.port, spec)


@pytest.fixture
async def rig(pg_db: PgDatabase, app_pool: Pool, lines_spec: dict[str, dict[str, Any]],
              tmp_path: Path) -> AsyncIterator[Rig]:
    tenant = uuid4()
    async with tenant_tx(app_pool, tenant) as tx:
        await registry.create(tx, registry.TENANT, TenantCreate(name="e2e"), actor="test")
    base = next(_RIG_NUMBERS) * 20  # numbers unique across the module's rigs (the cache indexes all tenants)
    lines = {name: await _subscriber(app_pool, tenant, base + i, **dict(spec))
             for i, (name, spec) in enumerate(lines_spec.items())}
    proxy = TcpFaultProxy(pg_db.cache_url)
    await proxy.start()
    store = PgPolicyStore(proxy.dsn(), connect_timeout=1.0)
    cache = PolicyCache(store, resync_interval=5.0)
    await cache.start(timeout=10)
    clock_ = Clock()
    call_audit = CallDecisionAudit(app_pool, interval=0.05)
    await call_audit.start()
    passthrough = make_passthrough_handler("sofia/gateway/ims/{destination}")
    # The confirmation a forked mobile hears: a file the switch can play (IIM serves it over HTTP in service).
    dial = DialSettings(confirm_prompt=str(write_silent_wav(tmp_path / "confirm-call.wav", CONFIRM_PROMPT_MS)))
    router = PolicyRouter(cache, passthrough, dial=dial, record_decision=call_audit.record,
                          record_answer=call_audit.record_answer, clock=clock_)
    server = OutboundServer(router, OutboundSettings(port=0, exit_wait=1.0),
                            fallback=passthrough)
    await server.start()
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.answer(after_ms=0, hangup_after_ms=0), time_scale=0.01)
    for line in lines.values():
        for aor in line.speakers:
            user, _, domain = aor.partition("@")
            emu.register_user(user, domain)
    yield Rig(server, cache, proxy, clock_, lines, tenant, call_audit, emu)
    await server.aclose(drain_timeout=2)
    await emu.close()
    await call_audit.aclose()
    await cache.aclose()
    await store.aclose()
    await proxy.close()


def _executes(result: CallResult) -> list[Execute]:
    return [c for c in result.commands if isinstance(c, Execute)]


def _bridge(result: CallResult) -> str:
    bridges = [c.arg or "" for c in _executes(result) if c.app == "bridge"]
    assert len(bridges) == 1, [c.app for c in _executes(result)]
    return bridges[0]


def _groups(dial: str) -> list[list[str]]:
    """Endpoints per sequential group (per-leg [..] variables dropped), sorted within a group."""
    body = re.sub(r"\[[^\]]*\]", "", dial.split("}", 1)[1])
    return [sorted(group.split(",")) for group in body.split("|")]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("phone_only", [["phone"]]),
        ("home_only", [["a", "b"]]),
        ("simultaneous", [["phone", "a", "b"]]),
        ("phone_then_home", [["phone"], ["a", "b"]]),
        ("home_then_phone", [["a", "b"], ["phone"]]),
    ],
)
async def test_each_ring_mode_reaches_freeswitch_as_the_right_dial_string(
    rig: Rig, line: str, expected: list[list[str]]
) -> None:
    target = rig.lines[line]
    names = {"phone": f"sofia/gateway/ims/{target.msisdn}", "a": f"user/{target.speakers[0]}",
             "b": f"user/{target.speakers[1]}"}
    result = await rig.call(target.msisdn)
    assert _groups(_bridge(result)) == [sorted(names[x] for x in group) for group in expected]
    assert result.bridged_to is not None
    assert result.error is None
    events = [s.split()[1] for s in result.sent if s.startswith("event ")]
    assert "CHANNEL_EXECUTE_COMPLETE" in events
    assert "CHANNEL_HANGUP_COMPLETE" in events
    # myevents alone, no server-side filter: the switch tests a filter on every channel event it fires
    assert {"CHANNEL_PARK", "CHANNEL_EXECUTE", "CHANNEL_STATE"} <= set(events)


@pytest.mark.parametrize(
    ("utc", "home_rings"),
    [
        (datetime(2026, 3, 29, 4, 59, tzinfo=UTC), False),  # 06:59 CEST, the first morning of summer time
        (datetime(2026, 3, 29, 5, 0, tzinfo=UTC), True),    # 07:00 CEST
        (datetime(2026, 10, 25, 5, 59, tzinfo=UTC), False),  # 06:59 CET, the first morning of winter time
        (datetime(2026, 10, 25, 6, 0, tzinfo=UTC), True),
    ],
)
async def test_quiet_hours_follow_the_household_clock_across_dst(rig: Rig, utc: datetime, home_rings: bool) -> None:
    rig.clock.now = utc
    target = rig.lines["simultaneous"]
    legs = [leg for group in _groups(_bridge(await rig.call(target.msisdn))) for leg in group]
    assert (f"user/{target.speakers[0]}" in legs) is home_rings
    assert f"sofia/gateway/ims/{target.msisdn}" in legs


async def _forked_call(rig: Rig, mobile: TargetBehaviour, speakers: TargetBehaviour) -> tuple[Line, CallResult]:
    target = rig.lines["simultaneous"]
    emu = FreeSwitchEmulator(default_target=speakers, time_scale=0.01, playback_ms=None)
    emu.targets[f"sofia/gateway/ims/{target.msisdn}"] = mobile
    for aor in target.speakers:
        emu.register_user(*aor.split("@"))
    try:
        return target, await rig.call(target.msisdn, emu=emu)
    finally:
        await emu.close()


async def test_a_forked_mobile_answering_late_in_its_ring_time_still_has_time_to_confirm(rig: Rig) -> None:
    # Answered 1 s before its 20 s leg_timeout, the key comes after the 2 s prompt: the leg's own leg_timeout
    # would hang it up first (FreeSWITCH ignores a per-leg group_confirm_cancel_timeout).
    target, result = await _forked_call(rig, TargetBehaviour.answer(after_ms=19_000, hangup_after_ms=0, dtmf="1"),
                                        TargetBehaviour.no_answer())
    assert result.bridged_to == f"sofia/gateway/ims/{target.msisdn}"


async def test_a_forked_mobile_that_answers_without_confirming_does_not_win(rig: Rig) -> None:
    # Carrier voicemail picks up at once and presses nothing: the speakers go on ringing and one answers.
    target, result = await _forked_call(rig, TargetBehaviour.answer(after_ms=0),
                                        TargetBehaviour.answer(after_ms=5_000, hangup_after_ms=0))
    assert result.bridged_to in {f"user/{aor}" for aor in target.speakers}


async def test_dnd_goes_to_voicemail_without_ringing(rig: Rig) -> None:
    result = await rig.call(rig.lines["dnd"].msisdn)
    apps = [c.app for c in _executes(result)]
    assert "bridge" not in apps
    assert apps[-2:] == ["playback", "record"]  # IIM's greeting, then the message (no mod_voicemail)
    assert "voicemail" not in apps


async def test_blocked_caller_is_rejected(rig: Rig) -> None:
    result = await rig.call(rig.lines["blocking"].msisdn)
    hangups = [c for c in result.commands if isinstance(c, HangupCmd)]
    assert [h.cause for h in hangups] == ["CALL_REJECTED"]
    assert not any(c.app == "bridge" for c in _executes(result))


async def test_offline_speaker_is_left_out_and_a_registration_brings_it_back(rig: Rig) -> None:
    target = rig.lines["offline"]
    assert _groups(_bridge(await rig.call(target.msisdn))) == [[f"user/{target.speakers[0]}"]]
    rig.cache.set_device_online(target.speakers[1], True)
    assert _groups(_bridge(await rig.call(target.msisdn))) == [
        sorted([f"user/{target.speakers[0]}", f"user/{target.speakers[1]}"])]


async def test_nobody_answers_then_voicemail_then_hangup(rig: Rig) -> None:
    silent = FreeSwitchEmulator(default_target=TargetBehaviour.no_answer(), time_scale=0.001)
    try:
        result = await rig.call(rig.lines["phone_then_home"].msisdn, emu=silent)
    finally:
        await silent.close()
    executes = _executes(result)
    apps = [c.app for c in executes]
    assert apps[-2:] == ["playback", "record"]
    assert "bridge" in apps
    assert "voicemail" not in apps
    assert executes[-2].arg.endswith("/v1/prompts/leave-message.wav")
    assert result.bridged_to is None


async def test_unknown_callee_is_bridged_to_the_dialled_number(rig: Rig) -> None:
    result = await rig.call("+4900000000000")
    assert _bridge(result) == "{ignore_early_media=true}sofia/gateway/ims/4900000000000"


async def test_each_routed_call_leaves_one_audit_row_with_the_policy_version(rig: Rig, app_pool: Pool) -> None:
    result = await rig.call(rig.lines["phone_only"].msisdn)
    await rig.audit.flush()
    async with tenant_tx(app_pool, rig.tenant) as tx:
        rows = await tx.fetch("SELECT detail, correlation FROM iim.audit_log WHERE action = 'call.routed' "
                              "AND correlation->>'call_id' = $1", result.uuid)
        assert await audit.verify_chain(tx, rig.tenant) is None
    assert len(rows) == 1
    assert rows[0]["detail"]["policy_version"] >= 1
    assert rows[0]["detail"]["groups"] == [[f"phone:{rig.lines['phone_only'].msisdn}"]]


async def _answered(rig: Rig, app_pool: Pool, call_id: str) -> list[dict[str, Any]]:
    """The call's ``call.answered`` rows, once the router has written them (after the bridge's completion, which
    may come after the emulator's caller saw the call end)."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        await rig.audit.flush()
        async with tenant_tx(app_pool, rig.tenant) as tx:
            rows = await tx.fetch("SELECT detail FROM iim.audit_log WHERE action = 'call.answered' "
                                  "AND correlation->>'call_id' = $1", call_id)
        if rows or asyncio.get_running_loop().time() > deadline:
            return [dict(row["detail"]) for row in rows]
        await asyncio.sleep(0.05)


async def test_a_webrtc_only_speaker_is_offered_webrtc_media_and_the_device_that_answers_is_audited(
        rig: Rig, app_pool: Pool) -> None:
    line = rig.lines["webrtc"]
    result = await rig.call(line.msisdn)
    legs = {aor: variables for variables, aor in re.findall(r"\[([^\]]*)\]user/([^,|]+)", _bridge(result))}
    assert "media_webrtc=true" in legs[line.speakers[0]].split(",")
    assert "media_webrtc=true" not in legs[line.speakers[1]].split(",")
    async with tenant_tx(app_pool, rig.tenant) as tx:
        ids = {row["id"] for row in await tx.fetch(
            "SELECT id::text AS id FROM iim.device WHERE sip_uri = ANY($1::text[])",
            [f"sip:{aor}" for aor in line.speakers])}
    answered = await _answered(rig, app_pool, result.uuid)
    assert [row["leg"] for row in answered] == ["speaker"]
    assert answered[0]["device_id"] in ids


async def test_a_call_the_mobile_takes_before_the_home_rings_is_audited_as_answered_by_the_phone(
        rig: Rig, app_pool: Pool) -> None:
    result = await rig.call(rig.lines["phone_then_home"].msisdn)
    assert [(row["leg"], row["device_id"]) for row in await _answered(rig, app_pool, result.uuid)] == [
        ("phone", None)]


async def test_postgresql_unreachable_calls_still_route_from_the_cache(rig: Rig) -> None:
    rig.proxy.cut()
    await eventually(lambda: not rig.cache.status().listener_up)
    target = rig.lines["home_then_phone"]
    result = await rig.call(target.msisdn)
    assert _groups(_bridge(result))[1] == [f"sofia/gateway/ims/{target.msisdn}"]
    assert rig.cache.health()["status"] == "degraded"
    rig.proxy.restore()
    await eventually(lambda: rig.cache.status().listener_up, timeout=15)


async def test_postgresql_stopped_mid_run_keeps_routing_and_resyncs_after_restart(tmp_path: Path) -> None:
    """A PostgreSQL of its own, really stopped and started again (not a proxy cut)."""
    from policy_cache.bootstrap import bootstrap, start_embedded
    from policy_cache.db import DbRole, connect_pool

    db = await bootstrap(data_dir=tmp_path / "pg", secrets_file=tmp_path / "secrets.json", demo=True)
    assert db.embedded is not None
    assert db.demo is not None
    store = PgPolicyStore(db.cache_url, connect_timeout=1.0)
    cache = PolicyCache(store, resync_interval=1.0, reconnect_max=1.0)
    await cache.start(timeout=20)
    passthrough = make_passthrough_handler("sofia/gateway/ims/{destination}")
    server = OutboundServer(PolicyRouter(cache, passthrough, clock=lambda: datetime(2026, 6, 1, 9, 0, tzinfo=UTC)),
                            OutboundSettings(port=0, exit_wait=1.0), fallback=passthrough)
    await server.start()
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.answer(after_ms=0, hangup_after_ms=0))
    emu.register_user("speaker-1", "iim.local")
    spec = CallSpec(destination="79001234567", caller_id_number="79160000000")
    try:
        await db.embedded.aclose()
        await eventually(lambda: not cache.status().listener_up, timeout=30)
        for _ in range(3):
            result = await emu.place_call("127.0.0.1", server.port, spec)
            assert _groups(_bridge(result)) == [["sofia/gateway/ims/+79001234567", "user/speaker-1@iim.local"]]
        await asyncio.to_thread(start_embedded, tmp_path / "pg")
        pool = await connect_pool(db.app_url, role=DbRole.APP, min_size=1, max_size=1)
        try:
            async with tenant_tx(pool, db.demo.tenant_id) as tx:
                await registry.set_device_status(tx, db.demo.sip_speaker_id, DeviceStatus.OFFLINE, actor="test")
        finally:
            await pool.close()
        await eventually(lambda: cache.status().listener_up, timeout=30)
        def speaker_offline() -> bool:
            snapshot = cache.lookup("+79001234567")
            assert snapshot is not None
            return not next(d for d in snapshot.speakers if d.endpoint == "speaker-1@iim.local").online

        await eventually(speaker_offline, timeout=30)
        result = await emu.place_call("127.0.0.1", server.port, spec)
        assert _groups(_bridge(result)) == [["sofia/gateway/ims/+79001234567"]]
    finally:
        await server.aclose(drain_timeout=2)
        await emu.close()
        await cache.aclose()
        await store.aclose()
        await db.embedded.aclose()


async def test_an_inbound_call_is_one_span_tree_call_decision_bridge_with_ids_and_no_numbers(
        rig: Rig, spans: Spans) -> None:
    target = rig.lines["home_only"]
    result = await rig.call(target.msisdn)
    assert result.bridged_to is not None
    await eventually(lambda: bool(spans.named("call.inbound")))
    call = spans.one("call.inbound")
    assert call.kind is SpanKind.SERVER
    assert call.parent is None
    assert (call.attributes or {})["iim.tenant"] == str(rig.tenant)
    call_id = (call.attributes or {})["iim.call_id"]
    assert isinstance(call_id, str)
    assert call_id
    decide, bridge = spans.one("call.decide"), spans.one("call.bridge")
    assert is_child(decide, call)
    assert is_child(bridge, call)
    assert (decide.attributes or {})["iim.route"] == "policy"
    assert (decide.attributes or {})["iim.action"] == "ring"
    assert (decide.attributes or {})["iim.legs"] == 2
    assert (bridge.attributes or {})["iim.answered"] is True
    assert not spans.named("call.fallback")
    for span in spans.all():
        for value in (span.attributes or {}).values():
            assert target.msisdn.lstrip("+") not in str(value), span.name
            assert CALLER.lstrip("+") not in str(value), span.name


async def test_a_dnd_call_traces_its_fallback_and_an_unknown_callee_its_route(rig: Rig, spans: Spans) -> None:
    await rig.call(rig.lines["dnd"].msisdn)
    await eventually(lambda: bool(spans.named("call.inbound")))
    fallback = spans.one("call.fallback")
    assert is_child(fallback, spans.one("call.inbound"))
    assert (fallback.attributes or {})["iim.fallback"] == "voicemail"
    assert not spans.named("call.bridge")
    spans.exporter.clear()
    await rig.call("+19999999999")
    await eventually(lambda: bool(spans.named("call.inbound")))
    assert (spans.one("call.decide").attributes or {})["iim.route"] == "unknown_callee"
    assert "iim.tenant" not in (spans.one("call.inbound").attributes or {})
