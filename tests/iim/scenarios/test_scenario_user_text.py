"""User text never stops an alarm: names are rendered safe, and a call that cannot be built fails alone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from fs_app.testing import TargetBehaviour
from iim.scenarios import worker as worker_module
from policy_cache.db import Pool, tenant_tx
from tests.iim.scenarios.test_scenario_worker import alarms_rig


async def test_a_household_named_with_switch_syntax_still_reaches_the_owner(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    async with alarms_rig(app_pool, pg_db, tmp_path) as alarms:
        rig = alarms.rig
        async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
            await conn.execute("UPDATE iim.household SET name = $1 WHERE id = $2", "Flat ${x} it's", rig.household_id)
            await conn.execute("UPDATE iim.device SET name = $1 WHERE id = $2", "Kitchen $${sound_prefix}\n",
                               rig.sensor_id)
        alarms.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="1"))
        incident = await alarms.raise_alarm("smoke")
        assert await alarms.settled(incident) == "acknowledged"
        assert alarms.calls_to(rig.owner) == 1


async def test_a_call_that_cannot_be_built_fails_alone_and_the_incident_moves_on(
        app_pool: Pool, pg_db: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unbuildable(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("caller_id_name must be letters, digits, space")

    monkeypatch.setattr(worker_module, "_alert_call", unbuildable)
    async with alarms_rig(app_pool, pg_db, tmp_path) as alarms:
        rig = alarms.rig
        incident = await alarms.raise_alarm("smoke")
        assert await alarms.settled(incident) == "exhausted"  # every step tried, none stuck
        assert alarms.calls_to(rig.owner) == alarms.calls_to(rig.backup) == alarms.calls_to(rig.security) == 0
        sms = await alarms.rows("SELECT msisdn FROM iim.sms_outbox WHERE incident_id = $1", incident)
        assert rig.owner in {s["msisdn"] for s in sms}  # the SMS of the first step still goes out
        refused = await alarms.rows(
            "SELECT detail->>'reason' AS reason FROM iim.audit_log WHERE action = 'originate.refused' "
            "AND entity_id = $1", str(incident))
        assert [r["reason"] for r in refused] == ["invalid_call"] * 3


async def test_without_a_freeswitch_node_an_alarm_is_unreachable_and_texted_not_a_crash(
        app_pool: Pool, pg_db: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No ``IIM_FS_NODES``: every call is unreachable at once (SMS instead), never an AssertionError."""
    from datetime import timedelta

    from iim.keys.keyring import Keyring
    from iim.scenarios.worker import IncidentWorker, WorkerSettings
    from tests.alarm_rig import build_rig
    from tests.iim.scenarios.test_scenario_worker import Alarms, numbers
    from tests.pg import TEST_MASTER_KEY

    class Speech:
        async def render(self, text: str) -> Any:
            raise AssertionError("no switch to speak through: nothing is rendered")

    n = numbers()
    rig = await build_rig(app_pool, tmp_path, owner=n["owner"], backup=n["backup"], security=n["security"])
    worker = IncidentWorker(app_pool, pg_db.app_url, None, WorkerSettings(
        heartbeat_timeout=timedelta(seconds=2), unreachable_retries=(0.1,)), speech=Speech(),
        keyring=Keyring(app_pool, TEST_MASTER_KEY))
    async with worker:
        alarms = Alarms(rig, app_pool, None, None, worker)  # type: ignore[arg-type]
        incident = await alarms.raise_alarm("smoke")
        for _ in range(200):
            calls = await alarms.rows(
                "SELECT outcome FROM iim.incident_action WHERE incident_id = $1 AND kind = 'call'", incident)
            if calls and all(c["outcome"] is not None for c in calls):
                break
            await asyncio.sleep(0.05)
        assert {c["outcome"] for c in calls} == {"unreachable"}
        texted = await alarms.rows("SELECT DISTINCT msisdn FROM iim.sms_outbox WHERE incident_id = $1", incident)
        assert rig.owner in {t["msisdn"] for t in texted}
    assert "AssertionError" not in caplog.text
