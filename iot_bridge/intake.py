"""Durable intake of one verified device event: ledger row, incident, first decision and audit in one transaction.

The answer (202 + incident id) is given only after the commit, and it is stored with the event so that
the same event_id sent again (a device retry, a replayed capture) gets the same answer and acts no more.
A burst of the same hazard from one device updates the live incident instead of opening another; a
different hazard from the same device opens its own (the unique index is per device *and* hazard).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal
from uuid import UUID

import asyncpg

from iim.core.errors import STORE_UNAVAILABLE
from iot_bridge import store
from iot_bridge.event_types import HAZARDS, HEALTH, HEALTH_CLEARS, EventType
from iot_bridge.events import DeviceEvent
from policy_cache import jobs
from policy_cache.db import Connection, Pool, tenant_tx

__all__ = ["IncidentJobs", "IncidentOpener", "IntakeOutcome", "KnownDevice", "StoreDown", "accept_event", "enqueue_tick"]

log = logging.getLogger(__name__)


class IncidentJobs:
    """Job entrypoint names shared by the intake (which enqueues) and the scenario worker (which runs)."""

    TICK = "incident.tick"
    ACTION = "incident.action"




class StoreDown(Exception):
    """PostgreSQL could not be reached or the transaction could not commit; nothing was written."""


@dataclass(frozen=True, slots=True)
class KnownDevice:
    """The registry facts the intake needs about the authenticated device."""

    tenant_id: UUID
    id: UUID
    household_id: UUID
    external_id: str
    type: str


@dataclass(frozen=True, slots=True)
class IntakeOutcome:
    """What to answer: ``accepted`` (new, 202), ``replayed`` (same id and body: the first answer), or
    ``conflict`` (same id, another body: 422)."""

    kind: Literal["accepted", "replayed", "conflict"]
    body: dict[str, Any]
    incident_id: UUID | None = None
    opened: bool = False


#: Starts a just-opened incident inside the intake transaction (the scenario worker's ``begin_in``); returns
#: what to run once the transaction has committed (the calls it claimed), or None.
IncidentOpener = Callable[[Connection, UUID, UUID], Awaitable[Callable[[], None] | None]]


async def accept_event(pool: Pool, device: KnownDevice, event: DeviceEvent, *, fingerprint: str,
                       channel: str, msg_id: str | None, opener: IncidentOpener | None = None) -> IntakeOutcome:
    """Record ``event`` for ``device`` and schedule what it triggers; idempotent by event_id.

    Raises:
        StoreDown: PostgreSQL is unreachable or failed; the transaction was rolled back.
    """
    try:
        try:
            return await _accept(pool, device, event, fingerprint=fingerprint, channel=channel, msg_id=msg_id,
                                 opener=opener)
        except asyncpg.UniqueViolationError:
            # Two copies of one event raced; the loser now finds the winner's row and replays its answer.
            return await _accept(pool, device, event, fingerprint=fingerprint, channel=channel, msg_id=msg_id,
                                 opener=opener)
        except _DecisionFailed as failed:
            # Making or writing the first decision failed: nothing of it may stay half-written (its calls
            # claimed but never placed), so the event is taken again without it and a tick job decides.
            log.error("starting the incident inline failed (%s); queued for the worker", failed.cause,
                      exc_info=failed.__cause__, extra={"event_id": event.event_id})
            return await _accept(pool, device, event, fingerprint=fingerprint, channel=channel, msg_id=msg_id,
                                 opener=None)
    except STORE_UNAVAILABLE as exc:
        raise StoreDown(f"{type(exc).__name__}: {exc}") from exc


class _DecisionFailed(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = f"{type(cause).__name__}: {cause}"


async def _accept(pool: Pool, device: KnownDevice, event: DeviceEvent, *, fingerprint: str, channel: str,
                  msg_id: str | None, opener: IncidentOpener | None) -> IntakeOutcome:
    hazard = event.type.value if event.type in HAZARDS else None
    after_commit: Callable[[], None] | None = None
    actor = f"device:{device.external_id}"
    async with tenant_tx(pool, device.tenant_id) as conn:
        # Heard: last seen now, "offline" cleared; a health condition opens its incident only when newly raised.
        cleared = HEALTH_CLEARS.get(event.type)
        raised, recovered = await store.device_heard(
            conn, device.id, raise_=event.type.value if event.type in HEALTH else None,
            clear=[cleared.value] if cleared is not None else [], actor=actor)
        if raised:
            hazard = event.type.value
        # The replay check, the incident opened or joined (or the live ones a "cleared" names), the ledger row
        # with its answer and the audit line, in one statement.
        row = await store.intake_event(
            conn, event_id=event.event_id, device_id=device.id, household_id=device.household_id, hazard=hazard,
            cleared=event.type is EventType.CLEARED, event_type=event.type.value, occurred_at=event.occurred_at,
            fingerprint=fingerprint, payload=event.payload, channel=channel, msg_id=msg_id, actor=actor)
        if row["seen_fingerprint"] is not None:
            if row["seen_fingerprint"] != fingerprint:
                return IntakeOutcome("conflict", {"event_id": event.event_id,
                                                  "detail": "event_id was already used with another body"})
            first: dict[str, Any] = row["response"]
            incident = first.get("incident_id")
            return IntakeOutcome("replayed", first, UUID(incident) if incident else None)
        incident_id: UUID | None = row["incident_id"]
        for live in dict.fromkeys([*(row["live"] or ()), *recovered]):
            await enqueue_tick(conn, device.tenant_id, live, reason="cleared", dedupe=f"clear:{event.event_id}:{live}")
        if row["opened"]:
            after_commit = await _start(conn, device, event, opener, incident_id)
        body: dict[str, Any] = row["response"]
    if after_commit is not None:
        after_commit()
    return IntakeOutcome("accepted", body, incident_id, bool(row["opened"]))


async def _start(conn: Connection, device: KnownDevice, event: DeviceEvent, opener: IncidentOpener | None,
                 opened: UUID | None) -> Callable[[], None] | None:
    """Start the incident the event opened (its first calls claimed in this transaction), or queue a tick."""
    assert opened is not None
    if opener is not None:
        try:
            return await opener(conn, device.tenant_id, opened)
        except STORE_UNAVAILABLE:
            raise
        except Exception as exc:  # any failure: the event is taken again without the decision
            raise _DecisionFailed(exc) from exc
    await enqueue_tick(conn, device.tenant_id, opened, reason="opened", dedupe=f"open:{opened}")
    return None


async def enqueue_tick(conn: Connection, tenant_id: UUID, incident_id: UUID, *, reason: str, dedupe: str,
                       delay: timedelta | None = None) -> None:
    """Queue the scenario worker's look at an incident, in the caller's transaction (once per ``dedupe``)."""
    payload = json.dumps({"tenant": str(tenant_id), "incident": str(incident_id), "reason": reason}).encode()
    await jobs.queries_for(conn).enqueue(IncidentJobs.TICK, payload, priority=10, execute_after=delay,
                                         dedupe_key=dedupe, on_conflict="skip")
