"""A NOTIFY channel followed on a dedicated connection, for parts that cache registry rows (the bridge's keys).

A cache fed by notifications may trust its entries only while it hears them: notifications sent while
nobody listened are gone. So ``on_up`` runs once LISTEN is in place (the owner drops what it cached before,
since changes may have been missed) and ``on_down`` as soon as the connection is lost or stops answering a
liveness check (the owner stops trusting its cache until the next ``on_up``). The connection is re-made
with the kernel's jittered backoff; every connect and check has a deadline, so a stalled server is noticed
within ``check_interval + check_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from iim.core.errors import STORE_UNAVAILABLE
from iim.core.lifecycle import AsyncResource
from iim.core.retry import backoff_delay
from policy_cache.db import Connection, DbRole, connect

__all__ = ["ChannelListener", "stop_task"]

log = logging.getLogger(__name__)

_RECONNECT: tuple[type[BaseException], ...] = (*STORE_UNAVAILABLE, asyncpg.PostgresError)


class ChannelListener(AsyncResource):
    """``LISTEN channel`` on its own connection; ``on_notify(payload)`` for each notification."""

    def __init__(self, dsn: str, channel: str, on_notify: Callable[[str], None], *,
                 on_up: Callable[[], None] = lambda: None, on_down: Callable[[], None] = lambda: None,
                 role: DbRole = DbRole.APP, connect_timeout: float = 5.0, check_interval: float = 10.0,
                 check_timeout: float = 2.0) -> None:
        self._dsn = dsn
        self._channel = channel
        self._on_notify = on_notify
        self._on_up = on_up
        self._on_down = on_down
        self._role = role
        self._connect_timeout = connect_timeout
        self._check_interval = check_interval
        self._check_timeout = check_timeout
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"listen-{self._channel}")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            self._on_notify(str(payload))
        except Exception:  # a bad payload must not stop the feed; the owner's handler should not raise
            log.exception("handling a notification on %s failed", self._channel)

    async def _run(self) -> None:
        attempt = 0
        while True:
            conn: Connection | None = None
            try:
                conn = await connect(self._dsn, role=self._role, timeout=self._connect_timeout,
                                     command_timeout=self._check_timeout)
                lost = asyncio.Event()
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(self._channel, self._notified)
                attempt = 0
                self.connected.set()
                self._on_up()
                await self._watch(conn, lost)
            except _RECONNECT as exc:
                _raise_if_cancelling()
                log.warning("listening on %s failed (%s: %s); reconnecting", self._channel, type(exc).__name__, exc)
            finally:
                if self.connected.is_set():
                    self.connected.clear()
                    self._on_down()
                if conn is not None:
                    conn.terminate()
            attempt += 1
            await asyncio.sleep(backoff_delay(attempt, 0.2, 10.0))

    async def _watch(self, conn: Connection, lost: asyncio.Event) -> None:
        """Until the connection is lost or does not answer a check within its deadline."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._check_interval):
                    await lost.wait()
                raise ConnectionError("listen connection lost")
            async with asyncio.timeout(self._check_timeout):
                await conn.fetchval("SELECT 1")


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` and wait for it to end, cancelling again if it swallowed a cancellation (a deadline
    that expired at the same moment turns the cancellation into a ``TimeoutError`` a loop may catch)."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
    with contextlib.suppress(asyncio.CancelledError):
        exc = task.exception()
        if exc is not None:
            log.error("task %s ended with an error", task.get_name(), exc_info=exc)


def _raise_if_cancelling() -> None:
    """Inside ``except TimeoutError``: re-raise a cancellation of the current task that a deadline absorbed."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    return lambda _conn: event.set()
