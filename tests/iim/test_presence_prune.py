"""Expired presence claims are pruned: claims expired longer ago than the keep window go, in bounded batches and
across tenants; live and recently expired ones stay, their audit lines stay, and the routing answer (the cache's
snapshot, ``explain-call``) is the same before and after. Real PostgreSQL, the real policy cache."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from uuid import UUID

import pytest

from fs_app.dialstring import DialSettings
from iim.explain import explain
from policy_cache import presence_store, registry
from policy_cache.audit import flush_pending
from policy_cache.bootstrap import Demo, load_demo
from policy_cache.cache import PolicyCache
from policy_cache.db import Connection, DbRole, Pool, connect_pool, tenant_tx
from policy_cache.models import HouseholdUpdate, PresenceState
from policy_cache.presence_feed import PresenceFeed
from policy_cache.store import PgPolicyStore
from tests.home_delivery_rig import build_home, create_tenant
from tests.pg import PgDatabase

OWNER = "+79001234567"
DAY = 86_400


@pytest.fixture
async def demo(app_pool: Pool, admin_conn: Connection) -> Demo:
    async with app_pool.acquire() as conn:
        demo = await load_demo(conn)
    await admin_conn.execute("DELETE FROM iim.presence_claim")
    async with tenant_tx(app_pool, demo.tenant_id) as tx:
        await registry.update(tx, registry.HOUSEHOLD, demo.household_id,
                              HouseholdUpdate(presence=PresenceState.AWAY), actor="test")
    return demo


@pytest.fixture
async def cache(pg_db: PgDatabase, demo: Demo) -> AsyncIterator[PolicyCache]:
    store = PgPolicyStore(pg_db.cache_url)
    c = PolicyCache(store, resync_interval=30.0)
    await c.start(timeout=10)
    yield c
    await c.aclose()
    await store.aclose()


@pytest.fixture
async def directory(pg_db: PgDatabase) -> AsyncIterator[Pool]:
    pool = await connect_pool(pg_db.cache_url, role=DbRole.CACHE, min_size=1, max_size=2)
    yield pool
    await pool.close()


async def _expired_claim(pool: Pool, tenant: UUID, household: UUID, subject: str, *, expired_ago_s: int) -> None:
    """A claim that ran out ``expired_ago_s`` seconds ago (written as a source would have, back then)."""
    async with tenant_tx(pool, tenant) as tx:
        await tx.execute(
            "INSERT INTO iim.presence_claim (household_id, source, subject, state, observed_at, expires_at, actor) "
            "VALUES ($1, 'app', $2, 'home', now() - make_interval(secs => $3 + 600), "
            "now() - make_interval(secs => $3), 'app@operator')", household, subject, float(expired_ago_s))


async def _subjects(admin_conn: Connection) -> set[str]:
    return {r["subject"] for r in await admin_conn.fetch("SELECT subject FROM iim.presence_claim")}


async def _claim_audit(admin_conn: Connection, app_pool: Pool) -> list[tuple[str, str]]:
    await flush_pending(app_pool)
    rows = await admin_conn.fetch("SELECT action, detail->>'subject' AS subject FROM iim.audit_log "
                                  "WHERE action LIKE 'household.presence_%' ORDER BY tenant_id, id")
    return [(r["action"], r["subject"]) for r in rows]


def _report(cache: PolicyCache, at: datetime) -> object:
    snap = cache.lookup(OWNER)
    assert snap is not None
    _, report = explain(snap, OWNER, None, at.isoformat(), DialSettings())
    return report


async def test_claims_expired_past_the_window_go_in_bounded_batches_and_the_answer_does_not_change(
        app_pool: Pool, directory: Pool, demo: Demo, cache: PolicyCache, admin_conn: Connection) -> None:
    async with tenant_tx(app_pool, demo.tenant_id) as tx:
        await presence_store.put_claim(tx, demo.household_id, source="app", subject="anna", state="home", ttl_s=600,
                                       actor="app@operator", chain_tenant=demo.tenant_id)
    await _expired_claim(app_pool, demo.tenant_id, demo.household_id, "boris", expired_ago_s=3600)  # recent
    await _expired_claim(app_pool, demo.tenant_id, demo.household_id, "carl", expired_ago_s=2 * DAY)
    await _expired_claim(app_pool, demo.tenant_id, demo.household_id, "dora", expired_ago_s=DAY + 60)
    other = await create_tenant(app_pool, "elsewhere")
    home = await build_home(app_pool, other, "+79107000001", speaker=False)
    await _expired_claim(app_pool, other, home.household_id, "erik", expired_ago_s=3 * DAY)
    await cache.sync()
    at = datetime.now(UTC) + timedelta(seconds=5)
    before = _report(cache, at)
    assert before["presence"]["state"] == "home"  # type: ignore[index]  # anna's live claim
    audit_before = await _claim_audit(admin_conn, app_pool)
    assert ("household.presence_claim", "anna") in audit_before

    async with PresenceFeed(app_pool, directory, prune_interval_s=None, prune_keep_s=DAY, prune_batch=2) as feed:
        assert [await feed.prune_once() for _ in range(3)] == [2, 1, 0]  # at most a batch per round, every tenant

    assert await _subjects(admin_conn) == {"anna", "boris"}  # live, and expired within the window
    assert await _claim_audit(admin_conn, app_pool) == audit_before  # the audit trail is not pruned
    await cache.sync()
    assert _report(cache, at) == before
    async with tenant_tx(app_pool, demo.tenant_id, readonly=True) as tx:
        baseline, listed = await presence_store.list_claims(tx, demo.household_id)
    assert baseline is PresenceState.AWAY
    assert sorted(c.subject for c in listed) == ["anna", "boris"]


async def test_the_feed_prunes_on_its_own_schedule(app_pool: Pool, directory: Pool, demo: Demo,
                                                   admin_conn: Connection) -> None:
    await _expired_claim(app_pool, demo.tenant_id, demo.household_id, "old", expired_ago_s=120)
    await _expired_claim(app_pool, demo.tenant_id, demo.household_id, "new", expired_ago_s=1)
    async with PresenceFeed(app_pool, directory, prune_interval_s=0.05, prune_keep_s=60, prune_batch=10):
        await asyncio.sleep(0)
        subjects: set[str] = await _subjects(admin_conn)
        for _ in range(100):
            if subjects == {"new"}:
                break
            await asyncio.sleep(0.05)
            subjects = await _subjects(admin_conn)
        assert subjects == {"new"}


def test_a_prune_without_bounds_is_refused(app_pool: Pool) -> None:
    for bad in ({"prune_batch": 0}, {"prune_batch": 20_000}, {"prune_keep_s": -1}, {"prune_interval_s": 0.0}):
        with pytest.raises(ValueError):
            PresenceFeed(app_pool, app_pool, **bad)  # type: ignore[arg-type]
