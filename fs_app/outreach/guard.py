"""Anti-toll-fraud rules for alert calls: who may be called, and how often.

An alert call costs money and reaches a real person, so an originate is only placed
to a destination the household has bound (its contacts' numbers, its own devices'
SIP URIs) and inside the tenant's caps. :func:`check_destination` is pure: it takes
the counts and answers. The counts live in PostgreSQL: the scenario worker claims a
call under the caps in one locked statement (``iim.claim_originate``), so several
workers share one budget per tenant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

E164 = re.compile(r"\+[0-9]{8,15}")
# sip:user@host[:port]; the same characters fs_app.dialstring accepts for a device AoR.
SIP_URI = re.compile(r"sip:[A-Za-z0-9._~+\-]{1,64}@[A-Za-z0-9.\-]{1,253}(?::[0-9]{1,5})?")
_MAX_LEN = 330  # longest valid sip: URI, so the regexes never see megabytes

RefusalReason = Literal[
    "destination_not_bound", "prefix_not_allowed", "concurrent_cap", "hourly_cap", "malformed_destination",
]


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
