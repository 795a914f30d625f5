"""Device supervision through ``iim serve``'s own wiring: the watchdog the service starts (its scan interval and
grace from settings), the HTTPS device bridge, the scenario worker, the FreeSWITCH emulator, real PostgreSQL.

Two smoke sensors are given the shortest heartbeat interval an operator may set (30 s) through the admin API and
go silent after one heartbeat each: the service opens a non-emergency ``device_health`` incident for each (SMS to
the owner, nobody called), listed by ``iim incident list`` and the API. A heartbeat from one resolves its incident
and brings it back online; a fire alarm from the other, still marked offline, escalates to the owner's phone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import pytest

from fs_app.testing import FreeSwitchEmulator, TargetBehaviour
from iim.cli import main as iim_main
from iim.service import DatabaseUrls, Service
from iim.settings import Settings
from policy_cache import audit, registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import DeviceCreate, DeviceStatus, DeviceType
from tests.alarm_rig import build_rig
from tests.pg import TEST_MASTER_KEY_ENV, PgDatabase, opened

ESL_PASSWORD = "service-supervision-esl-secret"
ADMIN_TOKEN = "service-supervision-admin-token"
GW = "sofia/gateway/ims/{}"
#: the shortest interval the registry accepts (iim.device.heartbeat_interval_s)
INTERVAL_S = 30


async def until(what: str, check: Any, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not reached in {timeout} s"
        await asyncio.sleep(0.1)


@pytest.mark.timeout(240)
async def test_silent_sensors_open_device_health_incidents_a_heartbeat_clears_one_and_a_fire_alarm_still_escalates(
        pg_db: PgDatabase, app_pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("IIM_FS_PASSWORD", ESL_PASSWORD)
    table = {hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest(): {"actor": "noc", "role": "admin"}}
    monkeypatch.setenv("IIM_TEST_ADMIN_TOKENS", json.dumps(table))
    monkeypatch.setenv("IIM_ADMIN_TOKENS_REF", "env:IIM_TEST_ADMIN_TOKENS")
    monkeypatch.delenv("IIM_OIDC_ISSUER", raising=False)
    for name, value in TEST_MASTER_KEY_ENV.items():
        monkeypatch.setenv(name, value)
    rig = await build_rig(app_pool, tmp_path, name="supervised", owner="+79075550001", backup="+79075550002",
                          security="+79075550003")
    hall = f"smoke2-{rig.tenant_id.hex[:6]}"
    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        credential = await conn.fetchval("SELECT id FROM iim.credential_ref WHERE name = 'sensor-hmac'")
        hall_id = (await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=rig.household_id, name="Hall smoke sensor", type=DeviceType.SENSOR, external_id=hall,
            credential_ref_id=credential, status=DeviceStatus.ONLINE), actor="test")).id
    emu = FreeSwitchEmulator(time_scale=1.0, default_target=TargetBehaviour.no_answer())
    inbound = await emu.start_inbound(password=ESL_PASSWORD)
    settings = Settings(esl_port=0, http_port=0, bridge_port=0, data_dir=str(tmp_path / "pg"),
                        fs_nodes=[{"host": "127.0.0.1", "port": inbound.port, "name": "fs1"}],
                        master_key_ref=TEST_MASTER_KEY_ENV["IIM_MASTER_KEY_REF"], job_heartbeat_timeout_s=2.0,
                        supervision_grace_s=0.0, supervision_scan_interval_s=0.25)
    try:
        async with Service(settings, database=DatabaseUrls(pg_db.app_url, pg_db.cache_url)) as service, \
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            api = f"http://127.0.0.1:{service.running.http_port}"
            tenant = f"/v1/tenants/{rig.tenant_id}"
            bridge = f"https://127.0.0.1:{service.running.bridge_port}"
            tls = ssl.create_default_context(cafile=str(tmp_path / "tls" / "bridge-cert.pem"))
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

            async def post(event_type: str, device: str) -> dict[str, Any]:
                body = rig.event(event_type, device=device)
                async with http.post(bridge + "/v1/events", data=body, ssl=tls,
                                     headers=rig.signed_headers(body, device=device)) as resp:
                    answer = await resp.json()
                    assert resp.status == 202, answer
                    return dict(answer)

            async def incidents(hazard: str) -> list[dict[str, Any]]:
                async with http.get(api + tenant + "/incidents", headers=admin) as resp:
                    assert resp.status == 200
                    page = await resp.json()
                return [i for i in page["items"] if i["hazard"] == hazard]

            async def status_of(device: UUID) -> str:
                async with tenant_tx(app_pool, rig.tenant_id) as conn:
                    return str(await conn.fetchval("SELECT status::text FROM iim.device WHERE id = $1", device))

            async def connected() -> bool:
                return all(c.connected for c in service.inbound)
            await until("the switch connected", connected)
            # The operator supervises both sensors (PATCH /devices/ID, as `iim device update --heartbeat-interval-s`).
            for device in (rig.sensor_id, hall_id):
                async with http.patch(f"{api}{tenant}/devices/{device}", json={"heartbeat_interval_s": INTERVAL_S},
                                      headers=admin) as resp:
                    assert resp.status == 200, await resp.text()
            await post("heartbeat", rig.sensor)
            await post("heartbeat", hall)

            # Silent past the interval: the service's own watchdog marks both offline, one incident each.
            async def both_offline() -> bool:
                return len(await incidents("offline")) == 2
            await until("both sensors found silent", both_offline, timeout=INTERVAL_S + 20)
            offline = {i["device_id"]: i for i in await incidents("offline")}
            assert set(offline) == {str(rig.sensor_id), str(hall_id)}
            assert {i["scenario"] for i in offline.values()} == {"device_health"}
            assert {i["state"] for i in offline.values()} <= {"open", "notifying"}
            assert await status_of(rig.sensor_id) == await status_of(hall_id) == "offline"

            # ... as `iim incident list` shows them to an operator.
            monkeypatch.setenv("IIM_ADMIN_TOKEN", ADMIN_TOKEN)
            monkeypatch.setenv("IIM_ADMIN_API", api)
            monkeypatch.setenv("IIM_TENANT", str(rig.tenant_id))
            capsys.readouterr()
            assert await asyncio.to_thread(iim_main, ["incident", "list", "-o", "json"]) == 0
            listed = [i for i in json.loads(capsys.readouterr().out)["items"] if i["hazard"] == "offline"]
            assert {(i["device_name"], i["scenario"]) for i in listed} == {
                ("Kitchen smoke sensor", "device_health"), ("Hall smoke sensor", "device_health")}

            # Non-emergency: the owner is texted, nobody's phone rings.
            async def texted() -> list[str]:
                async with tenant_tx(app_pool, rig.tenant_id) as conn:
                    rows = await conn.fetch("SELECT tenant_id, key, msisdn, body, body_key FROM iim.sms_outbox "
                                            "WHERE incident_id = $1 AND msisdn = $2",
                                            UUID(offline[str(rig.sensor_id)]["id"]), rig.owner)
                return [str(await opened(app_pool, r)) for r in rows]

            async def owner_texted() -> bool:
                return any("Kitchen smoke sensor reports no signal" in t for t in await texted())
            await until("the owner texted", owner_texted)
            assert list(emu.originates) == []

            # A heartbeat: the kitchen sensor is heard again, its incident resolves itself.
            await post("heartbeat", rig.sensor)

            async def kitchen_resolved() -> bool:
                return [i["state"] for i in await incidents("offline")
                        if i["device_id"] == str(rig.sensor_id)] == ["resolved"]
            await until("the kitchen sensor's incident resolved", kitchen_resolved)
            assert await status_of(rig.sensor_id) == "online"
            assert await status_of(hall_id) == "offline"

            # A fire alarm from the hall sensor, still marked offline, escalates: the owner's phone rings.
            emu.targets[GW.format(rig.owner)] = TargetBehaviour.answer(after_ms=100, dtmf="1")
            answer = await post("smoke", hall)
            assert answer["action"] == "opened"
            smoke = answer["incident_id"]

            async def acknowledged() -> bool:
                return [i["state"] for i in await incidents("smoke") if i["id"] == smoke] == ["acknowledged"]
            await until("the fire alarm acknowledged by the owner", acknowledged, timeout=60)
            assert len(emu.originates_to(rig.owner)) == 1

            async def hall_resolved() -> bool:  # the alarm was the hall sensor being heard again
                return [i["state"] for i in await incidents("offline")
                        if i["device_id"] == str(hall_id)] == ["resolved"]
            await until("the hall sensor's incident resolved", hall_resolved)

            await audit.flush_pending(app_pool)
            async with tenant_tx(app_pool, rig.tenant_id) as conn:
                lines = [dict(r) for r in await conn.fetch(
                    "SELECT actor, action, entity_id FROM iim.audit_log WHERE action IN "
                    "('device.offline', 'device.heard_again') ORDER BY id")]
            assert {(r["actor"], r["action"], r["entity_id"]) for r in lines} == {
                ("device-watchdog", "device.offline", str(rig.sensor_id)),
                ("device-watchdog", "device.offline", str(hall_id)),
                (f"device:{rig.sensor}", "device.heard_again", str(rig.sensor_id)),
                (f"device:{hall}", "device.heard_again", str(hall_id))}
    finally:
        await emu.close()
