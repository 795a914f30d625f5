"""Presence from the Kamailio edge's registrations: ``kamailio.location`` (usrloc ``db_mode 1``, migration 0038).

The edge writes every registration through to PostgreSQL; a trigger NOTIFYs ``iim_registrar`` with the AoR of
each row written or deleted. The notification only says *which* AoR changed; the table says what is true. So a
notification marks its AoR and the worker re-reads the marked AoRs' contacts: one still live (its ``expires`` in
the future) is ``registration(aor, True, remaining)``, none left is ``registration(aor, False)``. Notifications sent
while nobody listened are gone, so every (re)connect of the LISTEN connection, and every ``reconcile_interval_s``,
reads the whole table instead, and withdraws the claims this registrar still holds for AoRs it no longer finds.

Kamailio writes ``expires`` as its own local time into a ``timestamp without time zone`` (srdb1 formats with
``localtime``): ``edge_time_zone`` is the edge's zone (``UTC`` by default). A contact whose ``expires`` is the epoch
is permanent (usrloc's ``expires 0``): online with the feed's default lifetime, renewed by the periodic reconcile.

Each word carries where the AoR registered from (the view ``kamailio.location_source``, migration 0043: the address
usrloc received it from behind a NAT, else its Contact's host): the feed turns a person's registration into home or
away by the household's home networks. Reads run on the cache role (all tenants: that view only: username, domain,
expires, source address); the words go to the
:class:`~policy_cache.presence_feed.PresenceFeed`, which finds the household and writes in its tenant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import asyncpg
from prometheus_client import Counter

from iim.core import metrics
from iim.core.errors import STORE_UNAVAILABLE
from iim.core.lifecycle import AsyncResource, TaskSupervisor
from iim.core.retry import backoff_delay
from policy_cache import presence_store
from policy_cache.db import Connection, DbRole, Pool
from policy_cache.notifications import ChannelListener

__all__ = ["ACTOR", "CHANNEL", "VIA", "RegistrarPresence", "RegistrationSink"]

log = logging.getLogger("iim.presence.registrar")

#: The trigger's channel (migration 0038).
CHANNEL = "iim_registrar"
#: ``PresenceFeed.registration(..., via=VIA)`` writes its claims as this actor.
VIA = "kamailio"
ACTOR = f"{VIA}:registration"

#: ``(aor, online, expires_s, sources)``: :meth:`PresenceFeed.registration` with ``via="kamailio"``.
RegistrationSink = Callable[[str, bool, float | None, tuple[str, ...]], None]

RECONCILES = Counter("iim_registrar_presence_reconciles_total",
                     "Reconciles of presence with the edge's location table by kind and outcome",
                     ["kind", "outcome"], registry=metrics.REGISTRY)

#: A live contact whose expiry moved less than this since it was said needs no new word.
_SAME_S = 5.0

_RETRY: tuple[type[BaseException], ...] = (*STORE_UNAVAILABLE, asyncpg.PostgresError)

# usrloc's permanent contact: expires 0, written as the epoch in the edge's local time.
_LIVE_ALL = """
SELECT username, coalesce(domain, '') AS domain, bool_or(expires < '1970-01-02') AS permanent,
       date_part('epoch', max(expires AT TIME ZONE $1) - now()) AS remaining_s,
       array_remove(array_agg(DISTINCT source_ip), NULL) AS sources
FROM kamailio.location_source
WHERE expires < '1970-01-02' OR expires AT TIME ZONE $1 > now()
GROUP BY username, coalesce(domain, '')
"""
_LIVE_SOME = """
SELECT l.username, coalesce(l.domain, '') AS domain, bool_or(l.expires < '1970-01-02') AS permanent,
       date_part('epoch', max(l.expires AT TIME ZONE $1) - now()) AS remaining_s,
       array_remove(array_agg(DISTINCT l.source_ip), NULL) AS sources
FROM kamailio.location_source l
JOIN unnest($2::text[], $3::text[]) AS a(username, domain)
  ON l.username = a.username AND l.domain IS NOT DISTINCT FROM nullif(a.domain, '')
WHERE l.expires < '1970-01-02' OR l.expires AT TIME ZONE $1 > now()
GROUP BY l.username, coalesce(l.domain, '')
"""


@dataclass(frozen=True, slots=True)
class _Live:
    aor: str
    remaining_s: float | None  # None: permanent
    sources: tuple[str, ...]  # the live contacts' source addresses, sorted


@dataclass(frozen=True, slots=True)
class _Said:
    until: float | None  # wall clock; None: permanent
    sources: tuple[str, ...]


def _split(aor: str) -> tuple[str, str]:
    user, _, domain = aor.rpartition("@")
    return user, domain


class RegistrarPresence(AsyncResource):
    """LISTENs on ``iim_registrar`` (its own connection, ``dsn`` as the cache role) and reconciles ``pool``'s view of
    ``kamailio.location`` into ``sink``. Every read under ``deadline_s``; failures retried with backoff."""

    def __init__(self, dsn: str, pool: Pool, sink: RegistrationSink, *, edge_time_zone: str = "UTC",
                 deadline_s: float = 5.0, reconcile_interval_s: float = 300.0, max_marked: int = 10_000,
                 check_interval_s: float = 10.0) -> None:
        self._pool = pool
        self._sink = sink
        self._tz = edge_time_zone
        self._deadline_s = deadline_s
        self._interval_s = reconcile_interval_s
        self._max_marked = max_marked
        self._listener = ChannelListener(dsn, CHANNEL, self._mark, on_up=self._reconnected, role=DbRole.CACHE,
                                         check_interval=check_interval_s)
        self._marked: set[str] = set()
        self._full = False
        # AoRs said online by this process (claims perhaps not written yet) -> until when, from where
        self._online: dict[str, _Said] = {}
        self._wake = asyncio.Event()
        self._tasks: TaskSupervisor | None = None
        #: Set after each reconcile of the whole table (tests wait for the first one).
        self.reconciled = asyncio.Event()

    @property
    def listening(self) -> asyncio.Event:
        return self._listener.connected

    async def start(self) -> None:
        self._tasks = TaskSupervisor()
        self._tasks.supervise(self._reconcile_loop, name="registrar-presence")
        await self._listener.start()

    async def aclose(self) -> None:
        await self._listener.aclose()
        tasks, self._tasks = self._tasks, None
        if tasks is not None:
            await tasks.aclose()

    # -- the listener's side (never waits) ---------------------------------------------------------------

    def _mark(self, aor: str) -> None:
        if len(self._marked) >= self._max_marked:
            self._full = True  # too many to go one by one: the whole table is read anyway
            self._marked.clear()
        else:
            self._marked.add(aor)
        self._wake.set()

    def _reconnected(self) -> None:
        self._full = True
        self._wake.set()

    # -- the worker -------------------------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(self._interval_s):
                    await self._wake.wait()
            except TimeoutError:
                self._full = True  # periodic: permanent contacts renewed, anything missed caught up
            self._wake.clear()
            full, self._full = self._full, False
            marked, self._marked = self._marked, set()
            try:
                if full:
                    await self._reconcile_all()
                elif marked:
                    await self._reconcile_some(marked)
            except _RETRY as exc:
                self._full = self._full or full
                self._marked |= marked
                current = asyncio.current_task()
                if current is not None and current.cancelling():  # a stop that a deadline turned into a timeout
                    raise asyncio.CancelledError from exc
                attempt += 1
                RECONCILES.labels("all" if full else "some", "retry").inc()
                log.warning("presence: the edge's registrations not read (%s); retrying", type(exc).__name__)
                await asyncio.sleep(backoff_delay(attempt, 0.2, 10.0))
                self._wake.set()
                continue
            except BaseException:
                self._full = self._full or full
                self._marked |= marked
                raise
            attempt = 0

    async def _reconcile_all(self) -> None:
        async with asyncio.timeout(self._deadline_s), self._pool.acquire() as conn:
            rows = await conn.fetch(_LIVE_ALL, self._tz)
            held = await presence_store.live_subjects(cast(Connection, conn), "registration", ACTOR)
        live = [self._live(r) for r in rows]
        seen = {found.aor for found in live}
        now = time.time()
        for found in live:
            # Said already, from the same addresses with the same lifetime: the feed has it (a reconcile of 100k
            # phones is not 100k writes). Permanent contacts are said again: that renews their claims.
            said = self._online.get(found.aor)
            if said is None or said.sources != found.sources or said.until is None or found.remaining_s is None \
                    or abs(said.until - (now + found.remaining_s)) > _SAME_S:
                self._say_online(found)
        for aor in sorted((held | self._online.keys()) - seen):
            self._say_offline(aor)
        RECONCILES.labels("all", "ok").inc()
        self.reconciled.set()

    async def _reconcile_some(self, aors: set[str]) -> None:
        users, domains = zip(*(_split(aor) for aor in sorted(aors)), strict=True)
        async with asyncio.timeout(self._deadline_s), self._pool.acquire() as conn:
            rows = await conn.fetch(_LIVE_SOME, self._tz, list(users), list(domains))
        live = {found.aor: found for found in (self._live(r) for r in rows)}
        for aor in sorted(aors):
            if aor in live:
                self._say_online(live[aor])
            else:
                self._say_offline(aor)
        RECONCILES.labels("some", "ok").inc()

    @staticmethod
    def _live(row: asyncpg.Record) -> _Live:
        remaining = None if row["permanent"] else max(1.0, float(row["remaining_s"]))
        return _Live(f"{row['username']}@{row['domain']}", remaining, tuple(sorted(row["sources"] or ())))

    def _say_online(self, found: _Live) -> None:
        until = None if found.remaining_s is None else time.time() + found.remaining_s
        self._online[found.aor] = _Said(until, found.sources)
        self._sink(found.aor, True, found.remaining_s, found.sources)

    def _say_offline(self, aor: str) -> None:
        self._online.pop(aor, None)
        self._sink(aor, False, None, ())
