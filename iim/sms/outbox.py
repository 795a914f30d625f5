"""The SMS outbox's sender: send from PostgreSQL, apply receipts, store MO (its statements: ``iim.sms.store``).

Durability lives in ``iim.sms_outbox`` / ``iim.sms_inbound``; transports keep nothing across a restart. SMS are
queued with ``iim.sms.store.enqueue_sms`` inside the caller's transaction.

Sending (:class:`SmsSender`): one loop claims due rows of every tenant through ``iim.sms_claim`` (status
``sending``, attempts + 1, a lease in ``next_attempt_at``), submits them concurrently (bounded), and a
flusher writes the outcomes back per tenant in one statement:

* accepted -> ``sent`` with one SMSC id per part;
* ``Throttled`` / ``QueueFull`` / ``TransportDown`` / other transient -> ``queued`` again, due after an
  exponential backoff with jitter (:class:`BackoffPolicy`); parts already accepted are kept and not resent;
* ``Rejected`` or too many attempts -> ``failed``.

Delivery is **at least once** towards the SMSC. A row stays ``sending`` until its outcome is committed; if
the process dies first, the lease expires and the row is claimed and submitted again. The same happens when
a submit times out or the link drops after the SMSC took the message but before we read its answer. Every
submit carries the row id as a client reference (SMPP vendor TLV, HTTP ``reference``) so an SMSC that
honours references drops the copy; one that does not delivers a duplicate. That window is: the SMSC's
``submit_sm_resp`` in flight or unread when the link or our process dies, plus the time until the outcome
commits (``flush_interval``, 20 ms by default).

Receipts (``iim_sms_receipts``) are queued in memory, matched to rows by (transport, SMSC id) through
``iim.sms_find_by_smsc_id`` and applied per tenant; a receipt that arrives before its ``sent`` commit is
retried for ``receipt_match_window`` seconds. A receipt acknowledged but not yet applied when the process
dies is lost (the row stays ``sent``). ``on_undelivered(tenant_id, row)`` runs once per row, after commit.

MO: stored in ``iim.sms_inbound`` before the SMSC is acknowledged, deduplicated by the SMSC's id or, without
one, by a content hash within ``mo_dedup_window``; then ``on_mo(tenant_id, mo)`` runs (in its own task, so
a slow consumer does not hold up the SMPP session). Hooks are best effort after commit: a consumer that must
not miss anything also reads the tables (``handled_at IS NULL``, ``status = 'undelivered'``). A body is kept
only while it may be needed: it is stored only when the destination's subscriber holds a live ``read_sms``
consent (the hook gets it in memory either way), a declined read-out forgets it at once
(:func:`iim.sms.store.forget_mo_body`), and the rest are forgotten ``mo_body_retention`` seconds (24 h)
after they arrived; sender, time, length and content hash stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID

import asyncpg
from prometheus_client import Counter, Gauge, Histogram

from iim.core.envelope import CipherError
from iim.core.errors import STORE_UNAVAILABLE
from iim.core.lifecycle import AsyncResource, TaskSupervisor
from iim.core.metrics import REGISTRY
from iim.core.retry import backoff_delay
from iim.core.tracing import Span, SpanKind, attrs, span
from iim.keys.keyring import Keyring, KeyUnavailable
from iim.sms import store
from iim.sms.transport import (
    MoSms,
    OutboundSms,
    QueueFull,
    Receipt,
    ReceiptState,
    Rejected,
    SmsTransport,
    SmsTransportError,
    Throttled,
    TransportDown,
)
from policy_cache.db import Pool, tenant_tx

__all__ = [
    "BackoffPolicy", "InboundSms", "MoHook", "OutboxRow", "SmsSender", "UndeliveredHook",
]

log = logging.getLogger("iim.messaging.outbox")

SENT = Counter("iim_sms_sent", "SMS submit outcomes, by result", ["result"], registry=REGISTRY)
RETRIES = Counter("iim_sms_retries", "SMS put back in the queue, by reason", ["reason"], registry=REGISTRY)
RECEIPTS = Counter("iim_sms_receipts", "Delivery receipts, by state", ["state"], registry=REGISTRY)
MO = Counter("iim_sms_mo", "Mobile-originated SMS, by result", ["result"], registry=REGISTRY)
MO_BODIES_PURGED = Counter("iim_sms_mo_bodies_purged", "Stored MO bodies forgotten after their retention",
                           registry=REGISTRY)
QUEUE_DEPTH = Gauge("iim_sms_queue_depth", "Outbox rows queued or being sent (all tenants)", registry=REGISTRY)
SUBMIT_SECONDS = Histogram("iim_sms_submit_seconds", "Submit to SMSC answer (all parts)",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10), registry=REGISTRY)

_SEP = chr(31)


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Delay before attempt n+1: ``base * factor**(n-1)`` capped, of which ``jitter`` is random
    (so rows throttled together do not come back together). After ``max_attempts`` claims: ``failed``."""

    base: float = 2.0
    factor: float = 2.0
    cap: float = 300.0
    jitter: float = 0.5
    max_attempts: int = 20

    def delay(self, attempts: int) -> float:
        return backoff_delay(attempts, self.base, self.cap, factor=self.factor, jitter=self.jitter)


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """An outbox row as the hooks see it."""

    tenant_id: UUID
    id: UUID
    key: str
    msisdn: str
    status: str
    attempts: int
    incident_id: UUID | None
    segments: int | None
    smsc_message_ids: tuple[str | None, ...]
    receipt_state: str | None
    receipt_error: str | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class InboundSms:
    """A stored MO (``iim.sms_inbound`` row)."""

    tenant_id: UUID
    id: UUID
    sms_id: str
    transport: str
    source: str
    destination: str
    subscriber_id: UUID | None
    body: str
    received_at: datetime
    #: the source as received when the SMSC did not mark it international (see :class:`MoSms`)
    source_received: str | None = None


UndeliveredHook = Callable[[UUID, OutboxRow], Awaitable[None]]
MoHook = Callable[[UUID, InboundSms], Awaitable[None]]


@dataclass(slots=True)
class _Outcome:
    tenant_id: UUID
    id: UUID
    attempts: int
    status: Literal["sent", "queued", "failed"]
    ids: str | None  # part ids joined by chr(31), '' for a part not accepted; None: leave as is
    segments: int | None
    delay: float
    error: str | None


@dataclass(slots=True)
class _PendingReceipt:
    receipt: Receipt
    deadline: float
    not_before: float = 0.0
    tries: int = 0


#: What the outbox's loops survive: PostgreSQL away (``STORE_UNAVAILABLE``) and any other SQL error. The
#: loops keep going either way (an SMS path must not die), but only an outage is logged as one.
_DB_ERRORS: tuple[type[BaseException], ...] = (*STORE_UNAVAILABLE, asyncpg.PostgresError)


def _db_failure(what: str, exc: BaseException, delay: float) -> None:
    if isinstance(exc, STORE_UNAVAILABLE):
        log.warning("%s failed (PostgreSQL unavailable: %s); retry in %.1f s", what, exc, delay)
    else:
        log.error("%s failed (%s: a SQL error, not an outage); retry in %.1f s", what, exc, delay, exc_info=exc)


class SmsSender(AsyncResource):
    """Sends the outbox through one transport and takes its receipts and MO.

    ``start()`` binds the transport's inbound handlers and starts it; ``aclose()`` stops claiming, lets
    in-flight submits finish (up to ``stop_timeout``), writes their outcomes and stops the transport.
    """

    def __init__(
        self,
        pool: Pool,
        transport: SmsTransport,
        *,
        keyring: Keyring,
        batch: int = 100,
        retry: BackoffPolicy = BackoffPolicy(),
        lease: float = 60.0,
        max_inflight: int = 256,
        poll_interval: float = 0.25,
        flush_interval: float = 0.02,
        throttle_pause: float = 0.5,
        on_undelivered: UndeliveredHook | None = None,
        on_mo: MoHook | None = None,
        mo_dedup_window: float = 300.0,
        receipt_match_window: float = 120.0,
        depth_interval: float = 5.0,
        stop_timeout: float = 15.0,
        mo_body_retention: float = 86400.0,
        purge_interval: float = 300.0,
    ) -> None:
        if not 1 <= batch <= 10000:
            raise ValueError("batch must be 1..10000")
        self.pool = pool
        self.transport = transport
        self.keyring = keyring
        self.batch = batch
        self.retry = retry
        self.lease = lease
        self.max_inflight = max_inflight
        self.poll_interval = poll_interval
        self.flush_interval = flush_interval
        self.throttle_pause = throttle_pause
        self.on_undelivered = on_undelivered
        self.on_mo = on_mo
        self.mo_dedup_window = mo_dedup_window
        self.receipt_match_window = receipt_match_window
        self.depth_interval = depth_interval
        self.stop_timeout = stop_timeout
        self.mo_body_retention = mo_body_retention
        self.purge_interval = purge_interval
        self._inflight: set[asyncio.Task[None]] = set()
        self._hooks: set[asyncio.Task[None]] = set()
        self._outcomes: list[_Outcome] = []
        self._writing = 0
        self._flush_needed = asyncio.Event()
        self._wake = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._receipts: asyncio.Queue[_PendingReceipt] = asyncio.Queue()
        self._deferred: list[_PendingReceipt] = []
        self._paused_until = 0.0
        self._pause = throttle_pause
        self._tasks: list[asyncio.Task[None]] = []
        self._claimer: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        self.transport.bind_inbound(self._mo_in, self._receipt_in)
        await self.transport.start()
        # Supervised: a loop that dies on an error nobody foresaw is started again, never left dead.
        loops = TaskSupervisor()
        self._claimer = loops.supervise(self._claim_loop, name="sms-claim")
        self._tasks = [loops.supervise(self._flush_loop, name="sms-flush"),
                       loops.supervise(self._receipt_loop, name="sms-receipts"),
                       loops.supervise(self._depth_loop, name="sms-depth"),
                       loops.supervise(self._purge_loop, name="sms-mo-purge")]

    async def aclose(self) -> None:
        claimer, self._claimer = self._claimer, None
        if claimer is not None:
            claimer.cancel()
            await asyncio.gather(claimer, return_exceptions=True)
        if self._inflight:
            _, late = await asyncio.wait(set(self._inflight), timeout=self.stop_timeout)
            for task in late:  # their rows stay 'sending' until the lease expires
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        tasks, self._tasks = self._tasks, []
        for task in tasks:  # a write cut short puts its outcomes back; the last flush below writes them
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(*_DB_ERRORS):
            await self._flush()
        with contextlib.suppress(*_DB_ERRORS):
            await self._drain_receipts()
        await self.transport.aclose()
        if self._hooks:
            await asyncio.wait(set(self._hooks), timeout=self.stop_timeout)

    def wake(self) -> None:
        """Look for due rows now (call after committing ``enqueue_sms`` for the lowest latency)."""
        self._wake.set()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # --- sending -------------------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        failures = 0
        while True:
            now = time.monotonic()
            if now < self._paused_until:
                await asyncio.sleep(self._paused_until - now)
                continue
            if not self.transport.ready:
                await asyncio.sleep(self.poll_interval)
                continue
            # Outcomes not yet written count too: claiming must not outrun the writer.
            free = self.max_inflight - len(self._inflight) - len(self._outcomes) - self._writing
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            try:
                rows = await store.claim_due(self.pool, min(self.batch, free), timedelta(seconds=self.lease))
                failures = 0
            except _DB_ERRORS as exc:
                failures += 1
                delay = backoff_delay(failures + 1, 0.2, 10.0)
                _db_failure("sms claim", exc, delay)
                await asyncio.sleep(delay)
                continue
            for row in rows:
                task = asyncio.create_task(self._submit(row))
                self._inflight.add(task)
                task.add_done_callback(self._submitted)
            if len(rows) < min(self.batch, free):
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):  # not wait_for: 3.11's can lose a cancel racing its inner wait
                        await self._wake.wait()

    async def _open_body(self, tenant_id: UUID, row: asyncpg.Record) -> str:
        """The claimed row's body in clear (a row from before sealing is clear already)."""
        body: str = row["body"]
        if row["body_key"] is None:
            return body
        key = await self.keyring.key_in_tenant(tenant_id, row["body_key"])
        return key.open(store.OUTBOX, row["key"], "body", body)

    def _submitted(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slot_free.set()

    async def _submit(self, row: asyncpg.Record) -> None:
        tenant_id: UUID = row["tenant_id"]
        row_id: UUID = row["id"]
        attempts: int = row["attempts"]
        done = {i: mid for i, mid in enumerate(row["smsc_message_ids"] or ()) if mid is not None}
        extra = {"sms_id": str(row_id), "tenant_id": str(tenant_id), "attempt": attempts}
        try:
            body = await self._open_body(tenant_id, row)
        except (KeyUnavailable, CipherError) as exc:  # no retry can help: the row is failed, and says why
            SENT.labels("gave_up").inc()
            log.error("sms body does not open: %s", exc, extra=extra)
            self._record(_Outcome(tenant_id, row_id, attempts, "failed", None, None, 0.0,
                                  "sealed body does not open (data key or master key missing)"))
            return
        except _DB_ERRORS as exc:  # the key could not be fetched now: the lease expires and the row is claimed again
            _db_failure("sms data key", exc, self.lease)
            return
        msg = OutboundSms(reference=row_id, msisdn=row["msisdn"], body=body, flash=row["flash"],
                          source=row["source"], done_parts=done)
        started = time.perf_counter()
        try:
            result = await self.transport.submit(msg)
        except Rejected as exc:
            SENT.labels("rejected").inc()
            log.warning("sms rejected by the SMSC: %s", exc.detail, extra={**extra, "code": exc.code})
            self._record(_Outcome(tenant_id, row_id, attempts, "failed", _join(exc.accepted, exc.parts), None, 0.0,
                                  f"rejected: {exc.detail}"[:500]))
            return
        except SmsTransportError as exc:
            reason = _reason(exc)
            if isinstance(exc, Throttled | QueueFull):
                self._throttled()
            if attempts >= self.retry.max_attempts:
                SENT.labels("gave_up").inc()
                log.error("sms failed after %d attempts: %s", attempts, exc.detail, extra=extra)
                self._record(_Outcome(tenant_id, row_id, attempts, "failed", _join(exc.accepted, exc.parts), None,
                                      0.0, f"gave up after {attempts} attempts: {exc.detail}"[:500]))
                return
            delay = self.retry.delay(attempts)
            SENT.labels(f"retry_{reason}").inc()
            RETRIES.labels(reason).inc()
            log.info("sms retry in %.1f s: %s", delay, exc.detail, extra={**extra, "reason": reason})
            self._record(_Outcome(tenant_id, row_id, attempts, "queued", _join(exc.accepted, exc.parts), None, delay,
                                  f"{reason}: {exc.detail}"[:500]))
            return
        SUBMIT_SECONDS.observe(time.perf_counter() - started)
        SENT.labels("sent").inc()
        self._pause = self.throttle_pause
        log.info("sms sent", extra={**extra, "segments": result.segments})
        self._record(_Outcome(tenant_id, row_id, attempts, "sent", _SEP.join(result.message_ids), result.segments,
                              0.0, None))

    def _throttled(self) -> None:
        """The SMSC pushes back: stop claiming for a moment (doubling while it keeps pushing back)."""
        self._paused_until = max(self._paused_until, time.monotonic() + self._pause)
        self._pause = min(self._pause * 2, 10.0)

    def _record(self, outcome: _Outcome) -> None:
        self._outcomes.append(outcome)
        self._flush_needed.set()

    async def _flush_loop(self) -> None:
        failures = 0
        while True:
            await self._flush_needed.wait()
            await asyncio.sleep(self.flush_interval)  # gather what completes meanwhile into one statement
            self._flush_needed.clear()
            try:
                await self._flush()
                failures = 0
            except _DB_ERRORS as exc:
                failures += 1
                delay = backoff_delay(failures + 1, 0.2, 10.0)
                _db_failure("sms outcome write", exc, delay)
                self._flush_needed.set()
                await asyncio.sleep(delay)

    async def _flush(self) -> None:
        batch, self._outcomes = self._outcomes, []
        if not batch:
            return
        self._writing = len(batch)
        try:
            await self._write(batch)
        finally:
            self._writing = 0
            self._slot_free.set()

    async def _write(self, batch: list[_Outcome]) -> None:
        by_tenant: dict[UUID, list[_Outcome]] = {}
        for outcome in batch:
            by_tenant.setdefault(outcome.tenant_id, []).append(outcome)
        pending = dict(by_tenant)
        try:
            for tenant_id, items in by_tenant.items():
                async with tenant_tx(self.pool, tenant_id) as conn:
                    done = await store.write_outcomes(conn, self.transport.name, [
                        (o.id, o.attempts, o.status, o.ids, o.segments, o.delay, o.error) for o in items])
                del pending[tenant_id]
                if len(done) != len(items):
                    for o in items:
                        if o.id not in done:
                            log.warning("sms outcome not written: the row was claimed again (lease expired)",
                                        extra={"sms_id": str(o.id), "tenant_id": str(tenant_id)})
        except BaseException:
            for items in pending.values():
                self._outcomes.extend(items)
            raise

    async def _depth_loop(self) -> None:
        while True:
            with contextlib.suppress(*_DB_ERRORS):
                QUEUE_DEPTH.set(await store.queue_depth(self.pool))
            await asyncio.sleep(self.depth_interval)

    async def _purge_loop(self) -> None:
        """Forget MO bodies older than ``mo_body_retention`` (every tenant), now and every ``purge_interval``:
        a read-out body is needed for minutes, not kept for ever. A failed round is retried next time."""
        while True:
            try:
                while (purged := await store.purge_mo_bodies(self.pool, self.mo_body_retention)) >= 1000:
                    MO_BODIES_PURGED.inc(purged)
                MO_BODIES_PURGED.inc(purged)
                if purged:
                    log.info("MO bodies past their retention forgotten", extra={"purged": purged})
            except _DB_ERRORS as exc:
                _db_failure("MO body purge", exc, self.purge_interval)
            await asyncio.sleep(self.purge_interval)

    # --- receipts ------------------------------------------------------------------------------------------

    async def _receipt_in(self, receipt: Receipt) -> None:
        RECEIPTS.labels(receipt.state.value).inc()
        self._receipts.put_nowait(_PendingReceipt(receipt, time.monotonic() + self.receipt_match_window))

    async def _receipt_loop(self) -> None:
        while True:
            timeout = None
            if self._deferred:
                timeout = max(0.0, min(p.not_before for p in self._deferred) - time.monotonic())
            try:
                first = await asyncio.wait_for(self._receipts.get(), timeout)
                self._deferred.append(first)
            except TimeoutError:
                pass
            try:
                await self._drain_receipts()
            except _DB_ERRORS as exc:
                _db_failure("sms receipts", exc, 1.0)
                await asyncio.sleep(1.0)

    async def _drain_receipts(self) -> None:
        while not self._receipts.empty():
            self._deferred.append(self._receipts.get_nowait())
        now = time.monotonic()
        due = [p for p in self._deferred if p.not_before <= now][:5000]
        if not due:
            return
        keep = [p for p in self._deferred if p.not_before > now]
        self._deferred = keep + due  # if applying fails, nothing is lost
        if self._outcomes:
            await self._flush()  # our own 'sent' rows first, so their receipts match
        unmatched = await self._apply_receipts(due)
        now = time.monotonic()
        retry: list[_PendingReceipt] = []
        for p in unmatched:
            if now < p.deadline:
                p.tries += 1
                p.not_before = now + backoff_delay(p.tries + 1, 0.05, 2.0)
                retry.append(p)
            else:
                RECEIPTS.labels("unmatched").inc()
                log.warning("receipt for an unknown SMSC message id dropped",
                            extra={"smsc_message_id": p.receipt.message_id, "transport": p.receipt.transport})
        self._deferred = keep + retry

    async def _apply_receipts(self, items: Sequence[_PendingReceipt]) -> list[_PendingReceipt]:
        """Apply what matches a row; return the receipts that match none (yet)."""
        by_transport: dict[str, list[_PendingReceipt]] = {}
        for p in items:
            by_transport.setdefault(p.receipt.transport, []).append(p)
        unmatched: list[_PendingReceipt] = []
        per_tenant: dict[UUID, list[tuple[UUID, Receipt]]] = {}
        for transport, group in by_transport.items():
            ids = list({p.receipt.message_id for p in group})
            where = await store.find_by_smsc_id(self.pool, transport, ids)
            for p in group:
                hit = where.get(p.receipt.message_id)
                if hit is None:
                    unmatched.append(p)
                else:
                    per_tenant.setdefault(hit[0], []).append((hit[1], p.receipt))
        for tenant_id, receipts in per_tenant.items():
            undelivered = await self._apply_tenant_receipts(tenant_id, receipts)
            for row in undelivered:
                log.info("sms undelivered", extra={"sms_id": str(row.id), "tenant_id": str(tenant_id),
                                                   "receipt_state": row.receipt_state})
                if self.on_undelivered is not None:
                    self._spawn_hook(self.on_undelivered(tenant_id, row), "on_undelivered", str(row.id))
        return unmatched

    async def _apply_tenant_receipts(self, tenant_id: UUID, receipts: list[tuple[UUID, Receipt]]) -> list[OutboxRow]:
        undelivered: list[OutboxRow] = []
        async with tenant_tx(self.pool, tenant_id) as conn:
            rows = await store.lock_for_receipts(conn, list({rid for rid, _ in receipts}))
            state = {r["id"]: dict(r) for r in rows}
            changed: set[UUID] = set()
            newly_failed: set[UUID] = set()
            for row_id, receipt in receipts:
                cur = state.get(row_id)
                if cur is None:
                    continue
                if _apply_receipt(cur, receipt):
                    changed.add(row_id)
                    if cur["status"] == "undelivered" and cur.get("_became_undelivered"):
                        newly_failed.add(row_id)
            if changed:
                await store.write_receipts(conn, [state[rid] for rid in sorted(changed)])
        for rid in sorted(newly_failed):
            cur = state[rid]
            undelivered.append(OutboxRow(
                tenant_id=tenant_id, id=rid, key=cur["key"], msisdn=cur["msisdn"], status=cur["status"],
                attempts=cur["attempts"], incident_id=cur["incident_id"], segments=cur["segments"],
                smsc_message_ids=tuple(cur["smsc_message_ids"]), receipt_state=cur["receipt_state"],
                receipt_error=cur["receipt_error"], last_error=cur["last_error"]))
        return undelivered

    # --- MO ------------------------------------------------------------------------------------------------

    async def _mo_in(self, mo: MoSms) -> None:
        """Store the MO (before the transport acknowledges it), then hand it to ``on_mo`` (in a task that inherits
        this span: the readout is its child)."""
        with span("sms.mo", kind=SpanKind.CONSUMER, attributes=attrs(transport=mo.transport)) as traced:
            outcome = await self._store_mo(mo, traced)
            if traced.is_recording():
                traced.set_attribute("iim.outcome", outcome)

    async def _store_mo(self, mo: MoSms, traced: Span) -> str:
        tenant_id = await store.subscriber_tenant(self.pool, mo.destination)
        if tenant_id is None:
            MO.labels("unknown_destination").inc()
            log.warning("MO for a number of no (or several) tenants dropped",
                        extra={"transport": mo.transport, "smsc_sms_id": mo.sms_id})
            return "unknown_destination"
        if traced.is_recording():
            traced.set_attribute("iim.tenant", str(tenant_id))
        digest = hashlib.sha256(_SEP.join((mo.transport, mo.source, mo.destination, mo.body)).encode()).hexdigest()
        async with tenant_tx(self.pool, tenant_id) as conn:
            data_key = await self.keyring.active(conn, tenant_id)
            row = await store.store_mo(conn, mo, digest, dedup_window=self.mo_dedup_window, data_key=data_key)
        if row is None:
            MO.labels("duplicate").inc()
            log.info("MO redelivered; stored once", extra={"tenant_id": str(tenant_id), "content_hash": digest[:16]})
            return "duplicate"
        inbound = InboundSms(tenant_id=tenant_id, id=row["id"], sms_id=row["sms_id"], transport=mo.transport,
                             source=mo.source, destination=mo.destination, subscriber_id=row["subscriber_id"],
                             body=mo.body, received_at=row["received_at"], source_received=mo.source_received)
        MO.labels("stored").inc()
        log.info("MO stored", extra={"sms_id": inbound.sms_id, "tenant_id": str(tenant_id), "inbound_id": str(inbound.id)})
        if traced.is_recording():
            traced.set_attribute("iim.sms_id", inbound.sms_id)
        if self.on_mo is not None:
            self._spawn_hook(self.on_mo(tenant_id, inbound), "on_mo", inbound.sms_id)
        return "stored"

    def _spawn_hook(self, coro: Awaitable[None], name: str, sms_id: str) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:
                log.exception("sms hook %s failed", name, extra={"sms_id": sms_id})

        task = asyncio.create_task(run(), name=f"sms-hook-{name}")
        self._hooks.add(task)
        task.add_done_callback(self._hooks.discard)


def _reason(exc: SmsTransportError) -> str:
    if isinstance(exc, Throttled):
        return "throttled"
    if isinstance(exc, QueueFull):
        return "queue_full"
    if isinstance(exc, TransportDown):
        return "transport_down"
    return "temporary"


def _join(accepted: dict[int, str], parts: int) -> str | None:
    """Partially accepted parts as the outbox stores them (None: nothing accepted, keep the row's ids)."""
    if not accepted:
        return None
    count = max(parts, max(accepted) + 1)
    return _SEP.join(accepted.get(i, "") for i in range(count))


def _apply_receipt(cur: dict[str, Any], receipt: Receipt) -> bool:
    """Apply one receipt to a locked row (a dict); True if anything changed."""
    status = cur["status"]
    if status in ("failed", "undelivered"):
        return False
    mid = receipt.message_id
    if receipt.state is ReceiptState.DELIVERED:
        delivered = list(cur["delivered_ids"] or [])
        changed = False
        if mid not in delivered:
            delivered.append(mid)
            cur["delivered_ids"] = delivered
            changed = True
        parts = [p for p in (cur["smsc_message_ids"] or []) if p is not None]
        if (status == "sent" and cur["segments"] and len(parts) >= cur["segments"]
                and set(parts) <= set(delivered)):
            cur["status"] = "delivered"
            changed = True
        if cur["receipt_state"] != "delivered":
            cur["receipt_state"] = "delivered"
            changed = True
        return changed
    if receipt.state.failed:
        if status == "delivered":
            return False
        cur["status"] = "undelivered"
        cur["receipt_state"] = receipt.state.value
        cur["receipt_error"] = (receipt.error or "")[:200] or None
        cur["_became_undelivered"] = True
        return True
    if status == "sent" and cur["receipt_state"] != receipt.state.value:
        cur["receipt_state"] = receipt.state.value
        return True
    return False

