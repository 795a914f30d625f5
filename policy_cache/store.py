"""PostgreSQL side of the policy cache: rows in, compiled snapshots out, changes by sequence.

``PgPolicyStore`` implements :class:`policy_cache.cache.PolicyStore` on a connection of
the ``iim_cache`` role (reads every tenant's routing tables, nothing else) and a
second connection that LISTENs on ``iim_policy``. asyncpg's connection errors are
mapped to :class:`PolicyStoreUnavailable` here, at the layer boundary, so the cache
only has to know that PostgreSQL is away, not how it went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, time
from uuid import UUID

import asyncpg

from iim.core.errors import STORE_UNAVAILABLE
from iim.core.lifecycle import AsyncResource
from iim.core.numbering import DEFAULT_PLAN, NumberingPlan, PlanError, try_e164
from policy_cache.cache import PolicyStoreUnavailable
from policy_cache.changes import change_watermark, changes_since
from policy_cache.db import Connection, DbRole, connect
from policy_cache.errors import ChangeLogTruncatedError
from policy_cache.loader import RoutingDevice, RoutingRow, load_routing_rows
from policy_cache.models import ConsentPurpose, DeviceCapability, DeviceStatus
from policy_cache.presence import PresenceClaim
from policy_cache.presence_store import live_claims
from policy_cache.snapshot import RoutingSnapshot, SpeakerDevice, callers, compile_snapshot

log = logging.getLogger("iim.policy_cache")

CHANNEL = "iim_policy"


_SIP = frozenset({DeviceCapability.SIP, DeviceCapability.WEBRTC})


@contextlib.contextmanager
def unavailable_as_store_error() -> Iterator[None]:
    """Map PostgreSQL being away (not SQL mistakes) to PolicyStoreUnavailable."""
    try:
        yield
    except STORE_UNAVAILABLE as exc:
        raise PolicyStoreUnavailable(f"{type(exc).__name__}: {exc}") from exc


def _minutes(value: time | None) -> int | None:
    return None if value is None else value.hour * 60 + value.minute


def snapshot_from_row(row: RoutingRow, now: datetime, shared: dict[object, object]) -> RoutingSnapshot:
    """Compile one subscriber's routing row.

    ``shared`` lives for one load: a household's devices and id string are compiled once and shared
    by the snapshots of all its members (keyed by the identity of the row objects, which the
    loader already shares between members).
    """
    bindings = row.bindings
    primary = bindings[0] if bindings else None
    household = primary.household if primary else None
    policy = row.policy
    speakers: tuple[SpeakerDevice, ...] = ()
    for binding in bindings:
        key = (id(binding.household), binding.device_id)
        compiled = shared.get(key)
        if compiled is None:
            compiled = shared[key] = tuple(_speakers(binding.devices))
        assert isinstance(compiled, tuple)
        if not speakers:
            speakers = compiled
        else:
            known = {d.device_id for d in speakers}
            speakers += tuple(d for d in compiled if d.device_id not in known)
    household_id: str | None = None
    if household is not None:
        hh_key = id(household)
        found = shared.get(hh_key)
        if found is None:
            found = shared[hh_key] = str(household.id)
        assert isinstance(found, str)
        household_id = found
    consent = row.consent(ConsentPurpose.ANNOUNCE_CALLS, now) if row.consents else None
    recording = row.consent(ConsentPurpose.CALL_RECORDING, now) if row.consents else None
    return compile_snapshot(
        subscriber_id=str(row.subscriber_id),
        tenant_id=str(row.tenant_id),
        msisdn=row.msisdn,
        aor=row.sip_aor.removeprefix("sip:") if row.sip_aor else None,
        time_zone=household.time_zone if household else "UTC",
        ring_mode=policy.ring_mode.value if policy else "phone_only",
        phone_timeout_s=policy.phone_timeout_s if policy else 20,
        home_timeout_s=policy.home_timeout_s if policy else 20,
        quiet_start_min=_minutes(policy.quiet_start) if policy else None,
        quiet_end_min=_minutes(policy.quiet_end) if policy else None,
        dnd=policy.dnd if policy else False,
        allowed_callers=policy.allowed_callers if policy else None,
        blocked_callers=policy.blocked_callers if policy else None,
        presence=household.presence.value if household else "unknown",
        home_only_when_present=policy.home_only_when_present if policy else False,
        announce_consent=consent is not None,
        announce_consent_expires=consent.expires_at.timestamp() if consent and consent.expires_at else None,
        recording_consent=recording is not None,
        recording_consent_expires=recording.expires_at.timestamp() if recording and recording.expires_at else None,
        fallback=policy.fallback.value if policy else "none",
        speakers=speakers,
        policy_version=policy.version if policy else 0,
        household_id=household_id,
    )


_ZONES: dict[str | None, str] = {None: "UTC"}


def _zone(name: str | None) -> str:
    found = _ZONES.get(name)
    if found is None:
        found = _ZONES[name] = sys.intern(name or "UTC")
    return found


def _device_order(device: SpeakerDevice) -> str:
    return device.device_id


def _speakers(devices: Iterable[RoutingDevice]) -> Iterator[SpeakerDevice]:
    for device in devices:
        caps = device.capabilities
        sip = bool(caps & _SIP) and device.sip_uri is not None
        announce = DeviceCapability.CLOUD_ANNOUNCE in caps and device.connector is not None
        if not (sip or announce):
            continue  # sensors, wearables: they raise events, they do not ring
        if sip and device.sip_uri is not None:
            endpoint = device.sip_uri.removeprefix("sip:")
        else:
            endpoint = f"{device.connector}:{device.connector_ref}"
        yield SpeakerDevice(
            device_id=str(device.id),
            endpoint=endpoint,
            sip=sip,
            cloud_announce=announce,
            # "unknown" rings: FreeSWITCH answers USER_NOT_REGISTERED at once if it is not there.
            online=device.status is not DeviceStatus.OFFLINE,
            name=device.vendor or "",
            webrtc=sip and DeviceCapability.WEBRTC in caps and DeviceCapability.SIP not in caps,
        )


class _ListenFeed:
    """LISTEN iim_policy on a dedicated connection; ``wait`` raises once the connection is gone."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._event = asyncio.Event()
        self._lost = False

    async def start(self) -> None:
        self._conn.add_termination_listener(self._on_terminated)
        with unavailable_as_store_error():
            await self._conn.add_listener(CHANNEL, self._on_notify)

    def _on_notify(self, *_args: object) -> None:
        self._event.set()

    def _on_terminated(self, *_args: object) -> None:
        self._lost = True
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()
        if self._lost or self._conn.is_closed():
            raise PolicyStoreUnavailable("change listener connection lost")

    async def aclose(self) -> None:
        if not self._conn.is_closed():
            self._conn.terminate()


# The full load, shaped for the cache: PostgreSQL joins (on its own core) and Python only builds
# snapshots. One row per subscriber; ringing devices come separately, once per household.
_FULL_DEVICES = """
SELECT d.tenant_id::text, d.household_id::text, d.id::text, d.sip_uri, d.connector || ':' || d.connector_ref,
       d.capabilities && '{sip,webrtc}'::iim.device_capability[],
       'cloud_announce' = ANY(d.capabilities), d.status = 'offline', d.vendor,
       'webrtc' = ANY(d.capabilities) AND NOT 'sip' = ANY(d.capabilities)
FROM iim.device d
WHERE d.enabled AND d.capabilities && '{sip,webrtc,cloud_announce}'::iim.device_capability[]
"""
# Expressions are kept cheap on purpose: PostgreSQL evaluates them for a million rows while we wait.
# Households come back as arrays only for the rare subscriber with several bindings.
_FULL_SUBSCRIBERS = """
WITH sb AS (
    SELECT b.tenant_id, b.subscriber_id, count(*) AS n,
           array_agg(b.household_id ORDER BY b.role <> 'owner', b.priority, b.household_id) AS households,
           array_agg(b.device_id ORDER BY b.role <> 'owner', b.priority, b.household_id) AS devices
    FROM iim.binding b WHERE b.role IN ('owner', 'member')
    GROUP BY b.tenant_id, b.subscriber_id
)
SELECT s.tenant_id::text, s.id::text, s.msisdn, s.sip_aor, sb.households[1]::text,
       CASE WHEN sb.n > 1 OR sb.devices[1] IS NOT NULL THEN sb.households END,
       CASE WHEN sb.n > 1 OR sb.devices[1] IS NOT NULL THEN sb.devices END,
       h.time_zone, h.presence::text,
       coalesce(sp.ring_mode, hp.ring_mode)::text, coalesce(sp.phone_timeout_s, hp.phone_timeout_s),
       coalesce(sp.home_timeout_s, hp.home_timeout_s),
       CASE WHEN sp.id IS NOT NULL THEN sp.quiet_start ELSE hp.quiet_start END,
       CASE WHEN sp.id IS NOT NULL THEN sp.quiet_end ELSE hp.quiet_end END,
       coalesce(sp.dnd, hp.dnd),
       CASE WHEN sp.id IS NOT NULL THEN sp.allowed_callers ELSE hp.allowed_callers END,
       CASE WHEN sp.id IS NOT NULL THEN sp.blocked_callers ELSE hp.blocked_callers END,
       coalesce(sp.home_only_when_present, hp.home_only_when_present), coalesce(sp.fallback, hp.fallback)::text,
       coalesce(sp.version, hp.version), c.id IS NOT NULL, c.expires_at, cr.id IS NOT NULL, cr.expires_at
FROM iim.subscriber s
LEFT JOIN sb ON sb.tenant_id = s.tenant_id AND sb.subscriber_id = s.id
LEFT JOIN iim.household h ON h.tenant_id = s.tenant_id AND h.id = sb.households[1]
LEFT JOIN iim.policy sp ON sp.tenant_id = s.tenant_id AND sp.subscriber_id = s.id
LEFT JOIN iim.policy hp ON hp.tenant_id = s.tenant_id AND hp.household_id = sb.households[1]
LEFT JOIN iim.consent c ON c.tenant_id = s.tenant_id AND c.subscriber_id = s.id
     AND c.purpose = 'announce_calls' AND c.revoked_at IS NULL AND (c.expires_at IS NULL OR c.expires_at > now())
LEFT JOIN iim.consent cr ON cr.tenant_id = s.tenant_id AND cr.subscriber_id = s.id
     AND cr.purpose = 'call_recording' AND cr.revoked_at IS NULL AND (cr.expires_at IS NULL OR cr.expires_at > now())
"""
_FULL_CLAIMS = """
SELECT tenant_id::text, household_id::text, source::text, subject, state::text,
       date_part('epoch', observed_at), date_part('epoch', expires_at), basis
FROM iim.presence_claim WHERE expires_at > now()
"""
_BATCH = 20_000


class PgPolicyStore(AsyncResource):
    """The cache's view of PostgreSQL (``iim_cache`` role DSN)."""

    def __init__(self, dsn: str, *, connect_timeout: float = 5.0, command_timeout: float = 30.0) -> None:
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._conn: asyncpg.Connection | None = None

    async def _connection(self) -> asyncpg.Connection:
        conn = self._conn
        if conn is None or conn.is_closed():
            with unavailable_as_store_error():
                conn = await connect(self._dsn, role=DbRole.CACHE, timeout=self._connect_timeout,
                                     command_timeout=self._command_timeout)
            self._conn = conn
        return conn

    async def aclose(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()
        self._conn = None

    async def _compile(self, stream: AsyncIterator[RoutingRow]) -> list[RoutingSnapshot]:
        now = datetime.now(UTC)
        shared: dict[object, object] = {}
        return [snapshot_from_row(row, now, shared) async for row in stream]

    async def load_all(self) -> tuple[list[RoutingSnapshot], int]:
        """Every subscriber of every tenant, compiled; and the change seq the load is complete up to.

        A reader task keeps one FETCH in flight while the batch before it is compiled, so
        PostgreSQL (joining, on its own core) and Python (building snapshots) work at once.
        """
        conn = await self._connection()
        with unavailable_as_store_error():
            watermark = await change_watermark(conn)  # barrier first: the snapshot below includes it
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await conn.execute("SET LOCAL work_mem = '256MB'")
                await conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")  # leave a core to us
                batches: asyncio.Queue[tuple[str, list[asyncpg.Record]] | None] = asyncio.Queue(maxsize=3)
                reader = asyncio.get_running_loop().create_task(self._read(conn, batches))
                try:
                    snapshots = await self._compile_batches(batches)
                finally:
                    if not reader.done():
                        reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
        return snapshots, watermark

    @staticmethod
    async def _read(conn: Connection, out: asyncio.Queue[tuple[str, list[asyncpg.Record]] | None]) -> None:
        try:
            for kind, sql in (("claims", _FULL_CLAIMS), ("devices", _FULL_DEVICES),
                              ("subscribers", _FULL_SUBSCRIBERS)):
                cursor = await conn.cursor(sql)
                while batch := await cursor.fetch(_BATCH):
                    await out.put((kind, batch))
        finally:
            await out.put(None)

    async def _compile_batches(self, batches: asyncio.Queue[tuple[str, list[asyncpg.Record]] | None]
                               ) -> list[RoutingSnapshot]:
        devices: dict[tuple[str, str], list[SpeakerDevice]] = {}
        by_household: dict[tuple[str, str], tuple[SpeakerDevice, ...]] | None = None
        snapshots: list[RoutingSnapshot] = []
        tenants: dict[str, str] = {}
        claims: dict[tuple[str, str], tuple[PresenceClaim, ...]] = {}
        while (item := await batches.get()) is not None:
            kind, batch = item
            if kind == "claims":
                for r in batch:
                    key = (r[0], r[1])
                    claim = PresenceClaim(r[2], r[3], r[4], float(r[5]), float(r[6]), r[7])
                    claims[key] = (*claims.get(key, ()), claim)
                continue
            if kind == "devices":
                for r in batch:
                    sip = r[5] and r[3] is not None
                    endpoint = r[3].removeprefix("sip:") if sip else r[4]
                    if endpoint is None:
                        continue  # cloud_announce without a connector: nothing can reach it
                    devices.setdefault((r[0], r[1]), []).append(
                        SpeakerDevice(r[2], endpoint, sip, r[6] and r[4] is not None, not r[7], r[8] or "",
                                      sip and r[9]))
                continue
            if by_household is None:
                by_household = {k: tuple(sorted(v, key=_device_order)) for k, v in devices.items()}
                devices.clear()
            snapshot = self._snapshot
            snapshots.extend([snapshot(r, by_household, tenants, claims) for r in batch])
        return snapshots

    @staticmethod
    def _snapshot(r: asyncpg.Record, by_household: dict[tuple[str, str], tuple[SpeakerDevice, ...]],
                  tenants: dict[str, str], claims: dict[tuple[str, str], tuple[PresenceClaim, ...]]
                  ) -> RoutingSnapshot:
        tenant = tenants.setdefault(r[0], r[0])
        household = r[4]
        speakers: tuple[SpeakerDevice, ...] = ()
        if r[5] is not None:  # several bindings, or bindings to single devices
            for hh, device_id in zip(r[5], r[6], strict=True):
                found = by_household.get((tenant, str(hh)), ())
                if device_id is not None:
                    found = tuple(d for d in found if d.device_id == str(device_id))
                known = {d.device_id for d in speakers}
                speakers += tuple(d for d in found if d.device_id not in known)
        elif household is not None:
            speakers = by_household.get((tenant, household), ())
        ring_mode = r[9]
        aor = r[3]
        qs, qe = r[12], r[13]
        expires, recording_expires = r[21], r[23]
        # Values come from PostgreSQL enums and CHECKs: built directly, without compile_snapshot's checks.
        return RoutingSnapshot(
            r[1], tenant, r[2], aor.removeprefix("sip:") if aor else None, _zone(r[7]),
            ring_mode if ring_mode is not None else "phone_only",
            r[10] if ring_mode is not None else 20, r[11] if ring_mode is not None else 20,
            None if qs is None else qs.hour * 60 + qs.minute, None if qe is None else qe.hour * 60 + qe.minute,
            bool(r[14]), callers(r[15]), callers(r[16]), r[8] or "unknown", bool(r[17]),
            r[20], r[18] if ring_mode is not None else "none", speakers,
            r[19] if ring_mode is not None else 0, household, None if expires is None else expires.timestamp(),
            bool(r[22]), None if recording_expires is None else recording_expires.timestamp(),
            claims.get((tenant, household), ()) if claims and household is not None else (),
        )

    async def load_subscribers(self, subscriber_ids: Iterable[str]) -> list[RoutingSnapshot]:
        ids = [UUID(s) for s in subscriber_ids]
        if not ids:
            return []
        conn = await self._connection()
        with unavailable_as_store_error():
            snapshots = await self._compile(aiter(load_routing_rows(conn, subscriber_ids=ids)))
            households = {UUID(s.household_id) for s in snapshots if s.household_id is not None}
            claims = await live_claims(conn, households) if households else {}
        return [replace(s, presence_claims=found) if (found := claims.get((s.tenant_id, s.household_id or ""))) else s
                for s in snapshots]

    async def changes_since(self, seq: int) -> tuple[set[str], int]:
        conn = await self._connection()
        with unavailable_as_store_error():
            changed, new_seq = await changes_since(conn, seq)
        return {str(u) for u in changed}, new_seq

    async def load_plans(self) -> dict[str, NumberingPlan]:
        conn = await self._connection()
        with unavailable_as_store_error():
            rows = await conn.fetch("SELECT tenant_id, country_code, trunk_prefix, international_prefixes, "
                                    "national_lengths FROM iim.numbering_plan")
        plans: dict[str, NumberingPlan] = {}
        for r in rows:
            try:
                plans[str(r[0])] = NumberingPlan(r[1], r[2], tuple(r[3]), tuple(r[4]))
            except PlanError:  # the table's CHECKs are the same rules: only a hand-made row gets here
                log.exception("numbering plan of tenant %s cannot be applied: the default plan serves it", r[0])
        return plans

    async def find_subscriber_ids(self, number: str) -> list[str]:
        """Subscribers (of any tenant) with this MSISDN (with or without ``+``, or in a form the subscriber's
        tenant's numbering plan reads, as the cache finds them) or SIP AoR."""
        digits = number.removeprefix("+")
        plans = await self.load_plans()
        readings = {plan: try_e164(number, plan) for plan in {DEFAULT_PLAN, *plans.values()}}
        exact = [number, "+" + digits, digits, "sip:" + number.removeprefix("sip:")]
        conn = await self._connection()
        with unavailable_as_store_error():
            rows = await conn.fetch(
                "SELECT id, tenant_id, msisdn FROM iim.subscriber "
                "WHERE msisdn = ANY($1::text[]) OR sip_aor = ANY($1::text[])",
                [*exact, *{r for r in readings.values() if r is not None}])
        return [str(r["id"]) for r in rows
                if r["msisdn"] in exact or readings[plans.get(str(r["tenant_id"]), DEFAULT_PLAN)] == r["msisdn"]]

    async def listen(self) -> _ListenFeed:
        with unavailable_as_store_error():
            conn = await connect(self._dsn, role=DbRole.CACHE, timeout=self._connect_timeout)
        feed = _ListenFeed(conn)
        await feed.start()
        return feed


__all__ = ["ChangeLogTruncatedError", "PgPolicyStore", "snapshot_from_row", "unavailable_as_store_error"]
