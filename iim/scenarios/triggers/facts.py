"""Pure side of call and SMS triggers: the offer, its facts for the engine, and the scenario it starts.

No I/O: :mod:`iim.scenarios.triggers.intake` reads the households and writes the incident; ``iim scenario
simulate`` builds the same facts from the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from iim.core.numbering import DEFAULT_PLAN, NumberingPlan, try_e164
from iim.scenarios.engine import Contact, IncidentFacts, keyword_in, select_scenario
from iim.scenarios.model import CommsEvent, Scenario, TriggerKind
from policy_cache.models import PresenceState

__all__ = ["EVENT_OF", "TriggerOffer", "comms_facts", "choose", "sender_e164"]

EVENT_OF = {TriggerKind.CALL: CommsEvent.INCOMING_CALL, TriggerKind.SMS: CommsEvent.INCOMING_SMS}


@dataclass(frozen=True, slots=True)
class TriggerOffer:
    """An incoming call or SMS to one of our subscribers, as the call or SMS path saw it.

    ``sender``: the caller id or SMS source as received (any form the tenant's numbering plan reads);
    ``ref``: what makes it unique (``call:<uuid>``, ``sms:<id>``); ``text``: the SMS body (matched, never stored);
    ``sender_guess``: the SMS transport's E.164 reading of ``sender``, taken only when the plan cannot read it (a
    foreign number sent without its ``+``).
    """

    kind: TriggerKind
    tenant_id: UUID
    subscriber_id: UUID
    sender: str
    ref: str
    at: datetime
    text: str | None = None
    sender_guess: str | None = None


def sender_e164(sender: str, plan: NumberingPlan | None) -> str | None:
    """The sender in E.164 under the tenant's plan (None: withheld or not a number, so no sender condition holds)."""
    return try_e164(sender, plan or DEFAULT_PLAN) if sender else None


def comms_facts(kind: TriggerKind, *, sender: str, household_name: str, time_zone: str, presence: PresenceState,
                contacts: Sequence[Contact], home_targets: Sequence[str], at: datetime,
                text: str | None = None) -> IncidentFacts:
    """The engine's facts for a call or an SMS from ``sender`` (E.164) to a household: no device; ``{device}``
    renders as the sender's number and ``{sender}`` as their name when they are a contact."""
    return IncidentFacts(
        event_type=EVENT_OF[kind], device_type=None, device_id=None, device_name=sender, device_status=None,
        device_sip_uri=None, household_name=household_name, presence=presence, time_zone=time_zone,
        contacts=tuple(contacts), home_targets=tuple(home_targets), occurred_at=at, sender=sender,
        text=text if kind is TriggerKind.SMS else None)


def choose(scenarios: Sequence[Scenario], facts: IncidentFacts, now: datetime) -> tuple[Scenario | None, str | None]:
    """The household's first scenario this call or SMS starts, and the keyword it matched (SMS). Unlike device
    events, the shipped templates are never a default here: announcing every call must be asked for."""
    scenario = select_scenario(scenarios, facts, now)
    if scenario is None or not scenario.trigger.keywords:
        return scenario, None
    return scenario, keyword_in(scenario.trigger.keywords, facts.text or "")
