"""The device watchdog: supervised devices silent past their heartbeat interval (plus a grace) are marked offline,
and each one's "offline" incident is opened through the scenario engine's normal path.

No timer per device: each device's next due time is a column (``iim.device_health.silent_after``, moved on by
every event the bridge accepts), and a scan is one indexed query for every tenant's devices that are due, then a
short transaction per device found. The scan and each transaction run under a deadline; the loop is supervised
(it starts again if it dies) and a failing scan is retried at the next interval. Several IIM instances may scan at
once: marking re-checks the device under its row lock, and the live-incident index keeps one incident per device
and condition. Time is the worker's clock (``WatchdogSettings.clock``), so tests can move it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

from prometheus_client import Counter

from iim.core.errors import STORE_UNAVAILABLE
from iim.core.lifecycle import AsyncResource, TaskSupervisor
from iim.core.metrics import REGISTRY
from iim.supervision import store
from iot_bridge.intake import IncidentOpener, enqueue_tick
from policy_cache.db import Pool, tenant_tx

__all__ = ["ACTOR", "DeviceWatchdog", "WatchdogSettings", "silence_cutoff"]

log = logging.getLogger(__name__)

#: The audit actor of what the watchdog does.
ACTOR = "device-watchdog"

MARKED_OFFLINE = Counter("iim_devices_marked_offline", "Supervised devices found silent past their heartbeat "
                         "interval and grace, marked offline (each opens or joins its offline incident)",
                         registry=REGISTRY)
SCANS = Counter("iim_device_watchdog_scans", "Device watchdog scans, by outcome (ok, store_unavailable, "
                "timeout)", ["outcome"], registry=REGISTRY)


@dataclass(frozen=True)
class WatchdogSettings:
    #: a device is silent this long past its interval before it is offline (a late heartbeat is not an incident)
    grace_s: float = 120.0
    #: how often the watchdog looks for silent devices
    scan_interval_s: float = 15.0
    #: the scan's query, and each device's transaction, must finish within this
    deadline_s: float = 5.0
    #: at most this many devices per scan (the rest at the next one, oldest first)
    batch: int = 500
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))


def silence_cutoff(now: datetime, grace_s: float) -> datetime:
    """A device due (last heard + its interval) at or before this is silent at ``now``."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now - timedelta(seconds=grace_s)


class DeviceWatchdog(AsyncResource):
    """``opener`` (the scenario worker's ``begin_in``) starts an opened incident in the marking transaction;
    without one (or if it fails) a tick job is queued for whichever worker runs."""

    def __init__(self, pool: Pool, settings: WatchdogSettings | None = None, *,
                 opener: IncidentOpener | None = None) -> None:
        self.pool = pool
        self.settings = settings or WatchdogSettings()
        self.opener = opener
        self._tasks = TaskSupervisor()
        self._closing = False

    async def start(self) -> None:
        self._tasks.supervise(self._scan_forever, name="device-watchdog", initial=0.5, ceiling=10.0,
                              until=lambda: self._closing)

    async def aclose(self) -> None:
        self._closing = True
        await self._tasks.aclose()

    async def _scan_forever(self) -> None:
        while True:
            outcome = "ok"
            try:
                await self.scan()
            except TimeoutError:  # before STORE_UNAVAILABLE, which holds it too: a stall, not a refusal
                outcome = "timeout"
                log.warning("device watchdog: no answer within %.1f s; scanning again in %.0f s",
                            self.settings.deadline_s, self.settings.scan_interval_s)
            except STORE_UNAVAILABLE as exc:
                outcome = "store_unavailable"
                log.warning("device watchdog: store unavailable (%s); scanning again in %.0f s",
                            type(exc).__name__, self.settings.scan_interval_s)
            SCANS.labels(outcome).inc()
            await asyncio.sleep(self.settings.scan_interval_s)

    async def scan(self) -> list[UUID]:
        """One scan: mark every device found silent; returns the incidents opened (not those joined)."""
        now = self.settings.clock()
        cutoff = silence_cutoff(now, self.settings.grace_s)
        async with asyncio.timeout(self.settings.deadline_s):
            found = await store.silent_devices(self.pool, cutoff, self.settings.batch)
        opened: list[UUID] = []
        for tenant_id, device_id in found:
            try:
                async with asyncio.timeout(self.settings.deadline_s):
                    incident = await self._mark(tenant_id, device_id, cutoff, now)
            except STORE_UNAVAILABLE:
                raise  # the scan ends here; the next one finds the rest
            except Exception:
                # One device's failure must not hide the others; it is found again at the next scan.
                log.exception("device watchdog: marking a silent device failed", extra={"device_id": str(device_id)})
                continue
            if incident is not None:
                opened.append(incident)
        return opened

    async def _mark(self, tenant_id: UUID, device_id: UUID, cutoff: datetime, now: datetime) -> UUID | None:
        try:
            return await self._mark_in_tx(tenant_id, device_id, cutoff, now, self.opener)
        except STORE_UNAVAILABLE:
            raise
        except _StartFailed as failed:
            # Nothing of it stays half-written: marked again without it, and a tick job decides.
            log.error("starting the offline incident inline failed; queued for the worker",
                      exc_info=failed.__cause__, extra={"device_id": str(device_id)})
            return await self._mark_in_tx(tenant_id, device_id, cutoff, now, None)

    async def _mark_in_tx(self, tenant_id: UUID, device_id: UUID, cutoff: datetime, now: datetime,
                          opener: IncidentOpener | None) -> UUID | None:
        after: Callable[[], None] | None = None
        async with tenant_tx(self.pool, tenant_id) as conn:
            marked = await store.mark_silent(conn, device_id, cutoff=cutoff, now=now, actor=ACTOR)
            if marked is None:
                return None  # heard meanwhile, or another instance marked it
            incident_id, opened = marked
            if opened and opener is not None:
                try:
                    after = await opener(conn, tenant_id, incident_id)
                except STORE_UNAVAILABLE:
                    raise
                except Exception as exc:  # any failure: the marking is taken again without the start
                    raise _StartFailed from exc
            elif opened:
                await enqueue_tick(conn, tenant_id, incident_id, reason="opened", dedupe=f"open:{incident_id}")
        MARKED_OFFLINE.inc()
        log.info("device silent past its heartbeat interval: marked offline",
                 extra={"device_id": str(device_id), "incident_id": str(incident_id)})
        if after is not None:
            after()
        return incident_id if opened else None


class _StartFailed(Exception):
    """The worker's inline start of the incident failed (the transaction is rolled back)."""
