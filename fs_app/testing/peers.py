"""Application-side helpers for tests that talk to the emulator.

:class:`EslPeer` is a minimal ESL client (the application's end of one socket) driven by
:class:`fs_app.esl.EslSession`, the state machine IIM's own drivers use: it records every
chunk and message it receives so a test can assert on framing, and offers
``expect``/``command`` helpers; ``command`` returns the reply the session matched to the
command. Raw bytes a test writes are read back as FreeSWITCH reads them
(:class:`fs_app.esl.CommandDecoder`) so the session knows what will be answered.
:class:`AppServer` accepts outbound-socket connections from the emulator and runs a
handler coroutine per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Self, TypeVar, overload

from fs_app.esl import (
    CLOSED,
    NEED_DATA,
    ApiResponse,
    ChannelData,
    Command,
    CommandDecoder,
    CommandReply,
    EslMessage,
    EslSession,
    Event,
    Reply,
    SessionEvent,
    Token,
    message_of,
)

M = TypeVar("M")
Predicate = Callable[[EslMessage], bool]


class EslPeer:
    """The application's side of one ESL connection (``outbound``: FreeSWITCH dialled us)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, timeout: float = 5.0,
        outbound: bool = False,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.session = EslSession("outbound" if outbound else "inbound")
        self._sent = CommandDecoder()  # our raw bytes as FreeSWITCH reads them
        self.chunks: list[bytes] = []
        self.messages: list[EslMessage] = []
        self._pending: list[SessionEvent] = []
        self.eof = False
        self.reset = False
        self.closed = False

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout: float = 5.0) -> EslPeer:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, timeout=timeout)

    def raw(self) -> bytes:
        return b"".join(self.chunks)

    async def _read_more(self, timeout: float) -> None:
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except ConnectionResetError:
            self.reset = True
            self.eof = True
            return
        if data:
            self.chunks.append(data)
        session = self.session
        session.receive_data(data)  # b"" is the end of the stream
        while (ev := session.next_event()) is not NEED_DATA:
            if ev is CLOSED:
                self.eof = True
                return
            self.messages.append(message_of(ev))
            self._pending.append(ev)

    async def _next_event(self, timeout: float | None) -> SessionEvent:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else self.timeout)
        while not self._pending:
            if self.eof:
                raise EOFError("connection closed")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("no message")
            await self._read_more(remaining)
        return self._pending.pop(0)

    async def next(self, timeout: float | None = None) -> EslMessage:
        """The next message not yet consumed; TimeoutError / EOFError otherwise."""
        ev = await self._next_event(timeout)
        assert ev is not NEED_DATA
        assert ev is not CLOSED
        return message_of(ev)

    @overload
    async def expect(self, pred: Predicate, timeout: float | None = None) -> EslMessage: ...

    @overload
    async def expect(self, pred: type[M], timeout: float | None = None) -> M: ...

    async def expect(self, pred: Predicate | type[M], timeout: float | None = None) -> M | EslMessage:
        """Consume messages until one matches (a predicate or a message class)."""
        while True:
            msg = await self.next(timeout)
            if isinstance(pred, type):
                if isinstance(msg, pred):
                    return msg
            elif pred(msg):
                return msg

    async def expect_event(self, name: str, *, app: str | None = None, timeout: float | None = None) -> Event:
        def match(m: EslMessage) -> bool:
            return isinstance(m, Event) and m.name == name and (app is None or m.get("Application") == app)

        msg = await self.expect(match, timeout)
        assert isinstance(msg, Event)
        return msg

    def send(self, data: bytes | Command) -> list[Token]:
        """Write a command (or raw bytes); the tokens of the commands FreeSWITCH will read in it."""
        if isinstance(data, bytes):
            tokens = [self.session.register(cmd) for cmd in self._sent.feed(data)]
        else:
            data, token = self.session.send(data)
            tokens = [token]
        self.writer.write(data)
        return tokens

    async def command(self, data: bytes | Command, timeout: float | None = None) -> CommandReply | ApiResponse:
        """Send a command and return its reply (messages arriving before it are consumed; all stay in
        ``messages``)."""
        tokens = self.send(data)
        if not tokens:
            raise ValueError(f"no complete command in {data!r}")
        while True:
            ev = await self._next_event(timeout)
            if isinstance(ev, Reply) and ev.token == tokens[-1]:
                reply = ev.reply
                if isinstance(reply, ChannelData):
                    raise TypeError(f"expected command/reply or api/response, got {reply!r}")
                return reply

    async def reply(self, data: bytes | Command, timeout: float | None = None) -> CommandReply:
        """Send a command that answers with ``command/reply``."""
        msg = await self.command(data, timeout)
        if not isinstance(msg, CommandReply):
            raise TypeError(f"expected command/reply, got {msg!r}")
        return msg

    async def api(self, data: bytes | Command, timeout: float | None = None) -> ApiResponse:
        """Send an ``api`` command and return its ``api/response``."""
        msg = await self.command(data, timeout)
        if not isinstance(msg, ApiResponse):
            raise TypeError(f"expected api/response, got {msg!r}")
        return msg

    async def wait_eof(self, timeout: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else self.timeout)
        while not self.eof:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("no EOF")
            await self._read_more(remaining)

    def events(self, name: str | None = None) -> list[Event]:
        return [m for m in self.messages if isinstance(m, Event) and (name is None or m.name == name)]

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            self.writer.close()

    @property
    def done(self) -> bool:
        """EOF seen or closed by us."""
        return self.eof or self.closed


class AppServer:
    """A listening outbound-socket application: runs ``handler(peer)`` per connection."""

    def __init__(self, handler: Callable[[EslPeer], Awaitable[None]], *, timeout: float = 5.0) -> None:
        self.handler = handler
        self.timeout = timeout
        self.peers: list[EslPeer] = []
        self.errors: list[BaseException] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, host: str = "127.0.0.1") -> int:
        self._server = await asyncio.start_server(self._accept, host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = EslPeer(reader, writer, timeout=self.timeout, outbound=True)
        self.peers.append(peer)
        try:
            await self.handler(peer)
        except Exception as exc:  # noqa: BLE001 - surfaced to the test through .errors
            self.errors.append(exc)
        finally:
            peer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
