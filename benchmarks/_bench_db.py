"""A PostgreSQL for benchmarks: ``IIM_BENCH_DATABASE_URL`` (superuser) or an embedded server kept
in ``.bench-data/`` (gitignored) so that seeding a million subscribers happens once, not every run."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import asyncpg

from policy_cache.bootstrap import Database, bootstrap
from policy_cache.seed import seed_synthetic

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".bench-data"


async def bench_database(subscribers: int) -> tuple[Database, float | None]:
    """A migrated database with at least ``subscribers`` synthetic subscribers; (db, seed seconds or None)."""
    url = os.environ.get("IIM_BENCH_DATABASE_URL")
    db = await bootstrap(database_url=url, data_dir=DATA / "pg", secrets_file=DATA / "db-secrets.json",
                         database="iim_bench", demo=False)
    conn = await asyncpg.connect(db.admin_url)
    try:
        have = int(await conn.fetchval("SELECT count(*) FROM iim.subscriber"))
        seeded: float | None = None
        if have < subscribers:
            started = time.perf_counter()
            await conn.execute("TRUNCATE iim.tenant CASCADE")
            await seed_synthetic(conn, tenants=4, subscribers=subscribers)
            seeded = time.perf_counter() - started
    finally:
        await conn.close()
    return db, seeded


def rss_bytes() -> int:
    """Resident set size now (not the peak), from /proc."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def machine() -> dict[str, object]:
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "implementation": platform.python_implementation()}
