"""Live presence claims in PostgreSQL (``iim.presence_claim``, migration 0026): writes, reads, the lookups that
tell a live source which household it speaks for, and the prune of long-expired claims (migration 0036).

Writes run in the caller's tenant transaction and audit themselves in it (``household.presence_claim``,
``household.presence_release``) with the actor: chained at once for the operator's API, staged for the
high-rate sources (registrations, connectors). A claim that only extends a live one of the same state is an
UPDATE without an audit line (a refresh is not a change); ``coalesce`` skips even the UPDATE while the live claim
still covers half the new lifetime (registrations refresh every few minutes, and every write re-reads the
household's snapshots). The lookups run on the cache role, which sees every tenant: one source (a switch, a
vendor cloud) serves many tenants, and its word lands only where exactly one tenant owns the identity it names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Network, IPv6Network
from typing import Any
from uuid import UUID

import asyncpg

from policy_cache import audit
from policy_cache.db import Connection, Pool
from policy_cache.errors import NotFound
from policy_cache.models import PresenceState
from policy_cache.presence import ClaimState, PresenceClaim, PresenceSource

__all__ = ["ClaimWrite", "RegistrationTarget", "StoredClaim", "households_by_connector", "list_claims",
           "live_claims", "live_subjects", "prune_expired", "put_claim", "registration_targets", "release_claim"]

#: A claim may not be promised for longer than a day: a source must keep speaking to keep counting.
MAX_TTL_S = 86_400


@dataclass(frozen=True, slots=True)
class StoredClaim:
    household_id: UUID
    source: PresenceSource
    subject: str
    state: ClaimState
    observed_at: datetime
    expires_at: datetime
    actor: str
    basis: str | None = None

    def claim(self) -> PresenceClaim:
        return PresenceClaim(self.source, self.subject, self.state, self.observed_at.timestamp(),
                             self.expires_at.timestamp(), self.basis)


@dataclass(frozen=True, slots=True)
class RegistrationTarget:
    """A household an AoR speaks for: is that identity a person's (``personal``), the household's home networks,
    and whether a registration claim about it is held there now (``held``: a word of no claim must withdraw it)."""

    tenant_id: UUID
    household_id: UUID
    personal: bool
    home_networks: tuple[IPv4Network | IPv6Network, ...]
    held: bool


@dataclass(frozen=True, slots=True)
class ClaimWrite:
    """What a write did: ``changed`` when the household's word from this subject changed (audited)."""

    stored: StoredClaim | None
    changed: bool


# The held word first, locked (what the audit line calls "previous"), then the write.
_HELD = """
SELECT state::text FROM iim.presence_claim
WHERE household_id = $1 AND source = $2::iim.presence_source AND subject = $3 AND expires_at > now()
FOR UPDATE
"""
_PUT = """
INSERT INTO iim.presence_claim AS c (household_id, source, subject, state, observed_at, expires_at, actor, basis)
VALUES ($1, $2::iim.presence_source, $3, $4::iim.presence_state, now(), now() + make_interval(secs => $5), $6, $8)
ON CONFLICT (tenant_id, household_id, source, subject) DO UPDATE
    SET state = EXCLUDED.state, observed_at = EXCLUDED.observed_at, expires_at = EXCLUDED.expires_at,
        actor = EXCLUDED.actor, basis = EXCLUDED.basis
    WHERE NOT $7 OR c.state <> EXCLUDED.state OR c.basis IS DISTINCT FROM EXCLUDED.basis
       OR c.expires_at < now() + make_interval(secs => $5 / 2)
RETURNING household_id, source::text, subject, state::text, observed_at, expires_at, actor, basis
"""
_RELEASE = """
DELETE FROM iim.presence_claim
WHERE household_id = $1 AND source = $2::iim.presence_source AND subject = $3
RETURNING household_id, source::text, subject, state::text, observed_at, expires_at, actor, basis,
          expires_at > now() AS live
"""
_LIST = """
SELECT household_id, source::text, subject, state::text, observed_at, expires_at, actor, basis
FROM iim.presence_claim WHERE household_id = $1 ORDER BY source, subject
"""
_LIVE = """
SELECT tenant_id::text, household_id::text, source::text, subject, state::text,
       date_part('epoch', observed_at), date_part('epoch', expires_at), basis
FROM iim.presence_claim
WHERE expires_at > now() AND ($1::uuid[] IS NULL OR household_id = ANY($1::uuid[]))
"""
# Whose phone, speaker or wearable is this AoR: enabled devices with that sip_uri (a person's when the registry's
# hint says so, else when it is a wearable), and owners/members whose own SIP AoR it is (always a person's); with
# each household's home networks and whether it holds a registration claim about the AoR ($2, the claim's subject).
_BY_AOR = """
SELECT h.tenant_id, h.id AS household_id, bool_or(found.personal) AS personal, h.home_networks,
       EXISTS (SELECT 1 FROM iim.presence_claim c
               WHERE c.tenant_id = h.tenant_id AND c.household_id = h.id AND c.source = 'registration'
                 AND c.subject = $2) AS held
FROM (
    SELECT d.tenant_id, d.household_id, coalesce(d.presence_hint, d.type = 'wearable') AS personal
    FROM iim.device d
    WHERE d.enabled AND d.sip_uri = ANY($1::text[])
    UNION ALL
    SELECT b.tenant_id, b.household_id, true FROM iim.subscriber s
    JOIN iim.binding b ON b.tenant_id = s.tenant_id AND b.subscriber_id = s.id AND b.role IN ('owner', 'member')
    WHERE s.sip_aor = ANY($1::text[])
) found
JOIN iim.household h ON h.tenant_id = found.tenant_id AND h.id = found.household_id
GROUP BY h.tenant_id, h.id
"""
_SUBJECTS = """
SELECT DISTINCT subject FROM iim.presence_claim
WHERE source = $1::iim.presence_source AND actor = $2 AND expires_at > now()
"""
_BY_CONNECTOR = """
SELECT DISTINCT d.tenant_id, d.household_id FROM iim.device d
WHERE d.enabled AND d.connector = $1 AND d.connector_ref = $2
"""


def _stored(r: asyncpg.Record) -> StoredClaim:
    return StoredClaim(r["household_id"], r["source"], r["subject"], r["state"], r["observed_at"], r["expires_at"],
                       r["actor"], r["basis"])


async def _require_household(conn: Connection, household_id: UUID) -> None:
    if await conn.fetchval("SELECT 1 FROM iim.household WHERE id = $1", household_id) is None:
        raise NotFound(f"household {household_id} not found", entity="household")


async def _audit(conn: Connection, tenant_id: UUID | None, *, chained: bool, actor: str, action: str,
                 household_id: UUID, detail: dict[str, Any], correlation: Mapping[str, Any] | None) -> None:
    if chained and tenant_id is not None:
        await audit.append(conn, tenant_id, actor=actor, action=action, entity="household", entity_id=household_id,
                           detail=detail, correlation=correlation)
    else:
        await audit.stage(conn, actor=actor, action=action, entity="household", entity_id=household_id,
                          detail=detail, correlation=correlation)


async def put_claim(conn: Connection, household_id: UUID, *, source: PresenceSource, subject: str,
                    state: ClaimState, ttl_s: float, actor: str, correlation: Mapping[str, Any] | None = None,
                    chain_tenant: UUID | None = None, coalesce: bool = False, basis: str | None = None
                    ) -> ClaimWrite:
    """Set this source's word about ``subject`` for ``ttl_s`` seconds (in the caller's tenant transaction).

    ``basis``: why it says so, shown with the claim ("from home network 192.0.2.0/24"). ``chain_tenant``: audit on
    the chain at once (the operator's API, last statement of its transaction); otherwise the line is staged.
    Raises NotFound for a household the tenant does not have.
    """
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be in (0, {MAX_TTL_S}]")
    await _require_household(conn, household_id)
    previous = await conn.fetchval(_HELD, household_id, source, subject)
    row = await conn.fetchrow(_PUT, household_id, source, subject, state, float(ttl_s), actor, coalesce, basis)
    if row is None:  # coalesced: the live claim already covers it
        return ClaimWrite(None, changed=False)
    stored = _stored(row)
    changed = previous != state
    if changed:
        await _audit(conn, chain_tenant, chained=chain_tenant is not None, actor=actor,
                     action="household.presence_claim", household_id=household_id,
                     detail={"source": source, "subject": subject, "state": state, "previous": previous,
                             "expires_at": stored.expires_at.isoformat(),
                             **({"basis": basis} if basis else {})}, correlation=correlation)
    return ClaimWrite(stored, changed)


async def release_claim(conn: Connection, household_id: UUID, *, source: PresenceSource, subject: str, actor: str,
                        correlation: Mapping[str, Any] | None = None,
                        chain_tenant: UUID | None = None) -> ClaimWrite:
    """Withdraw this source's word about ``subject`` (a device unregistered); audited when it was still live."""
    row = await conn.fetchrow(_RELEASE, household_id, source, subject)
    if row is None:
        return ClaimWrite(None, changed=False)
    stored = _stored(row)
    if row["live"]:
        await _audit(conn, chain_tenant, chained=chain_tenant is not None, actor=actor,
                     action="household.presence_release", household_id=household_id,
                     detail={"source": source, "subject": subject, "state": stored.state}, correlation=correlation)
    return ClaimWrite(stored, changed=bool(row["live"]))


async def list_claims(conn: Connection, household_id: UUID) -> tuple[PresenceState, list[StoredClaim]]:
    """The household's registry presence (the baseline) and every claim it has, expired ones included."""
    baseline = await conn.fetchval("SELECT presence::text FROM iim.household WHERE id = $1", household_id)
    if baseline is None:
        raise NotFound(f"household {household_id} not found", entity="household")
    rows = await conn.fetch(_LIST, household_id)
    return PresenceState(baseline), [_stored(r) for r in rows]


async def live_claims(conn: Connection, household_ids: Iterable[UUID] | None = None
                      ) -> dict[tuple[str, str], tuple[PresenceClaim, ...]]:
    """Unexpired claims by ``(tenant id, household id)`` as text (the snapshots' keys); all households, or these."""
    ids = None if household_ids is None else list(household_ids)
    found: dict[tuple[str, str], list[PresenceClaim]] = {}
    for r in await conn.fetch(_LIVE, ids):
        found.setdefault((r[0], r[1]), []).append(PresenceClaim(r[2], r[3], r[4], float(r[5]), float(r[6]), r[7]))
    return {key: tuple(claims) for key, claims in found.items()}


async def registration_targets(conn: Connection, aor: str) -> list[RegistrationTarget]:
    """The households with a device or an owner/member whose SIP AoR is ``aor`` (``user@host``, the claims'
    subject), with what a registration's word there depends on (on the cache role: every tenant)."""
    bare = aor.removeprefix("sip:").removeprefix("sips:")
    rows = await conn.fetch(_BY_AOR, [f"sip:{bare}", f"sips:{bare}"], aor)
    return [RegistrationTarget(r["tenant_id"], r["household_id"], bool(r["personal"]), tuple(r["home_networks"]),
                               bool(r["held"])) for r in rows]


async def households_by_connector(conn: Connection, connector: str, target: str) -> list[tuple[UUID, UUID]]:
    """``(tenant, household)`` pairs with an enabled device that ``connector`` knows as ``target``."""
    rows = await conn.fetch(_BY_CONNECTOR, connector, target)
    return [(r[0], r[1]) for r in rows]


async def prune_expired(conn: Connection | Pool, *, keep_s: int, limit: int) -> int:
    """Delete, every tenant, at most ``limit`` claims expired more than ``keep_s`` seconds ago
    (``iim.presence_prune``, the sweeper's definer); how many went. Their audit lines stay."""
    return int(await conn.fetchval("SELECT iim.presence_prune($1, $2)", keep_s, limit))


async def live_subjects(conn: Connection, source: PresenceSource, actor: str) -> set[str]:
    """Subjects of every tenant's unexpired claims that ``actor`` wrote from ``source`` (on the cache role): what a
    live source still has standing, so that its reconcile can withdraw what it no longer sees."""
    return {r[0] for r in await conn.fetch(_SUBJECTS, source, actor)}
