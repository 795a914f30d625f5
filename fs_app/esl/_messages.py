"""Typed, immutable messages the codec yields (FreeSWITCH -> application).

One class per ``Content-Type`` FreeSWITCH sends. Raw header dictionaries never
leave the codec: event headers sit behind :class:`EventHeaders`, a read-only
mapping that URL-decodes a value only when it is read and only if it holds ``%``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from fs_app.esl._urlcode import url_decode

EventFormat = Literal["plain", "json", "xml"]

_ARRAY_PREFIX = "ARRAY::"


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
    iterated or after a few lookups. Lines without ``": "`` are skipped, as libesl
    skips them.
    """

    __slots__ = ("_block", "_encoded", "_lookups", "_raw", "_repeats")

    _SPLIT_AFTER_LOOKUPS = 6

    def __init__(
        self,
        raw: Mapping[str, str | list[str]] | None = None,
        *,
        encoded: bool,
        block: str | None = None,
    ) -> None:
        self._raw = raw
        self._block = block
        self._encoded = encoded
        self._repeats: dict[str, tuple[str, ...]] | None = None
        self._lookups = 0

    @classmethod
    def from_block(cls, block: str) -> EventHeaders:
        """Headers of a plain (URL-encoded) ``Name: value`` block."""
        return cls(None, encoded=True, block=block)

    def _split(self) -> Mapping[str, str | list[str]]:
        raw = self._raw
        if raw is None:
            headers: dict[str, str | list[str]] = {}
            repeats: dict[str, list[str]] = {}
            for line in (self._block or "").split("\n"):
                name, sep, value = line.partition(": ")
                if not sep:
                    name, sep, value = line.partition(":")
                    if not sep:
                        continue
                if name in headers:
                    first = headers[name]
                    repeats.setdefault(name, [first if isinstance(first, str) else ""]).append(value)
                else:
                    headers[name] = value
            if repeats:
                self._repeats = {k: tuple(v) for k, v in repeats.items()}
            self._raw = raw = headers
        return raw

    def raw(self, name: str) -> str | None:
        """The value exactly as it travelled (still URL-encoded for plain events)."""
        raw = self._raw
        if raw is None:
            self._lookups += 1
            if self._lookups <= self._SPLIT_AFTER_LOOKUPS:
                block = self._block or ""
                if block.startswith(name) and block.startswith(": ", len(name)):
                    start = len(name) + 2
                else:
                    found = block.find("\n" + name + ": ")
                    if found < 0:
                        return None
                    start = found + len(name) + 3
                stop = block.find("\n", start)
                return block[start:] if stop < 0 else block[start:stop]
            raw = self._split()
        value = raw.get(name)
        if value is None or isinstance(value, str):
            return value
        return json.dumps(value)

    def __getitem__(self, name: str) -> str:
        raw = self._raw
        if raw is None:
            value = self.raw(name)
            if value is None:
                raise KeyError(name)
            return url_decode(value) if "%" in value else value
        item = raw[name]
        if isinstance(item, list):
            return _ARRAY_PREFIX + "|:".join(str(v) for v in item)
        if self._encoded and "%" in item:
            return url_decode(item)
        return item

    def __iter__(self) -> Iterator[str]:
        return iter(self._split())

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
        try:
            return self.headers[name]
        except KeyError:
            return default

    @property
    def unique_id(self) -> str | None:
        return self.get("Unique-ID")

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
        return int(raw) if raw is not None and raw.isdigit() else None

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
