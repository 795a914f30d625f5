"""A revoked key or a disabled device is refused at once, not when the bridge's cached keys expire.

Real bridge over TLS, real PostgreSQL; the changes go through the registry's CRUD as the admin API makes
them, and the bridge hears them by ``NOTIFY iim_bridge_keys`` (migration 0018).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from iot_bridge.app import BRIDGE_KEY, Bridge, BridgeConfig, create_bridge_app
from iot_bridge.ratelimit import RateLimitSettings
from policy_cache import registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import CredentialRefUpdate, DeviceCreate, DeviceType, DeviceUpdate
from tests.alarm_rig import AlarmRig
from tests.iot_bridge.test_bridge_http import BridgeClient, _client_ssl, _serve, rig, tls_files
from tests.pg import PgDatabase

__all__ = ["rig", "tls_files"]


@pytest_asyncio.fixture
async def followed(app_pool: Pool, pg_db: PgDatabase,
                   tls_files: tuple[Path, Path]) -> AsyncIterator[tuple[BridgeClient, Bridge]]:
    """The bridge as the service runs it: following key changes on the app role's URL."""
    app = create_bridge_app(app_pool, BridgeConfig(rate_limits=RateLimitSettings(device_rate=100, device_burst=100)),
                            keys_dsn=pg_db.app_url)
    runner, port = await _serve(app, tls_files)
    bridge = app[BRIDGE_KEY]
    assert bridge.key_changes is not None
    await asyncio.wait_for(bridge.key_changes.connected.wait(), 10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_client_ssl())) as session:
        yield BridgeClient(session, f"https://127.0.0.1:{port}"), bridge
    await runner.cleanup()


async def _refused_within(post: Callable[[], Awaitable[int]], seconds: float) -> float:
    """Post until the answer is 401; how long that took (fails past ``seconds``)."""
    started = time.monotonic()
    while (status := await post()) != 401:
        assert status == 202, status
        assert time.monotonic() - started < seconds, f"still accepted after {seconds} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_disabled_device_is_refused_within_a_second(
        followed: tuple[BridgeClient, Bridge], rig: AlarmRig, app_pool: Pool) -> None:
    client, _ = followed

    async def post() -> int:
        body = rig.event("heartbeat")
        return (await client.post("/v1/events", body, rig.signed_headers(body)))[0]

    assert await post() == 202  # its keys are cached now
    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        await registry.update(conn, registry.DEVICE, rig.sensor_id, DeviceUpdate(enabled=False), actor="test")
    assert await _refused_within(post, 1.0) < 1.0
    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        await registry.update(conn, registry.DEVICE, rig.sensor_id, DeviceUpdate(enabled=True), actor="test")
    started = time.monotonic()
    while await post() != 202:  # enabled again: accepted again, as soon
        assert time.monotonic() - started < 1.0
        await asyncio.sleep(0.02)


async def test_a_revoked_key_is_refused_within_a_second(
        followed: tuple[BridgeClient, Bridge], rig: AlarmRig, app_pool: Pool, tmp_path: Path) -> None:
    client, _ = followed
    headers = {"Content-Type": "application/jose", "IIM-Tenant": str(rig.tenant_id)}

    async def post() -> int:
        token = rig.jws(json.loads(rig.event("co", device=rig.jws_sensor)))
        return (await client.post("/v1/events", token, headers))[0]

    assert await post() == 202
    # The operator points the device's key reference at a new key: the old one is revoked.
    new_key = tmp_path / "co-new.pub.pem"
    new_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        ref = next(r for r in await registry.list_rows(conn, registry.CREDENTIAL_REF) if r.name == "sensor-jws")
        await registry.update(conn, registry.CREDENTIAL_REF, ref.id, CredentialRefUpdate(ref=f"file:{new_key}"),
                              actor="test")
    assert await _refused_within(post, 1.0) < 1.0


async def test_a_device_registered_after_a_refusal_is_accepted_at_once(
        followed: tuple[BridgeClient, Bridge], rig: AlarmRig, app_pool: Pool) -> None:
    """Unknown devices are cached too (a flood of bogus ids is no flood of queries): registering one must
    not leave it refused for the cache's lifetime."""
    client, _ = followed
    body = rig.event("smoke", device="garage-smoke")
    assert (await client.post("/v1/events", body, rig.signed_headers(body, device="garage-smoke")))[0] == 401
    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        sensor = await registry.get(conn, registry.DEVICE, rig.sensor_id)
        await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=rig.household_id, name="Garage smoke sensor", type=DeviceType.SENSOR,
            external_id="garage-smoke", credential_ref_id=sensor.credential_ref_id), actor="test")
    started = time.monotonic()
    while True:
        body = rig.event("smoke", device="garage-smoke")
        status = (await client.post("/v1/events", body, rig.signed_headers(body, device="garage-smoke")))[0]
        if status == 202:
            break
        assert time.monotonic() - started < 1.0, status
        await asyncio.sleep(0.02)


async def test_while_the_change_feed_is_down_nothing_is_cached(
        followed: tuple[BridgeClient, Bridge], rig: AlarmRig, app_pool: Pool) -> None:
    """Changes sent while nobody listens are lost: until the feed is back every lookup reads PostgreSQL."""
    client, bridge = followed
    bridge.directory.feed_down()
    body = rig.event("heartbeat")
    assert (await client.post("/v1/events", body, rig.signed_headers(body)))[0] == 202
    assert len(bridge.directory._devices) == 0
    bridge.directory.feed_up()
    body = rig.event("heartbeat")
    assert (await client.post("/v1/events", body, rig.signed_headers(body)))[0] == 202
    assert len(bridge.directory._devices) == 1
