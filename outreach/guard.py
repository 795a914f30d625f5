"""Anti-toll-fraud rules for alert calls: who may be called, and how often.

An alert call costs money and reaches a real person, so an originate is only placed
to a destination the household has bound (its contacts' numbers, its own devices'
SIP URIs) and inside the tenant's caps. :func:`check_destination` is pure: it takes
the counts and answers; :class:`OriginateLedger` keeps those counts in process (the
worker may later keep them in PostgreSQL instead, the guard does not care).
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

E164 = re.compile(r"\+[0-9]{8,15}")
# sip:user@host[:port]; the same characters fs_app.dialstring accepts for a device AoR.
SIP_URI = re.compile(r"sip:[A-Za-z0-9._~+\-]{1,64}@[A-Za-z0-9.\-]{1,253}(?::[0-9]{1,5})?")
_MAX_LEN = 330  # longest valid sip: URI, so the regexes never see megabytes

RefusalReason = Literal[
    "destination_not_bound", "prefix_not_allowed", "concurrent_cap", "hourly_cap", "malformed_destination",
]
WINDOW_S = 3600.0


@dataclass(frozen=True)
class OriginateLimits:
    """One tenant's limits. ``allowed_prefixes`` (``"+7"``...) restricts E.164 numbers; empty = any."""

    max_concurrent: int = 10
    max_per_hour: int = 200
    allowed_prefixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_concurrent < 0 or self.max_per_hour < 0:
            raise ValueError("originate limits must not be negative")


@dataclass(frozen=True)
class Refusal:
    """Why an alert call was not placed (``detail`` is for logs and the audit, not for the callee)."""

    reason: RefusalReason
    detail: str


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


def check_destination(
    destination: str,
    *,
    bound: frozenset[str],
    limits: OriginateLimits,
    in_flight: int,
    last_hour: int,
) -> Refusal | None:
    """None when the call may be placed, else the first rule it breaks.

    Order: shape, binding, prefix, then the caps, so a refusal names the most specific
    problem (a stranger's number is ``destination_not_bound`` even when the caps are full).
    """
    kind = destination_kind(destination)
    if kind is None:
        return Refusal("malformed_destination", f"not E.164 (+ and 8-15 digits) nor a sip: URI: {_shown(destination)}")
    if destination not in bound:
        return Refusal("destination_not_bound", f"{destination} is not bound to the household")
    if kind == "e164" and limits.allowed_prefixes and not destination.startswith(limits.allowed_prefixes):
        return Refusal("prefix_not_allowed",
                       f"{destination} matches none of the allowed prefixes {list(limits.allowed_prefixes)}")
    if in_flight >= limits.max_concurrent:
        return Refusal("concurrent_cap", f"{in_flight} alert calls in flight, cap {limits.max_concurrent}")
    if last_hour >= limits.max_per_hour:
        return Refusal("hourly_cap", f"{last_hour} alert calls in the last hour, cap {limits.max_per_hour}")
    return None


def _seconds(now: float | datetime) -> float:
    return now.timestamp() if isinstance(now, datetime) else float(now)


@dataclass
class _TenantCounts:
    in_flight: int = 0
    # (bucket start, starts in the bucket), oldest first: at most WINDOW_S / bucket_s entries.
    buckets: deque[tuple[float, int]] = field(default_factory=deque)


class OriginateLedger:
    """In-process per-tenant counters: calls in flight, and starts in a sliding hour.

    Starts are counted in ``bucket_s`` buckets (10 s by default), so memory per tenant is
    bounded (360 buckets) whatever the call rate; the hour's edge is exact to one bucket,
    and a start counts until its whole bucket has left the window (errs on refusing).
    ``now`` is seconds on one clock (``time.monotonic()`` or epoch) or an aware datetime;
    use the same clock throughout. Tenants with nothing in flight and an empty hour are
    forgotten.
    """

    def __init__(self, *, bucket_s: float = 10.0) -> None:
        if bucket_s <= 0 or bucket_s > WINDOW_S:
            raise ValueError("bucket_s must be in (0, 3600]")
        self._bucket_s = bucket_s
        self._tenants: dict[str, _TenantCounts] = {}

    def in_flight(self, tenant: str) -> int:
        counts = self._tenants.get(tenant)
        return counts.in_flight if counts else 0

    def last_hour(self, tenant: str, now: float | datetime) -> int:
        counts = self._tenants.get(tenant)
        if counts is None:
            return 0
        self._expire(tenant, counts, _seconds(now))
        return sum(n for _, n in counts.buckets)

    def started(self, tenant: str, now: float | datetime) -> None:
        """A call was placed (count it before the originate goes out, not after it rang)."""
        t = _seconds(now)
        counts = self._tenants.setdefault(tenant, _TenantCounts())
        counts.in_flight += 1
        start = t - (t % self._bucket_s)
        buckets = counts.buckets
        if buckets and buckets[-1][0] >= start:
            # Same bucket (or a clock that stepped back: count it in the newest one).
            last_start, n = buckets[-1]
            buckets[-1] = (last_start, n + 1)
        else:
            buckets.append((start, 1))
        self._expire(tenant, counts, t)

    def finished(self, tenant: str) -> None:
        """The call ended, however it ended."""
        counts = self._tenants.get(tenant)
        if counts is None:
            return
        counts.in_flight = max(0, counts.in_flight - 1)
        if counts.in_flight == 0 and not counts.buckets:
            del self._tenants[tenant]

    @property
    def tenants(self) -> int:
        """How many tenants are being tracked (for tests and memory checks)."""
        return len(self._tenants)

    def _expire(self, tenant: str, counts: _TenantCounts, now: float) -> None:
        buckets = counts.buckets
        horizon = now - WINDOW_S
        while buckets and buckets[0][0] + self._bucket_s <= horizon:
            buckets.popleft()
        if counts.in_flight == 0 and not buckets:
            self._tenants.pop(tenant, None)
