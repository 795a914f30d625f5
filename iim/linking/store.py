"""Account linking in PostgreSQL (migrations 0032, 0039): started linkings (``iim.link_state``) and links
(``iim.account_link``). Every statement runs in the caller's tenant transaction, except the lookups that must
cross tenants: the callback's :func:`take_state` (the state's digest is the only key), the refresher's
:func:`due_links` and the start's :func:`legacy_secrets`, through security-definer functions, and
:func:`households_of_target` on the cache role.

Each sealed value has the id of the tenant data key that sealed it beside it (``*_key``); ``None`` beside a
value: the old format (one process-wide key), converted by :mod:`iim.linking.resealing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from iim.connectors.contract import LinkScope
from policy_cache.db import Connection, Pool
from policy_cache.errors import NotFound

__all__ = ["ACCOUNT_LINK", "LINK_STATE", "LegacySecrets", "LinkRow", "SEALED_COLUMNS", "Sealed", "TakenState", "delete_legacy_states",
           "due_links", "enter_tenant", "get_link", "households_of_target", "insert_state", "legacy_secrets",
           "lock_link", "mark_link", "own_home_links", "owner_msisdn", "reseal", "save_link", "sealed_counts", "sealed_rows",
           "sweep_states", "take_state", "update_tokens"]

#: The tables holding sealed link secrets (the ``table`` of their associated data, and of :func:`sealed_rows`).
ACCOUNT_LINK, LINK_STATE = "account_link", "link_state"


@dataclass(frozen=True, slots=True)
class Sealed:
    """One sealed value and the tenant data key that sealed it (``None``: the old process-wide key)."""

    text: str
    key_id: int | None


@dataclass(frozen=True, slots=True)
class TakenState:
    tenant_id: UUID
    id: UUID
    household_id: UUID
    connector: str
    verifier: Sealed
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
    access_token: Sealed | None
    refresh_token: Sealed | None
    access_expires_at: datetime | None
    linked_at: datetime
    refreshed_at: datetime | None
    changed_at: datetime
    actor: str
    reason: str | None


_INSERT_STATE = """
INSERT INTO iim.link_state (id, household_id, connector, state_digest, verifier_sealed, verifier_key, scopes, actor,
                            expires_at)
VALUES ($1, $2, $3, $4, $5, $9, $6, $7, now() + make_interval(secs => $8))
RETURNING expires_at
"""
_SWEEP_STATES = "DELETE FROM iim.link_state WHERE expires_at < now()"
_TAKE_STATE = """
SELECT tenant_id, id, household_id, connector, verifier_sealed, verifier_key, scopes, actor, expired
FROM iim.link_state_take($1)
"""
_ENTER_TENANT = "SELECT set_config('app.tenant', $1::text, true)"
_GET = """
SELECT id, household_id, connector, status::text, scopes, access_token_sealed, access_token_key,
    refresh_token_sealed, refresh_token_key, access_expires_at, linked_at, refreshed_at, changed_at, actor, reason
FROM iim.account_link WHERE household_id = $1 AND connector = $2
"""
_LOCK = """
SELECT id, household_id, connector, status::text, scopes, access_token_sealed, access_token_key,
    refresh_token_sealed, refresh_token_key, access_expires_at, linked_at, refreshed_at, changed_at, actor, reason
FROM iim.account_link WHERE id = $1 FOR UPDATE
"""
_LOCK_SKIP = """
SELECT id, household_id, connector, status::text, scopes, access_token_sealed, access_token_key,
    refresh_token_sealed, refresh_token_key, access_expires_at, linked_at, refreshed_at, changed_at, actor, reason
FROM iim.account_link WHERE id = $1 FOR UPDATE SKIP LOCKED
"""
_SAVE = """
INSERT INTO iim.account_link AS l (id, household_id, connector, status, scopes, access_token_sealed,
                                   access_token_key, refresh_token_sealed, refresh_token_key, access_expires_at,
                                   linked_at, refreshed_at, changed_at, actor, reason)
VALUES ($1, $2, $3, 'active', $4, $5, $9, $6, $10, now() + make_interval(secs => $7), now(), NULL, now(), $8, NULL)
ON CONFLICT (tenant_id, household_id, connector) DO UPDATE
    SET status = 'active', scopes = EXCLUDED.scopes, access_token_sealed = EXCLUDED.access_token_sealed,
        access_token_key = EXCLUDED.access_token_key, refresh_token_sealed = EXCLUDED.refresh_token_sealed,
        refresh_token_key = EXCLUDED.refresh_token_key, access_expires_at = EXCLUDED.access_expires_at,
        linked_at = now(), refreshed_at = NULL, changed_at = now(), actor = EXCLUDED.actor, reason = NULL
    WHERE l.id = EXCLUDED.id
RETURNING id, household_id, connector, status::text, scopes, access_token_sealed, access_token_key,
    refresh_token_sealed, refresh_token_key, access_expires_at, linked_at, refreshed_at, changed_at, actor, reason
"""
_UPDATE_TOKENS = """
UPDATE iim.account_link
SET access_token_sealed = $2, access_token_key = $6,
    refresh_token_sealed = coalesce($3, refresh_token_sealed),
    refresh_token_key = CASE WHEN $3::text IS NULL THEN refresh_token_key ELSE $7 END,
    access_expires_at = now() + make_interval(secs => $4), scopes = $5, refreshed_at = now()
WHERE id = $1 AND status = 'active'
RETURNING id, household_id, connector, status::text, scopes, access_token_sealed, access_token_key,
    refresh_token_sealed, refresh_token_key, access_expires_at, linked_at, refreshed_at, changed_at, actor, reason
"""
_MARK = """
UPDATE iim.account_link
SET status = $2::iim.link_status, access_token_sealed = NULL, access_token_key = NULL, refresh_token_sealed = NULL,
    refresh_token_key = NULL, reason = $3,
    actor = $4, changed_at = now()
WHERE id = $1
RETURNING id, household_id, connector, status::text, scopes, access_token_sealed, access_token_key,
    refresh_token_sealed, refresh_token_key, access_expires_at, linked_at, refreshed_at, changed_at, actor, reason
"""
_OWNER = """
SELECT s.msisdn FROM iim.binding b JOIN iim.subscriber s ON s.tenant_id = b.tenant_id AND s.id = b.subscriber_id
WHERE b.household_id = $1 AND b.role = 'owner' AND s.msisdn IS NOT NULL
ORDER BY b.id LIMIT 1
"""
# Active links of the households where this subscriber is an owner or member and nobody else is (their own homes).
_OWN_HOME_LINKS = """
SELECT l.household_id, l.connector FROM iim.account_link l
WHERE l.status = 'active' AND l.household_id IN (
      SELECT b.household_id FROM iim.binding b
       WHERE b.subscriber_id = $1 AND b.role IN ('owner', 'member')
         AND NOT EXISTS (SELECT 1 FROM iim.binding o
                          WHERE o.household_id = b.household_id AND o.subscriber_id <> $1
                            AND o.role IN ('owner', 'member')))
ORDER BY l.household_id, l.connector
"""
_DUE = "SELECT tenant_id, id FROM iim.account_links_due(make_interval(secs => $1), $2)"
# On the cache role (every tenant): whose device is ``target`` at this connector.
_BY_TARGET = """
SELECT DISTINCT d.tenant_id, d.household_id FROM iim.device d
WHERE d.enabled AND d.connector = $1 AND d.connector_ref = $2
"""


def _scopes(values: list[str]) -> frozenset[LinkScope]:
    return frozenset(LinkScope(v) for v in values)


def _sealed(text: str | None, key_id: int | None) -> Sealed | None:
    return None if text is None else Sealed(text, key_id)


def _link(r: asyncpg.Record) -> LinkRow:
    return LinkRow(r["id"], r["household_id"], r["connector"], r["status"], _scopes(r["scopes"]),
                   _sealed(r["access_token_sealed"], r["access_token_key"]),
                   _sealed(r["refresh_token_sealed"], r["refresh_token_key"]), r["access_expires_at"], r["linked_at"],
                   r["refreshed_at"], r["changed_at"], r["actor"], r["reason"])


async def insert_state(conn: Connection, *, state_id: UUID, household_id: UUID, connector: str, digest: bytes,
                       verifier: Sealed, scopes: frozenset[LinkScope], actor: str, ttl_s: int) -> datetime:
    """Store a started linking; returns when it expires. NotFound for a household the tenant does not have."""
    if await conn.fetchval("SELECT 1 FROM iim.household WHERE id = $1", household_id) is None:
        raise NotFound(f"household {household_id} not found", entity="household")
    expires: datetime = await conn.fetchval(_INSERT_STATE, state_id, household_id, connector, digest,
                                            verifier.text, sorted(scopes), actor, float(ttl_s), verifier.key_id)
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
    return TakenState(r["tenant_id"], r["id"], r["household_id"], r["connector"],
                      Sealed(r["verifier_sealed"], r["verifier_key"]), _scopes(r["scopes"]), r["actor"], r["expired"])


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
                    scopes: frozenset[LinkScope], access: Sealed, refresh: Sealed | None, expires_in: int,
                    actor: str) -> LinkRow | None:
    """Create the household's link, or make its existing one (``link_id``) active with these tokens.

    ``None`` when another link row holds the household's slot under another id (the caller re-reads and retries).
    """
    r = await conn.fetchrow(_SAVE, link_id, household_id, connector, sorted(scopes), access.text,
                            None if refresh is None else refresh.text, float(expires_in), actor, access.key_id,
                            None if refresh is None else refresh.key_id)
    return None if r is None else _link(r)


async def update_tokens(conn: Connection, link_id: UUID, *, access: Sealed, refresh: Sealed | None,
                        expires_in: int, scopes: frozenset[LinkScope]) -> LinkRow | None:
    """New tokens of an active link (a refresh without a new refresh token keeps the old one)."""
    r = await conn.fetchrow(_UPDATE_TOKENS, link_id, access.text, None if refresh is None else refresh.text,
                            float(expires_in), sorted(scopes), access.key_id,
                            None if refresh is None else refresh.key_id)
    return None if r is None else _link(r)


async def mark_link(conn: Connection, link_id: UUID, *, status: str, reason: str, actor: str) -> LinkRow | None:
    """``broken`` or ``revoked``: the tokens are dropped, the row and its history kept."""
    r = await conn.fetchrow(_MARK, link_id, status, reason[:500], actor)
    return None if r is None else _link(r)


async def owner_msisdn(conn: Connection, household_id: UUID) -> str | None:
    """The household's owner's number (who is told that a link broke)."""
    found: str | None = await conn.fetchval(_OWNER, household_id)
    return found


async def own_home_links(conn: Connection, subscriber_id: UUID) -> list[tuple[UUID, str]]:
    """``(household, connector)`` of the active links of the subscriber's own homes (their erasure revokes them)."""
    return [(r[0], r[1]) for r in await conn.fetch(_OWN_HOME_LINKS, subscriber_id)]


async def due_links(conn: Connection, within_s: float, limit: int = 100) -> list[tuple[UUID, UUID]]:
    """``(tenant, link)`` of active links of any tenant whose access token expires within ``within_s``."""
    return [(r[0], r[1]) for r in await conn.fetch(_DUE, float(within_s), limit)]


async def households_of_target(conn: Connection, connector: str, target: str) -> list[tuple[UUID, UUID]]:
    """On the cache role: ``(tenant, household)`` pairs with an enabled device ``target`` at ``connector``."""
    return [(r[0], r[1]) for r in await conn.fetch(_BY_TARGET, connector, target)]


# --- sealed secrets: key rotation and the old format -----------------------------------------------------

@dataclass(frozen=True, slots=True)
class LegacySecrets:
    """A tenant's link secrets still in the old format: tokens of ``links``, verifiers of started ``states``."""

    tenant_id: UUID
    links: int
    states: int


#: Each table's sealed columns, in the order :func:`sealed_rows` gives them: the column named in the associated
#: data (what the value is), its sealed text's column, its key's column.
SEALED_COLUMNS: dict[str, tuple[tuple[str, str, str], ...]] = {
    ACCOUNT_LINK: (("access_token", "access_token_sealed", "access_token_key"),
                   ("refresh_token", "refresh_token_sealed", "refresh_token_key")),
    LINK_STATE: (("code_verifier", "verifier_sealed", "verifier_key"),),
}
# $1: the key to leave alone (NULL: only rows in the old format); rows after $2 in id order, at most $3.
_SEALED_ROWS = {
    ACCOUNT_LINK: """
SELECT id, access_token_sealed, access_token_key, refresh_token_sealed, refresh_token_key FROM iim.account_link
WHERE id > $2 AND (
      (access_token_sealed IS NOT NULL AND CASE WHEN $1::int IS NULL THEN access_token_key IS NULL
                                               ELSE access_token_key IS DISTINCT FROM $1 END)
   OR (refresh_token_sealed IS NOT NULL AND CASE WHEN $1::int IS NULL THEN refresh_token_key IS NULL
                                                ELSE refresh_token_key IS DISTINCT FROM $1 END))
ORDER BY id LIMIT $3
""",
    LINK_STATE: """
SELECT id, verifier_sealed, verifier_key FROM iim.link_state
WHERE id > $2 AND CASE WHEN $1::int IS NULL THEN verifier_key IS NULL ELSE verifier_key IS DISTINCT FROM $1 END
ORDER BY id LIMIT $3
""",
}
# Written only over the values that were read: a token a renewal replaced meanwhile is left as the renewal wrote it.
_RESEAL = {
    ACCOUNT_LINK: """
UPDATE iim.account_link SET access_token_sealed = $4, access_token_key = $5, refresh_token_sealed = $6,
    refresh_token_key = $7
WHERE id = $1 AND access_token_sealed IS NOT DISTINCT FROM $2 AND refresh_token_sealed IS NOT DISTINCT FROM $3
""",
    LINK_STATE: "UPDATE iim.link_state SET verifier_sealed = $3, verifier_key = $4 WHERE id = $1 AND verifier_sealed = $2",
}
_SEALED_COUNTS = """
SELECT key_id, count(*) AS n FROM (
    SELECT access_token_key AS key_id FROM iim.account_link WHERE access_token_sealed IS NOT NULL
    UNION ALL SELECT refresh_token_key FROM iim.account_link WHERE refresh_token_sealed IS NOT NULL
    UNION ALL SELECT verifier_key FROM iim.link_state) s
GROUP BY key_id
"""
_LEGACY = "SELECT tenant_id, links, states FROM iim.link_secrets_legacy()"
_DELETE_LEGACY_STATES = "DELETE FROM iim.link_state WHERE verifier_key IS NULL"


async def sealed_rows(conn: Connection, table: str, *, not_key: int | None, after: UUID, limit: int
                      ) -> list[tuple[UUID, tuple[Sealed | None, ...]]]:
    """Up to ``limit`` rows of ``table`` in the caller's tenant, after ``after`` in id order, with a sealed value
    not sealed by ``not_key`` (``None``: those in the old format only): each row's id and its sealed values in
    :data:`SEALED_COLUMNS` order."""
    rows = await conn.fetch(_SEALED_ROWS[table], not_key, after, limit)
    return [(r["id"], tuple(_sealed(r[text], r[key]) for _, text, key in SEALED_COLUMNS[table])) for r in rows]


async def reseal(conn: Connection, table: str,
                 rows: list[tuple[UUID, tuple[Sealed | None, ...], tuple[Sealed | None, ...]]]) -> int:
    """Write re-sealed values, each ``(id, the values as read, the values re-sealed)``; a row whose values
    changed meanwhile (renewed, revoked, taken) is left as it is. How many rows were written."""
    written = 0
    for row_id, before, after in rows:
        news = [part for value in after for part in ((None, None) if value is None else (value.text, value.key_id))]
        status: str = await conn.execute(_RESEAL[table], row_id, *(None if v is None else v.text for v in before),
                                         *news)
        written += int(status.split()[-1])
    return written


async def sealed_counts(conn: Connection) -> dict[int | None, int]:
    """How many link secrets of the caller's tenant each data key seals (``None``: the old format)."""
    return {r["key_id"]: int(r["n"]) for r in await conn.fetch(_SEALED_COUNTS)}


async def legacy_secrets(conn: Connection | Pool) -> list[LegacySecrets]:
    """Every tenant with link secrets still in the old format (``iim.link_secrets_legacy``: counts only)."""
    return [LegacySecrets(r["tenant_id"], int(r["links"]), int(r["states"])) for r in await conn.fetch(_LEGACY)]


async def delete_legacy_states(conn: Connection) -> int:
    """Drop the caller's tenant's started linkings in the old format (their verifier cannot be opened any more:
    the household starts again)."""
    status: str = await conn.execute(_DELETE_LEGACY_STATES)
    return int(status.split()[-1])
