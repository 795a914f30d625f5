"""Is PostgreSQL answering? A bounded probe for ``/health``.

The policy cache's listener says when the connection is *lost*, but a stalled server (SIGSTOP, a hung disk,
a saturated host) keeps its connections open and simply does not answer: routing goes on from the cache,
while every write (device events, audit, SMS) waits. So ``/health`` also asks the database itself, with a
deadline: ``SELECT 1`` every ``interval`` seconds, each within ``timeout``. The last answer decides; a probe
still waiting past its deadline counts as no answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg

from iim.core.errors import STORE_UNAVAILABLE
from iim.core.lifecycle import AsyncResource
from policy_cache.db import Pool
from policy_cache.notifications import stop_task

__all__ = ["DatabaseProbe"]

_FAILED: tuple[type[BaseException], ...] = (*STORE_UNAVAILABLE, asyncpg.PostgresError)


class DatabaseProbe(AsyncResource):
    """``health()``: ``{"status": "ok" | "degraded", "database": {...}}`` from a probe every ``interval`` s."""

    def __init__(self, pool: Pool, *, interval: float = 1.0, timeout: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._interval = interval
        self._timeout = timeout
        self._clock = clock
        self._last_ok: float | None = None
        self._error: str | None = "not probed yet"
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.probe()
        self._task = asyncio.create_task(self._run(), name="database-probe")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    async def probe(self) -> bool:
        """One bounded ``SELECT 1``; True when PostgreSQL answered in time."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._pool.fetchval("SELECT 1")
        except _FAILED as exc:
            self._error = "no answer within the deadline" if isinstance(exc, TimeoutError) else type(exc).__name__
            return False
        self._last_ok = self._clock()
        self._error = None
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.probe()

    def health(self) -> dict[str, object]:
        age = None if self._last_ok is None else self._clock() - self._last_ok
        # A probe in flight past its deadline has not failed yet, but it is already late: the database is not
        # answering.
        answering = self._error is None and age is not None and age <= self._interval + self._timeout
        report: dict[str, object] = {"answering": answering,
                                     "last_answer_s_ago": None if age is None else round(age, 3)}
        if not answering:
            report["error"] = self._error or "no answer within the deadline"
        return {"status": "ok" if answering else "degraded", "database": report}
