"""Call and SMS triggers onto the durable incident path, never in the way of the call or the SMS.

The call path (``fs_app.router.PolicyRouter``'s ``on_inbound``) and the SMS path (the outbox's MO hook) hand an
offer to :meth:`TriggerIntake.offer`, which only puts it on a bounded queue: it never waits, never raises, and a
full queue drops the offer (counted, logged). Supervised consumers then take each offer in one tenant transaction,
under a deadline: the callee's households, the sender in E.164 under the tenant's plan, the pure choice of a
scenario (:func:`iim.scenarios.triggers.facts.choose`), and, when one applies, the incident with its audit line
and tick job (:func:`iim.scenarios.triggers.store.open_incident`). From there the scenario worker runs it like
any incident: the same engine, executors, consent and toll-fraud guards, and audit.

PostgreSQL away or stalled does not lose an offer while the process lives: its consumer tries it again with
backoff (the rest wait on the bounded queue, the call path never does) until the offer is older than
``max_age_s`` -- a call long over announced now helps nobody -- and only then drops it (counted ``expired``,
logged). A retry after a commit whose answer was lost is a replay (the offer's reference is unique): exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from prometheus_client import Counter

from fs_app.routing import CallFacts
from iim.core.errors import STORE_UNAVAILABLE
from iim.core.lifecycle import AsyncResource, TaskSupervisor
from iim.core.metrics import REGISTRY
from iim.scenarios import store as incidents
from iim.scenarios.model import TriggerKind
from iim.scenarios.triggers import store
from iim.scenarios.triggers.facts import EVENT_OF, TriggerOffer, choose, comms_facts, sender_e164
from iim.sms.outbox import InboundSms
from policy_cache.db import Pool, tenant_tx
from policy_cache.snapshot import RoutingSnapshot

__all__ = ["TRIGGERS", "TriggerIntake", "TriggerResult"]

log = logging.getLogger("iim.scenarios.triggers")

TRIGGERS = Counter("iim_scenario_triggers", "Incoming calls and SMS offered to scenarios, by kind and result "
                   "(opened, joined, replayed, no_scenario, no_sender, no_household, retried, dropped, expired, failed)",
                   ["kind", "result"], registry=REGISTRY)
#: The store away or too slow: the offer is tried again (the call or SMS itself went on regardless).
_NOT_TAKEN: tuple[type[BaseException], ...] = (TimeoutError, *STORE_UNAVAILABLE)


@dataclass(frozen=True, slots=True)
class TriggerResult:
    """What one household made of an offer: ``opened``/``joined``/``replayed`` an incident, or ``no_scenario``."""

    household_id: UUID
    result: str
    incident_id: UUID | None = None
    scenario: str | None = None


class TriggerIntake(AsyncResource):
    """Takes call and SMS offers off the call and SMS paths and opens the incidents their scenarios ask for.

    ``capacity`` bounds the queue (a burst beyond it is dropped, not waited for); ``timeout_s`` bounds each
    offer's transaction; ``consumers`` offers are handled at once. An offer the store did not take is tried again
    after ``retry_initial_s``, doubling up to ``retry_max_s``, until it is ``max_age_s`` old (then dropped).
    """

    def __init__(self, pool: Pool, *, capacity: int = 1000, timeout_s: float = 10.0, consumers: int = 2,
                 max_age_s: float = 300.0, retry_initial_s: float = 0.5, retry_max_s: float = 10.0,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        if max_age_s <= 0 or retry_initial_s <= 0 or retry_max_s < retry_initial_s:
            raise ValueError("max_age_s and retry_initial_s must be > 0 and retry_max_s >= retry_initial_s")
        self.pool = pool
        self.clock = clock
        self.timeout_s = timeout_s
        self.max_age_s = max_age_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._consumers = consumers
        self._queue: asyncio.Queue[TriggerOffer] = asyncio.Queue(maxsize=capacity)
        self._tasks = TaskSupervisor()
        self._open = False

    async def start(self) -> None:
        await self._tasks.start()
        self._open = True
        for n in range(self._consumers):
            self._tasks.supervise(self._consume, name=f"scenario-triggers-{n}", until=lambda: not self._open)

    async def aclose(self) -> None:
        self._open = False
        await self._tasks.aclose()
        if not self._queue.empty():  # the queue lives in memory only: what is left is lost with the process
            log.warning("stopping with %d scenario trigger(s) queued: dropped", self._queue.qsize())
            while not self._queue.empty():
                TRIGGERS.labels(self._queue.get_nowait().kind.value, "dropped").inc()
                self._queue.task_done()

    def offer(self, offer: TriggerOffer) -> bool:
        """Queue ``offer`` without waiting; False (and counted) when the intake is closed or full."""
        if not self._open:
            TRIGGERS.labels(offer.kind.value, "dropped").inc()
            return False
        try:
            self._queue.put_nowait(offer)
        except asyncio.QueueFull:
            TRIGGERS.labels(offer.kind.value, "dropped").inc()
            log.warning("scenario trigger queue full: %s offer dropped", offer.kind.value, extra={"ref": offer.ref})
            return False
        return True

    def on_call(self, snapshot: RoutingSnapshot, facts: CallFacts) -> None:
        """The router's ``on_inbound``: a call to ``snapshot``'s subscriber from ``facts.caller`` (queued only)."""
        if facts.caller:
            self.offer(TriggerOffer(TriggerKind.CALL, UUID(snapshot.tenant_id), UUID(snapshot.subscriber_id),
                                    facts.caller, f"call:{facts.uuid}", self.clock()))

    async def on_mo(self, tenant_id: UUID, sms: InboundSms) -> None:
        """The SMS outbox's MO hook (beside the read-aloud one): an SMS to one of our subscribers (queued only)."""
        if sms.subscriber_id is not None:
            # The source as received where the SMSC did not say international: the tenant's plan reads it (a
            # national ``8904...`` is +7904... in Russia, not +8904...); the transport's guess is the fallback.
            received = sms.source_received
            self.offer(TriggerOffer(TriggerKind.SMS, tenant_id, sms.subscriber_id, received or sms.source,
                                    f"sms:{sms.id}", sms.received_at, text=sms.body,
                                    sender_guess=sms.source if received else None))

    async def _consume(self) -> None:
        while self._open:
            self._check_cancelled()
            offer = await self._queue.get()
            try:
                await self._take(offer)
            except asyncio.CancelledError:
                TRIGGERS.labels(offer.kind.value, "dropped").inc()
                log.warning("stopping: a %s scenario trigger not taken yet is dropped", offer.kind.value,
                            extra={"ref": offer.ref})
                raise
            finally:
                self._queue.task_done()

    @staticmethod
    def _check_cancelled() -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # A cancel the offer's transaction swallowed (it raced the transaction's own deadline): the intake
            # is stopping, and waiting on the queue (or a backoff) again would hang the stop.
            raise asyncio.CancelledError

    async def _take(self, offer: TriggerOffer) -> None:
        """Handle ``offer``, trying again with backoff while the store does not take it, until it is too old."""
        kind = offer.kind.value
        delay = self.retry_initial_s
        while True:
            age = (self.clock() - offer.at).total_seconds()
            if age > self.max_age_s:
                TRIGGERS.labels(kind, "expired").inc()
                log.warning("scenario trigger dropped: %.0f s old, past its maximum age of %.0f s",
                            age, self.max_age_s, extra={"ref": offer.ref})
                return
            try:
                await self.handle(offer)
            except _NOT_TAKEN as exc:
                TRIGGERS.labels(kind, "retried").inc()
                # Jittered, so instances and consumers do not come back to a recovering server at once.
                wait = delay * random.uniform(0.8, 1.2)
                log.warning("scenario trigger not taken (%s: %s); trying again in %.1f s", type(exc).__name__, exc,
                            wait, extra={"ref": offer.ref})
            except Exception:
                TRIGGERS.labels(kind, "failed").inc()
                log.exception("scenario trigger failed", extra={"ref": offer.ref})
                return
            else:
                return
            self._check_cancelled()
            await asyncio.sleep(wait)
            delay = min(delay * 2, self.retry_max_s)

    async def drain(self) -> None:
        """Wait until every queued offer was handled (tests, shutdown hooks)."""
        await self._queue.join()

    async def handle(self, offer: TriggerOffer) -> list[TriggerResult]:
        """Take ``offer`` now, in one tenant transaction under ``timeout_s``: one result per household of the
        callee (none: the callee is in no household)."""
        kind = offer.kind.value
        async with asyncio.timeout(self.timeout_s), tenant_tx(self.pool, offer.tenant_id) as conn:
            households = await store.households_of(conn, offer.subscriber_id)
            if not households:
                TRIGGERS.labels(kind, "no_household").inc()
                return []
            results: list[TriggerResult] = []
            for household in households:
                sender = (sender_e164(offer.sender, household.numbering_plan)
                          or sender_e164(offer.sender_guess or "", household.numbering_plan))
                if sender is None:  # withheld or unreadable: nobody to match, nothing to store
                    TRIGGERS.labels(kind, "no_sender").inc()
                    results.append(TriggerResult(household.id, "no_sender"))
                    continue
                facts = comms_facts(offer.kind, sender=sender, household_name=household.name,
                                    time_zone=household.time_zone, presence=household.presence,
                                    contacts=household.contacts, home_targets=household.home_targets, at=offer.at,
                                    text=offer.text)
                scenario, keyword = choose(await incidents.load_scenarios(conn, household.id), facts, offer.at)
                if scenario is None:
                    TRIGGERS.labels(kind, "no_scenario").inc()
                    results.append(TriggerResult(household.id, "no_scenario"))
                    continue
                detail = {"trigger": kind, "sender": sender, "scenario": scenario.name,
                          "presence": household.presence.value, "household": str(household.id)}
                if keyword is not None:
                    detail["keyword"] = keyword
                # One reference per household: a callee in two households may start one incident in each.
                ref = offer.ref if len(households) == 1 else f"{offer.ref}:{household.id}"
                opened = await store.open_incident(conn, offer.tenant_id, household.id, EVENT_OF[offer.kind], sender,
                                                   ref, scenario, detail=detail)
                TRIGGERS.labels(kind, opened.kind).inc()
                results.append(TriggerResult(household.id, opened.kind, opened.incident_id, scenario.name))
            return results
