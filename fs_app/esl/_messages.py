"""Typed, immutable messages the codec yields (FreeSWITCH -> application).

One class per ``Content-Type`` FreeSWITCH sends. Raw header dictionaries never
leave the codec: event headers sit behind :class:`EventHeaders`, a read-only
mapping that URL-decodes a value only when it is read and only if it holds ``%``.
"""

from __future__ import annotations

import json
from collections.abc import ItemsView, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar, cast, overload

from fs_app.esl._ints import parse_int
from fs_app.esl._urlcode import url_decode

EventFormat = Literal["plain", "json", "xml"]

_ARRAY_PREFIX = "ARRAY::"
_T = TypeVar("_T")


def _split_array(value: str) -> tuple[str, ...]:
    if value.startswith(_ARRAY_PREFIX):
        return tuple(value[len(_ARRAY_PREFIX) :].split("|:"))
    return (value,)


class EventHeaders(Mapping[str, str]):
    """Read-only view of an event's headers.

    ``headers[name]`` is the first occurrence, decoded; array values read as
    FreeSWITCH serialises them (``ARRAY::a|:b``). :meth:`get_all` splits arrays
    and includes repeated headers.

    A plain event keeps its header block as text: a single lookup is a substring
    search, and the block is split into a dictionary only when the mapping is
    iterated or after a few lookups. A header line is split at its first colon
    and one space after the colon is dropped (``Name: value``); lines without a
    colon are skipped, as libesl skips them. Lookups and the split agree on this.
    """

    __slots__ = ("_block", "_encoded", "_end", "_lookups", "_raw", "_repeats")

    _SPLIT_AFTER_LOOKUPS = 16  # a lookup is a substring search; splitting ~200 headers costs far more

    def __init__(
        self,
        raw: Mapping[str, str | list[str]] | None = None,
        *,
        encoded: bool,
        block: str | None = None,
    ) -> None:
        self._raw = raw
        self._block = block or ""
        self._end = len(self._block)
        self._encoded = encoded
        self._repeats: dict[str, tuple[str, ...]] | None = None
        self._lookups = 0

    @classmethod
    def from_block(cls, block: str) -> EventHeaders:
        """Headers of a plain (URL-encoded) ``Name: value`` block."""
        return cls(None, encoded=True, block=block)

    def _find(self, name: str) -> str | None:
        """First raw value of ``name`` by substring search in the block."""
        block = self._block
        end = self._end
        if block.startswith(name + ":", 0, end):
            start = len(name) + 1
        else:
            found = block.find("\n" + name + ":", 0, end)
            if found < 0:
                return None
            start = found + len(name) + 2
        if ":" in name or "\n" in name:
            return None  # no header line can have this name: lines split at their first colon
        if start < end and block[start] == " ":
            start += 1
        stop = block.find("\n", start, end)
        return block[start:stop] if stop >= 0 else block[start:end]

    def _split(self) -> Mapping[str, str | list[str]]:
        raw = self._raw
        if raw is not None:
            return raw
        block = self._block
        lines = (block if self._end == len(block) else block[: self._end]).split("\n")
        try:
            # Fast path: every line is "Name: value", names unique and colon-free, so
            # splitting at ": " is the same as splitting at the first colon.
            fast: dict[str, str] = dict([line.split(": ", 1) for line in lines])
            if len(fast) == len(lines) and ":" not in "".join(fast):
                self._raw = fast
                return fast
        except ValueError:
            pass  # a line without ": "
        headers: dict[str, str | list[str]] = {}
        repeats: dict[str, list[str]] = {}
        for line in lines:
            name, sep, value = line.partition(":")
            if not sep:
                continue
            if value[:1] == " ":
                value = value[1:]
            if name in headers:
                first = headers[name]
                repeats.setdefault(name, [first if isinstance(first, str) else ""]).append(value)
            else:
                headers[name] = value
        if repeats:
            self._repeats = {k: tuple(v) for k, v in repeats.items()}
        self._raw = headers
        return headers

    def raw(self, name: str) -> str | None:
        """The value exactly as it travelled (still URL-encoded for plain events)."""
        raw = self._raw
        if raw is None:
            self._lookups += 1
            if self._lookups <= self._SPLIT_AFTER_LOOKUPS:
                return self._find(name)
            raw = self._split()
        value = raw.get(name)
        if value is None or isinstance(value, str):
            return value
        return json.dumps(value)

    @overload
    def get(self, name: str, /) -> str | None: ...
    @overload
    def get(self, name: str, /, default: str | _T) -> str | _T: ...

    def get(self, name: str, /, default: str | _T | None = None) -> str | _T | None:
        """``headers[name]`` or ``default``, without raising."""
        raw = self._raw
        if raw is None:
            self._lookups += 1
            if self._lookups <= self._SPLIT_AFTER_LOOKUPS:
                value = self._find(name)
                if value is None:
                    return default
                return url_decode(value) if "%" in value else value
            raw = self._split()
        item = raw.get(name)
        if item is None:
            return default
        if isinstance(item, list):
            return _ARRAY_PREFIX + "|:".join(str(v) for v in item)
        if self._encoded and "%" in item:
            return url_decode(item)
        return item

    def __getitem__(self, name: str) -> str:
        raw = self._raw
        if raw is None:
            value = self.get(name)
            if value is None:
                raise KeyError(name)
            return value
        item = raw[name]
        if isinstance(item, list):
            return _ARRAY_PREFIX + "|:".join(str(v) for v in item)
        if self._encoded and "%" in item:
            return url_decode(item)
        return item

    def __iter__(self) -> Iterator[str]:
        return iter(self._split())

    def items(self) -> ItemsView[str, str]:
        """(name, decoded value) pairs in wire order, first occurrence of each name."""
        return _DecodedItems(self)

    def _decoded_items(self) -> list[tuple[str, str]]:
        raw = self._split()
        if not self._encoded:
            return [(k, v if isinstance(v, str) else _ARRAY_PREFIX + "|:".join(map(str, v))) for k, v in raw.items()]
        decode = url_decode
        # Encoded headers (plain, xml) are always strings; only JSON events carry lists.
        return [(k, decode(v) if "%" in v else v) for k, v in cast(Mapping[str, str], raw).items()]

    def __len__(self) -> int:
        return len(self._split())

    def __contains__(self, name: object) -> bool:
        if self._raw is None and isinstance(name, str):
            return self.raw(name) is not None
        return name in self._split()

    def get_all(self, name: str) -> tuple[str, ...]:
        """Every value of ``name``: array items and repeated headers, decoded."""
        raw = self._split()
        if name not in raw:
            return ()
        item = raw[name]
        if isinstance(item, list):
            return tuple(str(v) for v in item)
        occurrences = self._repeats.get(name, (item,)) if self._repeats else (item,)
        values: list[str] = []
        for value in occurrences:
            decoded = url_decode(value) if self._encoded else value
            values.extend(_split_array(decoded))
        return tuple(values)

    def __repr__(self) -> str:
        return f"EventHeaders({len(self)} headers)"


class _DecodedItems(ItemsView[str, str]):
    """``EventHeaders.items()``: decodes all values in one pass instead of one lookup each."""

    __slots__ = ()
    _mapping: EventHeaders

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._mapping._decoded_items())


_new_object = object.__new__


def plain_headers(text: str, end: int) -> EventHeaders:
    """Headers of the URL-encoded block ``text[:end]`` (no copy of the text is made)."""
    headers: EventHeaders = _new_object(EventHeaders)
    headers._raw = None
    headers._block = text
    headers._end = end
    headers._encoded = True
    headers._repeats = None
    headers._lookups = 0
    return headers


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """Inbound socket greeting: FreeSWITCH waits for ``auth``."""


@dataclass(frozen=True, slots=True)
class CommandReply:
    """``command/reply``: the answer to one command (``+OK ...`` / ``-ERR ...``)."""

    reply_text: str
    job_uuid: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.reply_text.startswith("+OK")


@dataclass(frozen=True, slots=True)
class ApiResponse:
    """``api/response``: the output of a blocking ``api`` command."""

    body: str

    @property
    def ok(self) -> bool:
        return not self.body.startswith("-ERR")


@dataclass(frozen=True, slots=True, eq=False)
class Event:
    """One FreeSWITCH event (plain, json or xml on the wire)."""

    name: str
    headers: EventHeaders
    body: str | None = None
    format: EventFormat = "plain"

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)

    @property
    def unique_id(self) -> str | None:
        return self.headers.get("Unique-ID")

    @property
    def application_uuid(self) -> str | None:
        return self.get("Application-UUID")

    @property
    def job_uuid(self) -> str | None:
        return self.get("Job-UUID")

    @property
    def subclass(self) -> str | None:
        return self.get("Event-Subclass")

    @property
    def sequence(self) -> int | None:
        raw = self.get("Event-Sequence")
        return parse_int(raw) if raw is not None else None

    def variable(self, name: str) -> str | None:
        """A channel variable carried as ``variable_<name>``."""
        return self.get("variable_" + name)


@dataclass(frozen=True, slots=True, eq=False)
class ChannelData:
    """Reply to the outbound ``connect``: the call's channel data as a header block."""

    channel: Event
    reply_text: str
    socket_mode: str | None
    control: str | None

    @property
    def unique_id(self) -> str:
        return self.channel.get("Unique-ID") or ""

    @property
    def ok(self) -> bool:
        return self.reply_text.startswith("+OK")


@dataclass(frozen=True, slots=True)
class DisconnectNotice:
    """``text/disconnect-notice``: ``disposition`` is ``linger``, ``disconnect`` or None."""

    disposition: str | None
    body: str = ""
    controlled_session_uuid: str | None = None
    channel_name: str | None = None
    linger_time: int | None = None

    @property
    def is_linger(self) -> bool:
        return self.disposition == "linger"


@dataclass(frozen=True, slots=True)
class RudeRejection:
    """``text/rude-rejection``: the ACL refused us; FreeSWITCH closes next."""

    body: str


@dataclass(frozen=True, slots=True)
class LogData:
    """``log/data``: one log line after ``log <level>``."""

    level: int | None
    body: str
    headers: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A well-framed message of a content type we do not know; kept, not fatal."""

    content_type: str | None
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class MalformedEvent:
    """A well-framed event whose body did not parse; the stream stays usable."""

    content_type: str
    reason: str
    body: bytes = field(repr=False)


_EVENT_SLOTS = tuple(Event.__dict__[f].__set__ for f in ("name", "headers", "body", "format"))


def make_event(name: str, headers: EventHeaders, body: str | None, format: EventFormat) -> Event:
    """``Event(name, headers, body, format)`` without the frozen dataclass's slow ``__init__``."""
    event: Event = _new_object(Event)
    set_name, set_headers, set_body, set_format = _EVENT_SLOTS
    set_name(event, name)
    set_headers(event, headers)
    set_body(event, body)
    set_format(event, format)
    return event


EslMessage = (
    AuthRequest
    | CommandReply
    | ApiResponse
    | Event
    | ChannelData
    | DisconnectNotice
    | RudeRejection
    | LogData
    | UnknownMessage
    | MalformedEvent
)
