"""One audit row per routed call, written off the call path in per-tenant batches.

The router only appends to a bounded in-memory buffer; a background task writes
the rows through ``iim.audit_append`` (the same hash chain every writer uses), one
transaction per tenant per batch. PostgreSQL being away delays the rows, it never
delays a call; if the outage outlasts the buffer the oldest rows are dropped and
counted, and the JSON log line of each call still carries the decision.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg
from prometheus_client import Counter, Gauge

from fs_app.routing import CallFacts, RoutingDecision
from iim.core import metrics
from iim.core.lifecycle import AsyncResource
from iim.core.retry import backoff_delay
from policy_cache import audit as audit_log
from policy_cache.cache import PolicyStoreUnavailable
from policy_cache.db import Pool, tenant_tx
from policy_cache.store import unavailable_as_store_error

log = logging.getLogger("iim.audit.calls")

AUDIT_QUEUED = Gauge("iim_call_audit_queued", "Call decisions waiting to be written to the audit log",
                     registry=metrics.REGISTRY)
AUDIT_WRITTEN = Counter("iim_call_audit_written", "Call decisions written to the audit log", registry=metrics.REGISTRY)
AUDIT_DROPPED = Counter("iim_call_audit_dropped", "Call decisions dropped: buffer full during an outage",
                        registry=metrics.REGISTRY)


@dataclass(frozen=True, slots=True)
class _Row:
    tenant_id: UUID
    args: tuple[Any, ...]


class CallDecisionAudit(AsyncResource):
    """``record`` is the router's decision sink; ``run`` is the writer task."""

    def __init__(self, pool: Pool, *, max_buffer: int = 100_000, batch: int = 500, interval: float = 0.2) -> None:
        self._pool = pool
        self._buffer: deque[_Row] = deque()
        self._max = max_buffer
        self._batch = batch
        self._interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def record(self, facts: CallFacts, decision: RoutingDecision | None, route: str) -> None:
        if decision is None or decision.tenant_id is None:
            return  # no subscriber, no tenant: the call's JSON log line is its record
        detail = {
            "route": route, "action": decision.action, "policy_version": decision.policy_version,
            "groups": [[f"{leg.kind}:{leg.target}" for leg in group] for group in decision.groups],
            "fallback": decision.fallback, "rules": list(decision.rules),
        }
        if decision.reject_cause:
            detail["reject_cause"] = decision.reject_cause
        self._append(decision.tenant_id, "call.routed", decision.subscriber_id, detail, facts)

    def record_answer(self, facts: CallFacts, decision: RoutingDecision, device_id: str | None) -> None:
        """The router's answer sink: which leg took the call, the speaker's device id or the mobile."""
        if decision.tenant_id is None:
            return
        detail: dict[str, Any] = {"leg": "phone" if device_id is None else "speaker", "device_id": device_id,
                                  "policy_version": decision.policy_version}
        self._append(decision.tenant_id, "call.answered", decision.subscriber_id, detail, facts)

    def _append(self, tenant_id: str, action: str, subscriber_id: str | None, detail: dict[str, Any],
                facts: CallFacts) -> None:
        correlation = {"call_id": facts.uuid}
        row = _Row(UUID(tenant_id), (
            UUID(tenant_id), "iim:router", action, "subscriber", subscriber_id, detail, correlation))
        if len(self._buffer) >= self._max:
            self._buffer.popleft()
            AUDIT_DROPPED.inc()
        self._buffer.append(row)
        AUDIT_QUEUED.set(len(self._buffer))
        if len(self._buffer) >= self._batch:
            self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="call-audit")

    async def aclose(self, flush_timeout: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            await asyncio.wait_for(self.flush(), flush_timeout)
        except (TimeoutError, PolicyStoreUnavailable) as exc:
            log.warning("call audit rows left unwritten at shutdown: %s (%s)", len(self._buffer), exc)

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(self._interval):  # not wait_for: 3.11's can lose a cancel racing its inner wait
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
                attempt = 0
            except PolicyStoreUnavailable as exc:
                attempt += 1
                log.warning("call audit write failed (attempt %s), keeping %s rows: %s",
                            attempt, len(self._buffer), exc)
                await asyncio.sleep(backoff_delay(attempt, 0.2, 10.0))
            except Exception:
                attempt += 1  # not an outage (a bug, an unforeseen error): logged, and the writer goes on
                log.exception("call audit write failed (attempt %s), keeping %s rows", attempt, len(self._buffer))
                await asyncio.sleep(backoff_delay(attempt, 0.2, 10.0))

    async def flush(self) -> int:
        """Write everything buffered now; rows stay buffered if the write fails."""
        written = 0
        while self._buffer:
            take = [self._buffer.popleft() for _ in range(min(self._batch, len(self._buffer)))]
            by_tenant: dict[UUID, list[tuple[Any, ...]]] = {}
            for row in take:
                by_tenant.setdefault(row.tenant_id, []).append(row.args)
            done: set[UUID] = set()
            try:
                with unavailable_as_store_error():
                    for tenant, rows in by_tenant.items():
                        async with tenant_tx(self._pool, tenant) as conn:
                            await audit_log.append_many(conn, rows)
                        done.add(tenant)
                        written += len(rows)
                        AUDIT_WRITTEN.inc(len(rows))
            except asyncpg.PostgresError as exc:
                # Not an outage: these rows will never go in. Drop them loudly, keep the rest.
                bad = next(t for t in by_tenant if t not in done)
                done.add(bad)
                AUDIT_DROPPED.inc(len(by_tenant[bad]))
                log.error("call audit rows refused by PostgreSQL, dropped %s: %s", len(by_tenant[bad]), exc)
            finally:
                # Rows of tenants not yet written go back to the front, in their order.
                self._buffer.extendleft(reversed([r for r in take if r.tenant_id not in done]))
                AUDIT_QUEUED.set(len(self._buffer))
        return written
