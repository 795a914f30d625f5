"""User text never stops an alarm: names are rendered safe, and a call that cannot be built fails alone."""

from __future__ import annotations

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
