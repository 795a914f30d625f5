"""Cloud-mode incoming calls end to end: policy from PostgreSQL through the cache, the router on the
outbound socket, the FreeSWITCH emulator placing the call, and a vendor cloud over HTTP answering the
"Call from ..., answer?" prompt with accept, decline, slowly, or not at all."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest

from fs_app.call import Call
from fs_app.dialstring import DialSettings
from fs_app.esl import Execute
from fs_app.outbound import OutboundServer, OutboundSettings
from fs_app.passthrough import make_passthrough_handler
from fs_app.router import PolicyRouter
from fs_app.routing import Announcement, CallFacts, RoutingDecision
from fs_app.testing import CallResult, CallSpec, FreeSwitchEmulator, TargetBehaviour
from iim.home.cloud_call import CloudAnnouncer, cloud_call_step
from iim.home.outbox_sink import OutboxSmsSink
from iim.keys.keyring import Keyring
from policy_cache.cache import PolicyCache
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import FallbackAction, RingMode
from policy_cache.store import PgPolicyStore
from tests.home_delivery_rig import (
    Connectors,
    Home,
    HttpConnector,
    VendorCloud,
    build_home,
    create_tenant,
)
from tests.pg import PgDatabase, opened

CALLER = "+4930111222"
NOON = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
_NUMBERS = itertools.count(1)
TIMEOUT_S = 0.3


@dataclass
class Rig:
    pool: Pool
    tenant: UUID
    homes: dict[str, Home]
    cloud: VendorCloud
    server: OutboundServer
    emu: FreeSwitchEmulator
    outcomes: list[str] = field(default_factory=list)

    async def call(self, home: str, **spec: Any) -> CallResult:
        to = self.homes[home].msisdn
        return await self.emu.place_call("127.0.0.1", self.server.port, CallSpec(
            destination=to.removeprefix("+"), caller_id_number=CALLER, **spec))

    def ref(self, home: str) -> str:
        return f"spk-{self.homes[home].msisdn[-7:]}"

    async def outbox(self) -> list[dict[str, Any]]:
        async with tenant_tx(self.pool, self.tenant) as conn:
            rows = await conn.fetch("SELECT tenant_id, key, msisdn, body, body_key FROM iim.sms_outbox ORDER BY key")
            return [dict(r) | {"body": await opened(conn, r)} for r in rows]


@pytest.fixture
async def rig(pg_db: PgDatabase, app_pool: Pool, keyring: Keyring) -> AsyncIterator[Rig]:
    tenant = await create_tenant(app_pool, "cloud-calls")
    base = next(_NUMBERS) * 10
    homes = {}
    for i, (name, fallback) in enumerate([("main", FallbackAction.MISSED_CALL_SMS),
                                          ("record", FallbackAction.RECORD_MESSAGE),
                                          ("mixed", FallbackAction.MISSED_CALL_SMS)]):
        homes[name] = await build_home(app_pool, tenant, f"+49152{base + i:07d}", announce_speaker=True,
                                       announce_consent=True, ring_mode=RingMode.HOME_ONLY, fallback=fallback,
                                       sip_speaker=name == "mixed")
    cloud = VendorCloud()
    await cloud.start()
    connector = HttpConnector(cloud.url)
    await connector.setup()
    store = PgPolicyStore(pg_db.cache_url, connect_timeout=2.0)
    cache = PolicyCache(store, resync_interval=5.0)
    await cache.start(timeout=10)
    dial = DialSettings()
    announcer = CloudAnnouncer(Connectors(webhook=connector), timeout_s=TIMEOUT_S, grace_s=0.2)
    step = cloud_call_step(announcer, replace(dial, recordings_dir="/tmp/iim-test-rec"), OutboxSmsSink(app_pool, keyring))
    outcomes: list[str] = []

    async def recording_step(call: Call, decision: RoutingDecision) -> str:
        outcome = await step(call, decision)
        outcomes.append(outcome)
        return outcome

    passthrough = make_passthrough_handler("sofia/gateway/ims/{destination}")
    router = PolicyRouter(cache, passthrough, dial=dial, clock=lambda: NOON, announce=recording_step)
    server = OutboundServer(router, OutboundSettings(port=0, exit_wait=1.0),
                            fallback=passthrough)
    await server.start()
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.answer(after_ms=0, hangup_after_ms=0), time_scale=0.01)
    yield Rig(app_pool, tenant, homes, cloud, server, emu, outcomes)
    await server.aclose(drain_timeout=2)
    await emu.close()
    await cache.aclose()
    await store.aclose()
    await connector.unload()
    await cloud.stop()


def apps(result: CallResult) -> list[str]:
    return [c.app for c in result.commands if isinstance(c, Execute)]


def bridges(result: CallResult) -> list[str]:
    return [c.arg or "" for c in result.commands if isinstance(c, Execute) and c.app == "bridge"]


async def test_accept_on_the_speaker_connects_the_owners_phone(rig: Rig) -> None:
    rig.cloud.behaviour[rig.ref("main")] = "accept"
    result = await rig.call("main")
    msisdn = rig.homes["main"].msisdn
    [action] = rig.cloud.paths("/action")
    assert action["target"] == rig.ref("main")
    assert action["prompt"] == f"Call from {CALLER}, answer?"
    assert action["options"] == ["accept", "decline"]
    assert action["call_id"] == result.uuid
    assert apps(result)[0] == "ring_ready"  # the caller hears ringback while the home is asked
    [dial] = bridges(result)
    assert dial.endswith(f"sofia/gateway/ims/{msisdn}")
    assert "group_confirm_key" not in dial
    assert result.bridged_to == f"sofia/gateway/ims/{msisdn}"
    assert rig.outcomes == ["accept:phone"]
    assert await rig.outbox() == []


async def test_accept_with_a_media_path_bridges_to_the_speaker(rig: Rig) -> None:
    rig.cloud.behaviour[rig.ref("main")] = "media:kitchen-webrtc@iim.local"
    rig.emu.register_user("kitchen-webrtc", "iim.local")
    result = await rig.call("main")
    [dial] = bridges(result)
    assert "user/kitchen-webrtc@iim.local" in dial
    assert f"iim_device_id={rig.homes['main'].devices['speaker']}" in dial
    assert result.bridged_to == "user/kitchen-webrtc@iim.local"
    assert rig.outcomes == ["accept:speaker"]


async def test_decline_sends_the_missed_call_sms_without_ringing(rig: Rig) -> None:
    rig.cloud.behaviour[rig.ref("main")] = "decline"
    result = await rig.call("main")
    assert bridges(result) == []
    assert result.bridged_to is None
    assert rig.outcomes == ["decline:missed_call_sms:sms"]
    [sms] = await rig.outbox()
    assert sms["key"] == f"missed-call:{result.uuid}"
    assert sms["msisdn"] == rig.homes["main"].msisdn
    assert CALLER.removeprefix("+") in sms["body"]
    assert "hangup" in [type(c).__name__.lower().removesuffix("cmd") for c in result.commands]


@pytest.mark.parametrize("how", ["slow", "none"])
async def test_timeout_runs_the_fallback(rig: Rig, how: str) -> None:
    rig.cloud.behaviour[rig.ref("main")] = how
    result = await rig.call("main")
    assert bridges(result) == []
    assert rig.outcomes == ["timeout:missed_call_sms:sms"]
    assert [s["key"] for s in await rig.outbox()] == [f"missed-call:{result.uuid}"]


async def test_timeout_with_record_message_fallback_records(rig: Rig) -> None:
    rig.cloud.behaviour[rig.ref("record")] = "none"
    result = await rig.call("record")
    assert apps(result)[-3:] == ["answer", "playback", "record"]
    assert rig.outcomes == ["timeout:record_message:sms"]


async def test_connector_down_falls_back_to_the_phone_then_the_fallback(rig: Rig) -> None:
    rig.cloud.behaviour[rig.ref("main")] = "down"
    msisdn = rig.homes["main"].msisdn
    rig.emu.targets[f"sofia/gateway/ims/{msisdn}"] = TargetBehaviour.no_answer()
    result = await rig.call("main")
    [dial] = bridges(result)
    assert dial.endswith(f"sofia/gateway/ims/{msisdn}")
    assert result.bridged_to is None
    assert rig.outcomes == ["unavailable:phone_no_answer:missed_call_sms:sms"]
    assert len(await rig.outbox()) == 1


async def test_vendor_cloud_gone_the_phone_still_rings_and_answers(rig: Rig) -> None:
    await rig.cloud.stop()
    result = await rig.call("main")
    assert result.bridged_to == f"sofia/gateway/ims/{rig.homes['main'].msisdn}"
    assert rig.outcomes == ["unavailable:phone"]
    assert await rig.outbox() == []


async def test_caller_hanging_up_cancels_the_announcement(rig: Rig) -> None:
    rig.cloud.behaviour[rig.ref("main")] = "slow"
    result = await rig.call("main", caller_hangup_after_ms=5000)  # 50 ms at time_scale 0.01
    assert bridges(result) == []
    assert rig.outcomes == ["caller_hung_up"]
    assert await rig.outbox() == []


async def test_a_home_with_a_sip_speaker_forks_as_before_without_announcing(rig: Rig) -> None:
    home = rig.homes["mixed"]
    rig.emu.register_user(f"sip-{home.msisdn[-7:]}", "iim.local")
    result = await rig.call("mixed")
    [dial] = bridges(result)
    assert dial.endswith(f"user/sip-{home.msisdn[-7:]}@iim.local")
    assert rig.cloud.received == []
    assert rig.outcomes == []


class _Lookup:
    def __init__(self, connector: HttpConnector) -> None:
        self.connector = connector

    def get(self, name: str) -> HttpConnector:
        if name != "webhook":
            raise KeyError(name)
        return self.connector


async def test_first_accept_of_several_speakers_wins(rig: Rig) -> None:
    connector = HttpConnector(rig.cloud.url)
    await connector.setup()
    try:
        announcer = CloudAnnouncer(_Lookup(connector), timeout_s=1.0, grace_s=0.1)
        rig.cloud.behaviour.update({"a": "slow", "b": "accept", "c": "decline"})
        facts = CallFacts("+49152", CALLER, "call-1")
        several = [Announcement(d, f"webhook:{d}") for d in ("a", "b", "c")]
        outcome = await announcer.announce_all(facts, several, CALLER)
        assert (outcome.result, outcome.device_id) == ("accept", "b")
        declined = await announcer.announce_all(facts, [several[2], Announcement("x", "other:x")], CALLER)
        assert (declined.result, declined.device_id) == ("decline", "c")
        unknown = await announcer.announce(facts, Announcement("x", "other:x"), None)
        assert unknown.result == "unavailable"
        assert (await announcer.announce(facts, Announcement("y", "webhook"), None)).result == "unavailable"
    finally:
        await connector.unload()
