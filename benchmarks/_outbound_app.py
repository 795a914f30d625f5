"""IIM's side of ``benchmarks.outbound_calls``: the outbound server routing every call by policy.

Runs the production call path (OutboundServer -> PolicyRouter -> PolicyCache.lookup ->
decide -> dial string -> execute) over N synthetic subscribers held in the real
PolicyCache (loaded from memory instead of PostgreSQL, so the benchmark measures the
call path, not the load). JSON logs at INFO go to /dev/null, as they would go to a
journal. Prints ``READY <port>`` and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Iterable

import uvloop

from fs_app.outbound import OutboundServer, OutboundSettings
from fs_app.passthrough import make_passthrough_handler
from fs_app.router import PolicyRouter
from iim.core.numbering import NumberingPlan
from iim.logs import JsonFormatter
from policy_cache.cache import ChangeFeed, PolicyCache
from policy_cache.snapshot import RoutingSnapshot, SpeakerDevice, compile_snapshot

NUMBER_BASE = 79_200_000_000


def synthetic_snapshots(count: int) -> list[RoutingSnapshot]:
    """Subscribers +7920000000k: a fork to the mobile and two SIP speakers, voicemail after."""
    out = []
    for k in range(count):
        speakers = (
            SpeakerDevice(f"dev-{k}-a", f"spk-{k}-a@iim.local", sip=True, cloud_announce=False, online=True),
            SpeakerDevice(f"dev-{k}-b", f"spk-{k}-b@iim.local", sip=True, cloud_announce=False, online=True),
        )
        out.append(compile_snapshot(
            subscriber_id=f"00000000-0000-4000-8000-{k:012d}", tenant_id="00000000-0000-4000-8000-00000000be00",
            msisdn=f"+{NUMBER_BASE + k}", aor=None, time_zone="Europe/Moscow", ring_mode="simultaneous",
            phone_timeout_s=20, home_timeout_s=25, quiet_start_min=None, quiet_end_min=None, dnd=False,
            allowed_callers=None, blocked_callers=None, presence="home", home_only_when_present=False,
            announce_consent=True, fallback="voicemail", speakers=speakers, policy_version=1))
    return out


class _MemoryStore:
    def __init__(self, snapshots: list[RoutingSnapshot]) -> None:
        self._snapshots = snapshots

    async def load_all(self) -> tuple[list[RoutingSnapshot], int]:
        return self._snapshots, 1

    async def load_subscribers(self, subscriber_ids: Iterable[str]) -> list[RoutingSnapshot]:
        return []

    async def changes_since(self, seq: int) -> tuple[set[str], int]:
        return set(), seq

    async def load_plans(self) -> dict[str, NumberingPlan]:
        return {}

    async def listen(self) -> ChangeFeed:
        raise NotImplementedError


async def serve(port: int, subscribers: int) -> None:
    handler = logging.StreamHandler(open("/dev/null", "w"))  # noqa: SIM115, ASYNC230 - once, at start
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    cache = PolicyCache(_MemoryStore(synthetic_snapshots(subscribers)))
    await cache.reload_all()
    passthrough = make_passthrough_handler("sofia/gateway/ims/{destination}")
    router = PolicyRouter(cache, passthrough)
    server = OutboundServer(router, OutboundSettings(port=port, backlog=4096), fallback=passthrough)
    await server.start()
    print(f"READY {server.port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.aclose(drain_timeout=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--subscribers", type=int, default=100_000)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.subscribers))
    sys.exit(0)


if __name__ == "__main__":
    main()
