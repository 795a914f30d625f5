"""Commands the application sends to FreeSWITCH, and their exact wire form.

Each command is a frozen dataclass; :func:`serialise` turns it into bytes and
:class:`CommandDecoder` (the FreeSWITCH side, used by the emulator) turns bytes back
into the same dataclass, so ``decode(serialise(cmd)) == cmd`` holds for every one.
Any CR or LF inside a command line or header value is refused: it would let a value
smuggle a second command into the stream (ESL injection).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

from fs_app.esl._errors import EslInjectionError, LocalProtocolError, RemoteProtocolError
from fs_app.esl._ints import parse_int

# Application arguments longer than this travel in a body, never in a header.
ARG_IN_BODY_THRESHOLD = 1024
MAX_COMMAND_BODY = 16 * 1024 * 1024
MAX_COMMAND_HEADER_BLOCK = 10 * 1024 * 1024

# FreeSWITCH ends a block at two LFs with only CRs between them; we allow at most one CR
# there (LF LF, CR LF CR LF, LF CR LF), which keeps resuming a search after a partial read O(1).
_BLOCK_END = re.compile(rb"\n\r?\n").search


def _check(value: str, what: str) -> str:
    if "\n" in value or "\r" in value:
        raise EslInjectionError(f"{what} contains CR or LF: {value[:60]!r}")
    return value


def new_uuid() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class Connect:
    """Outbound: first command; FreeSWITCH answers with the channel data."""


@dataclass(frozen=True, slots=True)
class Auth:
    password: str


@dataclass(frozen=True, slots=True)
class MyEvents:
    """Subscribe to this session's events (``uuid`` for inbound ``myevents <uuid>``)."""

    format: str | None = None
    uuid: str | None = None


@dataclass(frozen=True, slots=True)
class Linger:
    """Keep the socket after hangup; ``seconds=None`` waits for our ``exit``."""

    seconds: int | None = None


@dataclass(frozen=True, slots=True)
class NoLinger:
    pass


@dataclass(frozen=True, slots=True)
class EventSubscribe:
    format: str = "plain"
    names: tuple[str, ...] = ("ALL",)


@dataclass(frozen=True, slots=True)
class NoEvents:
    pass


@dataclass(frozen=True, slots=True)
class Filter:
    header: str
    value: str


@dataclass(frozen=True, slots=True)
class FilterDelete:
    header: str
    value: str | None = None


@dataclass(frozen=True, slots=True)
class Execute:
    """``sendmsg`` execute: run one dialplan application on the channel."""

    app: str
    arg: str | None = None
    uuid: str | None = None
    event_uuid: str = field(default_factory=new_uuid)
    event_lock: bool = True
    loops: int | None = None


@dataclass(frozen=True, slots=True)
class HangupCmd:
    """``sendmsg`` hangup with a Q.850 cause name."""

    cause: str = "NORMAL_CLEARING"
    uuid: str | None = None


@dataclass(frozen=True, slots=True)
class Api:
    """Blocking api command: FreeSWITCH runs it in the listener thread."""

    command: str


@dataclass(frozen=True, slots=True)
class BgApi:
    """Background api; the result arrives as BACKGROUND_JOB with our ``job_uuid``."""

    command: str
    job_uuid: str = field(default_factory=new_uuid)


@dataclass(frozen=True, slots=True)
class GetVar:
    name: str


@dataclass(frozen=True, slots=True)
class Resume:
    pass


@dataclass(frozen=True, slots=True)
class Exit:
    pass


@dataclass(frozen=True, slots=True)
class Log:
    level: str


@dataclass(frozen=True, slots=True)
class NoLog:
    pass


@dataclass(frozen=True, slots=True)
class DivertEvents:
    on: bool = True


@dataclass(frozen=True, slots=True)
class NixEvent:
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SendEvent:
    name: str
    headers: tuple[tuple[str, str], ...] = ()
    body: str | None = None


@dataclass(frozen=True, slots=True)
class RawCommand:
    """Any command line we do not model, as FreeSWITCH would read it."""

    line: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None


Command = (
    Connect
    | Auth
    | MyEvents
    | Linger
    | NoLinger
    | EventSubscribe
    | NoEvents
    | Filter
    | FilterDelete
    | Execute
    | HangupCmd
    | Api
    | BgApi
    | GetVar
    | Resume
    | Exit
    | Log
    | NoLog
    | DivertEvents
    | NixEvent
    | SendEvent
    | RawCommand
)


def _frame(line: str, headers: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (), body: bytes | None = None) -> bytes:
    _check(line, "command line")
    parts = [line]
    for name, value in headers:
        if ":" in name:
            raise LocalProtocolError(f"header name contains a colon: {name!r}")
        if name.strip(" ").lower() == "content-length":
            # Our own Content-Length frames the body; a second one would let a caller
            # make FreeSWITCH read the next command as a body (command smuggling).
            raise EslInjectionError("Content-Length is set by the serialiser, not by callers")
        parts.append(f"{_check(name, 'header name')}: {_check(value, f'header {name}')}")
    if body is not None:
        parts.append(f"Content-Length: {len(body)}")
        return ("\n".join(parts) + "\n\n").encode() + body
    return ("\n".join(parts) + "\n\n").encode()


def _single_line(arg: str, what: str) -> str:
    _check(arg, what)  # CR/LF anywhere is injection, even where strip() would remove it
    if not arg or arg != arg.strip():
        raise LocalProtocolError(f"{what} must be non-empty without surrounding spaces: {arg!r}")
    return arg


def _names(names: tuple[str, ...]) -> str:
    for name in names:
        if not name or " " in name:
            raise LocalProtocolError(f"event name must be one word: {name!r}")
    return " ".join(names)


def serialise(cmd: Command) -> bytes:
    """The exact bytes for ``cmd``; raises :class:`LocalProtocolError` if it is illegal."""
    match cmd:
        case Execute(app=app, arg=arg, uuid=u, event_uuid=eu, event_lock=lock, loops=loops):
            headers = [("call-command", "execute"), ("execute-app-name", _single_line(app, "application"))]
            body: bytes | None = None
            if arg is not None:
                # FreeSWITCH strips leading spaces from header values: such args travel in the body.
                if len(arg) > ARG_IN_BODY_THRESHOLD or "\n" in arg or "\r" in arg or arg[:1] == " ":
                    body = arg.encode()
                else:
                    headers.append(("execute-app-arg", arg))
            if loops is not None:
                headers.append(("loops", str(loops)))
            if lock:
                headers.append(("event-lock", "true"))
            if eu:  # empty: let FreeSWITCH generate one (what a decoded command without it means)
                headers.append(("Event-UUID", eu))
            if body is not None:
                headers.append(("content-type", "text/plain"))
            return _frame(f"sendmsg {_single_line(u, 'uuid')}" if u else "sendmsg", headers, body)
        case HangupCmd(cause=cause, uuid=u):
            return _frame(
                f"sendmsg {_single_line(u, 'uuid')}" if u else "sendmsg",
                [("call-command", "hangup"), ("hangup-cause", _single_line(cause, "hangup cause"))],
            )
        case Connect():
            return b"connect\n\n"
        case Auth(password=pw):
            return _frame(f"auth {_single_line(pw, 'password')}")
        case MyEvents(format=fmt, uuid=u):
            words = ["myevents"]
            if u:
                words.append(_single_line(u, "uuid"))
            if fmt:
                words.append(_single_line(fmt, "format"))
            return _frame(" ".join(words))
        case Linger(seconds=s):
            return b"linger\n\n" if s is None else _frame(f"linger {int(s)}")
        case NoLinger():
            return b"nolinger\n\n"
        case EventSubscribe(format=fmt, names=names):
            return _frame(f"event {_single_line(fmt, 'format')} {_names(names)}")
        case NoEvents():
            return b"noevents\n\n"
        case Filter(header=h, value=v):
            return _frame(f"filter {_single_line(h, 'filter header')} {_single_line(v, 'filter value')}")
        case FilterDelete(header=h, value=v):
            line = f"filter delete {_single_line(h, 'filter header')}"
            return _frame(line + (f" {_single_line(v, 'filter value')}" if v is not None else ""))
        case Api(command=c):
            return _frame(f"api {_single_line(c, 'api command')}")
        case BgApi(command=c, job_uuid=j):
            # An empty job_uuid (a decoded bgapi that had none) sends none: FreeSWITCH makes one up.
            job = [("Job-UUID", _single_line(j, "Job-UUID"))] if j else []
            return _frame(f"bgapi {_single_line(c, 'api command')}", job)
        case GetVar(name=n):
            return _frame(f"getvar {_single_line(n, 'variable')}")
        case Resume():
            return b"resume\n\n"
        case Exit():
            return b"exit\n\n"
        case Log(level=lvl):
            return _frame(f"log {_single_line(lvl, 'log level')}")
        case NoLog():
            return b"nolog\n\n"
        case DivertEvents(on=on):
            return b"divert_events on\n\n" if on else b"divert_events off\n\n"
        case NixEvent(names=names):
            return _frame(f"nixevent {_names(names)}")
        case SendEvent(name=n, headers=h, body=b):
            return _frame(f"sendevent {_single_line(n, 'event name')}", h, b.encode() if b is not None else None)
        case RawCommand(line=line, headers=h, body=b):
            return _frame(line, h, b)
    raise LocalProtocolError(f"not a command: {cmd!r}")


# ---------------------------------------------------------------------------
# FreeSWITCH side: bytes -> commands (used by the emulator and the tests).


def _header(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    lname = name.lower()
    for key, value in headers:
        if key.lower() == lname:
            return value
    return None


def interpret(line: str, headers: tuple[tuple[str, str], ...], body: bytes | None) -> Command:
    """Map one raw command onto its typed form, as mod_event_socket would read it."""
    word, _, rest = line.partition(" ")
    lword = word.lower()
    if lword == "sendmsg":
        target = rest.strip() or None
        command = (_header(headers, "call-command") or "").lower()
        if command == "execute":
            arg = _header(headers, "execute-app-arg")
            if arg is None and body is not None:
                arg = body.decode("utf-8", "replace")
            loops = _header(headers, "loops")
            return Execute(
                app=_header(headers, "execute-app-name") or "",
                arg=arg,
                uuid=target,
                event_uuid=_header(headers, "Event-UUID") or "",
                event_lock=(_header(headers, "event-lock") or "").lower() == "true",
                loops=parse_int(loops, signed=True) if loops else None,
            )
        if command == "hangup":
            return HangupCmd(cause=_header(headers, "hangup-cause") or "NORMAL_CLEARING", uuid=target)
        return RawCommand(line, headers, body)
    simple: dict[str, Command] = {
        "connect": Connect(),
        "nolinger": NoLinger(),
        "noevents": NoEvents(),
        "resume": Resume(),
        "exit": Exit(),
        "nolog": NoLog(),
    }
    if lword in simple and not rest:
        return simple[lword]
    if lword == "auth" and rest:
        return Auth(rest)
    if lword == "myevents":
        words = rest.split()
        fmt = next((w for w in words if w in ("plain", "json", "xml")), None)
        target = next((w for w in words if w not in ("plain", "json", "xml")), None)
        return MyEvents(fmt, target)
    if lword == "linger":
        if not rest:
            return Linger()
        seconds = parse_int(rest.strip(), signed=True)
        if seconds is not None:
            return Linger(seconds)
    if lword == "event" and rest:
        fmt, _, names = rest.partition(" ")
        if names:
            return EventSubscribe(fmt, tuple(names.split()))
    if lword == "filter" and rest:
        h, _, v = rest.partition(" ")
        if h == "delete":
            dh, _, dv = v.partition(" ")
            return FilterDelete(dh, dv or None)
        if v:
            return Filter(h, v)
    if lword == "api" and rest:
        return Api(rest)
    if lword == "bgapi" and rest:
        return BgApi(rest, _header(headers, "Job-UUID") or "")
    if lword == "getvar" and rest:
        return GetVar(rest)
    if lword == "log" and rest:
        return Log(rest)
    if lword == "divert_events" and rest in ("on", "off"):
        return DivertEvents(rest == "on")
    if lword == "nixevent" and rest:
        return NixEvent(tuple(rest.split()))
    if lword == "sendevent" and rest:
        return SendEvent(rest, headers, body.decode("utf-8", "replace") if body is not None else None)
    return RawCommand(line, headers, body)


class CommandDecoder:
    """FreeSWITCH's reading of the app's byte stream (``read_packet``/``parse_command``).

    Skips leading blank lines; a header block ends at an empty line, where FreeSWITCH
    counts LFs and ignores CRs (we accept ``\\n\\n``, ``\\r\\n\\r\\n`` and ``\\n\\r\\n``);
    strips leading spaces from header values; reads ``Content-Length`` body bytes after
    the blank line (a ``Content-Length: 0`` gives an empty body, no header gives none).
    Work is linear in the bytes fed, however they are chunked.
    """

    __slots__ = ("_buf", "_error", "_pending", "_scan")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scan = 0
        self._pending: tuple[str, tuple[tuple[str, str], ...], int | None] | None = None
        self._error: RemoteProtocolError | None = None

    def feed(self, data: bytes | bytearray) -> list[Command]:
        """The commands ``data`` completes; a framing error poisons the decoder (as in EslCodec)."""
        if self._error is not None:
            raise RemoteProtocolError("decoder is unusable after an earlier framing error") from self._error
        out: list[Command] = []
        try:
            self._feed(data, out)
        except RemoteProtocolError as exc:
            self._error = exc
            exc.messages = out
            raise
        return out

    def _feed(self, data: bytes | bytearray, out: list[Command]) -> None:
        buf = self._buf
        buf += data
        size = len(buf)
        pos = 0
        while True:
            if self._pending is None:
                while pos < size and buf[pos] in b"\r\n":
                    pos += 1
                match = _BLOCK_END(buf, max(pos, self._scan))
                if match is None:
                    if size - pos > MAX_COMMAND_HEADER_BLOCK:
                        raise RemoteProtocolError("command header block too large")
                    self._scan = max(pos, size - 2)  # an end of block may straddle this read
                    break
                lines = buf[pos : match.start()].decode("utf-8", "replace").replace("\r", "").split("\n")
                pos = self._scan = match.end()
                line = lines[0].strip()
                headers: list[tuple[str, str]] = []
                length: int | None = None
                for raw in lines[1:]:
                    name, sep, value = raw.partition(":")
                    if not sep:
                        continue
                    value = value.lstrip(" ")
                    if name.lower() == "content-length":
                        length = parse_int(value)
                        if length is None or length > MAX_COMMAND_BODY:
                            raise RemoteProtocolError(f"invalid command Content-Length {value[:40]!r}")
                        continue
                    headers.append((name, value))
                self._pending = (line, tuple(headers), length)
            line, hdrs, length = self._pending
            body: bytes | None = None
            if length is not None:
                if size - pos < length:
                    break
                body = bytes(buf[pos : pos + length])
                pos += length
            self._pending = None
            out.append(interpret(line, hdrs, body))
        if pos:
            del buf[:pos]
            self._scan = self._scan - pos if self._scan > pos else 0
