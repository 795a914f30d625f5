"""Routing decision for one incoming call: a pure function of policy, call and time.

``decide(snapshot, call, now)`` does no I/O and reads no clock; it returns a
:class:`RoutingDecision` listing who rings (in which order, for how long), what
happens when nobody answers, and every rule that shaped the answer, so an operator
can ask "why did my speaker not ring?" and get the rule, not a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from zoneinfo import ZoneInfo

from policy_cache.presence import resolve_presence
from policy_cache.snapshot import Fallback, RingMode, RoutingSnapshot

LegKind = Literal["phone", "speaker"]
Action = Literal["ring", "reject", "fallback"]


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What routing may know about the call: numbers, not the channel."""

    destination: str
    caller: str | None
    uuid: str = ""


@dataclass(frozen=True, slots=True)
class Leg:
    """One target to ring: the subscriber's mobile or a SIP/WebRTC device in the home."""

    kind: LegKind
    target: str  # MSISDN for the phone, SIP AoR for a speaker
    timeout_s: int
    device_id: str | None = None
    webrtc: bool = False  # a WebRTC-only speaker: the switch offers it ICE/DTLS-SRTP media


@dataclass(frozen=True, slots=True)
class Announcement:
    """A speaker without SIP whose vendor cloud should announce the call."""

    device_id: str
    endpoint: str


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """Who rings, in which order, and what happens if nobody answers.

    ``groups`` ring one after another; the legs inside a group ring together.
    """

    action: Action
    groups: tuple[tuple[Leg, ...], ...]
    announcements: tuple[Announcement, ...]
    fallback: Fallback
    rules: tuple[str, ...]
    reject_cause: str | None = None
    subscriber_id: str | None = None
    tenant_id: str | None = None
    policy_version: int | None = None
    ring_mode: RingMode | None = None  # the policy's, for the steps the dial string cannot hold (cloud announcements)
    msisdn: str | None = None  # the subscriber's own number (E.164): where their missed-call SMS goes

    @property
    def legs(self) -> tuple[Leg, ...]:
        return tuple(leg for group in self.groups for leg in group)


_ZONES: dict[str, ZoneInfo] = {}


def local_minutes(now: datetime, zone: str) -> int:
    """Minutes after local midnight in ``zone`` (wall clock, so DST shifts are honoured)."""
    tz = _ZONES.get(zone)
    if tz is None:
        tz = _ZONES[zone] = ZoneInfo(zone)
    local = now.astimezone(tz)
    return local.hour * 60 + local.minute


def in_quiet_hours(snapshot: RoutingSnapshot, now: datetime) -> bool:
    start, end = snapshot.quiet_start_min, snapshot.quiet_end_min
    if start is None or end is None or start == end:
        return False
    minute = local_minutes(now, snapshot.time_zone)
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end  # the window spans midnight


def _hhmm(minutes: int | None) -> str:
    return "--:--" if minutes is None else f"{minutes // 60:02d}:{minutes % 60:02d}"


def _may_record(snapshot: RoutingSnapshot, now: datetime, rules: list[str]) -> Fallback:
    """The fallback to take: ``record_message`` only under a live call_recording consent, else the caller is
    offered nothing to record and the subscriber gets the missed-call SMS instead."""
    if snapshot.fallback != "record_message":
        return snapshot.fallback
    expires = snapshot.recording_consent_expires
    if snapshot.recording_consent and (expires is None or now.timestamp() < expires):
        return snapshot.fallback
    rules.append("no consent to record calls: record_message fallback replaced by missed_call_sms")
    return "missed_call_sms"


def decide(snapshot: RoutingSnapshot, call: CallFacts, now: datetime) -> RoutingDecision:
    """The routing of ``call`` to ``snapshot``'s subscriber at ``now`` (an aware datetime)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    rules: list[str] = [f"policy v{snapshot.policy_version}: ring_mode={snapshot.ring_mode}"]
    caller = call.caller or ""

    def decision(action: Action, groups: tuple[tuple[Leg, ...], ...] = (), fallback: Fallback = "none",
                 announcements: tuple[Announcement, ...] = (), reject_cause: str | None = None) -> RoutingDecision:
        return RoutingDecision(action, groups, announcements, fallback, tuple(rules), reject_cause,
                               snapshot.subscriber_id, snapshot.tenant_id, snapshot.policy_version,
                               snapshot.ring_mode, snapshot.msisdn)

    if caller and caller in snapshot.blocked_callers:
        rules.append(f"caller {caller} is blocked: reject")
        return decision("reject", reject_cause="CALL_REJECTED")

    privileged = bool(caller) and caller in snapshot.allowed_callers
    if privileged:
        rules.append(f"caller {caller} is on the allowed list: DND and quiet hours do not apply")

    fallback = _may_record(snapshot, now, rules)
    if snapshot.dnd and not privileged:
        rules.append(f"do-not-disturb is on: no ringing, fallback {fallback}")
        return decision("fallback", fallback=fallback)

    phone = Leg("phone", snapshot.msisdn, snapshot.phone_timeout_s)
    home_allowed = snapshot.ring_mode != "phone_only"
    expires = snapshot.announce_consent_expires
    if home_allowed and not snapshot.announce_consent:
        home_allowed = False
        rules.append("no consent to announce calls in the home: home devices skipped")
    elif home_allowed and expires is not None and now.timestamp() >= expires:
        home_allowed = False
        rules.append("consent to announce calls has expired: home devices skipped")
    if home_allowed and not privileged and in_quiet_hours(snapshot, now):
        home_allowed = False
        rules.append(
            f"quiet hours {_hhmm(snapshot.quiet_start_min)}-{_hhmm(snapshot.quiet_end_min)} "
            f"{snapshot.time_zone} are on: home devices skipped"
        )
    if home_allowed and snapshot.home_only_when_present:
        presence = resolve_presence(snapshot.presence, snapshot.presence_claims, now.timestamp())
        if presence.state != "home":
            home_allowed = False
            rules.append(f"{presence.describe()}: home devices ring only when someone is home")
        elif presence.source != "registry":
            rules.append(f"{presence.describe()}: home devices may ring")

    home: list[Leg] = []
    announcements: list[Announcement] = []
    if home_allowed:
        for device in snapshot.speakers:
            if not device.online:
                rules.append(f"device {device.name or device.device_id} is offline: skipped")
            elif device.sip:
                home.append(Leg("speaker", device.endpoint, snapshot.home_timeout_s, device.device_id,
                                webrtc=device.webrtc))
            elif device.cloud_announce:
                announcements.append(Announcement(device.device_id, device.endpoint))
                rules.append(f"device {device.name or device.device_id} has no SIP: announce through its cloud")

    mode = snapshot.ring_mode
    groups: tuple[tuple[Leg, ...], ...]
    if mode == "phone_only":
        groups = ((phone,),)
    elif not home:
        if home_allowed:
            rules.append("no home device can ring: phone only")
        groups = ((phone,),)
    elif mode == "home_only":
        groups = (tuple(home),)
    elif mode == "simultaneous":
        groups = ((phone, *home),)
        rules.append("phone and home ring together; the mobile leg must confirm so carrier voicemail cannot win")
    elif mode == "phone_then_home":
        groups = ((phone,), tuple(home))
    else:  # home_then_phone
        groups = (tuple(home), (phone,))
    if fallback != "none":
        rules.append(f"no answer: {fallback}")
    return decision("ring", groups, fallback, tuple(announcements))
