"""The live presence sources' way into PostgreSQL: registrations (off the ESL event path) and connector reports.

Why a feed and not a write per event: registration events arrive on the inbound ESL client's read loop, which must
never wait for the database. :meth:`PresenceFeed.registration` only records the AoR's latest word (a newer word
replaces one not yet written, so a flapping phone costs one write) and a supervised writer applies them, each under
a deadline; with PostgreSQL away the words wait and are retried with backoff. A connector's report is answered to
the vendor, so it is written at once, under the same deadline, and the outcome says what to answer.

What a registration says (:func:`policy_cache.presence.registration_word`): only a person's identity speaks (an
owner's or member's AoR, a wearable, a device whose ``presence_hint`` says so), and only where the household listed
its home networks: from inside one, ``home``; from outside, ``away``; otherwise nothing, and a claim it still holds
about that AoR is withdrawn (a speaker's word from before, a hint or the networks changed since).

Identity: a source serves every tenant (one switch, one vendor cloud), so the household is found on the cache role
(``presence_store.households_by_*``) and the word is written only when exactly one tenant owns that identity; the
write itself runs in that tenant's transaction on the app role (row-level security applies).

Pruning: a claim past its expiry says nothing, but its row would stay for ever. A supervised task deletes, every
``prune_interval_s``, at most ``prune_batch`` claims expired more than ``prune_keep_s`` ago (again at once while a
batch comes back full), under a deadline (``iim.presence_prune``, the sweeper's definer). The audit lines of the
claims stay; the routing answer does not change (only live claims count).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast
from uuid import UUID

from prometheus_client import Counter

from iim.core import metrics
from iim.core.errors import STORE_UNAVAILABLE
from iim.core.lifecycle import AsyncResource, TaskSupervisor
from iim.core.retry import backoff_delay
from policy_cache import presence_store
from policy_cache.db import Connection, Pool, tenant_tx
from policy_cache.presence import ClaimState, registration_word

__all__ = ["PresenceFeed", "PresenceStoreDown", "ReportOutcome"]

log = logging.getLogger("iim.presence")

PRESENCE_WORDS = Counter("iim_presence_words_total", "Live presence words by source and outcome",
                         ["source", "outcome"], registry=metrics.REGISTRY)
PRESENCE_PRUNED = Counter("iim_presence_claims_pruned_total", "Expired presence claims deleted by the prune",
                          registry=metrics.REGISTRY)

#: A registration without an Expires header (or a silly one) counts this long.
DEFAULT_REGISTRATION_TTL_S = 3600.0
#: A registration is believed a little longer than its Expires: the refresh arrives just before it runs out.
REGISTRATION_GRACE_S = 30.0


#: How each registrar's word reached IIM (the audit's correlation).
_CHANNELS = {"freeswitch": "esl", "kamailio": "location"}

_Lookup = Callable[..., Awaitable[list[tuple[UUID, UUID]]]]


class PresenceStoreDown(Exception):
    """PostgreSQL cannot take the word now (away, or past the deadline): answer 503, the sender retries."""


class ReportOutcome(enum.Enum):
    APPLIED = "applied"
    UNKNOWN_TARGET = "unknown_target"  # no device (or several tenants' devices) under that identity


@dataclass(frozen=True, slots=True)
class _Registration:
    online: bool
    expires_s: float
    via: str  # who saw it: "freeswitch" (ESL events) or "kamailio" (the edge's location table)
    sources: tuple[str, ...]  # the addresses it registered from (where it is)


class PresenceFeed(AsyncResource):
    """Writes live presence claims. ``app_pool``: the ``iim_app`` pool (tenant-scoped writes); ``directory_pool``:
    an ``iim_cache`` pool (who owns an identity, across tenants)."""

    def __init__(self, app_pool: Pool, directory_pool: Pool, *, deadline_s: float = 2.0,
                 max_pending: int = 10_000, retry_ceiling_s: float = 10.0, prune_interval_s: float | None = 3600.0,
                 prune_keep_s: int = 86_400, prune_batch: int = 1000, prune_deadline_s: float = 30.0) -> None:
        if prune_interval_s is not None and prune_interval_s <= 0:
            raise ValueError("prune_interval_s must be positive (None: no pruning)")
        if prune_keep_s < 0 or not 1 <= prune_batch <= 10_000:
            raise ValueError("prune_keep_s must be >= 0 and prune_batch in 1..10000")
        self._prune_interval_s = prune_interval_s
        self._prune_keep_s = prune_keep_s
        self._prune_batch = prune_batch
        self._prune_deadline_s = prune_deadline_s
        self._app = app_pool
        self._directory = directory_pool
        self._deadline_s = deadline_s
        self._max_pending = max_pending
        self._retry_ceiling_s = retry_ceiling_s
        self._pending: OrderedDict[str, _Registration] = OrderedDict()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: TaskSupervisor | None = None

    async def start(self) -> None:
        self._tasks = TaskSupervisor()
        self._tasks.supervise(self._write_registrations, name="presence-registrations")
        if self._prune_interval_s is not None:
            self._tasks.supervise(self._prune_forever, name="presence-prune", initial=1.0, ceiling=60.0)

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, None
        if tasks is not None:
            await tasks.aclose()

    # -- registrations (the ESL listener's side: never waits) --------------------------------------------------

    def registration(self, aor: str, online: bool, expires_s: float | None = None,
                     sources: tuple[str, ...] | list[str] = (), *, via: str = "freeswitch") -> None:
        """A device registered (``online``, from ``sources``: its source addresses) or went away; returns at once,
        the writer applies it. ``via`` names the registrar that saw it (the audit actor ``{via}:registration``)."""
        ttl = expires_s if expires_s is not None and 0 < expires_s <= presence_store.MAX_TTL_S - REGISTRATION_GRACE_S \
            else DEFAULT_REGISTRATION_TTL_S
        self._pending.pop(aor, None)
        self._pending[aor] = _Registration(online, ttl, via, tuple(sources))
        while len(self._pending) > self._max_pending:
            dropped, _ = self._pending.popitem(last=False)
            PRESENCE_WORDS.labels("registration", "dropped").inc()
            log.warning("presence: too many registrations waiting for the database; dropped the oldest",
                        extra={"aor": dropped})
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self) -> None:
        """Until every registration recorded so far is written (or dropped); for tests and orderly stops."""
        await self._idle.wait()

    async def _write_registrations(self) -> None:
        attempt = 0
        while True:
            if not self._pending:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            aor, word = next(iter(self._pending.items()))
            try:
                await self._apply_registration(aor, word)
            except PresenceStoreDown as exc:
                attempt += 1
                PRESENCE_WORDS.labels("registration", "retry").inc()
                log.warning("presence: registration of %s not written (%s); retrying", aor, exc)
                await asyncio.sleep(backoff_delay(attempt, 0.2, self._retry_ceiling_s))
                continue
            attempt = 0
            if self._pending.get(aor) is word:  # a newer word that came meanwhile stays queued
                del self._pending[aor]

    async def _apply_registration(self, aor: str, word: _Registration) -> None:
        async with self._deadline():
            async with self._directory.acquire() as conn:
                targets = await presence_store.registration_targets(cast(Connection, conn), aor)
            tenants = {t.tenant_id for t in targets}
            if len(tenants) != 1:
                if len(tenants) > 1:
                    log.warning("presence: an identity owned by %d tenants is ignored", len(tenants),
                                extra={"identity": aor})
                PRESENCE_WORDS.labels("registration", "unknown").inc()
                return
            puts: list[tuple[UUID, ClaimState, str]] = []
            releases: list[UUID] = []
            for target in targets:
                said = registration_word(target.personal, word.sources, target.home_networks) if word.online \
                    else None
                if said is not None:
                    puts.append((target.household_id, *said))
                elif target.held or not word.online:
                    releases.append(target.household_id)
            if not puts and not releases:  # a fixed device, or no home networks: nothing to say, nothing held
                PRESENCE_WORDS.labels("registration", "silent").inc()
                return
            actor = f"{word.via}:registration"
            correlation = {"channel": _CHANNELS.get(word.via, word.via)}
            async with tenant_tx(self._app, tenants.pop()) as conn:
                for household, state, basis in puts:
                    await presence_store.put_claim(
                        conn, household, source="registration", subject=aor, state=state,
                        ttl_s=word.expires_s + REGISTRATION_GRACE_S, actor=actor, correlation=correlation,
                        coalesce=True, basis=basis)
                for household in releases:
                    await presence_store.release_claim(conn, household, source="registration", subject=aor,
                                                       actor=actor, correlation=correlation)
        PRESENCE_WORDS.labels("registration", "applied").inc()

    # -- connectors (answered to the vendor) -----------------------------------------------------------------

    async def connector_report(self, connector: str, target: str, state: ClaimState, ttl_s: float,
                               subject: str | None = None) -> ReportOutcome:
        """The vendor's home/away for the household of its device ``target``.

        Raises:
            PresenceStoreDown: PostgreSQL did not take it within the deadline.
        """
        async with self._deadline():
            households = await self._owners(presence_store.households_by_connector, connector, target)
            if households is None:
                PRESENCE_WORDS.labels("connector", "unknown").inc()
                return ReportOutcome.UNKNOWN_TARGET
            tenant, ids = households
            async with tenant_tx(self._app, tenant) as conn:
                for household in ids:
                    await presence_store.put_claim(
                        conn, household, source="connector", subject=f"{connector}:{subject or target}",
                        state=state, ttl_s=ttl_s, actor=f"connector:{connector}",
                        correlation={"channel": "connector", "target": target})
        PRESENCE_WORDS.labels("connector", "applied").inc()
        return ReportOutcome.APPLIED

    # -- pruning -------------------------------------------------------------------------------------------------

    async def prune_once(self) -> int:
        """One bounded batch: claims expired more than ``prune_keep_s`` ago, every tenant; how many went."""
        async with asyncio.timeout(self._prune_deadline_s):
            pruned = await presence_store.prune_expired(self._app, keep_s=self._prune_keep_s, limit=self._prune_batch)
        if pruned:
            PRESENCE_PRUNED.inc(pruned)
            log.info("presence: %d expired claim(s) pruned", pruned)
        return pruned

    async def _prune_forever(self) -> None:
        assert self._prune_interval_s is not None
        while True:
            delay = self._prune_interval_s
            try:
                if await self.prune_once() >= self._prune_batch:
                    delay = 0.05  # more is due: the next batch soon, without holding the database
            except STORE_UNAVAILABLE as exc:
                log.warning("presence: prune not done (%s); retrying at the next interval", type(exc).__name__)
            await asyncio.sleep(delay)

    # -- shared --------------------------------------------------------------------------------------------

    async def _owners(self, lookup: _Lookup, *args: str) -> tuple[UUID, list[UUID]] | None:
        """The one tenant and its households for an identity; None when nobody, or several tenants, own it."""
        async with self._directory.acquire() as conn:
            found = await lookup(conn, *args)
        tenants = {tenant for tenant, _ in found}
        if len(tenants) != 1:
            if len(tenants) > 1:
                log.warning("presence: an identity owned by %d tenants is ignored", len(tenants),
                            extra={"identity": args[-1]})
            return None
        return tenants.pop(), sorted({household for _, household in found})

    @asynccontextmanager
    async def _deadline(self) -> AsyncIterator[None]:
        """One deadline for lookup and write; a stall or a lost store comes out as :class:`PresenceStoreDown`."""
        try:
            async with asyncio.timeout(self._deadline_s):
                yield
        except STORE_UNAVAILABLE as exc:
            raise PresenceStoreDown(type(exc).__name__) from exc
