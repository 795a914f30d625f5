"""Recorded ESL sessions (the ``*.jsonl`` transcripts) and a scripted app that replays one.

A recording is a list of socket reads/writes. :func:`app_script` turns the
application's side of one connection into steps: *after the n-th FreeSWITCH message
with this signature arrived (and the recorded think time), write these bytes*.
:class:`ReplayApp` plays such a script against a live emulator (or FreeSWITCH), on the
:class:`~fs_app.esl.EslSession` IIM's drivers use, and keeps every chunk it reads, so the two ``fs>app`` streams can be compared message by
message: kind, Event-Name, Application, Reply-Text, header order, framing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fs_app.esl import (
    CLOSED,
    NEED_DATA,
    ApiResponse,
    AuthRequest,
    ChannelData,
    Command,
    CommandDecoder,
    CommandReply,
    DisconnectNotice,
    EslCodec,
    EslMessage,
    EslSession,
    Event,
    LogData,
    RemoteProtocolError,
    Role,
    RudeRejection,
    message_of,
)

Signature = tuple[str, ...]

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def normalise(text: str) -> str:
    """Replace uuids (machine specific) so texts from two runs compare equal."""
    return _UUID.sub("<uuid>", text)


@dataclass(frozen=True, slots=True)
class Chunk:
    conn: str
    direction: str  # "fs>app" | "app>fs"
    t: float
    data: bytes


def load_recording(path: str | Path) -> list[Chunk]:
    chunks: list[Chunk] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            chunks.append(Chunk(rec["conn"], rec["dir"], float(rec["t"]), base64.b64decode(rec["b64"])))
    return chunks


def stream(chunks: Iterable[Chunk], conn: str, direction: str) -> bytes:
    return b"".join(c.data for c in chunks if c.conn == conn and c.direction == direction)


def signature(msg: EslMessage) -> Signature:
    """What identifies a message for ordering comparisons."""
    if isinstance(msg, Event):
        return ("event", msg.name, msg.get("Application") or "")
    if isinstance(msg, ChannelData):
        return ("channel-data",)
    if isinstance(msg, CommandReply):
        return ("reply", normalise(msg.reply_text))
    if isinstance(msg, ApiResponse):
        return ("api",)
    if isinstance(msg, DisconnectNotice):
        return ("notice", msg.disposition or "")
    if isinstance(msg, AuthRequest):
        return ("auth-request",)
    if isinstance(msg, LogData):
        return ("log",)
    if isinstance(msg, RudeRejection):
        return ("rude-rejection",)
    return ("other", type(msg).__name__)


def parse_fs_stream(data: bytes) -> list[EslMessage]:
    return EslCodec().feed(data)


@dataclass(slots=True)
class ScriptStep:
    """Write ``data`` once the ``count``-th message with ``after`` arrived (None: at once)."""

    data: bytes
    commands: list[Command]
    after: Signature | None
    count: int
    delay: float
    close: bool = False


def app_script(chunks: Sequence[Chunk], conn: str) -> list[ScriptStep]:
    """The application side of one recorded connection as trigger -> write steps."""
    codec = EslCodec()
    decoder = CommandDecoder()
    seen: dict[Signature, int] = {}
    last: Signature | None = None
    last_t = 0.0
    steps: list[ScriptStep] = []
    for chunk in chunks:
        if chunk.conn != conn:
            continue
        if chunk.direction == "fs>app":
            if not chunk.data:
                continue
            for msg in codec.feed(chunk.data):
                sig = signature(msg)
                seen[sig] = seen.get(sig, 0) + 1
                last = sig
                last_t = chunk.t
            continue
        delay = max(0.0, chunk.t - last_t) if last is not None else 0.0
        count = seen.get(last, 0) if last is not None else 0
        if not chunk.data:
            steps.append(ScriptStep(b"", [], last, count, delay, close=True))
            continue
        steps.append(ScriptStep(chunk.data, decoder.feed(chunk.data), last, count, delay))
    return steps


@dataclass(slots=True)
class ReplayApp:
    """An application that follows a recorded script; keeps everything it receives.

    ``delay_scale`` multiplies the recorded think times; ``max_delay`` caps them.
    """

    steps: list[ScriptStep]
    role: Role | None = None  # None: outbound if the script writes before FreeSWITCH says anything
    delay_scale: float = 0.0
    max_delay: float = 0.05
    step_timeout: float = 10.0
    received: list[bytes] = field(default_factory=list)
    messages: list[EslMessage] = field(default_factory=list)
    eof: bool = False
    error: str | None = None
    _arrived: asyncio.Event | None = None

    def _notify(self) -> asyncio.Event:
        if self._arrived is None:
            self._arrived = asyncio.Event()
        return self._arrived

    async def wait_for(self, predicate: Callable[[Signature], bool], timeout: float = 5.0) -> None:
        """Until a received message's signature satisfies ``predicate``."""
        async with asyncio.timeout(timeout):
            while not any(predicate(signature(m)) for m in self.messages):
                event = self._notify()
                event.clear()
                await event.wait()

    def received_bytes(self) -> bytes:
        return b"".join(self.received)

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        role = self.role or ("outbound" if self.steps and self.steps[0].after is None else "inbound")
        session = EslSession(role)
        seen: dict[Signature, int] = {}
        arrived = asyncio.Event()

        async def read() -> None:
            while not self.eof:
                data = await reader.read(65536)
                if data:
                    self.received.append(data)
                session.receive_data(data)  # b"" is the end of the stream
                try:
                    while (ev := session.next_event()) is not NEED_DATA:
                        if ev is CLOSED:
                            self.eof = True
                            break
                        msg = message_of(ev)
                        self.messages.append(msg)
                        sig = signature(msg)
                        seen[sig] = seen.get(sig, 0) + 1
                except RemoteProtocolError as exc:
                    self.error = f"protocol error: {exc}"
                    self.eof = True
                arrived.set()
                self._notify().set()

        reader_task = asyncio.create_task(read())
        try:
            for step in self.steps:
                if step.after is not None:
                    while seen.get(step.after, 0) < step.count:
                        if self.eof:
                            self.error = self.error or f"EOF while waiting for {step.after} x{step.count}"
                            return
                        arrived.clear()
                        try:
                            await asyncio.wait_for(arrived.wait(), self.step_timeout)
                        except TimeoutError:
                            self.error = f"timeout waiting for {step.after} x{step.count}"
                            return
                delay = min(step.delay * self.delay_scale, self.max_delay)
                if delay > 0:
                    await asyncio.sleep(delay)
                if step.close:
                    writer.close()
                    return
                if not self.eof:  # after FreeSWITCH closed, a write only ends in the void
                    for cmd in step.commands:
                        session.register(cmd)
                writer.write(step.data)
                await writer.drain()
            try:
                await asyncio.wait_for(asyncio.shield(reader_task), self.step_timeout)
            except TimeoutError:
                self.error = "timeout waiting for EOF"
        finally:
            if not writer.is_closing():
                writer.close()
            reader_task.cancel()
