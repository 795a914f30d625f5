"""Outbound Event Socket server: FreeSWITCH's ``socket`` app connects here per call.

A thin asyncio driver: the protocol object hands received bytes to the connection's
:class:`Call` (whose :class:`fs_app.esl.EslSession` reads them) and aborts on a protocol error.
Each connection runs its handler in a task the server owns; a handler's failure is
logged and counted and never touches another call. The per-call sequence is
``connect`` (+ ``linger`` + ``myevents``, pipelined), the handler, then ``exit``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from fs_app import metrics
from fs_app.call import Call, CallGone
from fs_app.esl import (
    ChannelData,
    Connect,
    EslError,
    Exit,
    Linger,
    MyEvents,
    RemoteProtocolError,
    UnexpectedReply,
)
from iim.core.lifecycle import AsyncResource

log = logging.getLogger("iim.esl.outbound")

CallHandler = Callable[[Call], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class OutboundSettings:
    host: str = "127.0.0.1"
    port: int = 8084
    linger: bool = True
    connect_timeout: float = 5.0
    command_timeout: float = 5.0
    exit_wait: float = 2.0
    event_queue_size: int = 1000
    backlog: int = 2048
    # No server-side ``filter`` next to ``myevents``: mod_event_socket tests a listener's filters before its
    # myevents Unique-ID check, so every socket's filter runs on every channel event of the whole switch
    # (calls x sockets), and a ``/regex/`` value is compiled by pcre2 at each test. Measured on FreeSWITCH
    # 1.10.12 (benchmarks.realfs_calls), that cost the switch more than sending us the few events we skip.


def _handshake_expired(futures: list[asyncio.Future[object]]) -> None:
    if all(fut.done() for fut in futures):
        return
    metrics.ERRORS.labels("connect_timeout").inc()
    for fut in futures:
        if not fut.done():
            fut.set_exception(CallGone("FreeSWITCH did not answer connect in time"))


class _CallProtocol(asyncio.Protocol):
    """Bytes in -> call. No decisions are taken here."""

    __slots__ = ("_on_connected", "call", "closed", "transport")

    def __init__(self, settings: OutboundSettings, on_connected: Callable[[_CallProtocol], None]) -> None:
        self._on_connected = on_connected
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.call = Call(self._write, event_queue_size=settings.event_queue_size,
                         command_timeout=settings.command_timeout)

    def _write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise CallGone("socket is closing")
        self.transport.write(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)
        self._on_connected(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.call.receive_data(data)
        except RemoteProtocolError as exc:
            kind = "unexpected_reply" if isinstance(exc, UnexpectedReply) else "protocol"
            metrics.ERRORS.labels(kind).inc()
            log.error("protocol error from FreeSWITCH: %s", exc, extra={"call_id": self.call.uuid})
            self.abort(exc)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.call.connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)

    def abort(self, exc: BaseException | None = None) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.call.connection_lost(exc)


class OutboundServer(AsyncResource):
    """Accepts FreeSWITCH's per-call connections and runs ``handler`` for each call.

    ``fallback`` runs when the handler fails while the channel is still up, so a bug
    or an outage in call logic degrades to a safe default instead of a dropped call.
    """

    def __init__(
        self,
        handler: CallHandler,
        settings: OutboundSettings | None = None,
        *,
        fallback: CallHandler | None = None,
    ) -> None:
        self._handler = handler
        self._fallback = fallback
        self.settings = settings or OutboundSettings()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        handshake: list[Connect | Linger | MyEvents] = [Connect()]
        if self.settings.linger:
            handshake.append(Linger())
        handshake.append(MyEvents())
        self._handshake_commands = tuple(handshake)

    @property
    def port(self) -> int:
        assert self._server is not None
        assert self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def active_calls(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol_factory, self.settings.host, self.settings.port, backlog=self.settings.backlog,
            reuse_address=True,
        )
        log.info("outbound ESL server listening on %s:%s", self.settings.host, self.port)

    def _protocol_factory(self) -> _CallProtocol:
        return _CallProtocol(self.settings, self._start_call)

    def _start_call(self, proto: _CallProtocol) -> None:
        task = asyncio.get_running_loop().create_task(self._run(proto))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, proto: _CallProtocol) -> None:
        call = proto.call
        metrics.CALLS_ACTIVE.inc()
        result = "ok"
        try:
            await self._handshake(proto)
            try:
                await self._handler(call)
            except (EslError, OSError, TimeoutError, ValueError, LookupError, RuntimeError) as exc:
                result = "handler_error"
                metrics.ERRORS.labels("handler").inc()
                log.exception("call handler failed", extra={"call_id": call.uuid, "error": repr(exc)})
                await self._run_fallback(call)
            await self._teardown(proto)
        except CallGone:
            result = "peer_closed"
        except EslError as exc:
            result = "esl_error"
            log.warning("call aborted: %s", exc, extra={"call_id": call.uuid})
        except asyncio.CancelledError:
            result = "cancelled"
            raise
        finally:
            proto.abort()
            metrics.CALLS_ACTIVE.dec()
            metrics.CALLS.labels(result).inc()
            log.info(
                "call ended", extra={"call_id": call.uuid, "result": result, "hangup_cause": call.hangup_cause,
                                     "duration_ms": round((time.monotonic() - call.accepted_at) * 1000, 1)},
            )

    async def _handshake(self, proto: _CallProtocol) -> None:
        """``connect``, ``linger`` and ``myevents`` in one write; FreeSWITCH answers in order."""
        futures = proto.call.send_batch(self._handshake_commands)
        # A timer handle rather than asyncio.timeout(): this runs once per call, on the call-setup path.
        timer = asyncio.get_running_loop().call_later(self.settings.connect_timeout, _handshake_expired, futures)
        try:
            connect_reply = await futures[0]
            for fut in futures[1:]:
                await fut
        finally:
            timer.cancel()
        if not isinstance(connect_reply, ChannelData):
            raise CallGone(f"connect answered with {type(connect_reply).__name__}, not channel data")

    async def _run_fallback(self, call: Call) -> None:
        if self._fallback is None or call.hung_up or call.closed:
            return
        try:
            await self._fallback(call)
        except (EslError, OSError, TimeoutError) as exc:
            metrics.ERRORS.labels("fallback").inc()
            log.exception("fallback failed", extra={"call_id": call.uuid, "error": repr(exc)})

    async def _teardown(self, proto: _CallProtocol) -> None:
        """End the session once the handler returned.

        A channel that has hung up is closed at once (by ``_run``): once the handler returned nothing reads its
        remaining events (CHANNEL_UNPARK, CHANNEL_STATE, CHANNEL_HANGUP_COMPLETE: ~35 KB a call), and having
        FreeSWITCH serialise them, then answer an ``exit``, cost both sides CPU on every call (issue 15 item 5;
        the channel is already hanging up, so closing cannot hand it back to the dialplan). A channel still up
        gets ``exit`` (its dialplan goes on, e.g. to the safe bridge), and FreeSWITCH closes the socket.
        """
        call = proto.call
        if call.closed or call.hung_up or proto.closed.done():
            return
        call.send_nowait(Exit())
        done, _ = await asyncio.wait((proto.closed,), timeout=self.settings.exit_wait)
        if not done:
            metrics.ERRORS.labels("exit_timeout").inc()

    async def aclose(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting, let calls in progress finish (up to ``drain_timeout``), then cut the rest."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._server is not None:
            await self._server.wait_closed()
