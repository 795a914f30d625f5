"""A hostile client cannot silence a device, learn which devices exist, or speak for devices it does not serve.

Each test is a request an attacker can send without any key (or with only a cloud source's key), against the
real bridge over TLS and real PostgreSQL.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest_asyncio

from iot_bridge.app import BridgeConfig, create_bridge_app
from iot_bridge.ratelimit import RateLimitSettings
from policy_cache import registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import CredentialKind, CredentialRefCreate
from tests.alarm_rig import AlarmRig, new_secret, secret_text
from tests.iot_bridge.test_bridge_http import BridgeClient, _client_ssl, _serve, rig, tls_files

__all__ = ["rig", "tls_files"]  # fixtures shared with the bridge's HTTP tests


@pytest_asyncio.fixture
async def strict_bridge(app_pool: Pool, tls_files: tuple[Path, Path]) -> AsyncIterator[BridgeClient]:
    """Tight device buckets (3 per hazard), as a real fleet's would be; the source bucket stays generous."""
    config = BridgeConfig(rate_limits=RateLimitSettings(device_rate=0.1, device_burst=3))
    runner, port = await _serve(create_bridge_app(app_pool, config), tls_files)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_client_ssl())) as session:
        yield BridgeClient(session, f"https://127.0.0.1:{port}")
    await runner.cleanup()


async def test_unsigned_junk_naming_a_device_does_not_drain_its_bucket(
        strict_bridge: BridgeClient, rig: AlarmRig) -> None:
    for _ in range(20):
        junk = rig.event("smoke")
        headers = rig.signed_headers(junk) | {"webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()}
        assert (await strict_bridge.post("/v1/events", junk, headers))[0] == 401
    for _ in range(3):
        alarm = rig.event("smoke")
        status, _, answer = await strict_bridge.post("/v1/events", alarm, rig.signed_headers(alarm))
        assert status == 202, answer


async def test_a_burst_of_one_hazard_does_not_delay_another_hazard_of_the_same_device(
        strict_bridge: BridgeClient, rig: AlarmRig) -> None:
    statuses = []
    for _ in range(5):
        smoke = rig.event("smoke")
        statuses.append((await strict_bridge.post("/v1/events", smoke, rig.signed_headers(smoke)))[0])
    assert statuses == [202, 202, 202, 429, 429]
    co = rig.event("co")
    status, _, answer = await strict_bridge.post("/v1/events", co, rig.signed_headers(co))
    assert status == 202, answer


async def test_unknown_and_known_devices_get_the_same_authentication_answer(
        strict_bridge: BridgeClient, rig: AlarmRig) -> None:
    answers = []
    for device, secret in ((rig.sensor, new_secret()), ("no-such-device", new_secret()),
                           (rig.sensor, rig.secret)):
        body = rig.event("smoke", device=device)
        headers = rig.signed_headers(body, device=device, secret=secret)
        if secret is rig.secret:
            headers["webhook-timestamp"] = "1"  # a stale timestamp under the right key: still the same answer
        status, _, problem = await strict_bridge.post("/v1/events", body, headers)
        answers.append((status, problem["error_id"], problem["detail"]))
    assert len(set(answers)) == 1, answers
    assert answers[0][0] == 401


async def test_a_deeply_nested_jws_header_is_401_not_a_server_error(
        strict_bridge: BridgeClient, rig: AlarmRig) -> None:
    headers = {"Content-Type": "application/jose", "IIM-Tenant": str(rig.tenant_id)}
    for header in (b"[" * 5000, b"[" * 700, b'{"kid":' * 300 + b'"x"' + b"}" * 300):
        token = base64.urlsafe_b64encode(header).rstrip(b"=") + b".e30.AAAA"
        status, _, problem = await strict_bridge.post("/v1/events", token, headers)
        assert status == 401, problem
        assert problem["error_id"] == "signature-invalid"


async def test_a_cloud_sources_key_cannot_post_for_direct_devices_or_name_another_source(
        strict_bridge: BridgeClient, rig: AlarmRig, app_pool: Pool, tmp_path: Path) -> None:
    source_secret = new_secret()
    path = tmp_path / "acme.whsec"
    path.write_text(secret_text(source_secret))
    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        await registry.create(conn, registry.CREDENTIAL_REF, CredentialRefCreate(
            name="webhook:acme-cloud", kind=CredentialKind.WEBHOOK_SECRET, ref=f"file:{path}"), actor="test")
    direct = json.dumps({"source": "acme-cloud", "events": [json.loads(rig.event("smoke"))]}).encode()
    status, _, problem = await strict_bridge.post("/v1/webhooks/acme-cloud", direct,
                                                  rig.signed_headers(direct, secret=source_secret))
    assert (status, problem["error_id"]) == (422, "unknown-device")
    other = json.dumps({"source": "other-cloud", "events": [json.loads(rig.event("smoke"))]}).encode()
    status, _, problem = await strict_bridge.post("/v1/webhooks/acme-cloud", other,
                                                  rig.signed_headers(other, secret=source_secret))
    assert (status, problem["error_id"]) == (422, "source-mismatch")


async def test_a_device_or_source_name_the_registry_cannot_hold_is_401_not_a_server_error(
        strict_bridge: BridgeClient, rig: AlarmRig) -> None:
    """Found by the fuzz: a JWS ``kid`` with a NUL (PostgreSQL text cannot hold one) failed the lookup's
    query with a 500, and so did a webhook source spelled ``%00`` in the URL."""
    event = json.loads(rig.event("co", device=rig.jws_sensor))
    for kid in ("\x00", "co\x00x"):
        token = rig.jws(event, kid=kid)
        headers = {"Content-Type": "application/jose", "IIM-Tenant": str(rig.tenant_id)}
        status, _, problem = await strict_bridge.post("/v1/events", token, headers)
        assert (status, problem["error_id"]) == (401, "signature-invalid"), problem
    body = json.dumps({"source": "x", "events": []}).encode()
    for source in ("%00", "a%00b", "%E2%80%AE", "x" * 200):
        status, _, problem = await strict_bridge.post(f"/v1/webhooks/{source}", body, rig.signed_headers(body))
        assert (status, problem["error_id"]) == (401, "signature-invalid"), (source, problem)
