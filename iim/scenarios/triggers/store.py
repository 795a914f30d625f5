"""PostgreSQL side of call and SMS triggers: the households a callee belongs to, and opening their incident.

Each function runs inside the caller's tenant-scoped transaction. An incident a call or SMS starts is written
with its chosen scenario and a deadline of now, in state ``open`` at step 0: the scenario worker's next look at
it (the tick job queued here, or the deadline sweep if that job is lost) emits the first group, exactly as
:func:`iim.scenarios.engine.advance` does for any due open incident. The SMS text never reaches a row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from iim.core.numbering import NumberingPlan
from iim.scenarios import store as incidents
from iim.scenarios.engine import Contact
from iim.scenarios.model import CommsEvent, ContactRole, Scenario
from iot_bridge.intake import IncidentJobs
from policy_cache import jobs
from policy_cache.db import Connection
from policy_cache.models import PresenceState

__all__ = ["HouseholdFacts", "Opened", "households_of", "open_incident"]

# Every household the callee (or SMS recipient) is bound to, with what the engine decides on: contacts bound to
# the household (not to one device: there is no device here), ringing speakers, the resolved presence.
_HOUSEHOLDS = """
SELECT h.id, h.name, h.time_zone, h.presence::text AS presence, extract(epoch FROM now())::float8 AS db_now,
       (SELECT coalesce(json_agg(json_build_array(c.source, c.subject, c.state, extract(epoch FROM c.observed_at),
                                                  extract(epoch FROM c.expires_at))), '[]')
          FROM iim.presence_claim c WHERE c.household_id = h.id AND c.expires_at > now()) AS presence_claims,
       (SELECT coalesce(json_agg(json_build_object('role', b.role, 'priority', b.priority, 'msisdn', s.msisdn,
                                                   'id', s.id, 'name', s.display_name,
                                                   'consents', ARRAY(
                                                       SELECT c.purpose FROM iim.consent c
                                                        WHERE c.subscriber_id = s.id AND c.revoked_at IS NULL
                                                          AND (c.expires_at IS NULL OR c.expires_at > now())))
                                 ORDER BY b.priority, s.msisdn), '[]')
          FROM iim.binding b JOIN iim.subscriber s ON s.tenant_id = b.tenant_id AND s.id = b.subscriber_id
         WHERE b.household_id = h.id AND b.device_id IS NULL) AS contacts,
       (SELECT coalesce(json_agg(x.sip_uri ORDER BY x.name), '[]') FROM iim.device x
         WHERE x.household_id = h.id AND x.enabled AND x.sip_uri IS NOT NULL AND x.type = 'speaker'
           AND 'sip' = ANY (x.capabilities)) AS home,
       (SELECT json_build_array(p.country_code, p.trunk_prefix, p.international_prefixes, p.national_lengths)
          FROM iim.numbering_plan p) AS numbering_plan
  FROM iim.household h
 WHERE h.id IN (SELECT b.household_id FROM iim.binding b WHERE b.subscriber_id = $1)
 ORDER BY h.id"""

# Conflicts: the same trigger reference (a replay: nothing) or a live incident of the same household, trigger and
# sender (joined: its count goes up). Either way no second incident.
_OPEN = """
INSERT INTO iim.incident (household_id, device_id, hazard, sender, first_event_id, scenario, deadline, reason)
VALUES ($1, NULL, $2, $3, $4, $5::jsonb, now(), $6)
ON CONFLICT DO NOTHING RETURNING id"""
_JOIN = """
UPDATE iim.incident SET event_count = event_count + 1, last_event_at = now(), updated_at = now()
 WHERE household_id = $1 AND hazard = $2 AND sender = $3 AND device_id IS NULL AND state IN ('open', 'notifying')
   AND NOT EXISTS (SELECT 1 FROM iim.incident r WHERE r.device_id IS NULL AND r.first_event_id = $4)
RETURNING id"""


@dataclass(frozen=True, slots=True)
class HouseholdFacts:
    """A household as a call or SMS trigger sees it (before any incident exists)."""

    id: UUID
    name: str
    time_zone: str
    presence: PresenceState
    contacts: tuple[Contact, ...]
    home_targets: tuple[str, ...]
    #: the tenant's numbering plan (None: the default)
    numbering_plan: NumberingPlan | None


@dataclass(frozen=True, slots=True)
class Opened:
    """What writing a triggered incident did: ``opened`` a new one, ``joined`` a live one, or ``replayed``."""

    kind: Literal["opened", "joined", "replayed"]
    incident_id: UUID | None


async def households_of(conn: Connection, subscriber_id: UUID) -> list[HouseholdFacts]:
    """The households ``subscriber_id`` is bound to, with their contacts, speakers and live presence."""
    out: list[HouseholdFacts] = []
    for row in await conn.fetch(_HOUSEHOLDS, subscriber_id):
        plan = row["numbering_plan"]
        out.append(HouseholdFacts(
            id=row["id"], name=row["name"], time_zone=row["time_zone"],
            presence=incidents.live_presence(row["presence"], row["presence_claims"], row["db_now"]),
            contacts=tuple(_contact(c) for c in row["contacts"]), home_targets=tuple(row["home"]),
            numbering_plan=None if plan is None else NumberingPlan(plan[0], plan[1], tuple(plan[2]), tuple(plan[3]))))
    return out


def _contact(c: dict[str, Any]) -> Contact:
    return Contact(role=ContactRole(c["role"]), msisdn=c["msisdn"], subscriber_id=str(c["id"]),
                   priority=c["priority"], name=c["name"], consents=frozenset(c["consents"]))


async def open_incident(conn: Connection, tenant_id: UUID, household_id: UUID, event: CommsEvent, sender: str,
                        ref: str, scenario: Scenario, *, detail: dict[str, Any]) -> Opened:
    """Write the incident ``ref`` (``call:<uuid>``, ``sms:<id>``) started for ``household_id`` with ``scenario``,
    due now, its audit line (``incident.triggered``, ``detail``) and the tick job that starts it."""
    reason = f"started by an {event.value.replace('_', ' ')} ({scenario.name})"
    incident_id: UUID | None = await conn.fetchval(
        _OPEN, household_id, event.value, sender, ref, scenario.model_dump(mode="json"), reason)
    if incident_id is None:
        joined: UUID | None = await conn.fetchval(_JOIN, household_id, event.value, sender, ref)
        if joined is None:
            return Opened("replayed", None)
        await incidents.audit(conn, tenant_id, "scenario-trigger", "incident.repeat", joined,
                              {**detail, "reason": "the same sender again while its incident is live: joined"},
                              event_id=ref)
        return Opened("joined", joined)
    await incidents.audit(conn, tenant_id, "scenario-trigger", "incident.triggered", incident_id,
                          {**detail, "reason": reason}, event_id=ref)
    payload = json.dumps({"tenant": str(tenant_id), "incident": str(incident_id), "reason": "opened"}).encode()
    await jobs.queries_for(conn).enqueue(IncidentJobs.TICK, payload, priority=10, dedupe_key=f"open:{incident_id}",
                                         on_conflict="skip")
    return Opened("opened", incident_id)
