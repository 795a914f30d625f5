"""May an incoming SMS be read aloud or shown in the home? A pure function of facts and time.

``decide_sms_readout(facts, now)`` does no I/O and reads no clock. It answers with the devices that
read the message aloud, the devices that show it as text, or nothing - always with the reasons, so
"why was my SMS not read?" gets the rule, not a guess.

Privacy comes first (spec 3.2, 8.2): without a valid ``read_sms`` consent of this very tenant and
subscriber nothing else is looked at and the answer carries no text at all, so the body cannot reach
TTS, a connector, a log line or an audit row by accident. The body travels in :attr:`SmsFacts.body`
(left out of ``repr``) and leaves this module only as :attr:`SmsReadout.text` of a permitted answer.

Rules, in order:

* consent ``read_sms``: present, this tenant's and this subscriber's, not revoked, not expired;
* sender: on the consent's ``scope.allowed_senders`` (E.164 numbers or prefixes such as ``+7916``;
  ``"*"`` = anyone; empty or missing = nobody; alphanumeric senders match exactly) and not on any
  ``blocked_callers`` list of the subscriber's or the households' policies (blocking wins);
* age: a message older than ``max_age`` (an SMSC redelivering after an outage) is not read;
* per household: someone must be home (``presence = home``; ``unknown`` counts as nobody), else
  nothing is said or shown there; quiet hours (household's zone, across midnight, wall clock so
  DST is honoured) and DND silence speakers but still let displays show the text;
* devices: enabled, not offline, reachable through a connector (cloud). A ``tts`` device reads
  aloud; a ``display`` device shows text. SIP-only speakers would need FreeSWITCH playback, which
  this module does not do (cloud only): they are skipped with a reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

__all__ = [
    "ConsentFacts", "DeviceFacts", "HouseholdFacts", "PolicyFacts", "ReadoutCode", "SmsFacts", "SmsReadout",
    "Target", "decide_sms_readout", "in_quiet_hours", "normalise_number", "sender_allowed",
]

ReadoutCode = Literal[
    "no_subscriber", "no_consent", "consent_foreign", "consent_revoked", "consent_expired",
    "sender_blocked", "sender_not_allowed", "stale", "no_household", "nobody_home", "quiet_hours", "dnd",
    "device_offline", "device_sip_only", "device_no_connector", "no_target",
]

READ_SMS = "read_sms"
DEFAULT_TEMPLATE = "Message from {sender}. {body}"
DEFAULT_MAX_AGE = timedelta(minutes=15)
MAX_TEXT_CHARS = 1600  # the longest concatenated SMS we accept anywhere (iim.sms_outbox.body)

_NUMERIC = re.compile(r"\+[0-9]{1,15}")


@dataclass(frozen=True, slots=True)
class ConsentFacts:
    """The subscriber's newest ``read_sms`` consent row, as read (it may be revoked or expired)."""

    consent_id: str
    tenant_id: str
    subscriber_id: str
    purpose: str
    expires_at: datetime | None
    revoked_at: datetime | None
    scope: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PolicyFacts:
    """The parts of a routing policy that apply to SMS."""

    quiet_start: time | None = None
    quiet_end: time | None = None
    dnd: bool = False
    blocked_callers: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    device_id: str
    name: str
    capabilities: frozenset[str]
    connector: str | None
    connector_ref: str | None
    sip_uri: str | None = None
    online: bool = True  # status is not 'offline' ('unknown' is tried: the connector will say)
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class HouseholdFacts:
    household_id: str
    time_zone: str
    presence: str  # home | away | unknown
    devices: tuple[DeviceFacts, ...] = ()
    policy: PolicyFacts | None = None  # the household's default policy


@dataclass(frozen=True, slots=True)
class SmsFacts:
    """Everything the decision may know about one MO SMS to one subscriber."""

    tenant_id: str
    sms_id: str
    sender: str
    subscriber_id: str | None  # None: the destination is not a subscriber of this tenant
    households: tuple[HouseholdFacts, ...] = ()
    consent: ConsentFacts | None = None
    subscriber_policy: PolicyFacts | None = None  # overrides the household's quiet hours and DND
    received_at: datetime | None = None
    body: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class Target:
    """A device reached through its vendor cloud: ``connector`` names it, ``connector_ref`` is the device."""

    device_id: str
    household_id: str
    connector: str
    connector_ref: str
    name: str = ""


@dataclass(frozen=True, slots=True)
class SmsReadout:
    """The answer: where the message is read aloud, where it is shown, and why.

    ``text`` (what is said/shown) is set only when something is delivered; a refusal never holds it.
    """

    sms_id: str
    tenant_id: str
    consent_id: str | None
    read_aloud: tuple[Target, ...]
    show_text: tuple[Target, ...]
    reasons: tuple[str, ...]
    codes: tuple[ReadoutCode, ...]
    text: str | None = field(default=None, repr=False)
    title: str = ""

    def __post_init__(self) -> None:
        if self.nothing and self.text is not None:
            raise ValueError("a refusal must not carry the message text")
        if not self.nothing and (self.text is None or self.consent_id is None):
            raise ValueError("a delivery needs the text and the consent it is made under")

    @property
    def nothing(self) -> bool:
        return not (self.read_aloud or self.show_text)


_ZONES: dict[str, ZoneInfo] = {}


def _zone(name: str) -> ZoneInfo:
    tz = _ZONES.get(name)
    if tz is None:
        tz = _ZONES[name] = ZoneInfo(name)
    return tz


def in_quiet_hours(start: time | None, end: time | None, time_zone: str, now: datetime) -> bool:
    """Is ``now`` inside [start, end) on the household's wall clock? ``start > end`` spans midnight."""
    if start is None or end is None or start == end:
        return False
    local = now.astimezone(_zone(time_zone)).time().replace(tzinfo=None)
    if start < end:
        return start <= local < end
    return local >= start or local < end


def _hhmm(value: time | None) -> str:
    return "--:--" if value is None else f"{value:%H:%M}"


def normalise_number(value: str) -> str:
    """``+79161234567`` from ``79161234567``, ``0079161234567`` or ``+7 (916) 123-45-67``; others as given.

    SMSCs hand the source address without ``+`` (TON international) or with punctuation; numbers that
    are not plainly international (national ``8916...``) stay as they are and so match nothing numeric.
    """
    text = value.strip()
    compact = re.sub(r"[\s\-().]", "", text)
    if compact.startswith("00") and compact[2:].isdigit():
        return "+" + compact[2:]
    if compact.isdigit():
        return "+" + compact
    if compact.startswith("+") and compact[1:].isdigit():
        return compact
    return text


def sender_allowed(sender: str, allowed: Iterable[object]) -> bool:
    """``sender`` (normalised) against the consent's list: numeric entries are prefixes, others exact."""
    for entry in allowed:
        if not isinstance(entry, str) or not entry.strip():
            continue
        if entry.strip() == "*":
            return True
        wanted = normalise_number(entry)
        if _NUMERIC.fullmatch(wanted):
            if sender.startswith(wanted):
                return True
        elif sender.casefold() == wanted.casefold():
            return True
    return False


def _consent_problem(facts: SmsFacts, now: datetime) -> tuple[ReadoutCode, str] | None:
    consent = facts.consent
    if consent is None or consent.purpose != READ_SMS:
        return "no_consent", "no consent to read SMS in the home"
    if consent.tenant_id != facts.tenant_id or consent.subscriber_id != facts.subscriber_id:
        return "consent_foreign", "the consent belongs to another tenant or subscriber: ignored"
    if consent.revoked_at is not None:  # effective at once, whatever the clocks say
        return "consent_revoked", f"consent {consent.consent_id} was revoked"
    if consent.expires_at is not None and consent.expires_at <= now:
        return "consent_expired", f"consent {consent.consent_id} expired at {consent.expires_at.isoformat()}"
    return None


def _nothing(facts: SmsFacts, consent_id: str | None, reasons: list[str],
             codes: list[ReadoutCode]) -> SmsReadout:
    return SmsReadout(facts.sms_id, facts.tenant_id, consent_id, (), (), tuple(reasons), tuple(codes))


def decide_sms_readout(
    facts: SmsFacts,
    now: datetime,
    *,
    template: str = DEFAULT_TEMPLATE,
    max_age: timedelta = DEFAULT_MAX_AGE,
) -> SmsReadout:
    """Where ``facts``' message may be read aloud or shown at ``now`` (an aware datetime), and why."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if facts.subscriber_id is None:
        return _nothing(facts, None, ["the destination is not a subscriber of this tenant"], ["no_subscriber"])
    problem = _consent_problem(facts, now)
    if problem is not None:
        code, reason = problem
        return _nothing(facts, None, [reason], [code])
    consent = facts.consent
    assert consent is not None  # checked by _consent_problem
    reasons: list[str] = []
    codes: list[ReadoutCode] = []

    sender = normalise_number(facts.sender)
    blocked: set[str] = set()
    for policy in (facts.subscriber_policy, *(h.policy for h in facts.households)):
        if policy is not None:
            blocked.update(normalise_number(n) for n in policy.blocked_callers)
    if sender in blocked:
        return _nothing(facts, consent.consent_id, [f"sender {sender} is blocked"], ["sender_blocked"])
    allowed = consent.scope.get("allowed_senders")
    if not isinstance(allowed, list | tuple) or not sender_allowed(sender, allowed):
        return _nothing(facts, consent.consent_id, [f"sender {sender} is not on the consent's allowed senders"],
                        ["sender_not_allowed"])
    if facts.received_at is not None and now - facts.received_at > max_age:
        return _nothing(facts, consent.consent_id,
                        [f"the message is older than {int(max_age.total_seconds())} s: not read out late"],
                        ["stale"])
    if not facts.households:
        return _nothing(facts, consent.consent_id, ["the subscriber belongs to no household"], ["no_household"])

    read_aloud: list[Target] = []
    show_text: list[Target] = []
    for home in facts.households:
        hh = home.household_id
        if home.presence != "home":
            reasons.append(f"household {hh}: presence is {home.presence}, messages are read only when "
                           "someone is home")
            codes.append("nobody_home")
            continue
        policy = facts.subscriber_policy or home.policy or PolicyFacts()
        silent = False
        if policy.dnd:
            silent = True
            reasons.append(f"household {hh}: do-not-disturb is on, speakers stay silent")
            codes.append("dnd")
        if in_quiet_hours(policy.quiet_start, policy.quiet_end, home.time_zone, now):
            silent = True
            reasons.append(f"household {hh}: quiet hours {_hhmm(policy.quiet_start)}-{_hhmm(policy.quiet_end)} "
                           f"{home.time_zone} are on, speakers stay silent")
            codes.append("quiet_hours")
        for device in home.devices:
            tts = "tts" in device.capabilities
            display = "display" in device.capabilities
            if not (tts or display) or not device.enabled:
                continue
            label = device.name or device.device_id
            if not device.online:
                reasons.append(f"device {label} is offline: skipped")
                codes.append("device_offline")
                continue
            if device.connector is None or device.connector_ref is None:
                if tts and device.sip_uri is not None:
                    reasons.append(f"device {label} is SIP-only: SMS playback over FreeSWITCH is not supported, "
                                   "cloud speakers only")
                    codes.append("device_sip_only")
                else:
                    reasons.append(f"device {label} has no connector: skipped")
                    codes.append("device_no_connector")
                continue
            target = Target(device.device_id, hh, device.connector, device.connector_ref, device.name)
            if tts and not silent:
                read_aloud.append(target)
            elif display:
                show_text.append(target)
    if not (read_aloud or show_text):
        reasons.append("no device can read or show the message")
        codes.append("no_target")
        return _nothing(facts, consent.consent_id, reasons, codes)
    body = facts.body[:MAX_TEXT_CHARS]
    text = template.format(sender=sender, body=body)
    if read_aloud:
        reasons.append(f"read aloud on {len(read_aloud)} device(s) under consent {consent.consent_id}")
    if show_text:
        reasons.append(f"shown as text on {len(show_text)} device(s) under consent {consent.consent_id}")
    return SmsReadout(facts.sms_id, facts.tenant_id, consent.consent_id, tuple(read_aloud), tuple(show_text),
                      tuple(reasons), tuple(codes), text, f"SMS from {sender}")
