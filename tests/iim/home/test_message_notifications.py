"""A message a caller left is announced through the household's cloud connector too, beside its SMS: the running
service (`iim serve`'s own assembly) over real PostgreSQL, the FreeSWITCH emulator placing the call and writing the
recording, the SMPP simulator taking the SMS and the vendor cloud peer (tests/connector_peer.py) taking the
notification through the webhook connector. Once per call per connector, whatever is retried or restarted; a vendor
that is down or unlinked never holds the SMS back."""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from fs_app.messages import MessageTaken
from fs_app.routing import CallFacts
from fs_app.testing import CallResult, CallSpec, FreeSwitchEmulator, TargetBehaviour
from iim.core.metrics import REGISTRY
from iim.home.recorded_message import RecordedMessages, rendered_caller
from iim.service import DatabaseUrls, Service
from iim.settings import Settings
from iim.sms.segments import reassemble
from iim.sms.smsc_sim import SmscProcess
from policy_cache import registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import (
    DeviceCapability,
    DeviceCreate,
    DeviceStatus,
    DeviceType,
    FallbackAction,
    RingMode,
)
from tests.conftest import eventually
from tests.connector_peer import SIGNING_SECRET_TEXT, STATIC_TOKEN, VendorPeer, serve
from tests.home_delivery_rig import Home, build_home, create_tenant
from tests.pg import TEST_MASTER_KEY_ENV, PgDatabase

CALLER = "+4930111222"
_NUMBERS = itertools.count(1)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TEST_MASTER_KEY_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("IIM_SMPP_PASSWORD", "secret")
    monkeypatch.setenv("IIM_TEST_VENDOR_TOKEN", STATIC_TOKEN)
    monkeypatch.setenv("IIM_TEST_VENDOR_SIGNING", SIGNING_SECRET_TEXT)


@pytest.fixture
async def vendor() -> AsyncIterator[VendorPeer]:
    peer = VendorPeer()
    runner, peer.url = await serve(peer.app())
    yield peer
    await peer.close()
    await runner.cleanup()


@pytest.fixture
async def smsc(tmp_path: Path) -> AsyncIterator[SmscProcess]:
    async with SmscProcess(tmp_path / "smsc.jsonl").running() as proc:
        yield proc


def _connector(name: str, vendor: VendorPeer, **extra: Any) -> dict[str, Any]:
    return {"name": name, "plugin": "webhook", "config": {
        "base_url": vendor.url, "paths": {"send_notification": "/notify"},
        "auth": {"kind": "bearer", "token_ref": "env:IIM_TEST_VENDOR_TOKEN"},
        "signing_secret_ref": "env:IIM_TEST_VENDOR_SIGNING",
        "retry": {"attempts": 1}, "breaker": {"failure_threshold": 100}, **extra}}


def settings(tmp_path: Path, vendor: VendorPeer, smsc: SmscProcess, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "esl_port": 0, "http_port": 0, "bridge_enabled": False, "scenario_worker": False,
        "data_dir": str(tmp_path / "pg"), "master_key_ref": TEST_MASTER_KEY_ENV["IIM_MASTER_KEY_REF"],
        "recordings_dir": str(tmp_path / "messages"), "message_link_secret_ref": "env:IIM_TEST_LINK_SECRET",
        "smpp_host": "127.0.0.1", "smpp_port": smsc.port, "connectors": [_connector("webhook", vendor)],
        "message_notify_timeout_s": 3.0}
    values.update(overrides)
    return Settings(**values)


@dataclass
class Rig:
    pool: Pool
    tenant: Any
    urls: DatabaseUrls
    emu: FreeSwitchEmulator
    vendor: VendorPeer
    smsc: SmscProcess
    tmp_path: Path

    def settings(self, **overrides: Any) -> Settings:
        return settings(self.tmp_path, self.vendor, self.smsc, **overrides)

    async def home(self, service: Service) -> Home:
        home = await build_home(self.pool, self.tenant, f"+79109{next(_NUMBERS):06d}", speaker=True,
                                ring_mode=RingMode.PHONE_ONLY, fallback=FallbackAction.RECORD_MESSAGE)
        policy = service.running.policy
        assert policy is not None
        await eventually(lambda: policy.cache.lookup(home.msisdn) is not None)
        return home

    async def call(self, service: Service, home: Home) -> CallResult:
        return await self.emu.place_call("127.0.0.1", service.outbound.port, CallSpec(
            destination=home.msisdn.removeprefix("+"), caller_id_number=CALLER))

    def sms_to(self, home: Home) -> list[str]:
        """The texts the SMSC accepted for the home's number (parts joined)."""
        by_ref: dict[str, list[Any]] = {}
        for r in self.smsc.records():
            if r.dest == home.msisdn.removeprefix("+") and not r.dup:
                by_ref.setdefault(r.ref, []).append(r)
        return [reassemble([(p.dc, p.sm) for p in sorted(parts, key=lambda p: p.seq)],
                           udhi=any(p.esm & 0x40 for p in parts)) for parts in by_ref.values()]

    def notes(self) -> list[dict[str, Any]]:
        return [r.body for r in self.vendor.received if r.path == "/notify"]

    async def audit(self, action_prefix: str = "message.") -> list[dict[str, Any]]:
        async with tenant_tx(self.pool, self.tenant, readonly=True) as conn:
            rows = await conn.fetch("SELECT action, detail, correlation FROM iim.audit_log "
                                    "WHERE entity = 'recorded_message' AND starts_with(action, $1) ORDER BY id",
                                    action_prefix)
        return [dict(r) for r in rows]


@pytest.fixture
async def rig(pg_db: PgDatabase, app_pool: Pool, tmp_path: Path, vendor: VendorPeer, smsc: SmscProcess,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    monkeypatch.setenv("IIM_TEST_LINK_SECRET", "m" * 40)
    tenant = await create_tenant(app_pool, "message-notify")
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.no_answer(), time_scale=0.01, write_recordings=True)
    try:
        yield Rig(app_pool, tenant, DatabaseUrls(pg_db.app_url, pg_db.cache_url), emu, vendor, smsc, tmp_path)
    finally:
        await emu.close()


def _link(text: str) -> str:
    found = re.search(r"http://\S+", text)
    assert found is not None, text
    return found.group(0)


async def _fetch(service: Service, link: str) -> tuple[int, bytes]:
    local = f"http://127.0.0.1:{service.running.http_port}{URL(link).path_qs}"
    async with aiohttp.ClientSession() as http, http.get(local) as resp:
        return resp.status, await resp.read()


def _messages(service: Service) -> RecordedMessages:
    messages = service._messages
    assert messages is not None
    return messages


async def _announce_again(service: Service, home: Home, result: CallResult, rig: Rig) -> bool:
    """The router's notifier run again for the same call (a retried hangup, or one replayed after a restart)."""
    policy = service.running.policy
    assert policy is not None
    snapshot = policy.cache.lookup(home.msisdn)
    assert snapshot is not None
    recorded = rig.tmp_path / "messages" / f"iim-{result.uuid}.wav"
    return await _messages(service)(snapshot, CallFacts(home.msisdn.removeprefix("+"), CALLER, result.uuid),
                                    MessageTaken(str(recorded), 120_000))


def _count(result: str, connector: str = "webhook") -> float:
    return REGISTRY.get_sample_value("iim_recorded_message_notifications_total",
                                     {"connector": connector, "result": result}) or 0.0


async def test_a_message_left_reaches_the_phone_by_sms_and_the_vendor_app_by_notification(rig: Rig) -> None:
    async with Service(rig.settings(), database=rig.urls) as service:
        home = await rig.home(service)
        result = await rig.call(service, home)
        recorded = rig.tmp_path / "messages" / f"iim-{result.uuid}.wav"
        await eventually(lambda: len(rig.sms_to(home)) == 1, timeout=15)
        [sms] = rig.sms_to(home)
        assert sms.startswith(f"Missed call from {CALLER}: a message was left (120 s). Listen: http")
        [note] = rig.notes()
        assert note["target"] == f"spk-{home.msisdn[-7:]}"  # the household's device at that vendor
        assert note["title"] == "Voice message"
        assert note["text"] == sms  # the same safe text, the same signed link
        assert note["correlation"]["call_id"] == result.uuid
        assert await _fetch(service, _link(note["text"])) == (200, recorded.read_bytes())
    [kept, notified] = await rig.audit()
    assert kept["action"] == "message.kept"
    assert kept["correlation"] == {"call_id": result.uuid}
    assert kept["detail"]["consent"] == "call_recording"
    assert notified["action"] == "message.notified"
    assert {k: notified["detail"][k] for k in ("connector", "device_id", "result", "attempt", "sms_key")} == {
        "connector": "webhook", "device_id": str(home.devices["speaker"]), "result": "sent", "attempt": 1,
        "sms_key": f"message:{result.uuid}"}
    assert "Listen" not in str(notified["detail"])  # the link (a bearer credential) stays out of the audit


async def test_a_vendor_down_never_holds_back_the_sms_and_a_later_announcement_sends_the_notification_once(
        rig: Rig) -> None:
    rig.vendor.script("/notify", ("status", 503))
    async with Service(rig.settings(), database=rig.urls) as service:
        home = await rig.home(service)
        unavailable = _count("unavailable")
        result = await rig.call(service, home)
        await eventually(lambda: len(rig.sms_to(home)) == 1, timeout=15)  # the SMS went all the same
        assert len(rig.notes()) == 1  # tried once, refused with 503
        assert _count("unavailable") == unavailable + 1
        [_, failed] = await rig.audit()
        assert (failed["action"], failed["detail"]["result"], failed["detail"]["error"]) == (
            "message.notify_failed", "unavailable", "ConnectorUnavailable")
        # The vendor is back; the same call's announcement runs again: the notification now, the SMS not again.
        assert await _announce_again(service, home, result, rig) is True
        assert len(rig.notes()) == 2
        assert (await rig.audit())[-1]["detail"]["attempt"] == 2
        duplicates = _count("duplicate")
        assert await _announce_again(service, home, result, rig) is True
        assert len(rig.notes()) == 2  # sent: never again
        assert _count("duplicate") == duplicates + 1
    async with tenant_tx(rig.pool, rig.tenant, readonly=True) as conn:
        assert await conn.fetchval("SELECT count(*) FROM iim.sms_outbox WHERE key = $1", f"message:{result.uuid}") == 1
        row = await conn.fetchrow("SELECT state, attempts, result FROM iim.message_notification")
    assert dict(row) == {"state": "sent", "attempts": 2, "result": "sent"}
    assert len(rig.sms_to(home)) == 1


async def test_a_retried_announcement_after_a_restart_sends_no_second_notification(rig: Rig) -> None:
    async with Service(rig.settings(), database=rig.urls) as service:
        home = await rig.home(service)
        result = await rig.call(service, home)
        await eventually(lambda: len(rig.notes()) == 1, timeout=15)
        assert await _announce_again(service, home, result, rig) is True
    async with Service(rig.settings(), database=rig.urls) as again:  # a new process, the same database
        await eventually(lambda: again.running.policy is not None
                         and again.running.policy.cache.lookup(home.msisdn) is not None)
        assert await _announce_again(again, home, result, rig) is True
        await eventually(lambda: len(rig.sms_to(home)) >= 1, timeout=15)
    assert len(rig.notes()) == 1
    assert len(rig.sms_to(home)) == 1
    assert [a["action"] for a in await rig.audit()] == ["message.kept", "message.notified"]
    # The claims go with their message when retention purges it (the sweeper's function, across tenants).
    async with tenant_tx(rig.pool, rig.tenant) as conn:
        await conn.execute("UPDATE iim.recorded_message SET expires_at = now() - interval '1 s'")
    async with rig.pool.acquire() as conn:
        assert [r["tenant_id"] for r in await conn.fetch("SELECT tenant_id FROM iim.recording_purge(10)")] == [
            rig.tenant]
    async with tenant_tx(rig.pool, rig.tenant, readonly=True) as conn:
        assert await conn.fetchval("SELECT count(*) FROM iim.message_notification") == 0
    assert [a["action"] for a in await rig.audit()] == ["message.kept", "message.notified"]  # the trail stays


async def test_a_household_not_linked_at_one_vendor_is_notified_at_the_other_and_texted(rig: Rig) -> None:
    """``linked`` wants the household's account link (none here: linking is off): NotLinked, counted and audited;
    ``webhook`` still delivers, and so does the SMS."""
    linking = {"authorize_url": f"{rig.vendor.url}/authorize", "token_url": f"{rig.vendor.url}/token",
               "client_id": "iim", "redirect_uri": "http://127.0.0.1:1/oauth2/callback"}
    connectors = [_connector("webhook", rig.vendor), _connector("linked", rig.vendor, account_linking=linking)]
    async with Service(rig.settings(connectors=connectors), database=rig.urls) as service:
        home = await rig.home(service)
        async with tenant_tx(rig.pool, rig.tenant) as conn:
            await registry.create(conn, registry.DEVICE, DeviceCreate(
                household_id=home.household_id, name="Hall display", type=DeviceType.HUB,
                capabilities=frozenset({DeviceCapability.DISPLAY}), connector="linked", connector_ref="hall-1",
                status=DeviceStatus.ONLINE), actor="test")
        not_linked = _count("not_linked", "linked")
        await rig.call(service, home)
        await eventually(lambda: len(rig.sms_to(home)) == 1, timeout=15)
        assert [n["target"] for n in rig.notes()] == [f"spk-{home.msisdn[-7:]}"]
        assert _count("not_linked", "linked") == not_linked + 1
    by_connector = {a["detail"]["connector"]: (a["action"], a["detail"]["result"])
                    for a in await rig.audit("message.notif")}
    assert by_connector == {"webhook": ("message.notified", "sent"), "linked": ("message.notify_failed", "not_linked")}


async def test_without_recording_consent_no_notification_is_sent(rig: Rig) -> None:
    async with Service(rig.settings(), database=rig.urls) as service:
        home = await build_home(rig.pool, rig.tenant, f"+79109{next(_NUMBERS):06d}", speaker=True,
                                ring_mode=RingMode.PHONE_ONLY, fallback=FallbackAction.RECORD_MESSAGE,
                                recording_consent=False)
        policy = service.running.policy
        assert policy is not None
        await eventually(lambda: policy.cache.lookup(home.msisdn) is not None)
        await rig.call(service, home)
        await eventually(lambda: len(rig.sms_to(home)) == 1, timeout=15)
        [sms] = rig.sms_to(home)
        assert sms == f"Missed call from {CALLER}: nobody took it at home."
    assert rig.notes() == []
    assert await rig.audit() == []


@pytest.mark.parametrize(("caller", "shown"), [
    ("+4930111222", "+4930111222"), ("84951234567", "84951234567"), (None, "an unknown number"),
    ("Visit evil.example now", "an unknown number"), ("+7<script>", "an unknown number"), ("1" * 30, "an unknown number"),
])
def test_only_a_number_of_the_caller_reaches_the_household(caller: str | None, shown: str) -> None:
    assert rendered_caller(caller) == shown


async def test_a_failed_notification_is_not_tried_again_once_the_recording_consent_is_revoked(rig: Rig) -> None:
    rig.vendor.script("/notify", ("status", 503))
    async with Service(rig.settings(), database=rig.urls) as service:
        home = await rig.home(service)
        result = await rig.call(service, home)
        await eventually(lambda: len(rig.notes()) == 1, timeout=15)
        async with tenant_tx(rig.pool, rig.tenant) as conn:
            await conn.execute("UPDATE iim.consent SET revoked_at = now() WHERE subscriber_id = $1",
                               home.subscriber_id)
        await _announce_again(service, home, result, rig)
    assert len(rig.notes()) == 1  # only the refused first try
    assert [a["action"] for a in await rig.audit()] == ["message.kept", "message.notify_failed"]
