"""The audit log: append-only for everyone, hash-chained per tenant, verified independently in Python."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from uuid import UUID, uuid4

import asyncpg
import pytest

from policy_cache import audit
from policy_cache.db import Connection, Pool, tenant_tx
from tests.pg import create_tenant

TRICKY = ['quote " backslash \\ slash /', "line\nfeed\ttab\rcr\bbs\ffeed", "ctl \x01\x1f del \x7f",
          "кириллица", "emoji 🚒", "ls \u2028 ps \u2029", "nul-free but long " * 20]


async def _append_some(pool: Pool, tenant: UUID, n: int, *, prefix: str = "act") -> list[int]:
    ids = []
    for i in range(n):
        async with tenant_tx(pool, tenant) as conn:
            ids.append(await audit.append(conn, tenant, actor=f"user:{i}", action=f"{prefix}.{i}", entity="test",
                                          entity_id=uuid4(), detail={"i": i, "text": TRICKY[i % len(TRICKY)],
                                                                     "nested": {"b": [1, 2.5, None, True]}},
                                          correlation={"call_id": f"c{i}"}))
    return ids


async def test_chain_is_intact_and_linked(app_pool: Pool) -> None:
    tenant = await create_tenant(app_pool, "audit tenant")
    ids = await _append_some(app_pool, tenant, 8)
    async with tenant_tx(app_pool, tenant) as conn:
        assert await audit.verify_chain(conn, tenant) is None
        rows = await conn.fetch("SELECT id, prev_hash, row_hash FROM iim.audit_log WHERE tenant_id = $1 ORDER BY id",
                                tenant)
        head = await audit.chain_head(conn, tenant)
    # create_tenant wrote the first row; then ours, each linked to the previous.
    assert [r["id"] for r in rows][-8:] == ids
    assert bytes(rows[0]["prev_hash"]) == audit.GENESIS_HASH
    for prev, row in itertools.pairwise(rows):
        assert bytes(row["prev_hash"]) == bytes(prev["row_hash"])
    assert head == (ids[-1], bytes(rows[-1]["row_hash"]))


async def test_python_canonical_form_matches_the_database(app_pool: Pool, admin_conn: Connection) -> None:
    tenant = await create_tenant(app_pool, "canonical")
    await _append_some(app_pool, tenant, len(TRICKY))
    rows = await admin_conn.fetch(
        """SELECT *, detail::text AS dt, correlation::text AS ct,
                  iim.audit_canonical(tenant_id, id, at, actor, action, entity, entity_id, detail, correlation) AS db,
                  iim.audit_canonical_v2(tenant_id, id, at, actor, action, entity, entity_id, detail_digest,
                                         correlation) AS db2
           FROM iim.audit_log WHERE tenant_id = $1 ORDER BY id""", tenant)
    for r in rows:
        mine = audit.canonical_json(tenant_id=tenant, id=r["id"], at=r["at"], actor=r["actor"], action=r["action"],
                                    entity=r["entity"], entity_id=r["entity_id"], detail_text=r["dt"],
                                    correlation_text=r["ct"])
        assert mine == r["db"]
        # Rows chained since 0025 commit to the detail through its salted digest.
        assert hashlib.sha256(bytes(r["detail_salt"]) + r["dt"].encode()).digest() == bytes(r["detail_digest"])
        mine2 = audit.canonical_json_v2(tenant_id=tenant, id=r["id"], at=r["at"], actor=r["actor"],
                                        action=r["action"], entity=r["entity"], entity_id=r["entity_id"],
                                        detail_digest=bytes(r["detail_digest"]), correlation_text=r["ct"])
        assert mine2 == r["db2"]
        assert hashlib.sha256(bytes(r["prev_hash"]) + mine2.encode()).digest() == bytes(r["row_hash"])


async def test_app_role_cannot_change_or_forge_audit_rows(app_pool: Pool) -> None:
    tenant = await create_tenant(app_pool, "immutable")
    await _append_some(app_pool, tenant, 2)
    statements = [
        "UPDATE iim.audit_log SET actor = 'someone else'",
        "DELETE FROM iim.audit_log",
        "TRUNCATE iim.audit_log",
        ("INSERT INTO iim.audit_log (tenant_id, at, actor, action, entity, prev_hash, row_hash) "
        "VALUES (iim.current_tenant(), now(), 'x', 'x', 'x', '\\x00'::bytea, '\\x00'::bytea)"),
    ]
    for sql in statements:
        async with tenant_tx(app_pool, tenant) as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await conn.execute(sql)
    async with tenant_tx(app_pool, tenant) as conn:
        assert await audit.verify_chain(conn, tenant) is None


async def test_triggers_refuse_changes_even_from_the_owner(app_pool: Pool, admin_conn: Connection) -> None:
    tenant = await create_tenant(app_pool, "owner cannot edit")
    for sql in ("UPDATE iim.audit_log SET actor = 'x' WHERE tenant_id = $1",
                "DELETE FROM iim.audit_log WHERE tenant_id = $1"):
        async with admin_conn.transaction():
            await admin_conn.execute("SET LOCAL ROLE iim_owner")
            await admin_conn.execute("SELECT set_config('app.tenant', $1, true)", str(tenant))
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await admin_conn.execute(sql, tenant)
    async with admin_conn.transaction():
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await admin_conn.execute("TRUNCATE iim.audit_log")  # even a superuser, while the trigger is on


async def test_audit_append_refuses_another_tenant(app_pool: Pool) -> None:
    a = await create_tenant(app_pool, "a")
    b = await create_tenant(app_pool, "b")
    async with tenant_tx(app_pool, a) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="not the transaction's tenant"):
            await audit.append(conn, b, actor="evil", action="forge", entity="test")
    async with app_pool.acquire() as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await audit.append(conn, b, actor="evil", action="forge", entity="test")  # no tenant at all


async def test_tampering_by_a_superuser_breaks_the_chain_at_that_row(app_pool: Pool, admin_conn: Connection) -> None:
    tenant = await create_tenant(app_pool, "tampered")
    ids = await _append_some(app_pool, tenant, 6)
    victim, successor = ids[2], ids[3]

    async def verify() -> int | None:
        async with tenant_tx(app_pool, tenant) as conn:
            return await audit.verify_chain(conn, tenant)

    async with admin_conn.transaction():
        await admin_conn.execute("ALTER TABLE iim.audit_log DISABLE TRIGGER audit_log_no_update_delete")
        await admin_conn.execute("UPDATE iim.audit_log SET detail = '{\"i\": 999}' WHERE tenant_id = $1 AND id = $2",
                                 tenant, victim)
        await admin_conn.execute("ALTER TABLE iim.audit_log ENABLE TRIGGER audit_log_no_update_delete")
    assert await verify() == victim

    # Re-hashing the edited row moves the break to its successor (whose prev_hash no longer matches).
    async with admin_conn.transaction():
        await admin_conn.execute("ALTER TABLE iim.audit_log DISABLE TRIGGER audit_log_no_update_delete")
        await admin_conn.execute(
            """UPDATE iim.audit_log SET detail_digest = sha256(detail_salt || convert_to(detail::text, 'UTF8'))
               WHERE tenant_id = $1 AND id = $2""", tenant, victim)
        await admin_conn.execute(
            """UPDATE iim.audit_log SET row_hash = sha256(prev_hash || convert_to(iim.audit_canonical_v2(
                   tenant_id, id, at, actor, action, entity, entity_id, detail_digest, correlation), 'UTF8'))
               WHERE tenant_id = $1 AND id = $2""", tenant, victim)
        await admin_conn.execute("ALTER TABLE iim.audit_log ENABLE TRIGGER audit_log_no_update_delete")
    assert await verify() == successor


async def test_a_tombstoned_detail_leaves_the_chain_verifiable(app_pool: Pool) -> None:
    tenant = await create_tenant(app_pool, "tombstones")
    ids = await _append_some(app_pool, tenant, 4)
    async with tenant_tx(app_pool, tenant) as conn:
        assert await audit.tombstone(conn, tenant, ids[1:3], reason="erasure") == 2
        assert await audit.tombstone(conn, tenant, ids[1:3], reason="erasure") == 0  # already tombstones
    async with tenant_tx(app_pool, tenant) as conn:
        assert await audit.verify_chain(conn, tenant) is None
        rows = await conn.fetch("SELECT id, detail, detail_salt FROM iim.audit_log WHERE id = ANY($1::bigint[]) "
                                "ORDER BY id", ids)
    assert [audit.is_tombstone(r["detail"]) for r in rows] == [False, True, True, False]
    assert rows[1]["detail"]["tombstone"]["reason"] == "erasure"
    assert rows[1]["detail_salt"] is None
    assert rows[0]["detail_salt"] is not None


async def test_only_a_tombstone_gets_past_the_trigger_and_not_for_the_app_role(
        app_pool: Pool, admin_conn: Connection) -> None:
    tenant = await create_tenant(app_pool, "tombstone rules")
    ids = await _append_some(app_pool, tenant, 2)
    async with tenant_tx(app_pool, tenant) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE iim.audit_log SET detail = '{\"tombstone\": {}}', detail_salt = NULL "
                               "WHERE id = $1", ids[0])
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):  # another column changes too
        await admin_conn.execute("UPDATE iim.audit_log SET detail = '{\"tombstone\": {}}', detail_salt = NULL, "
                                 "actor = 'mallory' WHERE tenant_id = $1 AND id = $2", tenant, ids[0])
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):  # the salt kept
        await admin_conn.execute("UPDATE iim.audit_log SET detail = '{\"tombstone\": {}}' "
                                 "WHERE tenant_id = $1 AND id = $2", tenant, ids[0])
    other = await create_tenant(app_pool, "another tenant")
    async with tenant_tx(app_pool, other) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="not the transaction's tenant"):
            await audit.tombstone(conn, tenant, ids, reason="erasure")


async def test_a_detail_changed_under_its_digest_breaks_the_chain_at_that_row(
        app_pool: Pool, admin_conn: Connection) -> None:
    tenant = await create_tenant(app_pool, "digest")
    ids = await _append_some(app_pool, tenant, 3)
    async with admin_conn.transaction():
        await admin_conn.execute("SET LOCAL session_replication_role = replica")
        await admin_conn.execute("UPDATE iim.audit_log SET detail = '{\"i\": 1}' WHERE tenant_id = $1 AND id = $2",
                                 tenant, ids[1])
    async with tenant_tx(app_pool, tenant) as conn:
        assert await audit.verify_chain(conn, tenant) == ids[1]


async def test_deleting_a_row_breaks_the_chain_at_the_next_one(app_pool: Pool, admin_conn: Connection) -> None:
    tenant = await create_tenant(app_pool, "deleted")
    ids = await _append_some(app_pool, tenant, 4)
    async with admin_conn.transaction():
        await admin_conn.execute("SET LOCAL session_replication_role = replica")  # skips the row trigger
        await admin_conn.execute("DELETE FROM iim.audit_log WHERE tenant_id = $1 AND id = $2", tenant, ids[1])
    async with tenant_tx(app_pool, tenant) as conn:
        assert await audit.verify_chain(conn, tenant) == ids[2]


async def test_staged_lines_of_several_tenants_enter_their_own_chains_in_staging_order(app_pool: Pool) -> None:
    tenants = [await create_tenant(app_pool, f"staged {i}") for i in range(2)]
    await audit.flush_pending(app_pool)
    for i in range(6):  # interleaved between the tenants, several lines per transaction
        tenant = tenants[i % 2]
        async with tenant_tx(app_pool, tenant) as conn:
            for j in range(3):
                await audit.stage(conn, actor=f"user:{i}", action=f"staged.{i}.{j}", entity="test",
                                  entity_id=str(uuid4()), detail={"text": TRICKY[(i + j) % len(TRICKY)]},
                                  correlation={"event_id": f"e{i}"})
    assert await audit.flush_pending(app_pool) == 18
    assert await audit.flush_pending(app_pool) == 0
    for n, tenant in enumerate(tenants):
        async with tenant_tx(app_pool, tenant) as conn:
            assert await audit.verify_chain(conn, tenant) is None
            staged = [r["action"] for r in await conn.fetch(
                "SELECT action FROM iim.audit_log WHERE action LIKE 'staged.%' ORDER BY id")]
        assert staged == [f"staged.{i}.{j}" for i in range(n, 6, 2) for j in range(3)]


async def test_concurrent_appends_keep_one_chain_per_tenant(app_pool: Pool) -> None:
    tenants = [await create_tenant(app_pool, f"busy {i}") for i in range(2)]
    await asyncio.gather(*(_append_some(app_pool, t, 10, prefix=f"w{w}") for t in tenants for w in range(3)))
    for tenant in tenants:
        async with tenant_tx(app_pool, tenant) as conn:
            assert await audit.verify_chain(conn, tenant) is None
            assert await conn.fetchval("SELECT count(*) FROM iim.audit_log") == 31
            entries = await audit.entries(conn, entity="test", limit=5)
            assert len(entries) == 5
            assert entries[0].id > entries[-1].id


def test_the_flusher_backs_off_while_rounds_find_nothing_and_returns_to_its_interval_when_lines_come() -> None:
    delays, delay = [], 0.1
    for moved in (0, 0, 0, 0, 0, 3, 0):
        delay = audit.next_flush_delay(delay, moved, 0.1, 1.0)
        delays.append(delay)
    assert delays == [0.2, 0.4, 0.8, 1.0, 1.0, 0.1, 0.2]


async def test_the_flusher_chains_a_line_staged_after_a_quiet_spell(app_pool: Pool) -> None:
    tenant = await create_tenant(app_pool, "quiet flusher")
    await audit.flush_pending(app_pool)
    async with audit.AuditFlusher(app_pool, interval=0.05, idle_interval=0.4):
        await asyncio.sleep(1.0)  # several empty rounds: the flusher has backed off to its idle interval
        async with tenant_tx(app_pool, tenant) as conn:
            await audit.stage(conn, actor="user:q", action="staged.quiet", entity="test")

        async def chained() -> bool:
            async with tenant_tx(app_pool, tenant) as conn:
                return bool(await conn.fetchval(
                    "SELECT count(*) FROM iim.audit_log WHERE action = 'staged.quiet'"))

        for _ in range(250):
            if await chained():
                break
            await asyncio.sleep(0.02)
        assert await chained()


async def test_the_services_own_events_chain_under_the_nil_id_and_verify_like_a_tenants(app_pool: Pool) -> None:
    async with tenant_tx(app_pool, audit.SYSTEM_CHAIN) as conn:
        before = await audit.chain_head(conn, audit.SYSTEM_CHAIN)
    first = await audit.append_system(app_pool, actor="svc", action="system.test", entity="test", detail={"n": 1})
    second = await audit.append_system(app_pool, actor="svc", action="system.test", entity="test", detail={"n": 2})
    async with tenant_tx(app_pool, audit.SYSTEM_CHAIN) as conn:
        assert await audit.verify_chain(conn, audit.SYSTEM_CHAIN) is None
        rows = await conn.fetch("SELECT id, tenant_id, prev_hash, row_hash FROM iim.audit_log "
                                "WHERE id = ANY($1::bigint[]) ORDER BY id", [first, second])
    assert [r["tenant_id"] for r in rows] == [audit.SYSTEM_CHAIN] * 2
    assert bytes(rows[0]["prev_hash"]) == (audit.GENESIS_HASH if before is None else before[1])
    assert bytes(rows[1]["prev_hash"]) == bytes(rows[0]["row_hash"])


async def test_no_tenant_may_take_the_system_chains_id(app_pool: Pool) -> None:
    with pytest.raises(Exception, match="tenant_id_not_the_system_chain"):
        await create_tenant(app_pool, "impostor", tenant_id=audit.SYSTEM_CHAIN)
