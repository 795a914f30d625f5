"""The SIA receiver's one statement: an account number's matches across tenants (migration 0027)."""

from __future__ import annotations

import asyncpg

from policy_cache.db import Pool

__all__ = ["account_matches"]

_LOOKUP = """SELECT tenant_id, receiver, line, key_ref, enabled, device_id, household_id, external_id, type,
                    device_enabled
               FROM iim.sia_account_lookup($1)"""


async def account_matches(pool: Pool, account: str) -> list[asyncpg.Record]:
    """Every tenant's account with this number, with its device (no transaction needed)."""
    rows: list[asyncpg.Record] = await pool.fetch(_LOOKUP, account)
    return rows
