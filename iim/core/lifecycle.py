"""One shape for every long-lived component: ``async with`` starts it, ``aclose()`` stops it.

Why: the service composes its parts with an ``AsyncExitStack``, so a start that fails half-way must
leave nothing running, and every part must stop with the same verb (``aclose``, as in anyio, aiohttp
and httpx). ``aclose`` must therefore be safe on a part that is partly started, never started, or
already closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Self

__all__ = ["AsyncResource", "TaskSupervisor"]

log = logging.getLogger("iim.lifecycle")


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

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s died", task.get_name(), exc_info=task.exception())

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
