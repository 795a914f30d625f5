"""Every statement of hub commands (migration 0035): the hub they go to, the command row, the hub's answer.

All in the caller's tenant transaction (row-level security scopes each statement to the tenant).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

from policy_cache.db import Connection

__all__ = ["find_command", "find_hub", "insert_command", "record_ack"]

_HUB = "SELECT id, enabled FROM iim.device WHERE external_id = $1 AND type = 'hub'"
_FIND = """SELECT command_id, name, arguments, state, actor, sent_at, acked_at, ack_detail
             FROM iim.hub_command WHERE device_id = $1 AND command_id = $2"""
# ON CONFLICT DO NOTHING: a concurrent request with the same id waits for the first one's transaction, then
# inserts nothing (the caller reads the first one's row).
_INSERT = """INSERT INTO iim.hub_command (device_id, command_id, name, arguments, actor) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT DO NOTHING
             RETURNING command_id, name, arguments, state, actor, sent_at, acked_at, ack_detail"""
# 'accepted' may follow 'sent' only; a final state follows 'sent' or 'accepted' and is never replaced.
_ACK = """UPDATE iim.hub_command c SET state = $3, acked_at = now(), ack_detail = $4
            FROM iim.device d
           WHERE d.id = c.device_id AND d.external_id = $1 AND d.type = 'hub' AND c.command_id = $2
             AND (c.state = 'sent' OR (c.state = 'accepted' AND $3 <> 'accepted'))
       RETURNING c.device_id, c.name"""


async def find_hub(conn: Connection, hub: str) -> asyncpg.Record | None:
    """(id, enabled) of the tenant's hub whose external id is ``hub``."""
    row: asyncpg.Record | None = await conn.fetchrow(_HUB, hub)
    return row


async def find_command(conn: Connection, device_id: UUID, command_id: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(_FIND, device_id, command_id)
    return row


async def insert_command(conn: Connection, device_id: UUID, command_id: str, name: str, arguments: dict[str, Any],
                         actor: str) -> asyncpg.Record | None:
    """The new row, or None when the id is taken (by a request committed meanwhile)."""
    row: asyncpg.Record | None = await conn.fetchrow(_INSERT, device_id, command_id, name, arguments, actor)
    return row


async def record_ack(conn: Connection, hub: str, command_id: str, state: str,
                     detail: str | None) -> asyncpg.Record | None:
    """(device_id, name) of the command the hub's answer moved on; None when it moved nothing (an unknown id,
    a repeat, a late ``accepted`` after the final answer)."""
    row: asyncpg.Record | None = await conn.fetchrow(_ACK, hub, command_id, state, detail)
    return row
