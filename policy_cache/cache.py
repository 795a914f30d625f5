"""The in-memory policy cache: PostgreSQL is the truth, calls read only memory.

At start the whole registry is compiled into immutable per-subscriber snapshots,
indexed by MSISDN and SIP AoR. After that, triggers in PostgreSQL append every
change to ``change_log`` and ``NOTIFY iim_policy``; the cache re-reads only the
subscribers a change touched. A lost listener is no loss: on reconnect the cache
asks for every change after the last sequence number it applied (never "since a
time"), so a change committed while it was cut off is served as soon as it is back.
With PostgreSQL unreachable the last snapshots keep serving and staleness shows on
``/metrics`` and ``/health``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from iim.core import metrics
from iim.core.lifecycle import AsyncResource
from iim.core.numbering import DEFAULT_PLAN, NumberingPlan, try_e164
from iim.core.retry import backoff_delay
from policy_cache.errors import ChangeLogTruncatedError
from policy_cache.snapshot import RoutingSnapshot

log = logging.getLogger("iim.policy_cache")

SUBSCRIBERS = Gauge("iim_policy_cache_subscribers", "Subscribers in the routing cache", registry=metrics.REGISTRY)
SEQUENCE = Gauge("iim_policy_cache_seq", "Last change sequence applied to the cache", registry=metrics.REGISTRY)
STALENESS = Gauge(
    "iim_policy_cache_staleness_seconds",
    "Seconds since the cache was last known to be in sync with PostgreSQL (0 while the listener is up)",
    registry=metrics.REGISTRY,
)
CONNECTED = Gauge("iim_policy_cache_listener_up", "1 while the change listener is connected", registry=metrics.REGISTRY)
APPLIED = Counter("iim_policy_cache_changes", "Subscriber snapshots replaced or removed by sync", registry=metrics.REGISTRY)
SYNC_SECONDS = Histogram(
    "iim_policy_cache_sync_seconds", "Notification received to new snapshots served",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0), registry=metrics.REGISTRY,
)
AMBIGUOUS = Counter(
    "iim_policy_cache_ambiguous_numbers", "Dialled numbers that name two subscribers under two numbering plans "
    "(routed unchanged)", registry=metrics.REGISTRY,
)
DEVICE_STATUS = Counter(
    "iim_device_status_changes", "Device online/offline changes applied from registrations", ["status"],
    registry=metrics.REGISTRY,
)


class PolicyStoreUnavailable(Exception):
    """PostgreSQL cannot be reached or the link broke; the store maps its driver's errors to this."""


class ChangeFeed(Protocol):
    """A live notification channel: ``wait()`` returns when something changed, raises when the link is lost."""

    async def wait(self) -> None: ...

    async def aclose(self) -> None: ...


class PolicyStore(Protocol):
    """The SQL side of the cache (see :mod:`policy_cache.store`)."""

    async def load_all(self) -> tuple[list[RoutingSnapshot], int]: ...

    async def load_subscribers(self, subscriber_ids: Iterable[str]) -> list[RoutingSnapshot]: ...

    async def changes_since(self, seq: int) -> tuple[set[str], int]: ...

    async def load_plans(self) -> dict[str, NumberingPlan]:
        """Every tenant's own numbering plan (tenants without one are left out: the default plan)."""
        ...

    async def listen(self) -> ChangeFeed: ...


def number_key(number: str) -> str:
    """Index key for a phone number: digits only (``+7900…`` and ``7900…`` are the same line)."""
    return number.removeprefix("+")


@dataclass(frozen=True, slots=True)
class CacheStatus:
    ready: bool
    listener_up: bool
    subscribers: int
    seq: int
    staleness_s: float


class PolicyCache(AsyncResource):
    """Snapshots by number and AoR, kept in step with PostgreSQL by change sequence."""

    def __init__(
        self,
        store: PolicyStore,
        *,
        resync_interval: float = 30.0,
        reconnect_max: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._by_number: dict[str, RoutingSnapshot] = {}
        self._by_aor: dict[str, RoutingSnapshot] = {}
        self._by_id: dict[str, RoutingSnapshot] = {}
        self._by_endpoint: dict[str, list[str]] = {}  # lists: a set costs 200+ bytes per device
        self._device_online: dict[str, bool] = {}
        self._plans: dict[str, NumberingPlan] = {}
        self._distinct_plans: tuple[NumberingPlan, ...] = (DEFAULT_PLAN,)
        self._seq = 0
        self._ready = asyncio.Event()
        self._listener_up = False
        self._in_sync_at: float | None = None
        self._clock = clock
        self._resync_interval = resync_interval
        self._reconnect_max = reconnect_max
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._ready_for_reload = False
        self.on_applied: Callable[[set[str]], None] | None = None

    # -- reading (the call path) -----------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def seq(self) -> int:
        return self._seq

    def lookup(self, number: str) -> RoutingSnapshot | None:
        """The snapshot for a dialled number or SIP AoR, or None for an unknown callee.

        ``+`` and digits is E.164. Other digits are read under every tenant's numbering plan (national,
        international and without-``+`` forms) and match a subscriber only under the plan of the
        subscriber's own tenant; the digits as E.164 without ``+`` also match. So a switch need not tell IIM
        which plan a trunk speaks: there are a few distinct plans, so this is a few dictionary lookups
        whatever the number of subscribers. Two readings naming two subscribers is no guess: None (the
        call goes to the dialled number, as for an unknown callee) and a warning.
        """
        if "@" in number:
            return self._by_number.get(number.removeprefix("+")) or self._by_aor.get(number.removeprefix("sip:"))
        if number.startswith("+"):
            return self._by_number.get(number[1:])
        snapshot = self._by_number.get(number)
        for plan in self._distinct_plans:
            e164 = try_e164(number, plan)
            if e164 is None:
                continue
            found = self._by_number.get(e164[1:])
            if found is None or found is snapshot or self._plans.get(found.tenant_id, DEFAULT_PLAN) != plan:
                continue
            if snapshot is not None:
                AMBIGUOUS.inc()
                log.warning("dialled number names two subscribers under different numbering plans: "
                            "routing it unchanged", extra={"subscribers": [snapshot.subscriber_id,
                                                                           found.subscriber_id]})
                return None
            snapshot = found
        return snapshot

    def plan_for(self, tenant_id: str) -> NumberingPlan:
        """The tenant's numbering plan (the default when it has none)."""
        return self._plans.get(tenant_id, DEFAULT_PLAN)

    def get(self, subscriber_id: str) -> RoutingSnapshot | None:
        return self._by_id.get(subscriber_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def status(self) -> CacheStatus:
        return CacheStatus(self.ready, self._listener_up, len(self._by_id), self._seq, self.staleness())

    def staleness(self) -> float:
        if self._listener_up or self._in_sync_at is None:
            return 0.0
        return max(0.0, self._clock() - self._in_sync_at)

    def health(self) -> dict[str, object]:
        """Probe for /health: down until loaded, degraded while serving stale snapshots."""
        st = self.status()
        STALENESS.set(st.staleness_s)
        status = "down" if not st.ready else ("ok" if st.listener_up else "degraded")
        return {"status": status, "policy_cache": {
            "ready": st.ready, "listener_up": st.listener_up, "subscribers": st.subscribers,
            "seq": st.seq, "staleness_s": round(st.staleness_s, 3)}}

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, *, wait_loaded: bool = True, timeout: float | None = None) -> None:
        """Start loading and following changes; with ``wait_loaded``, return once calls can be served."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._follow(), name="policy-cache")
        if wait_loaded:
            await asyncio.wait_for(self._ready.wait(), timeout)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _follow(self) -> None:
        """Load, then listen; on any loss reconnect with backoff and catch up by sequence."""
        attempt = 0
        while True:
            feed: ChangeFeed | None = None
            try:
                feed = await self._store.listen()  # listen first: nothing committed after the load is missed
                if not self.ready or self._ready_for_reload:
                    await self.reload_all()
                    self._ready_for_reload = False
                else:
                    await self.sync()
                self._set_listener(True)
                attempt = 0
                while True:
                    try:
                        async with asyncio.timeout(self._resync_interval):  # not wait_for: 3.11's can lose a cancel racing its inner wait
                            await feed.wait()
                    except TimeoutError:
                        pass  # belt and braces: catch up by sequence even without a notification
                    await self.sync()
            except asyncio.CancelledError:
                raise
            except ChangeLogTruncatedError:
                log.warning("change log pruned past our sequence %s: reloading everything", self._seq)
                self._ready_for_reload = True
                continue
            except (PolicyStoreUnavailable, OSError, TimeoutError) as exc:
                self._on_lost(exc)
            except Exception as exc:
                # Whatever else ends the feed (a server restarted mid-statement raises errors the map above does
                # not name) must not stop the cache following changes for the process's life: reconnect too.
                log.exception("policy cache feed failed; reconnecting")
                self._on_lost(exc)
            finally:
                if feed is not None:
                    try:
                        await feed.aclose()
                    except (PolicyStoreUnavailable, OSError):
                        pass
            attempt += 1
            await asyncio.sleep(backoff_delay(attempt, 0.2, self._reconnect_max))

    def _on_lost(self, exc: BaseException) -> None:
        if self._listener_up:
            log.warning("policy store unreachable, serving cached snapshots: %s", exc)
        self._set_listener(False)

    def _set_listener(self, up: bool) -> None:
        if up or self._listener_up:
            self._in_sync_at = self._clock()
        self._listener_up = up
        CONNECTED.set(1 if up else 0)

    # -- applying changes ----------------------------------------------------------------
    async def reload_all(self) -> None:
        async with self._lock:
            started = time.perf_counter()
            # A million immutable snapshots are allocated here and live for hours: the cyclic GC
            # would rescan them on every collection during the load (quadratic) and on every full
            # collection afterwards (call-path pauses). Load with it off, then freeze the survivors.
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                snapshots, seq = await self._store.load_all()
                self._set_plans(await self._store.load_plans())
                self._by_number, self._by_aor, self._by_id, self._by_endpoint = {}, {}, {}, {}
                for snapshot in snapshots:
                    self._index(snapshot)
                del snapshots
            finally:
                if gc_was_enabled:
                    gc.enable()
            gc.collect()
            gc.freeze()
            self._seq = seq
            SEQUENCE.set(seq)
            SUBSCRIBERS.set(len(self._by_id))
            self._ready.set()
            log.info("policy cache loaded", extra={"subscribers": len(self._by_id), "seq": seq,
                                                   "load_s": round(time.perf_counter() - started, 3)})

    async def sync(self) -> int:
        """Apply every change after the last applied sequence; returns how many subscribers changed."""
        async with self._lock:
            started = time.perf_counter()
            changed, seq = await self._store.changes_since(self._seq)
            if seq > self._seq:
                self._set_plans(await self._store.load_plans())  # a few rows; a plan change names no subscriber
            if not changed:
                self._seq = max(self._seq, seq)
                return 0
            fresh = await self._store.load_subscribers(changed)
            found = {s.subscriber_id for s in fresh}
            for subscriber_id in changed - found:
                self._remove(subscriber_id)
            for snapshot in fresh:
                self._remove(snapshot.subscriber_id)
                self._index(snapshot)
            self._seq = seq
            SEQUENCE.set(seq)
            SUBSCRIBERS.set(len(self._by_id))
            APPLIED.inc(len(changed))
            SYNC_SECONDS.observe(time.perf_counter() - started)
        if self.on_applied is not None:
            self.on_applied(changed)
        return len(changed)

    def _set_plans(self, plans: dict[str, NumberingPlan]) -> None:
        self._plans = plans
        self._distinct_plans = tuple(dict.fromkeys((DEFAULT_PLAN, *plans.values())))

    def _index(self, snapshot: RoutingSnapshot) -> None:
        for device in snapshot.speakers:
            online = self._device_online.get(device.endpoint)
            if online is not None and online != device.online:
                snapshot = snapshot.with_device_status(device.endpoint, online)
            self._by_endpoint.setdefault(device.endpoint, []).append(snapshot.subscriber_id)
        self._by_id[snapshot.subscriber_id] = snapshot
        self._by_number[number_key(snapshot.msisdn)] = snapshot
        if snapshot.aor:
            self._by_aor[snapshot.aor] = snapshot

    def _remove(self, subscriber_id: str) -> None:
        old = self._by_id.pop(subscriber_id, None)
        if old is None:
            return
        key = number_key(old.msisdn)
        if self._by_number.get(key) is old:
            del self._by_number[key]
        if old.aor and self._by_aor.get(old.aor) is old:
            del self._by_aor[old.aor]
        for device in old.speakers:
            ids = self._by_endpoint.get(device.endpoint)
            if ids is not None and subscriber_id in ids:
                ids.remove(subscriber_id)
                if not ids:
                    del self._by_endpoint[device.endpoint]

    def set_device_online(self, endpoint: str, online: bool) -> int:
        """A registration came or went: every subscriber with that device sees it at once."""
        if self._device_online.get(endpoint) == online:
            return 0
        self._device_online[endpoint] = online
        DEVICE_STATUS.labels("online" if online else "offline").inc()
        count = 0
        for subscriber_id in self._by_endpoint.get(endpoint, ()):
            old = self._by_id[subscriber_id]
            new = old.with_device_status(endpoint, online)
            if new is not old:
                self._by_id[subscriber_id] = new
                self._by_number[number_key(new.msisdn)] = new
                if new.aor:
                    self._by_aor[new.aor] = new
                count += 1
        return count
