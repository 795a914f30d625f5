"""End to end: a SIA DC-09 fire frame from an alarm panel drives the same escalation as a device event.

Panel (tests/sia_sender.py) -> IIM's receiver over TCP -> the device bridge's intake (the scenario worker's
opener starts the incident in the same transaction) -> ACK -> the worker calls the owner through the
FreeSWITCH emulator over real sockets -> the owner presses 1. Real PostgreSQL throughout.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from fs_app.testing import TargetBehaviour
from iot_bridge.app import Bridge, BridgeConfig
from iot_bridge.sia.receiver import SiaReceiver
from iot_bridge.sia.server import SiaServer, SiaServerConfig
from policy_cache import registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import SiaAccountCreate
from tests.iim.scenarios.test_scenario_worker import alarms_rig
from tests.sia_sender import Panel, send_tcp


async def test_sia_fire_frame_opens_an_incident_that_calls_the_owner_like_a_device_event(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    async with alarms_rig(app_pool, pg_db, tmp_path) as alarms:
        rig = alarms.rig
        alarms.script(rig.owner, TargetBehaviour.answer(after_ms=200, dtmf="1"))
        key = secrets.token_bytes(16)
        key_file = tmp_path / "panel.key"
        key_file.write_text(key.hex())
        panel = Panel(secrets.token_hex(4).upper(), key=key)
        async with tenant_tx(app_pool, rig.tenant_id) as conn:
            await registry.create(conn, registry.SIA_ACCOUNT, SiaAccountCreate(
                account=panel.account, device_id=rig.sensor_id, key_ref=f"file:{key_file}"), actor="test")
        bridge = Bridge(app_pool, BridgeConfig(), opener=alarms.worker.begin_in)
        async with bridge.refusals, SiaServer(SiaReceiver(bridge), SiaServerConfig(port=0, udp=False)) as server:
            assert server.tcp_port is not None
            [reply] = await send_tcp("127.0.0.1", server.tcp_port, [panel.frame("Nri1/FA01")])
        assert panel.read(reply).kind == "*ACK"
        [incident] = await alarms.rows("SELECT id, hazard FROM iim.incident WHERE device_id = $1", rig.sensor_id)
        assert incident["hazard"] == "smoke"
        assert await alarms.settled(incident["id"]) == "acknowledged"
        assert alarms.calls_to(rig.owner) == 1
        assert alarms.calls_to(rig.backup) == 0
        sms = await alarms.rows("SELECT msisdn FROM iim.sms_outbox WHERE incident_id = $1", incident["id"])
        assert {row["msisdn"] for row in sms} == {rig.owner}  # smoke: the owner is also told by SMS
