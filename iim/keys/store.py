"""Every statement on ``iim.tenant_data_key``: a tenant's data keys, each stored wrapped by a master key."""

from __future__ import annotations

from uuid import UUID

import asyncpg

from policy_cache.db import Connection, Pool

__all__ = ["active_key", "credential_ref_schemes", "data_key_masters", "insert_key", "key_by_id", "keys", "rewrap", "tenant_ids"]

_COLUMNS = "key_id, wrapped, master_key_id, created_at, rewrapped_at"


async def active_key(conn: Connection) -> asyncpg.Record | None:
    """The caller's tenant's newest data key (the one new fields are sealed with), or None."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM iim.tenant_data_key ORDER BY key_id DESC LIMIT 1")  # noqa: S608 -- constants
    return row


async def key_by_id(conn: Connection, key_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM iim.tenant_data_key WHERE key_id = $1", key_id)  # noqa: S608 -- constants
    return row


async def keys(conn: Connection) -> list[asyncpg.Record]:
    """Every data key of the caller's tenant, oldest first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {_COLUMNS} FROM iim.tenant_data_key ORDER BY key_id")  # noqa: S608 -- constants
    return rows


async def insert_key(conn: Connection, key_id: int, wrapped: bytes, master_key_id: str) -> bool:
    """Store a new wrapped data key for the caller's tenant; False when ``key_id`` exists already (someone
    else created it first: theirs wins)."""
    done = await conn.fetchval(
        "INSERT INTO iim.tenant_data_key (key_id, wrapped, master_key_id) VALUES ($1, $2, $3) "
        "ON CONFLICT (tenant_id, key_id) DO NOTHING RETURNING key_id", key_id, wrapped, master_key_id)
    return done is not None


async def rewrap(conn: Connection, key_id: int, old_master_key_id: str, wrapped: bytes, master_key_id: str) -> bool:
    """Replace a data key's wrapping (master-key rotation), only if it is still wrapped by the old master."""
    done = await conn.fetchval(
        "UPDATE iim.tenant_data_key SET wrapped = $3, master_key_id = $4, rewrapped_at = now() "
        "WHERE key_id = $1 AND master_key_id = $2 RETURNING key_id", key_id, old_master_key_id, wrapped,
        master_key_id)
    return done is not None


async def tenant_ids(pool: Pool) -> list[UUID]:
    """Every tenant (a pool that may see them all: the cache role's)."""
    return [r["id"] for r in await pool.fetch("SELECT id FROM iim.tenant ORDER BY id")]


async def credential_ref_schemes(pool: Pool) -> dict[str, int]:
    """How many registry credential references each scheme has, every tenant (``iim.credential_ref_schemes``:
    the schemes only, never a reference)."""
    return {r["scheme"]: int(r["refs"]) for r in await pool.fetch("SELECT * FROM iim.credential_ref_schemes()")}


async def data_key_masters(pool: Pool) -> dict[str, int]:
    """How many data keys (every tenant) each master key fingerprint wraps (``iim.data_key_masters``)."""
    return {r["master_key_id"]: int(r["keys"]) for r in await pool.fetch("SELECT * FROM iim.data_key_masters()")}
