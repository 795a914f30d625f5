"""`iim serve` delivers its spans over OTLP/HTTP to a real receiver, and a receiver away never holds it up.

IIM runs as a real process configured the way an operator would (``IIM_TRACES_EXPORTER=otlp``,
``IIM_OTLP_TRACES_ENDPOINT``, the standard ``OTEL_*`` environment), with the OTLP exporter of the ``otel`` extra;
the receiver is an aiohttp server decoding ``ExportTraceServiceRequest`` (tests/otlp_receiver.py). The alarm
goes in over the HTTPS device bridge, the worker dials the owner on the FreeSWITCH emulator, the owner answers
and presses 2 (false alarm); an admin API call and an ``iim`` CLI command join the operator's traces.
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
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fs_app.testing import FreeSwitchEmulator, TargetBehaviour
from iim.admin.auth import hash_token
from policy_cache.db import Pool
from tests.alarm_rig import build_rig
from tests.otlp_receiver import ReceivedSpan, otlp_receiver
from tests.pg import TEST_MASTER_KEY_ENV

GW = "sofia/gateway/ims/{}"
ESL_PASSWORD = "traces-test-esl-secret"
ADMIN_TOKEN = "traces-admin-secret"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"
SERVER, CLIENT = 2, 3  # OTLP span kinds

pytestmark = pytest.mark.timeout(180)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """One `iim serve` process; its log (JSON lines) in a file."""

    def __init__(self, pg_db: Any, tmp_path: Path, env: Mapping[str, str]) -> None:
        self.http_port, self.bridge_port = _free_port(), _free_port()
        self.log = tmp_path / "iim.log"
        tokens = {hash_token(ADMIN_TOKEN): {"actor": "root@noc", "role": "admin", "tenant": None}}
        self.env = os.environ | {
            "IIM_APP_DATABASE_URL": pg_db.app_url, "IIM_CACHE_DATABASE_URL": pg_db.cache_url,
            "IIM_ESL_PORT": str(_free_port()), "IIM_HTTP_PORT": str(self.http_port),
            "IIM_BRIDGE_PORT": str(self.bridge_port), "IIM_DATA_DIR": str(tmp_path / "iim-data" / "pg"),
            "IIM_ADMIN_TOKENS_REF": "env:IIM_TEST_ADMIN_TOKENS", "IIM_TEST_ADMIN_TOKENS": json.dumps(tokens),
            "IIM_LOG_LEVEL": "INFO", "IIM_DRAIN_TIMEOUT": "1", **TEST_MASTER_KEY_ENV, **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:  # the child keeps its own descriptor
            return subprocess.Popen([sys.executable, "-m", "iim", "serve"], env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT)

    async def start(self) -> None:
        self.proc = self._spawn()
        deadline = time.monotonic() + 60
        while "IIM serving" not in self.text():
            assert self.proc.poll() is None, self.text()[-3000:]
            assert time.monotonic() < deadline, self.text()[-3000:]
            await asyncio.sleep(0.1)

    async def stop(self) -> float:
        """SIGTERM; the seconds until the process exited (0 expected)."""
        assert self.proc is not None
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.proc.wait, 60)
        assert code == 0, self.text()[-3000:]
        return time.monotonic() - began

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def _eventually(check: Any, serve: Serve, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, serve.text()[-3000:]
        await asyncio.sleep(0.05)


def _child(child: ReceivedSpan, parent: ReceivedSpan) -> bool:
    return child.trace_id == parent.trace_id and child.parent_span_id == parent.span_id


def _otlp_env(receiver_url: str) -> dict[str, str]:
    return {"IIM_TRACES_EXPORTER": "otlp", "IIM_OTLP_TRACES_ENDPOINT": receiver_url,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans leave soon after they end
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test,service.namespace=telecom"}


async def test_iim_serve_delivers_the_alarms_span_tree_over_otlp_with_its_resource(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    async with otlp_receiver() as receiver:
        rig = await build_rig(app_pool, tmp_path, owner="+79004450001", backup="+79004450002",
                              security="+79004450003")
        emu = FreeSwitchEmulator(default_target=TargetBehaviour.no_answer())
        emu.targets[GW.format(rig.owner)] = TargetBehaviour.answer(after_ms=200, dtmf="2")
        inbound = await emu.start_inbound(password=ESL_PASSWORD)
        serve = Serve(pg_db, tmp_path, _otlp_env(receiver.url) | {
            "IIM_FS_NODES": json.dumps([{"host": "127.0.0.1", "port": inbound.port}]),
            "IIM_FS_PASSWORD": ESL_PASSWORD})
        try:
            await serve.start()
            body = rig.event("smoke")
            async with aiohttp.ClientSession() as http:
                async with http.post(f"https://127.0.0.1:{serve.bridge_port}/v1/events", data=body, ssl=False,
                                     headers=rig.signed_headers(body) | {"traceparent": CALLER}) as resp:
                    answer = await resp.json(content_type=None)
                    assert resp.status == 202, answer
                async with http.get(f"{serve.api}/v1/tenants/{rig.tenant_id}", headers={
                        "Authorization": f"Bearer {ADMIN_TOKEN}",
                        "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}) as resp:
                    assert resp.status == 200, await resp.text()
            await _eventually(lambda: receiver.named("alert_call.hangup"), serve)
            stopped_in = await serve.stop()
        finally:
            serve.kill()
            await emu.close()

    assert receiver.content_types == {"application/x-protobuf"}
    # The resource: IIM's name and version, and what the standard environment adds.
    resources = {json.dumps(s.resource, sort_keys=True) for s in receiver.spans}
    assert len(resources) == 1
    resource = receiver.spans[0].resource
    assert resource["service.name"] == "iim"
    assert resource["service.version"] == version("iim")
    assert resource["deployment.environment.name"] == "test"
    assert resource["service.namespace"] == "telecom"
    assert resource["telemetry.sdk.language"] == "python"
    assert {s.scope for s in receiver.spans} == {"iim"}

    # The alarm's tree, joined to the caller's trace: request -> intake -> decision -> originate -> call events.
    request = receiver.one("POST /v1/events")
    assert (request.trace_id, request.parent_span_id, request.kind) == (CALLER_TRACE, CALLER[36:52], SERVER)
    assert request.attributes["http.response.status_code"] == 202
    intake = receiver.one("bridge.intake")
    assert _child(intake, request)
    assert intake.attributes["iim.incident_id"] == answer["incident_id"]
    decisions = {s.attributes["iim.state"]: s for s in receiver.named("scenario.decide")}
    assert _child(decisions["notifying"], intake)
    originate = receiver.one("alert_call.originate")
    assert _child(originate, decisions["notifying"])
    assert originate.kind == CLIENT
    assert originate.attributes["iim.outcome"] == "answered"
    for name in ("alert_call.answered", "alert_call.dtmf", "alert_call.hangup"):
        assert _child(receiver.one(name), originate), name
    # The last decision ended as the process stopped: the flush at stop delivered it.
    assert _child(decisions["false_alarm"], originate)
    assert {s.trace_id for s in receiver.in_trace(CALLER_TRACE)} == {CALLER_TRACE}

    admin = receiver.one("GET /v1/tenants/{tenant_id}")
    assert (admin.trace_id, admin.parent_span_id, admin.kind) == ("a" * 32, "b" * 16, SERVER)
    assert admin.attributes["iim.tenant"] == str(rig.tenant_id)
    assert stopped_in < 15


@pytest.mark.parametrize("receiver_state", ["hangs", "down"])
async def test_a_receiver_that_hangs_or_is_down_never_holds_a_request_nor_the_stop(
        pg_db: Any, tmp_path: Path, receiver_state: str) -> None:
    async with otlp_receiver(mode="hang") as receiver:
        # Down: nothing listens at the URL (connection refused), as when the collector is not running.
        url = receiver.url if receiver_state == "hangs" else f"http://127.0.0.1:{_free_port()}/v1/traces"
        serve = Serve(pg_db, tmp_path, _otlp_env(url) | {
            "IIM_BRIDGE_ENABLED": "false", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1"})  # every span its own export: the exporter is always busy
        try:
            await serve.start()
            slowest = 0.0
            async with aiohttp.ClientSession() as http:
                for _ in range(40):
                    began = time.monotonic()
                    async with http.get(f"{serve.api}/v1/tenants",
                                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
                        assert resp.status == 200, await resp.text()
                    slowest = max(slowest, time.monotonic() - began)
                    await asyncio.sleep(0.02)
            stopped_in = await serve.stop()
        finally:
            serve.kill()
    # A request never waits on the exporter (it only queues its span): no answer near the exporter's 10 s timeout.
    assert slowest < 1.0, slowest
    # The stop waits for the spans at most the flush timeout (5 s), not the exporter's retries.
    assert stopped_in < 12, stopped_in
    if receiver_state == "hangs":
        assert receiver.requests >= 1  # the exporter did try
        assert "spans not delivered within" in serve.text()

