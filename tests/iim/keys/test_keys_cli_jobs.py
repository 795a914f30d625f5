"""``iim keys rotate`` runs its rotation as a job of ``iim.key_rotation_job``: never beside a service's job of the
same tenant, and a job cut short is taken up by ``--finish``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import UUID

import pytest
import pytest_asyncio

from iim.keys import store as key_store
from iim.keys.keyring import Keyring
from iim.keys_api import KeyRotations, RotateBody
from iim.keys_cli import _rotate
from policy_cache import audit
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from tests.pg import TEST_MASTER_KEY, PgDatabase, create_tenant

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(pg_db: PgDatabase) -> AsyncIterator[Pool]:
    pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


def _rotations(pool: Pool) -> KeyRotations:
    keyring = Keyring(pool, TEST_MASTER_KEY)
    return KeyRotations(lambda: pool, lambda: keyring)


async def _key_ids(pool: Pool, tenant: UUID) -> list[int]:
    async with tenant_tx(pool, tenant, readonly=True) as conn:
        return [r["key_id"] for r in await key_store.keys(conn)]


async def test_the_command_line_rotation_is_a_job_ended_done_and_audited(pool: Pool) -> None:
    tenant = await create_tenant(pool, "Cli job")
    ended = await _rotate(_rotations(pool), pool, tenant, RotateBody(), actor="cli:test")
    assert (ended.state, ended.key_id, ended.actor) == ("done", 1, "cli:test")
    assert await _key_ids(pool, tenant) == [1]
    async with tenant_tx(pool, tenant, readonly=True) as conn:
        actions = [e.action for e in await audit.entries(conn, limit=50)]
    assert {"keys.rotation_requested", "keys.data_key_rotated", "keys.rotation_done"} <= set(actions)


async def test_a_job_a_service_holds_is_not_run_again_from_the_command_line(pool: Pool) -> None:
    tenant = await create_tenant(pool, "Cli busy")
    service = _rotations(pool)
    async with tenant_tx(pool, tenant) as conn:
        job, created = await service.open(conn, tenant, RotateBody(), actor="root@noc")
    assert created
    async with pool.acquire() as proxy:  # the service runs it: it holds the job's lock
        assert await key_store.job_lock(proxy, job.id)  # type: ignore[arg-type]
        try:
            for finish in (False, True):
                ended = await _rotate(_rotations(pool), pool, tenant, RotateBody(finish=finish), actor="cli:test")
                assert (ended.id, ended.state, ended.actor) == (job.id, "running", "root@noc")
            assert await _key_ids(pool, tenant) == []  # no key made beside the service's job
        finally:
            await key_store.job_unlock(proxy, job.id)  # type: ignore[arg-type]


async def test_a_job_cut_short_is_finished_by_finish_with_one_new_key(pool: Pool) -> None:
    tenant = await create_tenant(pool, "Cli cut")
    async with tenant_tx(pool, tenant) as conn:  # a rotation whose runner died before it ran
        job, _ = await _rotations(pool).open(conn, tenant, RotateBody(), actor="cli:gone")
    plain = await _rotate(_rotations(pool), pool, tenant, RotateBody(), actor="cli:test")
    assert (plain.id, plain.state) == (job.id, "running")  # without --finish: left to whoever runs it
    ended = await _rotate(_rotations(pool), pool, tenant, RotateBody(finish=True), actor="cli:test")
    assert (ended.id, ended.state, ended.key_id) == (job.id, "done", 1)
    assert await _key_ids(pool, tenant) == [1]
