"""A data-key rotation whose service was SIGKILLed mid-way is resumed by the next `iim serve` and finishes: every
row sealed under the new key (opening to its text), no second key, each row counted once, audited start to
finish; its status readable through the API and `iim keys status` across the restart.

IIM runs as real `iim serve` processes against the module's PostgreSQL; the API over a real socket."""

from __future__ import annotations

import asyncio
import hashlib
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

import aiohttp

from iim.keys.keyring import Keyring
from iim.sms import store as sms_store
from policy_cache import audit
from policy_cache.db import Pool, tenant_tx
from tests.pg import TEST_MASTER_KEY, TEST_MASTER_KEY_ENV, PgDatabase, create_tenant, opened

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "rotation-restart-admin-token"
ROWS = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_iim(pg_db: PgDatabase, port: int, log: Path) -> subprocess.Popen[bytes]:
    tokens = {hashlib.sha256(TOKEN.encode()).hexdigest(): {"actor": "keys@noc", "role": "admin"}}
    env = os.environ | {
        "IIM_APP_DATABASE_URL": pg_db.app_url, "IIM_CACHE_DATABASE_URL": pg_db.cache_url,
        "IIM_ESL_PORT": str(_free_port()), "IIM_HTTP_PORT": str(port), "IIM_BRIDGE_ENABLED": "false",
        "IIM_DATA_DIR": str(log.parent / "iim-data" / "pg"), "IIM_LOG_LEVEL": "INFO", "IIM_DRAIN_TIMEOUT": "1",
        "IIM_TEST_ADMIN_TOKENS": json.dumps(tokens), "IIM_ADMIN_TOKENS_REF": "env:IIM_TEST_ADMIN_TOKENS",
        **TEST_MASTER_KEY_ENV,
    }
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "iim", "serve"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _read(log: Path) -> str:
    return log.read_text(errors="replace")


async def _wait_serving(log: Path, count: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _read(log).count("IIM serving") < count:
        assert proc.poll() is None, _read(log)[-3000:]
        assert time.monotonic() < deadline, _read(log)[-3000:]
        await asyncio.sleep(0.1)


async def _job(pool: Pool, tenant: UUID) -> dict[str, Any]:
    async with tenant_tx(pool, tenant, readonly=True) as conn:
        row = await conn.fetchrow("SELECT state, key_id, resealed, runs FROM iim.key_rotation_job")
    assert row is not None
    return dict(row)


async def test_a_rotation_killed_mid_way_is_resumed_by_the_next_service_and_seals_every_row_once(
        app_pool: Pool, pg_db: PgDatabase, tmp_path: Path) -> None:
    tenant = await create_tenant(app_pool, "Rotating")
    keyring = Keyring(app_pool, TEST_MASTER_KEY)
    async with tenant_tx(app_pool, tenant) as conn:
        key = await keyring.active(conn, tenant)
        for n in range(ROWS):
            await sms_store.enqueue_sms(conn, key=f"r/{n}", msisdn="+79001112233", body=f"secret {n}", data_key=key)
    port, log = _free_port(), tmp_path / "iim.log"
    base = f"http://127.0.0.1:{port}/v1"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    first = _start_iim(pg_db, port, log)
    second: subprocess.Popen[bytes] | None = None
    try:
        await _wait_serving(log, 1, first)
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.post(f"{base}/tenants/{tenant}/keys/rotate", json={"batch": 1}) as resp:
                started = await resp.json()
                assert resp.status == 202, started
            deadline = time.monotonic() + 30
            while (job := await _job(app_pool, tenant))["resealed"].get("sms_outbox", 0) < 30:
                assert job["state"] == "running", job  # too fast to be cut: raise ROWS
                assert time.monotonic() < deadline, _read(log)[-3000:]
                await asyncio.sleep(0.01)
            first.send_signal(signal.SIGKILL)  # mid-way: some rows on key 2, the rest on key 1
            first.wait(10)
            cut = await _job(app_pool, tenant)
            assert (cut["state"], cut["key_id"], cut["runs"]) == ("running", 2, 1)
            assert cut["resealed"]["sms_outbox"] < ROWS

            second = _start_iim(pg_db, port, log)
            await _wait_serving(log, 2, second)
            deadline = time.monotonic() + 60
            while True:  # the status is the database's: readable from the new process
                async with http.get(f"{base}/tenants/{tenant}/keys/rotation") as resp:
                    shown = await resp.json()
                    assert resp.status == 200, shown
                if shown["state"] != "running":
                    break
                assert time.monotonic() < deadline, _read(log)[-3000:]
                await asyncio.sleep(0.1)
            assert (shown["id"], shown["state"], shown["key_id"], shown["runs"], shown["unreadable"]) == (
                started["id"], "done", 2, 2, 0)
            # Each row counted once: at most the one batch committed just before the kill went uncounted.
            assert ROWS - 1 <= shown["resealed"]["sms_outbox"] <= ROWS
            async with http.get(f"{base}/keys", params={"tenant_id": str(tenant)}) as resp:
                page = await resp.json()
            [item] = page["items"]
            assert [(k["key_id"], k["rows"]) for k in item["keys"]] == [(1, 0), (2, ROWS)]  # no second new key
            assert (item["rotation"]["id"], item["rotation"]["state"]) == (started["id"], "done")

        async with tenant_tx(app_pool, tenant, readonly=True) as conn:
            rows = await conn.fetch("SELECT tenant_id, key, body, body_key FROM iim.sms_outbox ORDER BY key")
        assert {r["body_key"] for r in rows} == {2}
        clear = {r["key"]: await opened(app_pool, r) for r in rows}
        assert clear == {f"r/{n}": f"secret {n}" for n in range(ROWS)}  # nothing sealed twice, nothing garbled

        await audit.flush_pending(app_pool)
        async with tenant_tx(app_pool, tenant, readonly=True) as conn:
            actions = [r["action"] for r in await conn.fetch(
                "SELECT action FROM iim.audit_log WHERE action LIKE 'keys.%' ORDER BY id")]
            assert await audit.verify_chain(conn, tenant) is None
        assert actions[0] == "keys.rotation_requested"
        assert actions.count("keys.data_key_rotated") == 1
        assert actions.count("keys.rotation_resumed") == 1
        assert actions[-1] == "keys.rotation_done"

        status = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "iim", "keys", "status", "--tenant", str(tenant), "--database-url",
            pg_db.admin_url], cwd=ROOT, env=os.environ | {"IIM_DATA_DIR": str(tmp_path / "cli-pg"),
                                                          **TEST_MASTER_KEY_ENV},
            capture_output=True, text=True, timeout=120, check=False)
        assert status.returncode == 0, status.stderr
        rotation = json.loads(status.stdout)["rotation"]
        assert (rotation["id"], rotation["state"], rotation["runs"]) == (started["id"], "done", 2)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
