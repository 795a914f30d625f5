"""Commit-to-served latency of the policy cache: a policy row changes in PostgreSQL, how long until
calls are routed by the new version?

    python -m benchmarks.cache_sync [--subscribers N] [--changes N] [--gap-ms MS]

The cache is loaded with N synthetic subscribers (seeded once into .bench-data/) and follows
changes as in production (LISTEN iim_policy + change sequence). Each change flips ``dnd`` on a
household policy through the registry (app role, RLS, audit row, change_log trigger, NOTIFY);
the clock starts when COMMIT returns and stops when the cache has swapped in the snapshot of a
member of that household (the cache's ``on_applied`` hook, checked with ``lookup``).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import asyncpg

from benchmarks._bench_db import bench_database, machine
from policy_cache import registry
from policy_cache.cache import PolicyCache
from policy_cache.db import DbRole, connect_pool, tenant_tx
from policy_cache.models import PolicyUpdate
from policy_cache.store import PgPolicyStore


async def main(subscribers: int, changes: int, gap_ms: float) -> dict[str, object]:
    db, _ = await bench_database(subscribers)
    admin = await asyncpg.connect(db.admin_url)
    targets = await admin.fetch(
        """SELECT p.tenant_id, p.id AS policy_id, p.dnd, s.id AS subscriber_id, s.msisdn
           FROM iim.policy p
           JOIN LATERAL (SELECT b.subscriber_id FROM iim.binding b
                         WHERE b.tenant_id = p.tenant_id AND b.household_id = p.household_id
                           AND b.role = 'owner' LIMIT 1) o ON true
           JOIN iim.subscriber s ON s.tenant_id = p.tenant_id AND s.id = o.subscriber_id
           WHERE p.household_id IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM iim.policy sp WHERE sp.tenant_id = p.tenant_id
                             AND sp.subscriber_id = s.id)
           ORDER BY random() LIMIT $1""", changes)
    await admin.close()
    store = PgPolicyStore(db.cache_url, command_timeout=600)
    cache = PolicyCache(store)
    load_started = time.perf_counter()
    await cache.start(timeout=600)
    load_s = time.perf_counter() - load_started
    pool = await connect_pool(db.app_url, role=DbRole.APP, min_size=1, max_size=2)

    waiting: dict[str, asyncio.Future[float]] = {}

    def applied(changed: set[str]) -> None:
        now = time.perf_counter()
        for subscriber_id in changed:
            fut = waiting.get(subscriber_id)
            if fut is not None and not fut.done():
                fut.set_result(now)

    cache.on_applied = applied
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    try:
        for row in targets:
            subscriber_id = str(row["subscriber_id"])
            want = not (cache.lookup(row["msisdn"]).dnd)  # type: ignore[union-attr]
            fut: asyncio.Future[float] = loop.create_future()
            waiting[subscriber_id] = fut
            async with tenant_tx(pool, row["tenant_id"]) as tx:
                await registry.update(tx, registry.POLICY, row["policy_id"], PolicyUpdate(dnd=want), actor="bench")
            committed = time.perf_counter()
            served = await asyncio.wait_for(fut, 30)
            snapshot = cache.lookup(row["msisdn"])
            assert snapshot is not None
            assert snapshot.dnd is want, "the cache reported the change but serves the old policy"
            latencies.append((served - committed) * 1000)
            del waiting[subscriber_id]
            await asyncio.sleep(gap_ms / 1000)
    finally:
        await pool.close()
        await cache.aclose()
        await store.aclose()
        await db.aclose()
    latencies.sort()

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2)

    return {"p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": round(latencies[-1], 2), "changes": len(latencies),
            "subscribers": len(cache), "load_s": round(load_s, 2), "machine": machine()}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--changes", type=int, default=300)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.subscribers, args.changes, args.gap_ms))))


if __name__ == "__main__":
    cli()
