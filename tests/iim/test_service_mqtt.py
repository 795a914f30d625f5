"""``iim serve`` with the MQTT ingress: off by default, on by settings, sharing the device bridge's intake."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import pytest

from iim import cli
from iim.core.errors import ConfigError
from iim.service import DatabaseUrls, Service
from iim.settings import Settings
from policy_cache.db import Pool
from tests.alarm_rig import build_rig
from tests.iim.test_service import _settings, urls
from tests.iot_bridge.test_mqtt_ingress import hmac_payload, topic
from tests.mosquitto import running_mosquitto
from tests.mqtt_hub import MqttHub
from tests.pg import TEST_MASTER_KEY_ENV

__all__ = ["urls"]

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def _shared_master_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every service of this module seals under the tests' master key (they share one database)."""
    for name, value in TEST_MASTER_KEY_ENV.items():
        monkeypatch.setenv(name, value)


def test_mqtt_is_off_by_default() -> None:
    assert Settings().mqtt_enabled is False


async def test_service_started_without_mqtt_has_no_ingress(urls: DatabaseUrls, tmp_path: Path) -> None:
    async with Service(_settings(tmp_path), database=urls) as service:
        assert service.mqtt is None


async def test_mqtt_without_iims_client_certificate_refuses_the_start(urls: DatabaseUrls, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="IIM_MQTT_CERT_FILE"):
        async with Service(_settings(tmp_path, mqtt_enabled=True), database=urls):
            pass


async def test_service_takes_a_hubs_event_over_mqtt(urls: DatabaseUrls, app_pool: Pool, tmp_path: Path) -> None:
    rig = await build_rig(app_pool, tmp_path)
    async with running_mosquitto(tmp_path) as broker:
        pki = broker.pki
        settings = _settings(tmp_path, mqtt_enabled=True, mqtt_host="localhost", mqtt_port=broker.port,
                             mqtt_ca_file=str(pki.ca_file), mqtt_cert_file=str(pki.iim.cert),
                             mqtt_key_file=str(pki.iim.key), mqtt_client_id="iim-serve-test")
        async with Service(settings, database=urls) as service:
            assert service.mqtt is not None
            await service.mqtt.wait_connected(15)
            hub = MqttHub(broker.port, str(pki.ca_file), pki.client(f"{rig.tenant_id}/{rig.hub}"), "hub-serve")
            assert await hub.connect()
            try:
                assert await hub.subscribe(topic(rig, "ack")) == [1]
                body = rig.event("smoke")
                await hub.publish(topic(rig, "events"), hmac_payload(rig, body))
                answer = (await hub.next_message()).json()
            finally:
                await hub.close()
        assert answer["code"] == 202
        assert answer["event_id"] == json.loads(body)["event_id"]


def _tokens(monkeypatch: pytest.MonkeyPatch, *grants: tuple[str, str, UUID]) -> None:
    """Token ``<actor>-token`` for each (actor, role, tenant)."""
    table = {hashlib.sha256(f"{actor}-token".encode()).hexdigest(): {"actor": actor, "role": role, "tenant": str(t)}
             for actor, role, t in grants}
    monkeypatch.setenv("IIM_TEST_ADMIN_TOKENS", json.dumps(table))
    monkeypatch.setenv("IIM_ADMIN_TOKENS_REF", "env:IIM_TEST_ADMIN_TOKENS")


def _bearer(actor: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {actor}-token"}


async def _health(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.get(f"{base}/health") as resp:
        doc: dict[str, Any] = await resp.json()
    return doc


async def _until_health(http: aiohttp.ClientSession, base: str, status: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        mqtt = (await _health(http, base))["dependencies"]["mqtt"]
        if mqtt["status"] == status:
            return mqtt  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, mqtt
        await asyncio.sleep(0.2)


async def test_operator_commands_a_hub_over_mqtt_and_health_follows_the_broker(
        urls: DatabaseUrls, app_pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    a = await build_rig(app_pool, tmp_path)
    b = await build_rig(app_pool, tmp_path, name="other")
    _tokens(monkeypatch, ("op-a", "operator", a.tenant_id), ("noc-a", "viewer", a.tenant_id),
            ("op-b", "operator", b.tenant_id))
    async with running_mosquitto(tmp_path) as broker:
        pki = broker.pki
        settings = _settings(tmp_path, mqtt_enabled=True, mqtt_host="localhost", mqtt_port=broker.port,
                             mqtt_ca_file=str(pki.ca_file), mqtt_cert_file=str(pki.iim.cert),
                             mqtt_key_file=str(pki.iim.key), mqtt_client_id="iim-cmd-test")
        async with Service(settings, database=urls) as service, aiohttp.ClientSession() as http:
            assert service.mqtt is not None
            await service.mqtt.wait_connected(15)
            base = f"http://127.0.0.1:{service.running.http_port}"
            commands = f"{base}/v1/tenants/{a.tenant_id}/hubs/{a.hub}/commands"
            hub = MqttHub(broker.port, str(pki.ca_file), pki.client(f"{a.tenant_id}/{a.hub}"), "hub-cmd")
            assert await hub.connect()
            try:
                assert await hub.subscribe(topic(a, "cmd")) == [1]
                arm = {"id": "arm-1", "name": "arm", "arguments": {"mode": "away"}}
                async with http.post(commands, json=arm, headers=_bearer("op-a")) as resp:
                    assert resp.status == 202, await resp.text()
                    assert "Idempotent-Replayed" not in resp.headers
                    first = await resp.json()
                assert (first["state"], first["actor"], first["hub"]) == ("sent", "op-a", a.hub)
                received = await hub.next_message()
                assert received.topic == topic(a, "cmd")
                assert {k: received.json()[k] for k in ("id", "name", "arguments")} == arm
                # The same id again: the first result, nothing published.
                async with http.post(commands, json=arm, headers=_bearer("op-a")) as resp:
                    assert resp.status == 202
                    assert resp.headers["Idempotent-Replayed"] == "true"
                    assert await resp.json() == first
                # The hub's answer is recorded and shown.
                await hub.publish(topic(a, "cmd-ack"), b'{"id": "arm-1", "status": "done", "detail": "armed"}')
                deadline = time.monotonic() + 15
                while True:
                    async with http.get(f"{commands}/arm-1", headers=_bearer("noc-a")) as resp:
                        shown = await resp.json()
                    if shown["state"] == "done" or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.1)
                assert (shown["state"], shown["ack_detail"]) == ("done", "armed")
                # Who may not: a viewer (403); another tenant's operator, and anyone naming another tenant's hub,
                # learn nothing (404, one body).
                reboot = {"id": "r-1", "name": "reboot"}
                async with http.post(commands, json=reboot, headers=_bearer("noc-a")) as resp:
                    assert (resp.status, (await resp.json())["error_id"]) == (403, "forbidden")
                async with http.post(commands, json=reboot, headers=_bearer("op-b")) as resp:
                    assert resp.status == 404
                    foreign = await resp.json()
                async with http.post(f"{base}/v1/tenants/{a.tenant_id}/hubs/{b.hub}/commands", json=reboot,
                                     headers=_bearer("op-a")) as resp:
                    assert resp.status == 404
                    unknown = await resp.json()
                assert {**foreign, "instance": None} == {**unknown, "instance": None}
                async with http.post(commands, json={"id": "x-1", "name": "unlock"}, headers=_bearer("op-a")) as resp:
                    assert (resp.status, (await resp.json())["error_id"]) == (422, "validation-failed")
                await asyncio.sleep(0.5)
                assert hub.pending() == 0  # nothing but the one command reached the hub
            finally:
                await hub.close()
            assert (await _until_health(http, base, "ok"))["broker"] == f"localhost:{broker.port}"
            # The broker goes: /health says so (since when), a new command is a 503 with Retry-After, a repeat
            # of a sent one still answers from the database.
            broker.process.terminate()
            await asyncio.to_thread(broker.process.wait)
            down = await _until_health(http, base, "down")
            assert down["since"]
            assert down["reason"]
            async with http.post(commands, json=reboot, headers=_bearer("op-a")) as resp:
                assert resp.status == 503
                assert int(resp.headers["Retry-After"]) >= 1
                assert (await resp.json())["error_id"] == "broker-unavailable"
            async with http.post(commands, json=arm, headers=_bearer("op-a")) as resp:
                assert (resp.status, resp.headers.get("Idempotent-Replayed")) == (202, "true")
            monkeypatch.setenv("IIM_ADMIN_TOKEN", "op-a-token")
            hub_cli = ["hub", "command", "send", "--api", base, "--tenant", str(a.tenant_id), "--hub", a.hub]
            capsys.readouterr()
            assert await asyncio.to_thread(cli.main, [*hub_cli, "--name", "silence", "--id", "s-1"]) == 1
            assert "503 broker-unavailable" in capsys.readouterr().err
            assert await asyncio.to_thread(cli.main, ["health", "--url", base]) == 1
            shown_health = capsys.readouterr().out
            assert re.search(r"^mqtt\s+down\s+\S+", shown_health, re.MULTILINE), shown_health
            # Back: ok again, and the command goes.
            (tmp_path / "again").mkdir()
            async with running_mosquitto(tmp_path / "again", pki, port=broker.port):
                await service.mqtt.wait_connected(30)
                await _until_health(http, base, "ok")
                async with http.post(commands, json=reboot, headers=_bearer("op-a")) as resp:
                    assert resp.status == 202, await resp.text()
                    assert (await resp.json())["state"] == "sent"
                # The CLI: the same id as the refused attempt goes now; `show` reads it back.
                capsys.readouterr()
                assert await asyncio.to_thread(cli.main, [*hub_cli, "--name", "silence", "--id", "s-1",
                                                          "--arg", "duration_s=60", "-o", "json"]) == 0
                sent = json.loads(capsys.readouterr().out)
                assert (sent["id"], sent["arguments"], sent["state"], sent["actor"]) == (
                    "s-1", {"duration_s": 60}, "sent", "op-a")
                assert await asyncio.to_thread(cli.main, ["hub", "command", "show", "--api", base, "--tenant",
                                                          str(a.tenant_id), "--hub", a.hub, "s-1"]) == 0
                assert re.search(r"^state\s+sent$", capsys.readouterr().out, re.MULTILINE)
                await asyncio.to_thread(cli.main, ["health", "--url", base])
                assert re.search(r"^mqtt\s+ok\s+\S+", capsys.readouterr().out, re.MULTILINE)
