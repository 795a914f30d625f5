"""Outbound-socket call handling: calls per second and call-setup latency of IIM's call path.

    python -m benchmarks.outbound_calls [--rate-calls N] [--max-calls N] [--subscribers N]

IIM runs in its own process pinned to one core (benchmarks._outbound_app: OutboundServer +
PolicyRouter making the real decision on every call). One call is placed by the FreeSWITCH
emulator and captured; a load generator pinned to the other core then replays it
(benchmarks._script_dialer): connect -> channel data, linger, myevents, the router's
multiset + bridge executed to completion with the emulator's events (~16 frames), hangup,
linger notice, exit. Latency is measured by the FreeSWITCH side, from its TCP connect to the
bridge ``sendmsg`` arriving. Two runs: closed loop (max calls/s) and open loop at
1,000 calls/s. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._bench_db import machine
from benchmarks._script_dialer import capture

ROOT = Path(__file__).resolve().parents[1]


def _pinned(core: int, argv: list[str]) -> list[str]:
    return (["taskset", "-c", str(core)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []) + argv


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _dial(script: str, port: int, count: int, *, rate: float | None, concurrency: int) -> dict[str, object]:
    argv = [sys.executable, "-m", "benchmarks._script_dialer", "--script", script, "--port", str(port),
            "--count", str(count), "--concurrency", str(concurrency)]
    if rate is not None:
        argv += ["--rate", str(rate)]
    out = subprocess.run(_pinned(1, argv), cwd=ROOT, capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(rate_calls: int, max_calls: int, subscribers: int, event_limit: int) -> dict[str, object]:
    app = subprocess.Popen(_pinned(0, [sys.executable, "-m", "benchmarks._outbound_app", "--subscribers",
                                       str(subscribers)]), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout is not None
        ready = app.stdout.readline().split()
        if ready[:1] != ["READY"]:
            raise RuntimeError(f"app did not start: {ready}")
        port = int(ready[1])
        script = asyncio.run(capture(port, "79200000000"))
        full_bytes = sum(len(b) for _, b in script.steps)
        if event_limit:
            script = script.leaned(event_limit)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            fh.write(script.to_json())
            script_path = fh.name
        _dial(script_path, port, 2000, rate=None, concurrency=50)  # warm-up
        cpu0 = _cpu_seconds(app.pid)
        saturated = _dial(script_path, port, max_calls, rate=None, concurrency=100)
        cpu1 = _cpu_seconds(app.pid)
        steady = _dial(script_path, port, rate_calls, rate=1000, concurrency=2000)
        os.unlink(script_path)
    finally:
        app.terminate()
        app.wait(timeout=10)
    calls = int(saturated["completed"]) + int(steady["completed"])  # type: ignore[call-overload]
    failed = int(saturated["failed"]) + int(steady["failed"])  # type: ignore[call-overload]
    return {
        "max_calls_per_s": saturated["calls_per_s"],
        "p99_ms_at_1000cps": steady["p99_ms"],
        "p50_ms_at_1000cps": steady["p50_ms"],
        "p999_ms_at_1000cps": steady["p999_ms"],
        "achieved_cps_in_rate_run": steady["calls_per_s"],
        "app_cpu_ms_per_call": round((cpu1 - cpu0) * 1000 / max(1, int(saturated["completed"])), 3),  # type: ignore[call-overload]
        "calls": calls,
        "failed": failed,
        "errors": {"saturated": saturated["errors"], "steady": steady["errors"]},
        "bytes_per_call_from_freeswitch": sum(len(b) for _, b in script.steps),
        "bytes_per_call_full_variables": full_bytes,
        "event_bytes_limit": event_limit or None,
        "subscribers": subscribers,
        "machine": machine(),
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate-calls", type=int, default=60_000, help="calls in the 1,000 calls/s run")
    parser.add_argument("--max-calls", type=int, default=50_000, help="calls in the closed-loop run")
    parser.add_argument("--subscribers", type=int, default=100_000)
    parser.add_argument("--event-bytes", type=int, default=2560,
                        help="trim channel variables so each event fits (0: events as the emulator sends them)")
    args = parser.parse_args()
    print(json.dumps(main(args.rate_calls, args.max_calls, args.subscribers, args.event_bytes)))


if __name__ == "__main__":
    cli()
