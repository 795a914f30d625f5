"""From a signed device event to the alert call leaving for FreeSWITCH: latency, losses, duplicates.

    python -m benchmarks.event_to_originate [--rate 200] [--duration 60] [--drain 30] [--warmup 5]

IIM runs as a real ``iim serve`` process (HTTPS device bridge, PostgreSQL intake with its pgqueuer job,
the scenario worker, originate over inbound ESL). This process is the outside world: it posts
Standard-Webhooks-signed smoke alarms over HTTPS at a fixed rate (open loop, keep-alive connections),
and hosts the FreeSWITCH emulator whose inbound socket receives the ``bgapi originate``. Prompts are
left to FreeSWITCH's TTS (``IIM_ALERT_PROMPT_TTS=freeswitch``, as on a separate media host): rendering a
unique prompt per call with espeak-ng on this 2-core machine would be measured instead of the alarm path. Every event
comes from its own device (its own household and owner), so every accepted event must yield exactly
one originate; the emulator answers and the owner presses 1 (alarm confirmed), which ends the incident.

A warm-up of ``--warmup`` seconds at the same rate, from other devices, comes first and is reported
apart (``warmup_*``): the measured minute is a running IIM's, whose pooled backends have their plans and
caches; ``--warmup 0`` measures from a cold start. During the measured minute this process's cyclic
collector is off (after a full collection and a freeze; on again after): its pauses, tens of ms as the
bookkeeping of 12,000 alarms grows, would otherwise be read as alarm latency.

Latency: from just before the POST is written to the originate arriving at the emulator, both on this
process's monotonic clock. ``lost``: accepted events with no originate by the end of the drain.
``duplicated``: originates beyond the first per event. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from benchmarks._bench_db import DATA, machine
from fs_app.testing import FreeSwitchEmulator, TargetBehaviour
from fs_app.testing.spec import OriginateRecord
from iim.core.signing import sign_webhook
from policy_cache.bootstrap import Database, bootstrap, with_url

ROOT = Path(__file__).resolve().parents[1]
ESL_PASSWORD = "bench-esl-secret"  # noqa: S105 - the emulator's Event Socket password, for this run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_cpu_seconds(data_dir: Path) -> float | None:
    """CPU of the embedded PostgreSQL: its postmaster (with the backends it has reaped) and every live child
    (backends, WAL writer, autovacuum...), from /proc. None when the database is not ours to measure."""
    try:
        postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == postmaster:
            total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        elif ppid == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """CPU time spent by every process on the machine (all cores), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _histogram(text: str, name: str) -> dict[str, float]:
    """count and sum of a Prometheus histogram, and the share of observations above 50 ms."""
    values = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    count = values.get(f"{name}_count", 0.0)
    under = values.get(f'{name}_bucket{{le="0.05"}}', 0.0)
    return {"samples": count, "mean_ms": round(values.get(f"{name}_sum", 0.0) / count * 1e3, 1) if count else 0.0,
            "over_50ms": round((count - under) / count, 3) if count else 0.0}


_PG_WORK = """SELECT d.xact_commit AS commits, d.tup_inserted + d.tup_updated + d.tup_deleted AS rows_written,
                     d.tup_returned AS rows_read, d.tup_fetched AS rows_fetched, d.blks_hit + d.blks_read AS blocks,
                     w.wal_bytes, w.wal_fpi AS wal_full_pages
                FROM pg_stat_database d, pg_stat_wal w WHERE d.datname = current_database()"""


async def _pg_work(admin_url: str) -> dict[str, int]:
    """The database's cumulative work counters: unlike CPU time, they do not move with this VM's core speed.
    The WAL counters are the server's (every database): the benchmark's is the only one at work."""
    conn = await asyncpg.connect(admin_url)
    try:
        row = await conn.fetchrow(_PG_WORK)
    finally:
        await conn.close()
    assert row is not None
    return {k: int(v) for k, v in row.items()}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _seed(admin_url: str, devices: int, secret_file: Path) -> uuid.UUID:
    """A fresh tenant with ``devices`` households, each with an owner and a signed smoke sensor."""
    tenant = uuid.uuid4()
    conn = await asyncpg.connect(admin_url)
    try:
        # Jobs left by an earlier run must not compete with this one.
        await conn.execute("DELETE FROM iim_jobs.pgqueuer")
        async with conn.transaction():
            t = str(tenant)
            await conn.execute("INSERT INTO iim.tenant (id, name) VALUES ($1, 'bench-e2o')", tenant)
            ref = await conn.fetchval(
                "INSERT INTO iim.credential_ref (tenant_id, name, kind, ref) VALUES ($1, 'bench-hmac', "
                "'webhook_secret', $2) RETURNING id", tenant, f"file:{secret_file}")
            await conn.execute("""
                INSERT INTO iim.household (tenant_id, id, name, time_zone, presence)
                SELECT $1, md5($2 || 'h' || i)::uuid, 'bench ' || i, 'Europe/Moscow', 'away'
                  FROM generate_series(1, $3) i""", tenant, t, devices)
            await conn.execute("""
                INSERT INTO iim.subscriber (tenant_id, id, msisdn)
                SELECT $1, md5($2 || 's' || i)::uuid, '+7960' || lpad(i::text, 7, '0')
                  FROM generate_series(1, $3) i""", tenant, t, devices)
            await conn.execute("""
                INSERT INTO iim.device (tenant_id, id, household_id, name, type, external_id, credential_ref_id,
                                        status)
                SELECT $1, md5($2 || 'd' || i)::uuid, md5($2 || 'h' || i)::uuid, 'smoke ' || i, 'sensor',
                       'e2o-' || i, $4, 'online'
                  FROM generate_series(1, $3) i""", tenant, t, devices, ref)
            await conn.execute("""
                INSERT INTO iim.binding (tenant_id, subscriber_id, household_id, role, priority)
                SELECT $1, md5($2 || 's' || i)::uuid, md5($2 || 'h' || i)::uuid, 'owner', 10
                  FROM generate_series(1, $3) i""", tenant, t, devices)
            await conn.execute("INSERT INTO iim.originate_limit (tenant_id, max_concurrent, max_per_hour) "
                               "VALUES ($1, 10000, 1000000)", tenant)
        # As after any bulk import into a newly migrated database: planner statistics that know the new rows,
        # and the catalogs the migrations churned vacuumed (autovacuum would get to both within its first
        # minute, in the middle of the run).
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return tenant


def _start_iim(db: Any, fs_port: int, esl_port: int, bridge_port: int, http_port: int,
               log: Path) -> subprocess.Popen[bytes]:
    env = os.environ | {
        "IIM_APP_DATABASE_URL": db.app_url, "IIM_CACHE_DATABASE_URL": db.cache_url,
        "IIM_FS_NODES": json.dumps([{"host": "127.0.0.1", "port": fs_port}]), "IIM_FS_PASSWORD": ESL_PASSWORD,
        "IIM_ESL_PORT": str(esl_port), "IIM_HTTP_PORT": str(http_port), "IIM_BRIDGE_PORT": str(bridge_port),
        "IIM_BRIDGE_SOURCE_RATE": "100000", "IIM_BRIDGE_SOURCE_BURST": "100000",
        "IIM_BRIDGE_TENANT_RATE": "100000", "IIM_BRIDGE_TENANT_BURST": "100000",
        "IIM_LOG_LEVEL": "WARNING", "IIM_ALERT_PROMPT_TTS": os.environ.get("IIM_ALERT_PROMPT_TTS", "freeswitch"), "IIM_DATA_DIR": str(DATA / "e2o-iim" / "pg"),
    }
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "iim", "serve"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


async def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("iim exited:\n" + _tail(log))
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
        else:
            writer.close()
            return


async def _fresh_database() -> Database:
    """The embedded server's benchmark database, dropped and migrated anew: each run starts from the same
    empty store (the audit log is append-only; earlier runs' rows would keep autovacuum busy during this
    one). A database given by ``IIM_BENCH_DATABASE_URL`` is used as it is."""
    url = os.environ.get("IIM_BENCH_DATABASE_URL")
    db = await bootstrap(database_url=url, data_dir=DATA / "pg", secrets_file=DATA / "db-secrets.json",
                         database="iim_e2o", demo=False)
    if url is not None:
        return db
    maint = await asyncpg.connect(with_url(db.admin_url, database="postgres"))
    try:
        await maint.execute("DROP DATABASE iim_e2o WITH (FORCE)")
    finally:
        await maint.close()
    return await bootstrap(database_url=url, data_dir=DATA / "pg", secrets_file=DATA / "db-secrets.json",
                           database="iim_e2o", demo=False)


async def run(rate: float, duration: float, drain: float, trace: Path | None = None,
              warmup: float = 5.0) -> dict[str, Any]:
    DATA.mkdir(exist_ok=True)
    db = await _fresh_database()
    events = int(rate * duration)
    warm_events = int(rate * warmup)
    secret = secrets.token_bytes(32)
    secret_file = DATA / "e2o.whsec"
    secret_file.write_text("whsec_" + base64.b64encode(secret).decode())
    secret_file.chmod(0o600)
    tenant = await _seed(db.admin_url, events + warm_events, secret_file)

    # The prompts are FreeSWITCH's say: (IIM_ALERT_PROMPT_TTS=freeswitch): a switch that loads mod_flite.
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.answer(after_ms=0, dtmf="1"), tts_engines=("flite",))
    arrived: dict[str, list[float]] = {}
    awaited: set[str] = set()
    all_arrived = asyncio.Event()

    def on_originate(record: OriginateRecord) -> None:
        event_id = record.variables.get("iim_event_id", "?")
        arrived.setdefault(event_id, []).append(time.monotonic())
        awaited.discard(event_id)
        if not awaited:
            all_arrived.set()

    emu.originate_listeners.append(on_originate)
    inbound = await emu.start_inbound(password=ESL_PASSWORD)
    esl_port, bridge_port, http_port = _free_port(), _free_port(), _free_port()
    log = DATA / "e2o-iim.log"
    proc = _start_iim(db, inbound.port, esl_port, bridge_port, http_port, log)
    loop_lag: dict[str, float] = {}
    sent: dict[str, float] = {}
    answered: list[float] = []
    accept_ms: dict[str, float] = {}
    iim_cpu_s = machine_cpu_s = self_cpu_s = 0.0
    pg_cpu_s: float | None = None
    statuses: dict[int, int] = {}
    work_before: dict[str, int] = {}
    warm_sent: dict[str, float] = {}
    warm_statuses: dict[int, int] = {}
    try:
        await _wait_port(bridge_port, proc, log)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        connector = aiohttp.TCPConnector(ssl=ctx, limit=64)
        async with aiohttp.ClientSession(connector=connector) as session:
            url = f"https://127.0.0.1:{bridge_port}/v1/events"

            async def post(event_id: str, device: int, sent_at: dict[str, float],
                           counts: dict[int, int]) -> None:
                body = json.dumps({"event_id": event_id, "device_id": f"e2o-{device}", "type": "smoke",
                                   "occurred_at": "2026-11-25T10:00:00+03:00", "payload": {"ppm": 400}}).encode()
                ts = int(time.time())
                msg_id = f"msg_{event_id}"
                headers = {"Content-Type": "application/json", "IIM-Tenant": str(tenant),
                           "IIM-Device": f"e2o-{device}", "webhook-id": msg_id, "webhook-timestamp": str(ts),
                           "webhook-signature": sign_webhook(msg_id, ts, body, secret)}
                sent_at[event_id] = time.monotonic()
                awaited.add(event_id)
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        answered.append((time.monotonic() - sent_at[event_id]) * 1e3)
                        accept_ms[event_id] = answered[-1]
                        counts[resp.status] = counts.get(resp.status, 0) + 1
                        if resp.status != 202:
                            sent_at.pop(event_id, None)
                            awaited.discard(event_id)
                except aiohttp.ClientError:
                    counts[0] = counts.get(0, 0) + 1
                    sent_at.pop(event_id, None)
                    awaited.discard(event_id)

            async def offer(ids: list[tuple[str, int]], sent_at: dict[str, float],
                            counts: dict[int, int]) -> float:
                """Open loop at ``rate``; returns the seconds it took to offer them all."""
                started = time.monotonic()
                tasks = []
                for n, (event_id, device) in enumerate(ids):
                    delay = started + n / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(post(event_id, device, sent_at, counts)))
                offered = time.monotonic() - started
                await asyncio.gather(*tasks)
                # Set whenever the originates caught up with the posts so far; from here only by the last.
                all_arrived.clear()
                if not awaited:
                    all_arrived.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(all_arrived.wait(), drain)
                return offered

            # The 64 keep-alive TLS connections are opened before the clock starts, as a gateway holding
            # its connections would have them (their handshakes are not the alarm path).
            async def connect(_: int) -> None:
                async with session.get(f"https://127.0.0.1:{bridge_port}/openapi.json") as resp:
                    await resp.read()

            await asyncio.gather(*(connect(n) for n in range(64)))
            # Warm-up, not measured: a running IIM has its pooled backends' plans and caches, and the
            # ledger's first rows; a cold start is reported apart (``warmup_*``).
            if warm_events:
                await offer([(f"e2o-{tenant.hex[:8]}-w{i}", events + i + 1) for i in range(warm_events)],
                            warm_sent, warm_statuses)
                answered.clear()
                accept_ms.clear()
            work_before = await _pg_work(db.admin_url)
            cpu_before = _cpu_seconds(proc.pid)
            machine_before, self_before = _machine_busy_seconds(), time.process_time()
            pg_before = None if os.environ.get("IIM_BENCH_DATABASE_URL") else _server_cpu_seconds(DATA / "pg")
            # This process is the measuring instrument: its own collector pauses (tens of ms as the
            # bookkeeping of 12,000 alarms grows) would be read as alarm latency.
            gc.collect()
            gc.freeze()
            gc.disable()
            try:
                offered_s = await offer([(f"e2o-{tenant.hex[:8]}-{i}", i + 1) for i in range(events)], sent,
                                        statuses)
            finally:
                gc.enable()
            iim_cpu_s = _cpu_seconds(proc.pid) - cpu_before
            machine_cpu_s = _machine_busy_seconds() - machine_before
            self_cpu_s = time.process_time() - self_before
            pg_after = _server_cpu_seconds(DATA / "pg") if pg_before is not None else None
            pg_cpu_s = pg_after - pg_before if pg_after is not None and pg_before is not None else None
            async with session.get(f"http://127.0.0.1:{http_port}/metrics") as resp:
                loop_lag = _histogram(await resp.text(), "iim_event_loop_lag_seconds")
    finally:
        # Waited for off the event loop: IIM's graceful stop hangs up through the emulator this loop runs.
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.wait, 20)
        if proc.poll() is None:
            proc.kill()
        await emu.close()
    # After IIM exited: its backends report their counters as they end.
    work_after = await _pg_work(db.admin_url) if work_before else {}
    pg_work = {k: round((work_after[k] - work_before[k]) / max(1, len(sent)), 1) for k in work_after}

    latencies = [(arrived[e][0] - t) * 1e3 for e, t in sent.items() if e in arrived]
    if trace is not None:
        first = min(sent.values(), default=0.0)
        with trace.open("w") as fh:
            for e, t in sorted(sent.items(), key=lambda item: item[1]):
                fh.write(json.dumps({"event_id": e, "sent_s": round(t - first, 4), "accept_ms": accept_ms.get(e),
                                     "originate_ms": round((arrived[e][0] - t) * 1e3, 2) if e in arrived else None})
                         + "\n")
    lost = sum(1 for e in sent if e not in arrived)
    duplicated = sum(len(v) - 1 for e, v in arrived.items() if e in sent)
    warm: dict[str, Any] = {}
    if warm_events:
        warm_ms = [(arrived[e][0] - t) * 1e3 for e, t in warm_sent.items() if e in arrived]
        warm = {"warmup_events": warm_events, "warmup_statuses": {str(k): v for k, v in sorted(warm_statuses.items())},
                "warmup_p50_ms": round(_percentile(warm_ms, 0.5), 1),
                "warmup_p99_ms": round(_percentile(warm_ms, 0.99), 1),
                "warmup_lost": sum(1 for e in warm_sent if e not in arrived),
                "warmup_duplicated": sum(len(arrived[e]) - 1 for e in warm_sent if e in arrived)}
    return {
        "rate": rate, "duration_s": duration, "offered_rate": round(events / offered_s, 1), "events": events,
        "accepted": len(sent), "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "p50_ms": round(_percentile(latencies, 0.50), 1), "p90_ms": round(_percentile(latencies, 0.90), 1),
        "p99_ms": round(_percentile(latencies, 0.99), 1), "max_ms": round(max(latencies, default=float("nan")), 1),
        "lost": lost, "duplicated": duplicated, "accept_p50_ms": round(_percentile(answered, 0.5), 1),
        "accept_p99_ms": round(_percentile(answered, 0.99), 1), **warm,
        "iim_loop_lag": loop_lag, "iim_cpu_ms_per_event": round(iim_cpu_s / max(1, len(sent)) * 1e3, 2),
        "load_and_emulator_cpu_ms_per_event": round(self_cpu_s / max(1, len(sent)) * 1e3, 2),
        "postgres_cpu_ms_per_event": round(pg_cpu_s / max(1, len(sent)) * 1e3, 2) if pg_cpu_s is not None else None,
        "machine_cpu_ms_per_event": round(machine_cpu_s / max(1, len(sent)) * 1e3, 2),
        "postgres_work_per_event": pg_work, "machine": machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="events per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of sustained load")
    parser.add_argument("--drain", type=float, default=30.0, help="seconds to wait for the last originates")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds of unmeasured load first, from other devices (0: measure from a cold start)")
    parser.add_argument("--trace", type=Path, help="write one JSON line per event (send time, accept, originate)")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run(args.rate, args.duration, args.drain, args.trace, args.warmup))))


if __name__ == "__main__":
    main()
