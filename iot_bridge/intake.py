"""Durable intake of one verified device event: ledger row, incident, job and audit in one transaction.

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

from iot_bridge.event_types import HAZARDS, EventType
from iot_bridge.events import DeviceEvent
from policy_cache import audit, jobs
from policy_cache.db import Connection, Pool, savepoint, tenant_tx

__all__ = ["STORE_DOWN_ERRORS", "IncidentJobs", "IncidentOpener", "IntakeOutcome", "KnownDevice", "StoreDown", "accept_event"]

log = logging.getLogger(__name__)


class IncidentJobs:
    """Job entrypoint names shared by the intake (which enqueues) and the scenario worker (which runs)."""

    TICK = "incident.tick"
    ACTION = "incident.action"


#: Errors meaning "PostgreSQL is not there right now" (retry later), as opposed to a bug or bad data.
STORE_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError, asyncpg.exceptions.ReadOnlySQLTransactionError,
)


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


# The replay check and the live incident of the same device and hazard (updated) or a new one: migration 0011.
_ROUTE = "SELECT seen_fingerprint, seen_response, incident_id, opened FROM iim.intake_route($1, $2, $3, $4)"
_LIVE = "SELECT id FROM iim.incident WHERE device_id = $1 AND state IN ('open', 'notifying')"
_INSERT_EVENT = """
INSERT INTO iim.device_event (event_id, device_id, type, occurred_at, fingerprint, payload, channel, msg_id,
                              incident_id, response)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10::jsonb)"""


#: Starts a just-opened incident inside the intake transaction (the scenario worker's ``begin_in``).
IncidentOpener = Callable[[Connection, UUID, UUID], Awaitable[None]]


async def accept_event(pool: Pool, device: KnownDevice, event: DeviceEvent, *, fingerprint: str,
                       channel: str, msg_id: str | None, opener: IncidentOpener | None = None) -> IntakeOutcome:
    """Record ``event`` for ``device`` and schedule what it triggers; idempotent by event_id.

    Raises:
        StoreDown: PostgreSQL is unreachable or failed; the transaction was rolled back.
    """
    try:
        return await _accept(pool, device, event, fingerprint=fingerprint, channel=channel, msg_id=msg_id,
                             opener=opener)
    except asyncpg.UniqueViolationError:
        # Two copies of one event raced; the loser now finds the winner's row and replays its answer.
        return await _accept(pool, device, event, fingerprint=fingerprint, channel=channel, msg_id=msg_id,
                             opener=opener)
    except STORE_DOWN_ERRORS as exc:
        raise StoreDown(f"{type(exc).__name__}: {exc}") from exc


async def _accept(pool: Pool, device: KnownDevice, event: DeviceEvent, *, fingerprint: str, channel: str,
                  msg_id: str | None, opener: IncidentOpener | None) -> IntakeOutcome:
    hazard = event.type.value if event.type in HAZARDS else None
    async with tenant_tx(pool, device.tenant_id) as conn:
        route = await conn.fetchrow(_ROUTE, event.event_id, device.id, device.household_id, hazard)
        assert route is not None
        if route["seen_fingerprint"] is not None:
            if route["seen_fingerprint"] != fingerprint:
                return IntakeOutcome("conflict", {"event_id": event.event_id,
                                                  "detail": "event_id was already used with another body"})
            first: dict[str, Any] = route["seen_response"]
            incident = first.get("incident_id")
            return IntakeOutcome("replayed", first, UUID(incident) if incident else None)

        incident_id, opened, action = await _route(conn, device, event, opener, route["incident_id"],
                                                   route["opened"])
        body: dict[str, Any] = {"event_id": event.event_id, "status": "accepted",
                                "incident_id": str(incident_id) if incident_id else None, "action": action}
        await conn.execute(_INSERT_EVENT, event.event_id, device.id, event.type.value, event.occurred_at,
                           fingerprint, event.payload, channel, msg_id, incident_id, body)
        if incident_id is not None:
            await audit.stage(conn, actor=f"device:{device.external_id}", action=f"incident.{action}",
                              entity="incident", entity_id=incident_id,
                              detail={"hazard": event.type.value, "channel": channel},
                              correlation={"event_id": event.event_id})
        return IntakeOutcome("accepted", body, incident_id, opened)


async def _route(conn: Connection, device: KnownDevice, event: DeviceEvent, opener: IncidentOpener | None,
                 incident_id: UUID | None, opened_now: bool) -> tuple[UUID | None, bool, str]:
    """Start the incident ``iim.intake_route`` opened, or say what the event did to one; enqueue the work."""
    if event.type is EventType.CLEARED:
        live = await conn.fetch(_LIVE, device.id)
        for row in live:
            await _enqueue_tick(conn, device.tenant_id, row["id"], reason="cleared", dedupe=f"clear:{event.event_id}")
        return (live[0]["id"] if live else None), False, "cleared" if live else "recorded"
    if incident_id is None:
        return None, False, "recorded"
    if not opened_now:
        return incident_id, False, "updated"
    opened = incident_id
    if opener is not None:
        try:
            async with savepoint(conn):  # a failing decision must not cost the event
                await opener(conn, device.tenant_id, opened)
        except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError, TimeoutError):
            raise
        except Exception:  # any engine failure: the tick job below retries the decision
            log.exception("starting incident %s inline failed; queued for the worker", opened,
                          extra={"event_id": event.event_id})
        else:
            return opened, True, "opened"
    await _enqueue_tick(conn, device.tenant_id, opened, reason="opened", dedupe=f"open:{opened}")
    return opened, True, "opened"


async def _enqueue_tick(conn: Connection, tenant_id: UUID, incident_id: UUID, *, reason: str, dedupe: str,
                        delay: timedelta | None = None) -> None:
    payload = json.dumps({"tenant": str(tenant_id), "incident": str(incident_id), "reason": reason}).encode()
    await jobs.queries_for(conn).enqueue(IncidentJobs.TICK, payload, priority=10, execute_after=delay,
                                         dedupe_key=dedupe, on_conflict="skip")
