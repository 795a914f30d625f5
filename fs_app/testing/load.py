"""Open-loop load generation: place outbound-socket calls at a fixed rate and measure them.

Calls are started on schedule (``t0 + i / rate``) whether or not earlier calls have
finished - an open loop, so a slow application shows up as growing latency and
failures instead of silently lowering the offered rate. A call that would exceed
``concurrency`` calls in flight is not started and counts as ``rejected``.

The latency per call is *TCP connection established -> bridge ``sendmsg`` received*:
the application's routing time as FreeSWITCH would see it.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections import Counter
from dataclasses import dataclass, field, replace

from fs_app.testing.emulator import FreeSwitchEmulator
from fs_app.testing.spec import CallResult, CallSpec, TargetBehaviour

DEFAULT_TARGET = "sofia/gateway/ims/79001234567"


@dataclass(frozen=True, slots=True)
class LoadProfile:
    """What to offer: ``count`` calls at ``rate`` calls/s, at most ``concurrency`` in flight.

    ``batch_writes`` coalesces everything the emulator writes to one socket during one
    event-loop turn into a single ``send()`` (FaultConfig.coalesce): the byte stream is
    identical, only the read boundaries the application sees differ - as on a busy
    FreeSWITCH, whose two sends per event reach a slow reader as one chunk. It saves
    most of the emulator's syscalls; set it False to load-test FreeSWITCH's exact pattern.
    """

    rate: float = 1000.0
    count: int = 10_000
    concurrency: int = 10_000
    spec: CallSpec = field(default_factory=lambda: CallSpec(destination="79001234567",
                                                            caller_id_number="79007654321"))
    require_bridge: bool = True
    batch_writes: bool = True


@dataclass(slots=True)
class LoadReport:
    """Per-call latencies (ms) and failures of one load run."""

    offered: int = 0
    completed: int = 0
    rejected: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    disconnects: Counter[str] = field(default_factory=Counter)
    duration_s: float = 0.0
    schedule_lag_ms: float = 0.0

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def calls_per_second(self) -> float:
        return self.completed / self.duration_s if self.duration_s > 0 else 0.0

    def percentile(self, pct: float) -> float:
        """Nearest-rank percentile of the latencies (NaN when there are none)."""
        if not self.latencies_ms:
            return math.nan
        ordered = sorted(self.latencies_ms)
        rank = max(0, min(len(ordered) - 1, math.ceil(pct / 100.0 * len(ordered)) - 1))
        return ordered[rank]

    def summary(self) -> dict[str, float | int | dict[str, int]]:
        return {
            "offered": self.offered,
            "completed": self.completed,
            "failed": self.failed,
            "rejected": self.rejected,
            "duration_s": round(self.duration_s, 3),
            "calls_per_s": round(self.calls_per_second, 1),
            "p50_ms": round(self.percentile(50), 3),
            "p99_ms": round(self.percentile(99), 3),
            "p999_ms": round(self.percentile(99.9), 3),
            "max_ms": round(max(self.latencies_ms), 3) if self.latencies_ms else math.nan,
            "max_schedule_lag_ms": round(self.schedule_lag_ms, 3),
            "failures": dict(self.failures),
            "disconnects": dict(self.disconnects),
        }


def _classify(result: CallResult, require_bridge: bool) -> str | None:
    if result.error is not None:
        return result.error.split(":", 1)[0]
    if require_bridge and result.bridge_command_at is None:
        return "no bridge command"
    if result.disconnect in ("reset", "killed", "stalled", "timeout", "first-command-timeout", "connect-failed"):
        return f"disconnect {result.disconnect}"
    return None


async def run_profile(
    host: str, port: int, profile: LoadProfile, emulator: FreeSwitchEmulator | None = None
) -> LoadReport:
    """Run one open-loop load profile against the application at ``host:port``."""
    emu = emulator or FreeSwitchEmulator(default_target=TargetBehaviour.answer(after_ms=0, hangup_after_ms=0),
                                         park_delay_ms=20.0)
    spec = profile.spec
    if profile.batch_writes and spec.faults is None:
        spec = replace(spec, faults=replace(emu.faults, coalesce=True))
    report = LoadReport()
    # Long-lived objects (code, templates, the emulator) need not be traversed by every collection.
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    in_flight: set[asyncio.Task[None]] = set()
    all_done = asyncio.Event()
    started = 0

    async def one() -> None:
        try:
            result = await emu.place_call(host, port, spec)
        except Exception as exc:  # noqa: BLE001 - a load run reports every failure, it never aborts
            report.failures[f"exception {type(exc).__name__}"] += 1
            return
        report.disconnects[result.disconnect or "none"] += 1
        problem = _classify(result, profile.require_bridge)
        if problem is not None:
            report.failures[problem] += 1
            return
        report.completed += 1
        if result.connected_at is not None and result.bridge_command_at is not None:
            report.latencies_ms.append((result.bridge_command_at - result.connected_at) * 1000.0)

    def finished(task: asyncio.Task[None]) -> None:
        in_flight.discard(task)
        if started >= profile.count and not in_flight:
            all_done.set()

    t0 = loop.time()
    wall0 = time.monotonic()
    interval = 1.0 / profile.rate
    while started < profile.count:
        now = loop.time()
        due = min(profile.count, int((now - t0) * profile.rate) + 1)
        if due > started:
            report.schedule_lag_ms = max(report.schedule_lag_ms, (now - (t0 + started * interval)) * 1000.0)
        while started < due:
            started += 1
            report.offered += 1
            if len(in_flight) >= profile.concurrency:
                report.rejected += 1
                continue
            task = loop.create_task(one())
            in_flight.add(task)
            task.add_done_callback(finished)
        if started < profile.count:
            await asyncio.sleep(max(0.0, t0 + started * interval - loop.time()))
    if in_flight:
        await all_done.wait()
    report.duration_s = time.monotonic() - wall0
    gc.unfreeze()
    return report


async def run_load(
    host: str,
    port: int,
    rate: float,
    count: int,
    concurrency: int = 10_000,
    *,
    spec: CallSpec | None = None,
    emulator: FreeSwitchEmulator | None = None,
    batch_writes: bool = True,
) -> LoadReport:
    """Open-loop load: ``count`` calls at ``rate`` calls/s (each: connect .. bridge .. teardown)."""
    profile = LoadProfile(rate=rate, count=count, concurrency=concurrency,
                          spec=spec or LoadProfile().spec, batch_writes=batch_writes)
    return await run_profile(host, port, profile, emulator)
