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
import re
from dataclasses import dataclass, field

from fs_app.esl import Command, CommandDecoder, Execute, Exit, HangupCmd

from tests.conftest import transcript_stream

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


def load_steps(name: str, conn: str = "outbound") -> list[_Step]:
    """Pair each recorded app command with the frames FreeSWITCH sent until the next command."""
    import base64
    import json

    from tests.conftest import transcript_dir

    records = [json.loads(line) for line in (transcript_dir() / f"{name}.jsonl").read_text().splitlines()]
    steps: list[_Step] = []
    decoder = CommandDecoder()
    pending_fs = b""
    for rec in records:
        if rec["conn"] != conn:
            continue
        data = base64.b64decode(rec["b64"])
        if rec["dir"] == "app>fs":
            if steps:
                steps[-1].frames.extend(split_frames(pending_fs))
            pending_fs = b""
            for cmd in decoder.feed(data):
                steps.append(_Step(cmd, []))
        else:
            pending_fs += data
    if steps:
        steps[-1].frames.extend(split_frames(pending_fs))
    assert transcript_stream(name, conn)  # the recording exists and has FS bytes
    return steps


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
