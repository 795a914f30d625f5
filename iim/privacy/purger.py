"""The retention purge: a supervised task that purges what each tenant's retention says is due, and audits
every round that purged something (one row per tenant: how many rows of what). Recorded messages go row and
file together (:mod:`iim.privacy.recordings`); commands sent to hubs are deleted by the hub commands' store
(:func:`iot_bridge.mqtt.store.purge_commands`)."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from pathlib import Path
from typing import cast
from uuid import UUID

from prometheus_client import Counter

from iim.core.errors import STORE_UNAVAILABLE
from iim.core.lifecycle import AsyncResource, TaskSupervisor
from iim.core.metrics import REGISTRY
from iim.privacy import store
from iim.privacy.recordings import remove_recording_files
from iim.privacy.retention import RetentionDefaults, next_round_delay
from iot_bridge.mqtt import store as hub_commands
from policy_cache import audit
from policy_cache.db import Connection, Pool, tenant_tx

__all__ = ["ACTOR", "RetentionPurger"]

log = logging.getLogger(__name__)

ACTOR = "retention-purge"
PURGED = Counter("iim_retention_purged", "Rows purged by retention, by kind", ["kind"], registry=REGISTRY)


class RetentionPurger(AsyncResource):
    """Runs :meth:`run_once` every ``interval_s`` (at once again while a batch came back full)."""

    def __init__(self, pool: Pool, defaults: RetentionDefaults, *, interval_s: float = 3600.0, batch: int = 1000,
                 timeout_s: float = 30.0, recordings_dir: Path | None = None) -> None:
        self._pool = pool
        self._recordings_dir = recordings_dir
        self._defaults = defaults
        self._interval_s = interval_s
        self._batch = batch
        self._timeout_s = timeout_s
        self._tasks = TaskSupervisor()
        self._closing = False

    async def start(self) -> None:
        self._tasks.supervise(self._forever, name="retention-purge", initial=1.0, ceiling=60.0,
                              until=lambda: self._closing)

    async def aclose(self) -> None:
        self._closing = True
        await self._tasks.aclose()

    async def _forever(self) -> None:
        while True:
            delay = self._interval_s
            try:
                purged = await self.run_once()
                totals: dict[str, int] = defaultdict(int)
                for counts in purged.values():
                    for kind, n in counts.items():
                        totals[kind] += n
                delay = next_round_delay(totals, self._batch, self._interval_s)
            except STORE_UNAVAILABLE as exc:
                log.warning("retention purge: store unavailable (%s); retrying later", type(exc).__name__)
            await asyncio.sleep(delay)

    async def run_once(self) -> dict[UUID, dict[str, int]]:
        """One round: purge, then one audit row per tenant that had something purged; the counts by tenant."""
        rows = await store.purge_round(self._pool, self._defaults, limit=self._batch, timeout_s=self._timeout_s)
        by_tenant: dict[UUID, dict[str, int]] = defaultdict(dict)
        for row in rows:
            by_tenant[row.tenant_id][row.kind] = row.purged
            PURGED.labels(row.kind).inc(row.purged)
        for tenant_id, n in await hub_commands.purge_commands(self._pool, keep_s=self._defaults.hub_command_s,
                                                              limit=self._batch, timeout_s=self._timeout_s):
            by_tenant[tenant_id]["hub_command"] = n
            PURGED.labels("hub_command").inc(n)
        try:
            recordings = await self._purge_recordings()
        except OSError as exc:  # the other kinds are purged already: audited below all the same
            log.error("retention purge: a recording's file could not be deleted (%s); its row stays for the next "
                      "round", exc)
            recordings = {}
        for tenant_id, n in recordings.items():
            by_tenant[tenant_id]["recording"] = n
            PURGED.labels("recording").inc(n)
        for tenant_id, counts in by_tenant.items():
            async with asyncio.timeout(self._timeout_s), tenant_tx(self._pool, tenant_id) as conn:
                await audit.append(conn, tenant_id, actor=ACTOR, action="retention.purged", entity="tenant",
                                   entity_id=tenant_id, detail=counts)
            log.info("retention purge: %s", counts, extra={"tenant": str(tenant_id)})
        return dict(by_tenant)

    async def _purge_recordings(self) -> dict[UUID, int]:
        """Recorded messages that are due: rows deleted and files removed in one transaction (a file that
        cannot be removed rolls it back: tried again next round). Counts by tenant."""
        async with asyncio.timeout(self._timeout_s), self._pool.acquire() as proxy:
            conn = cast(Connection, proxy)
            async with conn.transaction():
                gone = await store.purge_recordings(conn, limit=self._batch)
                await asyncio.to_thread(remove_recording_files, self._recordings_dir, [g.file_name for g in gone])
        counts: dict[UUID, int] = defaultdict(int)
        for g in gone:
            counts[g.tenant_id] += 1
        return dict(counts)
