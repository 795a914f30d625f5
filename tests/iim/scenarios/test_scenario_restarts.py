"""The scenario worker survives what a live system does to it: PostgreSQL restarted under it.

Each test runs its own embedded PostgreSQL (``tests.pg.private_pg``) so it can stop and start it without
cutting the other modules' connections.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from iim.core.errors import STORE_UNAVAILABLE
from iot_bridge.events import DeviceEvent, body_fingerprint
from iot_bridge.intake import KnownDevice, accept_event
from policy_cache.db import DbRole, connect_pool, tenant_tx
from tests.iim.scenarios.test_scenario_worker import Alarms, alarms_rig
from tests.pg import private_pg


async def _wait_scenario(alarms: Alarms) -> None:
    async with tenant_tx(alarms.pool, alarms.rig.tenant_id) as conn:
        await conn.execute(
            "INSERT INTO iim.scenario (name, trigger, steps, enabled) VALUES ('wait first', $1, $2, true)",
            {"event_types": ["smoke"]}, [{"action": "wait", "seconds": 600}])


async def _clear(alarms: Alarms, timeout: float = 20.0) -> None:
    """Send the device's "cleared" event, retrying while the intake's own pool reconnects."""
    rig = alarms.rig
    raw = rig.event("cleared")
    event = DeviceEvent.model_validate(json.loads(raw))
    device = KnownDevice(rig.tenant_id, rig.sensor_id, rig.household_id, rig.sensor, "sensor")
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await accept_event(alarms.pool, device, event, fingerprint=body_fingerprint(raw), channel="device",
                               msg_id=None)
        except STORE_UNAVAILABLE:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)
        else:
            return


async def test_jobs_queued_after_a_postgresql_restart_are_run_by_the_same_worker(tmp_path: Path) -> None:
    async with private_pg() as pg:
        assert pg.db is not None
        pool = await connect_pool(pg.db.app_url, role=DbRole.APP, min_size=1, max_size=4)
        try:
            async with alarms_rig(pool, pg.db, tmp_path) as alarms:
                await _wait_scenario(alarms)
                incident = await alarms.raise_alarm("smoke")  # started by a tick job: the queue works
                deadline = asyncio.get_running_loop().time() + 10
                while "wait" not in (await alarms.incident(incident))["reason"]:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.05)
                await pg.restart(down_s=1.0)
                await _clear(alarms)  # queues a tick job ("cleared"): only the job worker runs it
                assert await alarms.settled(incident, timeout=30) == "resolved"
        finally:
            await pool.close()


async def test_a_deadline_passing_after_a_postgresql_restart_still_moves_the_incident_on(tmp_path: Path) -> None:
    async with private_pg() as pg:
        assert pg.db is not None
        pool = await connect_pool(pg.db.app_url, role=DbRole.APP, min_size=1, max_size=4)
        try:
            async with alarms_rig(pool, pg.db, tmp_path) as alarms:
                async with tenant_tx(alarms.pool, alarms.rig.tenant_id) as conn:
                    await conn.execute(
                        "INSERT INTO iim.scenario (name, trigger, steps, enabled) VALUES ('wait, then text', $1, $2, "
                        "true)", {"event_types": ["smoke"]},
                        [{"action": "wait", "seconds": 3}, {"action": "sms", "to": "owner", "text": "Smoke."}])
                incident = await alarms.raise_alarm("smoke")
                deadline = asyncio.get_running_loop().time() + 10
                while "wait" not in (await alarms.incident(incident))["reason"]:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.05)
                await pg.restart(down_s=1.0)  # the wait ends about when the server is back
                assert await alarms.settled(incident, timeout=30) == "exhausted"  # the sweep ran the SMS step
                sms = await alarms.rows("SELECT msisdn FROM iim.sms_outbox WHERE incident_id = $1", incident)
                assert sms == [{"msisdn": alarms.rig.owner}]
        finally:
            await pool.close()
