"""Routing decision latency with a million subscribers loaded from PostgreSQL.

    python -m benchmarks.policy_lookup [--subscribers N] [--samples N]

Seeds N synthetic subscribers (once; kept in .bench-data/), loads them through the real
cache path (PgPolicyStore -> compiled snapshots -> indexes), then times, per sampled
call, what the call handler does before it writes the bridge: look the callee up,
``decide()``, and build the dial string. ``bytes_per_subscriber`` is the process's RSS
growth across the load divided by N (so it includes allocator slack: an upper bound).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import time
from datetime import UTC, datetime

from benchmarks._bench_db import bench_database, machine, rss_bytes
from fs_app.dialstring import DialSettings, bridge_dial_string
from fs_app.routing import CallFacts, decide
from policy_cache.cache import PolicyCache
from policy_cache.store import PgPolicyStore

MSISDN_BASE = 79_100_000_000


def _percentile(sorted_values: list[int], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] / 1000


async def main(subscribers: int, samples: int) -> dict[str, object]:
    db, seeded = await bench_database(subscribers)
    gc.collect()
    rss_before = rss_bytes()
    store = PgPolicyStore(db.cache_url, command_timeout=600)
    cache = PolicyCache(store)
    started = time.perf_counter()
    await cache.reload_all()
    load_s = time.perf_counter() - started
    gc.collect()
    rss_after = rss_bytes()
    await store.aclose()
    await db.aclose()

    loaded = len(cache)
    rng = random.Random(42)
    dial = DialSettings()
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    numbers = [f"+{MSISDN_BASE + rng.randrange(subscribers)}" for _ in range(samples)]
    latencies: list[int] = []
    ringing = 0
    gc.disable()  # measured as the call path runs: collections are counted separately below
    gc_before = sum(s["collections"] for s in gc.get_stats())
    try:
        for number in numbers:
            t0 = time.perf_counter_ns()
            snapshot = cache.lookup(number)
            assert snapshot is not None
            decision = decide(snapshot, CallFacts(number, "+79160000000", "bench"), now)
            if decision.action == "ring":
                bridge_dial_string(decision, dial)
                ringing += 1
            latencies.append(time.perf_counter_ns() - t0)
    finally:
        gc.enable()
    latencies.sort()
    return {
        "subscribers": loaded,
        "p50_us": round(_percentile(latencies, 0.50), 2),
        "p99_us": round(_percentile(latencies, 0.99), 2),
        "p999_us": round(_percentile(latencies, 0.999), 2),
        "max_us": round(latencies[-1] / 1000, 2),
        "load_s": round(load_s, 2),
        "bytes_per_subscriber": round((rss_after - rss_before) / max(1, loaded)),
        "samples": samples,
        "ringing_decisions": ringing,
        "seed_s": None if seeded is None else round(seeded, 1),
        "gc_collections_during_samples": sum(s["collections"] for s in gc.get_stats()) - gc_before,
        "machine": machine(),
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=200_000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.subscribers, args.samples))))


if __name__ == "__main__":
    cli()
