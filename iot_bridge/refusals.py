"""Audit lines for what an intruder would try at the bridge: replayed events and refused identities.

A replayed event (an event id its device already sent: a device retry, or a captured request sent again),
an event id reused with another body, and every identity-mismatch refusal (a client certificate of another
tenant, not bound to the device, an event naming another device than its signer) go to the tenant's audit
log, with the sender's address.

Flood control. Anyone who holds one captured request can send it as fast as the network allows, and every
audit line is a row of a hash chain kept for years; so the lines are aggregated, not written one per request:

* per group (tenant, action, sender address), the first occurrence is written at once; the next ones within
  ``window_s`` seconds are only counted, and when the window closes one more line says how many there were
  (``detail.repeats``, with the window's length): at most two lines per group per window, however fast it is;
* at most ``max_groups`` groups are tracked; beyond that, a new sender address joins its tenant's and
  action's overflow group (address ``*``), so many addresses cannot grow memory or lines without bound;
* lines are written off the request path by one task through a queue of ``queue_size`` lines: a request
  never waits for the audit, and when PostgreSQL is away, lines beyond the queue are dropped and counted
  (``iim_bridge_audit_dropped``) instead of piling up.

The audit chain is written through :func:`policy_cache.audit.stage` (the service's flusher chains it).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prometheus_client import Counter

from iim.core.errors import STORE_UNAVAILABLE
from iim.core.lifecycle import AsyncResource
from iim.core.metrics import REGISTRY
from policy_cache import audit
from policy_cache.db import Pool, tenant_tx
from policy_cache.notifications import stop_task

__all__ = ["AuditLine", "RefusalAudit"]

log = logging.getLogger(__name__)

DROPPED = Counter("iim_bridge_audit_dropped", "Bridge audit lines dropped (queue full or store away)",
                  registry=REGISTRY)


@dataclass(frozen=True, slots=True)
class AuditLine:
    tenant_id: UUID
    actor: str
    action: str
    entity_id: str | None
    detail: dict[str, Any]
    event_id: str | None


@dataclass(slots=True)
class _Group:
    opened: float
    first: AuditLine
    repeats: int = 0
    last_event_id: str | None = None


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _actor(text: str) -> str:
    """The chain takes actors of at most 200 characters without control characters or surrounding blanks; a
    certificate's name or an external id is the sender's text, so it is made to fit, never refused."""
    return _CONTROL.sub("?", text).strip()[:200].strip() or "unknown"


class RefusalAudit(AsyncResource):
    """Aggregates and writes the bridge's audit lines (see the module's docstring for the limits)."""

    def __init__(self, pool: Pool, *, window_s: float = 60.0, max_groups: int = 10_000, queue_size: int = 1_000,
                 write_timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._window_s = window_s
        self._max_groups = max_groups
        self._write_timeout_s = write_timeout_s
        self._clock = clock
        self._groups: dict[tuple[UUID, str, str], _Group] = {}
        self._queue: asyncio.Queue[AuditLine] = asyncio.Queue(queue_size)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._write(), name="bridge-audit-writer"),
                       asyncio.create_task(self._close_windows(), name="bridge-audit-windows")]

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await stop_task(task)

    def record(self, tenant_id: UUID, action: str, source: str, *, actor: str, entity_id: str | None = None,
               event_id: str | None = None, detail: dict[str, Any] | None = None) -> None:
        """Count one occurrence; queue a line if it opens its group's window."""
        now = self._clock()
        self.close_windows(now)
        key = (tenant_id, action, source)
        group = self._groups.get(key)
        if group is None and len(self._groups) >= self._max_groups:
            key = (tenant_id, action, "*")
            group = self._groups.get(key)
        if group is not None:
            group.repeats += 1
            group.last_event_id = event_id
            return
        line = AuditLine(tenant_id, _actor(actor), action, entity_id, {"source": key[2], **(detail or {})}, event_id)
        self._groups[key] = _Group(now, line)
        self._put(line)

    def close_windows(self, now: float) -> None:
        """Groups whose window has closed: one line with their repeats (if any), then forgotten."""
        closed = [key for key, group in self._groups.items() if now - group.opened >= self._window_s]
        for key in closed:
            group = self._groups.pop(key)
            if group.repeats:
                first = group.first
                self._put(AuditLine(first.tenant_id, first.actor, first.action, first.entity_id,
                                    {**first.detail, "repeats": group.repeats, "window_s": self._window_s},
                                    group.last_event_id))

    def _put(self, line: AuditLine) -> None:
        try:
            self._queue.put_nowait(line)
        except asyncio.QueueFull:
            DROPPED.inc()

    async def _close_windows(self) -> None:
        while True:
            await asyncio.sleep(min(self._window_s / 4, 5.0))
            self.close_windows(self._clock())

    async def _write(self) -> None:
        while True:
            lines = [await self._queue.get()]
            while not self._queue.empty() and len(lines) < 100:
                lines.append(self._queue.get_nowait())
            for tenant_id in dict.fromkeys(line.tenant_id for line in lines):
                mine = [line for line in lines if line.tenant_id == tenant_id]
                try:
                    async with asyncio.timeout(self._write_timeout_s), tenant_tx(self._pool, tenant_id) as conn:
                        for line in mine:
                            await audit.stage(conn, actor=line.actor, action=line.action, entity="device",
                                              entity_id=line.entity_id, detail=line.detail,
                                              correlation={"event_id": line.event_id} if line.event_id else {})
                except STORE_UNAVAILABLE as exc:
                    DROPPED.inc(len(mine))
                    log.warning("bridge audit lines dropped (%s)", type(exc).__name__)
                except Exception:  # a bad line (a certificate's tenant that does not exist): the writer goes on
                    DROPPED.inc(len(mine))
                    log.exception("bridge audit lines could not be written")
