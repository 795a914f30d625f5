"""SIA DC-09 extended data blocks -> what IIM keeps of them (pure; nothing here raises).

A frame may carry, after its data, blocks ``[<id><value>]`` (DC-09 5.5.1.9; the codec hands them over
without brackets). IIM reads the ones that help the people it alerts and the operator who looks back:

- ``X`` longitude and ``Y`` latitude: decimal degrees, a sign or a hemisphere letter (``E``/``W``, ``N``/``S``,
  before or after the number), within -180..180 and -90..90; kept only as a pair;
- ``V`` verification (where the panel's audio or video of the event is): kept only as an ``https`` URL with a
  host name, no user name or password in it, at most :data:`MAX_URL` characters;
- ``H`` time of occurrence (``HH:MM:SS,MM-DD-YYYY``, with or without the timestamp's leading ``_``, UTC);
- ``M`` the panel's MAC address (12 hex digits, ``:`` or ``-`` between pairs allowed);
- ``I`` alarm text (the panel's words, already printable ASCII), trimmed and capped at :data:`MAX_TEXT`.

Every other block (``K`` key exchange, ``P`` programming, ``A`` hash, names of sites and rooms ...) is not kept.
A block of the list above whose value does not read, or that comes a second time, is dropped with a reason
(:attr:`Extended.dropped`); the frame's alarm goes through all the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final
from urllib.parse import urlsplit

__all__ = ["KEPT", "MAX_TEXT", "MAX_URL", "Extended", "read_extended"]

#: The blocks IIM reads (any other one is ignored, not counted as bad).
KEPT: Final = frozenset("XYVHMI")
MAX_URL: Final = 256
MAX_TEXT: Final = 128

_DEGREES = re.compile(r"(?P<pre>[NSEW])? ?(?P<num>[+-]?[0-9]{1,3}(?:\.[0-9]{1,10})?) ?(?P<post>[NSEW])?")
_OCCURRED = re.compile(r"_?([0-9]{2}):([0-9]{2}):([0-9]{2}),([0-9]{2})-([0-9]{2})-([0-9]{4})")
_MAC = re.compile(r"[0-9A-Fa-f]{2}(?:[:-]?[0-9A-Fa-f]{2}){5}")
_HOST = re.compile(r"(?=.{1,253}$)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}")
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#@!$&'()*+,;=%]+")


@dataclass(frozen=True, slots=True)
class Extended:
    """What was kept of a frame's extended data, and what was dropped: ``(block, reason)`` pairs, the block
    ``?`` for a piece that was not a block at all."""

    latitude: float | None = None
    longitude: float | None = None
    verification_url: str | None = None
    occurred_at: datetime | None = None
    mac: str | None = None
    text: str | None = None
    dropped: tuple[tuple[str, str], ...] = ()

    def payload(self) -> dict[str, object]:
        """The event payload's share: only what was kept (never the occurrence time: that is ``occurred_at``)."""
        out: dict[str, object] = {}
        if self.latitude is not None and self.longitude is not None:
            out["location"] = {"lat": self.latitude, "lon": self.longitude}
        if self.verification_url is not None:
            out["verification_url"] = self.verification_url
        if self.mac is not None:
            out["panel_mac"] = self.mac
        if self.text is not None:
            out["alarm_text"] = self.text
        return out


def read_extended(blocks: Sequence[str], malformed: int = 0) -> Extended:
    """The blocks' meaning; ``malformed`` pieces the codec could not read are reported as dropped too."""
    dropped: list[tuple[str, str]] = [("?", "malformed")] * malformed
    values: dict[str, str] = {}
    for block in blocks:
        ident, value = block[:1], block[1:]
        if ident not in KEPT:
            continue
        if ident in values:
            dropped.append((ident, "repeated"))
            continue
        values[ident] = value
    kept: dict[str, object] = {}
    for ident, value in values.items():
        result = _READERS[ident](value)
        if isinstance(result, _Bad):
            dropped.append((ident, result.reason))
        else:
            kept[ident] = result
    longitude, latitude = kept.pop("X", None), kept.pop("Y", None)
    if (longitude is None) != (latitude is None):
        dropped.append(("Y" if latitude is not None else "X", "location-incomplete"))
        longitude = latitude = None
    occurred = kept.get("H")
    return Extended(
        latitude=latitude if isinstance(latitude, float) else None,
        longitude=longitude if isinstance(longitude, float) else None,
        verification_url=_text_or_none(kept.get("V")), occurred_at=occurred if isinstance(occurred, datetime) else None,
        mac=_text_or_none(kept.get("M")), text=_text_or_none(kept.get("I")), dropped=tuple(dropped))


@dataclass(frozen=True, slots=True)
class _Bad:
    reason: str


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _degrees(value: str, positive: str, negative: str, limit: float) -> float | _Bad:
    match = _DEGREES.fullmatch(value.strip())
    if match is None:
        return _Bad("location-unreadable")
    letters = [h for h in (match["pre"], match["post"]) if h is not None]
    number = match["num"]
    if len(letters) > 1 or (letters and number[0] in "+-") or any(h not in (positive, negative) for h in letters):
        return _Bad("location-unreadable")
    degrees = float(number)
    if letters and letters[0] == negative:
        degrees = -degrees
    if not -limit <= degrees <= limit:
        return _Bad("location-out-of-range")
    return degrees + 0.0  # -0.0 as 0.0


def _longitude(value: str) -> float | _Bad:
    return _degrees(value, "E", "W", 180.0)


def _latitude(value: str) -> float | _Bad:
    return _degrees(value, "N", "S", 90.0)


def _verification(value: str) -> str | _Bad:
    """An https URL to a named host, nothing else: the link may be opened by an operator, so no other scheme, no
    credentials, no IP literal, no characters a URL does not hold."""
    url = value.strip()
    if len(url) > MAX_URL:
        return _Bad("verification-too-long")
    if not _URL_CHARS.fullmatch(url):
        return _Bad("verification-not-https")
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return _Bad("verification-not-https")
    del port  # read only to reject a malformed one
    if parts.scheme != "https" or "@" in parts.netloc or host is None or not _HOST.fullmatch(host):
        return _Bad("verification-not-https")
    return url


def _occurred(value: str) -> datetime | _Bad:
    match = _OCCURRED.fullmatch(value.strip())
    if match is None:
        return _Bad("time-unreadable")
    hh, mi, ss, mo, dd, yyyy = (int(part) for part in match.groups())
    try:
        return datetime(yyyy, mo, dd, hh, mi, ss, tzinfo=UTC)
    except ValueError:
        return _Bad("time-unreadable")


def _mac(value: str) -> str | _Bad:
    if not _MAC.fullmatch(value.strip()):
        return _Bad("mac-unreadable")
    return re.sub(r"[:-]", "", value.strip()).upper()


def _alarm_text(value: str) -> str | _Bad:
    text = " ".join(value.split())
    if not text:
        return _Bad("text-empty")
    return text[:MAX_TEXT]


_READERS: Final[dict[str, Callable[[str], object]]] = {"X": _longitude, "Y": _latitude, "V": _verification, "H": _occurred, "M": _mac,
                   "I": _alarm_text}
