"""The change sequence the cache syncs from, NOTIFY, and the cache's set-based routing load."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, time
from uuid import UUID

import asyncpg
import pytest

from policy_cache import registry
from policy_cache.changes import change_watermark, changes_since
from policy_cache.db import Connection, DbRole, Pool, connect, tenant_tx
from policy_cache.errors import ChangeLogTruncatedError, TenantScopeError
from policy_cache.loader import RoutingRow, load_routing_rows
from policy_cache.models import (
    BindingCreate,
    BindingRole,
    ConsentCreate,
    ConsentPurpose,
    DeviceCapability,
    DeviceCreate,
    DeviceStatus,
    DeviceType,
    FallbackAction,
    HouseholdCreate,
    PolicyCreate,
    PolicyUpdate,
    PresenceState,
    RingMode,
    SubscriberCreate,
)
from policy_cache.seed import seed_synthetic, tenant_uuid
from tests.pg import PgDatabase, create_tenant

A = "test"


@dataclass
class World:
    tenant: UUID
    home: UUID
    other_home: UUID
    owner: UUID          # bound to the whole home
    member: UUID         # bound to the kitchen speaker only
    backup: UUID         # backup contact of the home
    neighbour: UUID      # owner of the other home
    living: UUID         # SIP speaker in home
    kitchen: UUID        # cloud speaker in home
    other_speaker: UUID  # in the other home


async def _world(pool: Pool, n: int) -> World:
    tenant = await create_tenant(pool, f"changes {n}")
    async with tenant_tx(pool, tenant) as c:
        home = (await registry.create(c, registry.HOUSEHOLD, HouseholdCreate(name="home", time_zone="Europe/Moscow"),
                                      actor=A)).id
        other = (await registry.create(c, registry.HOUSEHOLD, HouseholdCreate(name="other", time_zone="Asia/Omsk"),
                                       actor=A)).id
        subs = [(await registry.create(c, registry.SUBSCRIBER, SubscriberCreate(msisdn=f"+7920{n:03d}000{i}"),
                                       actor=A)).id for i in range(4)]
        living = (await registry.create(c, registry.DEVICE, DeviceCreate(
            household_id=home, name="living", type=DeviceType.SPEAKER, sip_uri=f"sip:living{n}@iim.local",
            capabilities=frozenset({DeviceCapability.SIP}), status=DeviceStatus.ONLINE), actor=A)).id
        kitchen = (await registry.create(c, registry.DEVICE, DeviceCreate(
            household_id=home, name="kitchen", type=DeviceType.SPEAKER, connector="webhook",
            connector_ref=f"k{n}", capabilities=frozenset({DeviceCapability.CLOUD_ANNOUNCE})), actor=A)).id
        other_speaker = (await registry.create(c, registry.DEVICE, DeviceCreate(
            household_id=other, name="o", type=DeviceType.SPEAKER, sip_uri=f"sip:o{n}@iim.local"), actor=A)).id
        await registry.create(c, registry.BINDING, BindingCreate(subscriber_id=subs[0], household_id=home,
                                                                 role=BindingRole.OWNER, priority=0), actor=A)
        await registry.create(
            c, registry.BINDING,
            BindingCreate(subscriber_id=subs[1], household_id=home, device_id=kitchen,
                          role=BindingRole.MEMBER, priority=1), actor=A)
        await registry.create(c, registry.BINDING, BindingCreate(subscriber_id=subs[2], household_id=home,
                                                                 role=BindingRole.BACKUP_CONTACT, priority=10), actor=A)
        await registry.create(c, registry.BINDING, BindingCreate(subscriber_id=subs[3], household_id=other,
                                                                 role=BindingRole.OWNER), actor=A)
    return World(tenant, home, other, subs[0], subs[1], subs[2], subs[3], living, kitchen, other_speaker)


_counter = iter(range(1, 1000))


@pytest.fixture
async def world(app_pool: Pool) -> World:
    return await _world(app_pool, next(_counter))


async def _changes(admin: Connection, after: int) -> list[asyncpg.Record]:
    return await admin.fetch("SELECT * FROM iim.change_log WHERE seq > $1 ORDER BY seq", after)


async def _seq(admin: Connection) -> int:
    return int(await admin.fetchval("SELECT coalesce(max(seq), 0) FROM iim.change_log"))


async def test_one_seq_per_committed_change(app_pool: Pool, admin_conn: Connection, world: World) -> None:
    base = await _seq(admin_conn)
    async with tenant_tx(app_pool, world.tenant) as c:
        await registry.set_device_status(c, world.living, DeviceStatus.OFFLINE, actor=A)
    async with tenant_tx(app_pool, world.tenant) as c:
        await registry.set_device_status(c, world.living, DeviceStatus.OFFLINE, actor=A)  # no-op: no row

    async def rolled_back() -> None:
        async with tenant_tx(app_pool, world.tenant) as c:
            await registry.set_presence(c, world.home, PresenceState.AWAY, actor=A)
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        await rolled_back()
    async with tenant_tx(app_pool, world.tenant) as c:
        await registry.set_presence(c, world.home, PresenceState.HOME, actor=A)
    rows = await _changes(admin_conn, base)
    assert [(r["entity"], r["op"]) for r in rows] == [("device", "UPDATE"), ("household", "UPDATE")]
    assert rows[0]["seq"] < rows[1]["seq"]
    assert {r["tenant_id"] for r in rows} == {world.tenant}
    assert rows[0]["entity_id"] == world.living


async def test_affected_subscribers_per_change(app_pool: Pool, admin_conn: Connection, world: World) -> None:
    w = world

    async def affected(action: object) -> set[UUID]:
        base = await _seq(admin_conn)
        async with tenant_tx(app_pool, w.tenant) as c:
            await action(c)  # type: ignore[operator]
        rows = await _changes(admin_conn, base)
        return {s for r in rows for s in r["subscriber_ids"]}

    # A device covered by household-wide bindings: the owner and the backup contact, not the member
    # bound to the kitchen speaker only.
    assert await affected(lambda c: registry.set_device_status(c, w.living, DeviceStatus.OFFLINE, actor=A)) == {
        w.owner, w.backup}
    assert await affected(lambda c: registry.set_device_status(c, w.kitchen, DeviceStatus.ONLINE, actor=A)) == {
        w.owner, w.member, w.backup}
    assert await affected(lambda c: registry.set_presence(c, w.home, PresenceState.AWAY, actor=A)) == {
        w.owner, w.member, w.backup}
    assert await affected(lambda c: registry.create(
        c, registry.POLICY, PolicyCreate(household_id=w.home, ring_mode=RingMode.SIMULTANEOUS), actor=A)) == {
        w.owner, w.member, w.backup}
    assert await affected(lambda c: registry.create(
        c, registry.POLICY, PolicyCreate(subscriber_id=w.neighbour), actor=A)) == {w.neighbour}
    assert await affected(lambda c: registry.create(
        c, registry.CONSENT,
        ConsentCreate(subscriber_id=w.owner, purpose=ConsentPurpose.ANNOUNCE_CALLS, evidence={"t": 1}),
        actor=A)) == {w.owner}
    assert await affected(lambda c: registry.delete(c, registry.DEVICE, w.other_speaker, actor=A)) == {w.neighbour}
    # A new binding changes the household's contacts: everyone in it.
    assert await affected(lambda c: registry.create(
        c, registry.BINDING,
        BindingCreate(subscriber_id=w.neighbour, household_id=w.home, role=BindingRole.SECURITY_SERVICE),
        actor=A)) == {w.owner, w.member, w.backup, w.neighbour}
    # Deleting a household cascades: every binding's subscriber is recorded.
    assert await affected(lambda c: registry.delete(c, registry.HOUSEHOLD, w.home, actor=A)) >= {
        w.owner, w.member, w.backup, w.neighbour}


async def test_notify_carries_the_seq(pg_db: PgDatabase, app_pool: Pool, admin_conn: Connection,
                                      world: World) -> None:
    listener = await connect(pg_db.cache_url, role=DbRole.CACHE)
    got: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener("iim_policy", lambda *args: got.put_nowait(args[3]))
        async with tenant_tx(app_pool, world.tenant) as c:
            await registry.set_device_status(c, world.kitchen, DeviceStatus.OFFLINE, actor=A)
            await asyncio.sleep(0.05)
            assert got.empty()  # delivered on commit only
        payload = await asyncio.wait_for(got.get(), 5)
        assert int(payload) == await _seq(admin_conn)
    finally:
        await listener.close()


async def test_changes_since(cache_conn: Connection, app_pool: Pool, world: World) -> None:
    start = await change_watermark(cache_conn)
    assert await changes_since(cache_conn, start) == ([], start)
    async with tenant_tx(app_pool, world.tenant) as c:
        await registry.set_presence(c, world.other_home, PresenceState.HOME, actor=A)
        await registry.create(c, registry.POLICY, PolicyCreate(subscriber_id=world.member), actor=A)
    ids, seq = await changes_since(cache_conn, start)
    assert sorted(ids) == sorted([world.neighbour, world.member])
    assert seq == start + 2 or seq > start
    assert await changes_since(cache_conn, seq) == ([], seq)
    async with cache_conn.transaction():
        with pytest.raises(TenantScopeError):
            await changes_since(cache_conn, seq)
        with pytest.raises(TenantScopeError):
            await change_watermark(cache_conn)


async def test_a_reader_never_skips_a_slow_writers_lower_seq(
    pg_db: PgDatabase, cache_conn: Connection, app_pool: Pool, world: World
) -> None:
    start = await change_watermark(cache_conn)
    slow = await connect(pg_db.app_url, role=DbRole.APP)
    try:
        tx = slow.transaction()
        await tx.start()
        await slow.execute("SELECT set_config('app.tenant', $1, true)", str(world.tenant))
        await slow.execute("UPDATE iim.device SET status = 'offline' WHERE id = $1", world.other_speaker)  # lower seq
        async with tenant_tx(app_pool, world.tenant) as c:  # higher seq, committed first
            await registry.set_presence(c, world.home, PresenceState.AWAY, actor=A)
        reader = asyncio.create_task(changes_since(cache_conn, start))
        await asyncio.sleep(0.3)
        assert not reader.done()  # waits for the in-flight writer instead of jumping past its seq
        await tx.commit()
        ids, seq = await asyncio.wait_for(reader, 5)
    finally:
        await slow.close()
    assert world.neighbour in ids  # the slow writer's change
    assert world.owner in ids      # the fast writer's change
    assert await changes_since(cache_conn, seq) == ([], seq)


async def test_pruned_change_log_asks_for_a_full_reload(cache_conn: Connection, admin_conn: Connection,
                                                        app_pool: Pool, world: World) -> None:
    old = await change_watermark(cache_conn)
    async with tenant_tx(app_pool, world.tenant) as c:
        await registry.set_presence(c, world.home, PresenceState.AWAY, actor=A)
    await admin_conn.execute("SELECT iim.prune_change_log('-1 hour'::interval)")  # prune everything
    with pytest.raises(ChangeLogTruncatedError):
        await changes_since(cache_conn, old - 1 if old else -1)
    now = await change_watermark(cache_conn)
    assert await changes_since(cache_conn, now) == ([], now)


def _by_sub(rows: list[RoutingRow]) -> dict[UUID, RoutingRow]:
    return {r.subscriber_id: r for r in rows}


async def test_load_routing_rows(cache_conn: Connection, app_pool: Pool, world: World) -> None:
    w = world
    async with tenant_tx(app_pool, w.tenant) as c:
        home_policy = await registry.create(c, registry.POLICY, PolicyCreate(
            household_id=w.home, ring_mode=RingMode.SIMULTANEOUS, quiet_start=time(23), quiet_end=time(7, 30),
            blocked_callers=["+79991112233"], fallback=FallbackAction.MISSED_CALL_SMS), actor=A)
        await registry.create(
            c, registry.POLICY, PolicyCreate(subscriber_id=w.member, ring_mode=RingMode.HOME_ONLY), actor=A)
        await registry.create(
            c, registry.CONSENT,
            ConsentCreate(subscriber_id=w.owner, purpose=ConsentPurpose.ANNOUNCE_CALLS,
                          scope={"rooms": ["living"]}, evidence={"x": 1}), actor=A)
        await registry.set_presence(c, w.home, PresenceState.HOME, actor=A)

    stream = load_routing_rows(cache_conn)
    rows = [row async for row in stream]
    assert stream.watermark is not None
    assert stream.affected is None
    mine = _by_sub([r for r in rows if r.tenant_id == w.tenant])
    assert set(mine) == {w.owner, w.member, w.backup, w.neighbour}

    owner = mine[w.owner]
    assert owner.policy is not None
    assert owner.policy.scope == "household"
    assert owner.policy.id == home_policy.id
    assert owner.policy.quiet_start == time(23)
    assert owner.policy.quiet_end == time(7, 30)
    assert owner.policy.blocked_callers == ("+79991112233",)
    assert owner.policy.fallback is FallbackAction.MISSED_CALL_SMS
    assert owner.primary is not None
    assert owner.primary.household.time_zone == "Europe/Moscow"
    assert owner.primary.household.presence is PresenceState.HOME
    assert [d.id for d in owner.primary.devices] == sorted([w.living, w.kitchen])
    living = next(d for d in owner.primary.devices if d.id == w.living)
    assert living.capabilities == frozenset({DeviceCapability.SIP})
    assert living.status is DeviceStatus.ONLINE
    assert living.sip_uri is not None
    assert isinstance(living.status_since, float)
    consent = owner.consent(ConsentPurpose.ANNOUNCE_CALLS, datetime.now(UTC))
    assert consent is not None
    assert consent.scope == {"rooms": ["living"]}

    member = mine[w.member]
    assert member.policy is not None
    assert member.policy.scope == "subscriber"
    assert member.policy.ring_mode is RingMode.HOME_ONLY
    assert [d.id for d in member.bindings[0].devices] == [w.kitchen]  # bound to one device only
    assert member.bindings[0].household is owner.bindings[0].household  # shared object
    assert mine[w.backup].bindings == ()  # a backup contact does not ring at that home
    assert mine[w.backup].policy is None
    assert mine[w.neighbour].primary is not None


async def test_incremental_load_follows_changes(cache_conn: Connection, app_pool: Pool, world: World) -> None:
    w = world
    start = await change_watermark(cache_conn)
    async with tenant_tx(app_pool, w.tenant) as c:
        await registry.set_device_status(c, w.living, DeviceStatus.OFFLINE, actor=A)
        await registry.delete(c, registry.SUBSCRIBER, w.neighbour, actor=A)
    stream = load_routing_rows(cache_conn, since_seq=start)
    rows = _by_sub([r async for r in stream])
    assert stream.affected == {w.owner, w.backup, w.neighbour}
    assert set(rows) == {w.owner, w.backup}  # the neighbour was deleted: drop it from the cache
    assert stream.watermark is not None
    assert stream.watermark > start
    living = next(d for d in rows[w.owner].primary.devices if d.id == w.living)  # type: ignore[union-attr]
    assert living.status is DeviceStatus.OFFLINE
    listed = load_routing_rows(cache_conn, subscriber_ids=[w.member])
    assert [r.subscriber_id for r in [r async for r in listed]] == [w.member]
    nothing = load_routing_rows(cache_conn, since_seq=stream.watermark)
    assert [r async for r in nothing] == []
    assert nothing.affected == frozenset()
    assert nothing.watermark == stream.watermark


async def test_policy_update_reaches_the_cache_rows(cache_conn: Connection, app_pool: Pool, world: World) -> None:
    async with tenant_tx(app_pool, world.tenant) as c:
        policy = await registry.create(c, registry.POLICY, PolicyCreate(household_id=world.home), actor=A)
    start = await change_watermark(cache_conn)
    async with tenant_tx(app_pool, world.tenant) as c:
        await registry.update(c, registry.POLICY, policy.id, PolicyUpdate(dnd=True), expected_version=1, actor=A)
    stream = load_routing_rows(cache_conn, since_seq=start)
    rows = [r async for r in stream]
    assert {r.subscriber_id for r in rows} == {world.owner, world.member, world.backup}
    owner = next(r for r in rows if r.subscriber_id == world.owner)
    assert owner.policy is not None
    assert owner.policy.dnd
    assert owner.policy.version == 2


async def test_seeded_tenants_load(admin_conn: Connection, cache_conn: Connection) -> None:
    report = await seed_synthetic(admin_conn, tenants=2, subscribers=301, first_tenant=900)
    assert report.tenants == (tenant_uuid(900), tenant_uuid(901))
    assert report.subscribers == 301
    assert report.devices == 3 * report.households
    batches = [b async for b in load_routing_rows(cache_conn, batch=50).batches()]
    rows = [r for b in batches for r in b if r.tenant_id in report.tenants]
    assert len(rows) == 301
    assert all(len(b) <= 50 for b in batches)
    assert len({r.msisdn for r in rows}) == 301
    owners = [r for r in rows if r.primary is not None and r.primary.role is BindingRole.OWNER]
    assert len(owners) == report.households
    assert all(r.policy is not None for r in rows)
    assert sum(1 for r in rows if r.policy is not None and r.policy.scope == "subscriber") == len(range(0, 151, 10)) + \
        len(range(0, 150, 10))
    assert sum(1 for r in rows if r.consents) == len(range(0, 150, 2)) + len(range(0, 151, 2))
    assert all(len(r.primary.devices) == 3 for r in owners)  # type: ignore[union-attr]
