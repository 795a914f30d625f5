"""The cache loader: set-based, cursor-streamed routing rows to compile snapshots from (role ``iim_cache``).

:func:`load_routing_rows` streams one :class:`RoutingRow` per subscriber (its bindings, households, enabled
devices, effective policy and active consents), for every tenant or only for the subscribers changed since
a seq of the change feed (:mod:`policy_cache.changes`).

Performance notes (1M subscribers must load in seconds on a 2-core machine): decoding dominates, so the
scans are flat and narrow - one query per tenant (no tenant column), timestamps as epoch seconds
(float8 decodes ~15x cheaper than timestamptz), capability sets as a text key, bindings and the personal
policy merged into one subscriber scan ordered by the indexes (merge joins, no sort) - and fetched in
batches; Python's cyclic GC is paused while millions of tuples are created.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime, time
from time import perf_counter, process_time
from types import MappingProxyType
from typing import Any, Literal, NamedTuple
from uuid import UUID

import asyncpg

from policy_cache.changes import change_watermark, changes_since
from policy_cache.db import Connection
from policy_cache.models import (
    BindingRole,
    ConsentPurpose,
    DeviceCapability,
    DeviceStatus,
    DeviceType,
    FallbackAction,
    PresenceState,
    RingMode,
)

__all__ = [
    "RoutingBinding", "RoutingConsent", "RoutingDevice", "RoutingHousehold", "RoutingPolicy", "RoutingRow",
    "RoutingStream", "load_routing_rows",
]

log = logging.getLogger(__name__)

class RoutingDevice(NamedTuple):
    id: UUID
    type: DeviceType
    vendor: str | None
    capabilities: frozenset[DeviceCapability]
    sip_uri: str | None
    connector: str | None
    connector_ref: str | None
    status: DeviceStatus
    status_since: float  # status_changed_at, epoch seconds


class RoutingPolicy(NamedTuple):
    """A policy; a household's policy object is shared by the rows of all its members."""

    id: UUID
    scope: Literal["subscriber", "household"]
    ring_mode: RingMode
    phone_timeout_s: int
    home_timeout_s: int
    quiet_start: time | None
    quiet_end: time | None
    dnd: bool
    allowed_callers: tuple[str, ...]
    blocked_callers: tuple[str, ...]
    home_only_when_present: bool
    fallback: FallbackAction
    version: int


class RoutingHousehold(NamedTuple):
    """A household, its enabled devices (by id) and its policy; one object shared by all its members."""

    id: UUID
    time_zone: str
    presence: PresenceState
    presence_since: float  # presence_changed_at, epoch seconds
    devices: tuple[RoutingDevice, ...]
    policy: RoutingPolicy | None


class RoutingBinding(NamedTuple):
    """One owner/member binding of the subscriber. ``device_id=None``: all household devices ring."""

    household: RoutingHousehold
    role: BindingRole
    priority: int
    device_id: UUID | None

    @property
    def devices(self) -> tuple[RoutingDevice, ...]:
        if self.device_id is None:
            return self.household.devices
        return tuple(d for d in self.household.devices if d.id == self.device_id)


class RoutingConsent(NamedTuple):
    """An unrevoked consent, unexpired at load time; ``expires_at`` must still be checked at use time."""

    purpose: ConsentPurpose
    scope: Mapping[str, Any]  # read-only (equal scopes are one shared object)
    expires_at: datetime | None


class RoutingRow(NamedTuple):
    """Everything needed to route calls to one subscriber.

    * ``bindings``: owner/member bindings, primary first (owner before member, then priority, then
      household id). backup_contact/security_service bindings are not here: they make the subscriber an
      escalation contact of a household, not a place where the subscriber's own calls ring.
    * ``policy``: the effective one - the subscriber's own, else the primary household's (``scope`` says
      which). Quiet hours are local times of the primary household's zone.
    * ``consents``: unrevoked and unexpired at load time (re-check ``expires_at`` when using one).
    """

    tenant_id: UUID
    subscriber_id: UUID
    msisdn: str
    sip_aor: str | None
    policy: RoutingPolicy | None
    bindings: tuple[RoutingBinding, ...]
    consents: tuple[RoutingConsent, ...]

    @property
    def primary(self) -> RoutingBinding | None:
        return self.bindings[0] if self.bindings else None

    def consent(self, purpose: ConsentPurpose, now: datetime) -> RoutingConsent | None:
        for c in self.consents:
            if c.purpose is purpose and (c.expires_at is None or c.expires_at > now):
                return c
        return None


# $1 = tenant; {f}: empty for a full load, else a restriction to the subscribers in $2 (and their households).
# Policy columns come as cheap scalars: quiet hours in seconds of the day, empty caller lists as NULL.
_Q_DEVICES = """
SELECT d.household_id, d.id, d.type, d.vendor, array_to_string(d.capabilities, ','), d.sip_uri, d.connector,
       d.connector_ref, d.status, date_part('epoch', d.status_changed_at)
FROM iim.device d
WHERE d.tenant_id = $1 AND d.enabled {f}
ORDER BY d.household_id, d.id
"""
_Q_HOUSEHOLDS = """
SELECT h.id, h.time_zone, h.presence, date_part('epoch', h.presence_changed_at),
       ph.id, ph.ring_mode, ph.phone_timeout_s, ph.home_timeout_s, extract(epoch FROM ph.quiet_start)::int4,
       extract(epoch FROM ph.quiet_end)::int4, ph.dnd, NULLIF(ph.allowed_callers, ARRAY[]::text[]),
       NULLIF(ph.blocked_callers, ARRAY[]::text[]), ph.home_only_when_present, ph.fallback, ph.version
FROM iim.household h
LEFT JOIN iim.policy ph ON ph.tenant_id = h.tenant_id AND ph.household_id = h.id
WHERE h.tenant_id = $1 {f}
"""
_Q_CONSENTS = """
SELECT c.subscriber_id, c.purpose, c.scope::text, c.expires_at
FROM iim.consent c
WHERE c.tenant_id = $1 AND c.revoked_at IS NULL AND (c.expires_at IS NULL OR c.expires_at > now()) {f}
"""
# One row per (subscriber, owner/member binding), ordered by subscriber: the planner merge-joins the three
# indexes in key order, so there is no sort.
_Q_SUBSCRIBERS = """
SELECT s.id, s.msisdn, s.sip_aor, b.household_id, b.role, b.priority, b.device_id,
       ps.id, ps.ring_mode, ps.phone_timeout_s, ps.home_timeout_s, extract(epoch FROM ps.quiet_start)::int4,
       extract(epoch FROM ps.quiet_end)::int4, ps.dnd, NULLIF(ps.allowed_callers, ARRAY[]::text[]),
       NULLIF(ps.blocked_callers, ARRAY[]::text[]), ps.home_only_when_present, ps.fallback, ps.version
FROM iim.subscriber s
LEFT JOIN iim.binding b ON b.tenant_id = s.tenant_id AND b.subscriber_id = s.id AND b.role IN ('owner', 'member')
LEFT JOIN iim.policy ps ON ps.tenant_id = s.tenant_id AND ps.subscriber_id = s.id
WHERE s.tenant_id = $1 {f}
ORDER BY s.id
"""
_SOME_HOUSEHOLDS = "(SELECT household_id FROM iim.binding WHERE tenant_id = $1 AND subscriber_id = ANY($2::uuid[]))"
_FILTER_SOME = {
    "d": f"AND d.household_id IN {_SOME_HOUSEHOLDS}",
    "h": f"AND h.id IN {_SOME_HOUSEHOLDS}",
    "c": "AND c.subscriber_id = ANY($2::uuid[])",
    "s": "AND s.id = ANY($2::uuid[])",
}
_FILTER_ALL = dict.fromkeys(_FILTER_SOME, "")

_DEVICE_TYPES = {m.value: m for m in DeviceType}
_DEVICE_STATUS = {m.value: m for m in DeviceStatus}
_PRESENCE = {m.value: m for m in PresenceState}
_ROLES = {m.value: m for m in BindingRole}
_ROLE_RANK = {BindingRole.OWNER: 0, BindingRole.MEMBER: 1}
_RING = {m.value: m for m in RingMode}
_FALLBACK = {m.value: m for m in FallbackAction}
_PURPOSE = {m.value: m for m in ConsentPurpose}
_new = tuple.__new__  # builds the NamedTuples without their Python-level __new__ (hot loops below)


class _Interner:
    """Shares equal immutable values (capability sets, caller lists, times, scopes, short texts) between rows."""

    def __init__(self) -> None:
        self.caps: dict[str, frozenset[DeviceCapability]] = {}
        self.strs: dict[tuple[str, ...], tuple[str, ...]] = {(): ()}
        self.times: dict[int, time] = {}
        self.texts: dict[str | None, str | None] = {}
        self.scopes: dict[str, Mapping[str, Any]] = {}

    def make_caps(self, text: str) -> frozenset[DeviceCapability]:
        found = self.caps[text] = frozenset(DeviceCapability(v) for v in text.split(",") if v)
        return found

    def tuple_of(self, values: Sequence[str] | None) -> tuple[str, ...]:
        if values is None:
            return ()
        key = tuple(values)
        return self.strs.setdefault(key, key)

    def time_of(self, seconds: int | None) -> time | None:
        if seconds is None:
            return None
        found = self.times.get(seconds)
        if found is None:
            found = self.times[seconds] = time(seconds // 3600, seconds // 60 % 60, seconds % 60)
        return found

    def scope(self, text: str) -> Mapping[str, Any]:
        found = self.scopes.get(text)
        if found is None:
            found = self.scopes[text] = MappingProxyType(json.loads(text))
        return found

    def policy(self, r: asyncpg.Record, i: int, scope: Literal["subscriber", "household"]) -> RoutingPolicy | None:
        """The policy in columns r[i:i+12] (id .. version), None when the outer join found none."""
        if r[i] is None:
            return None
        result: RoutingPolicy = _new(RoutingPolicy, (
            r[i], scope, _RING[r[i + 1]], r[i + 2], r[i + 3], self.time_of(r[i + 4]), self.time_of(r[i + 5]),
            r[i + 6], self.tuple_of(r[i + 7]), self.tuple_of(r[i + 8]), r[i + 9], _FALLBACK[r[i + 10]], r[i + 11]))
        return result


class RoutingStream:
    """Async iterator over :class:`RoutingRow` (or lists of them: :meth:`batches`); see :func:`load_routing_rows`.

    Attributes (set once iteration has started):
        watermark: the change seq the rows are complete up to; continue with ``changes_since(watermark)``.
        affected: for an incremental load, the subscriber ids that changed: those with no row were deleted
            and must be dropped from the cache. ``None`` for a full load.
    """

    def __init__(self, conn: Connection, since_seq: int | None, subscriber_ids: Sequence[UUID] | None,
                 batch: int) -> None:
        self._conn = conn
        self._since = since_seq
        self._ids = None if subscriber_ids is None else list(subscriber_ids)
        self._batch = batch
        self.watermark: int | None = None
        self.affected: frozenset[UUID] | None = None

    def __aiter__(self) -> AsyncIterator[RoutingRow]:
        return self._flatten()

    def batches(self) -> AsyncIterator[list[RoutingRow]]:
        """The rows in lists of up to ``batch`` (cheaper than one ``async for`` step per row)."""
        return self._batches()

    async def _flatten(self) -> AsyncIterator[RoutingRow]:
        async for batch in self._batches():
            for row in batch:
                yield row

    async def _batches(self) -> AsyncIterator[list[RoutingRow]]:
        conn = self._conn
        ids = self._ids
        if self._since is not None:
            changed, self.watermark = await changes_since(conn, self._since)
            ids = changed if ids is None else sorted(set(changed) | set(ids))
        else:
            self.watermark = await change_watermark(conn)
        if ids is not None:
            self.affected = frozenset(ids)
            if not ids:
                return
        gc_was_enabled = gc.isenabled()
        gc.disable()  # millions of new tuples would trigger repeated full collections (3x slower)
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await conn.execute("SET LOCAL cursor_tuple_fraction = 1.0")  # plan for all rows, not the first
                if ids is None:
                    tenants = [r[0] for r in await conn.fetch("SELECT id FROM iim.tenant ORDER BY id")]
                else:
                    tenants = [r[0] for r in await conn.fetch(
                        "SELECT DISTINCT tenant_id FROM iim.subscriber WHERE id = ANY($1::uuid[])", ids)]
                intern = _Interner()
                for tenant_id in tenants:
                    async for batch in self._tenant_batches(tenant_id, ids, intern):
                        yield batch
        finally:
            if gc_was_enabled:
                gc.enable()

    async def _scan(self, sql: str, tenant_id: UUID, ids: list[UUID] | None) -> AsyncIterator[list[asyncpg.Record]]:
        """Batches from a cursor (``async for`` over a cursor costs several microseconds per row)."""
        args: tuple[Any, ...] = (tenant_id,) if ids is None else (tenant_id, ids)
        cursor = await self._conn.cursor(sql, *args)
        while batch := await cursor.fetch(self._batch):
            yield batch

    async def _tenant_batches(self, tenant_id: UUID, ids: list[UUID] | None,
                              intern: _Interner) -> AsyncIterator[list[RoutingRow]]:
        # The loops below are the hot path of a full load: locals instead of globals/attributes, no calls
        # for the common case.
        f = _FILTER_ALL if ids is None else _FILTER_SOME
        new = _new
        started, cpu_started = perf_counter(), process_time()

        device_types, device_status, caps, make_caps = _DEVICE_TYPES, _DEVICE_STATUS, intern.caps, intern.make_caps
        same = intern.texts.setdefault  # one object per distinct vendor / connector / time zone
        by_household: dict[UUID, tuple[RoutingDevice, ...]] = {}
        current: UUID | None = None
        group: list[RoutingDevice] = []
        async for batch in self._scan(_Q_DEVICES.format(f=f["d"]), tenant_id, ids):
            for r in batch:
                if r[0] != current:
                    if current is not None:
                        by_household[current] = tuple(group)
                    current, group = r[0], []
                device_caps = caps.get(r[4])
                if device_caps is None:
                    device_caps = make_caps(r[4])
                group.append(new(RoutingDevice, (r[1], device_types[r[2]], same(r[3], r[3]), device_caps, r[5],
                                                 same(r[6], r[6]), r[7], device_status[r[8]], r[9])))
        if current is not None:
            by_household[current] = tuple(group)
        del group
        t_devices, c_devices = perf_counter(), process_time()

        presence, policy_of, pop_devices = _PRESENCE, intern.policy, by_household.pop
        ring, fallback, time_of, tuple_of = _RING, _FALLBACK, intern.time_of, intern.tuple_of
        households: dict[UUID, RoutingHousehold] = {}
        no_devices: tuple[RoutingDevice, ...] = ()
        async for batch in self._scan(_Q_HOUSEHOLDS.format(f=f["h"]), tenant_id, ids):
            for r in batch:
                if r[4] is None:
                    policy = None
                else:  # intern.policy(r, 4, "household"), inlined
                    policy = new(RoutingPolicy, (
                        r[4], "household", ring[r[5]], r[6], r[7], None if r[8] is None else time_of(r[8]),
                        None if r[9] is None else time_of(r[9]), r[10], () if r[11] is None else tuple_of(r[11]),
                        () if r[12] is None else tuple_of(r[12]), r[13], fallback[r[14]], r[15]))
                households[r[0]] = new(RoutingHousehold, (r[0], same(r[1], r[1]), presence[r[2]], r[3],
                                                          pop_devices(r[0], no_devices), policy))
        del by_household
        t_households, c_households = perf_counter(), process_time()

        purposes, scope_of = _PURPOSE, intern.scope
        consents: dict[UUID, list[RoutingConsent]] = {}
        async for batch in self._scan(_Q_CONSENTS.format(f=f["c"]), tenant_id, ids):
            for r in batch:
                consent: RoutingConsent = new(RoutingConsent, (purposes[r[1]], scope_of(r[2]), r[3]))
                found = consents.get(r[0])
                if found is None:
                    consents[r[0]] = [consent]
                else:
                    found.append(consent)
        t_consents, c_consents = perf_counter(), process_time()

        # Subscriber rows arrive ordered by id, one per owner/member binding. A subscriber is emitted when
        # the next one starts. `one` holds the first binding, `more` the rest (rare).
        roles, get_household, pop_consents = _ROLES, households.get, consents.pop
        count = 0
        pending: asyncpg.Record | None = None
        pending_id: UUID | None = None
        one: RoutingBinding | None = None
        more: list[RoutingBinding] | None = None
        out: list[RoutingRow] = []

        def emit(r: asyncpg.Record, one: RoutingBinding | None, more: list[RoutingBinding] | None) -> RoutingRow:
            bindings: tuple[RoutingBinding, ...]
            if more is None:
                bindings = () if one is None else (one,)
            else:
                assert one is not None
                bindings = tuple(sorted([one, *more], key=_binding_order))
            policy = policy_of(r, 7, "subscriber")
            if policy is None and bindings:
                policy = bindings[0].household.policy
            found = pop_consents(r[0], None)
            row: RoutingRow = new(RoutingRow, (tenant_id, r[0], r[1], r[2], policy, bindings,
                                               tuple(found) if found else ()))
            return row

        async for batch in self._scan(_Q_SUBSCRIBERS.format(f=f["s"]), tenant_id, ids):
            for r in batch:
                sid = r[0]
                if sid == pending_id:  # another binding of the same subscriber
                    household = get_household(r[3])
                    if household is not None:
                        extra = new(RoutingBinding, (household, roles[r[4]], r[5], r[6]))
                        if one is None:
                            one = extra
                        elif more is None:
                            more = [extra]
                        else:
                            more.append(extra)
                    continue
                if pending is not None:
                    if more is None and pending[7] is None and one is not None:
                        # The common case, inlined: one binding, no personal policy.
                        found = pop_consents(pending[0], None)
                        out.append(new(RoutingRow, (tenant_id, pending_id, pending[1], pending[2],
                                                    one.household.policy, (one,), tuple(found) if found else ())))
                    else:
                        out.append(emit(pending, one, more))
                pending, pending_id, more = r, sid, None
                household = None if r[3] is None else get_household(r[3])
                one = None if household is None else new(RoutingBinding, (household, roles[r[4]], r[5], r[6]))
            if out:
                count += len(out)
                yield out
                out = []
        if pending is not None:
            count += 1
            yield [emit(pending, one, more)]
        t_end, c_end = perf_counter(), process_time()
        log.debug("routing load of tenant %s: %d subscribers in %.2f s (cpu %.2f s): devices %.2f s (cpu %.2f), "
                  "households %.2f s (cpu %.2f, %d), consents %.2f s (cpu %.2f), subscribers %.2f s (cpu %.2f)",
                  tenant_id, count, t_end - started, c_end - cpu_started, t_devices - started,
                  c_devices - cpu_started, t_households - t_devices, c_households - c_devices, len(households),
                  t_consents - t_households, c_consents - c_households, t_end - t_consents, c_end - c_consents)


def _binding_order(b: RoutingBinding) -> tuple[int, int, UUID]:
    return (_ROLE_RANK.get(b.role, 2), b.priority, b.household.id)


def load_routing_rows(
    conn: Connection, since_seq: int | None = None, *, subscriber_ids: Sequence[UUID] | None = None,
    batch: int = 20_000,
) -> RoutingStream:
    """Stream the routing rows of every subscriber of every tenant (or of those changed / listed).

    Per tenant, four flat set-based scans (devices, households with their policy, active consents, then
    subscribers merge-joined with their bindings and own policy) in one REPEATABLE READ READ ONLY
    snapshot, each read through a server-side cursor in batches of ``batch`` rows and joined here by id;
    household and policy objects are shared between the rows of a household's members. Rows are yielded
    while the subscriber scan streams. Use a connection of the ``iim_cache`` role, outside a transaction.
    Python's cyclic GC is paused while the stream runs (restored afterwards).

    * ``since_seq=None, subscriber_ids=None``: full load; ``stream.watermark`` is taken (barrier) before the
      snapshot, so the rows include every change up to it.
    * ``since_seq=N``: only subscribers affected by changes after ``N`` (``stream.affected``), watermark =
      the newest of those changes.
    * ``subscriber_ids=[...]``: exactly those subscribers.

    Usage::

        stream = load_routing_rows(conn)
        async for batch in stream.batches():     # or: async for row in stream
            ...
        last_seen = stream.watermark

    Stop early only through ``contextlib.aclosing(...)`` so the transaction closes promptly.
    """
    return RoutingStream(conn, since_seq, subscriber_ids, batch)
