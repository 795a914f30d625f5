"""A worker SIGKILLed mid-escalation: the next worker resumes the incident and calls nobody twice.

IIM runs as a real `iim serve` process (scenario worker + outbound server for the IVR + inbound ESL to
the emulator), against the module's PostgreSQL. The owner's phone is still ringing when the process is
killed; the owner answers, the call's IVR reaches the second process, which knows no such call: it
hangs up, settles the call as interrupted (never redialled) and escalates to the backup contact, who
confirms.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from fs_app.testing import FreeSwitchEmulator, TargetBehaviour
from iot_bridge.events import DeviceEvent, body_fingerprint
from iot_bridge.intake import KnownDevice, accept_event
from policy_cache import audit
from policy_cache.db import Pool, tenant_tx
from tests.alarm_rig import build_rig
from tests.pg import TEST_MASTER_KEY_ENV

GW = "sofia/gateway/ims/{}"
ESL_PASSWORD = "crash-test-esl-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_iim(pg_db: Any, fs_port: int, esl_port: int, log: Path) -> subprocess.Popen[bytes]:
    env = os.environ | {
        "IIM_APP_DATABASE_URL": pg_db.app_url, "IIM_CACHE_DATABASE_URL": pg_db.cache_url,
        "IIM_FS_NODES": json.dumps([{"host": "127.0.0.1", "port": fs_port}]), "IIM_FS_PASSWORD": ESL_PASSWORD,
        "IIM_ESL_PORT": str(esl_port), "IIM_HTTP_PORT": "0", "IIM_BRIDGE_ENABLED": "false",
        "IIM_DATA_DIR": str(log.parent / "iim-data" / "pg"),  # not the checkout's .iim-data of an `iim serve`
        "IIM_JOB_HEARTBEAT_TIMEOUT_S": "2", "IIM_LOG_LEVEL": "INFO", "IIM_DRAIN_TIMEOUT": "1",
        **TEST_MASTER_KEY_ENV,
    }
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "iim", "serve"], env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _read(log: Path) -> str:
    return log.read_text(errors="replace")


async def _wait_serving(log: Path, count: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while _read(log).count("IIM serving") < count:
        assert proc.poll() is None, _read(log)[-3000:]
        assert time.monotonic() < deadline, _read(log)[-3000:]
        await asyncio.sleep(0.1)


async def _state(pool: Pool, tenant: UUID, incident: UUID) -> str:
    async with tenant_tx(pool, tenant) as conn:
        return str(await conn.fetchval("SELECT state::text FROM iim.incident WHERE id = $1", incident))


async def test_an_answered_call_whose_worker_was_sigkilled_is_adopted_and_the_owner_heard(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    rig = await build_rig(app_pool, tmp_path, owner="+79004440001", backup="+79004440002",
                          security="+79004440003")
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.no_answer())
    emu.targets[GW.format(rig.owner)] = TargetBehaviour.answer(after_ms=6000, dtmf="1")
    emu.targets[GW.format(rig.backup)] = TargetBehaviour.answer(after_ms=300, dtmf="1")
    inbound = await emu.start_inbound(password=ESL_PASSWORD)
    esl_port = _free_port()
    log = tmp_path / "iim.log"
    first = _start_iim(pg_db, inbound.port, esl_port, log)
    second: subprocess.Popen[bytes] | None = None
    try:
        await _wait_serving(log, 1, first)
        raw = rig.event("smoke")
        event = DeviceEvent.model_validate(json.loads(raw))
        device = KnownDevice(rig.tenant_id, rig.sensor_id, rig.household_id, rig.sensor, "sensor")
        outcome = await accept_event(app_pool, device, event, fingerprint=body_fingerprint(raw), channel="device",
                                     msg_id=None)
        incident = outcome.incident_id
        assert incident is not None

        deadline = time.monotonic() + 20
        while not emu.originates_to(rig.owner):
            assert time.monotonic() < deadline, _read(log)[-3000:]
            await asyncio.sleep(0.02)
        first.send_signal(signal.SIGKILL)  # mid-escalation: the owner's phone is ringing
        first.wait(10)

        second = _start_iim(pg_db, inbound.port, esl_port, log)
        await _wait_serving(log, 2, second)
        deadline = time.monotonic() + 40
        while (state := await _state(app_pool, rig.tenant_id, incident)) in ("open", "notifying"):
            assert time.monotonic() < deadline, _read(log)[-4000:]
            await asyncio.sleep(0.1)
        assert state == "acknowledged"
        assert len(emu.originates_to(rig.owner)) == 1  # dispatched once, never redialled
        # The owner who answered and pressed 1 was heard by the surviving IIM: nobody else is woken up.
        assert emu.originates_to(rig.backup) == []
        await audit.flush_pending(app_pool)
        async with tenant_tx(app_pool, rig.tenant_id) as conn:
            resumed = await conn.fetchval(
                "SELECT count(*) FROM iim.audit_log WHERE action = 'incident.call_adopted' AND entity_id = $1",
                str(incident))
            sms = await conn.fetchval("SELECT count(*) FROM iim.sms_outbox WHERE incident_id = $1", incident)
            actions = [dict(r) for r in await conn.fetch(
                "SELECT key, kind, destination, outcome, detail FROM iim.incident_action WHERE incident_id = $1 "
                "ORDER BY key", incident)]
        assert resumed == 1
        # The owner once (the smoke template texts with every call), and the "help is on the way" notification
        # as a text to the owner (this household has no smart-home connector).
        assert sms == 2, "\n".join(map(str, actions))
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        await emu.close()
