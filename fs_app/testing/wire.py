"""FreeSWITCH-side Event Socket framing: the exact bytes mod_event_socket writes.

Every function returns the bytes of one ``send()`` FreeSWITCH makes, or a
``(header, body)`` pair where FreeSWITCH makes two sends (events, api responses,
disconnect notices, log lines, the ACL rejection). Layouts are taken from
mod_event_socket.c and checked against the 1.10.12 recordings: events put
``Content-Length`` *before* ``Content-Type``; api/response and log/data put it after.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from fs_app.esl import url_encode

DISCONNECT_BODY = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
LOST_EVENTS_BODY = b"killed listener because of lost events\n"
SHUTDOWN_BODY = b"The system is being shut down.\n"
RUDE_REJECTION_BODY = b"Access Denied, go away.\n"

AUTH_REQUEST = b"Content-Type: auth/request\n\n"
DEFAULT_PASSWORD = "ClueCon"  # noqa: S105 - event_socket.conf's documented default, not a secret
NO_API_REPLY = b"-ERR no reply\n"

EventFormat = str  # "plain" | "json" | "xml"

_EVENT_CONTENT_TYPE = {
    "plain": "text/event-plain",
    "json": "text/event-json",
    "xml": "text/event-xml",
}


def command_reply(text: str) -> bytes:
    """``command/reply`` with a raw (not URL-encoded) ``Reply-Text``."""
    return f"Content-Type: command/reply\nReply-Text: {text}\n\n".encode()


def bgapi_reply(job_uuid: str) -> bytes:
    """The bgapi acknowledgement: Reply-Text plus a separate ``Job-UUID`` header."""
    return (
        f"Content-Type: command/reply\nReply-Text: +OK Job-UUID: {job_uuid}\nJob-UUID: {job_uuid}\n\n"
    ).encode()


def api_response(body: bytes) -> tuple[bytes, bytes]:
    """``api/response`` header and body; an empty result becomes ``-ERR no reply``."""
    if not body:
        body = NO_API_REPLY
    return f"Content-Type: api/response\nContent-Length: {len(body)}\n\n".encode(), body


EVENT_HEADERS = {fmt: f"Content-Length: %d\nContent-Type: {ctype}\n\n".encode() for fmt, ctype in _EVENT_CONTENT_TYPE.items()}


def event_header(length: int, fmt: EventFormat) -> bytes:
    """The outer frame of an event: Content-Length first, then Content-Type."""
    return f"Content-Length: {length}\nContent-Type: {_EVENT_CONTENT_TYPE[fmt]}\n\n".encode()


def disconnect_notice(session_uuid: str | None, body: bytes = DISCONNECT_BODY) -> tuple[bytes, bytes]:
    """``text/disconnect-notice``; session sockets add Controlled-Session-UUID/Content-Disposition."""
    if session_uuid is not None:
        head = (
            "Content-Type: text/disconnect-notice\n"
            f"Controlled-Session-UUID: {session_uuid}\n"
            "Content-Disposition: disconnect\n"
            f"Content-Length: {len(body)}\n\n"
        )
    else:
        head = f"Content-Type: text/disconnect-notice\nContent-Length: {len(body)}\n\n"
    return head.encode(), body


def linger_notice(session_uuid: str, channel_name: str, linger_time: int) -> bytes:
    """The linger notice; ``Channel-Name`` travels raw here (not URL-encoded)."""
    return (
        "Content-Type: text/disconnect-notice\n"
        f"Controlled-Session-UUID: {session_uuid}\n"
        "Content-Disposition: linger\n"
        f"Channel-Name: {channel_name}\n"
        f"Linger-Time: {linger_time}\n"
        "Content-Length: 0\n\n"
    ).encode()


def rude_rejection() -> tuple[bytes, bytes]:
    body = RUDE_REJECTION_BODY
    return f"Content-Type: text/rude-rejection\nContent-Length: {len(body)}\n\n".encode(), body


def log_data(
    body: bytes, *, level: int, text_channel: int, file: str, func: str, line: int, user_data: str = ""
) -> tuple[bytes, bytes]:
    head = (
        "Content-Type: log/data\n"
        f"Content-Length: {len(body)}\n"
        f"Log-Level: {level}\n"
        f"Text-Channel: {text_channel}\n"
        f"Log-File: {file}\n"
        f"Log-Func: {func}\n"
        f"Log-Line: {line}\n"
        f"User-Data: {user_data}\n\n"
    )
    return head.encode(), body


def connect_reply_trailer(*, async_mode: bool, full: bool) -> str:
    """The last four headers of the outbound ``connect`` reply (Reply-Text is ``+OK\\n`` encoded)."""
    return (
        "Content-Type: command/reply\n"
        "Reply-Text: %2BOK%0A\n"
        f"Socket-Mode: {'async' if async_mode else 'static'}\n"
        f"Control: {'full' if full else 'single-channel'}\n\n"
    )


# ---------------------------------------------------------------------------
# Event bodies (switch_event_serialize / switch_event_serialize_json / xmlize)


_UNSAFE = '\r\n #%&+:;<=>?@[\\]^`{|}"'
_TRANSLATE = {c: f"%{c:02X}" for c in range(0x80) if c < 0x20 or c == 0x7F or chr(c) in _UNSAFE}
_ENCODE_CACHE: dict[str, str] = {}
_ENCODE_CACHE_MAX = 65536


def encode_value(value: str) -> str:
    """``switch_url_encode`` of a header value, byte-identical to :func:`fs_app.esl.url_encode`.

    The common cases (ASCII without ``%``) go through ``str.translate``; results are
    cached because most values repeat from call to call. Anything else is left to the
    codec's reference implementation (``%XX`` pass-through, UTF-8 bytes).
    """
    cached = _ENCODE_CACHE.get(value)
    if cached is not None:
        return cached
    if value.isdigit() and value.isascii():
        return value
    if value and value.isascii() and "%" not in value:
        encoded = value.translate(_TRANSLATE)
    else:
        encoded = url_encode(value)
    if len(_ENCODE_CACHE) >= _ENCODE_CACHE_MAX:
        _ENCODE_CACHE.clear()
    _ENCODE_CACHE[value] = encoded
    return encoded


def plain_line(name: str, value: str) -> str:
    """One serialised ``Name: value`` line with the value URL-encoded as FreeSWITCH does."""
    return f"{name}: {encode_value(value)}\n"


def serialize_plain(headers: Iterable[tuple[str, str]], body: str | None = None) -> str:
    """A ``text/event-plain`` body: encoded headers, blank line, optional inner body."""
    parts = [f"{name}: {encode_value(value)}\n" for name, value in headers]
    if body is not None:
        raw = body.encode()
        parts.append(f"Content-Length: {len(raw)}\n\n")
        parts.append(body)
    else:
        parts.append("\n")
    return "".join(parts)


def _json_value(value: str) -> str | list[str]:
    if value.startswith("ARRAY::"):
        return value[7:].split("|:")
    return value


def serialize_json(headers: Sequence[tuple[str, str]], body: str | None = None) -> str:
    """A ``text/event-json`` body: one compact object, raw values, arrays as lists."""
    obj: dict[str, str | list[str]] = {}
    for name, value in headers:
        if name not in obj:
            obj[name] = _json_value(value)
    if body is not None:
        obj["Content-Length"] = str(len(body.encode()))
        obj["_body"] = body
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def serialize_xml(headers: Sequence[tuple[str, str]], body: str | None = None) -> str:
    """A ``text/event-xml`` body (layout not covered by the recordings; best effort)."""
    lines = ["<event>\n  <headers>\n"]
    for name, value in headers:
        lines.append(f"    <{name}>{encode_value(value)}</{name}>\n")
    lines.append("  </headers>\n")
    if body is not None:
        lines.append(f"  <Content-Length>{len(body.encode())}</Content-Length>\n")
        lines.append(f"  <body>{_xml_escape(body)}</body>\n")
    lines.append("</event>")
    return "".join(lines)
