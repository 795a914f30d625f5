"""The application's side of one ESL conversation as a sans-I/O state machine (like h11's Connection).

The codec turns bytes into messages; this module knows what they *answer*. FreeSWITCH
answers every command with exactly one ``command/reply`` or ``api/response`` (the
outbound ``connect`` with the channel data), in the order the commands were sent, so
replies are matched first-in first-out. A ``sendmsg`` execute finishes later, on the
CHANNEL_EXECUTE_COMPLETE whose ``Application-UUID`` is the ``Event-UUID`` we sent; a
``bgapi`` on the BACKGROUND_JOB carrying its ``Job-UUID``. Drivers call :meth:`send`,
write the bytes, map the token to whatever they wait with (a future), feed received
bytes to :meth:`receive_data` and drain :meth:`next_event` until :data:`NEED_DATA`.

No socket, no clock, no asyncio: deadlines are the driver's, and :meth:`forget` is how a
driver that gave up tells the session. A protocol violation (a reply with nothing
outstanding, a bad frame, the stream ending mid-frame) raises
:class:`~fs_app.esl.RemoteProtocolError` (:class:`~fs_app.esl.UnexpectedReply` for the
first) from :meth:`next_event`, after the events that preceded it, and every later call
raises it again: the FIFO cannot be trusted past it.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NewType, TypeVar, cast

from fs_app.esl._codec import EslCodec
from fs_app.esl._commands import BgApi, Command, Connect, Execute, RawCommand, serialise
from fs_app.esl._errors import LocalProtocolError, RemoteProtocolError, UnexpectedReply
from fs_app.esl._messages import (
    ApiResponse,
    AuthRequest,
    ChannelData,
    CommandReply,
    DisconnectNotice,
    EslMessage,
    Event,
    LogData,
    MalformedEvent,
    RudeRejection,
    UnknownMessage,
)

Token = NewType("Token", int)
"""Names one sent command in the events that complete it; opaque and hashable."""

Role = Literal["outbound", "inbound"]


class _Marker(enum.Enum):
    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = _Marker.NEED_DATA
"""Every received byte has been turned into events: feed more with :meth:`EslSession.receive_data`."""

CLOSED: Final = _Marker.CLOSED
"""The peer closed the stream cleanly between frames; nothing more will arrive."""


@dataclass(frozen=True, slots=True)
class Reply:
    """The one answer to the command ``token`` names (``connect`` is answered with channel data)."""

    token: Token
    reply: CommandReply | ApiResponse | ChannelData

    @property
    def ok(self) -> bool:
        return self.reply.ok


@dataclass(frozen=True, slots=True, eq=False)
class ExecuteComplete:
    """The CHANNEL_EXECUTE_COMPLETE of the ``sendmsg execute`` ``token`` names."""

    token: Token
    event: Event


@dataclass(frozen=True, slots=True, eq=False)
class JobDone:
    """The BACKGROUND_JOB of the ``bgapi`` ``token`` names; ``body`` is the command's output."""

    token: Token
    event: Event

    @property
    def job_uuid(self) -> str:
        return self.event.get("Job-UUID") or ""

    @property
    def body(self) -> str:
        return self.event.body or ""


Passthrough = Event | AuthRequest | DisconnectNotice | RudeRejection | LogData | MalformedEvent | UnknownMessage
"""Messages that answer no command; :meth:`EslSession.next_event` returns them as the codec made them."""

SessionEvent = Reply | ExecuteComplete | JobDone | Passthrough | Literal[_Marker.NEED_DATA, _Marker.CLOSED]


# Built without the frozen dataclasses' slow ``__init__``: one of these per command on the hot path.
_new_object = object.__new__
_set_token = Reply.__dict__["token"].__set__
_set_reply = Reply.__dict__["reply"].__set__
_SET_COMPLETION = {cls: (cls.__dict__["token"].__set__, cls.__dict__["event"].__set__) for cls in (ExecuteComplete, JobDone)}
_C = TypeVar("_C", ExecuteComplete, JobDone)


def _completion(cls: type[_C], token: Token, event: Event) -> _C:
    done: _C = _new_object(cls)
    set_token, set_event = _SET_COMPLETION[cls]
    set_token(done, token)
    set_event(done, event)
    return done


def message_of(ev: Reply | ExecuteComplete | JobDone | Passthrough) -> EslMessage:
    """The codec's message inside a session event (for peers that log what arrived)."""
    if isinstance(ev, Reply):
        return ev.reply
    if isinstance(ev, ExecuteComplete | JobDone):
        return ev.event
    return ev


# What a reply settles besides itself: nothing, an execute's completion or a bgapi's job.
_PLAIN: Final = 0
_EXECUTE: Final = 1
_JOB: Final = 2


def _is_connect(cmd: Command) -> bool:
    # FreeSWITCH prefix-matches command words: "connect please" is a connect.
    return isinstance(cmd, Connect) or (isinstance(cmd, RawCommand) and cmd.line[:7].lower() == "connect")


class EslSession:
    """One ESL connection's conversation state, application side.

    ``role="outbound"``: FreeSWITCH dialled us and answers nothing to a first command
    other than ``connect`` (it runs it silently). ``role="inbound"``: we dialled port
    8021; the ``auth/request`` greeting arrives as an :class:`~fs_app.esl.AuthRequest`.
    """

    __slots__ = (
        "_codec",
        "_eof",
        "_error",
        "_executing",
        "_first",
        "_jobs",
        "_outbound",
        "_pending",
        "_ready",
        "_tokens",
        "closed",
    )

    def __init__(self, role: Role = "outbound", *, codec: EslCodec | None = None) -> None:
        self._codec = codec or EslCodec()
        self._outbound = role == "outbound"
        self._first = True
        self._tokens = cast(Iterator[Token], itertools.count())  # a C counter: no NewType call per command
        # One entry per command awaiting its reply, oldest first: (token, what else it settles, key).
        self._pending: deque[tuple[Token, int, str]] = deque()
        self._executing: dict[str, Token] = {}  # Event-UUID -> execute awaiting CHANNEL_EXECUTE_COMPLETE
        self._jobs: dict[str, Token] = {}  # Job-UUID -> bgapi awaiting BACKGROUND_JOB
        self._ready: deque[EslMessage] = deque()
        self._error: RemoteProtocolError | None = None
        self._eof = False
        self.closed = False

    # -- what we send ----------------------------------------------------------------
    def send(self, cmd: Command) -> tuple[bytes, Token]:
        """The bytes of ``cmd`` and the token its reply (and completion) will carry."""
        data = serialise(cmd)  # raises LocalProtocolError before anything is registered
        return data, self.register(cmd)

    def send_many(self, cmds: Sequence[Command]) -> tuple[bytes, list[Token]]:
        """Several commands for one write (FreeSWITCH answers them in order)."""
        data = b"".join([serialise(cmd) for cmd in cmds])
        return data, [self.register(cmd) for cmd in cmds]

    def register(self, cmd: Command) -> Token:
        """Expect the answer to ``cmd`` whose bytes the caller framed itself (a test peer's raw bytes).

        Pass the command as FreeSWITCH will read it (:class:`~fs_app.esl.CommandDecoder`).
        """
        if self.closed or self._error is not None or self._eof:
            raise LocalProtocolError("the ESL session is closed; nothing more can be sent")
        token = next(self._tokens)
        first, self._first = self._first, False
        if first and self._outbound and not _is_connect(cmd):
            return token  # FreeSWITCH runs a first non-connect command without answering it
        if isinstance(cmd, Execute) and cmd.event_uuid:
            self._executing[cmd.event_uuid] = token
            self._pending.append((token, _EXECUTE, cmd.event_uuid))
        elif isinstance(cmd, BgApi):
            if cmd.job_uuid:
                self._jobs[cmd.job_uuid] = token
            self._pending.append((token, _JOB, cmd.job_uuid))
        else:
            self._pending.append((token, _PLAIN, ""))
        return token

    def forget(self, token: Token) -> None:
        """Stop waiting for ``token``'s completion (the driver gave up); its reply slot stays."""
        for table in (self._executing, self._jobs):
            for key, value in table.items():
                if value == token:
                    del table[key]
                    return

    @property
    def outstanding(self) -> int:
        """Commands still awaiting their reply."""
        return len(self._pending)

    # -- what we receive ---------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes as they arrive, in chunks of any size; ``b""`` means the peer closed."""
        if self._error is not None:
            return  # next_event keeps raising the first error
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data received after end of stream")
        try:
            self._ready.extend(self._codec.feed(data))
        except RemoteProtocolError as exc:
            self._ready.extend(exc.messages)  # the frames before the bad one still count
            self._error = exc

    def next_event(self) -> SessionEvent:
        """The next event, :data:`NEED_DATA` or :data:`CLOSED`; raises RemoteProtocolError on a violation."""
        ready = self._ready
        if not ready:
            if self._error is None and not self._eof:
                return NEED_DATA
            return self._idle()
        msg = ready.popleft()
        if isinstance(msg, Event):
            name = msg.name
            if name == "CHANNEL_EXECUTE_COMPLETE":
                if self._executing:
                    app_uuid = msg.headers.raw("Application-UUID")
                    token = self._executing.pop(app_uuid, None) if app_uuid else None
                    if token is not None:
                        return _completion(ExecuteComplete, token, msg)
            elif name == "BACKGROUND_JOB" and self._jobs:
                job = msg.get("Job-UUID")
                token = self._jobs.pop(job, None) if job else None
                if token is not None:
                    return _completion(JobDone, token, msg)
            return msg
        if isinstance(msg, CommandReply | ApiResponse | ChannelData):
            return self._reply(msg)
        return msg

    @property
    def error(self) -> RemoteProtocolError | None:
        """The violation that ended the conversation, if any (:meth:`next_event` raises it)."""
        return self._error

    def receive_events(self, data: bytes | bytearray | memoryview) -> list[SessionEvent]:
        """:meth:`receive_data` and every event those bytes complete, in one call: the per-call hot path
        (a call's ~20 frames would otherwise cost ~20 :meth:`next_event` calls). A violation stops the list at
        the events before it; :attr:`error` then holds it and :meth:`next_event` raises it."""
        if self._ready or self._error is not None or not data:
            self.receive_data(data)
            messages: list[EslMessage] = list(self._ready)
            self._ready.clear()
        else:
            try:
                messages = self._codec.feed(data)
            except RemoteProtocolError as exc:
                messages = list(exc.messages)
                self._error = exc
        out: list[SessionEvent] = []
        executing, jobs = self._executing, self._jobs
        for msg in messages:
            if isinstance(msg, Event):
                name = msg.name
                if name == "CHANNEL_EXECUTE_COMPLETE" and executing:
                    app_uuid = msg.headers.raw("Application-UUID")
                    token = executing.pop(app_uuid, None) if app_uuid else None
                    if token is not None:
                        out.append(_completion(ExecuteComplete, token, msg))
                        continue
                elif name == "BACKGROUND_JOB" and jobs:
                    job = msg.get("Job-UUID")
                    token = jobs.pop(job, None) if job else None
                    if token is not None:
                        out.append(_completion(JobDone, token, msg))
                        continue
                out.append(msg)
            elif isinstance(msg, CommandReply | ApiResponse | ChannelData):
                try:
                    out.append(self._reply(msg))
                except UnexpectedReply:
                    break
            else:
                out.append(msg)
        return out

    def _reply(self, msg: CommandReply | ApiResponse | ChannelData) -> Reply:
        if not self._pending:
            self._error = UnexpectedReply(f"reply with no command outstanding: {msg!r:.200}")
            self._ready.clear()
            raise self._error
        token, settles, key = self._pending.popleft()
        if settles == _EXECUTE:
            if not msg.ok and self._executing.get(key) == token:
                del self._executing[key]  # refused: no CHANNEL_EXECUTE_COMPLETE will come
        elif settles == _JOB:
            if not msg.ok:
                if key and self._jobs.get(key) == token:
                    del self._jobs[key]
            elif not key and isinstance(msg, CommandReply) and msg.job_uuid:
                self._jobs[msg.job_uuid] = token  # FreeSWITCH chose the Job-UUID
        reply = _new_object(Reply)
        _set_token(reply, token)
        _set_reply(reply, msg)
        return reply

    def _idle(self) -> Literal[_Marker.NEED_DATA, _Marker.CLOSED]:
        if self._error is not None:
            raise self._error
        if not self._eof:
            return NEED_DATA
        if not self.closed:
            if not self._codec.feed_eof():
                self._error = RemoteProtocolError(
                    f"the stream ended mid-frame ({self._codec.buffered} bytes of an unfinished message)")
                raise self._error
            self.closed = True
        return CLOSED
