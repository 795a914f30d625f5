"""Who is home, from live sources with expiry: a pure function of the claims and the time.

Live sources each leave a *claim* about one subject (a person of the operator's app, a vendor's home, a
person's registered phone or wearable): home or away, observed at, valid until. The registry's household presence
(set by an admin PATCH) is the baseline when no live claim speaks. The rules, in order:

1. A claim past its expiry says nothing (so a source that goes silent lets the answer fall back by itself).
2. About one subject, the most explicit source wins: the operator's app (geofence) over a connector (the
   vendor's home/away) over a device registration; between claims of equal rank, the newest.
3. About the household: someone is home when any subject is home; away when every subject that speaks says
   away; with no live claim, the registry's presence.

A registration speaks only for a person (:func:`registration_word`): an owner's or member's own AoR, a wearable,
or a device the registry says does (``presence_hint``); and only where the household listed its home networks:
from inside one it says home, from outside away. A kitchen speaker is registered whether anyone is in or not,
and a phone is registered from a café too: reachability is not location.

Nothing here reads a clock or the database: the cache keeps the claims in each snapshot and ``decide()``
resolves them at the call's time, so a claim that expires between two changes is already ignored by the next call.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

__all__ = ["SOURCE_RANK", "ClaimState", "PresenceClaim", "PresenceSource", "PresenceView", "registration_word",
           "resolve_presence"]

PresenceSource = Literal["registration", "connector", "app"]
ClaimState = Literal["home", "away"]
Presence = Literal["home", "away", "unknown"]

#: Precedence about one subject: higher wins.
SOURCE_RANK: dict[str, int] = {"registration": 1, "connector": 2, "app": 3}
_SOURCE_TEXT = {"registration": "device registration", "connector": "connector", "app": "operator app"}


@dataclass(frozen=True, slots=True)
class PresenceClaim:
    """One live source's word about one subject; times are epoch seconds."""

    source: PresenceSource
    subject: str
    state: ClaimState
    observed_at: float
    expires_at: float
    #: why it says so, in words ("from home network 192.0.2.0/24"); None: the source's word is its own reason
    basis: str | None = None


@dataclass(frozen=True, slots=True)
class PresenceView:
    """The household's presence at one instant, and what decided it.

    ``until``: the next expiry among the live claims, the earliest moment the answer can change by time alone
    (``None``: only a new claim or an admin change can change it).
    """

    state: Presence
    source: PresenceSource | Literal["registry"]
    subject: str | None
    until: float | None
    live_claims: int
    basis: str | None = None

    def describe(self) -> str:
        """One line for rules and ``explain-call``."""
        if self.source == "registry":
            return f"presence {self.state} (registry; no live source)"
        until = datetime.fromtimestamp(self.until, UTC).isoformat(timespec="seconds") if self.until else "-"
        why = f" {self.basis}" if self.basis else ""
        return (f"presence {self.state} ({_SOURCE_TEXT[self.source]} {self.subject}{why}; "
                f"{self.live_claims} live claim(s), next expiry {until})")


def _key(claim: PresenceClaim) -> tuple[int, float, bool]:
    """Order of strength: source rank, then the newest, then home over away (a tie is not left to input order)."""
    return SOURCE_RANK[claim.source], claim.observed_at, claim.state == "home"


def resolve_presence(baseline: Presence, claims: Iterable[PresenceClaim], now: float) -> PresenceView:
    """The presence at ``now`` (epoch seconds) from ``claims`` over the registry's ``baseline``."""
    live = [c for c in claims if c.expires_at > now]
    if not live:
        return PresenceView(baseline, "registry", None, None, 0)
    per_subject: dict[str, PresenceClaim] = {}
    for claim in live:
        held = per_subject.get(claim.subject)
        if held is None or _key(claim) > _key(held):
            per_subject[claim.subject] = claim
    winners = list(per_subject.values())
    home = [c for c in winners if c.state == "home"]
    deciding = max(home or winners, key=lambda c: (*_key(c), c.subject))
    return PresenceView("home" if home else "away", deciding.source, deciding.subject,
                        min(c.expires_at for c in live), len(live), deciding.basis)


_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> _Address | None:
    """A registration's source as an address (``[v6]`` brackets and v4-mapped v6 undone); None if it is none."""
    try:
        found = ipaddress.ip_address(text.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        return None
    if isinstance(found, ipaddress.IPv6Address) and found.ipv4_mapped is not None:
        return found.ipv4_mapped
    return found


def registration_word(personal: bool, sources: Iterable[str], home_networks: Iterable[str | _Network]
                      ) -> tuple[ClaimState, str] | None:
    """What a live registration says about its household, and why; None: nothing (no claim).

    ``personal``: the identity speaks for a person (see the module). ``sources``: the addresses it registered
    from (several contacts: any inside a home network is enough for home). A fixed device, a household without
    home networks, or no usable source address: None.
    """
    networks = [ipaddress.ip_network(n, strict=False) if isinstance(n, str) else n for n in home_networks]
    if not personal or not networks:
        return None
    addresses = sorted({a for a in map(_address, sources) if a is not None}, key=lambda a: (a.version, a))
    if not addresses:
        return None
    for address in addresses:
        inside = [n for n in networks if n.version == address.version and address in n]
        if inside:
            best = max(inside, key=lambda n: n.prefixlen)
            return "home", f"from home network {best}"
    return "away", f"from {addresses[0]}, outside the home networks"
