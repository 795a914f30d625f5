"""The policy cache against a real PostgreSQL: full load, change push, a cut listener, PG away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from fs_app.routing import CallFacts, decide
from iim.core.errors import STORE_UNAVAILABLE
from policy_cache import registry
from policy_cache.bootstrap import Demo, load_demo
from policy_cache.cache import PolicyCache
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from policy_cache.models import DeviceCapability, DeviceCreate, DeviceType, PolicyUpdate, RingMode
from policy_cache.store import PgPolicyStore
from tests.conftest import eventually
from tests.pg import PgDatabase, private_pg
from tests.tcp_proxy import TcpFaultProxy

OWNER = "+79001234567"


@pytest.fixture
async def demo(app_pool: Pool) -> Demo:
    async with app_pool.acquire() as conn:
        return await load_demo(conn)


@pytest.fixture
async def proxy(pg_db: PgDatabase) -> AsyncIterator[TcpFaultProxy]:
    p = TcpFaultProxy(pg_db.cache_url)
    await p.start()
    yield p
    await p.close()


@pytest.fixture
async def cache(proxy: TcpFaultProxy, demo: Demo) -> AsyncIterator[PolicyCache]:
    store = PgPolicyStore(proxy.dsn(), connect_timeout=1.0)
    c = PolicyCache(store, resync_interval=5.0)
    await c.start(timeout=10)
    yield c
    await c.aclose()
    await store.aclose()


async def _set_ring_mode(pool: Pool, demo: Demo, mode: RingMode) -> None:
    async with tenant_tx(pool, demo.tenant_id) as tx:
        await registry.update(tx, registry.POLICY, demo.policy_id, PolicyUpdate(ring_mode=mode), actor="test")


async def test_full_load_compiles_every_subscriber_of_the_demo_tenant(cache: PolicyCache, demo: Demo) -> None:
    snap = cache.lookup(OWNER)
    assert snap is not None
    assert cache.lookup(OWNER.removeprefix("+")) is snap  # the core may drop the +
    assert cache.lookup("+79001234567@iim.local") is snap
    assert snap.tenant_id == str(demo.tenant_id)
    assert snap.time_zone == "Europe/Moscow"
    assert (snap.quiet_start_min, snap.quiet_end_min) == (23 * 60, 7 * 60)
    assert snap.announce_consent
    assert snap.presence == "home"
    endpoints = {(d.endpoint, d.sip, d.cloud_announce) for d in snap.speakers}
    assert endpoints == {("speaker-1@iim.local", True, False), ("webhook:kitchen-speaker-1", False, True)}
    backup = cache.lookup("+79007654321")
    assert backup is not None
    assert backup.ring_mode == "phone_only"  # a backup contact's own calls do not ring the house
    assert cache.health()["status"] == "ok"


async def test_committed_policy_change_is_served_without_a_reload(
    cache: PolicyCache, app_pool: Pool, demo: Demo
) -> None:
    await _set_ring_mode(app_pool, demo, RingMode.PHONE_THEN_HOME)
    await eventually(lambda: cache.lookup(OWNER).ring_mode == "phone_then_home")  # type: ignore[union-attr]
    await _set_ring_mode(app_pool, demo, RingMode.SIMULTANEOUS)
    await eventually(lambda: cache.lookup(OWNER).ring_mode == "simultaneous")  # type: ignore[union-attr]


async def test_change_committed_while_the_listener_was_cut_is_served_after_reconnect(
    cache: PolicyCache, proxy: TcpFaultProxy, app_pool: Pool, demo: Demo
) -> None:
    seq_before = cache.seq
    proxy.cut()
    await eventually(lambda: not cache.status().listener_up)
    await _set_ring_mode(app_pool, demo, RingMode.HOME_THEN_PHONE)
    await asyncio.sleep(0.3)
    snap = cache.lookup(OWNER)
    assert snap is not None
    assert snap.ring_mode == "simultaneous"  # still serving the last snapshot
    health = cache.health()
    assert health["status"] == "degraded"
    assert health["policy_cache"]["staleness_s"] > 0  # type: ignore[index]
    proxy.restore()
    await eventually(lambda: cache.lookup(OWNER).ring_mode == "home_then_phone", timeout=15)  # type: ignore[union-attr]
    assert cache.seq > seq_before
    assert cache.health()["status"] == "ok"
    await _set_ring_mode(app_pool, demo, RingMode.SIMULTANEOUS)
    await eventually(lambda: cache.lookup(OWNER).ring_mode == "simultaneous")  # type: ignore[union-attr]


async def test_registration_changes_take_a_speaker_out_of_the_fork_at_once(cache: PolicyCache) -> None:
    noon = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)  # 12:00 in Moscow
    call = CallFacts(OWNER, "+79160000000")
    before = decide(cache.lookup(OWNER), call, noon)  # type: ignore[arg-type]
    assert "speaker-1@iim.local" in [leg.target for leg in before.legs]
    assert cache.set_device_online("speaker-1@iim.local", False) == 1
    after = decide(cache.lookup(OWNER), call, noon)  # type: ignore[arg-type]
    assert "speaker-1@iim.local" not in [leg.target for leg in after.legs]
    cache.set_device_online("speaker-1@iim.local", True)


async def test_full_load_and_incremental_reload_compile_identical_snapshots(
    pg_db: PgDatabase, demo: Demo
) -> None:
    """The full load (set-based SQL) and a sync (per-subscriber rows) are two paths to one result."""
    store = PgPolicyStore(pg_db.cache_url)
    try:
        full, _ = await store.load_all()
        again = await store.load_subscribers([s.subscriber_id for s in full])
    finally:
        await store.aclose()
    assert len(full) >= 2
    assert {s.subscriber_id: s for s in full} == {s.subscriber_id: s for s in again}


async def test_a_change_after_a_postgresql_restart_reaches_the_cache() -> None:
    async with private_pg() as pg:
        assert pg.db is not None
        pool = await connect_pool(pg.db.app_url, role=DbRole.APP, min_size=1, max_size=2)
        store = PgPolicyStore(pg.db.cache_url, connect_timeout=1.0)
        cache = PolicyCache(store, resync_interval=5.0)
        try:
            async with pool.acquire() as conn:
                demo = await load_demo(conn)
            await cache.start(timeout=10)
            await pg.restart(down_s=1.0)  # the feed's connection dies with the server
            deadline = asyncio.get_running_loop().time() + 15
            while True:  # the pool's connections died with the server; a fresh one commits the change
                try:
                    await _set_ring_mode(pool, demo, RingMode.HOME_THEN_PHONE)
                    break
                except STORE_UNAVAILABLE:
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.2)
            await eventually(lambda: cache.lookup(OWNER).ring_mode == "home_then_phone", timeout=15)  # type: ignore[union-attr]
            assert cache.health()["status"] == "ok"
        finally:
            await cache.aclose()
            await store.aclose()
            await pool.close()


async def test_a_webrtc_only_device_compiles_as_webrtc_on_both_load_paths(
    pg_db: PgDatabase, app_pool: Pool, demo: Demo
) -> None:
    """WebRTC-only devices get a WebRTC offer (ICE, DTLS-SRTP); one that also speaks plain SIP is rung as SIP."""
    kinds = {"browser": {DeviceCapability.WEBRTC}, "desk": {DeviceCapability.SIP, DeviceCapability.WEBRTC}}
    async with tenant_tx(app_pool, demo.tenant_id) as tx:
        for user, caps in kinds.items():
            await registry.create(tx, registry.DEVICE, DeviceCreate(
                household_id=demo.household_id, name=user, type=DeviceType.SPEAKER, capabilities=frozenset(caps),
                sip_uri=f"sip:{user}@iim.local"), actor="test")
    store = PgPolicyStore(pg_db.cache_url)
    try:
        full, _ = await store.load_all()
        again = await store.load_subscribers([s.subscriber_id for s in full])
    finally:
        await store.aclose()
    for snapshots in (full, again):
        owner = next(s for s in snapshots if s.msisdn == OWNER)
        webrtc = {d.endpoint: d.webrtc for d in owner.speakers if d.sip}
        assert webrtc == {"speaker-1@iim.local": False, "browser@iim.local": True, "desk@iim.local": False}
