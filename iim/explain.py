"""``iim explain-call``: what IIM would do with a call, and every rule that shaped it."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from fs_app.dialstring import DialSettings, bridge_dial_string
from fs_app.routing import CallFacts, RoutingDecision, decide
from iim.core.numbering import DEFAULT_PLAN, NumberingPlan, try_e164
from policy_cache.presence import resolve_presence
from policy_cache.snapshot import RoutingSnapshot
from policy_cache.store import PgPolicyStore


def parse_at(value: str | None, zone: str) -> datetime:
    """``--at``: ISO 8601; without an offset it is the subscriber's local time."""
    if value is None:
        return datetime.now(UTC)
    at = datetime.fromisoformat(value)
    return at if at.tzinfo is not None else at.replace(tzinfo=ZoneInfo(zone))


async def find_snapshot(store: PgPolicyStore, number: str) -> RoutingSnapshot | None:
    ids = await store.find_subscriber_ids(number)
    snapshots = await store.load_subscribers(ids)
    return snapshots[0] if snapshots else None


def explain(snapshot: RoutingSnapshot, to: str, caller: str | None, at_text: str | None,
            dial: DialSettings, plan: NumberingPlan = DEFAULT_PLAN) -> tuple[RoutingDecision, dict[str, object]]:
    """The decision for a call to ``snapshot``'s subscriber; the caller is read under ``plan`` (the
    subscriber's tenant's numbering plan) as the router reads it."""
    at = parse_at(at_text, snapshot.time_zone)
    if caller and not caller.startswith("+"):
        caller = try_e164(caller, plan) or caller
    decision = decide(snapshot, CallFacts(snapshot.msisdn, caller), at)
    presence = resolve_presence(snapshot.presence, snapshot.presence_claims, at.timestamp())
    report: dict[str, object] = {
        "to": to, "from": caller,
        "at": at.isoformat(), "local_time": at.astimezone(ZoneInfo(snapshot.time_zone)).isoformat(),
        "time_zone": snapshot.time_zone,
        "subscriber_id": snapshot.subscriber_id, "tenant_id": snapshot.tenant_id,
        "policy_version": snapshot.policy_version,
        "action": decision.action,
        "groups": [[asdict(leg) for leg in group] for group in decision.groups],
        "announcements": [asdict(a) for a in decision.announcements],
        "fallback": decision.fallback,
        "reject_cause": decision.reject_cause,
        "rules": list(decision.rules),
        "presence": {
            "state": presence.state, "source": presence.source, "subject": presence.subject,
            "until": None if presence.until is None else datetime.fromtimestamp(presence.until, UTC).isoformat(),
            "baseline": snapshot.presence, "explanation": presence.describe(),
            "claims": [{"source": c.source, "subject": c.subject, "state": c.state,
                        "observed_at": datetime.fromtimestamp(c.observed_at, UTC).isoformat(),
                        "expires_at": datetime.fromtimestamp(c.expires_at, UTC).isoformat(),
                        "live": c.expires_at > at.timestamp(), "basis": c.basis}
                       for c in snapshot.presence_claims],
        },
    }
    if decision.action == "ring":
        report["dial_string"] = bridge_dial_string(decision, dial)
    return decision, report


def render(report: dict[str, object], *, as_json: bool) -> str:
    if as_json:
        return json.dumps(report, indent=2, ensure_ascii=False)
    lines = [
        (f"Call to {report['to']} from {report['from'] or 'unknown'} at {report['local_time']} "
         f"({report['time_zone']})"),
        f"Subscriber {report['subscriber_id']} (tenant {report['tenant_id']}), policy v{report['policy_version']}",
        f"Decision: {report['action']}",
    ]
    presence = report.get("presence")
    if isinstance(presence, dict):
        lines.insert(2, f"Presence: {presence['explanation']}")
    groups = report.get("groups") or []
    assert isinstance(groups, list)
    for i, group in enumerate(groups, 1):
        legs = ", ".join(f"{leg['kind']} {leg['target']} ({leg['timeout_s']} s)" for leg in group)
        lines.append(f"  {i}. {'together: ' if len(group) > 1 else ''}{legs}")
    announcements = report.get("announcements") or []
    assert isinstance(announcements, list)
    if announcements:
        lines.append("  announce through the vendor cloud: " + ", ".join(a["endpoint"] for a in announcements))
    if report.get("reject_cause"):
        lines.append(f"  reject with {report['reject_cause']}")
    lines.append(f"  nobody answers: {report['fallback']}")
    if "dial_string" in report:
        lines.append(f"Dial string: {report['dial_string']}")
    lines.append("Rules:")
    rules = report.get("rules") or []
    assert isinstance(rules, list)
    lines += [f"  - {rule}" for rule in rules]
    return "\n".join(lines)
