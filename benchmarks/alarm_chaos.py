"""Signed alarms through two IIM instances sharing one PostgreSQL while a seeded schedule injects faults.

    python -m benchmarks.alarm_chaos [--alarms 1000] [--faults 200] [--seed 1] [--rate 4] [--duration S]

Jepsen-style (``benchmarks/_chaos/``): every alarm request is recorded as invoke/ok/fail/info; the faults
are PostgreSQL SIGSTOP/SIGCONT and immediate restarts, ESL resets (also right after an originate), SIGKILL
of an instance (at random, between claiming a call and sending it, right after sending it), SMSC drops
and restarts, vendor-cloud 500s and timeouts, an instance with speech down. After the run drains, the
checker reads the history, the database and the switch's call log. The last line is one JSON object:
``alarms``, ``acked``, ``faults``, ``lost``, ``duplicate_calls``, ``stuck``, ``hung_requests`` (and
``answered_hung_up``, ``unfinished``, the fault mix, the answers' statuses, durations, where the report
with every violation's timeline is). ``--workdir`` keeps the logs, the history and the report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path

from benchmarks._chaos.harness import ChaosConfig, run


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--alarms", type=int, default=1000)
    parser.add_argument("--faults", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate", type=float, default=4.0, help="alarms per second")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds the alarms' and faults' times are spread over (default alarms / rate)")
    parser.add_argument("--request-deadline", type=float, default=10.0, help="client deadline per request, s")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds the incidents may take to end")
    parser.add_argument("--pg-stop-max", type=float, default=12.0, help="longest PostgreSQL SIGSTOP, s")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs, history and report here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = ChaosConfig(alarms=args.alarms, faults=args.faults, seed=args.seed, rate=args.rate,
                      duration_s=args.duration, request_deadline_s=args.request_deadline, settle_s=args.settle,
                      pg_stop_max_s=args.pg_stop_max, workdir=args.workdir)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(cfg))
    else:
        result = uvloop.run(run(cfg))
    for v in result.verdict.violations[:20]:
        print(f"{v.kind}: alarm {v.alarm} incident {v.incident}: {v.detail}")
        for line in v.timeline:
            print("    " + line)
    print(json.dumps(result.summary()))


if __name__ == "__main__":
    main()
