"""Versioned SQL migrations: ``policy_cache/migrations/NNNN_name.sql`` applied in order.

* Each migration runs in its own transaction together with its ``iim.schema_version`` row, so a failure
  leaves the database at the previous version.
* Re-running is a no-op; an applied migration whose file changed afterwards is an error (checksums).
* A database whose version is newer than the newest file here is refused (``SchemaTooNewError``):
  old code must not run against a schema it does not understand.
* Concurrent upgraders are serialised with a session advisory lock.

Migrations run as a superuser (the bootstrap/owner URL): they create the roles and ``SET LOCAL ROLE
iim_owner`` so that every object is owned by ``iim_owner``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

from policy_cache import jobs
from policy_cache.db import Connection
from policy_cache.errors import MigrationChecksumError, MigrationError, SchemaTooNewError

__all__ = ["Migration", "available_migrations", "current_version", "upgrade"]

log = logging.getLogger(__name__)

_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# pg_advisory_lock(namespace, 0): one upgrader at a time. Namespace 0x4949_4D4D ("IIMM") is shared with the
# change sequence (key 1) and the audit chains (key hashtext(tenant)).
_LOCK_NS = 1229540685
_MIGRATE_KEY = 0


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations(directory: Path | None = None) -> list[Migration]:
    """The migrations shipped with the code (or found in ``directory``), ordered by version.

    Raises:
        MigrationError: a file name does not match ``NNNN_name.sql`` or versions are not 1..N.
    """
    if directory is None:
        entries = [(p.name, p.read_text(encoding="utf-8"))
                   for p in resources.files("policy_cache").joinpath("migrations").iterdir()
                   if p.name.endswith(".sql")]
    else:
        entries = [(p.name, p.read_text(encoding="utf-8")) for p in directory.glob("*.sql")]
    found: list[Migration] = []
    for name, sql in entries:
        match = _FILE_RE.match(name)
        if match is None:
            raise MigrationError(f"migration file {name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), sql))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration versions must be 1..N without gaps or duplicates, got {versions}")
    return found


async def current_version(conn: Connection) -> int:
    """The highest applied version, 0 for an empty database."""
    exists = await conn.fetchval("SELECT to_regclass('iim.schema_version') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM iim.schema_version"))


async def upgrade(target: str | Connection, *, migrations: list[Migration] | None = None) -> list[int]:
    """Apply every pending migration; return the versions applied now (``[]`` when up to date).

    Args:
        target: a superuser DSN, or an open connection logged in as one (left open).
        migrations: override the shipped files (tests).

    Raises:
        SchemaTooNewError: the database was migrated by newer code.
        MigrationChecksumError: an applied migration's file was changed.
        MigrationError: a migration failed (wraps the asyncpg error; its transaction was rolled back).
    """
    todo = available_migrations() if migrations is None else migrations
    conn = await asyncpg.connect(target) if isinstance(target, str) else target
    try:
        await conn.execute("SELECT pg_advisory_lock($1, $2)", _LOCK_NS, _MIGRATE_KEY)
        try:
            done = await _upgrade_locked(conn, todo)
            if migrations is None:
                await jobs.install(conn)
            return done
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", _LOCK_NS, _MIGRATE_KEY)
    finally:
        if isinstance(target, str):
            await conn.close()


async def _upgrade_locked(conn: Connection, todo: list[Migration]) -> list[int]:
    code_version = max((m.version for m in todo), default=0)
    applied: dict[int, str] = {}
    if await current_version(conn) > 0:
        applied = {r["version"]: r["checksum"]
                   for r in await conn.fetch("SELECT version, checksum FROM iim.schema_version")}
    db_version = max(applied, default=0)
    if db_version > code_version:
        raise SchemaTooNewError(db_version, code_version)
    for m in todo:
        if m.version in applied and applied[m.version] != m.checksum:
            raise MigrationChecksumError(
                f"migration {m.version:04d}_{m.name} was changed after it was applied "
                "(add a new migration instead of editing an applied one)")

    done: list[int] = []
    for m in todo:
        if m.version in applied:
            continue
        started = time.perf_counter()
        try:
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute("RESET ROLE")
                await conn.execute(
                    "INSERT INTO iim.schema_version (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version, m.name, m.checksum)
        except asyncpg.PostgresError as exc:
            # Re-raised with the migration named; the typed asyncpg error stays chained as __cause__.
            raise MigrationError(f"migration {m.version:04d}_{m.name} failed: {exc}") from exc
        log.info("applied migration %04d_%s in %.0f ms", m.version, m.name, (time.perf_counter() - started) * 1e3)
        done.append(m.version)
    return done
