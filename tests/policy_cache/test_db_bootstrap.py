"""Bootstrap: embedded PostgreSQL from a fresh data directory, an external server by URL, demo data."""

from __future__ import annotations

import json
import shutil
import stat
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, time
from pathlib import Path
from uuid import uuid4

import asyncpg
import pytest

from policy_cache import audit
from policy_cache.bootstrap import DEMO_TENANT_ID, Database, bootstrap, load_demo
from policy_cache.db import Connection, DbRole, Pool, connect, tenant_tx
from policy_cache.loader import load_routing_rows
from policy_cache.migrate import available_migrations
from policy_cache.models import BindingRole, ConsentPurpose, DeviceStatus, RingMode
from tests.pg import PgCluster, with_url


@pytest.fixture
def scratch() -> Iterator[Path]:
    # Not under pytest's tmp_path: the embedded server's system user must traverse the path (the package
    # widens parent directory permissions for that), and /tmp already allows it.
    path = Path(tempfile.mkdtemp(prefix="iim-bootstrap-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def _check_demo_routes(cache_url: str, db: Database) -> None:
    conn = await connect(cache_url, role=DbRole.CACHE)
    try:
        rows = {r.msisdn: r async for r in load_routing_rows(conn)}
    finally:
        await conn.close()
    owner = rows["+79001234567"]
    assert owner.tenant_id == DEMO_TENANT_ID
    assert owner.sip_aor == "sip:+79001234567@iim.local"
    assert owner.policy is not None
    assert owner.policy.ring_mode is RingMode.SIMULTANEOUS
    assert (owner.policy.quiet_start, owner.policy.quiet_end) == (time(23), time(7))
    assert owner.primary is not None
    assert owner.primary.role is BindingRole.OWNER
    assert owner.primary.household.time_zone == "Europe/Moscow"
    devices = {d.sip_uri or d.connector_ref: d for d in owner.primary.devices}
    assert set(devices) == {"sip:speaker-1@iim.local", "kitchen-speaker-1", "smoke-sensor-1"}
    assert devices["sip:speaker-1@iim.local"].status is DeviceStatus.ONLINE
    assert owner.consent(ConsentPurpose.ANNOUNCE_CALLS, datetime.now(UTC)) is not None
    backup = rows["+79007654321"]
    assert backup.bindings == ()  # a backup contact: escalation only
    assert db.demo is not None
    assert db.demo.owner_id == owner.subscriber_id


async def test_embedded_bootstrap_from_a_fresh_data_dir(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IIM_DATABASE_URL", raising=False)
    monkeypatch.delenv("IIM_DB_APP_PASSWORD_REF", raising=False)
    monkeypatch.delenv("IIM_DB_CACHE_PASSWORD_REF", raising=False)
    data = scratch / ".iim-data" / "pg"
    db = await bootstrap(data_dir=data)
    try:
        assert db.embedded is not None
        assert db.database == "iim"
        assert db.applied == tuple(m.version for m in available_migrations())
        assert "postgresql://" not in repr(db)  # no passwords in reprs/logs
        secrets_file = scratch / ".iim-data" / "db-secrets.json"
        assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
        assert set(json.loads(secrets_file.read_text())) == {"postgres", "iim_app", "iim_cache"}

        admin = await asyncpg.connect(db.admin_url)
        try:
            assert int(await admin.fetchval("SHOW server_version_num")) >= 180000
        finally:
            await admin.close()

        # SCRAM everywhere: the right password works, a wrong one (or none) does not.
        app = await connect(db.app_url, role=DbRole.APP)
        await app.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(with_url(db.app_url, password="wrong"))
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(db.embedded.url("iim"))

        await _check_demo_routes(db.cache_url, db)

        # Second start: nothing to migrate, same demo, same passwords.
        again = await bootstrap(data_dir=data)
        assert again.applied == ()
        assert again.demo == db.demo
        assert again.app_url == db.app_url
    finally:
        await db.aclose()
    # The server stopped; a restart from the same directory keeps the data.
    restarted = await bootstrap(data_dir=data, demo=False)
    try:
        conn = await asyncpg.connect(restarted.admin_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM iim.subscriber") == 2
        finally:
            await conn.close()
    finally:
        assert restarted.embedded is not None
        await restarted.aclose()


async def test_a_bootstrap_failing_after_starting_the_embedded_server_stops_it(
        scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IIM_DATABASE_URL", raising=False)
    data = scratch / ".iim-data" / "pg"
    secrets_file = scratch / ".iim-data" / "db-secrets.json"
    secrets_file.parent.mkdir(parents=True)
    secrets_file.write_text("{}")
    secrets_file.chmod(0o644)  # refused, but only once the server is up (the file is read after start)
    with pytest.raises(PermissionError, match="chmod 600"):
        await bootstrap(data_dir=data)
    assert (data / "PG_VERSION").exists()  # the server was initialised and started ...
    assert not (data / "postmaster.pid").exists()  # ... and stopped again


async def test_bootstrap_on_an_external_server(pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch,
                                               scratch: Path) -> None:
    name = f"iim_bs_{uuid4().hex[:8]}"
    # Keep the cluster-wide role passwords the other test modules use (roles are shared by all databases).
    monkeypatch.setenv("IIM_TEST_ROLE_PASSWORD", pg_cluster.role_password)
    monkeypatch.setenv("IIM_DB_APP_PASSWORD_REF", "env:IIM_TEST_ROLE_PASSWORD")
    monkeypatch.setenv("IIM_DB_CACHE_PASSWORD_REF", "env:IIM_TEST_ROLE_PASSWORD")
    monkeypatch.setenv("IIM_DATABASE_URL", pg_cluster.url(name))
    try:
        db = await bootstrap(data_dir=scratch / "unused" / "pg")
        assert db.embedded is None
        assert db.database == name
        assert db.applied == tuple(m.version for m in available_migrations())
        assert not (scratch / "unused").exists()  # no embedded server, no secrets file
        await _check_demo_routes(db.cache_url, db)
        again = await bootstrap(data_dir=scratch / "unused" / "pg")
        assert again.applied == ()
        assert again.demo == db.demo
    finally:
        await _drop(pg_cluster, name)


async def _drop(cluster: PgCluster, name: str) -> None:
    conn = await asyncpg.connect(cluster.admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def test_load_demo_is_idempotent_and_audited(app_pool: Pool, admin_conn: Connection) -> None:
    async with app_pool.acquire() as conn:
        first = await load_demo(conn)  # type: ignore[arg-type]
        second = await load_demo(conn)  # type: ignore[arg-type]
    assert first == second
    assert await admin_conn.fetchval("SELECT count(*) FROM iim.subscriber WHERE tenant_id = $1",
                                     DEMO_TENANT_ID) == 2
    async with tenant_tx(app_pool, DEMO_TENANT_ID) as conn:
        actions = [e.action for e in reversed(await audit.entries(conn, limit=100))]
        assert actions[0] == "tenant.create"
        assert "consent.create" in actions
        assert len(actions) == 12
        assert await audit.verify_chain(conn, DEMO_TENANT_ID) is None
        secret_ref = await conn.fetchval("SELECT ref FROM iim.credential_ref")
        assert secret_ref == "env:IIM_DEMO_WEBHOOK_SECRET"
