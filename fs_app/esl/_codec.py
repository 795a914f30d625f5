"""Sans-I/O decoder for the FreeSWITCH -> application direction.

Feed it bytes as they arrive, in chunks of any size; it returns every complete
message they finish. It never touches a socket, never blocks and keeps no clock.
Framing errors (a bad ``Content-Length``, an oversized frame) raise
:class:`RemoteProtocolError` and poison the codec, because the byte stream can no
longer be trusted (the messages that ``feed()`` call completed before the bad frame
ride on the exception as ``messages``). An event whose body does not parse is
returned as :class:`MalformedEvent` so one odd event never costs the call. The
output does not depend on how the bytes are chunked.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping

from fs_app.esl._errors import RemoteProtocolError
from fs_app.esl._ints import parse_int
from fs_app.esl._messages import (
    ApiResponse,
    AuthRequest,
    ChannelData,
    CommandReply,
    DisconnectNotice,
    EslMessage,
    Event,
    EventHeaders,
    LogData,
    MalformedEvent,
    RudeRejection,
    UnknownMessage,
    make_event,
    plain_headers,
)
from fs_app.esl._urlcode import url_decode

MAX_CONTENT_LENGTH = 16 * 1024 * 1024  # FreeSWITCH's own MAX_CONTENT_LENGTH
MAX_HEADER_BLOCK = 16 * 1024 * 1024

_BLANK_LINE = re.compile("\n\n").search  # faster than str.find for a 2-char needle in LF-dense text


def _decode(data: bytes | bytearray) -> str:
    return data.decode("utf-8", "replace")


def parse_header_lines(block: str) -> dict[str, str]:
    """Split a frame's own ``Name: value`` lines (raw values, first occurrence wins)."""
    headers: dict[str, str] = {}
    for line in block.split("\n"):
        name, sep, value = line.partition(": ")
        if not sep:
            name, sep, value = line.partition(":")
            if not sep:
                if not line.strip("\r"):
                    continue
                raise RemoteProtocolError(f"header line without a colon: {line[:80]!r}")
        if name not in headers:
            headers[name] = value.removesuffix("\r")
    return headers


def _blank_line(text: str) -> int:
    match = _BLANK_LINE(text)
    return match.start() if match is not None else -1


def parse_plain_event(data: bytes | bytearray) -> Event | MalformedEvent:
    """Parse a ``text/event-plain`` body: URL-encoded headers, optional inner body."""
    text = data.decode("utf-8", "replace")
    end = _blank_line(text)
    size = len(text)
    if end < 0:
        end = len(text.rstrip("\n"))
    headers = plain_headers(text, end)
    if text.startswith("Event-Name: ", 0, end):
        stop = text.find("\n", 12, end)
        name: str | None = text[12:stop] if stop >= 0 else text[12:end]
    else:
        name = headers._find("Event-Name")
    if name is None:
        return MalformedEvent("text/event-plain", "event without Event-Name", bytes(data))
    body: str | None = None
    if end + 2 < size:
        raw_length = headers._find("Content-Length")
        length = parse_int(raw_length) if raw_length is not None else None
        if length is None:
            return MalformedEvent("text/event-plain", "bytes after the headers without Content-Length", bytes(data))
        raw_body = data[data.find(b"\n\n") + 2 :]
        if len(raw_body) < length:
            return MalformedEvent("text/event-plain", "inner body shorter than its Content-Length", bytes(data))
        body = raw_body[:length].decode("utf-8", "replace")
    return make_event(url_decode(name) if "%" in name else name, headers, body, "plain")


def parse_json_event(data: bytes | bytearray) -> Event | MalformedEvent:
    """Parse a ``text/event-json`` body: one object, string values, arrays as lists."""
    try:
        obj = json.loads(_decode(data))
    except (ValueError, RecursionError) as exc:
        return MalformedEvent("text/event-json", f"invalid JSON: {exc}", bytes(data))
    if not isinstance(obj, dict):
        return MalformedEvent("text/event-json", "JSON event is not an object", bytes(data))
    for key, value in obj.items():
        if not isinstance(value, str) and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            return MalformedEvent("text/event-json", f"header {key[:60]!r} is not a string", bytes(data))
    body = obj.pop("_body", None)
    name = obj.get("Event-Name")
    if not isinstance(name, str):
        return MalformedEvent("text/event-json", "event without Event-Name", bytes(data))
    return Event(name, EventHeaders(obj, encoded=False), body if isinstance(body, str) else None, "json")


def parse_xml_event(data: bytes | bytearray) -> Event | MalformedEvent:
    """Parse a ``text/event-xml`` body (``<event><headers>..</headers><body>..``)."""
    try:
        root = ET.fromstring(bytes(data))  # noqa: S314 - FreeSWITCH is a trusted loopback peer
    except ET.ParseError as exc:
        return MalformedEvent("text/event-xml", f"invalid XML: {exc}", bytes(data))
    headers_el = root.find("headers")
    if headers_el is None:
        return MalformedEvent("text/event-xml", "XML event without <headers>", bytes(data))
    raw = {child.tag: child.text or "" for child in headers_el}
    name = raw.get("Event-Name")
    if name is None:
        return MalformedEvent("text/event-xml", "event without Event-Name", bytes(data))
    body_el = root.find("body")
    body = body_el.text if body_el is not None else None
    return Event(url_decode(name), EventHeaders(raw, encoded=True), body, "xml")


def _disconnect_notice(headers: Mapping[str, str], body: bytes) -> DisconnectNotice:
    linger = headers.get("Linger-Time")
    linger_time = parse_int(linger, signed=True) if linger is not None else None
    return DisconnectNotice(
        disposition=headers.get("Content-Disposition"),
        body=_decode(body),
        controlled_session_uuid=headers.get("Controlled-Session-UUID"),
        channel_name=headers.get("Channel-Name"),
        linger_time=linger_time,
    )


def _channel_data(block: str) -> ChannelData:
    headers = EventHeaders.from_block(block)
    channel = Event("CHANNEL_DATA", headers, None, "plain")
    return ChannelData(
        channel=channel,
        reply_text=headers.get("Reply-Text", ""),
        socket_mode=headers.get("Socket-Mode"),
        control=headers.get("Control"),
    )


_BLANK = b"\r\n"
_PLAIN_TYPE = b"\nContent-Type: text/event-plain\n\n"
_PLAIN_TYPE_LEN = len(_PLAIN_TYPE)
_EVENT_FRAME_PREFIX = "Content-Length: "


class EslCodec:
    """Incremental FreeSWITCH -> application decoder.

    ``feed(data)`` returns the complete messages ``data`` finishes, in order.
    ``feed_eof()`` reports whether the stream ended cleanly between frames.
    """

    __slots__ = ("_buf", "_error", "_max_content", "_max_header", "_pending", "_scan")

    def __init__(
        self, *, max_content_length: int = MAX_CONTENT_LENGTH, max_header_block: int = MAX_HEADER_BLOCK
    ) -> None:
        self._buf = bytearray()
        self._scan = 0
        self._pending: tuple[str, dict[str, str] | None, int] | None = None
        self._max_content = max_content_length
        self._max_header = max_header_block
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete message."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[EslMessage]:
        if self._error is not None:
            raise RemoteProtocolError("codec is unusable after an earlier framing error") from self._error
        buf = self._buf
        buf += data
        out: list[EslMessage] = []
        append = out.append
        size = len(buf)
        pos = 0
        pending = self._pending
        try:
            while True:
                if pending is None:
                    if buf.startswith(b"Content-Length: ", pos):
                        # Fast path for the common frame, an event-plain one. It accepts exactly
                        # b"Content-Length: <digits>\nContent-Type: text/event-plain\n\n" and
                        # leaves anything else to the general path below.
                        nl = buf.find(b"\n", pos + 16, pos + 64)
                        if nl > 0 and buf.startswith(_PLAIN_TYPE, nl):
                            digits = buf[pos + 16 : nl]
                            if digits.isdigit():  # ASCII digits only, for bytes
                                length = int(digits)
                                if length > self._max_content:
                                    raise RemoteProtocolError(
                                        f"Content-Length {length} exceeds {self._max_content}"
                                    )
                                pos = nl + _PLAIN_TYPE_LEN
                                if size - pos < length:
                                    pending = ("text/event-plain", None, length)
                                    break
                                append(parse_plain_event(buf[pos : pos + length]))
                                pos += length
                                continue
                    while pos < size and buf[pos] in _BLANK:
                        pos += 1  # stray blank lines between frames
                    end = buf.find(b"\n\n", max(pos, self._scan))
                    if end < 0:
                        if size - pos > self._max_header:
                            raise RemoteProtocolError(
                                f"header block exceeds {self._max_header} bytes without a blank line"
                            )
                        self._scan = max(pos, size - 1)
                        break
                    block = buf[pos:end].decode("utf-8", "replace")
                    pos = end + 2
                    if block.startswith(_EVENT_FRAME_PREFIX):
                        # The common case: "Content-Length: N\nContent-Type: text/event-*".
                        length_raw, sep, ctype = block[16:].partition("\nContent-Type: ")
                        headers: dict[str, str] | None = None
                        if not sep or "\n" in ctype:
                            headers = parse_header_lines(block)
                            length_raw = headers["Content-Length"]
                            ctype = headers.get("Content-Type", "")
                    elif block.startswith("Event-Name: "):
                        append(_channel_data(block))
                        continue
                    else:
                        headers = parse_header_lines(block)
                        ctype = headers.get("Content-Type", "")
                        if "Content-Length" not in headers:
                            append(self._message(headers, b"", ctype))
                            continue
                        length_raw = headers["Content-Length"]
                    parsed = parse_int(length_raw.strip())
                    if parsed is None:
                        raise RemoteProtocolError(f"invalid Content-Length {length_raw[:40]!r}")
                    length = parsed
                    if length > self._max_content:
                        raise RemoteProtocolError(f"Content-Length {length} exceeds {self._max_content}")
                    pending = (ctype, headers, length)
                ctype, headers, length = pending
                if size - pos < length:
                    break
                body = buf[pos : pos + length]
                pos += length
                pending = None
                if ctype == "text/event-plain":
                    append(parse_plain_event(body))
                else:
                    append(self._message(headers or {"Content-Type": ctype}, body, ctype))
        except RemoteProtocolError as exc:
            self._error = exc
            exc.messages = out  # what this feed() completed before the bad frame
            raise
        finally:
            self._pending = pending
        if pos:
            del buf[:pos]
            self._scan = self._scan - pos if self._scan > pos else 0
        return out

    def feed_eof(self) -> bool:
        """True if the stream ended on a frame boundary (nothing half-received, no framing error)."""
        return self._error is None and self._pending is None and not self._buf.strip(b"\r\n")

    @staticmethod
    def _message(headers: dict[str, str], body: bytes | bytearray, ctype: str) -> EslMessage:
        if ctype == "command/reply":
            return CommandReply(headers.get("Reply-Text", ""), headers.get("Job-UUID"), headers)
        if ctype == "api/response":
            return ApiResponse(_decode(body))
        if ctype == "text/event-json":
            return parse_json_event(body)
        if ctype == "text/disconnect-notice":
            return _disconnect_notice(headers, bytes(body))
        if ctype == "auth/request":
            return AuthRequest()
        if ctype == "log/data":
            level = headers.get("Log-Level", "")
            return LogData(parse_int(level), _decode(body), headers)
        if ctype == "text/event-xml":
            return parse_xml_event(body)
        if ctype == "text/rude-rejection":
            return RudeRejection(_decode(body))
        return UnknownMessage(headers.get("Content-Type"), headers, bytes(body))
