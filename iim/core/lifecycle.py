"""One shape for every long-lived component: ``async with`` starts it, ``aclose()`` stops it.

Why: the service composes its parts with an ``AsyncExitStack``, so a start that fails half-way must
leave nothing running, and every part must stop with the same verb (``aclose``, as in anyio, aiohttp
and httpx). ``aclose`` must therefore be safe on a part that is partly started, never started, or
already closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Self

from prometheus_client import Counter

from iim.core.metrics import REGISTRY
from iim.core.retry import backoff_delay

__all__ = ["AsyncResource", "TaskSupervisor"]

log = logging.getLogger("iim.lifecycle")

TASK_RESTARTS = Counter("iim_task_restarts", "Supervised background tasks started again after they died or ended, "
                        "by task", ["task"], registry=REGISTRY)


class AsyncResource:
    """Mixin: ``__aenter__`` runs ``start()`` (and ``aclose()`` if that fails); ``__aexit__`` runs ``aclose()``."""

    __slots__ = ()

    async def start(self) -> None:
        """Bring the component up (nothing to do by default)."""

    async def aclose(self) -> None:
        """Stop the component and release what it holds; idempotent."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.aclose()  # whatever the failed start left behind (tasks, sockets, connections)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


class TaskSupervisor(AsyncResource):
    """Owns background tasks that run until their owner stops (loop-lag watch, ...).

    Unlike a bare ``create_task``, nothing is left running or unreferenced: ``aclose`` cancels and awaits
    every task, and a task that dies early is logged at once. Not an ``asyncio.TaskGroup``, on purpose: a
    TaskGroup entered on an exit stack wraps a failing start's error in an ``ExceptionGroup`` and cancels
    whichever task entered it.
    """

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def supervise(self, factory: Callable[[], Coroutine[Any, Any, None]], *, name: str, initial: float = 0.5,
                  ceiling: float = 5.0, healthy_after: float = 60.0,
                  until: Callable[[], bool] | None = None) -> asyncio.Task[None]:
        """Keep ``factory()`` running until the owner stops: when it raises or returns, a fresh one starts after
        a jittered backoff (``initial`` doubling up to ``ceiling``; back to ``initial`` once a run lasted
        ``healthy_after`` s); ``until()`` true when it ends: the owner is stopping, no restart. Why: a loop that dies on an error nobody foresaw (PostgreSQL restarted under a
        connection it held) must not silently stop jobs, deadlines or change feeds for the process's life."""
        return self.spawn(_restarting(factory, name, initial, ceiling, healthy_after, until), name=name)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s died", task.get_name(), exc_info=task.exception())

    #: How long ``aclose`` waits for its cancelled tasks; one that swallowed its cancellation (Python 3.11's
    #: ``wait_for`` can lose one that races its inner future) is cancelled again, then left, logged: a stop
    #: must never hang on it.
    CLOSE_DEADLINE_S = 5.0

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.CLOSE_DEADLINE_S)
        for task in pending:
            task.cancel()
        if pending:
            _, pending = await asyncio.wait(pending, timeout=1.0)
        for task in pending:
            log.error("background task %s did not stop when cancelled; left behind", task.get_name())


async def _restarting(factory: Callable[[], Coroutine[Any, Any, None]], name: str, initial: float, ceiling: float,
                      healthy_after: float, until: Callable[[], bool] | None) -> None:
    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        started = loop.time()
        try:
            await factory()
        except asyncio.CancelledError:
            raise
        except Exception:
            if until is not None and until():
                return
            log.exception("background task %s died; starting it again", name)
        else:
            if until is not None and until():
                return
            log.warning("background task %s ended; starting it again", name)
        attempt = 1 if loop.time() - started >= healthy_after else attempt + 1
        TASK_RESTARTS.labels(name).inc()
        await asyncio.sleep(backoff_delay(attempt, initial, ceiling))
