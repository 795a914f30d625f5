"""The assembled service: `iim serve` answers calls, exports metrics and health, logs JSON lines."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from iim.core.secrets import resolve_secret
from iim.logs import JsonFormatter
from iim.service import DatabaseUrls, Service
from iim.settings import Settings
from policy_cache.bootstrap import load_demo
from policy_cache.db import Pool
from tests.pg import PgDatabase
from tests.recorded_switch import _kind, replay_call

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def urls(pg_db: PgDatabase, app_pool: Pool) -> DatabaseUrls:
    async with app_pool.acquire() as conn:
        await load_demo(conn)
    return DatabaseUrls(pg_db.app_url, pg_db.cache_url)


async def test_service_routes_a_call_and_reports_it_on_metrics_and_health(urls: DatabaseUrls, tmp_path: Path) -> None:
    service = Service(Settings(esl_port=0, http_port=0, bridge_port=0, data_dir=str(tmp_path / "pg")), database=urls)
    await service.start()
    try:
        result = await replay_call("o02_bridge_answered_callee_hangs_up", "127.0.0.1", service.outbound.port)
        kinds = [_kind(c) for c in result.commands]
        assert kinds[:4] == ["Connect", "Linger", "MyEvents", "Filter"]
        assert kinds[-3:] == ["execute:bridge", "hangup", "Exit"]
        for _ in range(100):
            if service.outbound.active_calls == 0:
                break
            await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{service.http_port}/metrics") as resp:
                text = await resp.text()
            async with http.get(f"http://127.0.0.1:{service.http_port}/health") as resp:
                health = await resp.json()
                assert resp.status == 200
        assert re.search(r'^iim_esl_calls_total\{result="ok"\} [1-9]', text, re.MULTILINE)
        assert "iim_esl_call_setup_seconds_bucket" in text
        assert health["status"] == "ok"
        assert health["active_calls"] == 0
        assert health["policy_cache"]["ready"] is True
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{service.http_port}/openapi.json") as resp:
            document = await resp.json()
        assert "/v1/tenants" in document["paths"]
    finally:
        await service.stop()


async def test_what_the_service_builds_at_start_is_out_of_the_collectors_scans(
        urls: DatabaseUrls, tmp_path: Path) -> None:
    """A full collection on the call path must not rescan the routes, pools and caches built at start."""
    gc.unfreeze()
    service = Service(Settings(esl_port=0, http_port=0, bridge_port=0, data_dir=str(tmp_path / "pg")), database=urls)
    await service.start()
    try:
        tracked = {id(o) for o in gc.get_objects()}
        assert id(service.outbound) not in tracked
        assert service.router is not None
        assert id(service.router) not in tracked  # built after the policy cache froze its load
    finally:
        await service.stop()


async def test_health_is_degraded_while_a_freeswitch_node_is_unreachable(urls: DatabaseUrls, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    settings = Settings(esl_port=0, http_port=0, bridge_port=0, data_dir=str(tmp_path / "pg"),
                        fs_nodes=[{"host": "127.0.0.1", "port": dead_port, "name": "fs1"}])  # type: ignore[list-item]
    service = Service(settings, database=urls)
    await service.start()
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{service.http_port}/health") as resp:
            body = await resp.json()
        assert resp.status == 200
        assert body["status"] == "degraded"
        assert body["freeswitch_nodes"] == {"fs1": False}
    finally:
        await service.stop()


def test_log_lines_are_json_with_the_call_id() -> None:
    record = logging.LogRecord("iim.esl.outbound", logging.INFO, __file__, 1, "call ended", (), None)
    record.call_id = "f8bfccc5-4e64-4368-ba4f-6912c5a6a5af"
    line = json.loads(JsonFormatter().format(record))
    assert line["call_id"] == "f8bfccc5-4e64-4368-ba4f-6912c5a6a5af"
    assert line["msg"] == "call ended"
    assert line["level"] == "info"


def test_secrets_resolve_by_reference_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IIM_TEST_SECRET", "s3cret")
    assert resolve_secret("env:IIM_TEST_SECRET") == "s3cret"
    secret_file = tmp_path / "pw"
    secret_file.write_text("from-file\n")
    assert resolve_secret(f"file:{secret_file}") == "from-file"
    with pytest.raises(LookupError):
        resolve_secret("env:IIM_TEST_MISSING_SECRET")
    with pytest.raises(ValueError, match="scheme"):
        resolve_secret("ClueCon")


def test_everything_binds_to_loopback_by_default() -> None:
    settings = Settings()
    assert settings.esl_host == "127.0.0.1"
    assert settings.http_host == "127.0.0.1"


def test_iim_serve_starts_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    # Free ports and a data directory of its own: an `iim serve` may be running beside the tests.
    env = {**os.environ, "IIM_ESL_PORT": str(ports[0]), "IIM_HTTP_PORT": str(ports[1]), "IIM_BRIDGE_PORT": "0",
           "IIM_DATA_DIR": str(tmp_path / "pg"), "IIM_POLICY_ROUTING": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "iim", "serve"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        first = json.loads(proc.stderr.readline())
        assert first["msg"].startswith("outbound ESL server listening")
        serving = json.loads(proc.stderr.readline())
        assert serving["msg"] == "IIM serving"
        assert serving["esl"] == f"127.0.0.1:{ports[0]}"
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stderr is not None:
            proc.stderr.close()


async def test_tests_run_on_uvloop_like_the_service() -> None:
    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
