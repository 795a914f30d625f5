"""``/health``, ``/readyz``, ``/livez`` and ``iim health`` on a running service, against real peers: PostgreSQL
behind a cuttable proxy, the ESL emulator as a FreeSWITCH node, the SMPP simulator, an HTTP vendor cloud."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fs_app.testing import FreeSwitchEmulator
from iim.cli import main as cli_main
from iim.service import DatabaseUrls, Service
from iim.settings import Settings
from iim.sms.smsc_sim import SmscProcess
from policy_cache.bootstrap import load_demo
from policy_cache.db import Pool
from tests.connector_peer import SIGNING_SECRET_TEXT, STATIC_TOKEN, VendorPeer, serve
from tests.pg import PgDatabase
from tests.tcp_proxy import TcpFaultProxy

ESL_PASSWORD = "health-test-esl-secret"


@pytest.fixture
async def demo(app_pool: Pool) -> None:
    async with app_pool.acquire() as conn:
        await load_demo(conn)


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"esl_port": 0, "http_port": 0, "bridge_enabled": False,
                              "data_dir": str(tmp_path / "pg")}
    values.update(overrides)
    return Settings(**values)


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any], Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json(), resp.headers


async def _until(http: aiohttp.ClientSession, base: str, check: Callable[[dict[str, Any]], bool],
                 seconds: float = 20.0) -> dict[str, Any]:
    """The first ``/health`` document ``check`` accepts (polled every 0.1 s, up to ``seconds``)."""
    deadline = time.monotonic() + seconds
    while True:
        _, doc, _ = await _get(http, base + "/health")
        if check(doc):
            return doc
        assert time.monotonic() < deadline, f"/health never got there: {doc}"
        await asyncio.sleep(0.1)


def _status(doc: dict[str, Any], name: str) -> str | None:
    dep = doc.get("dependencies", {}).get(name)
    return None if dep is None else str(dep["status"])


@pytest.fixture
async def vendor() -> AsyncIterator[VendorPeer]:
    peer = VendorPeer()
    runner, peer.url = await serve(peer.app())
    yield peer
    await peer.close()
    await runner.cleanup()


@pytest.fixture
async def smsc(tmp_path: Path) -> AsyncIterator[SmscProcess]:
    proc = SmscProcess(tmp_path / "smsc.jsonl")
    await proc.start()
    yield proc
    await proc.aclose()


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("demo")
async def test_health_details_every_dependency_and_each_fault_takes_it_down_from_then_on(
        pg_db: PgDatabase, tmp_path: Path, vendor: VendorPeer, smsc: SmscProcess,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("IIM_FS_PASSWORD", ESL_PASSWORD)
    monkeypatch.setenv("IIM_SMPP_PASSWORD", "secret")
    monkeypatch.setenv("ACME_TOKEN", STATIC_TOKEN)
    monkeypatch.setenv("ACME_SIGNING", SIGNING_SECRET_TEXT)
    proxy = TcpFaultProxy(pg_db.app_url)
    await proxy.start()
    emu = FreeSwitchEmulator()
    inbound = await emu.start_inbound(password=ESL_PASSWORD)
    acme = {"name": "acme", "plugin": "webhook",
            "config": {"base_url": vendor.url, "paths": {"send_notification": "/notify"}, "probe_path": "/health",
                       "auth": {"kind": "bearer", "token_ref": "env:ACME_TOKEN"},
                       "signing_secret_ref": "env:ACME_SIGNING"}}
    settings = _settings(tmp_path, fs_nodes=[{"host": "127.0.0.1", "port": inbound.port, "name": "fs1"}],
                         smpp_host="127.0.0.1", smpp_port=smsc.port, connectors=[acme],
                         connector_probe_interval_s=0.2, connector_probe_timeout_s=2.0)
    try:
        async with Service(settings, database=DatabaseUrls(proxy.dsn(), pg_db.cache_url)) as service, \
                aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{service.running.http_port}"
            every = ("postgresql", "freeswitch/fs1", "smsc", "connector/acme", "tts")
            doc = await _until(http, base, lambda d: all(_status(d, n) == "ok" for n in every))
            assert doc["status"] == "ok"
            assert set(doc["dependencies"]) == set(every)
            assert doc["dependencies"]["connector/acme"]["checked_at"] is not None  # up because it was checked
            assert "/health" in vendor.probes
            assert (await _get(http, base + "/readyz"))[:2] == (200, {"status": "ready"})
            assert (await _get(http, base + "/livez"))[:2] == (200, {"status": "alive"})
            since = {name: doc["dependencies"][name]["since"] for name in every}

            # The vendor fails its probes: the connector is down (no request had to fail first).
            vendor.script("/health", *[("status", 503)] * 1000)
            doc = await _until(http, base, lambda d: _status(d, "connector/acme") == "down")
            acme_down = doc["dependencies"]["connector/acme"]
            assert acme_down["reason"] == "probe: HTTP 503"
            assert acme_down["since"] > since["connector/acme"]
            assert doc["status"] == "degraded"
            assert (await _get(http, base + "/readyz"))[0] == 200  # connectors are not required to be ready

            # The SMSC dies: the bind is gone.
            await smsc.kill()
            doc = await _until(http, base, lambda d: _status(d, "smsc") == "down")
            assert doc["dependencies"]["smsc"]["reason"] == "not bound"

            # The only FreeSWITCH node goes away: alert calls cannot be placed, so not ready.
            await inbound.close()
            doc = await _until(http, base, lambda d: _status(d, "freeswitch/fs1") == "down")
            status, body, headers = await _get(http, base + "/readyz")
            assert status == 503
            assert body == {"status": "not_ready",
                            "reasons": ["no FreeSWITCH node connected (alert calls are configured)"]}
            assert headers["Retry-After"] == "5"

            # PostgreSQL becomes unreachable: down, and not ready for that reason too.
            proxy.cut()
            doc = await _until(http, base, lambda d: _status(d, "postgresql") == "down")
            db_since = doc["dependencies"]["postgresql"]["since"]
            assert db_since > since["postgresql"]
            status, body, _ = await _get(http, base + "/readyz")
            assert status == 503
            assert "database not answering within its deadline" in body["reasons"]
            async with http.get(base + "/metrics") as resp:
                metrics = await resp.text()
            assert re.search(r'^iim_dependency_up\{dependency="postgresql",kind="postgresql"\} 0\.0$', metrics,
                             re.MULTILINE)
            assert re.search(r'^iim_dependency_state\{dependency="smsc",kind="smsc",state="down"\} 1\.0$',
                             metrics, re.MULTILINE)
            assert re.search(r'^iim_dependency_up\{dependency="tts",kind="tts"\} 1\.0$', metrics, re.MULTILINE)
            assert re.search(r'^iim_build_info\{commit="[0-9a-f]*",python="3\.[0-9.]+",version="[^"]+"\} 1\.0$',
                             metrics, re.MULTILINE)

            # The operator's view: one line per dependency.
            code = await asyncio.to_thread(cli_main, ["health", "--url", base])
            out = capsys.readouterr().out
            assert code == 1
            assert out.startswith("status: degraded\n")
            assert re.search(r"^postgresql +down +\S+ +", out, re.MULTILINE)
            assert re.search(r"^connector/acme +down +\S+ +probe: HTTP 503$", out, re.MULTILINE)
            assert re.search(r"^tts +ok +\S+$", out, re.MULTILINE)

            # Back: ok again, from a new since.
            proxy.restore()
            doc = await _until(http, base, lambda d: _status(d, "postgresql") == "ok")
            assert doc["dependencies"]["postgresql"]["since"] > db_since
    finally:
        await emu.close()
        await proxy.close()


@pytest.mark.usefixtures("demo")
async def test_speech_that_fails_is_down_in_health_and_degrades_the_service(pg_db: PgDatabase,
                                                                              tmp_path: Path) -> None:
    broken = str(tmp_path / "no-libespeak-ng-here.so")
    settings = _settings(tmp_path, tts_library=broken)
    async with Service(settings, database=DatabaseUrls(pg_db.app_url, pg_db.cache_url)) as service, \
            aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.running.http_port}"
        doc = await _until(http, base, lambda d: _status(d, "tts") == "down")
        assert doc["status"] == "degraded"
        assert "cannot be loaded" in doc["dependencies"]["tts"]["reason"]
        assert (await _get(http, base + "/readyz"))[0] == 200  # calls fall back to the generic prompt


@pytest.mark.usefixtures("demo")
async def test_a_connector_nobody_used_is_not_reported_up_before_its_first_probe(
        pg_db: PgDatabase, tmp_path: Path, vendor: VendorPeer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_TOKEN", STATIC_TOKEN)
    monkeypatch.setenv("ACME_SIGNING", SIGNING_SECRET_TEXT)
    vendor.script("/health", ("sleep", 30.0))  # the first probe hangs: nothing has checked the vendor yet
    acme = {"name": "acme", "plugin": "webhook",
            "config": {"base_url": vendor.url, "paths": {"send_notification": "/notify"}, "probe_path": "/health",
                       "auth": {"kind": "bearer", "token_ref": "env:ACME_TOKEN"},
                       "signing_secret_ref": "env:ACME_SIGNING", "request_timeout_s": 60}}
    settings = _settings(tmp_path, connectors=[acme], connector_probe_timeout_s=1.0, connector_probe_interval_s=0.2)
    async with Service(settings, database=DatabaseUrls(pg_db.app_url, pg_db.cache_url)) as service, \
            aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.running.http_port}"
        _, doc, _ = await _get(http, base + "/health")
        assert doc["dependencies"]["connector/acme"]["status"] == "degraded"
        assert doc["dependencies"]["connector/acme"]["reason"] == "not checked yet"
        # The probe past its deadline: down; the next one (answered) brings it up.
        doc = await _until(http, base, lambda d: _status(d, "connector/acme") == "down")
        assert doc["dependencies"]["connector/acme"]["reason"] == "probe did not answer within 1 s"
        await _until(http, base, lambda d: _status(d, "connector/acme") == "ok")


async def test_livez_fails_once_the_event_loop_stalled(tmp_path: Path) -> None:
    settings = _settings(tmp_path, livez_max_loop_lag_s=0.3, policy_routing=False)
    async with Service(settings) as service, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.running.http_port}"
        await asyncio.sleep(0.3)  # the loop-lag watcher has measured
        assert (await _get(http, base + "/livez"))[:2] == (200, {"status": "alive"})
        time.sleep(0.8)  # noqa: ASYNC251 - the point: block the loop like a runaway computation would
        await asyncio.sleep(0.3)
        status, body, _ = await _get(http, base + "/livez")
        assert status == 503
        assert body["status"] == "stalled"
        assert body["reason"].startswith("event loop lag 0.")
        # Without policy routing nothing more is required to be ready.
        assert (await _get(http, base + "/readyz"))[:2] == (200, {"status": "ready"})


def test_iim_health_says_when_nothing_answers(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with contextlib.suppress(SystemExit):
        assert cli_main(["health", "--url", url, "--timeout", "2"]) == 2
    assert "no health answer" in capsys.readouterr().err
