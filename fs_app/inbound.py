"""Inbound Event Socket client: IIM connects to FreeSWITCH (port 8021) to originate and listen.

The connection is kept up by one task: connect, wait for ``auth/request``, ``auth``,
subscribe (``event <format> ...`` and filters), then serve commands until the socket
drops; reconnect with full-jitter exponential backoff and subscribe again. Commands
issued while the node is down wait for it (bounded by their timeout). ``bgapi``
resolves on the BACKGROUND_JOB carrying our ``Job-UUID``. :class:`InboundPool`
spreads work over several FreeSWITCH nodes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from fs_app import metrics
from fs_app.call import CommandFailed, retrieve_exception
from fs_app.esl import (
    Api,
    ApiResponse,
    Auth,
    AuthRequest,
    BgApi,
    ChannelData,
    Command,
    CommandReply,
    DisconnectNotice,
    EslCodec,
    EslConnectionError,
    EslError,
    EslTimeout,
    Event,
    EventSubscribe,
    Filter,
    MalformedEvent,
    RemoteProtocolError,
    RudeRejection,
    new_uuid,
    serialise,
)
from iim.core.lifecycle import AsyncResource
from iim.core.retry import backoff_delay

log = logging.getLogger("iim.esl.inbound")

EventListener = Callable[[Event], None]


@dataclass(frozen=True, slots=True)
class InboundSettings:
    host: str = "127.0.0.1"
    port: int = 8021
    password: str = field(default="ClueCon", repr=False)
    name: str = ""
    events: tuple[str, ...] = ("BACKGROUND_JOB",)
    event_format: str = "plain"
    filters: tuple[tuple[str, str], ...] = ()
    connect_timeout: float = 5.0
    command_timeout: float = 5.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0

    @property
    def node(self) -> str:
        return self.name or f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class BackgroundJobResult:
    """The BACKGROUND_JOB of one ``bgapi``: the command's output (``+OK <uuid>``, ``-ERR <CAUSE>``...)."""

    job_uuid: str
    body: str
    event: Event = field(repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not self.body.startswith("-ERR")

    @property
    def value(self) -> str:
        """The text after ``+OK ``/``-ERR `` (a channel uuid or a hangup cause), else the body."""
        if self.body.startswith(("+OK", "-ERR")):
            return self.body.partition(" ")[2].strip()
        return self.body.strip()


class _InboundProtocol(asyncio.Protocol):
    def __init__(self, client: InboundClient) -> None:
        loop = asyncio.get_running_loop()
        self._client = client
        self._codec = EslCodec()
        self.transport: asyncio.Transport | None = None
        self.greeting: asyncio.Future[None] = loop.create_future()
        self.replies: deque[asyncio.Future[CommandReply | ApiResponse]] = deque()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.closed.add_done_callback(retrieve_exception)
        self.greeting.add_done_callback(retrieve_exception)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, cmd: Command) -> asyncio.Future[CommandReply | ApiResponse]:
        if self.transport is None or self.transport.is_closing():
            raise EslConnectionError("inbound connection is closing")
        fut: asyncio.Future[CommandReply | ApiResponse] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(retrieve_exception)
        self.replies.append(fut)
        self.transport.write(serialise(cmd))
        return fut

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._codec.feed(data)
        except RemoteProtocolError as exc:
            metrics.ERRORS.labels("protocol").inc()
            log.error("framing error from %s: %s", self._client.settings.node, exc)
            self.abort(exc)
            return
        for msg in messages:
            if isinstance(msg, Event):
                self._client._on_event(msg)
            elif isinstance(msg, CommandReply | ApiResponse):
                if self.replies:
                    fut = self.replies.popleft()
                    if not fut.done():
                        fut.set_result(msg)
                else:
                    metrics.ERRORS.labels("unexpected_reply").inc()
            elif isinstance(msg, AuthRequest):
                if not self.greeting.done():
                    self.greeting.set_result(None)
            elif isinstance(msg, RudeRejection):
                metrics.ERRORS.labels("rejected").inc()
                self.abort(EslConnectionError(f"{self._client.settings.node} refused us: {msg.body.strip()}"))
            elif isinstance(msg, MalformedEvent):
                metrics.ERRORS.labels("malformed_event").inc()
            elif not isinstance(msg, DisconnectNotice | ChannelData):
                metrics.ERRORS.labels("unexpected_message").inc()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(EslConnectionError(f"connection to {self._client.settings.node} lost" + (f": {exc}" if exc else "")))

    def abort(self, exc: BaseException) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        waiting: list[asyncio.Future[Any]] = [self.greeting, *self.replies]
        for fut in waiting:
            if not fut.done():
                fut.set_exception(exc)
        self.replies.clear()
        if not self.closed.done():
            self.closed.set_result(None)


class InboundClient(AsyncResource):
    """One FreeSWITCH node's inbound socket, kept connected and subscribed."""

    def __init__(self, settings: InboundSettings) -> None:
        self.settings = settings
        self._proto: _InboundProtocol | None = None
        self._connected = asyncio.Event()
        self._jobs: dict[str, asyncio.Future[Event]] = {}
        self._listeners: list[EventListener] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.connects = 0
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener`` for every event (synchronously; it must not block)."""
        self._listeners.append(listener)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._maintain(), name=f"esl-inbound-{self.settings.node}")

    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise EslTimeout(f"FreeSWITCH {self.settings.node} not connected") from None

    async def aclose(self) -> None:
        self._closing = True
        if self._proto is not None:
            self._proto.abort(EslConnectionError("client closed"))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # -- commands ------------------------------------------------------------------
    async def _send(self, cmd: Command, timeout: float | None) -> CommandReply | ApiResponse:
        timeout = self.settings.command_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
                assert self._proto is not None
                return await self._proto.send(cmd)
        except TimeoutError:
            metrics.ERRORS.labels("command_timeout").inc()
            raise EslTimeout(f"{type(cmd).__name__} to {self.settings.node} timed out after {timeout} s") from None

    async def command(self, cmd: Command, timeout: float | None = None) -> CommandReply:
        reply = await self._send(cmd, timeout)
        if not isinstance(reply, CommandReply):
            raise CommandFailed(type(cmd).__name__, "unexpected api/response")
        if not reply.ok:
            raise CommandFailed(type(cmd).__name__, reply.reply_text)
        return reply

    async def api(self, command: str, timeout: float | None = None) -> ApiResponse:
        """Blocking api; FreeSWITCH holds this connection until it returns."""
        reply = await self._send(Api(command), timeout)
        if isinstance(reply, CommandReply):  # "-ERR command not found" arrives as command/reply
            return ApiResponse(reply.reply_text + "\n")
        metrics.count_command("api", "ok" if reply.ok else "err")
        return reply

    async def bgapi(self, command: str, *, job_uuid: str | None = None, timeout: float = 120.0) -> BackgroundJobResult:
        """Run ``command`` in the background and wait for its BACKGROUND_JOB.

        If the connection drops before the job reports, the outcome is unknown and
        :class:`EslConnectionError` is raised; callers that originate set
        ``origination_uuid`` so they can find the call afterwards.
        """
        job_uuid = job_uuid or new_uuid()
        done: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._jobs[job_uuid] = done
        try:
            await self.command(BgApi(command, job_uuid))
            event = await asyncio.wait_for(done, timeout)
        except TimeoutError:
            metrics.count_command("bgapi", "timeout")
            raise EslTimeout(f"bgapi {command.split(' ', 1)[0]} job {job_uuid} did not report in {timeout} s") from None
        finally:
            self._jobs.pop(job_uuid, None)
        result = BackgroundJobResult(job_uuid, event.body or "", event)
        metrics.count_command("bgapi", "ok" if result.ok else "err")
        return result

    # -- connection keeping --------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        metrics.count_event(event.name)
        if event.name == "BACKGROUND_JOB":
            job = event.job_uuid
            waiter = self._jobs.get(job) if job else None
            if waiter is not None and not waiter.done():
                waiter.set_result(event)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener bug must not cut the node's connection
                metrics.ERRORS.labels("listener").inc()
                log.exception("event listener failed on %s", event.name)

    async def _connect_once(self) -> _InboundProtocol:
        s = self.settings
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(s.connect_timeout):
            _, proto = await loop.create_connection(lambda: _InboundProtocol(self), s.host, s.port)
            await proto.greeting
            auth = await proto.send(Auth(s.password))
            if not (isinstance(auth, CommandReply) and auth.ok):
                text = auth.reply_text if isinstance(auth, CommandReply) else "unexpected reply"
                proto.abort(EslConnectionError("auth refused"))
                raise EslConnectionError(f"FreeSWITCH {s.node} refused auth: {text}")
            pending = [proto.send(EventSubscribe(s.event_format, s.events))] if s.events else []
            pending += [proto.send(Filter(h, v)) for h, v in s.filters]
            for fut in pending:
                reply = await fut
                if isinstance(reply, CommandReply) and not reply.ok:
                    raise EslConnectionError(f"subscription refused by {s.node}: {reply.reply_text}")
        return proto

    async def _maintain(self) -> None:
        attempt = 0
        node = self.settings.node
        while not self._is_closing():
            proto: _InboundProtocol | None = None
            try:
                proto = await self._connect_once()
            except (OSError, EslError, TimeoutError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                log.warning("FreeSWITCH %s unreachable: %s", node, self.last_error)
                if proto is not None:
                    proto.abort(exc)
            else:
                self._proto = proto
                self.connects += 1
                attempt = 0
                self._connected.set()
                metrics.INBOUND_CONNECTED.labels(node).set(1)
                log.info("connected to FreeSWITCH %s", node)
                await proto.closed
                self._connected.clear()
                metrics.INBOUND_CONNECTED.labels(node).set(0)
                self._fail_jobs(EslConnectionError(f"connection to {node} lost; job outcome unknown"))
                log.warning("lost FreeSWITCH %s", node)
            if self._is_closing():
                break
            attempt += 1
            metrics.INBOUND_RECONNECTS.labels(node).inc()
            await asyncio.sleep(backoff_delay(attempt, self.settings.backoff_initial, self.settings.backoff_max))

    def _is_closing(self) -> bool:
        return self._closing

    def _fail_jobs(self, exc: Exception) -> None:
        for fut in self._jobs.values():
            if not fut.done():
                fut.set_exception(exc)


class InboundPool(AsyncResource):
    """Several FreeSWITCH nodes; work goes to the next connected one (round robin)."""

    def __init__(self, clients: Sequence[InboundClient]) -> None:
        if not clients:
            raise ValueError("InboundPool needs at least one node")
        self.clients = list(clients)
        self._next = 0

    async def start(self) -> None:
        for client in self.clients:
            await client.start()

    async def aclose(self) -> None:
        for client in reversed(self.clients):
            await client.aclose()

    async def pick(self, timeout: float = 5.0) -> InboundClient:
        """The next connected node, waiting up to ``timeout`` for any to come up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            n = len(self.clients)
            for i in range(n):
                client = self.clients[(self._next + i) % n]
                if client.connected:
                    self._next = (self._next + i + 1) % n
                    return client
            if loop.time() >= deadline:
                raise EslConnectionError("no FreeSWITCH node is connected")
            await asyncio.sleep(0.05)

    async def bgapi(self, command: str, *, job_uuid: str | None = None, timeout: float = 120.0) -> BackgroundJobResult:
        client = await self.pick()
        return await client.bgapi(command, job_uuid=job_uuid, timeout=timeout)

    async def api(self, command: str, timeout: float | None = None) -> ApiResponse:
        client = await self.pick()
        return await client.api(command, timeout)
