"""The operator's desk: incident views and decisions, test calls and test notifications.

Decisions go through the scenario worker (:meth:`IncidentWorker.settle`, :meth:`IncidentWorker.reopen`), so an
operator's "acknowledge" or "false alarm" stops the escalation exactly as the key press does. A test call takes
the alert call's path (the household's bound contacts only, the tenant's plan, allow-list and caps, then the
originate and the IVR) but opens no incident and never escalates: its only traces are its audit lines
(``test_call.placed``, ``test_call.finished`` or ``test_call.refused``) and the metrics' ``purpose="test"``.
Every wait has a deadline: the database's (``deadline_s`` per transaction), the placer's ring and IVR
timeouts, and the connector's request budget.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID, uuid4

from prometheus_client import Counter

from fs_app.outreach.calls import AlertCall, CallOutcome, CallOutcomeKind
from fs_app.outreach.guard import (
    Refusal,
    check_caps,
    destination_refusal,
    limits_from,
    normalised_destination,
)
from iim.connectors.contract import ConnectorError, ConnectorLookup, Notification
from iim.core.errors import STORE_UNAVAILABLE
from iim.core.metrics import REGISTRY
from iim.scenarios import store as incident_store
from iim.scenarios.model import IvrOutcome
from iim.scenarios.operator import store, timeline
from iim.scenarios.operator.models import (
    IncidentQuery,
    IncidentSummary,
    IncidentTimeline,
    TestCallBody,
    TestCallResult,
    TestNotifyBody,
    TestNotifyResult,
)
from iim.scenarios.worker import IncidentWorker
from policy_cache import audit, registry
from policy_cache import errors as store_errors
from policy_cache.db import Connection, Pool, tenant_tx

__all__ = ["OperatorDesk", "DeskUnavailable", "TEST_CALL_TEXT"]

log = logging.getLogger(__name__)

TEST_CALLS = Counter("iim_operator_test_calls", "Operators' test calls, by outcome", ["result"], registry=REGISTRY)
TEST_NOTIFICATIONS = Counter("iim_operator_test_notifications", "Operators' test notifications, by result",
                             ["result"], registry=REGISTRY)

#: What a test call says (rendered by IIM's speech while it rings; the generic prompt plays until then).
TEST_CALL_TEXT = "Тестовый звонок IIM. Нажмите 1. IIM test call. Press 1 to confirm."
#: The test call's IVR: "1" confirms, as on an alert call.
_MEANINGS = {"1": "acknowledge"}
#: A connector that does not answer a test notification within this is reported as not delivering.
NOTIFY_DEADLINE_S = 30.0

WorkerProvider = Callable[[], IncidentWorker | None]
PoolProvider = Callable[[], Pool]


class DeskUnavailable(Exception):
    """What the request needs does not run in this process (the scenario worker, a switch): retry elsewhere."""


class OperatorDesk:
    """Args:
        pool: returns the ``iim_app`` pool (raises ``LookupError`` while not connected).
        worker: returns the scenario worker of this process (None when it does not run one).
        connectors: the loaded connectors (test notifications).
        deadline_s: the deadline of each database transaction.
    """

    def __init__(self, pool: PoolProvider, worker: WorkerProvider, connectors: ConnectorLookup | None = None, *,
                 deadline_s: float = 5.0) -> None:
        self._pool = pool
        self._worker = worker
        self._connectors = connectors
        self._deadline_s = deadline_s

    @asynccontextmanager
    async def _tx(self, tenant_id: UUID, *, write: bool) -> AsyncIterator[Connection]:
        async with asyncio.timeout(self._deadline_s), tenant_tx(self._pool(), tenant_id, readonly=not write) as conn:
            yield conn

    def _running_worker(self) -> IncidentWorker:
        worker = self._worker()
        if worker is None:
            raise DeskUnavailable("the scenario worker does not run in this process")
        return worker

    # -- incidents ------------------------------------------------------------------------------------

    async def incidents(self, tenant_id: UUID, query: IncidentQuery, limit: int, *, actor: str,
                        correlation: Mapping[str, str]) -> list[IncidentSummary]:
        """A page of incidents; the read is audited with the actor (``incident.read``), as reads of contacts are."""
        async with self._tx(tenant_id, write=True) as conn:
            await registry.get(conn, registry.TENANT, tenant_id)  # an unknown tenant is a 404, as elsewhere
            items = await store.list_incidents(conn, query, limit)
            await audit.stage(conn, actor=actor, action=store.READ_ACTION, entity="incident", entity_id=None,
                              detail={"listed": len(items), "query": query.model_dump(mode="json", exclude_none=True)},
                              correlation=dict(correlation))
            return items

    async def incident_scope(self, tenant_id: UUID, incident_id: UUID) -> tuple[UUID | None, UUID | None] | None:
        """The brand and region of the incident's household, for grants scoped to one (None: no such incident)."""
        async with self._tx(tenant_id, write=False) as conn:
            return await store.incident_scope(conn, incident_id)

    async def incident(self, tenant_id: UUID, incident_id: UUID) -> IncidentSummary:
        async with self._tx(tenant_id, write=False) as conn:
            return await _summary(conn, incident_id)

    async def timeline(self, tenant_id: UUID, incident_id: UUID, *, actor: str,
                       correlation: Mapping[str, str]) -> IncidentTimeline:
        """The incident and its timeline, which names the household's contacts and their numbers: the read is
        audited with the actor (``incident.read``; left out of the timeline itself)."""
        async with self._tx(tenant_id, write=True) as conn:
            summary = await _summary(conn, incident_id)
            rows = await store.incident_rows(conn, incident_id)
            await audit.stage(conn, actor=actor, action=store.READ_ACTION, entity="incident", entity_id=incident_id,
                              detail={}, correlation=dict(correlation))
        return IncidentTimeline(incident=summary, events=rows.events, actions=rows.actions, sms=rows.sms,
                                audit=rows.audit, timeline=timeline.merge(rows.events, rows.actions, rows.sms,
                                                                          rows.audit))

    async def decide(self, tenant_id: UUID, incident_id: UUID, decision: IvrOutcome, *, actor: str, note: str,
                     correlation: Mapping[str, str]) -> IncidentSummary:
        """Acknowledge or close as a false alarm (the worker's :meth:`~IncidentWorker.settle`)."""
        worker = self._running_worker()
        async with asyncio.timeout(self._deadline_s):
            await worker.settle(tenant_id, incident_id, decision, actor=actor, note=note, correlation=correlation)
        return await self.incident(tenant_id, incident_id)

    async def reopen(self, tenant_id: UUID, incident_id: UUID, *, actor: str, note: str, resume_calls: bool,
                     correlation: Mapping[str, str]) -> IncidentSummary:
        worker = self._running_worker()
        async with asyncio.timeout(self._deadline_s):
            await worker.reopen(tenant_id, incident_id, actor=actor, note=note, resume_calls=resume_calls,
                                correlation=correlation)
        return await self.incident(tenant_id, incident_id)

    # -- tests ----------------------------------------------------------------------------------------

    async def test_call(self, tenant_id: UUID, body: TestCallBody, *, actor: str,
                        correlation: Mapping[str, str]) -> TestCallResult:
        """Ring a bound contact of the household through the alert call's guard, caps, originate and IVR."""
        worker = self._running_worker()
        if worker.placer is None:
            raise DeskUnavailable("no FreeSWITCH node is configured in this process")
        call_id = uuid4()
        where = {**correlation, "call_id": str(call_id), "purpose": "test"}
        async with self._tx(tenant_id, write=True) as conn:
            number = await store.household_contact(conn, body.household_id, body.contact)
            if number is None:
                raise store_errors.InvalidReference(
                    "no contact with that subscriber id or number is bound to the household", entity="binding")
            row, bound, plan = await incident_store.originate_facts(conn, body.household_id)
            limits = limits_from(row, worker.settings.default_limits, plan)
            destination = normalised_destination(number, limits)
            refusal = destination_refusal(destination, bound=bound, limits=limits)
            claim = None
            if refusal is None:
                claim = await store.claim_test_originate(conn, limits.max_concurrent, limits.max_per_hour)
                if not claim.claimed:  # a test never waits for a place: it is refused at once
                    verdict = check_caps(limits, in_flight=claim.in_flight, last_hour=claim.last_hour,
                                         waited_s=limits.max_wait_s)
                    refusal = verdict if isinstance(verdict, Refusal) else Refusal("concurrent_cap", "caps reached")
            detail: dict[str, Any] = {"household_id": str(body.household_id), "destination": destination}
            if refusal is not None:
                detail |= {"outcome": "refused", "reason": refusal.reason, "detail": refusal.detail}
                await _audit(conn, actor, "test_call.refused", body.household_id, detail, where)
            else:
                await _audit(conn, actor, "test_call.placed", body.household_id, detail, where)
        if refusal is not None:
            TEST_CALLS.labels("refused").inc()
            return TestCallResult(call_id=call_id, household_id=body.household_id, destination=destination,
                                  outcome="refused", digit=None, confirmed=False, hangup_cause=None,
                                  refusal_reason=refusal.reason, detail=refusal.detail)
        assert claim is not None
        call = AlertCall(
            call_uuid=str(call_id), destination=destination, caller_id_number=worker.settings.caller_id_number,
            caller_id_name=worker.settings.caller_id_name, ring_s=body.ring_s, prompt="say:" + TEST_CALL_TEXT,
            digits="1", tries=2, digit_timeout_s=5,
            variables={"iim_tenant_id": str(tenant_id), "iim_purpose": "test", "tts_engine": worker.settings.tts_engine,
                       "tts_voice": worker.settings.tts_voice})
        outcome = await worker.place_test_call(call, _MEANINGS, TEST_CALL_TEXT)
        result = _result(call_id, body.household_id, destination, outcome)
        TEST_CALLS.labels(result.outcome).inc()
        try:
            async with self._tx(tenant_id, write=True) as conn:
                await store.settle_test_originate(conn, claim.at)
                await _audit(conn, actor, "test_call.finished", body.household_id,
                             {**detail, "outcome": result.outcome, "digit": result.digit,
                              "confirmed": result.confirmed, "hangup_cause": result.hangup_cause,
                              "detail": result.detail}, where)
        except STORE_UNAVAILABLE as exc:  # the call is over: its answer is still the operator's
            log.warning("test call's outcome not audited: store unavailable (%s)", type(exc).__name__,
                        extra={"call_id": str(call_id)})
        return result

    async def test_notify(self, tenant_id: UUID, body: TestNotifyBody, *, actor: str,
                          correlation: Mapping[str, str]) -> TestNotifyResult:
        """Send a notification to one device through its connector and report the vendor's answer."""
        async with self._tx(tenant_id, write=False) as conn:
            target = await store.notify_target(conn, body.device_id, body.connector)
        if target is None:
            raise store_errors.InvalidReference("no device with that id is reachable through that connector",
                                                entity="device")
        connector = self._connectors.get(body.connector) if self._connectors is not None else None
        if connector is None:
            raise store_errors.InvalidReference(f"no connector named {body.connector!r} is loaded here",
                                                entity="connector")
        vendor_id: str | None = None
        error: str | None = None
        note = Notification(target=target, title="IIM test", text=body.text,
                            correlation={**correlation, "purpose": "test"})
        try:
            async with asyncio.timeout(NOTIFY_DEADLINE_S):
                vendor_id = await connector.send_notification(note)
        except ConnectorError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        except TimeoutError:
            error = f"no answer within {NOTIFY_DEADLINE_S:.0f} s"
        delivered = error is None
        TEST_NOTIFICATIONS.labels("delivered" if delivered else "failed").inc()
        async with self._tx(tenant_id, write=True) as conn:
            await audit.stage(conn, actor=actor, action="test_notify", entity="device", entity_id=body.device_id,
                              detail={"connector": body.connector, "delivered": delivered,
                                      "vendor_message_id": vendor_id, "error": error},
                              correlation={**correlation, "purpose": "test"})
        return TestNotifyResult(connector=body.connector, device_id=body.device_id, delivered=delivered,
                                vendor_message_id=vendor_id, error=error)


async def _summary(conn: Connection, incident_id: UUID) -> IncidentSummary:
    found = await store.incident_summary(conn, incident_id)
    if found is None:
        raise store_errors.NotFound(f"incident {incident_id} not found", entity="incident")
    return found


async def _audit(conn: Connection, actor: str, action: str, household_id: UUID, detail: dict[str, Any],
                 correlation: Mapping[str, str]) -> None:
    await audit.stage(conn, actor=actor, action=action, entity="household", entity_id=household_id, detail=detail,
                      correlation=dict(correlation))


def _result(call_id: UUID, household_id: UUID, destination: str, outcome: CallOutcome) -> TestCallResult:
    answered = outcome.kind is CallOutcomeKind.ANSWERED
    return TestCallResult(call_id=call_id, household_id=household_id, destination=destination,
                          outcome=outcome.kind.value, digit=outcome.digit if answered else None,
                          confirmed=answered and outcome.digit == "1", hangup_cause=outcome.hangup_cause,
                          refusal_reason=None, detail=outcome.detail)
