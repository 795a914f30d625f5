"""Signed audit chain heads (``policy_cache.audit_heads``) and what the app role may write, on real PostgreSQL."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from uuid import UUID

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policy_cache import audit, audit_heads, registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import SubscriberCreate
from tests.audit_rehash import rehash_from
from tests.pg import PgDatabase, create_tenant

SEED = bytes(range(32))


_numbers = itertools.count(1)


async def _rows(pool: Pool, tenant: UUID, n: int) -> None:
    async with tenant_tx(pool, tenant) as conn:
        for _ in range(n):
            msisdn = f"+7912{tenant.int % 10**4:04d}{next(_numbers):03d}"
            await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=msisdn), actor="alice@noc")


async def test_a_rehash_from_row_n_leaves_an_intact_chain_but_not_the_published_heads(
        app_pool: Pool, pg_db: PgDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tenant = await create_tenant(app_pool)
    await _rows(app_pool, tenant, 3)
    monkeypatch.setenv("IIM_TEST_HEAD_KEY", SEED.hex())
    key = audit_heads.load_private_key("env:IIM_TEST_HEAD_KEY")
    heads_file = tmp_path / "heads.jsonl"
    async with audit_heads.AuditHeadPublisher(app_pool, key, heads_file=heads_file, interval=3600) as publisher:
        await _rows(app_pool, tenant, 2)
        assert await publisher.publish() >= 1
    lines = [h for h in audit_heads.read_heads(heads_file) if h["tenant_id"] == str(tenant)]
    assert len(lines) == 2  # at start, and after the chain moved (nothing more at stop: it did not move again)
    public = key.public_key()
    assert audit_heads.check_signatures(lines, public) == []
    async with tenant_tx(app_pool, tenant) as conn:
        assert await audit_heads.check_heads(conn, tenant, [(h["seq"], h["hash"]) for h in lines]) == []
        first = await conn.fetchval("SELECT min(id) FROM iim.audit_log")

    await rehash_from(pg_db.admin_url, tenant, first + 1)

    async with tenant_tx(app_pool, tenant) as conn:
        assert await audit.verify_chain(conn, tenant) is None  # the chain alone cannot tell
        off = await audit_heads.check_heads(conn, tenant, [(h["seq"], h["hash"]) for h in lines])
    assert off == sorted(h["seq"] for h in lines)


async def test_a_forged_or_foreign_head_line_fails_its_signature_check(app_pool: Pool) -> None:
    tenant = await create_tenant(app_pool)
    await _rows(app_pool, tenant, 1)
    key, other = Ed25519PrivateKey.from_private_bytes(SEED), Ed25519PrivateKey.generate()
    [head] = [h for h in await audit_heads.current_heads(app_pool) if h.tenant_id == tenant]
    line = audit_heads.sign_head(head, key)
    assert audit_heads.verify_head_signature(line, key.public_key())
    moved = {**line, "seq": line["seq"] + 1}
    assert not audit_heads.verify_head_signature(moved, key.public_key())
    problems = audit_heads.check_signatures([moved, audit_heads.sign_head(head, other)], key.public_key())
    assert [p.problem for p in problems] == ["bad_signature", "other_key"]


async def test_heads_are_published_as_a_log_line_and_kept_for_the_api(
        app_pool: Pool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="iim.audit.heads")
    tenant = await create_tenant(app_pool)
    await _rows(app_pool, tenant, 1)
    publisher = audit_heads.AuditHeadPublisher(app_pool, Ed25519PrivateKey.from_private_bytes(SEED), interval=3600)
    await publisher.start()
    await publisher.aclose()
    [latest] = publisher.latest(tenant)
    assert latest["tenant_id"] == str(tenant)
    logged = [r for r in caplog.records if getattr(r, "audit_head", {}).get("tenant_id") == str(tenant)]
    assert logged
    assert json.loads(json.dumps(logged[0].audit_head)) == latest


async def test_the_app_role_cannot_choose_a_staged_lines_time_nor_write_the_chain_directly(app_pool: Pool) -> None:
    tenant = await create_tenant(app_pool)
    async with tenant_tx(app_pool, tenant) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("INSERT INTO iim.audit_pending (at, actor, action, entity) "
                               "VALUES (now() - interval '1 year', 'alice@noc', 'x.back_dated', 'x')")
    async with tenant_tx(app_pool, tenant) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("INSERT INTO iim.audit_log (tenant_id, at, actor, action, entity, prev_hash, row_hash) "
                               "VALUES ($1, now(), 'a', 'b', 'c', '\\x00', '\\x00')", tenant)
    async with tenant_tx(app_pool, tenant) as conn:  # the door that stays open: the database's clock
        await audit.stage(conn, actor="scenario-engine", action="x.staged", entity="x")
    assert await audit.flush_pending(app_pool) >= 1


@pytest.mark.parametrize("actor", ["alice\nroot@noc", " alice", "alice\t", "bob\x1b[2J"])
async def test_malformed_actors_are_refused_by_both_doors_into_the_chain(app_pool: Pool, actor: str) -> None:
    tenant = await create_tenant(app_pool)
    async with tenant_tx(app_pool, tenant) as conn:
        with pytest.raises(asyncpg.CheckViolationError):
            await audit.append(conn, tenant, actor=actor, action="x.appended", entity="x")
    async with tenant_tx(app_pool, tenant) as conn:
        with pytest.raises(asyncpg.CheckViolationError):
            await audit.stage(conn, actor=actor, action="x.staged", entity="x")
