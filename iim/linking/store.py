"""Account linking in PostgreSQL (migration 0027): started linkings (``iim.link_state``) and links
(``iim.account_link``). Every statement runs in the caller's tenant transaction, except the two lookups that
must cross tenants: the callback's :func:`take_state` (the state's digest is the only key) and the refresher's
:func:`due_links`, both through security-definer functions, and :func:`households_of_target` on the cache role.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from iim.connectors.contract import LinkScope
from policy_cache.db import Connection
from policy_cache.errors import NotFound

__all__ = ["LinkRow", "TakenState", "due_links", "enter_tenant", "get_link", "households_of_target",
           "insert_state", "lock_link", "mark_link", "owner_msisdn", "save_link", "sweep_states", "take_state",
           "update_tokens"]


@dataclass(frozen=True, slots=True)
class TakenState:
    tenant_id: UUID
    id: UUID
    household_id: UUID
    connector: str
    verifier_sealed: str
    scopes: frozenset[LinkScope]
    actor: str
    expired: bool


@dataclass(frozen=True, slots=True)
class LinkRow:
    id: UUID
    household_id: UUID
    connector: str
    status: str
    scopes: frozenset[LinkScope]
    access_token_sealed: str | None
    refresh_token_sealed: str | None
    access_expires_at: datetime | None
    linked_at: datetime
    refreshed_at: datetime | None
    changed_at: datetime
    actor: str
    reason: str | None


_INSERT_STATE = """
INSERT INTO iim.link_state (id, household_id, connector, state_digest, verifier_sealed, scopes, actor, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, now() + make_interval(secs => $8))
RETURNING expires_at
"""
_SWEEP_STATES = "DELETE FROM iim.link_state WHERE expires_at < now()"
_TAKE_STATE = """
SELECT tenant_id, id, household_id, connector, verifier_sealed, scopes, actor, expired
FROM iim.link_state_take($1)
"""
_ENTER_TENANT = "SELECT set_config('app.tenant', $1::text, true)"
_GET = """
SELECT id, household_id, connector, status::text, scopes, access_token_sealed, refresh_token_sealed,
    access_expires_at, linked_at, refreshed_at, changed_at, actor, reason
FROM iim.account_link WHERE household_id = $1 AND connector = $2
"""
_LOCK = """
SELECT id, household_id, connector, status::text, scopes, access_token_sealed, refresh_token_sealed,
    access_expires_at, linked_at, refreshed_at, changed_at, actor, reason
FROM iim.account_link WHERE id = $1 FOR UPDATE
"""
_LOCK_SKIP = """
SELECT id, household_id, connector, status::text, scopes, access_token_sealed, refresh_token_sealed,
    access_expires_at, linked_at, refreshed_at, changed_at, actor, reason
FROM iim.account_link WHERE id = $1 FOR UPDATE SKIP LOCKED
"""
_SAVE = """
INSERT INTO iim.account_link AS l (id, household_id, connector, status, scopes, access_token_sealed,
                                   refresh_token_sealed, access_expires_at, linked_at, refreshed_at, changed_at,
                                   actor, reason)
VALUES ($1, $2, $3, 'active', $4, $5, $6, now() + make_interval(secs => $7), now(), NULL, now(), $8, NULL)
ON CONFLICT (tenant_id, household_id, connector) DO UPDATE
    SET status = 'active', scopes = EXCLUDED.scopes, access_token_sealed = EXCLUDED.access_token_sealed,
        refresh_token_sealed = EXCLUDED.refresh_token_sealed, access_expires_at = EXCLUDED.access_expires_at,
        linked_at = now(), refreshed_at = NULL, changed_at = now(), actor = EXCLUDED.actor, reason = NULL
    WHERE l.id = EXCLUDED.id
RETURNING id, household_id, connector, status::text, scopes, access_token_sealed, refresh_token_sealed,
    access_expires_at, linked_at, refreshed_at, changed_at, actor, reason
"""
_UPDATE_TOKENS = """
UPDATE iim.account_link
SET access_token_sealed = $2, refresh_token_sealed = coalesce($3, refresh_token_sealed),
    access_expires_at = now() + make_interval(secs => $4), scopes = $5, refreshed_at = now()
WHERE id = $1 AND status = 'active'
RETURNING id, household_id, connector, status::text, scopes, access_token_sealed, refresh_token_sealed,
    access_expires_at, linked_at, refreshed_at, changed_at, actor, reason
"""
_MARK = """
UPDATE iim.account_link
SET status = $2::iim.link_status, access_token_sealed = NULL, refresh_token_sealed = NULL, reason = $3,
    actor = $4, changed_at = now()
WHERE id = $1
RETURNING id, household_id, connector, status::text, scopes, access_token_sealed, refresh_token_sealed,
    access_expires_at, linked_at, refreshed_at, changed_at, actor, reason
"""
_OWNER = """
SELECT s.msisdn FROM iim.binding b JOIN iim.subscriber s ON s.tenant_id = b.tenant_id AND s.id = b.subscriber_id
WHERE b.household_id = $1 AND b.role = 'owner' AND s.msisdn IS NOT NULL
ORDER BY b.id LIMIT 1
"""
_DUE = "SELECT tenant_id, id FROM iim.account_links_due(make_interval(secs => $1), $2)"
# On the cache role (every tenant): whose device is ``target`` at this connector.
_BY_TARGET = """
SELECT DISTINCT d.tenant_id, d.household_id FROM iim.device d
WHERE d.enabled AND d.connector = $1 AND d.connector_ref = $2
"""


def _scopes(values: list[str]) -> frozenset[LinkScope]:
    return frozenset(LinkScope(v) for v in values)


def _link(r: asyncpg.Record) -> LinkRow:
    return LinkRow(r["id"], r["household_id"], r["connector"], r["status"], _scopes(r["scopes"]),
                   r["access_token_sealed"], r["refresh_token_sealed"], r["access_expires_at"], r["linked_at"],
                   r["refreshed_at"], r["changed_at"], r["actor"], r["reason"])


async def insert_state(conn: Connection, *, state_id: UUID, household_id: UUID, connector: str, digest: bytes,
                       verifier_sealed: str, scopes: frozenset[LinkScope], actor: str, ttl_s: int) -> datetime:
    """Store a started linking; returns when it expires. NotFound for a household the tenant does not have."""
    if await conn.fetchval("SELECT 1 FROM iim.household WHERE id = $1", household_id) is None:
        raise NotFound(f"household {household_id} not found", entity="household")
    expires: datetime = await conn.fetchval(_INSERT_STATE, state_id, household_id, connector, digest,
                                            verifier_sealed, sorted(scopes), actor, float(ttl_s))
    return expires


async def sweep_states(conn: Connection) -> int:
    """Forget the tenant's expired started linkings."""
    status: str = await conn.execute(_SWEEP_STATES)
    return int(status.split()[-1])


async def take_state(conn: Connection, digest: bytes) -> TakenState | None:
    """The started linking with this state digest, removed (single use), whatever its tenant; ``None``: none."""
    r = await conn.fetchrow(_TAKE_STATE, digest)
    if r is None:
        return None
    return TakenState(r["tenant_id"], r["id"], r["household_id"], r["connector"], r["verifier_sealed"],
                      _scopes(r["scopes"]), r["actor"], r["expired"])


async def enter_tenant(conn: Connection, tenant_id: UUID) -> None:
    """Scope the rest of the caller's transaction to ``tenant_id`` (the callback learns it from the state)."""
    await conn.execute(_ENTER_TENANT, str(tenant_id))


async def get_link(conn: Connection, household_id: UUID, connector: str) -> LinkRow | None:
    r = await conn.fetchrow(_GET, household_id, connector)
    return None if r is None else _link(r)


async def lock_link(conn: Connection, link_id: UUID, *, skip_locked: bool = False) -> LinkRow | None:
    """The link, locked to the end of the transaction (one refresh at a time: a refresh token is used once)."""
    r = await conn.fetchrow(_LOCK_SKIP if skip_locked else _LOCK, link_id)
    return None if r is None else _link(r)


async def save_link(conn: Connection, *, link_id: UUID, household_id: UUID, connector: str,
                    scopes: frozenset[LinkScope], access_sealed: str, refresh_sealed: str | None, expires_in: int,
                    actor: str) -> LinkRow | None:
    """Create the household's link, or make its existing one (``link_id``) active with these tokens.

    ``None`` when another link row holds the household's slot under another id (the caller re-reads and retries).
    """
    r = await conn.fetchrow(_SAVE, link_id, household_id, connector, sorted(scopes), access_sealed, refresh_sealed,
                            float(expires_in), actor)
    return None if r is None else _link(r)


async def update_tokens(conn: Connection, link_id: UUID, *, access_sealed: str, refresh_sealed: str | None,
                        expires_in: int, scopes: frozenset[LinkScope]) -> LinkRow | None:
    """New tokens of an active link (a refresh without a new refresh token keeps the old one)."""
    r = await conn.fetchrow(_UPDATE_TOKENS, link_id, access_sealed, refresh_sealed, float(expires_in), sorted(scopes))
    return None if r is None else _link(r)


async def mark_link(conn: Connection, link_id: UUID, *, status: str, reason: str, actor: str) -> LinkRow | None:
    """``broken`` or ``revoked``: the tokens are dropped, the row and its history kept."""
    r = await conn.fetchrow(_MARK, link_id, status, reason[:500], actor)
    return None if r is None else _link(r)


async def owner_msisdn(conn: Connection, household_id: UUID) -> str | None:
    """The household's owner's number (who is told that a link broke)."""
    found: str | None = await conn.fetchval(_OWNER, household_id)
    return found


async def due_links(conn: Connection, within_s: float, limit: int = 100) -> list[tuple[UUID, UUID]]:
    """``(tenant, link)`` of active links of any tenant whose access token expires within ``within_s``."""
    return [(r[0], r[1]) for r in await conn.fetch(_DUE, float(within_s), limit)]


async def households_of_target(conn: Connection, connector: str, target: str) -> list[tuple[UUID, UUID]]:
    """On the cache role: ``(tenant, household)`` pairs with an enabled device ``target`` at ``connector``."""
    return [(r[0], r[1]) for r in await conn.fetch(_BY_TARGET, connector, target)]
