"""One FreeSWITCH channel under our control, as seen by a call handler.

A :class:`Call` is the handler's whole world: the channel data from ``connect``,
commands that complete when FreeSWITCH says so, and the channel's events. It knows
nothing about sockets: :mod:`fs_app.outbound` hands it received bytes
(:meth:`Call.receive_data`) and a ``write`` callable. Which reply answers which command
and which CHANNEL_EXECUTE_COMPLETE finishes which ``execute`` is the
:class:`~fs_app.esl.EslSession`'s business; the call only maps its tokens to futures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fs_app import metrics
from fs_app.esl import (
    ApiResponse,
    ChannelData,
    Command,
    CommandReply,
    DisconnectNotice,
    EslConnectionError,
    EslError,
    EslSession,
    EslTimeout,
    Event,
    Execute,
    ExecuteComplete,
    HangupCmd,
    JobDone,
    MalformedEvent,
    Reply,
    RudeRejection,
    Token,
)

log = logging.getLogger("iim.esl.call")

DEFAULT_COMMAND_TIMEOUT = 5.0
DEFAULT_EXECUTE_TIMEOUT = 300.0


class CallGone(EslConnectionError):
    """The channel hung up (or the socket closed) before the command could finish."""


class CommandFailed(EslError):
    """FreeSWITCH answered a command with ``-ERR``."""

    def __init__(self, command: str, reply: str) -> None:
        super().__init__(f"{command}: {reply}")
        self.reply = reply


@dataclass(frozen=True, slots=True)
class BridgeResult:
    """What a bridge came to: FreeSWITCH's disposition and the B-leg's cause."""

    answered: bool
    disposition: str | None
    hangup_cause: str | None
    event: Event
    device_id: str | None = None  # the device whose leg answered (imported from it), None for a phone


def bridge_result(done: Event) -> BridgeResult:
    """Read a bridge's CHANNEL_EXECUTE_COMPLETE: ``originate_disposition``, the B-leg cause, the answering device."""
    disposition = done.variable("originate_disposition")
    cause = done.variable("bridge_hangup_cause") or done.variable("last_bridge_hangup_cause")
    answered = disposition == "SUCCESS"
    return BridgeResult(answered, disposition, cause or disposition, done,
                        done.variable("iim_device_id") if answered else None)


class _EventStream:
    """Bounded per-call event buffer; the oldest event is dropped (and counted) on overflow."""

    __slots__ = ("_closed", "_items", "_maxlen", "_waiter")

    def __init__(self, maxlen: int) -> None:
        self._items: deque[Event] = deque()
        self._maxlen = maxlen
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def push(self, event: Event) -> None:
        items = self._items
        if len(items) >= self._maxlen:
            items.popleft()
            metrics.QUEUE_OVERFLOW.inc()
        items.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Event | None:
        while not self._items:
            if self._closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


def _expire_reply(fut: asyncio.Future[object], what: str, uuid: str) -> None:
    if not fut.done():
        metrics.ERRORS.labels("command_timeout").inc()
        fut.set_exception(EslTimeout(f"no reply to {what} on call {uuid}"))


def _expire_all(futures: list[asyncio.Future[Event]], uuid: str) -> None:
    for fut in futures:
        if not fut.done():
            metrics.ERRORS.labels("execute_timeout").inc()
            fut.set_exception(EslTimeout(f"application did not complete in time on call {uuid}"))


def retrieve_exception(fut: asyncio.Future[Any]) -> None:
    """Mark a failed reply as seen: the socket may close with nobody awaiting it."""
    if not fut.cancelled():
        fut.exception()


class Call:
    """A channel controlled over one outbound Event Socket connection."""

    def __init__(
        self,
        write: Callable[[bytes], None],
        *,
        event_queue_size: int = 1000,
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        self._write = write
        self._loop = asyncio.get_running_loop()
        self._session = EslSession("outbound")
        self._replies: dict[Token, tuple[asyncio.Future[object], str, float]] = {}
        self._executing: dict[Token, asyncio.Future[Event]] = {}
        self._events = _EventStream(event_queue_size)
        self._command_timeout = command_timeout
        self._hangup = self._loop.create_future()
        self._hangup_complete = self._loop.create_future()
        self._closed = False
        self.channel: ChannelData | None = None
        self.uuid = ""
        self.hangup_cause: str | None = None
        self.answered = False
        self.lingering = False
        self.accepted_at = time.monotonic()
        self.first_sendmsg_at: float | None = None

    # -- what the handler reads ------------------------------------------------
    def variable(self, name: str) -> str | None:
        """A channel variable from the connect reply (``variable_<name>``)."""
        return self.channel.channel.variable(name) if self.channel else None

    def header(self, name: str) -> str | None:
        return self.channel.channel.get(name) if self.channel else None

    @property
    def destination_number(self) -> str | None:
        return self.header("Caller-Destination-Number")

    @property
    def caller_id_number(self) -> str | None:
        return self.header("Caller-Caller-ID-Number")

    @property
    def hung_up(self) -> bool:
        return self._hangup.done()

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_hangup(self, timeout: float | None = None) -> str | None:
        """Wait for CHANNEL_HANGUP; returns the hangup cause."""
        await asyncio.wait_for(asyncio.shield(self._hangup), timeout)
        return self.hangup_cause

    async def wait_hangup_complete(self, timeout: float) -> bool:
        if self._hangup_complete.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._hangup_complete), timeout)
        except TimeoutError:
            return False
        return True

    async def events(self) -> AsyncIterator[Event]:
        """This channel's events in arrival order, until the socket closes."""
        while (event := await self._events.get()) is not None:
            yield event

    # -- commands ----------------------------------------------------------------
    def send_nowait(self, cmd: Command) -> asyncio.Future[object]:
        """Write ``cmd`` and return the future of its reply (FIFO-matched)."""
        return self.send_batch((cmd,))[0]

    def send_batch(self, cmds: Sequence[Command]) -> list[asyncio.Future[object]]:
        """Write several commands in one write; FreeSWITCH answers them in order."""
        return [fut for _, fut in self._send_batch(cmds)]

    def _send_batch(self, cmds: Sequence[Command]) -> list[tuple[Token, asyncio.Future[object]]]:
        if self._closed:
            raise CallGone(f"socket of call {self.uuid} is closed")
        data, tokens = self._session.send_many(cmds)
        now = time.monotonic()
        sent: list[tuple[Token, asyncio.Future[object]]] = []
        for cmd, token in zip(cmds, tokens, strict=True):
            fut: asyncio.Future[object] = self._loop.create_future()
            fut.add_done_callback(retrieve_exception)
            self._replies[token] = (fut, type(cmd).__name__.lower(), now)
            sent.append((token, fut))
            if self.first_sendmsg_at is None and isinstance(cmd, Execute | HangupCmd):
                self.first_sendmsg_at = now
                metrics.TALLIES.call_setup.observe(now - self.accepted_at)
        self._write(data)
        return sent

    async def send(self, cmd: Command, timeout: float | None = None) -> CommandReply | ApiResponse | ChannelData:
        fut = self.send_nowait(cmd)
        # A timer handle instead of asyncio.wait_for: this runs several times per call.
        timer = self._loop.call_later(
            timeout if timeout is not None else self._command_timeout, _expire_reply, fut, type(cmd).__name__,
            self.uuid,
        )
        try:
            reply = await fut
        finally:
            timer.cancel()
        assert isinstance(reply, CommandReply | ApiResponse | ChannelData)
        return reply

    async def command(self, cmd: Command, timeout: float | None = None) -> CommandReply:
        """Send a command that answers with command/reply; ``-ERR`` raises CommandFailed."""
        fut = self.send_nowait(cmd)
        return await self._reply_of(type(cmd).__name__, fut, self._command_timeout if timeout is None else timeout)

    async def execute(
        self, app: str, arg: str | None = None, *, timeout: float | None = DEFAULT_EXECUTE_TIMEOUT,
        event_lock: bool = True,
    ) -> Event:
        """Run a dialplan application; returns its CHANNEL_EXECUTE_COMPLETE event."""
        if self._hangup_complete.done():
            raise CallGone(f"call {self.uuid} has hung up; not executing {app}")
        [(token, reply)] = self._send_batch((Execute(app, arg, event_lock=event_lock),))
        done: asyncio.Future[Event] = self._loop.create_future()
        self._executing[token] = done
        timer = None
        try:
            await self._reply_of("Execute", reply, self._command_timeout)
            if timeout is not None:
                timer = self._loop.call_later(timeout, _expire_all, [done], self.uuid)
            return await done
        finally:
            if timer is not None:
                timer.cancel()
            self._forget(token)

    async def execute_many(
        self, apps: list[tuple[str, str | None]], *, timeout: float | None = DEFAULT_EXECUTE_TIMEOUT
    ) -> list[Event]:
        """Queue several applications in one write; they run in order (event-lock).

        Saves a round trip per application on the call-setup path, e.g. setting
        channel variables right before a bridge.
        """
        if self._hangup_complete.done():
            raise CallGone(f"call {self.uuid} has hung up")
        cmds = [Execute(app, arg) for app, arg in apps]
        sent = self._send_batch(cmds)
        done: list[asyncio.Future[Event]] = []
        for token, _ in sent:
            fut: asyncio.Future[Event] = self._loop.create_future()
            self._executing[token] = fut
            done.append(fut)
        timer = None
        try:
            for cmd, (_, reply_fut) in zip(cmds, sent, strict=True):
                reply = await reply_fut
                if not (isinstance(reply, CommandReply) and reply.ok):
                    text = reply.reply_text if isinstance(reply, CommandReply) else type(reply).__name__
                    raise CommandFailed(cmd.app, text)
            if timeout is not None:
                timer = self._loop.call_later(timeout, _expire_all, done, self.uuid)
            return [await fut for fut in done]
        finally:
            if timer is not None:
                timer.cancel()
            for token, _ in sent:
                self._forget(token)

    async def answer(self) -> Event:
        return await self.execute("answer")

    async def set(self, name: str, value: str) -> Event:
        return await self.execute("set", f"{name}={value}")

    async def export(self, name: str, value: str) -> Event:
        return await self.execute("export", f"{name}={value}")

    async def playback(self, path: str, *, timeout: float | None = DEFAULT_EXECUTE_TIMEOUT) -> str:
        """Play a file or tone stream; returns Application-Response (``FILE PLAYED``...)."""
        done = await self.execute("playback", path, timeout=timeout)
        return done.get("Application-Response") or ""

    async def play_and_get_digits(
        self,
        prompt: str,
        *,
        min_digits: int = 1,
        max_digits: int = 1,
        tries: int = 1,
        timeout_ms: int = 5000,
        terminators: str = "#",
        invalid_prompt: str = "silence_stream://250",
        variable: str = "iim_digits",
        regexp: str = "\\d+",
        digit_timeout_ms: int | None = None,
    ) -> str:
        """Prompt and collect DTMF; returns the digits ('' when none matched)."""
        args = [str(min_digits), str(max_digits), str(tries), str(timeout_ms), terminators, prompt,
                invalid_prompt, variable, regexp]
        if digit_timeout_ms is not None:
            args.append(str(digit_timeout_ms))
        total = tries * (timeout_ms + (digit_timeout_ms or timeout_ms)) / 1000 + 30
        done = await self.execute("play_and_get_digits", " ".join(args), timeout=total)
        return done.variable(variable) or ""

    async def bridge(self, dial_string: str, *, timeout: float | None = None) -> BridgeResult:
        """Bridge to ``dial_string``; returns how it ended (never raises on a busy callee).

        The bridge completes when the bridged conversation ends, so by default there is
        no timeout: the channel's hangup (or the socket closing) ends it.
        """
        return bridge_result(await self.execute("bridge", dial_string, timeout=timeout))

    async def hangup(self, cause: str = "NORMAL_CLEARING") -> None:
        """Hang the channel up with a Q.850 cause name (no-op if it is already down)."""
        if self._hangup.done() or self._closed:
            return
        await self.command(HangupCmd(cause))
        # The switch reports CHANNEL_HANGUP after the command's reply, often after IIM has let the socket go:
        # the cause IIM gave is the call's cause (the call-ended log line and metrics must not say null).
        if self.hangup_cause is None:
            self.hangup_cause = cause

    async def _reply_of(self, what: str, fut: asyncio.Future[object], timeout: float) -> CommandReply:
        """Await one command's reply (with the command deadline); ``-ERR`` raises CommandFailed."""
        timer = self._loop.call_later(timeout, _expire_reply, fut, what, self.uuid)
        try:
            reply = await fut
        finally:
            timer.cancel()
        if not isinstance(reply, CommandReply):
            raise CommandFailed(what, f"unexpected reply {type(reply).__name__}")
        if not reply.ok:
            raise CommandFailed(what, reply.reply_text)
        return reply

    def _forget(self, token: Token) -> None:
        if self._executing.pop(token, None) is not None and not self._closed:
            self._session.forget(token)

    # -- fed by the transport driver --------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Bytes from FreeSWITCH; raises RemoteProtocolError (the driver then aborts the socket)."""
        session = self._session
        for ev in session.receive_events(data):
            if isinstance(ev, Event):
                self._on_event(ev)
            elif isinstance(ev, Reply):
                self._on_reply(ev)
            elif isinstance(ev, ExecuteComplete):
                waiter = self._executing.get(ev.token)
                if waiter is not None and not waiter.done():
                    waiter.set_result(ev.event)
                self._on_event(ev.event)
            elif isinstance(ev, JobDone):
                self._on_event(ev.event)
            elif isinstance(ev, DisconnectNotice):
                if ev.is_linger:
                    self.lingering = True
            elif isinstance(ev, MalformedEvent):
                metrics.ERRORS.labels("malformed_event").inc()
                log.warning("malformed event skipped: %s", ev.reason, extra={"call_id": self.uuid})
            elif isinstance(ev, RudeRejection):
                metrics.ERRORS.labels("rejected").inc()
            else:
                metrics.ERRORS.labels("unexpected_message").inc()
        if session.error is not None:
            raise session.error

    def connection_lost(self, exc: BaseException | None) -> None:
        """The socket closed (or was aborted): everything outstanding fails with CallGone."""
        if self._closed:
            return
        self._closed = True
        err = CallGone(f"socket of call {self.uuid} closed" + (f": {exc}" if exc else ""))
        replies, self._replies = self._replies, {}
        for fut, _, _ in replies.values():
            if not fut.done():
                fut.set_exception(err)
        self._fail_executing(err)
        if not self._hangup.done():
            self._hangup.set_result(None)
        if not self._hangup_complete.done():
            self._hangup_complete.set_result(None)
        self._events.close()

    def _on_reply(self, ev: Reply) -> None:
        entry = self._replies.pop(ev.token, None)
        if entry is None:
            return
        fut, verb, sent_at = entry
        reply = ev.reply
        metrics.count_reply(verb, reply.ok, time.monotonic() - sent_at)
        if isinstance(reply, ChannelData):
            self.channel = reply
            self.uuid = reply.unique_id
        if not fut.done():
            fut.set_result(reply)

    def _on_event(self, event: Event) -> None:
        name = event.name
        metrics.count_event(name)
        if name == "CHANNEL_HANGUP":
            self.hangup_cause = event.get("Hangup-Cause")
            if not self._hangup.done():
                self._hangup.set_result(None)
        elif name == "CHANNEL_HANGUP_COMPLETE":
            if self.hangup_cause is None:
                self.hangup_cause = event.get("Hangup-Cause")
            if not self._hangup.done():
                self._hangup.set_result(None)
            if not self._hangup_complete.done():
                self._hangup_complete.set_result(None)
            self._fail_executing(CallGone(f"call {self.uuid} hung up ({self.hangup_cause})"))
        elif name == "CHANNEL_ANSWER":
            self.answered = True
        self._events.push(event)

    def _fail_executing(self, err: Exception) -> None:
        for fut in self._executing.values():
            if not fut.done():
                fut.set_exception(err)
