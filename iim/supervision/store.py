"""Every statement of the device watchdog (migration 0025).

``silent_devices`` reads across tenants through a definer function owned by ``iim_sweeper`` (as the incident
deadline sweep does); ``mark_silent`` runs in the device's tenant transaction and re-checks the device under its
row lock, so two instances that found the same device open one incident.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from policy_cache.db import Connection, Pool

__all__ = ["mark_silent", "silent_devices"]

_SILENT = "SELECT tenant_id, device_id FROM iim.silent_devices($1, $2)"
_MARK = "SELECT incident_id, opened FROM iim.device_silent($1, $2, $3, $4)"


async def silent_devices(pool: Pool, cutoff: datetime, limit: int) -> list[tuple[UUID, UUID]]:
    """(tenant, device) of supervised devices due before ``cutoff`` and not yet marked offline, oldest first."""
    return [(r["tenant_id"], r["device_id"]) for r in await pool.fetch(_SILENT, cutoff, limit)]


async def mark_silent(conn: Connection, device_id: UUID, *, cutoff: datetime, now: datetime,
                      actor: str) -> tuple[UUID, bool] | None:
    """Mark the device offline and open (or join) its "offline" incident: (incident, opened); None when it was
    heard meanwhile or another instance marked it first."""
    row = await conn.fetchrow(_MARK, device_id, cutoff, now, actor)
    if row is None:
        return None
    return row["incident_id"], bool(row["opened"])
