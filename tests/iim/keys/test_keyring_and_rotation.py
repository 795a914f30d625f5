"""Data keys per tenant: created once, cached (no fetch per message), rotated without downtime, audited."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from uuid import UUID

import pytest

from iim.core.envelope import MasterKey
from iim.core.errors import ConfigError
from iim.core.secrets import SecretResolvers
from iim.key_rotation import rewrap_master, rotate_data_key
from iim.keys.keyring import Keyring, KeyUnavailable, load_master_keys
from iim.sms import store as sms_store
from policy_cache import audit
from policy_cache.db import Connection, Pool, tenant_tx
from tests.pg import TEST_MASTER_KEY, create_tenant, opened

OTHER_MASTER = MasterKey.from_bytes(b"\x07" * 32)


async def _queue(pool: Pool, keyring: Keyring, tenant: UUID, key: str, body: str) -> None:
    async with tenant_tx(pool, tenant) as conn:
        await sms_store.enqueue_sms(conn, key=key, msisdn="+79001112233", body=body,
                                    data_key=await keyring.active(conn, tenant))


async def _outbox(pool: Pool, tenant: UUID) -> dict[str, tuple[int | None, str | None]]:
    async with tenant_tx(pool, tenant) as conn:
        rows = await conn.fetch("SELECT tenant_id, key, body, body_key FROM iim.sms_outbox ORDER BY key")
        return {r["key"]: (r["body_key"], await opened(conn, r)) for r in rows}


async def test_a_tenants_first_data_key_is_created_once_and_then_served_from_memory(app_pool: Pool) -> None:
    tenant = await create_tenant(app_pool)
    keyring = Keyring(app_pool, TEST_MASTER_KEY)
    async with tenant_tx(app_pool, tenant) as conn:
        first = await keyring.active(conn, tenant)
    async with tenant_tx(app_pool, tenant) as conn:
        [row] = await conn.fetch("SELECT key_id, master_key_id, length(wrapped) AS n FROM iim.tenant_data_key")
    assert (row["key_id"], row["master_key_id"], row["n"]) == (1, TEST_MASTER_KEY.key_id, 60)
    conn = await app_pool.acquire()
    await app_pool.release(conn)
    closed: Connection = conn  # type: ignore[assignment]
    # A cached key needs no database at all: asked through a connection that is not even in a transaction.
    assert await keyring.active(closed, tenant) is first
    assert await keyring.key(closed, tenant, 1) is first


async def test_a_caller_transaction_rolled_back_does_not_lose_the_tenants_key(app_pool: Pool) -> None:
    tenant = await create_tenant(app_pool)
    keyring = Keyring(app_pool, TEST_MASTER_KEY)

    async def fail_after_asking() -> None:
        async with tenant_tx(app_pool, tenant) as conn:
            await keyring.active(conn, tenant)
            raise LookupError("the caller fails")

    with pytest.raises(LookupError):
        await fail_after_asking()
    fresh = Keyring(app_pool, TEST_MASTER_KEY)  # another process: it must find the same key
    async with tenant_tx(app_pool, tenant) as conn:
        assert (await fresh.active(conn, tenant)).key_id == 1
    await _queue(app_pool, keyring, tenant, "k", "sealed by the first process")
    assert await _outbox(app_pool, tenant) == {"k": (1, "sealed by the first process")}


async def test_a_data_key_wrapped_by_an_unknown_master_is_refused_clearly(app_pool: Pool) -> None:
    tenant = await create_tenant(app_pool)
    await _queue(app_pool, Keyring(app_pool, TEST_MASTER_KEY), tenant, "k", "x")
    stranger = Keyring(app_pool, OTHER_MASTER)
    async with tenant_tx(app_pool, tenant) as conn:
        with pytest.raises(KeyUnavailable, match="not configured"):
            await stranger.key(conn, tenant, 1)
        with pytest.raises(KeyUnavailable, match="no data key 7"):
            await stranger.key(conn, tenant, 7)


async def test_data_key_rotation_reseals_rows_in_batches_and_old_and_new_keys_stay_readable(
        app_pool: Pool, admin_conn: Connection) -> None:
    tenant = await create_tenant(app_pool)
    service = Keyring(app_pool, TEST_MASTER_KEY)  # a running service: its active key is cached
    for n in range(5):
        await _queue(app_pool, service, tenant, f"old/{n}", f"before rotation {n}")
    # A row from before sealing existed: clear text, no key (written as the sealing migration found it).
    async with tenant_tx(app_pool, tenant) as conn:
        await conn.execute("INSERT INTO iim.sms_outbox (key, msisdn, body) VALUES ('legacy', '+79001112233', "
                           "'written in clear long ago')")
    operator = Keyring(app_pool, TEST_MASTER_KEY)
    done = await rotate_data_key(app_pool, operator, tenant, actor="cli:ops", batch=2)
    assert (done.key_id, done.resealed["sms_outbox"], done.unreadable) == (2, 6, 0)
    # The service still seals with key 1 until its active-key TTL passes: both keys are readable meanwhile.
    await _queue(app_pool, service, tenant, "during", "sealed with the old key during rotation")
    rows = await _outbox(app_pool, tenant)
    assert rows["during"] == (1, "sealed with the old key during rotation")
    assert {k: v for k, v in rows.items() if k != "during"} == {
        **{f"old/{n}": (2, f"before rotation {n}") for n in range(5)}, "legacy": (2, "written in clear long ago")}
    async with tenant_tx(app_pool, tenant) as conn:
        assert (await service.key(conn, tenant, 2)).open(
            "sms_outbox", "legacy", "body", (await conn.fetchval("SELECT body FROM iim.sms_outbox WHERE key = 'legacy'")))
    finish = await rotate_data_key(app_pool, operator, tenant, actor="cli:ops", new_key=False)
    assert (finish.key_id, finish.resealed["sms_outbox"]) == (2, 1)
    assert {v[0] for v in (await _outbox(app_pool, tenant)).values()} == {2}
    await audit.flush_pending(app_pool)
    lines = await admin_conn.fetch("SELECT actor, action, detail FROM iim.audit_log WHERE tenant_id = $1 "
                                   "AND action LIKE 'keys.%' ORDER BY id", tenant)
    assert [(r["actor"], r["action"]) for r in lines] == [
        ("cli:ops", "keys.data_key_rotated"), ("cli:ops", "keys.rows_resealed"), ("cli:ops", "keys.rows_resealed")]


async def test_master_rotation_rewraps_every_data_key_and_the_new_master_alone_then_reads_them(
        app_pool: Pool, admin_conn: Connection) -> None:
    tenant = await create_tenant(app_pool)
    old = Keyring(app_pool, OTHER_MASTER)
    await _queue(app_pool, old, tenant, "k", "kept across the master rotation")
    async with tenant_tx(app_pool, tenant) as conn:
        sealed = await conn.fetchval("SELECT body FROM iim.sms_outbox WHERE key = 'k'")
    during = Keyring(app_pool, TEST_MASTER_KEY, previous=[OTHER_MASTER])  # both masters configured
    done = await rewrap_master(app_pool, during, tenant, actor="cli:ops")
    assert (done.rewrapped, done.unchanged) == (1, 0)
    again = await rewrap_master(app_pool, during, tenant, actor="cli:ops")
    assert (again.rewrapped, again.unchanged) == (0, 1)
    after = Keyring(app_pool, TEST_MASTER_KEY)  # the old master removed
    async with tenant_tx(app_pool, tenant) as conn:
        assert (await after.key(conn, tenant, 1)).open("sms_outbox", "k", "body", sealed) == \
            "kept across the master rotation"
        with pytest.raises(KeyUnavailable):
            await Keyring(app_pool, OTHER_MASTER).key(conn, tenant, 1)
    await audit.flush_pending(app_pool)
    assert await admin_conn.fetchval("SELECT count(*) FROM iim.audit_log WHERE tenant_id = $1 "
                                     "AND action = 'keys.master_rewrapped' AND actor = 'cli:ops'", tenant) == 1


def test_without_a_reference_a_master_key_is_generated_once_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    first, previous = load_master_keys(None, [], generated_file=path)
    assert previous == []
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_master_keys(None, [], generated_file=path)[0].key_id == first.key_id


def test_master_key_references_that_do_not_give_a_key_refuse_the_start(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IIM_TEST_MASTER", "too short")
    with pytest.raises(ConfigError, match="IIM_MASTER_KEY_REF: a master key is 32 bytes"):
        load_master_keys("env:IIM_TEST_MASTER", [], generated_file=tmp_path / "k")
    with pytest.raises(ConfigError, match="IIM_MASTER_KEY_REF: credential reference 'env:IIM_TEST_UNSET'"):
        load_master_keys("env:IIM_TEST_UNSET", [], generated_file=tmp_path / "k")
    with pytest.raises(ConfigError, match="no resolver for secret reference scheme 'kms'"):
        load_master_keys("kms:alias/iim", [], generated_file=tmp_path / "k", resolvers=SecretResolvers({}))
    monkeypatch.setenv("IIM_TEST_MASTER", "11" * 32)
    monkeypatch.setenv("IIM_TEST_OLD", "22" * 32)
    current, previous = load_master_keys("env:IIM_TEST_MASTER", ["env:IIM_TEST_OLD", "env:IIM_TEST_MASTER"],
                                         generated_file=tmp_path / "k")
    assert [m.key_id for m in previous] == [MasterKey.from_secret("22" * 32).key_id]  # the current one not twice
    assert current.key_id == MasterKey.from_secret("11" * 32).key_id
