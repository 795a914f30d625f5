"""Every statement of the device bridge: the intake's one-statement write and the directory's lookups.

The intake's statement (``iim.intake_event``, migration 0012) does the replay check, opens or joins the
incident, writes the ledger row with its answer and the audit line at once: one round trip per event.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from policy_cache.db import Connection, Pool

__all__ = ["credential_ref", "device_heard", "event_device", "gateway_household", "intake_event"]

_INTAKE = """SELECT seen_fingerprint, response, incident_id, opened, live
               FROM iim.intake_event($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11, $12)"""
# One statement, no transaction: the function scopes itself to the tenant (migration 0010).
# The device was heard: last seen, due again, its health conditions raised or cleared (migration 0025).
_HEARD = "SELECT raised, clear FROM iim.device_heard($1, $2, $3::text[], $4)"
_DEVICE = "SELECT id, household_id, external_id, type, enabled, connector, kind, ref FROM iim.event_device($1, $2)"
_SOURCE = "SELECT kind::text AS kind, ref FROM iim.credential_ref WHERE name = $1"
_GATEWAY = "SELECT household_id FROM iim.device WHERE external_id = $1 AND type = 'hub' AND enabled"


async def intake_event(conn: Connection, *, event_id: str, device_id: UUID, household_id: UUID, hazard: str | None,
                       cleared: bool, event_type: str, occurred_at: datetime, fingerprint: str, payload: Any,
                       channel: str, msg_id: str | None, actor: str) -> asyncpg.Record:
    """Record one event in the caller's tenant transaction: (seen_fingerprint, response) of an event_id seen
    before, else the incident it opened or joined (``opened``) or, for "cleared", the ``live`` ones."""
    row: asyncpg.Record | None = await conn.fetchrow(
        _INTAKE, event_id, device_id, household_id, hazard, cleared, event_type, occurred_at, fingerprint, payload,
        channel, msg_id, actor)
    assert row is not None
    return row


async def device_heard(conn: Connection, device_id: UUID, *, raise_: str | None, clear: list[str],
                       actor: str) -> tuple[bool, list[UUID]]:
    """Mark ``device_id`` heard in the caller's tenant transaction: whether ``raise_`` was newly raised (its
    incident is to open), and the live incidents of the conditions it cleared ("offline" always)."""
    row: asyncpg.Record | None = await conn.fetchrow(_HEARD, device_id, raise_, clear, actor)
    assert row is not None
    return bool(row["raised"]), list(row["clear"])


async def event_device(pool: Pool, tenant_id: UUID, external_id: str) -> asyncpg.Record | None:
    """The device posting as ``external_id`` with its credential reference (no transaction needed)."""
    row: asyncpg.Record | None = await pool.fetchrow(_DEVICE, tenant_id, external_id)
    return row


async def credential_ref(conn: Connection, name: str) -> asyncpg.Record | None:
    """(kind, ref) of the tenant's credential reference ``name``."""
    row: asyncpg.Record | None = await conn.fetchrow(_SOURCE, name)
    return row


async def gateway_household(conn: Connection, gateway_id: str) -> UUID | None:
    """The household of the tenant's enabled hub ``gateway_id``."""
    household: UUID | None = await conn.fetchval(_GATEWAY, gateway_id)
    return household
