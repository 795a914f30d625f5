"""The fuzzing oracle shared by tests/fs_app/test_esl_fuzz.py and fuzz/esl_codec_fuzz.py (atheris).

For any input and any chunking, both decoders must

* return messages or raise RemoteProtocolError (nothing else, including when every
  part of every message is read, which exercises the lazy header parsing),
* stay poisoned after a framing error, and
* produce the same output as for the unchunked input (messages carried by the
  exception included), with an error in the same place.

No pytest in here: the atheris target runs it outside pytest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from fs_app.esl import (
    ChannelData,
    Command,
    CommandDecoder,
    DisconnectNotice,
    EslCodec,
    Event,
    EventHeaders,
    LocalProtocolError,
    RemoteProtocolError,
    serialise,
)


def _wrap(inner: bytes, ctype: str) -> bytes:
    return b"Content-Length: %d\nContent-Type: %s\n\n" % (len(inner), ctype.encode()) + inner


# Frame kinds the recordings lack (or have few of), for seeding.
SYNTHETIC_FRAMES = [
    b"Content-Type: auth/request\n\n",
    b"Content-Type: command/reply\nReply-Text: +OK Job-UUID: x\nJob-UUID: x\n\n",
    b"Content-Type: api/response\nContent-Length: 4\n\n\xc3\xa9\xe2\x82",
    b"Content-Type: text/rude-rejection\nContent-Length: 24\n\nAccess Denied, go away.\n",
    (
        b"Content-Type: text/disconnect-notice\nControlled-Session-UUID: u\nContent-Disposition: linger\n"
        b"Channel-Name: a@b\nLinger-Time: -1\nContent-Length: 0\n\n"
    ),
    b"Content-Type: log/data\nContent-Length: 3\nLog-Level: 7\nUser-Data: \n\nabc",
    _wrap(b'{"Event-Name":"X","A":["1","2"],"Content-Length":"2","_body":"hi"}', "text/event-json"),
    _wrap(
        b"<event><headers><Event-Name>X</Event-Name><A>%41</A></headers>"
        b"<Content-Length>1</Content-Length><body>b</body></event>",
        "text/event-xml",
    ),
    _wrap(
        b"Event-Name: B\nA: ARRAY%3A%3A1%7C%3A2\nA: 3\nC: %ED%A0%BD\nContent-Length: 3\n\nx\xc3\xa9",
        "text/event-plain",
    ),
    b"Content-Type: text/x-unknown\nContent-Length: 1\n\nz",
]


def _value(value: Any) -> Any:
    if isinstance(value, EventHeaders):
        # What was parsed, in the form it was parsed from: the block text (plain) or the dict.
        return value._block[: value._end] if value._raw is None else tuple(value._raw.items())
    if isinstance(value, Mapping):
        return tuple(value.items())
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    return value


def summary(message: Any) -> tuple[Any, ...]:
    """A cheap comparable form of a freshly decoded message (reads nothing lazily)."""
    if isinstance(message, ChannelData):
        return (
            "ChannelData",
            message.reply_text,
            message.socket_mode,
            message.control,
            summary(message.channel),
        )
    if isinstance(message, Event):
        return ("Event", message.name, message.format, message.body, _value(message.headers))
    return (type(message).__name__, *(_value(getattr(message, f.name)) for f in dataclasses.fields(message)))


def exercise(message: Any) -> None:
    """Read everything a consumer might read: lazy parsing fails here if it fails at all."""
    repr(message)
    if isinstance(message, ChannelData):
        _ = (message.unique_id, message.ok)
        message = message.channel
    if isinstance(message, Event):
        headers = message.headers
        _ = (  # lookups on a not-yet-split block first
            message.unique_id,
            message.job_uuid,
            message.application_uuid,
            message.subclass,
            message.sequence,
            message.variable("x"),
            headers.raw("Event-Name"),
            headers.get("Content-Length"),
            "Unique-ID" in headers,
        )
        items = list(headers.items())
        for name, value in items:
            if headers[name] != value:
                raise AssertionError(f"items() and [] disagree on {name!r}")
            _ = (headers.get_all(name), headers.raw(name))
        _ = (len(headers), repr(headers))
    elif isinstance(message, DisconnectNotice):
        _ = (message.is_linger, message.linger_time)


def decode_messages(
    pieces: Sequence[bytes], *, read_all: bool = True
) -> tuple[list[tuple[Any, ...]], bool, bool]:
    """(summaries, framing error?, clean EOF?) for ``pieces`` fed in order.

    With ``read_all`` every message is also read completely (after its summary is taken).
    """
    codec = EslCodec()
    got: list[tuple[Any, ...]] = []

    def take(messages: list[Any]) -> None:
        for message in messages:
            got.append(summary(message))
            if read_all:
                exercise(message)

    for piece in pieces:
        try:
            messages = codec.feed(piece)
        except RemoteProtocolError as exc:
            take(exc.messages)
            try:
                codec.feed(b"Content-Type: auth/request\n\n")
            except RemoteProtocolError:
                pass
            else:
                raise AssertionError("codec accepted input after a framing error") from exc
            if codec.feed_eof():
                raise AssertionError("feed_eof() is true after a framing error") from exc
            return got, True, False
        take(messages)
    return got, False, codec.feed_eof()


def _check_command(command: Command) -> Command:
    repr(command)
    try:
        serialise(command)
    except LocalProtocolError:
        pass  # a decoded command need not be sendable (e.g. an empty api command)
    return command


def decode_commands(pieces: Sequence[bytes]) -> tuple[list[Command], bool]:
    decoder = CommandDecoder()
    got: list[Command] = []
    for piece in pieces:
        try:
            commands = decoder.feed(piece)
        except RemoteProtocolError as exc:
            got.extend(_check_command(c) for c in exc.messages)
            return got, True
        got.extend(_check_command(c) for c in commands)
    return got, False


def cut(data: bytes, sizes: Sequence[int]) -> list[bytes]:
    """``data`` in pieces of the given sizes, cycled (1-byte pieces for ``[1]``)."""
    if not sizes:
        return [data]
    pieces, pos, i = [], 0, 0
    while pos < len(data):
        step = max(1, sizes[i % len(sizes)])
        pieces.append(data[pos : pos + step])
        pos += step
        i += 1
    return pieces


def check(data: bytes, sizes: Sequence[int]) -> None:
    """The whole oracle for one input: both decoders, whole versus chunked."""
    pieces = cut(data, sizes)
    whole = decode_messages([data])
    chunked = decode_messages(pieces, read_all=False)  # same parser code; comparing is enough
    if whole != chunked:
        raise AssertionError(f"codec output depends on chunking {list(sizes)[:8]}")
    commands_whole = decode_commands([data])
    commands_chunked = decode_commands(pieces)
    if commands_whole != commands_chunked:
        raise AssertionError(f"command decoder output depends on chunking {list(sizes)[:8]}")
