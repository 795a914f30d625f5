"""Which consent an incident's action needs, and whether the people it is about hold it (pure).

The purposes (``iim.consent_purpose``) checked here:

* ``health_events``: an incident of a health event (a fall, an abnormal pulse) is spoken about (calls, SMS,
  notifications all carry it) only when its subjects consented;
* ``call_recording``: a ``record_message`` step records only then;
* ``emergency_escalation``: calls to people outside the household (backup contacts, the security service)
  are placed only then.

The subjects are the household's people the device is about: the owners and members bound to the device
itself (the wearer of a wearable), else the household's owners (else its members). Every subject must hold
the purpose; no subject means no consent. A refused action fails (outcome ``refused``, one audit line); the
engine moves on as for any action that reached nobody, so a refusal never blocks the rest of the alarm.
"""

from __future__ import annotations

from dataclasses import dataclass

from iim.scenarios.engine import Action, Contact, IncidentFacts, Notify, PlaceCall, RecordMessage, SendSms
from iim.scenarios.model import ContactRole
from iot_bridge.event_types import EventType

__all__ = ["HEALTH_EVENTS", "ConsentRefusal", "refusal", "subjects"]

HEALTH_EVENTS = frozenset({EventType.FALL, EventType.PULSE})
_HOUSEHOLD = frozenset({ContactRole.OWNER, ContactRole.MEMBER})
_OUTSIDE = frozenset({ContactRole.BACKUP_CONTACT, ContactRole.SECURITY_SERVICE})


@dataclass(frozen=True, slots=True)
class ConsentRefusal:
    purpose: str
    detail: str


def subjects(facts: IncidentFacts) -> tuple[Contact, ...]:
    """The people the incident is about (see the module doc)."""
    household = [c for c in facts.contacts if c.role in _HOUSEHOLD]
    for pick in ([c for c in household if c.device_bound], [c for c in household if c.role is ContactRole.OWNER],
                 household):
        if pick:
            return tuple(pick)
    return ()


def _missing(facts: IncidentFacts, purpose: str) -> str | None:
    people = subjects(facts)
    if not people:
        return f"no {purpose} consent: the household has nobody who could give it"
    without = [c.name or c.subscriber_id for c in people if purpose not in c.consents]
    if without:
        return f"no {purpose} consent from {', '.join(without)}"
    return None


def refusal(action: Action, facts: IncidentFacts) -> ConsentRefusal | None:
    """Why ``action`` must not be performed for want of consent; None when it may."""
    if isinstance(action, RecordMessage):
        missing = _missing(facts, "call_recording")
        return None if missing is None else ConsentRefusal("call_recording", f"recording refused: {missing}")
    if facts.event_type in HEALTH_EVENTS and isinstance(action, PlaceCall | SendSms | Notify):
        missing = _missing(facts, "health_events")
        if missing is not None:
            return ConsentRefusal("health_events", f"{action.kind} about a {facts.event_type.value} event refused: "
                                                   f"{missing}")
    if isinstance(action, PlaceCall) and action.role in _OUTSIDE:
        missing = _missing(facts, "emergency_escalation")
        if missing is not None:
            return ConsentRefusal("emergency_escalation", f"call to the {action.role} refused: {missing}")
    return None
