"""Schema migrations: apply from empty, re-apply as a no-op, refuse newer schemas, and lint the schema
for the multi-tenant rules (tenant_id in every key, RLS forced everywhere, iim_owner owns everything)."""

from __future__ import annotations

import time
from uuid import UUID

import asyncpg
import pytest

from policy_cache import migrate
from policy_cache.db import Connection
from policy_cache.errors import MigrationChecksumError, MigrationError, SchemaTooNewError
from tests.pg import PgDatabase

TENANT_TABLES = ["tenant", "brand", "region", "household", "subscriber", "credential_ref", "device", "binding",
                 "consent", "policy", "scenario", "audit_log", "change_log", "hub_command", "key_rotation_job"]


def test_migration_files_are_numbered_without_gaps() -> None:
    found = migrate.available_migrations()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert all(m.sql.strip() for m in found)


async def test_upgrade_from_empty_then_noop(pg_empty_db: PgDatabase) -> None:
    conn = await asyncpg.connect(pg_empty_db.admin_url)
    try:
        assert await migrate.current_version(conn) == 0
        started = time.perf_counter()
        applied = await migrate.upgrade(conn)
        elapsed = time.perf_counter() - started
        everything = [m.version for m in migrate.available_migrations()]
        assert applied == everything
        assert elapsed < 10, elapsed
        assert await migrate.current_version(conn) == everything[-1]
        # Second run: nothing to do, nothing changed.
        assert await migrate.upgrade(conn) == []
        rows = await conn.fetch("SELECT version, checksum FROM iim.schema_version ORDER BY version")
        assert [r["version"] for r in rows] == everything
        assert [r["checksum"] for r in rows] == [m.checksum for m in migrate.available_migrations()]
    finally:
        await conn.close()


async def test_upgrade_accepts_a_dsn(pg_empty_db: PgDatabase) -> None:
    assert await migrate.upgrade(pg_empty_db.admin_url) == [m.version for m in migrate.available_migrations()]
    assert await migrate.upgrade(pg_empty_db.admin_url) == []


async def test_refuses_a_database_newer_than_the_code(pg_empty_db: PgDatabase) -> None:
    conn = await asyncpg.connect(pg_empty_db.admin_url)
    try:
        await migrate.upgrade(conn)
        newest = migrate.available_migrations()[-1].version
        await conn.execute("INSERT INTO iim.schema_version (version, name, checksum) VALUES ($1, 'future', 'x')",
                           newest + 1)
        with pytest.raises(SchemaTooNewError) as err:
            await migrate.upgrade(conn)
        assert err.value.database_version == newest + 1
        assert err.value.code_version == newest
    finally:
        await conn.close()


async def test_refuses_an_edited_applied_migration(pg_empty_db: PgDatabase) -> None:
    conn = await asyncpg.connect(pg_empty_db.admin_url)
    try:
        await migrate.upgrade(conn)
        edited = migrate.available_migrations()
        edited[1] = migrate.Migration(edited[1].version, edited[1].name, edited[1].sql + "\n-- edited\n")
        with pytest.raises(MigrationChecksumError):
            await migrate.upgrade(conn, migrations=edited)
    finally:
        await conn.close()


async def _tenant_with_household(conn: asyncpg.Connection, name: str) -> tuple[UUID, UUID]:
    """A tenant and one household in it, written directly (as the superuser, on an older schema)."""
    tenant = await conn.fetchval("INSERT INTO iim.tenant (id, name) VALUES (gen_random_uuid(), $1) RETURNING id", name)
    household = await conn.fetchval(
        "INSERT INTO iim.household (tenant_id, name, time_zone) VALUES ($1, 'h', 'UTC') RETURNING id", tenant)
    return tenant, household


async def test_calls_counted_before_0012_are_settled_unless_still_ringing(pg_empty_db: PgDatabase) -> None:
    shipped = migrate.available_migrations()
    conn = await asyncpg.connect(pg_empty_db.admin_url)  # a superuser: row-level security does not apply
    try:
        await migrate.upgrade(conn, migrations=[m for m in shipped if m.version < 12])
        tenant, household = await _tenant_with_household(conn, "before-0012")
        device = await conn.fetchval(
            "INSERT INTO iim.device (tenant_id, household_id, name, type, external_id) "
            "VALUES ($1, $2, 'smoke', 'sensor', 'd-1') RETURNING id", tenant, household)
        incident = await conn.fetchval(
            "INSERT INTO iim.incident (tenant_id, household_id, device_id, hazard, first_event_id) "
            "VALUES ($1, $2, $3, 'smoke', 'e-1') RETURNING id", tenant, household, device)
        minute = await conn.fetchval("SELECT date_trunc('minute', now())")
        for n, finished in enumerate((True, True, False)):  # two calls ended, one still ringing
            await conn.execute(
                "INSERT INTO iim.incident_action (tenant_id, key, incident_id, step, kind, destination, "
                "dispatched_at, outcome, finished_at) VALUES ($1, $2, $3, 0, 'call', '+79001234567', now(), $4, $5)",
                tenant, f"{incident}/0/0/{n}", incident, "no_answer" if finished else None,
                minute if finished else None)
        await conn.execute("INSERT INTO iim.originate_window (tenant_id, minute, calls) VALUES ($1, $2, 3)",
                           tenant, minute)
        await migrate.upgrade(conn)
        assert await conn.fetchval("SELECT settled FROM iim.originate_window WHERE tenant_id = $1", tenant) == 2
    finally:
        await conn.close()


async def test_0019_keeps_an_old_prefix_restriction_as_the_allow_list_and_gives_the_rest_the_default_plan(
    pg_empty_db: PgDatabase
) -> None:
    """Before 0019 ``allowed_prefixes`` restricted calls when set and admitted any number when empty."""
    shipped = migrate.available_migrations()
    conn = await asyncpg.connect(pg_empty_db.admin_url)  # a superuser: row-level security does not apply
    try:
        await migrate.upgrade(conn, migrations=[m for m in shipped if m.version < 19])
        restricted, _ = await _tenant_with_household(conn, "restricted")
        open_, _ = await _tenant_with_household(conn, "open")
        await conn.execute("INSERT INTO iim.originate_limit (tenant_id, max_concurrent, allowed_prefixes) "
                           "VALUES ($1, 3, '{+44,+7}'), ($2, 4, '{}')", restricted, open_)
        await migrate.upgrade(conn)
        rows = await conn.fetch("SELECT tenant_id, max_concurrent, country_codes FROM iim.originate_limit")
        assert {r["tenant_id"]: (r["max_concurrent"], r["country_codes"]) for r in rows} == {
            restricted: (3, []), open_: (4, None)}  # None: the service's default plan
        allowed = await conn.fetch("SELECT tenant_id, prefix FROM iim.originate_allow ORDER BY prefix")
        assert [(r["tenant_id"], r["prefix"]) for r in allowed] == [(restricted, "+44"), (restricted, "+7")]
    finally:
        await conn.close()


async def test_devices_sharing_an_external_id_stop_0013_with_the_id_named(pg_empty_db: PgDatabase) -> None:
    shipped = migrate.available_migrations()
    conn = await asyncpg.connect(pg_empty_db.admin_url)  # a superuser: row-level security does not apply
    try:
        await migrate.upgrade(conn, migrations=[m for m in shipped if m.version < 13])
        tenant, household = await _tenant_with_household(conn, "dup")
        for name in ("smoke", "co"):
            await conn.execute("INSERT INTO iim.device (tenant_id, household_id, name, type, external_id) "
                               "VALUES ($1, $2, $3, 'sensor', 'kitchen-1')", tenant, household, name)
        with pytest.raises(MigrationError) as err:
            await migrate.upgrade(conn)
        assert isinstance(err.value.__cause__, asyncpg.UniqueViolationError)
        assert "external_id kitchen-1" in str(err.value.__cause__)
        assert await migrate.current_version(conn) == 12
        await conn.execute("UPDATE iim.device SET external_id = 'kitchen-2' WHERE name = 'co'")
        assert await migrate.upgrade(conn) == [m.version for m in shipped if m.version >= 13]
    finally:
        await conn.close()


async def test_an_events_device_is_found_through_an_index(admin_conn: Connection) -> None:
    """The bridge's per-event lookup must not read the tenant's other devices (it did before 0013)."""
    async with admin_conn.transaction():
        await admin_conn.execute("SET LOCAL enable_seqscan = off")  # a near-empty table: ask what could be used
        plan = "\n".join(r[0] for r in await admin_conn.fetch(
            "EXPLAIN SELECT id FROM iim.device WHERE tenant_id = gen_random_uuid() AND external_id = 'x'"))
    assert "device_tenant_id_external_id_key" in plan, plan
    assert "Seq Scan" not in plan, plan


#: Lookups by key on the alarm path, and the primary key each must use however empty its table was when a
#: pooled connection planned it (the foreign-key check of iim.incident is PostgreSQL's own RI query).
KEY_LOOKUPS = {
    "SELECT 1 FROM ONLY iim.incident x WHERE tenant_id = $1 AND id = $2 FOR KEY SHARE OF x":
        ("incident_pkey", "gen_random_uuid()"),
    "SELECT e.fingerprint FROM iim.device_event e WHERE e.tenant_id = $1 AND e.device_id = $2 AND e.event_id = $3::text":
        ("device_event_pkey", "gen_random_uuid(), 'k'"),
    "SELECT a.outcome FROM iim.incident_action a WHERE a.tenant_id = $1 AND a.key = $2::text":
        ("incident_action_pkey", "'k'"),
}


async def test_lookups_by_key_planned_on_empty_tables_use_the_primary_keys(pg_empty_db: PgDatabase) -> None:
    """A plan made before the first ANALYZE is kept by each connection; a secondary tenant_id index would read
    the whole tenant on every lookup as the ledger grows (it did before 0016)."""
    conn = await asyncpg.connect(pg_empty_db.admin_url)
    try:
        await migrate.upgrade(conn)
        tenant = await conn.fetchval("INSERT INTO iim.tenant (id, name) VALUES (gen_random_uuid(), 'plans') RETURNING id")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute("SET ROLE iim_app")
        await conn.execute(f"SELECT set_config('app.tenant', '{tenant}', false)")
        for n, (sql, (index, arguments)) in enumerate(KEY_LOOKUPS.items()):
            await conn.execute(f"PREPARE lookup{n} AS {sql}")
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE lookup{n}('{tenant}', {arguments})"))
            assert f"using {index} on" in plan, plan
    finally:
        await conn.close()


async def test_a_failing_migration_rolls_back_entirely(pg_empty_db: PgDatabase) -> None:
    conn = await asyncpg.connect(pg_empty_db.admin_url)
    try:
        await migrate.upgrade(conn)
        shipped = migrate.available_migrations()
        bad = migrate.Migration(len(shipped) + 1, "broken",
                                "CREATE TABLE iim.half_done (x int); SELECT 1 / 0;")
        with pytest.raises(MigrationError) as err:
            await migrate.upgrade(conn, migrations=[*shipped, bad])
        assert isinstance(err.value.__cause__, asyncpg.DivisionByZeroError)
        assert await migrate.current_version(conn) == len(shipped)
        assert await conn.fetchval("SELECT to_regclass('iim.half_done')") is None
    finally:
        await conn.close()


#: Definer functions that answer one cross-tenant question each (RLS is forced on the owner too), owned by
#: the no-login iim_sweeper role whose only rights are the policies and grants those questions need.
SWEEPER_FUNCTIONS = {"due_incidents", "audit_flush", "prune_originate_windows", "audit_heads", "sms_purge_bodies",
                     "unsent_calls", "privacy_purge", "audit_tombstone", "silent_devices", "recording_purge",
                     "presence_prune", "hub_command_purge"}


async def test_cross_tenant_functions_are_narrow_definers_owned_by_iim_sweeper(admin_conn: Connection) -> None:
    rows = await admin_conn.fetch(
        """SELECT p.proname, p.prosecdef, p.proconfig, r.rolcanlogin, r.rolbypassrls, r.rolsuper
             FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
            WHERE p.pronamespace = 'iim'::regnamespace AND r.rolname = 'iim_sweeper'""")
    assert {r["proname"] for r in rows} == SWEEPER_FUNCTIONS
    for r in rows:
        assert r["prosecdef"]
        assert r["proconfig"] == ["search_path=pg_catalog"]
        assert not r["rolcanlogin"]
        assert not r["rolbypassrls"]
        assert not r["rolsuper"]


async def test_every_object_is_owned_by_iim_owner(admin_conn: Connection) -> None:
    foreign = await admin_conn.fetch(
        """SELECT c.relname AS name, pg_get_userbyid(c.relowner) AS owner FROM pg_class c
           WHERE c.relnamespace = 'iim'::regnamespace AND pg_get_userbyid(c.relowner) <> 'iim_owner'
           UNION ALL
           SELECT p.proname, pg_get_userbyid(p.proowner) FROM pg_proc p
           WHERE p.pronamespace = 'iim'::regnamespace AND pg_get_userbyid(p.proowner) <> 'iim_owner'
             AND NOT (pg_get_userbyid(p.proowner) = 'iim_sweeper' AND p.proname = ANY($1::text[]))
           UNION ALL
           SELECT t.typname, pg_get_userbyid(t.typowner) FROM pg_type t
           WHERE t.typnamespace = 'iim'::regnamespace AND pg_get_userbyid(t.typowner) <> 'iim_owner'""",
        sorted(SWEEPER_FUNCTIONS))
    assert [dict(r) for r in foreign] == []


async def test_every_tenant_table_forces_rls_with_the_tenant_policy(admin_conn: Connection) -> None:
    rows = await admin_conn.fetch(
        """SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,
                  (SELECT p.qual FROM pg_policies p WHERE p.schemaname = 'iim' AND p.tablename = c.relname
                     AND p.policyname = 'tenant_isolation') AS qual,
                  (SELECT p.with_check FROM pg_policies p WHERE p.schemaname = 'iim' AND p.tablename = c.relname
                     AND p.policyname = 'tenant_isolation') AS with_check
           FROM pg_class c WHERE c.relnamespace = 'iim'::regnamespace AND c.relkind = 'r'
             AND c.relname = ANY($1::text[])""", TENANT_TABLES)
    assert sorted(r["relname"] for r in rows) == sorted(TENANT_TABLES)
    for r in rows:
        assert r["relrowsecurity"], r["relname"]
        assert r["relforcerowsecurity"], r["relname"]
        column = "id" if r["relname"] == "tenant" else "tenant_id"
        expected = f"({column} = (NULLIF(current_setting('app.tenant'::text, true), ''::text))::uuid)"
        assert r["qual"] == expected, r["relname"]
        assert r["with_check"] == expected, r["relname"]


async def test_tenant_id_leads_every_unique_key_and_foreign_key(admin_conn: Connection) -> None:
    # Unique indexes (incl. primary keys) of tenant tables other than `tenant` itself.
    bad_unique = await admin_conn.fetch(
        """SELECT c.relname AS tbl, i.relname AS idx FROM pg_index x
           JOIN pg_class c ON c.oid = x.indrelid JOIN pg_class i ON i.oid = x.indexrelid
           WHERE c.relnamespace = 'iim'::regnamespace AND x.indisunique AND c.relname = ANY($1::text[])
             AND c.relname <> 'tenant'
             AND (SELECT attname FROM pg_attribute WHERE attrelid = c.oid AND attnum = x.indkey[0]) <> 'tenant_id'
        """, TENANT_TABLES)
    assert [dict(r) for r in bad_unique] == []
    bad_fk = await admin_conn.fetch(
        """SELECT conrelid::regclass::text AS tbl, conname FROM pg_constraint
           WHERE contype = 'f' AND connamespace = 'iim'::regnamespace
             AND (SELECT attname FROM pg_attribute WHERE attrelid = conrelid AND attnum = conkey[1]) <> 'tenant_id'
        """)
    assert [dict(r) for r in bad_fk] == []
    fks = await admin_conn.fetchval("SELECT count(*) FROM pg_constraint WHERE contype = 'f' "
                                    "AND connamespace = 'iim'::regnamespace")
    assert fks > 10


async def test_change_log_triggers_cover_the_routing_tables_the_numbering_plans_and_presence(
        admin_conn: Connection) -> None:
    tables = await admin_conn.fetch(
        """SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
           WHERE t.tgname = 'zz_change_log' AND NOT t.tgisinternal ORDER BY 1""")
    assert [r[0] for r in tables] == ["binding", "consent", "device", "household", "numbering_plan", "policy",
                                      "presence_claim", "subscriber"]
