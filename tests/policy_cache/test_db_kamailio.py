"""Speakers' SIP credentials (migration 0023): stored as HA1, shown to nobody but the SIP edge's read-only role
through ``kamailio.subscriber``, and never to the cache, the API or the audit."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

import asyncpg
import pydantic
import pytest
import pytest_asyncio

from policy_cache import registry
from policy_cache.bootstrap import scram_verifier
from policy_cache.db import Connection, Pool, tenant_tx
from policy_cache.models import Device, DeviceCreate, DeviceType, DeviceUpdate, HouseholdCreate
from tests.pg import PgCluster, PgDatabase, create_tenant


def _ha1(user: str, domain: str, password: str) -> str:
    return hashlib.md5(f"{user}:{domain}:{password}".encode()).hexdigest()


@pytest_asyncio.fixture
async def kamailio_conn(pg_cluster: PgCluster, pg_db: PgDatabase, admin_conn: Connection
                        ) -> AsyncIterator[asyncpg.Connection]:
    await admin_conn.execute(f"ALTER ROLE iim_kamailio PASSWORD '{scram_verifier(pg_cluster.role_password)}'")
    conn = await asyncpg.connect(pg_cluster.url(pg_db.name, user="iim_kamailio"))
    yield conn
    await conn.close()


async def _speaker(pool: Pool, tenant: UUID, sip_uri: str, ha1: str | None, *, enabled: bool = True) -> Device:
    async with tenant_tx(pool, tenant) as conn:
        home = await registry.create(conn, registry.HOUSEHOLD,
                                     HouseholdCreate(name="home", time_zone="Europe/Moscow"), actor="test")
        return await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=home.id, name="speaker", type=DeviceType.SPEAKER, sip_uri=sip_uri, sip_ha1=ha1,
            enabled=enabled), actor="test")


async def _view(conn: asyncpg.Connection, user: str) -> list[tuple[str, str, str]]:
    rows = await conn.fetch("SELECT username, domain, ha1 FROM subscriber WHERE username = $1", user)
    return [(r["username"], r["domain"], r["ha1"]) for r in rows]


async def test_the_edge_role_finds_a_speakers_ha1_by_username_and_domain(
        app_pool: Pool, kamailio_conn: asyncpg.Connection) -> None:
    tenant = await create_tenant(app_pool, "edge-a")
    user = "kitchen-" + uuid4().hex[:6]
    ha1 = _ha1(user, "iim.example", "pw")
    await _speaker(app_pool, tenant, f"sip:{user}@IIM.example;transport=tcp", ha1)
    await _speaker(app_pool, tenant, f"sip:{user}-off@iim.example", _ha1(user, "iim.example", "x"), enabled=False)
    await _speaker(app_pool, tenant, f"sip:{user}-nopw@iim.example", None)
    assert await _view(kamailio_conn, user) == [(user, "iim.example", ha1)]
    assert await _view(kamailio_conn, f"{user}-off") == []
    assert await _view(kamailio_conn, f"{user}-nopw") == []


async def test_an_identity_claimed_in_two_tenants_authenticates_in_neither(
        app_pool: Pool, kamailio_conn: asyncpg.Connection) -> None:
    user = "shared-" + uuid4().hex[:6]
    for name in ("edge-b", "edge-c"):
        await _speaker(app_pool, await create_tenant(app_pool, name), f"sip:{user}@iim.example",
                       _ha1(user, "iim.example", name))
    assert await _view(kamailio_conn, user) == []


async def test_the_edge_role_reads_only_credentials_and_writes_nothing(kamailio_conn: asyncpg.Connection) -> None:
    for query in ("SELECT name FROM iim.device", "SELECT msisdn FROM iim.subscriber", "SELECT 1 FROM iim.audit_log"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await kamailio_conn.fetch(query)
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await kamailio_conn.execute("CREATE TEMP TABLE t (x int)")
    with pytest.raises((asyncpg.InsufficientPrivilegeError, asyncpg.ReadOnlySQLTransactionError)):
        await kamailio_conn.execute("UPDATE iim.device SET sip_ha1 = NULL")


async def test_the_cache_role_cannot_read_the_ha1(cache_conn: Connection) -> None:
    await cache_conn.fetch("SELECT id, sip_uri, status FROM iim.device LIMIT 1")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await cache_conn.fetch("SELECT sip_ha1 FROM iim.device LIMIT 1")


async def test_the_ha1_is_stored_but_never_shown_nor_audited(app_pool: Pool) -> None:
    tenant = await create_tenant(app_pool, "edge-d")
    ha1 = _ha1("den", "iim.example", "pw")
    device = await _speaker(app_pool, tenant, "sip:den@iim.example", ha1)
    assert device.sip_ha1 == ha1
    assert "sip_ha1" not in device.model_dump()
    assert ha1 not in device.model_dump_json()
    assert ha1 not in repr(device)
    async with tenant_tx(app_pool, tenant) as conn:
        await registry.update(conn, registry.DEVICE, device.id, DeviceUpdate(sip_ha1=_ha1("den", "iim.example", "2")),
                              actor="test")
        details = [r[0] for r in await conn.fetch("SELECT detail::text FROM iim.audit_log WHERE entity = 'device'")]
    assert details
    assert not any(ha1 in d or _ha1("den", "iim.example", "2") in d for d in details), details


def test_an_ha1_must_be_32_lower_case_hex_digits() -> None:
    for bad in ("pw", "A" * 32, "0" * 31, "g" * 32):
        with pytest.raises(pydantic.ValidationError):
            DeviceUpdate(sip_ha1=bad)
