"""The assembled service: `iim serve` answers calls, exports metrics and health, logs JSON lines."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fs_app.inbound import InboundClient
from fs_app.outbound import OutboundServer
from fs_app.testing import CallSpec, FreeSwitchEmulator, TargetBehaviour
from iim.call_audit import CallDecisionAudit
from iim.connectors.registry import ConnectorRegistry
from iim.core.secrets import resolve_secret
from iim.http import HttpSite
from iim.logs import JsonFormatter
from iim.scenarios.worker import IncidentWorker
from iim.service import DatabaseUrls, Service
from iim.settings import Settings
from iim.tts.engine import EspeakTts
from policy_cache.audit import AuditFlusher
from policy_cache.bootstrap import load_demo
from policy_cache.cache import PolicyCache
from policy_cache.db import Connection, Pool, tenant_tx
from policy_cache.models import FallbackAction, RingMode
from policy_cache.store import PgPolicyStore
from tests.home_delivery_rig import build_home, create_tenant
from tests.pg import PgDatabase, opened
from tests.recorded_switch import _kind, replay_call

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def urls(pg_db: PgDatabase, app_pool: Pool) -> DatabaseUrls:
    async with app_pool.acquire() as conn:
        await load_demo(conn)
    return DatabaseUrls(pg_db.app_url, pg_db.cache_url)


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Every listener on a free port; speech cache and bridge certificate under ``tmp_path``."""
    values: dict[str, Any] = {"esl_port": 0, "http_port": 0, "bridge_port": 0, "data_dir": str(tmp_path / "pg")}
    values.update(overrides)
    return Settings(**values)


async def test_service_routes_a_call_and_reports_it_on_metrics_and_health(urls: DatabaseUrls, tmp_path: Path) -> None:
    async with Service(_settings(tmp_path), database=urls) as service:
        http_port = service.running.http_port
        result = await replay_call("o02_bridge_answered_callee_hangs_up", "127.0.0.1", service.outbound.port)
        kinds = [_kind(c) for c in result.commands]
        assert kinds[:4] == ["Connect", "Linger", "MyEvents", "execute:bridge"]  # no server-side filter
        assert kinds[-2:] == ["execute:bridge", "hangup"]  # then closed: no ``exit`` to a hung-up channel
        for _ in range(100):
            if service.outbound.active_calls == 0:
                break
            await asyncio.sleep(0.01)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{http_port}/metrics") as resp:
                text = await resp.text()
            async with http.get(f"http://127.0.0.1:{http_port}/health") as resp:
                health = await resp.json()
                assert resp.status == 200
        assert re.search(r'^iim_esl_calls_total\{result="ok"\} [1-9]', text, re.MULTILINE)
        assert "iim_esl_call_setup_seconds_bucket" in text
        assert health["status"] == "ok"
        assert health["active_calls"] == 0
        assert health["policy_cache"]["ready"] is True
        assert health["database"]["answering"] is True  # the bounded probe of PostgreSQL itself
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{http_port}/openapi.json") as resp:
            document = await resp.json()
        assert "/v1/tenants" in document["paths"]


async def test_what_the_service_builds_at_start_is_out_of_the_collectors_scans(urls: DatabaseUrls,
                                                                                tmp_path: Path) -> None:
    """A full collection on the call path must not rescan the routes, pools and caches built at start."""
    gc.unfreeze()
    async with Service(_settings(tmp_path), database=urls) as service:
        tracked = {id(o) for o in gc.get_objects()}
        assert id(service.outbound) not in tracked
        policy = service.running.policy
        assert policy is not None
        assert id(policy.router) not in tracked  # built after the policy cache froze its load


async def test_health_is_degraded_while_a_freeswitch_node_is_unreachable(
        urls: DatabaseUrls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IIM_FS_PASSWORD", "test-esl-secret")
    dead_port = _free_port()
    settings = _settings(tmp_path, fs_nodes=[{"host": "127.0.0.1", "port": dead_port, "name": "fs1"}])
    async with Service(settings, database=urls) as service, aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{service.running.http_port}/health") as resp:
        body = await resp.json()
    assert resp.status == 200
    assert body["status"] == "degraded"
    assert body["freeswitch_nodes"] == {"fs1": False}


async def test_connectors_are_listed_at_the_documented_path_to_token_holders_only(
        urls: DatabaseUrls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = {hashlib.sha256(b"viewer-token").hexdigest(): {"actor": "noc", "role": "viewer"}}
    monkeypatch.setenv("IIM_TEST_ADMIN_TOKENS", json.dumps(table))
    monkeypatch.setenv("IIM_ADMIN_TOKENS_REF", "env:IIM_TEST_ADMIN_TOKENS")
    settings = _settings(tmp_path, connectors=[{"name": "ghost", "plugin": "no-such-plugin"}])
    async with Service(settings, database=urls) as service, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.running.http_port}"
        bearer = {"Authorization": "Bearer viewer-token"}
        async with http.get(f"{base}/v1/connectors", headers=bearer) as resp:
            assert resp.status == 200
            listing = await resp.json()
        async with http.get(f"{base}/v1/connectors") as resp:
            assert resp.status == 401
            assert resp.content_type == "application/problem+json"
        async with http.get(f"{base}/v1/v1/connectors", headers=bearer) as resp:
            assert resp.status == 404
    assert [c["name"] for c in listing["connectors"]] == ["ghost"]  # the configured one, failed to load


async def test_signed_audit_heads_are_published_to_the_file_the_log_and_the_api(
        urls: DatabaseUrls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from policy_cache.audit_heads import read_heads, verify_head_signature

    table = {hashlib.sha256(b"viewer-token").hexdigest(): {"actor": "noc", "role": "viewer"}}
    monkeypatch.setenv("IIM_TEST_ADMIN_TOKENS", json.dumps(table))
    monkeypatch.setenv("IIM_ADMIN_TOKENS_REF", "env:IIM_TEST_ADMIN_TOKENS")
    key = Ed25519PrivateKey.generate()
    monkeypatch.setenv("IIM_TEST_AUDIT_KEY", key.private_bytes_raw().hex())
    heads = tmp_path / "heads.jsonl"
    settings = _settings(tmp_path, audit_head_key_ref="env:IIM_TEST_AUDIT_KEY", audit_heads_file=str(heads))
    async with Service(settings, database=urls) as service, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.running.http_port}"
        async with http.get(f"{base}/v1/audit/head", headers={"Authorization": "Bearer viewer-token"}) as resp:
            assert resp.status == 200
            served = (await resp.json())["heads"]
        async with http.get(f"{base}/v1/audit/head") as resp:
            assert resp.status == 401
    assert served  # the demo data's tenants have chains
    assert all(verify_head_signature(line, key.public_key()) for line in served)
    written = read_heads(heads)
    assert {(h["tenant_id"], h["seq"]) for h in served} <= {(h["tenant_id"], h["seq"]) for h in written}


def test_an_unusable_audit_head_key_refuses_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from iim.core.errors import ConfigError

    monkeypatch.setenv("IIM_TEST_AUDIT_KEY", "not a key")
    service = Service(_settings(tmp_path, audit_head_key_ref="env:IIM_TEST_AUDIT_KEY"))
    with pytest.raises(ConfigError, match="audit head signing key"):
        service._audit_heads(None)  # type: ignore[arg-type]


# -- lifecycle: a start that fails at any stage leaves nothing behind; stopping is the reverse of starting --

_PARTS = (OutboundServer, InboundClient, AuditFlusher, PgPolicyStore, PolicyCache, CallDecisionAudit,
          ConnectorRegistry, EspeakTts, IncidentWorker, HttpSite)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def lifecycle(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every start and aclose of the service's parts, in order, as ("start"|"aclose", part)."""
    events: list[tuple[str, str]] = []
    for cls in _PARTS:
        for verb in ("start", "aclose"):
            original = getattr(cls, verb)

            def recorder(self: Any, *args: Any, _verb: str = verb, _original: Any = original,
                         **kwargs: Any) -> Any:
                label = type(self).__name__
                if isinstance(self, HttpSite):
                    label += ":bridge" if self._ssl_context is not None else ":http"
                events.append((_verb, label))
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, verb, recorder)
    return events


async def _database_backends(admin: Connection, database: str) -> int:
    count: int = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", database)
    return count


async def _assert_nothing_left(tasks_before: set[asyncio.Task[Any]], ports: list[int], admin: Connection,
                               database: str, backends_before: int) -> None:
    """No task, no listening socket, no database connection survives the failed start."""
    assert asyncio.all_tasks() - tasks_before == set()
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # raises EADDRINUSE if a listener was left open
    deadline = asyncio.get_running_loop().time() + 5
    while await _database_backends(admin, database) != backends_before:  # backends exit a moment after close
        assert asyncio.get_running_loop().time() < deadline, "a database connection was left open"
        await asyncio.sleep(0.05)


def _started_and_closed(events: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    started = [part for verb, part in events if verb == "start"]
    closed = list(dict.fromkeys(part for verb, part in events if verb == "aclose"))  # first aclose of each
    return started, closed


async def _fail_to_start(settings: Settings, urls: DatabaseUrls, expected: type[BaseException]) -> None:
    service = Service(settings, database=urls)
    with pytest.raises(expected):
        await service.start()
    with pytest.raises(RuntimeError, match="not running"):
        _ = service.running


@pytest.mark.parametrize("stage", ["ESL port taken", "database unreachable", "bad bridge TLS file",
                                   "HTTP port taken"])
async def test_a_start_failing_at_any_stage_unwinds_exactly_what_started(
        stage: str, urls: DatabaseUrls, pg_db: PgDatabase, admin_conn: Connection, tmp_path: Path,
        lifecycle: list[tuple[str, str]]) -> None:
    ports = [_free_port() for _ in range(3)]
    settings = _settings(tmp_path, esl_port=ports[0], http_port=ports[1], bridge_port=ports[2])
    tasks_before = asyncio.all_tasks()
    backends_before = await _database_backends(admin_conn, pg_db.name)
    if stage == "database unreachable":
        dead = f"postgresql://iim_app@127.0.0.1:{_free_port()}/iim"
        await _fail_to_start(settings, DatabaseUrls(dead, dead), OSError)
    elif stage == "bad bridge TLS file":
        settings = settings.model_copy(update={"bridge_tls_cert_file": str(tmp_path / "missing-cert.pem"),
                                               "bridge_tls_key_file": str(tmp_path / "missing-key.pem")})
        await _fail_to_start(settings, urls, OSError)
    else:
        taken = ports[0] if stage == "ESL port taken" else ports[1]
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", taken))
            holder.listen()
            await _fail_to_start(settings, urls, OSError)
    await _assert_nothing_left(tasks_before, ports, admin_conn, pg_db.name, backends_before)
    started, closed = _started_and_closed(lifecycle)
    assert "OutboundServer" in started
    assert sorted(closed) == sorted(set(started))  # what started was closed (and the part that failed)
    if stage == "HTTP port taken":
        assert started[-1] == "HttpSite:http"
        assert "IncidentWorker" in started  # a late stage: nearly everything had started, and was unwound
        assert "HttpSite:bridge" in started


async def test_stopping_reverses_starting_with_calls_drained_while_their_parts_are_up(
        urls: DatabaseUrls, tmp_path: Path, lifecycle: list[tuple[str, str]]) -> None:
    async with Service(_settings(tmp_path), database=urls):
        started, _ = _started_and_closed(lifecycle)
    _, closed = _started_and_closed(lifecycle)
    assert started == ["OutboundServer", "AuditFlusher", "PgPolicyStore", "PolicyCache", "CallDecisionAudit",
                       "ConnectorRegistry", "EspeakTts", "IncidentWorker", "HttpSite:bridge", "HttpSite:http"]
    # Calls drain (the outbound server's aclose) right after the worker stops, before the router's parts.
    assert closed == ["HttpSite:http", "HttpSite:bridge", "IncidentWorker", "OutboundServer", "EspeakTts",
                      "ConnectorRegistry", "CallDecisionAudit", "PolicyCache", "PgPolicyStore", "AuditFlusher"]
    assert [p for p in closed if p != "OutboundServer"] == [p for p in reversed(started) if p != "OutboundServer"]


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
    env = {**os.environ, "IIM_ESL_PORT": str(ports[0]), "IIM_HTTP_PORT": str(ports[1]),
           "IIM_POLICY_ROUTING": "false"}
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


def test_iim_serve_with_every_part_stops_cleanly_on_sigterm(urls: DatabaseUrls, tmp_path: Path) -> None:
    """The whole stack (policy, worker, bridge, HTTP) under `iim serve`: SIGTERM unwinds it and exits 0."""
    ports = [_free_port() for _ in range(3)]
    env = {**os.environ, "IIM_ESL_PORT": str(ports[0]), "IIM_HTTP_PORT": str(ports[1]),
           "IIM_BRIDGE_PORT": str(ports[2]), "IIM_DATA_DIR": str(tmp_path / "pg"),
           "IIM_APP_DATABASE_URL": urls.app_url, "IIM_CACHE_DATABASE_URL": urls.cache_url}
    proc = subprocess.Popen([sys.executable, "-m", "iim", "serve"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines = []
        while not lines or lines[-1]["msg"] != "IIM serving":
            line = proc.stderr.readline()
            assert line, f"iim serve exited before serving: {lines}"
            lines.append(json.loads(line))
        assert lines[-1]["bridge"] == f"https://127.0.0.1:{ports[2]}"
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        rest = [json.loads(line)["msg"] for line in proc.stderr.read().splitlines() if line.startswith("{")]
        assert "stopping: draining calls" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stderr is not None:
            proc.stderr.close()


async def test_tests_run_on_uvloop_like_the_service() -> None:
    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_speech_uses_the_configured_library_so_an_instance_can_run_with_speech_down(
        urls: DatabaseUrls, tmp_path: Path) -> None:
    """``IIM_TTS_LIBRARY`` (the fault-injection suite's "TTS down"): prompts then fall back to the switch's TTS."""
    broken = str(tmp_path / "no-libespeak-ng-here.so")
    async with Service(_settings(tmp_path, tts_library=broken, bridge_enabled=False), database=urls) as service:
        assert service.running.policy is not None
        assert service.running.policy.tts.library == broken


async def test_a_call_nobody_answers_queues_the_missed_call_sms_its_policy_asks_for(
        pg_db: PgDatabase, app_pool: Pool, tmp_path: Path) -> None:
    """The service's router had no missed-call notifier: the SMS was never queued (sip-tests exposed it)."""
    tenant = await create_tenant(app_pool, "missed-call")
    await build_home(app_pool, tenant, "+79105550001", speaker=False, ring_mode=RingMode.PHONE_ONLY,
                     fallback=FallbackAction.MISSED_CALL_SMS)
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.no_answer(), time_scale=0.01)
    try:
        (tmp_path / "master.key").write_text(bytes(range(32)).hex())  # TEST_MASTER_KEY: the test reads the body
        settings = _settings(tmp_path, master_key_ref=f"file:{tmp_path / 'master.key'}")
        async with Service(settings, database=DatabaseUrls(pg_db.app_url, pg_db.cache_url)) as service:
            result = await emu.place_call("127.0.0.1", service.outbound.port, CallSpec(
                destination="79105550001", caller_id_number="+4930111222"))
    finally:
        await emu.close()
    async with tenant_tx(app_pool, tenant) as conn:
        queued = [{"key": r["key"], "msisdn": r["msisdn"], "body": await opened(conn, r)}
                  for r in await conn.fetch("SELECT tenant_id, key, msisdn, body, body_key FROM iim.sms_outbox")]
    assert queued == [{"key": f"missed-call:{result.uuid}", "msisdn": "+79105550001",
                       "body": "Missed call from +4930111222: nobody took it at home."}]
