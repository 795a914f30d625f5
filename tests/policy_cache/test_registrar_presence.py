"""Presence from the Kamailio edge's registrations (migration 0038, ``policy_cache/registrar_presence.py``), against a
real PostgreSQL without Kamailio: rows are written as the edge's role ``iim_registrar`` exactly as usrloc
(``db_mode 1``) writes them, and the household's registration claim follows: home while a contact is live,
released when the last one goes, caught up after notifications were missed. The role itself can touch nothing
but the location table."""

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
from policy_cache.models import DeviceCreate, DeviceType, HouseholdCreate
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


async def _home_with_speaker(app_pool: Pool, user: str) -> tuple[UUID, UUID]:
    tenant = await create_tenant(app_pool, f"reg-{user}")
    async with tenant_tx(app_pool, tenant) as conn:
        home = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(name="home", time_zone="Europe/Moscow"),
                                     actor="test")
        await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=home.id, name=user, type=DeviceType.SPEAKER, sip_uri=f"sip:{user}@{DOMAIN}"), actor="test")
    return tenant, home.id


def _local(at: datetime, zone: str) -> str:
    """How srdb1 writes a time: the edge's local time, no zone (``localtime`` + ``%Y-%m-%d %H:%M:%S``)."""
    return at.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S")


async def _usrloc_insert(conn: asyncpg.Connection, user: str, *, expires_in_s: float, zone: str = "UTC",
                         permanent: bool = False) -> str:
    """usrloc's db_insert_ucontact as db_postgres sends it (literal values, unqualified table); returns the ruid."""
    ruid = f"uloc-{uuid.uuid4().hex[:8]}-{uuid.uuid4().hex[:4]}-1"
    now = datetime.now(UTC)
    expires = "1970-01-01 00:00:00" if permanent else _local(now + timedelta(seconds=expires_in_s), zone)
    await conn.execute(
        "insert into location (username,contact,expires,q,callid,cseq,flags,cflags,user_agent,received,path,socket,"
        "methods,last_modified,ruid,instance,reg_id,server_id,connection_id,keepalive,partition,domain) values "
        f"('{user}','sip:{user}@127.0.0.4:5060','{expires}',-1.000000,'{uuid.uuid4().hex}@127.0.0.4',2,0,0,"
        f"'iim-test',NULL,NULL,'udp:127.0.0.1:5060',8191,'{_local(now, zone)}','{ruid}',NULL,0,0,0,0,0,'{DOMAIN}')")
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


async def test_a_registration_through_the_edge_puts_its_household_home_until_it_is_removed(
        pg_db: PgDatabase, app_pool: Pool, directory: Pool, feed: PresenceFeed, admin_conn: Connection,
        registrar_conn: asyncpg.Connection) -> None:
    user = "kitchen-" + uuid.uuid4().hex[:6]
    tenant, home = await _home_with_speaker(app_pool, user)
    async with _registrar(pg_db, directory, feed) as registrar:
        await eventually(registrar.reconciled.is_set, timeout=10)
        ruid = await _usrloc_insert(registrar_conn, user, expires_in_s=120)
        (claim,) = await _wait_claims(app_pool, tenant, home, 1)
        assert (claim.source, claim.subject, claim.state, claim.actor) == (
            "registration", f"{user}@{DOMAIN}", "home", ACTOR)
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
    stale_home = await _home_with_speaker(app_pool, stale)
    fixed_home = await _home_with_speaker(app_pool, fixed)
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
    tenant, home = await _home_with_speaker(app_pool, user)
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
    left_home = await _home_with_speaker(app_pool, left)
    arrived_home = await _home_with_speaker(app_pool, arrived)
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
    tenant, home = await _home_with_speaker(app_pool, user)
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
    tenant, home = await _home_with_speaker(app_pool, user)
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


async def test_the_cache_role_reads_who_is_registered_but_not_their_addresses(cache_conn: Connection) -> None:
    await cache_conn.fetch("SELECT username, domain, expires FROM kamailio.location")
    for column in ("contact", "received", "user_agent", "socket"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await cache_conn.fetch(f"SELECT {column} FROM kamailio.location")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await cache_conn.execute("DELETE FROM kamailio.location")
