"""Bulk synthetic data for benchmarks: millions of subscribers in a minute or two.

Everything is generated inside PostgreSQL with ``generate_series`` (no rows travel through Python), with
deterministic, ordered ids (see ``_id``), in one transaction per tenant. It needs a
**superuser** connection: it sets ``session_replication_role = replica`` for its transaction, which skips
the per-row triggers (change log, NOTIFY, audit) and the foreign-key triggers - the generator produces
consistent data by construction, and CHECK/UNIQUE constraints still apply. Seeding writes no change_log
rows, so seed before the caches start (or reload them fully afterwards). Not for production data.

Shape per tenant (defaults): households of ``members_per_household`` subscribers (the first is owner),
three devices per household (SIP speaker online, cloud speaker, smoke sensor), a household policy for
every household (mode cycling, quiet hours on half), a subscriber policy for every 10th subscriber,
an announce_calls consent for every 2nd subscriber.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import cast
from uuid import UUID

import asyncpg

from policy_cache.db import Connection, Pool

__all__ = ["SeedReport", "seed_synthetic", "tenant_uuid"]

log = logging.getLogger(__name__)

_ZONES = ["Europe/Moscow", "Asia/Yekaterinburg", "Asia/Novosibirsk", "Europe/Kaliningrad", "Asia/Vladivostok"]


@dataclass(frozen=True, slots=True)
class SeedReport:
    tenants: tuple[UUID, ...]
    subscribers: int
    households: int
    devices: int
    bindings: int
    policies: int
    consents: int
    seconds: float


def tenant_uuid(index: int) -> UUID:
    """Deterministic id of synthetic tenant ``index`` (the same md5 rule as the SQL below)."""
    import hashlib

    return UUID(hashlib.md5(f"iim-seed-tenant-{index}".encode(), usedforsecurity=False).hexdigest())


def _id(kind: str, counter: str) -> str:
    """SQL for an ordered deterministic uuid: 12 hex digits of md5(tenant:kind), then a 20-hex counter.

    Ordered keys append to the right edge of the b-tree indexes instead of dirtying random pages, which
    makes bulk inserts several times faster than random uuids (the cache load does not care).
    """
    return f"(left(md5($1::text || ':{kind}'), 12) || lpad(to_hex({counter}), 20, '0'))::uuid"


_IDS = {
    "hh_i": _id("h", "i"), "sub_j": _id("s", "j"), "dev": _id("d", "i * 4 + k"), "bind": _id("b", "j"),
    "hh_of_j": _id("h", "j / $3::int"), "ph": _id("ph", "i"), "ps": _id("ps", "j"), "con": _id("c", "j"),
}

_HOUSEHOLDS = """
INSERT INTO iim.household (tenant_id, id, name, time_zone, presence, external_id)
SELECT $1::uuid, {hh_i}, 'home ' || i, ($3::text[])[1 + i % cardinality($3::text[])],
       (ARRAY['home', 'away', 'unknown']::iim.presence_state[])[1 + i % 3], 'hh-' || i
FROM generate_series(0, $2::int - 1) AS i
""".format(**_IDS)

_SUBSCRIBERS = """
INSERT INTO iim.subscriber (tenant_id, id, msisdn, sip_aor, internal_id)
SELECT $1::uuid, {sub_j}, '+' || ($3::bigint + j),
       'sip:+' || ($3::bigint + j) || '@ims.iim.local', 'sub-' || j
FROM generate_series(0, $2::int - 1) AS j
""".format(**_IDS)

_DEVICES = """
INSERT INTO iim.device (tenant_id, id, household_id, name, type, vendor, capabilities, sip_uri, connector,
                        connector_ref, status)
SELECT $1::uuid, {dev}, {hh_i},
       (ARRAY['living room speaker', 'kitchen speaker', 'smoke sensor'])[k + 1],
       (ARRAY['speaker', 'speaker', 'sensor']::iim.device_type[])[k + 1],
       (ARRAY['generic-sip', 'demo-cloud', 'demo-cloud'])[k + 1],
       CASE k WHEN 0 THEN ARRAY['sip', 'tts']::iim.device_capability[]
              WHEN 1 THEN ARRAY['cloud_announce', 'tts']::iim.device_capability[]
              ELSE ARRAY[]::iim.device_capability[] END,
       CASE k WHEN 0 THEN 'sip:spk-' || $3::int || '-' || i || '@iim.local' END,
       CASE WHEN k > 0 THEN 'webhook' END,
       CASE WHEN k > 0 THEN 'dev-' || $3::int || '-' || i || '-' || k END,
       CASE WHEN k = 0 THEN 'online'::iim.device_status
            ELSE (ARRAY['online', 'offline', 'unknown']::iim.device_status[])[1 + (i + k) % 3] END
FROM generate_series(0, $2::int - 1) AS i, generate_series(0, $4::int - 1) AS k
""".format(**_IDS)

_BINDINGS = """
INSERT INTO iim.binding (tenant_id, id, subscriber_id, household_id, role, priority)
SELECT $1::uuid, {bind}, {sub_j},
       {hh_of_j},
       CASE WHEN j % $3::int = 0 THEN 'owner' ELSE 'member' END::iim.binding_role, j % $3::int
FROM generate_series(0, $2::int - 1) AS j
""".format(**_IDS)

_HOUSEHOLD_POLICIES = """
INSERT INTO iim.policy (tenant_id, id, household_id, ring_mode, phone_timeout_s, home_timeout_s, quiet_start,
                        quiet_end, home_only_when_present, fallback)
SELECT $1::uuid, {ph}, {hh_i},
       (ARRAY['simultaneous', 'phone_then_home', 'home_then_phone', 'phone_only', 'home_only']::iim.ring_mode[])
           [1 + i % 5],
       20, 15,
       CASE WHEN i % 2 = 0 THEN time '23:00' END, CASE WHEN i % 2 = 0 THEN time '07:00' END,
       i % 4 = 1, (ARRAY['voicemail', 'missed_call_sms', 'record_message', 'none']::iim.fallback_action[])[1 + i % 4]
FROM generate_series(0, $2::int - 1) AS i
""".format(**_IDS)

_SUBSCRIBER_POLICIES = """
INSERT INTO iim.policy (tenant_id, id, subscriber_id, ring_mode, dnd, blocked_callers, fallback)
SELECT $1::uuid, {ps}, {sub_j}, 'phone_then_home', j % 20 = 0,
       ARRAY['+' || ($3::bigint + j + 1)], 'missed_call_sms'
FROM generate_series(0, $2::int - 1, 10) AS j
""".format(**_IDS)

_CONSENTS = """
INSERT INTO iim.consent (tenant_id, id, subscriber_id, purpose, evidence)
SELECT $1::uuid, {con}, {sub_j}, 'announce_calls',
       jsonb_build_object('channel', 'seed')
FROM generate_series(0, $2::int - 1, 2) AS j
""".format(**_IDS)


async def _run(conn: Connection, statements: list[tuple[str, tuple[object, ...]]]) -> None:
    async with conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        for sql, args in statements:
            await conn.execute(sql, *args)


async def seed_synthetic(
    conn: Connection | Pool,
    tenants: int = 1,
    subscribers: int = 1_000_000,
    *,
    members_per_household: int = 2,
    devices_per_household: int = 3,
    msisdn_base: int = 79_100_000_000,
    first_tenant: int = 0,
) -> SeedReport:
    """Create ``tenants`` synthetic tenants sharing ``subscribers`` subscribers (plus households, devices,
    bindings, policies and consents), then ANALYZE.

    ``conn``: a superuser connection outside a transaction (one transaction per tenant), or a pool of
    superuser connections: then the household side (households, devices, household policies) and the
    subscriber side (subscribers, bindings, personal policies, consents) of each tenant are written by two
    connections at once, each in its own transaction (about 1.7x faster on two cores; a failure can leave
    one side of a tenant written - this is benchmark data).

    Tenant ``n`` has id :func:`tenant_uuid(n) <tenant_uuid>`; MSISDNs are ``+(msisdn_base + k)``.
    """
    if tenants < 1 or subscribers < tenants or not 1 <= devices_per_household <= 3 or members_per_household < 1:
        raise ValueError("need tenants >= 1, subscribers >= tenants, 1..3 devices, >= 1 member per household")
    check = "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
    if not await conn.fetchval(check):
        raise PermissionError("seed_synthetic needs a superuser connection (session_replication_role)")
    started = time.perf_counter()
    per_tenant = subscribers // tenants
    ids: list[UUID] = []
    counts = {"households": 0, "devices": 0, "bindings": 0, "policies": 0, "consents": 0}
    for n in range(first_tenant, first_tenant + tenants):
        tid = tenant_uuid(n)
        ids.append(tid)
        subs = per_tenant + (subscribers % tenants if n == first_tenant + tenants - 1 else 0)
        households = -(-subs // members_per_household)
        base = msisdn_base + (n - first_tenant) * per_tenant
        household_side: list[tuple[str, tuple[object, ...]]] = [
            (_HOUSEHOLDS, (tid, households, _ZONES)),
            (_DEVICES, (tid, households, n, devices_per_household)),
            (_HOUSEHOLD_POLICIES, (tid, households)),
        ]
        subscriber_side: list[tuple[str, tuple[object, ...]]] = [
            ("INSERT INTO iim.tenant (id, name) VALUES ($1, $2)", (tid, f"synthetic tenant {n}")),
            (_SUBSCRIBERS, (tid, subs, base)),
            (_BINDINGS, (tid, subs, members_per_household)),
            (_SUBSCRIBER_POLICIES, (tid, subs, base)),
            (_CONSENTS, (tid, subs)),
        ]
        if isinstance(conn, asyncpg.Pool):
            async with conn.acquire() as first, conn.acquire() as second:
                await asyncio.gather(_run(cast(Connection, first), household_side),
                                     _run(cast(Connection, second), subscriber_side))
        else:
            await _run(conn, subscriber_side + household_side)
        counts["households"] += households
        counts["devices"] += households * devices_per_household
        counts["bindings"] += subs
        counts["policies"] += households + len(range(0, subs, 10))
        counts["consents"] += len(range(0, subs, 2))
        log.info("seeded tenant %s: %d subscribers", tid, subs)
    await conn.execute("ANALYZE iim.tenant, iim.household, iim.subscriber, iim.device, iim.binding, "
                       "iim.policy, iim.consent")
    return SeedReport(tenants=tuple(ids), subscribers=subscribers, seconds=time.perf_counter() - started,
                      **counts)
