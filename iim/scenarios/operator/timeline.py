"""One time-ordered timeline of an incident from its rows (pure: no I/O, no clock)."""

from __future__ import annotations

from typing import Literal

from iim.scenarios.engine import IncidentState
from iim.scenarios.operator.models import ActionEntry, AuditLine, EventEntry, SmsEntry, TimelineEntry

__all__ = ["merge", "DECISIONS"]

#: Audit actions that are the scenario's (or an operator's) decisions on the incident.
DECISIONS = frozenset({f"incident.{s.value}" for s in IncidentState}
                      | {"incident.opened", "incident.held", "incident.reopened", "incident.operator_decision"})
# Kinds of sort order at the same instant: what caused it first.
_ORDER = {"event": 0, "decision": 1, "call": 2, "record": 2, "notify": 2, "sms": 3, "audit": 4}


def _action(a: ActionEntry) -> TimelineEntry:
    where = f" to {a.destination}" if a.destination else ""
    outcome = a.outcome or "running"
    detail = f" ({a.detail})" if a.detail else ""
    return TimelineEntry(at=a.started_at, kind=a.kind, ref=a.key, summary=f"step {a.step}: {a.kind}{where}: "
                                                                             f"{outcome}{detail}")


def _sms(s: SmsEntry) -> TimelineEntry:
    error = f" ({s.last_error})" if s.last_error else ""
    return TimelineEntry(at=s.created_at, kind="sms", ref=s.key,
                         summary=f"SMS to {s.msisdn}: {s.status} after {s.attempts} attempt(s){error}")


def _audit(line: AuditLine) -> TimelineEntry:
    kind: Literal["decision", "audit"] = "decision" if line.action in DECISIONS else "audit"
    reason = line.detail.get("reason") or line.detail.get("note") or line.detail.get("outcome") or ""
    text = f"{line.action} by {line.actor}" + (f": {reason}" if reason else "")
    return TimelineEntry(at=line.at, kind=kind, ref=str(line.id), summary=text[:500])


def merge(events: list[EventEntry], actions: list[ActionEntry], sms: list[SmsEntry],
          audit: list[AuditLine]) -> list[TimelineEntry]:
    """Every row as one line, oldest first; at the same instant, the event, then the decision, then what it did."""
    lines = [TimelineEntry(at=e.received_at, kind="event", ref=e.event_id,
                           summary=f"device event {e.type} (occurred {e.occurred_at.isoformat()}, via {e.channel})")
             for e in events]
    lines += [_action(a) for a in actions if a.kind != "sms"]  # an SMS action is shown as its outbox row
    lines += [_sms(s) for s in sms]
    lines += [_audit(a) for a in audit]
    return sorted(lines, key=lambda e: (e.at, _ORDER[e.kind]))
