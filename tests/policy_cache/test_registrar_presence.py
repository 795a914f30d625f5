"""Presence from the Kamailio edge's registrations (migration 0038, ``policy_cache/registrar_presence.py``), against a
real PostgreSQL without Kamailio: rows are written as the edge's role ``iim_registrar`` exactly as usrloc
(``db_mode 1``) writes them, and the household's registration claim follows: a member's phone registered from
the home network is home while a contact is live, from elsewhere away, released when the last contact goes, caught
up after notifications were missed; a kitchen speaker (registered whether anyone is in or not) says nothing unless
the registry's presence_hint says it does, nor does any registration of a household without home networks. The
role itself can touch nothing but the location table; the cache role sees only the view of who, until when, from
which address."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from policy_cache import presence_store, registry
from policy_cache.audit import flush_pending
from policy_cache.bootstrap import scram_verifier
from policy_cache.db import Connection, DbRole, Pool, connect_pool, tenant_tx
from policy_cache.models import (
    BindingCreate,
    BindingRole,
    DeviceCreate,
    DeviceType,
    DeviceUpdate,
    HouseholdCreate,
    SubscriberCreate,
)
from policy_cache.presence_feed import PresenceFeed
from policy_cache.registrar_presence import ACTOR, RegistrarPresence
from tests.conftest import eventually
from tests.pg import PgCluster, PgDatabase, create_tenant
from tests.tcp_proxy import TcpFaultProxy

DOMAIN = "iim.example"


@pytest.fixture
async def registrar_conn(pg_cluster: PgCluster, pg_db: PgDatabase, admin_conn: Connection
                         ) -> AsyncIterator[asyncpg.Connection]:
    """The edge's usrloc connection (UL_DB_URL): login role iim_registrar, its search_path kamailio."""
    await admin_conn.execute(f"ALTER ROLE iim_registrar PASSWORD '{scram_verifier(pg_cluster.role_password)}'")
    conn = await asyncpg.connect(pg_cluster.url(pg_db.name, user="iim_registrar"))
    yield conn
    await conn.close()


@pytest.fixture
async def directory(pg_db: PgDatabase) -> AsyncIterator[Pool]:
    pool = await connect_pool(pg_db.cache_url, role=DbRole.CACHE, min_size=1, max_size=2)
    yield pool
    await pool.close()


@pytest.fixture
async def feed(app_pool: Pool, directory: Pool) -> AsyncIterator[PresenceFeed]:
    async with PresenceFeed(app_pool, directory, deadline_s=5.0) as f:
        yield f


#: the household's home network in most tests: the contacts below register from 127.0.0.4
LOOPBACK = ["127.0.0.0/8"]


async def _home_with_member(app_pool: Pool, user: str, *, networks: list[str] | None = None) -> tuple[UUID, UUID]:
    """A household whose member's own SIP AoR (their phone) is ``user@DOMAIN``; home networks: ``LOOPBACK``."""
    tenant = await create_tenant(app_pool, f"reg-{user}")
    async with tenant_tx(app_pool, tenant) as conn:
        home = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(
            name="home", time_zone="Europe/Moscow", home_networks=LOOPBACK if networks is None else networks),
            actor="test")
        member = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(
            msisdn=f"+7900{uuid.uuid4().int % 10**7:07d}", sip_aor=f"sip:{user}@{DOMAIN}"), actor="test")
        await registry.create(conn, registry.BINDING, BindingCreate(
            subscriber_id=member.id, household_id=home.id, role=BindingRole.MEMBER), actor="test")
    return tenant, home.id


async def _home_with_speaker(app_pool: Pool, user: str) -> tuple[UUID, UUID, UUID]:
    """A household on ``LOOPBACK`` with a fixed kitchen speaker ``user@DOMAIN``; (tenant, household, device)."""
    tenant = await create_tenant(app_pool, f"reg-{user}")
    async with tenant_tx(app_pool, tenant) as conn:
        home = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(
            name="home", time_zone="Europe/Moscow", home_networks=LOOPBACK), actor="test")
        speaker = await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=home.id, name=user, type=DeviceType.SPEAKER, sip_uri=f"sip:{user}@{DOMAIN}"), actor="test")
    return tenant, home.id, speaker.id


def _local(at: datetime, zone: str) -> str:
    """How srdb1 writes a time: the edge's local time, no zone (``localtime`` + ``%Y-%m-%d %H:%M:%S``)."""
    return at.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S")


async def _usrloc_insert(conn: asyncpg.Connection, user: str, *, expires_in_s: float, zone: str = "UTC",
                         permanent: bool = False, host: str = "127.0.0.4", received: str | None = None) -> str:
    """usrloc's db_insert_ucontact as db_postgres sends it (literal values, unqualified table); returns the ruid.
    ``host``: the Contact's; ``received``: the source behind a NAT (fix_nated_register), as usrloc stores it."""
    ruid = f"uloc-{uuid.uuid4().hex[:8]}-{uuid.uuid4().hex[:4]}-1"
    now = datetime.now(UTC)
    expires = "1970-01-01 00:00:00" if permanent else _local(now + timedelta(seconds=expires_in_s), zone)
    nat = "NULL" if received is None else f"'{received}'"
    await conn.execute(
        "insert into location (username,contact,expires,q,callid,cseq,flags,cflags,user_agent,received,path,socket,"
        "methods,last_modified,ruid,instance,reg_id,server_id,connection_id,keepalive,partition,domain) values "
        f"('{user}','sip:{user}@{host}:5060;ob','{expires}',-1.000000,'{uuid.uuid4().hex}@{host}',2,0,0,"
        f"'iim-test',{nat},NULL,'udp:127.0.0.1:5060',8191,'{_local(now, zone)}','{ruid}',NULL,0,0,0,0,0,"
        f"'{DOMAIN}')")
    return ruid


async def _usrloc_delete(conn: asyncpg.Connection, ruid: str) -> None:
    await conn.execute(f"delete from location where ruid='{ruid}'")


async def _claims(app_pool: Pool, tenant: UUID, household: UUID) -> list[presence_store.StoredClaim]:
    async with tenant_tx(app_pool, tenant, readonly=True) as conn:
        _, claims = await presence_store.list_claims(conn, household)
    return [c for c in claims if c.expires_at > datetime.now(UTC)]


async def _wait_claims(app_pool: Pool, tenant: UUID, household: UUID, count: int, timeout: float = 10.0
                       ) -> list[presence_store.StoredClaim]:
    found: list[presence_store.StoredClaim] = []

    async def poll() -> bool:
        nonlocal found
        found = await _claims(app_pool, tenant, household)
        return len(found) == count

    await eventually_async(poll, timeout)
    return found


async def eventually_async(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """:func:`tests.conftest.eventually` for a check that reads the database."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def _registrar(pg_db: PgDatabase, directory: Pool, feed: PresenceFeed, *, dsn: str | None = None,
               zone: str = "UTC") -> RegistrarPresence:
    return RegistrarPresence(dsn or pg_db.cache_url, directory, partial(feed.registration, via="kamailio"),
                             edge_time_zone=zone, deadline_s=5.0, check_interval_s=0.5)


async def test_a_members_phone_registered_from_the_home_network_puts_the_household_home_until_it_is_removed(
        pg_db: PgDatabase, app_pool: Pool, directory: Pool, feed: PresenceFeed, admin_conn: Connection,
        registrar_conn: asyncpg.Connection) -> None:
    user = "anna-" + uuid.uuid4().hex[:6]
    tenant, home = await _home_with_member(app_pool, user)
    async with _registrar(pg_db, directory, feed) as registrar:
        await eventually(registrar.reconciled.is_set, timeout=10)
        ruid = await _usrloc_insert(registrar_conn, user, expires_in_s=120)
        (claim,) = await _wait_claims(app_pool, tenant, home, 1)
        assert (claim.source, claim.subject, claim.state, claim.actor, claim.basis) == (
            "registration", f"{user}@{DOMAIN}", "home", ACTOR, "from home network 127.0.0.0/8")
        lifetime = (claim.expires_at - claim.observed_at).total_seconds()
        assert 140 <= lifetime <= 152, lifetime  # the contact's remaining 120 s and the feed's 30 s of grace
        # A refresh (usrloc's UPDATE) keeps it; a second contact's removal does not end it while one is live.
        await registrar_conn.execute(f"update location set cseq=3 where ruid='{ruid}'")
        second = await _usrloc_insert(registrar_conn, user, expires_in_s=60)
        await _usrloc_delete(registrar_conn, second)
        await feed.wait_idle()
        assert len(await _wait_claims(app_pool, tenant, home, 1)) == 1
        await _usrloc_delete(registrar_conn, ruid)  # an un-REGISTER, or the edge's expiry timer
        await _wait_claims(app_pool, tenant, home, 0)
    await flush_pending(app_pool)
    audit = await admin_conn.fetch("SELECT actor, action, correlation FROM iim.audit_log WHERE tenant_id = $1 "
                                   "AND action LIKE 'household.presence_%' ORDER BY id", tenant)
    assert [(r["actor"], r["action"], r["correlation"]) for r in audit] == [
        (ACTOR, "household.presence_claim", {"channel": "location"}),
        (ACTOR, "household.presence_release", {"channel": "location"})]


async def test_a_contact_past_its_expiry_says_nothing_and_a_permanent_one_says_home(
        pg_db: PgDatabase, app_pool: Pool, directory: Pool, feed: PresenceFeed,
        registrar_conn: asyncpg.Connection) -> None:
    stale, fixed = "stale-" + uuid.uuid4().hex[:6], "fixed-" + uuid.uuid4().hex[:6]
    stale_home = await _home_with_member(app_pool, stale)
    fixed_home = await _home_with_member(app_pool, fixed)
    await _usrloc_insert(registrar_conn, stale, expires_in_s=-5)  # not yet swept by the edge's timer
    await _usrloc_insert(registrar_conn, fixed, expires_in_s=0, permanent=True)  # usrloc's expires 0
    async with _registrar(pg_db, directory, feed) as registrar:
        await eventually(registrar.reconciled.is_set, timeout=10)
        await feed.wait_idle()
        (claim,) = await _wait_claims(app_pool, *fixed_home, 1)
        assert claim.state == "home"
        assert await _claims(app_pool, *stale_home) == []


async def test_the_edge_writes_its_local_time_and_the_reader_is_told_its_zone(
        pg_db: PgDatabase, app_pool: Pool, directory: Pool, feed: PresenceFeed,
        registrar_conn: asyncpg.Connection) -> None:
    user = "east-" + uuid.uuid4().hex[:6]
    tenant, home = await _home_with_member(app_pool, user)
    async with _registrar(pg_db, directory, feed, zone="Asia/Vladivostok") as registrar:  # UTC+10
        await eventually(registrar.reconciled.is_set, timeout=10)
        await _usrloc_insert(registrar_conn, user, expires_in_s=300, zone="Asia/Vladivostok")
        (claim,) = await _wait_claims(app_pool, tenant, home, 1)
        lifetime = (claim.expires_at - claim.observed_at).total_seconds()
        assert 320 <= lifetime <= 332, lifetime  # read as UTC it would have been ten hours more


async def test_changes_missed_while_the_listen_connection_was_down_are_caught_up_when_it_returns(
        pg_db: PgDatabase, app_pool: Pool, directory: Pool, feed: PresenceFeed,
        registrar_conn: asyncpg.Connection) -> None:
    left, arrived = "left-" + uuid.uuid4().hex[:6], "arrived-" + uuid.uuid4().hex[:6]
    left_home = await _home_with_member(app_pool, left)
    arrived_home = await _home_with_member(app_pool, arrived)
    proxy = TcpFaultProxy(pg_db.cache_url)
    await proxy.start()
    try:
        async with _registrar(pg_db, directory, feed, dsn=proxy.dsn()) as registrar:
            await eventually(registrar.listening.is_set, timeout=10)
            ruid = await _usrloc_insert(registrar_conn, left, expires_in_s=600)
            await _wait_claims(app_pool, *left_home, 1)
            proxy.cut()
            await eventually(lambda: not registrar.listening.is_set(), timeout=10)
            # Meanwhile at the edge: one speaker leaves, another registers. Nobody hears the NOTIFYs.
            await _usrloc_delete(registrar_conn, ruid)
            await _usrloc_insert(registrar_conn, arrived, expires_in_s=600)
            await feed.wait_idle()
            assert len(await _claims(app_pool, *left_home)) == 1
            assert await _claims(app_pool, *arrived_home) == []
            registrar.reconciled.clear()
            proxy.restore()
            await eventually(registrar.reconciled.is_set, timeout=15)  # reconnected: the table is read again
            await _wait_claims(app_pool, *left_home, 0)
            (claim,) = await _wait_claims(app_pool, *arrived_home, 1)
            assert claim.subject == f"{arrived}@{DOMAIN}"
    finally:
        await proxy.close()


async def test_a_change_heard_while_the_table_cannot_be_read_is_applied_once_it_can(
        pg_db: PgDatabase, app_pool: Pool, directory: Pool, feed: PresenceFeed,
        registrar_conn: asyncpg.Connection) -> None:
    user = "patient-" + uuid.uuid4().hex[:6]
    tenant, home = await _home_with_member(app_pool, user)
    proxy = TcpFaultProxy(pg_db.cache_url)
    await proxy.start()
    reads = await connect_pool(proxy.dsn(), role=DbRole.CACHE, min_size=1, max_size=1, timeout=2.0,
                               command_timeout=2.0, acquire_timeout=2.0)
    try:
        registrar = RegistrarPresence(pg_db.cache_url, reads, partial(feed.registration, via="kamailio"),
                                      deadline_s=2.0, check_interval_s=0.5)
        async with registrar:
            await eventually(registrar.reconciled.is_set, timeout=10)
            proxy.cut()  # the reads' way to PostgreSQL is gone; the NOTIFY still arrives
            await _usrloc_insert(registrar_conn, user, expires_in_s=600)
            await asyncio.sleep(1.0)
            assert await _claims(app_pool, tenant, home) == []
            proxy.restore()
            (claim,) = await _wait_claims(app_pool, tenant, home, 1, timeout=20)
            assert claim.subject == f"{user}@{DOMAIN}"
    finally:
        await reads.close()
        await proxy.close()


async def test_a_claim_left_by_a_previous_run_is_withdrawn_when_its_registration_is_gone(
        pg_db: PgDatabase, app_pool: Pool, directory: Pool, feed: PresenceFeed) -> None:
    user = "gone-" + uuid.uuid4().hex[:6]
    tenant, home = await _home_with_member(app_pool, user)
    async with tenant_tx(app_pool, tenant) as conn:  # said by an IIM that stopped before the un-REGISTER
        await presence_store.put_claim(conn, home, source="registration", subject=f"{user}@{DOMAIN}", state="home",
                                       ttl_s=3600, actor=ACTOR)
    async with _registrar(pg_db, directory, feed) as registrar:
        await eventually(registrar.reconciled.is_set, timeout=10)
        await _wait_claims(app_pool, tenant, home, 0)


async def test_the_registrar_role_writes_the_location_table_and_nothing_else(
        registrar_conn: asyncpg.Connection) -> None:
    assert await registrar_conn.fetchval("SELECT table_version FROM version WHERE table_name = 'location'") == 9
    for query in ("SELECT name FROM iim.device", "SELECT username FROM kamailio.subscriber",
                  "SELECT 1 FROM iim.audit_log", "SELECT 1 FROM iim.presence_claim", "SELECT 1 FROM iim.tenant",
                  "UPDATE version SET table_version = 10", "DELETE FROM version",
                  "INSERT INTO iim.change_log DEFAULT VALUES", "SELECT kamailio.location_notify()",
                  "CREATE TABLE kamailio.mine (x int)"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await registrar_conn.execute(query)


async def test_the_cache_role_reads_who_is_registered_and_from_which_address_but_not_their_contacts(
        cache_conn: Connection, registrar_conn: asyncpg.Connection) -> None:
    direct, natted, named = ("src-" + uuid.uuid4().hex[:6] for _ in range(3))
    await _usrloc_insert(registrar_conn, direct, expires_in_s=60, host="192.0.2.10")
    await _usrloc_insert(registrar_conn, natted, expires_in_s=60, host="10.0.0.7",
                         received="sip:203.0.113.9:34567;transport=tcp")
    await _usrloc_insert(registrar_conn, named, expires_in_s=60, host="phone.example")
    rows = await cache_conn.fetch("SELECT username, domain, expires, source_ip FROM kamailio.location_source "
                                  "WHERE username = ANY($1::text[])", [direct, natted, named])
    assert {r["username"]: r["source_ip"] for r in rows} == {
        direct: "192.0.2.10", natted: "203.0.113.9", named: None}  # behind a NAT: where it really came from
    for column in ("username", "contact", "received", "user_agent", "socket"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await cache_conn.fetch(f"SELECT {column} FROM kamailio.location")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await cache_conn.execute("DELETE FROM kamailio.location")


async def test_a_phone_registered_outside_the_home_networks_says_its_person_is_away(
        pg_db: PgDatabase, app_pool: Pool, directory: Pool, feed: PresenceFeed,
        registrar_conn: asyncpg.Connection) -> None:
    user = "roaming-" + uuid.uuid4().hex[:6]
    tenant, home = await _home_with_member(app_pool, user, networks=["192.0.2.0/24", "127.0.0.0/8"])
    async with _registrar(pg_db, directory, feed) as registrar:
        await eventually(registrar.reconciled.is_set, timeout=10)
        at_home = await _usrloc_insert(registrar_conn, user, expires_in_s=300, host="10.0.0.7",
                                       received="sip:192.0.2.77:5060")  # the home router's NAT
        (claim,) = await _wait_claims(app_pool, tenant, home, 1)
        assert (claim.state, claim.basis) == ("home", "from home network 192.0.2.0/24")
        # Left the house: the Wi-Fi contact goes, the phone registers over the mobile network.
        await _usrloc_delete(registrar_conn, at_home)
        await _usrloc_insert(registrar_conn, user, expires_in_s=300, host="198.51.100.7")
        await eventually_async(lambda: _state_is(app_pool, tenant, home, "away"), 10)
        (claim,) = await _claims(app_pool, tenant, home)
        assert claim.basis == "from 198.51.100.7, outside the home networks"


async def _state_is(app_pool: Pool, tenant: UUID, household: UUID, state: str) -> bool:
    return [c.state for c in await _claims(app_pool, tenant, household)] == [state]


async def test_without_home_networks_a_members_registration_says_nothing(
        pg_db: PgDatabase, app_pool: Pool, directory: Pool, feed: PresenceFeed,
        registrar_conn: asyncpg.Connection) -> None:
    user = "nowhere-" + uuid.uuid4().hex[:6]
    tenant, home = await _home_with_member(app_pool, user, networks=[])
    async with _registrar(pg_db, directory, feed) as registrar:
        await eventually(registrar.reconciled.is_set, timeout=10)
        await _usrloc_insert(registrar_conn, user, expires_in_s=300)
        await eventually(lambda: f"{user}@{DOMAIN}" in registrar._online, timeout=10)  # said to the feed
        await feed.wait_idle()
        assert await _claims(app_pool, tenant, home) == []  # reachable is not located


async def test_a_kitchen_speaker_says_nothing_unless_its_presence_hint_says_it_does(
        pg_db: PgDatabase, app_pool: Pool, directory: Pool, feed: PresenceFeed,
        registrar_conn: asyncpg.Connection) -> None:
    user = "kitchen-" + uuid.uuid4().hex[:6]
    tenant, home, speaker = await _home_with_speaker(app_pool, user)
    async with _registrar(pg_db, directory, feed) as registrar:
        await eventually(registrar.reconciled.is_set, timeout=10)
        ruid = await _usrloc_insert(registrar_conn, user, expires_in_s=300)
        await eventually(lambda: f"{user}@{DOMAIN}" in registrar._online, timeout=10)
        await feed.wait_idle()
        assert await _claims(app_pool, tenant, home) == []  # plugged in all day: not a word about anyone
        async with tenant_tx(app_pool, tenant) as conn:  # this "speaker" goes where its person goes
            await registry.update(conn, registry.DEVICE, speaker, DeviceUpdate(presence_hint=True), actor="test")
        await registrar_conn.execute(f"update location set cseq=3 where ruid='{ruid}'")  # its next refresh
        (claim,) = await _wait_claims(app_pool, tenant, home, 1)
        assert (claim.state, claim.subject) == ("home", f"{user}@{DOMAIN}")
        async with tenant_tx(app_pool, tenant) as conn:
            await registry.update(conn, registry.DEVICE, speaker, DeviceUpdate(presence_hint=False), actor="test")
        await registrar_conn.execute(f"update location set cseq=4 where ruid='{ruid}'")
        await _wait_claims(app_pool, tenant, home, 0)  # the claim it held is withdrawn, not left to expire
