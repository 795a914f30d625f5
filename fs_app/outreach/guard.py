"""Anti-toll-fraud rules for alert calls: who may be called, where, and how often.

An alert call costs money and reaches a real person, so an originate is only placed to a destination the
household has bound (its contacts' numbers, its own devices' SIP URIs), inside the tenant's numbering plan
and inside the tenant's caps. Deny by default: a number is admitted only when it starts with one of the
tenant's country codes (its plan) or one of its allow-list entries, and never when it falls in a special
range (premium rate, satellite, international networks, a foreign country sharing the code: the shipped
``special_ranges.tsv``) unless an allow-list entry lies inside that range. So ``+7`` in a plan or in the
allow-list admits ``+7903...`` but not ``+7809...``; only ``+7809`` (or the number itself) does.

A destination in a national or international form (``8 809 ...``, ``810 ...``) is read under the tenant's
numbering plan (:mod:`iim.core.numbering`) first: ``88091234567`` is ``+78091234567`` and refused the same.

Everything here is pure: the caller loads the plan and the counts and maps the verdict. A cap reached is
not a refusal but a :class:`Wait` (the alarm's call is queued and tried again) until the call has waited
``max_wait_s``; only a number the rules exclude is a :class:`Refusal`. The counts live in PostgreSQL: the
scenario worker claims a call under the caps in one locked statement (``iim.claim_originate``), so several
workers share one budget per tenant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources
from typing import Literal

from iim.core.numbering import DEFAULT_PLAN, NumberingPlan, try_e164
from iim.core.retry import backoff_delay

__all__ = [
    "DEFAULT_COUNTRY_CODES", "OriginateLimits", "Refusal", "RefusalReason", "SpecialRange", "Wait", "WaitReason",
    "check_caps", "check_destination", "destination_kind", "destination_refusal", "limits_from", "number_refusal",
    "normalised_destination", "parse_special_ranges", "special_range_of", "special_ranges",
]

E164 = re.compile(r"\+[0-9]{8,15}")
# sip:user@host[:port]; the same characters fs_app.dialstring accepts for a device AoR.
SIP_URI = re.compile(r"sip:[A-Za-z0-9._~+\-]{1,64}@[A-Za-z0-9.\-]{1,253}(?::[0-9]{1,5})?")
_MAX_LEN = 330  # longest valid sip: URI, so the regexes never see megabytes
_RANGE = re.compile(r"\+[0-9X]{1,15}")

#: The plan of a tenant that has not set its own (``iim originate-limit``): the country IIM was built for.
DEFAULT_COUNTRY_CODES: tuple[str, ...] = ("+7",)
#: How long an alarm's call may wait for a free place under the caps before it is refused.
DEFAULT_MAX_WAIT_S = 600.0

RefusalReason = Literal[
    "destination_not_bound", "outside_plan", "special_range", "concurrent_cap", "hourly_cap",
    "malformed_destination",
]
WaitReason = Literal["concurrent_cap", "hourly_cap"]


@dataclass(frozen=True, slots=True)
class SpecialRange:
    """A range no plan admits by itself: ``prefix`` is ``+`` and digits, ``X`` standing for any digit."""

    prefix: str
    kind: str
    note: str

    def matches(self, number: str) -> bool:
        """Whether ``number`` (or an allow-list entry) starts inside this range."""
        return len(number) >= len(self.prefix) and all(
            p in ("X", c) for p, c in zip(self.prefix, number, strict=False))


def parse_special_ranges(lines: Iterable[str]) -> tuple[SpecialRange, ...]:
    """The ranges of a ``special_ranges.tsv`` text (prefix, kind, note; ``#`` comments); ValueError on a bad line."""
    out: list[SpecialRange] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 3 or not _RANGE.fullmatch(parts[0]) or not parts[1] or not parts[2]:
            raise ValueError(f"special ranges line {n}: want 'prefix<TAB>kind<TAB>note', got {line[:80]!r}")
        out.append(SpecialRange(*parts))
    return tuple(out)


@cache
def special_ranges() -> tuple[SpecialRange, ...]:
    """The shipped ranges (``fs_app/outreach/special_ranges.tsv``), read once."""
    text = resources.files(__package__).joinpath("special_ranges.tsv").read_text(encoding="utf-8")
    return parse_special_ranges(text.splitlines())


def special_range_of(number: str, ranges: Sequence[SpecialRange] | None = None) -> SpecialRange | None:
    """The most specific special range ``number`` falls in, or None."""
    found = [r for r in (special_ranges() if ranges is None else ranges) if r.matches(number)]
    return max(found, key=lambda r: len(r.prefix)) if found else None


@dataclass(frozen=True)
class OriginateLimits:
    """One tenant's limits: its caps, its plan (country codes admitted by default) and its allow-list
    (numbers or prefixes admitted besides; one inside a special range admits that much of it)."""

    max_concurrent: int = 10
    max_per_hour: int = 200
    country_codes: tuple[str, ...] = DEFAULT_COUNTRY_CODES
    allowed: tuple[str, ...] = ()
    #: a call kept from its place by a cap is tried again until it has waited this long (then refused)
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    ranges: tuple[SpecialRange, ...] | None = field(default=None, repr=False)  # None: the shipped ranges
    #: how the tenant's numbers are written: national forms of a destination are read under it
    numbering: NumberingPlan = DEFAULT_PLAN

    def __post_init__(self) -> None:
        if self.max_concurrent < 0 or self.max_per_hour < 0 or self.max_wait_s < 0:
            raise ValueError("originate limits must not be negative")


def limits_from(row: tuple[int | None, int | None, Sequence[str] | None, Sequence[str]] | None,
                defaults: OriginateLimits, numbering: NumberingPlan | None = None) -> OriginateLimits:
    """A tenant's limits from its stored row (caps, plan; None: not set) and allow-list, over ``defaults``;
    ``numbering`` is its numbering plan (None: the defaults')."""
    numbering = defaults.numbering if numbering is None else numbering
    if row is None:
        return defaults if numbering == defaults.numbering else replace(defaults, numbering=numbering)
    max_concurrent, max_per_hour, country_codes, allowed = row
    return OriginateLimits(
        max_concurrent=defaults.max_concurrent if max_concurrent is None else max_concurrent,
        max_per_hour=defaults.max_per_hour if max_per_hour is None else max_per_hour,
        country_codes=defaults.country_codes if country_codes is None else tuple(country_codes),
        allowed=tuple(allowed), max_wait_s=defaults.max_wait_s, ranges=defaults.ranges, numbering=numbering)


@dataclass(frozen=True)
class Refusal:
    """Why an alert call was not placed (``detail`` is for logs and the audit, not for the callee)."""

    reason: RefusalReason
    detail: str


@dataclass(frozen=True)
class Wait:
    """A cap keeps the call from its place now: try again after ``retry_after_s`` (the call is queued)."""

    reason: WaitReason
    detail: str
    retry_after_s: float


def destination_kind(destination: object) -> Literal["e164", "sip"] | None:
    """``"e164"``, ``"sip"`` or None when the destination is neither (never raises, whatever it is)."""
    if not isinstance(destination, str) or len(destination) > _MAX_LEN:
        return None
    if E164.fullmatch(destination):
        return "e164"
    if SIP_URI.fullmatch(destination):
        return "sip"
    return None


def _shown(destination: object) -> str:
    return repr(destination)[:60]


def normalised_destination(destination: str, limits: OriginateLimits) -> str:
    """A number in any form the tenant's numbering plan reads, as E.164; anything else (a SIP URI, E.164
    already, a number the plan cannot read) unchanged, for the rules to judge."""
    if destination.startswith(("+", "sip:")) or len(destination) > _MAX_LEN:
        return destination
    return try_e164(destination, limits.numbering) or destination


def number_refusal(number: str, limits: OriginateLimits) -> Refusal | None:
    """None when the tenant's plan or allow-list admits ``number`` (E.164, or a form the tenant's numbering
    plan reads), else why not.

    A special range is admitted only by an allow-list entry inside it (at least as long as the range);
    a plan's country code or a shorter entry never reaches into one.
    """
    number = normalised_destination(number, limits)
    special = special_range_of(number, limits.ranges)
    if special is not None:
        if any(number.startswith(a) and special.matches(a) for a in limits.allowed):
            return None
        return Refusal("special_range", f"{number} is in {special.prefix} ({special.kind}: {special.note}); "
                                        f"only an allow-list entry inside that range admits it")
    if number.startswith((*limits.country_codes, *limits.allowed)):
        return None
    return Refusal("outside_plan", f"{number} is outside the plan {list(limits.country_codes)} "
                                   f"and the allow-list ({len(limits.allowed)} entries)")


def destination_refusal(destination: str, *, bound: frozenset[str], limits: OriginateLimits) -> Refusal | None:
    """The rules that do not change while a call waits: shape, binding, then the plan (numbers only).

    Order: the most specific problem first (a stranger's number is ``destination_not_bound`` even when it
    is also a premium one). A national form is judged as the E.164 number it stands for; the caller dials
    :func:`normalised_destination`."""
    if isinstance(destination, str):
        destination = normalised_destination(destination, limits)
    kind = destination_kind(destination)
    if kind is None:
        return Refusal("malformed_destination", f"not E.164 (+ and 8-15 digits) nor a sip: URI: {_shown(destination)}")
    if destination not in bound:
        return Refusal("destination_not_bound", f"{destination} is not bound to the household")
    if kind == "e164":
        return number_refusal(destination, limits)
    return None


def check_caps(limits: OriginateLimits, *, in_flight: int, last_hour: int, waited_s: float = 0.0
               ) -> Refusal | Wait | None:
    """None under the caps; a :class:`Wait` when one is reached, until the call has waited ``waited_s`` >=
    ``limits.max_wait_s`` or can never get a place (a cap of 0): then a :class:`Refusal`. The delay starts
    at about a second and grows with the wait (a quarter of it, jittered) up to a ceiling per cap."""
    if in_flight >= limits.max_concurrent:
        reason: WaitReason = "concurrent_cap"
        detail = f"{in_flight} alert calls in flight, cap {limits.max_concurrent}"
        ceiling = 5.0  # calls settle within a minute or so: look again soon
        never = limits.max_concurrent == 0
    elif last_hour >= limits.max_per_hour:
        reason, detail, ceiling = "hourly_cap", f"{last_hour} alert calls in the last hour, cap {limits.max_per_hour}", 30.0
        never = limits.max_per_hour == 0
    else:
        return None
    if never or waited_s >= limits.max_wait_s:
        waited = "" if never else f"; waited {waited_s:.0f} s for a place"
        return Refusal(reason, detail + waited)
    delay = backoff_delay(1, min(ceiling, max(1.0, waited_s / 4)), ceiling)
    return Wait(reason, detail, min(delay, max(limits.max_wait_s - waited_s, 0.1)))


def check_destination(
    destination: str,
    *,
    bound: frozenset[str],
    limits: OriginateLimits,
    in_flight: int,
    last_hour: int,
    waited_s: float = 0.0,
) -> Refusal | Wait | None:
    """None when the call may be placed now, a :class:`Wait` when only a cap stops it, else the first rule
    it breaks (:func:`destination_refusal`, then :func:`check_caps`)."""
    return destination_refusal(destination, bound=bound, limits=limits) or check_caps(
        limits, in_flight=in_flight, last_hour=last_hour, waited_s=waited_s)
