"""The HTTPS device bridge end to end: real TLS on loopback, real PostgreSQL, signed events."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from iot_bridge.app import BridgeConfig, create_bridge_app
from iot_bridge.ratelimit import RateLimitSettings
from iot_bridge.server_cert import ensure_self_signed
from iot_bridge.tls import server_context
from policy_cache import audit
from policy_cache.db import Pool, tenant_tx
from tests.alarm_rig import AlarmRig, build_rig, new_secret, secret_text


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ensure_self_signed(tmp_path_factory.mktemp("tls"))


@pytest_asyncio.fixture
async def rig(app_pool: Pool, tmp_path: Path) -> AlarmRig:
    return await build_rig(app_pool, tmp_path)


class BridgeClient:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any], Any]:
        async with self.session.post(self.base + path, data=body, headers=headers) as resp:
            text = await resp.text()
            return resp.status, dict(resp.headers), json.loads(text) if text else None


async def _serve(app: web.Application, tls: tuple[Path, Path]) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(*tls))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


def _client_ssl() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest_asyncio.fixture
async def bridge(app_pool: Pool, tls_files: tuple[Path, Path]) -> AsyncIterator[BridgeClient]:
    config = BridgeConfig(rate_limits=RateLimitSettings(device_rate=100, device_burst=100))
    runner, port = await _serve(create_bridge_app(app_pool, config), tls_files)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_client_ssl())) as session:
        yield BridgeClient(session, f"https://127.0.0.1:{port}")
    await runner.cleanup()


async def _incidents(pool: Pool, tenant: UUID) -> list[dict[str, Any]]:
    async with tenant_tx(pool, tenant) as conn:
        return [dict(r) for r in await conn.fetch(
            "SELECT id, hazard, state::text, event_count FROM iim.incident ORDER BY opened_at")]


async def _jobs(pool: Pool) -> int:
    async with pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM iim_jobs.pgqueuer WHERE entrypoint = 'incident.tick'"))


async def test_signed_smoke_event_is_committed_with_its_job_before_the_202(
        bridge: BridgeClient, rig: AlarmRig, app_pool: Pool) -> None:
    jobs_before = await _jobs(app_pool)
    body = rig.event("smoke")
    status, _, answer = await bridge.post("/v1/events", body, rig.signed_headers(body))
    assert status == 202, answer
    assert answer["action"] == "opened"
    incidents = await _incidents(app_pool, rig.tenant_id)
    assert [str(i["id"]) for i in incidents] == [answer["incident_id"]]
    assert await _jobs(app_pool) == jobs_before + 1
    await audit.flush_pending(app_pool)  # staged in the same commit; chained by the service's flusher
    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        audited = await conn.fetchval(
            "SELECT count(*) FROM iim.audit_log WHERE action = 'incident.opened' AND correlation->>'event_id' = $1",
            json.loads(body)["event_id"])
    assert audited == 1


async def test_same_event_id_again_returns_the_first_answer_and_acts_no_more(
        bridge: BridgeClient, rig: AlarmRig, app_pool: Pool) -> None:
    body = rig.event("smoke", event_id="ev-replay-1")
    first = await bridge.post("/v1/events", body, rig.signed_headers(body))
    jobs_after_first = await _jobs(app_pool)
    await asyncio.sleep(1.1)  # later, with a new signature timestamp: a device retry or a replayed capture
    again = await bridge.post("/v1/events", body, rig.signed_headers(body))
    assert again[0] == 202
    assert again[2] == first[2]
    assert again[1].get("Idempotent-Replayed") == "true"
    assert await _jobs(app_pool) == jobs_after_first
    assert len(await _incidents(app_pool, rig.tenant_id)) == 1


async def test_same_event_id_with_another_body_is_422(bridge: BridgeClient, rig: AlarmRig) -> None:
    body = rig.event("smoke", event_id="ev-conflict-1")
    assert (await bridge.post("/v1/events", body, rig.signed_headers(body)))[0] == 202
    other = rig.event("smoke", event_id="ev-conflict-1", payload={"ppm": 9})
    status, headers, problem = await bridge.post("/v1/events", other, rig.signed_headers(other))
    assert status == 422
    assert problem["error_id"] == "idempotency-conflict"
    assert headers["Content-Type"].startswith("application/problem+json")


async def test_two_devices_of_one_tenant_may_use_the_same_event_id_and_both_alarms_are_acted_on(
        bridge: BridgeClient, rig: AlarmRig, app_pool: Pool) -> None:
    """Event ids are the devices' own: another device's id must not turn a real alarm into a permanent 422."""
    from policy_cache import registry
    from policy_cache.models import DeviceCreate, DeviceType

    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        sensor = await registry.get(conn, registry.DEVICE, rig.sensor_id)
        await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=rig.household_id, name="Bedroom smoke sensor", type=DeviceType.SENSOR,
            external_id="bedroom-smoke", credential_ref_id=sensor.credential_ref_id), actor="test")
    jobs_before = await _jobs(app_pool)
    answers = []
    for device in (rig.sensor, "bedroom-smoke"):
        body = rig.event("smoke", event_id="ev-0001", device=device)
        status, headers, answer = await bridge.post("/v1/events", body, rig.signed_headers(body, device=device))
        assert status == 202, answer
        assert "Idempotent-Replayed" not in headers
        answers.append(answer)
    assert [a["action"] for a in answers] == ["opened", "opened"]
    assert answers[0]["incident_id"] != answers[1]["incident_id"]
    assert await _jobs(app_pool) == jobs_before + 2
    # The same device with the same id is still a replay: the first answer, nothing more.
    body = rig.event("smoke", event_id="ev-0001", device="bedroom-smoke")
    status, headers, answer = await bridge.post("/v1/events", body, rig.signed_headers(body, device="bedroom-smoke"))
    assert (status, headers.get("Idempotent-Replayed"), answer) == (202, "true", answers[1])
    assert await _jobs(app_pool) == jobs_before + 2


@pytest.mark.parametrize("skew", [-301, 301])
async def test_timestamp_outside_300_s_either_way_is_401(bridge: BridgeClient, rig: AlarmRig, skew: int) -> None:
    body = rig.event("smoke")
    status, _, problem = await bridge.post("/v1/events", body,
                                           rig.signed_headers(body, ts=int(time.time()) + skew))
    assert status == 401
    assert problem["error_id"] == "signature-invalid"


@pytest.mark.parametrize("signature", ["", "garbage", "v1,a,b", "v1,!!!notbase64", "v2,abcd", "v1," + "A" * 5000])
async def test_malformed_signature_header_is_401_never_500(bridge: BridgeClient, rig: AlarmRig,
                                                           signature: str) -> None:
    body = rig.event("smoke")
    headers = rig.signed_headers(body) | {"webhook-signature": signature}
    status, _, problem = await bridge.post("/v1/events", body, headers)
    assert status == 401, problem


async def test_tampered_body_is_401_and_writes_nothing(bridge: BridgeClient, rig: AlarmRig, app_pool: Pool) -> None:
    body = rig.event("smoke")
    headers = rig.signed_headers(body)
    tampered = body.replace(b"412", b"999")
    status, _, _ = await bridge.post("/v1/events", tampered, headers)
    assert status == 401
    assert await _incidents(app_pool, rig.tenant_id) == []


async def test_rotated_key_old_and_new_both_verify_during_rotation(
        bridge: BridgeClient, rig: AlarmRig, app_pool: Pool) -> None:
    new = new_secret()
    rig.secret_file.write_text(f"{secret_text(new)} {secret_text(rig.secret)}")
    for secret in (rig.secret, new):
        body = rig.event("battery_low")
        status, _, answer = await bridge.post("/v1/events", body, rig.signed_headers(body, secret=secret))
        # The directory caches keys for 30 s; the file is read on first use, after the rotation here.
        assert status == 202, answer


async def test_another_tenants_key_is_refused(bridge: BridgeClient, rig: AlarmRig, app_pool: Pool,
                                              tmp_path: Path) -> None:
    other = await build_rig(app_pool, tmp_path, name="other", owner="+79002220001", backup="+79002220002",
                            security="+79002220003")
    body = rig.event("smoke")
    # Signed with the other tenant's secret, for our device: refused.
    status, _, _ = await bridge.post("/v1/events", body, rig.signed_headers(body, secret=other.secret))
    assert status == 401
    # Our device named under the other tenant: not found there, same 401 (no oracle).
    headers = rig.signed_headers(body) | {"IIM-Tenant": str(other.tenant_id)}
    assert (await bridge.post("/v1/events", body, headers))[0] == 401


async def test_jws_signed_event_is_accepted_and_alg_none_refused(bridge: BridgeClient, rig: AlarmRig) -> None:
    event = json.loads(rig.event("co", device=rig.jws_sensor))
    token = rig.jws(event)
    headers = {"Content-Type": "application/jose", "IIM-Tenant": str(rig.tenant_id)}
    status, _, answer = await bridge.post("/v1/events", token, headers)
    assert status == 202, answer
    head, payload, _ = token.split(b".")
    unsigned = b"eyJhbGciOiJub25lIiwia2lkIjoi" + head[28:] + b"." + payload + b"."
    assert (await bridge.post("/v1/events", unsigned, headers))[0] == 401
    stale = rig.jws(event | {"event_id": "ev-stale"}, iat=int(time.time()) - 400)
    assert (await bridge.post("/v1/events", stale, headers))[0] == 401


@pytest.mark.parametrize(("body", "status"), [
    (b'{"event_id":"a","event_id":"b","device_id":"x","type":"smoke","occurred_at":"2026-11-25T10:00:00Z"}', 400),
    (b'{"event_id":"e1","device_id":"D","type":"smoke","occurred_at":"2026-11-25T10:00:00Z","payload":{"v":NaN}}',
     400),
    (b'{"event_id":"e1","device_id":"D","type":"volcano","occurred_at":"2026-11-25T10:00:00Z"}', 422),
    (b'{"event_id":"e1","device_id":"D","type":"smoke","occurred_at":"yesterday"}', 422),
    (b'{"event_id":"e1","device_id":"D","type":"smoke","occurred_at":"2026-11-25T10:00:00"}', 422),
    (b'{"event_id":"e1","device_id":"D","type":"smoke","occurred_at":"2026-11-25T10:00:00Z","admin":true}', 422),
    (b'{"event_id":"e1","device_id":"D","type":"smoke","occurred_at":"2026-11-25T10:00:00Z","payload":'
     + b'{"a":' * 40 + b"1" + b"}" * 40 + b"}", 400),
    (b"[" * 60_000, 400),
])
async def test_schema_traps_are_refused_with_problem_json(bridge: BridgeClient, rig: AlarmRig, body: bytes,
                                                          status: int) -> None:
    body = body.replace(b'"D"', json.dumps(rig.sensor).encode())
    got, headers, problem = await bridge.post("/v1/events", body, rig.signed_headers(body))
    assert got == status, problem
    assert headers["Content-Type"].startswith("application/problem+json")


async def test_body_over_the_limit_is_413(bridge: BridgeClient, rig: AlarmRig) -> None:
    body = rig.event("smoke", payload={"blob": "x" * 1000}) + b" " * 70_000
    status, _, problem = await bridge.post("/v1/events", body, rig.signed_headers(body))
    assert status == 413
    assert problem["error_id"] == "body-too-large"


async def test_event_naming_another_device_than_the_signer_is_403(bridge: BridgeClient, rig: AlarmRig) -> None:
    body = rig.event("smoke", device=rig.doorphone)
    status, _, problem = await bridge.post("/v1/events", body, rig.signed_headers(body, device=rig.sensor))
    assert status == 403
    assert problem["error_id"] == "identity-mismatch"


async def test_a_burst_of_one_alarm_is_one_incident_and_another_hazard_opens_its_own(
        bridge: BridgeClient, rig: AlarmRig, app_pool: Pool) -> None:
    bodies = [rig.event("smoke") for _ in range(8)]
    answers = await asyncio.gather(*(bridge.post("/v1/events", b, rig.signed_headers(b)) for b in bodies))
    assert {a[0] for a in answers} == {202}
    assert sorted(a[2]["action"] for a in answers) == ["opened"] + ["updated"] * 7
    assert len({a[2]["incident_id"] for a in answers}) == 1
    tamper = rig.event("tamper")
    status, _, answer = await bridge.post("/v1/events", tamper, rig.signed_headers(tamper))
    assert status == 202
    assert answer["action"] == "opened"
    incidents = await _incidents(app_pool, rig.tenant_id)
    assert sorted((i["hazard"], i["event_count"]) for i in incidents) == [("smoke", 8), ("tamper", 1)]


async def test_rate_limit_per_device_answers_429_with_retry_after(
        app_pool: Pool, tls_files: tuple[Path, Path], rig: AlarmRig) -> None:
    config = BridgeConfig(rate_limits=RateLimitSettings(device_rate=0.5, device_burst=3))
    runner, port = await _serve(create_bridge_app(app_pool, config), tls_files)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_client_ssl())) as session:
            client = BridgeClient(session, f"https://127.0.0.1:{port}")
            statuses = []
            for _ in range(5):
                body = rig.event("heartbeat")
                status, headers, _ = await client.post("/v1/events", body, rig.signed_headers(body))
                statuses.append(status)
            assert statuses == [202, 202, 202, 429, 429]
            assert int(headers["Retry-After"]) >= 1
    finally:
        await runner.cleanup()


async def test_cloud_webhook_batch_is_verified_with_the_sources_key(
        bridge: BridgeClient, rig: AlarmRig, app_pool: Pool, tmp_path: Path) -> None:
    from policy_cache import registry
    from policy_cache.models import CredentialKind, CredentialRefCreate, DeviceCreate, DeviceType

    source_secret = new_secret()
    path = tmp_path / "acme.whsec"
    path.write_text(secret_text(source_secret))
    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        await registry.create(conn, registry.CREDENTIAL_REF, CredentialRefCreate(
            name="webhook:acme-cloud", kind=CredentialKind.WEBHOOK_SECRET, ref=f"file:{path}"), actor="test")
        for external_id, kind in (("acme-smoke-1", DeviceType.SENSOR), ("acme-door-1", DeviceType.DOORPHONE)):
            await registry.create(conn, registry.DEVICE, DeviceCreate(
                household_id=rig.household_id, name=external_id, type=kind, external_id=external_id,
                connector="acme-cloud", connector_ref=f"acme:{external_id}"), actor="test")
    events = [json.loads(rig.event("smoke", device="acme-smoke-1")),
              json.loads(rig.event("doorbell", device="acme-door-1"))]
    body = json.dumps({"source": "acme-cloud", "events": events}).encode()
    headers = rig.signed_headers(body, secret=source_secret)
    status, _, answer = await bridge.post("/v1/webhooks/acme-cloud", body, headers)
    assert status == 202, answer
    assert [r["action"] for r in answer["results"]] == ["opened", "opened"]
    # A batch naming an unknown device writes nothing at all.
    bad = json.dumps({"source": "acme-cloud", "events": [json.loads(rig.event("smoke", device="acme-smoke-1")),
                                                          json.loads(rig.event("smoke", device="nope"))]}).encode()
    before = await _incidents(app_pool, rig.tenant_id)
    status, _, problem = await bridge.post("/v1/webhooks/acme-cloud", bad, rig.signed_headers(bad, secret=source_secret))
    assert status == 422, problem
    assert await _incidents(app_pool, rig.tenant_id) == before


async def test_openapi_document_describes_every_bridge_endpoint(bridge: BridgeClient) -> None:
    from openapi_spec_validator import validate

    async with bridge.session.get(bridge.base + "/openapi.json") as resp:
        doc = await resp.json()
    validate(doc)
    assert set(doc["paths"]) == {"/v1/events", "/v1/webhooks/{source}"}


async def test_postgresql_down_is_503_with_retry_after_and_nothing_half_written(
        pg_db: Any, app_pool: Pool, tls_files: tuple[Path, Path], rig: AlarmRig) -> None:
    from policy_cache.db import DbRole, connect_pool
    from tests.tcp_proxy import TcpFaultProxy

    proxy = TcpFaultProxy(pg_db.app_url)
    await proxy.start()
    pool = await connect_pool(proxy.dsn(), role=DbRole.APP, min_size=1, max_size=2, timeout=1.0,
                              command_timeout=2.0)
    runner, port = await _serve(create_bridge_app(pool), tls_files)
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_client_ssl())) as session:
            client = BridgeClient(session, f"https://127.0.0.1:{port}")
            warm = rig.event("heartbeat")
            assert (await client.post("/v1/events", warm, rig.signed_headers(warm)))[0] == 202  # keys cached
            proxy.cut()
            body = rig.event("smoke", event_id="ev-during-outage")
            status, headers, problem = await client.post("/v1/events", body, rig.signed_headers(body))
            assert status == 503, problem
            assert problem["error_id"] == "store-unavailable"
            assert int(headers["Retry-After"]) > 0
            assert await _incidents(app_pool, rig.tenant_id) == []
            proxy.restore()
            # The device retries the same event: now it is accepted, exactly once.
            for _ in range(50):
                status, _, answer = await client.post("/v1/events", body, rig.signed_headers(body))
                if status == 202:
                    break
                await asyncio.sleep(0.1)
            assert status == 202, answer
            assert [i["hazard"] for i in await _incidents(app_pool, rig.tenant_id)] == ["smoke"]
    finally:
        await runner.cleanup()
        await pool.close()
        await proxy.close()
