"""Every statement of hub commands (migrations 0035, 0040): the hub they go to, the command row, the hub's answer,
a hub's commands page by page, and the retention purge.

All in the caller's tenant transaction (row-level security scopes each statement to the tenant), but the purge,
which runs across tenants (``iim.hub_command_purge``, owned by iim_sweeper).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from policy_cache.db import Connection, Pool

__all__ = ["find_command", "find_hub", "insert_command", "list_commands", "purge_commands", "record_ack"]

_HUB = "SELECT id, enabled, household_id FROM iim.device WHERE external_id = $1 AND type = 'hub'"
_FIND = """SELECT command_id, name, arguments, state, actor, sent_at, acked_at, ack_detail
             FROM iim.hub_command WHERE device_id = $1 AND command_id = $2"""
# ON CONFLICT DO NOTHING: a concurrent request with the same id waits for the first one's transaction, then
# inserts nothing (the caller reads the first one's row).
_INSERT = """INSERT INTO iim.hub_command (device_id, command_id, name, arguments, actor) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT DO NOTHING
             RETURNING command_id, name, arguments, state, actor, sent_at, acked_at, ack_detail"""
# Newest first, keyset paging on (sent_at, command_id): the index hub_command_newest (migration 0040).
_LIST = """SELECT command_id, name, arguments, state, actor, sent_at, acked_at, ack_detail FROM iim.hub_command
            WHERE device_id = $1 AND ($2::text IS NULL OR state = $2)
              AND ($3::timestamptz IS NULL OR (sent_at, command_id) < ($3, $4::text))
            ORDER BY sent_at DESC, command_id DESC LIMIT $5"""
_PURGE = "SELECT tenant_id, purged FROM iim.hub_command_purge($1, $2)"
# 'accepted' may follow 'sent' only; a final state follows 'sent' or 'accepted' and is never replaced.
_ACK = """UPDATE iim.hub_command c SET state = $3, acked_at = now(), ack_detail = $4
            FROM iim.device d
           WHERE d.id = c.device_id AND d.external_id = $1 AND d.type = 'hub' AND c.command_id = $2
             AND (c.state = 'sent' OR (c.state = 'accepted' AND $3 <> 'accepted'))
       RETURNING c.device_id, c.name"""


async def find_hub(conn: Connection, hub: str) -> asyncpg.Record | None:
    """(id, enabled, household_id) of the tenant's hub whose external id is ``hub``."""
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


async def list_commands(conn: Connection, device_id: UUID, *, state: str | None, after: tuple[datetime, str] | None,
                        limit: int) -> list[asyncpg.Record]:
    """A page of the hub's commands, newest first, after the cursor ``(sent_at, command_id)`` when given."""
    after_at, after_id = after if after is not None else (None, None)
    rows: list[asyncpg.Record] = await conn.fetch(_LIST, device_id, state, after_at, after_id, limit)
    return rows


async def purge_commands(pool: Pool, *, keep_s: int, limit: int, timeout_s: float) -> list[tuple[UUID, int]]:
    """Delete, every tenant, at most ``limit`` commands past their retention (the tenant's ``hub_command_s``, else
    ``keep_s``); how many per tenant."""
    rows = await pool.fetch(_PURGE, keep_s, limit, timeout=timeout_s)
    return [(r["tenant_id"], int(r["purged"])) for r in rows]
