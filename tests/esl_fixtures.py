"""Helpers for the ESL codec tests: recorded streams, frame splitting, a canonical form.

Kept out of conftest.py on purpose (the codec tests own it). The recorded sessions are test data in
the repository (``tests/data/esl-transcripts``), so a fresh clone tests against them; ``TRANSCRIPTS`` is
the one place every reader (tests, fuzz corpus, benchmarks) finds them.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fs_app.esl import ChannelData, EslCodec, EslMessage, Event, EventHeaders

TRANSCRIPTS = Path(__file__).resolve().parent / "data" / "esl-transcripts"


@functools.cache
def _recordings() -> dict[str, tuple[tuple[str, str, bytes], ...]]:
    out: dict[str, tuple[tuple[str, str, bytes], ...]] = {}
    for path in sorted(TRANSCRIPTS.glob("*.jsonl")):
        records = []
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            records.append((rec["conn"], rec["dir"], base64.b64decode(rec["b64"])))
        out[path.stem] = tuple(records)
    return out


def scenario_names() -> list[str]:
    """Every recording's name."""
    return sorted(_recordings())


def chunks(name: str, conn: str, direction: str = "fs>app") -> list[bytes]:
    """One connection's reads (or writes) in one direction, exactly as recorded."""
    return [data for c, d, data in _recordings()[name] if c == conn and d == direction and data]


def streams() -> list[tuple[str, str, str]]:
    """(scenario, conn, direction) of every recorded connection stream with data."""
    seen: dict[tuple[str, str, str], None] = {}
    for name, records in _recordings().items():
        for conn, direction, data in records:
            if data:
                seen[(name, conn, direction)] = None
    return list(seen)


def stream(name: str, conn: str, direction: str = "fs>app") -> bytes:
    return b"".join(chunks(name, conn, direction))


def all_fs_streams() -> list[bytes]:
    return [stream(n, c, d) for n, c, d in streams() if d == "fs>app"]


def split_frames(data: bytes) -> list[bytes]:
    """Cut a well-formed FS->app stream into its frames (outer header block + body)."""
    frames: list[bytes] = []
    pos = 0
    while pos < len(data):
        end = data.index(b"\n\n", pos) + 2
        block = data[pos:end]
        length = 0
        if not block.startswith(b"Event-Name: "):  # the connect reply has no Content-Length
            for line in block.split(b"\n"):
                if line.startswith(b"Content-Length: "):
                    length = int(line[16:])
        frames.append(data[pos : end + length])
        pos = end + length
    return frames


def recorded_frames() -> list[bytes]:
    """Every distinct frame of every recorded FS->app stream."""
    seen: dict[bytes, None] = {}
    for data in all_fs_streams():
        for frame in split_frames(data):
            seen[frame] = None
    return list(seen)


def feed_all(data: bytes) -> list[EslMessage]:
    codec = EslCodec()
    messages = codec.feed(data)
    assert codec.feed_eof(), "stream did not end on a frame boundary"
    return messages


def feed_chunks(pieces: list[bytes]) -> list[EslMessage]:
    codec = EslCodec()
    messages: list[EslMessage] = []
    for piece in pieces:
        messages.extend(codec.feed(piece))
    assert codec.feed_eof(), "stream did not end on a frame boundary"
    return messages


def _canon_value(value: Any) -> Any:
    if isinstance(value, EventHeaders):
        return (tuple(value.items()), tuple((k, value.get_all(k)) for k in value))
    if isinstance(value, Mapping):
        return tuple(value.items())
    if isinstance(value, bytearray):
        return bytes(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return canonical(value)
    return value


def canonical(message: Any) -> tuple[Any, ...]:
    """A comparable form: type, then every field, headers as (name, value) pairs in order."""
    if isinstance(message, Event):
        return ("Event", message.name, message.format, _canon_value(message.headers), message.body)
    if isinstance(message, ChannelData):
        return (
            "ChannelData",
            message.reply_text,
            message.socket_mode,
            message.control,
            canonical(message.channel),
        )
    return (
        type(message).__name__,
        *(_canon_value(getattr(message, f.name)) for f in dataclasses.fields(message)),
    )


def iter_events(messages: list[EslMessage]) -> Iterator[Event]:
    for message in messages:
        if isinstance(message, Event):
            yield message
        elif isinstance(message, ChannelData):
            yield message.channel
