"""Tenant isolation through the app role: row-level security, role attributes, tenant_tx scoping."""

from __future__ import annotations

from uuid import UUID, uuid4

import asyncpg
import pytest

from policy_cache import registry
from policy_cache.db import Connection, DbRole, Pool, connect, connect_pool, savepoint, tenant_tx
from policy_cache.errors import DatabaseRoleError, NotFound, TenantIsolationError, TenantScopeError
from policy_cache.models import DeviceCreate, DeviceType, HouseholdCreate, SubscriberCreate, SubscriberUpdate
from tests.pg import PgDatabase, create_tenant


async def _tenant_with_subscriber(pool: Pool, msisdn: str) -> tuple[UUID, UUID, UUID]:
    tid = await create_tenant(pool, f"tenant {msisdn}")
    async with tenant_tx(pool, tid) as conn:
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=msisdn), actor="test")
        home = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(name="home", time_zone="Europe/Moscow"),
                                     actor="test")
    return tid, sub.id, home.id


@pytest.fixture
async def two_tenants(app_pool: Pool) -> tuple[tuple[UUID, UUID, UUID], tuple[UUID, UUID, UUID]]:
    a = await _tenant_with_subscriber(app_pool, "+7900" + str(uuid4().int)[:7])
    b = await _tenant_with_subscriber(app_pool, "+7901" + str(uuid4().int)[:7])
    return a, b


async def test_app_and_cache_roles_are_not_privileged(admin_conn: Connection) -> None:
    rows = await admin_conn.fetch(
        """SELECT rolname, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolcanlogin,
                  pg_has_role(rolname, 'iim_owner', 'MEMBER') AS owner_member
           FROM pg_roles WHERE rolname IN ('iim_app', 'iim_cache', 'iim_owner') ORDER BY rolname""")
    by_name = {r["rolname"]: r for r in rows}
    for name in ("iim_app", "iim_cache"):
        r = by_name[name]
        assert not r["rolsuper"]
        assert not r["rolbypassrls"]
        assert not r["rolcreaterole"]
        assert not r["rolcreatedb"]
        assert r["rolcanlogin"]
        assert not r["owner_member"]
    assert not by_name["iim_owner"]["rolcanlogin"]
    owned = await admin_conn.fetchval(
        """SELECT count(*) FROM pg_class WHERE relnamespace = 'iim'::regnamespace
           AND pg_get_userbyid(relowner) IN ('iim_app', 'iim_cache')""")
    assert owned == 0


async def test_app_role_has_no_ddl_or_truncate(pg_db: PgDatabase) -> None:
    conn = await connect(pg_db.app_url, role=DbRole.APP)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TABLE iim.evil (x int)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("TRUNCATE iim.subscriber")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("ALTER TABLE iim.subscriber DISABLE ROW LEVEL SECURITY")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SET ROLE iim_owner")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM iim.change_log")
    finally:
        await conn.close()


async def test_pool_refuses_a_superuser_dsn_as_the_app(pg_db: PgDatabase) -> None:
    with pytest.raises(DatabaseRoleError):
        await connect(pg_db.admin_url, role=DbRole.APP)
    with pytest.raises(DatabaseRoleError):
        await connect(pg_db.cache_url, role=DbRole.APP)
    with pytest.raises(DatabaseRoleError):
        await connect(pg_db.app_url, role=DbRole.CACHE)
    with pytest.raises(DatabaseRoleError):
        await connect_pool(pg_db.admin_url, role=DbRole.APP, min_size=1)


async def test_no_tenant_no_rows(app_pool: Pool, two_tenants: tuple[tuple[UUID, ...], ...]) -> None:
    async with app_pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM iim.subscriber") == 0
        assert await conn.fetchval("SELECT count(*) FROM iim.tenant") == 0
        async with conn.transaction():
            with pytest.raises(asyncpg.InsufficientPrivilegeError):  # tenant_id defaults to NULL: refused
                await conn.execute("INSERT INTO iim.subscriber (msisdn) VALUES ('+79990000001')")
        async with conn.transaction():
            (a_tid, _, _), _ = two_tenants
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
                await conn.execute("INSERT INTO iim.subscriber (tenant_id, msisdn) VALUES ($1, '+79990000002')",
                                   a_tid)


async def test_tenant_sees_only_its_rows(app_pool: Pool, two_tenants: tuple[tuple[UUID, ...], ...]) -> None:
    (a_tid, a_sub, _), (b_tid, b_sub, _) = two_tenants
    async with tenant_tx(app_pool, a_tid) as conn:
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM iim.subscriber")]
        assert ids == [a_sub]
        assert await conn.fetchval("SELECT count(*) FROM iim.subscriber WHERE id = $1", b_sub) == 0
        assert [r["id"] for r in await conn.fetch("SELECT id FROM iim.tenant")] == [a_tid]
        assert await conn.fetchval("SELECT count(*) FROM iim.audit_log WHERE tenant_id = $1", b_tid) == 0
        with pytest.raises(NotFound):
            await registry.get(conn, registry.SUBSCRIBER, b_sub)


async def test_tenant_cannot_write_another_tenants_rows(
    app_pool: Pool, two_tenants: tuple[tuple[UUID, ...], ...]
) -> None:
    (a_tid, _, _), (b_tid, b_sub, b_home) = two_tenants
    async with tenant_tx(app_pool, a_tid) as conn:
        # Insert for B: refused by the policy's WITH CHECK.
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await conn.execute("INSERT INTO iim.subscriber (tenant_id, msisdn) VALUES ($1, '+79990000003')", b_tid)
    async with tenant_tx(app_pool, a_tid) as conn:
        # Update/delete of B's rows: they are invisible, nothing happens.
        assert await conn.execute("UPDATE iim.subscriber SET display_name = 'pwned' WHERE id = $1",
                                  b_sub) == "UPDATE 0"
        assert await conn.execute("DELETE FROM iim.household WHERE id = $1", b_home) == "DELETE 0"
        # Moving an own row into B is refused too.
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await conn.execute("UPDATE iim.subscriber SET tenant_id = $1", b_tid)
    async with tenant_tx(app_pool, a_tid) as conn:
        with pytest.raises(NotFound):
            await registry.update(
                conn, registry.SUBSCRIBER, b_sub, SubscriberUpdate(display_name="pwned"), actor="evil")
        with pytest.raises(NotFound):
            await registry.delete(conn, registry.HOUSEHOLD, b_home, actor="evil")
    async with tenant_tx(app_pool, b_tid) as conn:
        sub = await registry.get(conn, registry.SUBSCRIBER, b_sub)
        assert sub.display_name is None
        await registry.get(conn, registry.HOUSEHOLD, b_home)


async def test_cross_tenant_references_are_impossible(
    app_pool: Pool, two_tenants: tuple[tuple[UUID, ...], ...]
) -> None:
    (a_tid, a_sub, _), (_, _, b_home) = two_tenants
    async with tenant_tx(app_pool, a_tid) as conn:
        # The composite FK (tenant_id, household_id) looks for B's household in tenant A: not found.
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(
                "INSERT INTO iim.binding (subscriber_id, household_id, role) VALUES ($1, $2, 'owner')", a_sub, b_home)


async def test_registry_write_without_tenant_is_a_typed_error(app_pool: Pool) -> None:
    async with app_pool.acquire() as conn, conn.transaction():
        with pytest.raises(TenantIsolationError):
            await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn="+79990000004"), actor="test")


async def test_tenant_setting_does_not_outlive_the_transaction(app_pool: Pool, two_tenants: tuple[tuple[UUID, ...], ...]
                                                               ) -> None:
    (a_tid, _, _), _ = two_tenants
    async with app_pool.acquire() as conn:
        async with tenant_tx(conn, a_tid):
            assert await conn.fetchval("SELECT current_setting('app.tenant', true)") == str(a_tid)
        # SET LOCAL semantics: after the block the setting is '' (not NULL) and no row is visible.
        assert await conn.fetchval("SELECT current_setting('app.tenant', true)") == ""
        assert await conn.fetchval("SELECT iim.current_tenant()") is None
        assert await conn.fetchval("SELECT count(*) FROM iim.subscriber") == 0
    async with tenant_tx(app_pool, a_tid) as conn:
        pass
    async with app_pool.acquire() as conn:  # the pooled connection comes back clean too
        assert await conn.fetchval("SELECT count(*) FROM iim.subscriber") == 0


async def test_bridge_device_lookup_scopes_itself_and_leaves_no_tenant_behind(
        app_pool: Pool, two_tenants: tuple[tuple[UUID, ...], ...]) -> None:
    (a_tid, _, a_home), (b_tid, _, b_home) = two_tenants
    for tid, home in ((a_tid, a_home), (b_tid, b_home)):
        async with tenant_tx(app_pool, tid) as conn:
            await registry.create(
                conn, registry.DEVICE,
                DeviceCreate(household_id=home, name="smoke", type=DeviceType.SENSOR,
                             external_id="same-id"), actor="test")
    lookup = "SELECT id, household_id FROM iim.event_device($1, 'same-id')"
    async with app_pool.acquire() as conn:
        row = await conn.fetchrow(lookup, b_tid)
        assert row is not None
        assert row["household_id"] == b_home
        assert await conn.fetchval("SELECT current_setting('app.tenant', true)") == ""
        assert await conn.fetchval("SELECT count(*) FROM iim.device") == 0
        async with tenant_tx(conn, a_tid):
            other = await conn.fetchrow(lookup, b_tid)
            assert other is not None
            assert other["household_id"] == b_home
            assert await conn.fetchval("SELECT current_setting('app.tenant', true)") == str(a_tid)
        assert await conn.fetchrow(lookup, uuid4()) is None


async def test_savepoint_undoes_only_its_block_and_the_transaction_commits_the_rest(
        app_pool: Pool, two_tenants: tuple[tuple[UUID, ...], ...]) -> None:
    (a_tid, _, _), _ = two_tenants
    async with tenant_tx(app_pool, a_tid) as conn:
        await conn.execute("INSERT INTO iim.subscriber (msisdn) VALUES ('+79995550001')")
        async with savepoint(conn):
            await conn.execute("INSERT INTO iim.subscriber (msisdn) VALUES ('+79995550002')")
            with pytest.raises(asyncpg.UniqueViolationError):
                async with savepoint(conn):
                    await conn.execute("INSERT INTO iim.subscriber (msisdn) VALUES ('+79995550001')")
            await conn.execute("DELETE FROM iim.subscriber WHERE msisdn = '+79995550002'")
        async with savepoint(conn):
            await conn.execute("INSERT INTO iim.subscriber (msisdn) VALUES ('+79995550003')")
    async with tenant_tx(app_pool, a_tid, readonly=True) as conn:
        kept = await conn.fetch("SELECT msisdn FROM iim.subscriber WHERE msisdn LIKE '+7999555000%' ORDER BY 1")
        assert [r["msisdn"] for r in kept] == ["+79995550001", "+79995550003"]
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("INSERT INTO iim.subscriber (msisdn) VALUES ('+79995550004')")


async def test_tenant_tx_refuses_nesting_and_non_uuids(app_pool: Pool) -> None:
    async with app_pool.acquire() as conn:
        async with conn.transaction():
            with pytest.raises(TenantScopeError):
                async with tenant_tx(conn, uuid4()):
                    pass
        with pytest.raises(TenantScopeError):
            async with tenant_tx(conn, str(uuid4())):  # type: ignore[arg-type]
                pass


async def test_rollback_discards_the_tenant_and_the_rows(app_pool: Pool, two_tenants: tuple[tuple[UUID, ...], ...]
                                                         ) -> None:
    (a_tid, _, _), _ = two_tenants

    class Boom(Exception):
        pass

    async def failing() -> None:
        async with tenant_tx(app_pool, a_tid) as conn:
            await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn="+79990000005"), actor="test")
            raise Boom

    with pytest.raises(Boom):
        await failing()
    async with tenant_tx(app_pool, a_tid) as conn:
        with pytest.raises(NotFound):
            await registry.get_subscriber_by_msisdn(conn, "+79990000005")


async def test_cache_role_reads_all_tenants_and_writes_nothing(
    cache_conn: Connection, two_tenants: tuple[tuple[UUID, ...], ...]
) -> None:
    (a_tid, a_sub, _), (b_tid, b_sub, _) = two_tenants
    seen = {r["id"] for r in await cache_conn.fetch("SELECT id FROM iim.subscriber")}
    assert {a_sub, b_sub} <= seen
    assert {a_tid, b_tid} <= {r["id"] for r in await cache_conn.fetch("SELECT id FROM iim.tenant")}
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await cache_conn.execute("UPDATE iim.subscriber SET display_name = 'x'")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await cache_conn.execute("INSERT INTO iim.tenant (id, name) VALUES ($1, 'x')", uuid4())
    for hidden in ("iim.audit_log", "iim.credential_ref", "iim.scenario"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await cache_conn.fetch(f"SELECT 1 FROM {hidden} LIMIT 1")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # consent evidence is not granted
        await cache_conn.fetch("SELECT evidence FROM iim.consent LIMIT 1")
    await cache_conn.fetch("SELECT purpose, scope, expires_at FROM iim.consent LIMIT 1")


async def test_only_the_app_role_may_append_to_the_audit_chain(admin_conn: Connection) -> None:
    allowed = {r["rolname"]: r["ok"] for r in await admin_conn.fetch(
        """SELECT rolname, has_function_privilege(rolname,
                  'iim.audit_append(uuid, text, text, text, text, jsonb, jsonb)', 'EXECUTE') AS ok
             FROM pg_roles WHERE rolname IN ('iim_app', 'iim_cache')""")}
    assert allowed == {"iim_app": True, "iim_cache": False}
