"""Every statement of home deliveries: the facts an MO read-aloud is decided on, its claim and its audit rows.

All run inside the caller's tenant transaction, so row-level security scopes every read to the tenant.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg

from iim.home.ports import MoMessage
from iim.home.sms_policy import (
    READ_SMS,
    ConsentFacts,
    DeviceFacts,
    HouseholdFacts,
    PolicyFacts,
    SmsFacts,
    normalise_number,
)
from policy_cache.db import Connection

__all__ = ["NotifyTarget", "audit_message", "audit_sms", "claim_message_notification", "claim_sms",
           "consent_in_force", "find_recorded_message", "load_sms_facts", "message_audited", "message_notify_targets",
           "settle_message_notification", "store_recorded_message"]

# pg_advisory_xact_lock(ns, hashtext(tenant:sms_id)): "IIMS", apart from the migrations' "IIMM" namespace,
# so it never meets the audit chain's locks in another order.
_CLAIM_NS = 1229540691

_SUBSCRIBER_SQL = "SELECT id FROM iim.subscriber WHERE msisdn = $1"
_BINDINGS_SQL = """
SELECT b.household_id, b.device_id, h.time_zone, h.presence::text AS presence
FROM iim.binding b JOIN iim.household h ON h.tenant_id = b.tenant_id AND h.id = b.household_id
WHERE b.subscriber_id = $1 AND b.role IN ('owner', 'member')
ORDER BY b.role <> 'owner', b.priority, b.household_id
"""
_DEVICES_SQL = """
SELECT id, household_id, name, capabilities::text[] AS capabilities, connector, connector_ref, sip_uri,
       status::text AS status, enabled
FROM iim.device WHERE household_id = ANY($1::uuid[]) ORDER BY id
"""
_POLICIES_SQL = """
SELECT subscriber_id, household_id, quiet_start, quiet_end, dnd, blocked_callers
FROM iim.policy WHERE subscriber_id = $1 OR household_id = ANY($2::uuid[])
"""
# The newest unrevoked consent if there is one, else the newest revoked (to say "revoked", not "none").
_CONSENT_SQL = """
SELECT id, tenant_id, subscriber_id, purpose::text AS purpose, expires_at, revoked_at, scope
FROM iim.consent WHERE subscriber_id = $1 AND purpose = $2::iim.consent_purpose
ORDER BY revoked_at IS NULL DESC, granted_at DESC LIMIT 1
"""


def _policy(row: asyncpg.Record) -> PolicyFacts:
    return PolicyFacts(row["quiet_start"], row["quiet_end"], bool(row["dnd"]),
                       frozenset(row["blocked_callers"] or ()))


async def load_sms_facts(conn: Connection, tenant_id: UUID, mo: MoMessage) -> SmsFacts:
    """The decision's facts from the registry, inside the caller's tenant transaction (RLS applies)."""
    tenant = str(tenant_id)
    destination = normalise_number(mo.destination)
    subscriber_id = await conn.fetchval(_SUBSCRIBER_SQL, destination)
    received = mo.received_at if mo.received_at.tzinfo is not None else mo.received_at.replace(tzinfo=UTC)
    if subscriber_id is None:
        return SmsFacts(tenant, str(mo.sms_id), mo.source, None, received_at=received, body=mo.body)
    bindings = await conn.fetch(_BINDINGS_SQL, subscriber_id)
    homes: dict[UUID, tuple[str, str]] = {}
    whole: set[UUID] = set()
    single: dict[UUID, set[UUID]] = {}
    for b in bindings:
        homes.setdefault(b["household_id"], (b["time_zone"], b["presence"]))
        if b["device_id"] is None:
            whole.add(b["household_id"])
        else:
            single.setdefault(b["household_id"], set()).add(b["device_id"])
    ids = list(homes)
    devices: dict[UUID, list[DeviceFacts]] = {h: [] for h in ids}
    for d in await conn.fetch(_DEVICES_SQL, ids) if ids else ():
        hh = d["household_id"]
        if hh not in whole and d["id"] not in single.get(hh, set()):
            continue  # bound to some devices of this household only
        devices[hh].append(DeviceFacts(
            device_id=str(d["id"]), name=d["name"], capabilities=frozenset(d["capabilities"]),
            connector=d["connector"], connector_ref=d["connector_ref"], sip_uri=d["sip_uri"],
            online=d["status"] != "offline", enabled=d["enabled"]))
    subscriber_policy: PolicyFacts | None = None
    household_policy: dict[UUID, PolicyFacts] = {}
    for p in await conn.fetch(_POLICIES_SQL, subscriber_id, ids):
        if p["subscriber_id"] is not None:
            subscriber_policy = _policy(p)
        else:
            household_policy[p["household_id"]] = _policy(p)
    consent_row = await conn.fetchrow(_CONSENT_SQL, subscriber_id, READ_SMS)
    consent = None
    if consent_row is not None:
        scope = consent_row["scope"]
        consent = ConsentFacts(
            consent_id=str(consent_row["id"]), tenant_id=str(consent_row["tenant_id"]),
            subscriber_id=str(consent_row["subscriber_id"]), purpose=consent_row["purpose"],
            expires_at=consent_row["expires_at"], revoked_at=consent_row["revoked_at"],
            scope=scope if isinstance(scope, dict) else {})
    households = tuple(
        HouseholdFacts(str(h), zone, presence, tuple(devices[h]), household_policy.get(h))
        for h, (zone, presence) in homes.items())
    return SmsFacts(tenant, str(mo.sms_id), mo.source, str(subscriber_id), households=households, consent=consent,
                    subscriber_policy=subscriber_policy, received_at=received, body=mo.body)


async def claim_sms(conn: Connection, tenant: UUID, sms_id: str, first_actions: list[str]) -> bool:
    """Lock the MO ``sms_id`` for this transaction; False when one of ``first_actions`` is already in its
    audit trail (it was handled before)."""
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _CLAIM_NS, f"{tenant}:{sms_id}")
    seen = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM iim.audit_log WHERE tenant_id = $1 AND entity = 'sms' "
        "AND entity_id = $2 AND action = ANY($3::text[]))", tenant, sms_id, first_actions)
    return not seen


async def audit_sms(conn: Connection, tenant: UUID, actor: str, action: str, sms_id: str,
                    detail: dict[str, Any]) -> None:
    """Append an audit row about the MO ``sms_id`` (correlated by it)."""
    await conn.execute("SELECT iim.audit_append($1, $2, $3, 'sms', $4, $5, $6)",
                       tenant, actor, action, sms_id, detail, {"sms_id": sms_id})


# -- recorded messages (the record_message fallback) ------------------------------------------------------------

_CONSENT_IN_FORCE_SQL = """
SELECT EXISTS (SELECT 1 FROM iim.consent WHERE subscriber_id = $1 AND purpose = $2::iim.consent_purpose
               AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $3))
"""
_STORE_MESSAGE_SQL = """
INSERT INTO iim.recorded_message (call_uuid, subscriber_id, caller, file_name, duration_ms, expires_at)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (tenant_id, call_uuid) DO UPDATE SET call_uuid = EXCLUDED.call_uuid
RETURNING id
"""
_FIND_MESSAGE_SQL = """
SELECT m.file_name FROM iim.recorded_message m
WHERE m.id = $1 AND m.expires_at > $2
  AND EXISTS (SELECT 1 FROM iim.consent c WHERE c.subscriber_id = m.subscriber_id
              AND c.purpose = 'call_recording' AND c.revoked_at IS NULL AND (c.expires_at IS NULL OR c.expires_at > $2))
"""


async def consent_in_force(conn: Connection, subscriber_id: UUID, purpose: str, now: datetime) -> bool:
    """Whether the subscriber has an unrevoked, unexpired consent for ``purpose`` (the store boundary's check)."""
    return bool(await conn.fetchval(_CONSENT_IN_FORCE_SQL, subscriber_id, purpose, now))


async def store_recorded_message(conn: Connection, *, call_uuid: str, subscriber_id: UUID, caller: str | None,
                                 file_name: str, duration_ms: int | None, expires_at: datetime,
                                 now: datetime) -> UUID | None:
    """Keep a message a caller left, under the subscriber's ``call_recording`` consent (None without it).
    The same call stored twice is one row (its id)."""
    if not await consent_in_force(conn, subscriber_id, "call_recording", now):
        return None
    message_id: UUID = await conn.fetchval(_STORE_MESSAGE_SQL, call_uuid, subscriber_id, caller, file_name,
                                           duration_ms, expires_at)
    return message_id


async def find_recorded_message(conn: Connection, message_id: UUID, now: datetime) -> str | None:
    """The file name of a message still kept (unexpired, consent still in force); None otherwise."""
    name: str | None = await conn.fetchval(_FIND_MESSAGE_SQL, message_id, now)
    return name


# -- a recorded message's notifications through the household's connectors ------------------------------------

# One device per connector: the subscriber's own households (owner first), whole-household bindings or the bound
# device, enabled, known to a connector.
_NOTIFY_TARGETS_SQL = """
SELECT DISTINCT ON (d.connector) d.connector, d.connector_ref, d.id
FROM iim.binding b
JOIN iim.device d ON d.tenant_id = b.tenant_id AND d.household_id = b.household_id
                 AND (b.device_id IS NULL OR b.device_id = d.id)
WHERE b.subscriber_id = $1 AND b.role IN ('owner', 'member') AND d.enabled
  AND d.connector IS NOT NULL AND d.connector_ref IS NOT NULL
ORDER BY d.connector, b.role <> 'owner', b.priority, d.id
"""
# New: claimed (attempt 1). Failed before and attempts left: claimed again. Sending or sent: nothing (NULL).
_CLAIM_NOTIFY_SQL = """
INSERT INTO iim.message_notification AS n (message_id, connector, device_id, state)
VALUES ($1, $2, $3, 'sending')
ON CONFLICT (tenant_id, message_id, connector) DO UPDATE
    SET state = 'sending', attempts = n.attempts + 1, device_id = EXCLUDED.device_id, updated_at = now()
    WHERE n.state = 'failed' AND n.attempts < $4
RETURNING attempts
"""
_SETTLE_NOTIFY_SQL = """
UPDATE iim.message_notification SET state = $3, result = $4, vendor_ref = $5, updated_at = now()
WHERE message_id = $1 AND connector = $2 AND state = 'sending'
"""


@dataclass(frozen=True, slots=True)
class NotifyTarget:
    """The device a connector is told about (its ``connector_ref`` names the household's account there)."""

    connector: str
    connector_ref: str
    device_id: UUID


async def message_notify_targets(conn: Connection, subscriber_id: UUID) -> list[NotifyTarget]:
    """One device per connector among the subscriber's households' devices (in the caller's tenant transaction)."""
    rows = await conn.fetch(_NOTIFY_TARGETS_SQL, subscriber_id)
    return [NotifyTarget(r["connector"], r["connector_ref"], r["id"]) for r in rows]


async def claim_message_notification(conn: Connection, message_id: UUID, target: NotifyTarget, *,
                                     max_attempts: int) -> int | None:
    """Claim the message's notification at ``target.connector``: the attempt number, or None when it was sent
    (or is being sent) already, or its failed attempts are used up. The durable "once per call per connector"."""
    attempt: int | None = await conn.fetchval(_CLAIM_NOTIFY_SQL, message_id, target.connector, target.device_id,
                                              max_attempts)
    return attempt


async def settle_message_notification(conn: Connection, message_id: UUID, connector: str, *, sent: bool,
                                      result: str, vendor_ref: str | None) -> None:
    """Record a claimed notification's outcome; a failed one may be claimed again by a later announcement."""
    await conn.execute(_SETTLE_NOTIFY_SQL, message_id, connector, "sent" if sent else "failed", result[:40],
                       vendor_ref[:200] if vendor_ref else None)


async def message_audited(conn: Connection, message_id: UUID, action: str) -> bool:
    """Whether recorded message ``message_id`` has an audit row ``action`` already (a retry adds none)."""
    return bool(await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM iim.audit_log WHERE entity = 'recorded_message' AND entity_id = $1 "
        "AND action = $2)", str(message_id), action))


async def audit_message(conn: Connection, tenant: UUID, actor: str, action: str, message_id: UUID, call_uuid: str,
                        detail: dict[str, Any]) -> None:
    """Append an audit row about recorded message ``message_id`` (correlated by its call)."""
    await conn.execute("SELECT iim.audit_append($1, $2, $3, 'recorded_message', $4, $5, $6)",
                       tenant, actor, action, str(message_id), detail, {"call_id": call_uuid})
