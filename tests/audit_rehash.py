"""What a PostgreSQL superuser can do to the audit chain: switch the append-only triggers off, change a row and
re-hash every row from it on, leaving a chain that verifies (tests of the published heads use it)."""

from __future__ import annotations

import hashlib
from uuid import UUID

import asyncpg

from policy_cache.audit import GENESIS_HASH, canonical_json, canonical_json_v2


async def rehash_from(admin_url: str, tenant: UUID, first: int, *, actor: str = "mallory") -> None:
    """Set row ``first``'s actor to ``actor`` and recompute the tenant's chain from it, as a superuser."""
    conn = await asyncpg.connect(admin_url)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute("UPDATE iim.audit_log SET actor = $3 WHERE tenant_id = $1 AND id = $2",
                               tenant, first, actor)
            prev = await conn.fetchval("SELECT row_hash FROM iim.audit_log WHERE tenant_id = $1 AND id < $2 "
                                       "ORDER BY id DESC LIMIT 1", tenant, first)
            prev = bytes(prev) if prev is not None else GENESIS_HASH
            rows = await conn.fetch("SELECT id, at, actor, action, entity, entity_id, detail::text AS d, "
                                    "correlation::text AS c, detail_digest FROM iim.audit_log WHERE tenant_id = $1 AND id >= $2 "
                                    "ORDER BY id", tenant, first)
            for r in rows:
                if r["detail_digest"] is not None:
                    text = canonical_json_v2(tenant_id=tenant, id=r["id"], at=r["at"], actor=r["actor"],
                                             action=r["action"], entity=r["entity"], entity_id=r["entity_id"],
                                             detail_digest=bytes(r["detail_digest"]), correlation_text=r["c"])
                else:
                    text = canonical_json(tenant_id=tenant, id=r["id"], at=r["at"], actor=r["actor"],
                                          action=r["action"], entity=r["entity"], entity_id=r["entity_id"],
                                          detail_text=r["d"], correlation_text=r["c"])
                digest = hashlib.sha256(prev + text.encode()).digest()
                await conn.execute("UPDATE iim.audit_log SET prev_hash = $3, row_hash = $4 "
                                   "WHERE tenant_id = $1 AND id = $2", tenant, r["id"], prev, digest)
                prev = digest
    finally:
        await conn.close()
