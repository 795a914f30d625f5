"""The fallback matrix end to end: SMSC down -> SMS queued and retried while the escalation goes on by voice;
an undelivered receipt moves the incident's judgement to now.

Real PostgreSQL, the FreeSWITCH emulator for the calls and the SMPP simulator (smpp34, its own process)
for the SMS. (Smart home down -> SMS: tests/iim/scenarios/test_scenario_notify.py; TTS down -> text:
tests/iim/home/test_home_delivery_sms.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import pytest_asyncio

from fs_app.testing import TargetBehaviour
from iim.sms.outbox import BackoffPolicy, SmsSender
from iim.sms.smpp import SmppSettings, SmppTransport
from iim.sms.smsc_sim import SmscProcess
from policy_cache.db import Pool, tenant_tx
from tests.iim.scenarios.test_scenario_worker import Alarms, alarms_rig

FAST = BackoffPolicy(base=0.2, factor=1.5, cap=1.0, jitter=0.1, max_attempts=50)


@pytest.fixture(scope="module")
def smsc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmscProcess]:
    proc = SmscProcess(tmp_path_factory.mktemp("smsc") / "smsc.jsonl")
    proc.start_sync()
    yield proc
    proc.stop_sync()


@pytest_asyncio.fixture
async def alarms(app_pool: Pool, pg_db: Any, tmp_path: Path) -> AsyncIterator[Alarms]:
    async with alarms_rig(app_pool, pg_db, tmp_path) as rig:
        yield rig


async def _statuses(alarms: Alarms, incident: UUID) -> list[str]:
    async with tenant_tx(alarms.pool, alarms.rig.tenant_id) as conn:
        return [r["status"] for r in await conn.fetch(
            "SELECT status FROM iim.sms_outbox WHERE incident_id = $1 ORDER BY key", incident)]


async def _until(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_smsc_down_the_escalation_goes_on_by_voice_and_the_sms_follows(
        alarms: Alarms, smsc: SmscProcess, app_pool: Pool) -> None:
    rig = alarms.rig
    await smsc.kill()
    transport = SmppTransport(SmppSettings("127.0.0.1", smsc.port, "iim", "secret", response_timeout=2.0,
                                           reconnect_min=0.05, reconnect_max=0.3))
    sender = SmsSender(app_pool, transport, keyring=alarms.worker.keyring, retry=FAST, poll_interval=0.05, throttle_pause=0.05)
    await sender.start()
    try:
        alarms.script(rig.owner, TargetBehaviour.no_answer())
        alarms.script(rig.backup, TargetBehaviour.answer(after_ms=100, dtmf="1"))
        incident = await alarms.raise_alarm("smoke")
        # Voice does not wait for SMS: owner, then backup, who confirms, all while the SMSC is down.
        assert await alarms.settled(incident) == "acknowledged"
        assert alarms.calls_to(rig.backup) == 1
        assert set(await _statuses(alarms, incident)) <= {"queued", "sending"}

        await smsc.restart()

        async def all_sent() -> bool:
            return set(await _statuses(alarms, incident)) == {"sent"}

        await _until(all_sent)
        assert any(rig.owner.lstrip("+") in r.dest for r in smsc.records())
    finally:
        await sender.aclose()


async def test_undelivered_receipt_is_recorded_on_a_live_incident_and_judged_now(alarms: Alarms) -> None:
    rig = alarms.rig
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=200_000, dtmf="2"))  # x0.01: rings 2 s
    incident = await alarms.raise_alarm("co", device=rig.jws_sensor, opener=alarms.worker.begin_in)
    rows = await alarms.rows("SELECT key FROM iim.incident_action WHERE incident_id = $1 AND kind = 'sms'", incident)
    assert len(rows) == 1
    await alarms.worker.sms_undelivered(rig.tenant_id, rows[0]["key"], incident)
    assert await alarms.rows("SELECT outcome FROM iim.incident_action WHERE key = $1", rows[0]["key"]) == [
        {"outcome": "undelivered"}]
    audit = await alarms.rows("SELECT 1 FROM iim.audit_log WHERE action = 'incident.sms_undelivered' "
                              "AND entity_id = $1", str(incident))
    assert len(audit) == 1
    assert await alarms.settled(incident) in ("false_alarm", "exhausted")
