"""Device supervision end to end: real PostgreSQL, the HTTPS bridge, the scenario worker and the FreeSWITCH emulator.

A sensor with a heartbeat interval is heard through the bridge; the watchdog scans with the worker's clock moved
forward; the household is told through the shipped ``device_health`` template (an SMS, nobody called) and the
incident resolves itself when the device is heard again. Low battery and failed self-tests are conditions raised
once and cleared by ``battery_ok`` / ``self_test_passed``. A fire alarm from a device marked offline is acted on.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import pytest
import pytest_asyncio

from fs_app.testing import TargetBehaviour
from iim.supervision.watchdog import DeviceWatchdog, WatchdogSettings, silence_cutoff
from iot_bridge.app import BridgeConfig, create_bridge_app
from iot_bridge.events import EventRejected, parse_event
from iot_bridge.ratelimit import RateLimitSettings
from iot_bridge.server_cert import ensure_self_signed
from policy_cache import registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import DeviceUpdate
from tests.iim.scenarios.test_scenario_worker import Alarms, alarms_rig
from tests.iot_bridge.test_bridge_http import BridgeClient, _client_ssl, _serve
from tests.pg import opened

INTERVAL_S = 60
GRACE_S = 30


class MovableClock:
    """The worker's and the watchdog's clock: real time plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Supervised:
    alarms: Alarms
    bridge: BridgeClient
    clock: MovableClock
    watchdog: DeviceWatchdog

    async def post(self, event_type: str, *, device: str | None = None) -> dict[str, Any]:
        rig = self.alarms.rig
        body = rig.event(event_type, device=device)
        status, _, answer = await self.bridge.post("/v1/events", body, rig.signed_headers(body, device=device))
        assert status == 202, answer
        assert isinstance(answer, dict)
        return answer

    def another_watchdog(self) -> DeviceWatchdog:
        return DeviceWatchdog(self.alarms.pool, self.watchdog.settings, opener=self.alarms.worker.begin_in)

    async def silent_for(self, seconds: float) -> list[UUID]:
        """Move the clock ``seconds`` past now and scan once: the incidents opened for this test's tenant (the
        scan covers every tenant, and other tests' devices share the database)."""
        self.clock.offset = timedelta(seconds=seconds)
        return await self.ours(await self.watchdog.scan())

    async def ours(self, incidents: list[UUID]) -> list[UUID]:
        rows = await self.alarms.rows("SELECT id FROM iim.incident WHERE id = ANY($1::uuid[]) ORDER BY opened_at",
                                      incidents)
        return [r["id"] for r in rows]

    async def incidents(self, hazard: str) -> list[dict[str, Any]]:
        return await self.alarms.rows("SELECT id, state::text AS state, event_count FROM iim.incident "
                                      "WHERE hazard = $1 ORDER BY opened_at", hazard)

    async def device_status(self, device_id: UUID) -> str:
        rows = await self.alarms.rows("SELECT status::text AS status FROM iim.device WHERE id = $1", device_id)
        return str(rows[0]["status"])

    async def state_becomes(self, incident: UUID, state: str, timeout: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while (current := (await self.alarms.incident(incident))["state"]) != state:
            assert asyncio.get_running_loop().time() < deadline, f"incident still {current}, not {state}"
            await asyncio.sleep(0.05)

    async def told(self, incident: UUID) -> None:
        """The household is told at once (notify + SMS, nothing to wait for): its deadline is the worker's now,
        which the test moved ahead of PostgreSQL's, so the worker is ticked at it as the sweep would."""
        await self.alarms.worker.tick(self.alarms.rig.tenant_id, incident, reason="deadline")
        await self.state_becomes(incident, "open")

    async def sms_of(self, incident: UUID, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = asyncio.get_running_loop().time() + timeout
        while not (rows := await self.alarms.rows(
                "SELECT tenant_id, key, msisdn, body, body_key FROM iim.sms_outbox WHERE incident_id = $1 "
                "ORDER BY created_at, key", incident)):
            assert asyncio.get_running_loop().time() < deadline, "no SMS for the incident"
            await asyncio.sleep(0.05)
        # Bodies are sealed with the tenant's data key (migration 0028): read them as the sender does.
        return [{"msisdn": r["msisdn"], "body": await opened(self.alarms.pool, r)} for r in rows]


async def _supervise(pool: Pool, tenant: UUID, device: UUID, interval: int | None = INTERVAL_S) -> None:
    """As an operator sets it (``iim device update ID --heartbeat-interval-s 60``, ``PATCH /devices/ID``)."""
    async with tenant_tx(pool, tenant) as conn:
        await registry.update(conn, registry.DEVICE, device, DeviceUpdate(heartbeat_interval_s=interval),
                              actor="operator:test")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ensure_self_signed(tmp_path_factory.mktemp("tls"))


@pytest_asyncio.fixture
async def sup(app_pool: Pool, pg_db: Any, tmp_path: Path, tls_files: tuple[Path, Path]) -> AsyncIterator[Supervised]:
    async with alarms_rig(app_pool, pg_db, tmp_path) as alarms:
        clock = MovableClock()
        alarms.worker.settings.clock = clock
        config = BridgeConfig(rate_limits=RateLimitSettings(device_rate=100, device_burst=100))
        runner, port = await _serve(create_bridge_app(app_pool, config, opener=alarms.worker.begin_in), tls_files)
        watchdog = DeviceWatchdog(app_pool, WatchdogSettings(grace_s=GRACE_S, clock=alarms.worker.settings.clock),
                                  opener=alarms.worker.begin_in)
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_client_ssl())) as session:
                await _supervise(app_pool, alarms.rig.tenant_id, alarms.rig.sensor_id)
                yield Supervised(alarms, BridgeClient(session, f"https://127.0.0.1:{port}"), clock, watchdog)
        finally:
            await runner.cleanup()


async def test_a_sensor_silent_past_its_interval_and_grace_opens_one_offline_incident_that_texts_and_calls_nobody(
        sup: Supervised) -> None:
    rig = sup.alarms.rig
    await sup.post("heartbeat")
    assert await sup.silent_for(INTERVAL_S) == []  # late, but within the grace
    assert await sup.silent_for(INTERVAL_S + GRACE_S - 5) == []
    opened = await sup.silent_for(INTERVAL_S + GRACE_S + 5)
    assert len(opened) == 1
    incident = opened[0]
    assert await sup.device_status(rig.sensor_id) == "offline"
    sms = await sup.sms_of(incident)
    assert rig.owner in {s["msisdn"] for s in sms}
    assert any("Kitchen smoke sensor reports no signal" in s["body"] for s in sms)
    # Non-emergency: the device_health template calls nobody, and the incident stays open (its reminder is due).
    await sup.told(incident)
    assert sup.alarms.calls_to(rig.owner) == sup.alarms.calls_to(rig.backup) == sup.alarms.calls_to(rig.security) == 0
    # No flood: later scans find nothing more while the device stays silent.
    assert await sup.silent_for(INTERVAL_S * 10) == []
    assert [i["id"] for i in await sup.incidents("offline")] == [incident]
    lines = await sup.alarms.rows("SELECT actor, action FROM iim.audit_log WHERE entity_id = ANY($1::text[]) "
                                  "ORDER BY id", [str(rig.sensor_id), str(incident)])
    assert {"actor": "device-watchdog", "action": "device.offline"} in lines
    assert {"actor": "device-watchdog", "action": "incident.opened"} in lines
    # A day later, still silent: one reminder, and the incident ends; the device stays marked offline.
    sup.clock.offset += timedelta(days=1, seconds=1)
    await sup.alarms.worker.tick(rig.tenant_id, incident, reason="deadline")  # the wait is over: the reminder
    await sup.alarms.worker.tick(rig.tenant_id, incident, reason="deadline")  # sent: nothing more to do
    await sup.state_becomes(incident, "exhausted")
    reminders = [s for s in await sup.sms_of(incident) if s["body"].startswith("Reminder")]
    assert [s["msisdn"] for s in reminders] == [rig.owner]
    assert await sup.silent_for(INTERVAL_S * 10) == []


async def test_the_offline_incident_resolves_itself_when_the_device_is_heard_again(sup: Supervised) -> None:
    rig = sup.alarms.rig
    await sup.post("heartbeat")
    [incident] = await sup.silent_for(INTERVAL_S + GRACE_S + 5)
    await sup.told(incident)
    await sup.post("heartbeat")
    await sup.state_becomes(incident, "resolved")
    assert await sup.device_status(rig.sensor_id) == "online"
    heard = await sup.alarms.rows("SELECT actor FROM iim.audit_log WHERE action = 'device.heard_again' "
                                  "AND entity_id = $1", str(rig.sensor_id))
    assert heard == [{"actor": f"device:{rig.sensor}"}]
    # Heard again counts from now: silent again later is a new incident.
    assert await sup.silent_for(INTERVAL_S) == []
    again = await sup.silent_for(INTERVAL_S + GRACE_S + 5)
    assert len(again) == 1
    assert again[0] != incident


async def test_a_device_without_an_interval_or_disabled_is_never_found_silent(sup: Supervised) -> None:
    rig = sup.alarms.rig
    await sup.post("heartbeat")
    await _supervise(sup.alarms.pool, rig.tenant_id, rig.sensor_id, interval=None)
    assert await sup.silent_for(86_400) == []
    await _supervise(sup.alarms.pool, rig.tenant_id, rig.sensor_id)
    async with tenant_tx(sup.alarms.pool, rig.tenant_id) as conn:
        await registry.update(conn, registry.DEVICE, rig.sensor_id, DeviceUpdate(enabled=False), actor="operator:test")
    assert await sup.silent_for(86_400) == []
    assert await sup.incidents("offline") == []


async def test_two_watchdogs_scanning_at_once_open_one_incident(sup: Supervised) -> None:
    await sup.post("heartbeat")
    sup.clock.offset = timedelta(seconds=INTERVAL_S + GRACE_S + 5)
    first, second = await asyncio.gather(sup.watchdog.scan(), sup.another_watchdog().scan())
    assert len(await sup.ours(first)) + len(await sup.ours(second)) == 1
    assert len(await sup.incidents("offline")) == 1
    marked = await sup.alarms.rows("SELECT 1 FROM iim.audit_log WHERE action = 'device.offline'")
    assert len(marked) == 1


async def test_low_battery_opens_one_incident_repeats_open_nothing_and_battery_ok_resolves_it(
        sup: Supervised) -> None:
    rig = sup.alarms.rig
    first = await sup.post("battery_low")
    assert first["action"] == "opened"
    incident = UUID(first["incident_id"])
    repeat = await sup.post("battery_low")
    assert (repeat["action"], repeat["incident_id"]) == ("recorded", None)
    sms = await sup.sms_of(incident)
    assert any("reports low battery" in s["body"] for s in sms)
    await sup.state_becomes(incident, "open")
    assert sup.alarms.calls_to(rig.owner) == 0
    await sup.post("battery_ok")
    await sup.state_becomes(incident, "resolved")
    assert len(await sup.incidents("battery_low")) == 1
    again = await sup.post("battery_low")  # a new low battery after it was fine: a new incident
    assert again["action"] == "opened"
    assert again["incident_id"] != str(incident)


async def test_a_failed_self_test_is_its_own_incident_beside_a_low_battery_and_clears_on_a_passed_one(
        sup: Supervised) -> None:
    battery = UUID((await sup.post("battery_low"))["incident_id"])
    test = UUID((await sup.post("self_test_failed"))["incident_id"])
    assert battery != test
    await sup.post("self_test_passed")
    await sup.state_becomes(test, "resolved")
    assert (await sup.alarms.incident(battery))["state"] in ("open", "notifying")


async def test_a_fire_alarm_from_a_device_marked_offline_is_still_acted_on(sup: Supervised) -> None:
    rig = sup.alarms.rig
    await sup.post("heartbeat")
    [offline] = await sup.silent_for(INTERVAL_S + GRACE_S + 5)
    assert await sup.device_status(rig.sensor_id) == "offline"
    sup.alarms.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="1"))
    answer = await sup.post("smoke")
    assert answer["action"] == "opened"
    smoke = UUID(answer["incident_id"])
    assert await sup.alarms.settled(smoke) == "acknowledged"
    assert sup.alarms.calls_to(rig.owner) == 1
    await sup.state_becomes(offline, "resolved")  # and the smoke alarm was the device being heard


def test_offline_is_iims_own_finding_and_no_device_may_post_it() -> None:
    raw = b'{"event_id": "e-1", "device_id": "s-1", "type": "offline", "occurred_at": "2026-11-25T10:00:00Z"}'
    with pytest.raises(EventRejected) as info:
        parse_event(raw)
    assert [e["loc"] for e in info.value.errors] == [["type"]]


def test_the_silence_cutoff_is_now_minus_the_grace_and_needs_an_aware_time() -> None:
    now = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
    assert silence_cutoff(now, 120) == now - timedelta(minutes=2)
    with pytest.raises(ValueError, match="aware"):
        silence_cutoff(now.replace(tzinfo=None), 120)


async def test_iim_scenario_simulate_runs_the_device_health_template() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "iim", "scenario", "simulate", "--template", "device_health", "--event", "battery_low",
        "--at", "2026-11-25T03:00:00+03:00", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "scenario device_health: battery_low" in text
    assert "reports low battery since 03:00" in text
    assert "-> call" not in text  # nobody is called at 03:00 for a battery
    assert text.splitlines()[-1].startswith("ended exhausted after +24:00:00 (0 call(s), 2 SMS)")
