"""``policy_cache/functions/``: one file per function the migrations create, equal to what they leave.

Every schema but PostgreSQL's own and pgqueuer's (``iim_jobs``: the library installs its DDL) counts; today
that is ``iim`` and ``kamailio`` (the edge's registrations trigger). The database itself is the judge: every file is executed (``CREATE OR REPLACE``) in a
transaction on the migrated database that is rolled back, and each function's ``pg_get_functiondef``
(signature, result, language, volatility, security, settings and body, byte for byte) must come out as it
went in. A file that differs changes the definition, fails to replace it (another result type or parameter
name), or adds an overload; each of these shows as a difference.
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable

import asyncpg

from policy_cache import jobs, migrate
from tests.pg import PgDatabase

_FILE = re.compile(r"^(\w+\.\w+)\.sql$")
_HEADER = re.compile(r"^-- (\w+\.\w+): its current definition, last set by migration (\d{4}_\w+\.sql)\.$")

# The functions the migrations made: schema-qualified name, signature and definition.
_FUNCTIONS = f"""
SELECT n.nspname || '.' || p.proname AS name, p.oid::regprocedure::text AS signature,
       pg_get_functiondef(p.oid) AS definition
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', '{jobs.JOB_SCHEMA}')
   AND n.nspname NOT LIKE 'pg\\_%'
 ORDER BY 2"""


def _files() -> dict[str, Traversable]:
    """SCHEMA.NAME -> its file."""
    folder = resources.files("policy_cache").joinpath("functions")
    found = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            match = _FILE.match(entry.name)
            assert match is not None, f"{entry.name}: name it SCHEMA.NAME.sql"
            found[match.group(1)] = entry
    return found


async def _definitions(conn: asyncpg.Connection) -> dict[str, str]:
    return {r["signature"]: r["definition"] for r in await conn.fetch(_FUNCTIONS)}


async def test_every_function_of_the_migrated_database_has_exactly_one_file(pg_db: PgDatabase) -> None:
    conn = await asyncpg.connect(pg_db.admin_url)
    try:
        names = sorted(r["name"] for r in await conn.fetch(_FUNCTIONS))
    finally:
        await conn.close()
    assert len(names) == len(set(names)), "an overloaded name: one file cannot hold its definitions"
    assert sorted(_files()) == names


async def test_the_migrated_database_defines_each_function_exactly_as_its_file(pg_db: PgDatabase) -> None:
    conn = await asyncpg.connect(pg_db.admin_url)
    try:
        migrated = await _definitions(conn)
        differs: dict[str, str] = {}
        replay = conn.transaction()
        await replay.start()
        try:
            for name, entry in sorted(_files().items()):
                try:
                    async with conn.transaction():  # a savepoint: one failing file does not hide the others
                        await conn.execute(entry.read_text(encoding="utf-8"))
                except asyncpg.PostgresError as exc:
                    differs[name] = f"{type(exc).__name__}: {exc}"
            replayed = await _definitions(conn)
        finally:
            await replay.rollback()  # the module's database stays exactly as migrated
    finally:
        await conn.close()
    for signature in sorted(set(migrated) | set(replayed)):
        if migrated.get(signature) != replayed.get(signature):
            differs[signature] = "the file's definition differs from the migrated one"
    assert differs == {}


def test_each_file_names_the_newest_migration_that_defines_its_function() -> None:
    migrations = migrate.available_migrations()
    for name, entry in sorted(_files().items()):
        first = entry.read_text(encoding="utf-8").splitlines()[0]
        header = _HEADER.match(first)
        assert header is not None, f"{name}.sql: first line {first!r}"
        assert header.group(1) == name, f"{name}.sql: first line {first!r}"
        defines = re.compile(rf"^CREATE (OR REPLACE )?FUNCTION {re.escape(name)}\s*\(", re.MULTILINE)
        newest = [f"{m.version:04d}_{m.name}.sql" for m in migrations if defines.search(m.sql)][-1:]
        assert newest == [header.group(2)], f"{name}.sql"
