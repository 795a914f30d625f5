"""Inbound Event Socket client: IIM connects to FreeSWITCH (port 8021) to originate and listen.

The connection is kept up by one task: connect, wait for ``auth/request``, ``auth``,
subscribe (``event <format> ...`` and filters), then serve commands until the socket
drops; reconnect with jittered exponential backoff capped low (2 s: a switch that is back must be
used at once, alert calls wait on it) and subscribe again. A command issued while the node is down
wakes the reconnect at once (at most one attempt per ``backoff_initial``) and waits for it (bounded
by its timeout). A ``bgapi`` whose job the switch accepted but whose BACKGROUND_JOB the link lost
raises :class:`JobLost`: the job runs on, and its BACKGROUND_JOB reaches every subscribed connection
(listeners added with :meth:`InboundClient.add_listener` see it after a reconnect). Which reply answers
which command, and which BACKGROUND_JOB ends which ``bgapi``, is the
:class:`~fs_app.esl.EslSession`'s business; the protocol maps its tokens to futures. :class:`InboundPool`
spreads work over several FreeSWITCH nodes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from fs_app import metrics
from fs_app.call import CommandFailed, retrieve_exception
from fs_app.esl import (
    CLOSED,
    NEED_DATA,
    Api,
    ApiResponse,
    Auth,
    AuthRequest,
    BgApi,
    ChannelData,
    Command,
    CommandReply,
    DisconnectNotice,
    EslConnectionError,
    EslError,
    EslSession,
    EslTimeout,
    Event,
    EventSubscribe,
    ExecuteComplete,
    Filter,
    JobDone,
    MalformedEvent,
    RemoteProtocolError,
    Reply,
    RudeRejection,
    Token,
    UnexpectedReply,
    new_uuid,
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
    #: low on purpose: a 30 s ceiling kept alert calls "unreachable" for 18 s after FreeSWITCH was back
    backoff_max: float = 2.0

    @property
    def node(self) -> str:
        return self.name or f"{self.host}:{self.port}"


class JobLost(EslConnectionError):
    """The switch accepted the ``bgapi`` (``+OK Job-UUID``), then the link dropped before its BACKGROUND_JOB:
    the job is running or ran on the switch; only its report was lost."""

    def __init__(self, message: str, job_uuid: str) -> None:
        super().__init__(message)
        self.job_uuid = job_uuid


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
    """Bytes in -> :class:`EslSession` -> the future mapped to each token, events to ``on_event``."""

    def __init__(self, node: str, on_event: EventListener) -> None:
        loop = asyncio.get_running_loop()
        self._node = node
        self._on_event = on_event
        self._session = EslSession("inbound")
        self.transport: asyncio.Transport | None = None
        self.greeting: asyncio.Future[None] = loop.create_future()
        self.replies: dict[Token, asyncio.Future[CommandReply | ApiResponse]] = {}
        self.jobs: dict[Token, asyncio.Future[Event]] = {}
        self.closed: asyncio.Future[None] = loop.create_future()
        self.closed.add_done_callback(retrieve_exception)
        self.greeting.add_done_callback(retrieve_exception)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)

    @property
    def usable(self) -> bool:
        """Still connected: its transport open and not failed."""
        return self.transport is not None and not self.transport.is_closing() and not self.closed.done()

    def send(self, cmd: Command) -> asyncio.Future[CommandReply | ApiResponse]:
        """Write ``cmd``; the future resolves with its reply."""
        return self._send(cmd)[1]

    def send_job(self, cmd: BgApi) -> tuple[asyncio.Future[CommandReply | ApiResponse], asyncio.Future[Event]]:
        """Write a ``bgapi``: the futures of its reply and of its BACKGROUND_JOB."""
        token, reply = self._send(cmd)
        done: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        done.add_done_callback(retrieve_exception)
        self.jobs[token] = done
        return reply, done

    def forget_job(self, fut: asyncio.Future[Event]) -> None:
        """The caller stopped waiting for this job (timeout, cancellation)."""
        for token, job in self.jobs.items():
            if job is fut:
                del self.jobs[token]
                if not self.closed.done():
                    self._session.forget(token)
                return

    def _send(self, cmd: Command) -> tuple[Token, asyncio.Future[CommandReply | ApiResponse]]:
        if self.transport is None or self.transport.is_closing():
            raise EslConnectionError("inbound connection is closing")
        data, token = self._session.send(cmd)
        fut: asyncio.Future[CommandReply | ApiResponse] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(retrieve_exception)
        self.replies[token] = fut
        self.transport.write(data)
        return token, fut

    def data_received(self, data: bytes) -> None:
        session = self._session
        session.receive_data(data)
        try:
            while (ev := session.next_event()) is not NEED_DATA:
                if isinstance(ev, Event):
                    self._on_event(ev)
                elif isinstance(ev, Reply):
                    fut = self.replies.pop(ev.token, None)
                    reply = ev.reply
                    if fut is None or fut.done():
                        continue
                    if isinstance(reply, ChannelData):  # only an outbound connect is answered so
                        fut.set_exception(CommandFailed("command", "unexpected channel data"))
                    else:
                        fut.set_result(reply)
                elif isinstance(ev, JobDone):
                    job = self.jobs.pop(ev.token, None)
                    if job is not None and not job.done():
                        job.set_result(ev.event)
                    self._on_event(ev.event)
                elif isinstance(ev, ExecuteComplete):
                    self._on_event(ev.event)
                elif isinstance(ev, AuthRequest):
                    if not self.greeting.done():
                        self.greeting.set_result(None)
                elif isinstance(ev, RudeRejection):
                    metrics.ERRORS.labels("rejected").inc()
                    self.abort(EslConnectionError(f"{self._node} refused us: {ev.body.strip()}"))
                    return
                elif isinstance(ev, MalformedEvent):
                    metrics.ERRORS.labels("malformed_event").inc()
                elif ev is CLOSED:
                    return
                elif not isinstance(ev, DisconnectNotice):
                    metrics.ERRORS.labels("unexpected_message").inc()
        except RemoteProtocolError as exc:
            metrics.ERRORS.labels("unexpected_reply" if isinstance(exc, UnexpectedReply) else "protocol").inc()
            log.error("protocol error from %s: %s", self._node, exc)
            self.abort(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(EslConnectionError(f"connection to {self._node} lost" + (f": {exc}" if exc else "")))

    def abort(self, exc: BaseException) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        waiting: list[asyncio.Future[Any]] = [self.greeting, *self.replies.values()]
        for fut in waiting:
            if not fut.done():
                fut.set_exception(exc)
        self.replies.clear()
        jobs_lost = EslConnectionError(f"connection to {self._node} lost; job outcome unknown")
        for job in self.jobs.values():
            if not job.done():
                job.set_exception(jobs_lost)
        self.jobs.clear()
        if not self.closed.done():
            self.closed.set_result(None)


class InboundClient(AsyncResource):
    """One FreeSWITCH node's inbound socket, kept connected and subscribed."""

    def __init__(self, settings: InboundSettings) -> None:
        self.settings = settings
        self._proto: _InboundProtocol | None = None
        self._connected = asyncio.Event()
        self._listeners: list[EventListener] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: set by a command that finds the node down: reconnect now rather than after the backoff
        self._wanted = asyncio.Event()
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

    def want_connection(self) -> None:
        """Someone waits for this node: if it is down, try to reconnect now rather than after the backoff."""
        if not self._connected.is_set():
            self._wanted.set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        self.want_connection()
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
                proto = await self._connection()
                reply = await proto.send(cmd)
        except TimeoutError:
            metrics.ERRORS.labels("command_timeout").inc()
            raise EslTimeout(f"{type(cmd).__name__} to {self.settings.node} timed out after {timeout} s") from None
        if isinstance(cmd, Api):
            if isinstance(reply, CommandReply) and not reply.reply_text.startswith("-ERR"):
                raise self._desynchronised(proto, "api", f"command/reply {reply.reply_text[:60]!r}")
        elif isinstance(reply, ApiResponse):
            raise self._desynchronised(proto, type(cmd).__name__, "api/response")
        return reply

    async def _connection(self) -> _InboundProtocol:
        """The connected protocol, once there is one (the caller bounds the wait). A connection that just
        died is not handed out while the keeper has not noticed yet: the caller waits for the next one."""
        while True:
            self.want_connection()
            await self._connected.wait()
            proto = self._proto
            if proto is not None and proto.usable:
                return proto
            self._connected.clear()

    def _desynchronised(self, proto: _InboundProtocol, cmd: str, got: str) -> EslConnectionError:
        """A reply of the wrong kind: the switch and we no longer agree which reply answers which command, so
        no later reply on this connection can be trusted. Drop it (the keeper reconnects) and report the
        command's outcome as unknown, as for a lost link: never as the switch's refusal."""
        metrics.ERRORS.labels("unexpected_reply").inc()
        log.error("%s to %s answered by %s: replies out of step; reconnecting", cmd, self.settings.node, got)
        exc = EslConnectionError(f"{cmd} to {self.settings.node} answered by {got}; connection reset")
        proto.abort(exc)
        return exc

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

    async def bgapi(self, command: str, *, job_uuid: str | None = None, timeout: float = 120.0,
                    on_accepted: Callable[[], None] | None = None) -> BackgroundJobResult:
        """Run ``command`` in the background and wait for its BACKGROUND_JOB; ``on_accepted`` runs once the
        switch accepted the job (its ``+OK Job-UUID`` reply), before the job's outcome.

        If the connection drops before the job reports, the outcome is unknown and
        :class:`EslConnectionError` is raised; callers that originate set
        ``origination_uuid`` so they can find the call afterwards.
        """
        job_uuid = job_uuid or new_uuid()
        command_timeout = self.settings.command_timeout
        proto: _InboundProtocol | None = None
        done: asyncio.Future[Event] | None = None
        try:
            try:
                async with asyncio.timeout(command_timeout):
                    proto = await self._connection()
                    reply_fut, done = proto.send_job(BgApi(command, job_uuid))
                    reply = await reply_fut
            except TimeoutError:
                metrics.ERRORS.labels("command_timeout").inc()
                raise EslTimeout(f"BgApi to {self.settings.node} timed out after {command_timeout} s") from None
            if not isinstance(reply, CommandReply):
                raise self._desynchronised(proto, "BgApi", "api/response")
            if not reply.ok:
                raise CommandFailed("BgApi", reply.reply_text)
            if on_accepted is not None:
                on_accepted()
            try:
                event = await asyncio.wait_for(done, timeout)
            except EslConnectionError as exc:
                raise JobLost(f"{exc}; the switch accepted job {job_uuid}", job_uuid) from exc
        except TimeoutError:
            metrics.count_command("bgapi", "timeout")
            raise EslTimeout(f"bgapi {command.split(' ', 1)[0]} job {job_uuid} did not report in {timeout} s") from None
        finally:
            if proto is not None and done is not None:
                proto.forget_job(done)
        result = BackgroundJobResult(job_uuid, event.body or "", event)
        metrics.count_command("bgapi", "ok" if result.ok else "err")
        return result

    # -- connection keeping --------------------------------------------------------
    def _dispatch(self, event: Event) -> None:
        metrics.count_event(event.name)
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
            _, proto = await loop.create_connection(lambda: _InboundProtocol(s.node, self._dispatch), s.host, s.port)
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
            except Exception as exc:  # unforeseen: the node must still be retried, never given up for good
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("connecting to FreeSWITCH %s failed", node)
            else:
                self._proto = proto
                self.connects += 1
                attempt = 0
                self._connected.set()
                log.info("connected to FreeSWITCH %s", node)
                await proto.closed
                self._connected.clear()
                log.warning("lost FreeSWITCH %s", node)
            if self._is_closing():
                break
            attempt += 1
            metrics.INBOUND_RECONNECTS.labels(node).inc()
            await self._pause(backoff_delay(attempt, self.settings.backoff_initial, self.settings.backoff_max))

    async def _pause(self, delay: float) -> None:
        """Wait ``delay`` before the next attempt, or less when a command wants the node (never less than
        ``backoff_initial``: commands arriving all the time must not turn into a connect storm)."""
        self._wanted.clear()
        loop = asyncio.get_running_loop()
        earliest = loop.time() + min(delay, self.settings.backoff_initial)
        try:
            async with asyncio.timeout(delay):  # not wait_for: 3.11's can lose a cancel racing its inner wait
                await self._wanted.wait()
        except TimeoutError:
            return
        await asyncio.sleep(max(0.0, earliest - loop.time()))

    def _is_closing(self) -> bool:
        return self._closing


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
            for client in self.clients:
                client.want_connection()
            if loop.time() >= deadline:
                raise EslConnectionError("no FreeSWITCH node is connected")
            await asyncio.sleep(0.05)

    async def bgapi(self, command: str, *, job_uuid: str | None = None, timeout: float = 120.0,
                    on_accepted: Callable[[], None] | None = None) -> BackgroundJobResult:
        client = await self.pick()
        return await client.bgapi(command, job_uuid=job_uuid, timeout=timeout, on_accepted=on_accepted)

    async def api(self, command: str, timeout: float | None = None) -> ApiResponse:
        client = await self.pick()
        return await client.api(command, timeout)
