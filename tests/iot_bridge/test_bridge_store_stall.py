"""A stalled PostgreSQL (every process SIGSTOPped: connections stay open, nothing answers) costs a device (or
an operator on the admin API) a quick 503, not a hung request; ``/health`` says degraded; and the event the
device retries is acted on once.

A PostgreSQL of its own for this module (stopping the session's shared server would stall every other test).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from iim.admin.api import create_registry_app, mount_registry
from iim.admin.auth import TokenTable, hash_token
from iim.admin.settings import AdminSettings
from iim.http import HttpSite
from iim.http import create_app as create_root_app
from iot_bridge.app import BridgeConfig, create_bridge_app
from iot_bridge.ratelimit import RateLimitSettings
from policy_cache.bootstrap import Database, bootstrap
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from policy_cache.health import DatabaseProbe
from tests import run_guard
from tests.alarm_rig import AlarmRig, build_rig
from tests.iot_bridge.test_bridge_http import BridgeClient, _client_ssl, _serve, tls_files

__all__ = ["tls_files"]


def _server_processes(data_dir: Path) -> list[int]:
    """The postmaster (from its pid file) and every process it started."""
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                children.append(int(stat.parent.name))
    return [postmaster, *children]


@dataclass
class Stall:
    data_dir: Path
    stopped: list[int] | None = None

    def start(self) -> None:
        self.stopped = _server_processes(self.data_dir)
        for pid in self.stopped:
            os.kill(pid, signal.SIGSTOP)

    def end(self) -> None:
        stopped, self.stopped = self.stopped, None
        for pid in stopped or ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.start()
        try:
            yield
        finally:
            self.end()


@pytest_asyncio.fixture
async def own_db(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Database, Path]]:
    data_dir = tmp_path_factory.mktemp("stall") / "pg"
    run_guard.remove_on_exit(data_dir.parent)
    db = await bootstrap(data_dir=data_dir, demo=False)
    try:
        yield db, data_dir
    finally:
        await db.aclose()


@dataclass
class Rig:
    client: BridgeClient
    alarms: AlarmRig
    pool: Pool
    probe: DatabaseProbe
    stall: Stall
    admin: str


@pytest_asyncio.fixture
async def stalled_rig(own_db: tuple[Database, Path], tls_files: tuple[Path, Path],
                      tmp_path: Path) -> AsyncIterator[Rig]:
    db, data_dir = own_db
    # The service's pool settings (defaults: 30 s per statement, 10 s for a connection): the bridge's own
    # deadline must bound the request, not these.
    pool = await connect_pool(db.app_url, role=DbRole.APP, min_size=2, max_size=4)
    alarms = await build_rig(pool, tmp_path)
    config = BridgeConfig(rate_limits=RateLimitSettings(device_rate=100, device_burst=100), store_deadline_s=1.5)
    runner, port = await _serve(create_bridge_app(pool, config), tls_files)
    root = create_root_app([])
    tokens = TokenTable.from_json(json.dumps({hash_token("t"): {"actor": "ops", "role": "admin"}}))
    mount_registry(root, create_registry_app(lambda: pool, AdminSettings(store_deadline_s=1.5), tokens=tokens))
    stall = Stall(data_dir)
    try:
        async with DatabaseProbe(pool, interval=0.25, timeout=0.5) as probe, HttpSite(root, "127.0.0.1", 0) as admin, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_client_ssl()),
                                      timeout=aiohttp.ClientTimeout(total=10)) as session:
            yield Rig(BridgeClient(session, f"https://127.0.0.1:{port}"), alarms, pool, probe, stall,
                      f"http://127.0.0.1:{admin.port}")
    finally:
        stall.end()
        await runner.cleanup()
        await asyncio.wait_for(pool.close(), 20)


async def _rows(pool: Pool, rig: AlarmRig, sql: str, *args: Any) -> list[dict[str, Any]]:
    async with tenant_tx(pool, rig.tenant_id) as conn:
        return [dict(r) for r in await conn.fetch(sql, *args)]


async def _until(check: Any, seconds: float) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_a_stalled_database_is_a_quick_503_and_the_retried_event_is_acted_on_once(
        stalled_rig: Rig) -> None:
    rig, client = stalled_rig.alarms, stalled_rig.client
    warm = rig.event("heartbeat")
    assert (await client.post("/v1/events", warm, rig.signed_headers(warm)))[0] == 202  # the keys are cached
    assert stalled_rig.probe.health()["status"] == "ok"
    smoke = rig.event("smoke", event_id="ev-during-stall")
    with stalled_rig.stall.held():
        for body, device in ((smoke, rig.sensor), (rig.event("smoke", device=rig.doorphone), rig.doorphone)):
            # A cached device (the intake transaction stalls) and an uncached one (its key lookup stalls).
            started = time.monotonic()
            status, headers, problem = await client.post("/v1/events", body, rig.signed_headers(body, device=device))
            elapsed = time.monotonic() - started
            assert (status, problem["error_id"]) == (503, "store-unavailable"), problem
            assert int(headers["Retry-After"]) > 0
            assert elapsed < 2.5, elapsed
        await _until(lambda: stalled_rig.probe.health()["status"] == "degraded", 2.0)
        started = time.monotonic()  # the admin API on the same pool: its own deadline, the same kind of answer
        async with client.session.get(f"{stalled_rig.admin}/v1/tenants/{rig.tenant_id}/households",
                                      headers={"Authorization": "Bearer t"}) as resp:
            assert resp.status == 503, await resp.text()
            assert (await resp.json(content_type=None))["error_id"] == "store-unavailable"
            assert int(resp.headers["Retry-After"]) > 0
        assert time.monotonic() - started < 2.5
        await asyncio.sleep(1.0)  # the stall goes on a while after the device was told 503
    await _until(lambda: stalled_rig.probe.health()["status"] == "ok", 5.0)
    # The device retries the same event: accepted (or, had its first COMMIT gone through, the first answer).
    for _ in range(50):
        status, _, answer = await client.post("/v1/events", smoke, rig.signed_headers(smoke))
        if status == 202:
            break
        await asyncio.sleep(0.1)
    assert status == 202, answer
    incidents = await _rows(stalled_rig.pool, rig, "SELECT id, event_count FROM iim.incident WHERE hazard = 'smoke'")
    assert [(str(i["id"]), i["event_count"]) for i in incidents] == [(answer["incident_id"], 1)]
    ledger = await _rows(stalled_rig.pool, rig, "SELECT count(*) AS n FROM iim.device_event WHERE event_id = $1",
                         "ev-during-stall")
    assert ledger == [{"n": 1}]
    async with stalled_rig.pool.acquire() as conn:
        ticks = await conn.fetchval("SELECT count(*) FROM iim_jobs.pgqueuer WHERE entrypoint = 'incident.tick' "
                                    "AND dedupe_key = $1", f"open:{answer['incident_id']}")
    assert ticks == 1
    again = await client.post("/v1/events", smoke, rig.signed_headers(smoke))
    assert (again[0], again[1].get("Idempotent-Replayed"), again[2]) == (202, "true", answer)
