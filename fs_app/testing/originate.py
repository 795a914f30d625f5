"""Originate planning: which leg rings, answers or fails when, for a parsed dial string.

Every callee behaviour is scripted (:class:`TargetBehaviour`), so the outcome of a
``bridge``/``originate`` can be planned up front as a timeline per ``|`` group:

* a leg that answers at ``t`` wins unless it failed or timed out earlier;
* ``leg_timeout`` ends a ringing leg with ALLOTTED_TIMEOUT;
* the group deadline (``originate_timeout``, else ``call_timeout``, else 60 s) ends it with
  NO_ANSWER; FreeSWITCH restarts that timer for every ``|`` group;
* when nothing answers the group fails with the cause of the last leg to fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fs_app.testing.channel import CallerProfile
from fs_app.testing.core import new_uuid
from fs_app.testing.dialstring import DialLeg, DialString
from fs_app.testing.spec import TargetBehaviour

DEFAULT_ORIGINATE_TIMEOUT_S = 60.0


@dataclass(slots=True)
class LegPlan:
    leg: DialLeg
    target: TargetBehaviour
    uuid: str
    user: str
    ring_at: float | None = None
    answer_at: float | None = None
    fail_at: float | None = None
    fail_cause: str | None = None
    creates_channel: bool = True

    @property
    def endpoint(self) -> str:
        return self.leg.endpoint


@dataclass(slots=True)
class GroupPlan:
    legs: list[LegPlan]
    winner: LegPlan | None
    end_at: float
    cause: str
    causes: dict[str, str] = field(default_factory=dict)

    def events(self) -> list[tuple[float, str, LegPlan]]:
        """(time, "ring" | "fail" | "answer", leg) in time order, up to the group's end."""
        out: list[tuple[float, str, LegPlan]] = []
        for leg in self.legs:
            if leg.ring_at is not None and leg.ring_at <= self.end_at:
                out.append((leg.ring_at, "ring", leg))
            if leg is self.winner and leg.answer_at is not None:
                out.append((leg.answer_at, "answer", leg))
            elif leg.fail_at is not None and leg.fail_at <= self.end_at:
                out.append((leg.fail_at, "fail", leg))
        order = {"fail": 0, "ring": 1, "answer": 2}
        out.sort(key=lambda item: (item[0], order[item[1]]))
        return out


def endpoint_user(endpoint: str) -> tuple[str, str, int]:
    """(user, host, port) of an endpoint such as ``sofia/external/u@h:p`` or ``sofia/gateway/gw/num``."""
    parts = endpoint.split("/")
    if len(parts) >= 4 and parts[0] == "sofia" and parts[1] == "gateway":
        return parts[3].split("@")[0], parts[2], 0
    last = parts[-1]
    user, _, hostport = last.partition("@")
    host, _, port = hostport.partition(":")
    return user, host or "127.0.0.1", int(port) if port.isdigit() else 0


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number > 0 else None


def plan_group(
    dial: DialString,
    legs: tuple[DialLeg, ...],
    target_for: Callable[[str], TargetBehaviour],
    *,
    timeout_s: float,
    scale: float,
) -> GroupPlan:
    """Plan one simultaneous group. Times are seconds from the group's start, already scaled."""
    plans: list[LegPlan] = []
    deadline = timeout_s * scale
    for leg in legs:
        target = target_for(leg.endpoint)
        user, _, _ = endpoint_user(leg.endpoint)
        plan = LegPlan(leg, target, new_uuid(), user)
        delay = target.after_ms / 1000.0 * scale
        if target.kind == "answer":
            plan.ring_at = 0.0 if target.ring else None
            plan.answer_at = delay
        elif target.kind == "no_answer":
            plan.ring_at = 0.0
        elif target.kind == "not_registered":
            plan.fail_at, plan.fail_cause, plan.creates_channel = 0.0, target.cause, False
        else:
            plan.ring_at = 0.0 if target.ring else None
            plan.fail_at, plan.fail_cause = delay, target.cause
        leg_timeout = _seconds(dial.leg_var(leg, "leg_timeout"))
        if leg_timeout is not None and plan.creates_channel:
            limit = leg_timeout * scale
            if (plan.answer_at is None or plan.answer_at > limit) and (plan.fail_at is None or plan.fail_at > limit):
                plan.answer_at, plan.fail_at, plan.fail_cause = None, limit, "ALLOTTED_TIMEOUT"
        if plan.answer_at is not None and plan.answer_at > deadline:
            plan.answer_at = None
        if plan.answer_at is None and (plan.fail_at is None or plan.fail_at > deadline):
            plan.fail_at, plan.fail_cause = deadline, "NO_ANSWER"
        plans.append(plan)
    candidates = [p for p in plans if p.answer_at is not None]
    winner = min(candidates, key=lambda p: p.answer_at or 0.0) if candidates else None
    causes: dict[str, str] = {}
    if winner is not None:
        end_at = winner.answer_at or 0.0
        for plan in plans:
            if plan is winner:
                causes[plan.uuid] = "NONE"
            elif plan.fail_at is not None and plan.fail_at <= end_at:
                causes[plan.uuid] = plan.fail_cause or "NORMAL_CLEARING"
            else:
                causes[plan.uuid] = "LOSE_RACE"
        return GroupPlan(plans, winner, end_at, "SUCCESS", causes)
    end_at = max(p.fail_at or 0.0 for p in plans)
    last = max(plans, key=lambda p: p.fail_at or 0.0)
    for plan in plans:
        causes[plan.uuid] = plan.fail_cause or "NORMAL_CLEARING"
    return GroupPlan(plans, None, end_at, last.fail_cause or "NORMAL_CLEARING", causes)


def originatee_profile(
    a_profile: CallerProfile, leg: LegPlan, *, channel_name: str, created_us: int, callee_id_name: str
) -> CallerProfile:
    """The ``Other-Leg-*`` profile of a bridge B-leg as the A-leg reports it (originatee)."""
    values = {
        "Direction": "outbound",
        "Logical-Direction": "inbound",
        "Username": a_profile.get("Username") or "",
        "Dialplan": a_profile.get("Dialplan") or "",
        "Caller-ID-Name": a_profile.get("Caller-ID-Name") or "",
        "Caller-ID-Number": a_profile.get("Caller-ID-Number") or "",
        "Orig-Caller-ID-Name": a_profile.get("Caller-ID-Name") or "",
        "Orig-Caller-ID-Number": a_profile.get("Caller-ID-Number") or "",
        "Callee-ID-Name": callee_id_name,
        "Callee-ID-Number": leg.user,
        "Network-Addr": a_profile.get("Network-Addr") or "",
        "ANI": a_profile.get("ANI") or "",
        "Destination-Number": leg.user,
        "Unique-ID": leg.uuid,
        "Source": "mod_sofia",
        "Context": a_profile.get("Context") or "",
        "Channel-Name": channel_name,
        "Profile-Created-Time": str(created_us),
        "Channel-Created-Time": str(created_us),
    }
    return CallerProfile(values)


def array_value(items: list[str]) -> str:
    """FreeSWITCH's multi-value serialisation (``ARRAY::a|:b``); a single item stays plain."""
    if len(items) == 1:
        return items[0]
    return "ARRAY::" + "|:".join(items)
