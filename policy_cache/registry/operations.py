"""What only some registry entities have, on top of the generic CRUD: state changes with their own audit
action (presence, device status) and lookups by something other than the id (a subscriber by number, the
originate plan that applies to a number)."""

from __future__ import annotations

from uuid import UUID

from iim.core.numbering import DEFAULT_PLAN, NumberingPlan
from policy_cache.db import Connection
from policy_cache.errors import NotFound
from policy_cache.models import (
    Device,
    DeviceStatus,
    DeviceUpdate,
    Household,
    HouseholdUpdate,
    NumberingPlanRow,
    OriginateLimit,
    Policy,
    PresenceState,
    Subscriber,
)
from policy_cache.registry import crud
from policy_cache.registry.crud import Correlation
from policy_cache.registry.tables import (
    DEVICE,
    HOUSEHOLD,
    NUMBERING_PLAN,
    ORIGINATE_LIMIT,
    POLICY,
    SUBSCRIBER,
)

__all__ = ["get_numbering_plan", "get_originate_plan", "plan_of", "get_policy_for", "get_subscriber_by_msisdn", "set_device_status", "set_presence"]


async def set_presence(conn: Connection, household_id: UUID, presence: PresenceState, *, actor: str,
                       correlation: Correlation = None) -> Household:
    """Presence change, audited as ``household.presence`` (``presence_changed_at`` is set by the database
    when the state changes)."""
    return await crud.update(conn, HOUSEHOLD, household_id, HouseholdUpdate(presence=PresenceState(presence)),
                             actor=actor, correlation=correlation, action="household.presence")


async def set_device_status(conn: Connection, device_id: UUID, status: DeviceStatus, *, actor: str,
                            correlation: Correlation = None) -> Device:
    """Status change, audited as ``device.status`` (``status_changed_at`` is set by the database when the
    status changes)."""
    return await crud.update(conn, DEVICE, device_id, DeviceUpdate(status=DeviceStatus(status)), actor=actor,
                             correlation=correlation, action="device.status")


async def get_subscriber_by_msisdn(conn: Connection, msisdn: str) -> Subscriber:
    rows = await crud.list_rows(conn, SUBSCRIBER, msisdn=msisdn, limit=1)
    if not rows:
        raise NotFound(f"subscriber {msisdn} not found", entity="subscriber")
    return rows[0]


async def get_policy_for(conn: Connection, *, subscriber_id: UUID | None = None,
                         household_id: UUID | None = None) -> Policy | None:
    """The policy attached to exactly this subscriber or household (no inheritance applied)."""
    if (subscriber_id is None) == (household_id is None):
        raise ValueError("pass exactly one of subscriber_id / household_id")
    rows = await crud.list_rows(conn, POLICY, subscriber_id=subscriber_id, household_id=household_id, limit=1)
    return rows[0] if rows else None


async def get_originate_plan(conn: Connection, number: str) -> tuple[OriginateLimit | None, list[str]]:
    """The tenant's originate limits row (None: the service's defaults) and the allow-list entries that are
    prefixes of ``number`` (the only ones that can admit it), for ``fs_app.outreach.guard.number_refusal``."""
    rows = await crud.list_rows(conn, ORIGINATE_LIMIT, limit=1)
    with crud.store_errors(ORIGINATE_LIMIT):
        allowed = await conn.fetch("SELECT prefix FROM iim.originate_allow WHERE starts_with($1, prefix) "
                                   "ORDER BY prefix", number)
    return (rows[0] if rows else None), [r["prefix"] for r in allowed]


def plan_of(row: NumberingPlanRow | None) -> NumberingPlan:
    """The plan a stored row describes; no row: the default plan."""
    if row is None:
        return DEFAULT_PLAN
    return NumberingPlan(row.country_code, row.trunk_prefix, tuple(row.international_prefixes),
                         tuple(row.national_lengths))


async def get_numbering_plan(conn: Connection) -> NumberingPlan:
    """The numbering plan of the transaction's tenant (its row, else the default plan)."""
    rows = await crud.list_rows(conn, NUMBERING_PLAN, limit=1)
    return plan_of(rows[0] if rows else None)
