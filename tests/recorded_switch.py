"""A FreeSWITCH peer that answers with the bytes a real FreeSWITCH sent in a recorded session.

It dials the application like the ``socket`` dialplan app, reads the application's
commands with the FreeSWITCH-side decoder and, for each one, sends the frames the
recording shows FreeSWITCH sending after that command. Event-UUIDs the application
chooses are substituted for the recorded ones, so ``execute`` correlation works on
real bytes. Commands the application skips are skipped in the replay too (their
replies are dropped, their events still sent, as FreeSWITCH would send them anyway).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from dataclasses import dataclass, field

from fs_app.esl import (
    Api,
    Auth,
    BgApi,
    Command,
    CommandDecoder,
    EventSubscribe,
    Execute,
    Exit,
    Filter,
    HangupCmd,
)
from tests.conftest import transcript_dir, transcript_stream

_CONTENT_LENGTH = re.compile(rb"^Content-Length: (\d+)$", re.MULTILINE)


def split_frames(stream: bytes) -> list[bytes]:
    """Cut a FreeSWITCH -> app byte stream into whole frames (header block + body)."""
    frames = []
    pos = 0
    while pos < len(stream):
        end = stream.index(b"\n\n", pos) + 2
        header = stream[pos:end]
        match = _CONTENT_LENGTH.search(header) if not header.startswith(b"Event-Name: ") else None
        end += int(match.group(1)) if match else 0
        frames.append(stream[pos:end])
        pos = end
    return frames


def _kind(cmd: Command) -> str:
    if isinstance(cmd, Execute):
        return f"execute:{cmd.app}"
    if isinstance(cmd, HangupCmd):
        return "hangup"
    return type(cmd).__name__


@dataclass
class _Step:
    command: Command
    frames: list[bytes]


@dataclass
class ReplayResult:
    commands: list[Command] = field(default_factory=list)
    closed_by_app: bool = False


def load_session(name: str, conn: str) -> tuple[list[bytes], list[_Step]]:
    """The frames FreeSWITCH sent before any command, and each command with what followed it."""
    records = [json.loads(line) for line in (transcript_dir() / f"{name}.jsonl").read_text().splitlines()]
    greeting: list[bytes] = []
    steps: list[_Step] = []
    decoder = CommandDecoder()
    pending_fs = b""
    for rec in records:
        if rec["conn"] != conn:
            continue
        data = base64.b64decode(rec["b64"])
        if rec["dir"] == "app>fs":
            (steps[-1].frames if steps else greeting).extend(split_frames(pending_fs))
            pending_fs = b""
            for cmd in decoder.feed(data):
                steps.append(_Step(cmd, []))
        else:
            pending_fs += data
    (steps[-1].frames if steps else greeting).extend(split_frames(pending_fs))
    assert transcript_stream(name, conn)  # the recording exists and has FS bytes
    return greeting, steps


def load_steps(name: str, conn: str = "outbound") -> list[_Step]:
    """Pair each recorded app command with the frames FreeSWITCH sent until the next command."""
    return load_session(name, conn)[1]


def _is_reply(frame: bytes) -> bool:
    return frame.startswith((b"Content-Type: command/reply", b"Content-Type: api/response", b"Event-Name: "))


async def replay_call(name: str, host: str, port: int, *, timeout: float = 5.0) -> ReplayResult:
    """Dial the app at host:port and play the recorded FreeSWITCH side of ``name``."""
    steps = load_steps(name)
    uuid_map: dict[bytes, bytes] = {}
    result = ReplayResult()
    reader, writer = await asyncio.open_connection(host, port)
    decoder = CommandDecoder()
    try:
        async with asyncio.timeout(timeout):
            while steps:
                data = await reader.read(65536)
                if not data:
                    result.closed_by_app = True
                    break
                for cmd in decoder.feed(data):
                    result.commands.append(cmd)
                    if isinstance(cmd, Filter) and not any(isinstance(s.command, Filter) for s in steps):
                        # The recording's app did not filter; answer as mod_event_socket does.
                        writer.write(f"Content-Type: command/reply\nReply-Text: +OK filter added. "
                                     f"[{cmd.header}]=[{cmd.value}]\n\n".encode())
                        continue
                    while steps and _kind(steps[0].command) != _kind(cmd):
                        skipped = steps.pop(0)
                        frames = [f for f in skipped.frames if not _is_reply(f)]
                        writer.write(_substitute(b"".join(frames), uuid_map))
                    if not steps:
                        break
                    step = steps.pop(0)
                    if isinstance(cmd, Execute) and isinstance(step.command, Execute):
                        uuid_map[step.command.event_uuid.encode()] = cmd.event_uuid.encode()
                    writer.write(_substitute(b"".join(step.frames), uuid_map))
                    await writer.drain()
                    if isinstance(cmd, Exit):
                        steps.clear()  # FreeSWITCH closes after "+OK bye" and the notice
    finally:
        writer.close()
    return result


def _substitute(data: bytes, uuid_map: dict[bytes, bytes]) -> bytes:
    """Put our Event-UUIDs in place of the recorded ones, fixing each frame's Content-Length."""
    if not uuid_map or not data:
        return data
    out = []
    for frame in split_frames(data):
        changed = frame
        for old, new in uuid_map.items():
            changed = changed.replace(old, new)
        if changed != frame and len(changed) != len(frame):
            head, sep, body = changed.partition(b"\n\n")
            head = _CONTENT_LENGTH.sub(b"Content-Length: %d" % len(body), head, count=1)
            changed = head + sep + body
        out.append(changed)
    return b"".join(out)


def _inbound_key(cmd: Command) -> tuple[str, str] | None:
    if isinstance(cmd, Auth):
        return ("auth", "ok" if cmd.password == "ClueCon" else "bad")
    if isinstance(cmd, Api):
        return ("api", cmd.command)
    if isinstance(cmd, BgApi):
        return ("bgapi", cmd.command)
    if isinstance(cmd, EventSubscribe):
        return ("event", cmd.format)
    if isinstance(cmd, Exit):
        return ("exit", "")
    return None


class RecordedInboundSwitch:
    """An inbound-socket FreeSWITCH (port 8021 side) answering with recorded frames.

    Replies are looked up by command (``api status``, ``bgapi status``, ``auth``...)
    from the named recordings; a bgapi's recorded Job-UUID is replaced by ours.
    """

    def __init__(self, *sessions: str) -> None:
        self.replies: dict[tuple[str, str], tuple[list[bytes], Command]] = {}
        self.greeting: list[bytes] = []
        for name in sessions:
            greeting, steps = load_session(name, "inbound")
            self.greeting = self.greeting or greeting
            for step in steps:
                key = _inbound_key(step.command)
                if key is not None and key not in self.replies:
                    self.replies[key] = (step.frames, step.command)
        self.commands: list[Command] = []
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0
        self.mute = False  # when set, commands get no answer (a stalled node)

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port or self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def close(self) -> None:
        await self.stop_listening()
        self.drop_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        decoder = CommandDecoder()
        try:
            writer.write(b"".join(self.greeting))
            while data := await reader.read(65536):
                for cmd in decoder.feed(data):
                    self.commands.append(cmd)
                    if self.mute:
                        continue
                    key = _inbound_key(cmd)
                    frames, recorded = self.replies.get(key, ([], cmd)) if key else ([], cmd)
                    out = b"".join(frames)
                    if isinstance(cmd, BgApi) and isinstance(recorded, BgApi):
                        old_jobs = set(re.findall(rb"Job-UUID: ([0-9a-f-]{36})", out))
                        for old in old_jobs:
                            out = out.replace(old, cmd.job_uuid.encode())
                    if not out:
                        out = b"Content-Type: command/reply\nReply-Text: -ERR command not found\n\n"
                    writer.write(out)
                    if key in (("exit", ""), ("auth", "bad")):
                        await writer.drain()
                        writer.close()
                        return
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
