"""Compiled, immutable routing snapshots: what a call needs to know about one subscriber.

A snapshot is built from PostgreSQL rows once per change and then only read, by
many calls at once, without locks. It is deliberately flat and small (a million
of them must fit in ~2 KB each): strings are interned, empty sets are shared, and
devices that cannot ring are left out when it is compiled.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Literal

RingMode = Literal["phone_only", "home_only", "simultaneous", "phone_then_home", "home_then_phone"]
Fallback = Literal["voicemail", "record_message", "missed_call_sms", "none"]
Presence = Literal["home", "away", "unknown"]

RING_MODES: tuple[RingMode, ...] = ("phone_only", "home_only", "simultaneous", "phone_then_home", "home_then_phone")
FALLBACKS: tuple[Fallback, ...] = ("voicemail", "record_message", "missed_call_sms", "none")

EMPTY: frozenset[str] = frozenset()
_intern = sys.intern


@dataclass(frozen=True, slots=True)
class SpeakerDevice:
    """A device in the home that can take or announce a call."""

    device_id: str
    endpoint: str  # SIP AoR (user@domain) for sip/webrtc devices, connector reference otherwise
    sip: bool  # reachable by SIP or WebRTC: FreeSWITCH can bridge to it
    cloud_announce: bool  # its vendor cloud can announce a call on it
    online: bool
    name: str = ""
    # Speaks WebRTC only (a browser or an app over WSS): the switch must offer it ICE, DTLS-SRTP and AVPF, which a
    # plain SIP device would refuse. A device that can do both is rung as plain SIP.
    webrtc: bool = False


@dataclass(frozen=True, slots=True)
class RoutingSnapshot:
    """Everything routing needs about one subscriber, at one policy version."""

    subscriber_id: str
    tenant_id: str
    msisdn: str
    aor: str | None
    time_zone: str
    ring_mode: RingMode
    phone_timeout_s: int
    home_timeout_s: int
    quiet_start_min: int | None  # minutes after local midnight, None = no quiet hours
    quiet_end_min: int | None
    dnd: bool
    allowed_callers: frozenset[str]
    blocked_callers: frozenset[str]
    presence: Presence
    home_only_when_present: bool
    announce_consent: bool
    fallback: Fallback
    speakers: tuple[SpeakerDevice, ...]
    policy_version: int
    household_id: str | None = None
    announce_consent_expires: float | None = None  # epoch seconds; consent may run out between syncs
    #: a call_recording consent: without it the record_message fallback does not record
    recording_consent: bool = False
    recording_consent_expires: float | None = None  # epoch seconds

    def with_device_status(self, endpoint: str, online: bool) -> RoutingSnapshot:
        """A copy with one device's online state changed (registrations move fast, rows don't)."""
        speakers = tuple(
            replace(d, online=online) if d.endpoint == endpoint and d.online != online else d for d in self.speakers
        )
        return self if speakers == self.speakers else replace(self, speakers=speakers)


_CALLER_SETS: dict[tuple[str, ...], frozenset[str]] = {}


def callers(values: list[str] | tuple[str, ...] | None) -> frozenset[str]:
    """A shared caller set: equal lists compile to one object (most subscribers have none)."""
    if not values:
        return EMPTY
    key = tuple(values)
    found = _CALLER_SETS.get(key)
    if found is None:
        if len(_CALLER_SETS) > 100_000:
            _CALLER_SETS.clear()
        found = _CALLER_SETS[key] = frozenset(_intern(v) for v in values)
    return found


def compile_snapshot(
    *,
    subscriber_id: str,
    tenant_id: str,
    msisdn: str,
    aor: str | None,
    time_zone: str,
    ring_mode: str,
    phone_timeout_s: int,
    home_timeout_s: int,
    quiet_start_min: int | None,
    quiet_end_min: int | None,
    dnd: bool,
    allowed_callers: list[str] | tuple[str, ...] | None,
    blocked_callers: list[str] | tuple[str, ...] | None,
    presence: str,
    home_only_when_present: bool,
    announce_consent: bool,
    fallback: str,
    speakers: tuple[SpeakerDevice, ...],
    policy_version: int,
    household_id: str | None = None,
    announce_consent_expires: float | None = None,
    recording_consent: bool = False,
    recording_consent_expires: float | None = None,
) -> RoutingSnapshot:
    """Validate and intern one subscriber's rows into a snapshot."""
    if ring_mode not in RING_MODES:
        raise ValueError(f"unknown ring mode {ring_mode!r}")
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}")
    return RoutingSnapshot(
        subscriber_id=subscriber_id,
        tenant_id=_intern(tenant_id),
        msisdn=msisdn,
        aor=aor,
        time_zone=_intern(time_zone),
        ring_mode=ring_mode,
        phone_timeout_s=phone_timeout_s,
        home_timeout_s=home_timeout_s,
        quiet_start_min=quiet_start_min,
        quiet_end_min=quiet_end_min,
        dnd=dnd,
        allowed_callers=callers(allowed_callers),
        blocked_callers=callers(blocked_callers),
        presence=presence if presence in ("home", "away") else "unknown",  # type: ignore[arg-type]
        home_only_when_present=home_only_when_present,
        announce_consent=announce_consent,
        fallback=fallback,
        speakers=speakers,
        policy_version=policy_version,
        household_id=household_id,
        announce_consent_expires=announce_consent_expires,
        recording_consent=recording_consent,
        recording_consent_expires=recording_consent_expires,
    )
