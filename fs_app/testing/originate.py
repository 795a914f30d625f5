"""Originate planning: which leg rings, answers or fails when, for a parsed dial string.

Every callee behaviour is scripted (:class:`TargetBehaviour`), so the outcome of a
``bridge``/``originate`` can be planned up front as a timeline per ``|`` group:

* a leg that answers at ``t`` wins unless it failed or timed out earlier;
* ``leg_timeout`` ends a ringing leg with ALLOTTED_TIMEOUT;
* the group deadline (``originate_timeout``, else ``call_timeout``, else 60 s) ends it with
  NO_ANSWER; FreeSWITCH restarts that timer for every ``|`` group;
* a leg with ``group_confirm_key`` that answers does not win yet: it hears ``group_confirm_file`` and wins
  when its callee presses the key (see :func:`_confirm`);
* when nothing answers the group fails with NO_ANSWER if its deadline ended it, else with the cause of
  the first leg in dial order that had a channel (``switch_ivr_originate``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fs_app.testing.channel import CallerProfile
from fs_app.testing.core import new_uuid
from fs_app.testing.dialstring import DialLeg, DialString
from fs_app.testing.spec import TargetBehaviour

DEFAULT_ORIGINATE_TIMEOUT_S = 60.0
#: the confirm files of a dial string: their lengths in ms, None for one that does not open
ConfirmMedia = Mapping[str, float | None]


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


def confirm_files(dial: DialString) -> set[str]:
    """The ``group_confirm_file`` of every leg that must confirm (to look up before planning)."""
    return {dial.leg_var(leg, "group_confirm_file") or "" for leg in dial.legs
            if dial.leg_var(leg, "group_confirm_key")} - {""}


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "yes", "on", "1", "enabled", "active", "allow")


def _confirm(plan: LegPlan, dial: DialString, media: ConfirmMedia, *, limit: float | None, deadline: float,
             scale: float) -> None:
    """An answered leg with ``group_confirm_key``: FreeSWITCH's collect thread plays ``group_confirm_file`` and
    reads ``len(key)`` digits (``group_confirm_read_timeout``, 5 s) over and over until the callee presses the
    key (the leg wins then) or the leg is hung up: at once with DESTINATION_OUT_OF_ORDER when the file does
    not open, else by its time limit (ALLOTTED_TIMEOUT) or the originate deadline. The limit is ``leg_timeout``
    from the start, or the leg's ``group_confirm_timeout`` from the answer (0: none), or none with
    ``{group_confirm_cancel_timeout=true}``; a ``[group_confirm_cancel_timeout]`` on the leg changes nothing.
    The callee presses its scripted keys (``TargetBehaviour.dtmf``) one try each, after the prompt; once they
    run out it stays silent until the leg is hung up."""
    leg = plan.leg
    key = dial.leg_var(leg, "group_confirm_key") or ""
    answered = plan.answer_at
    if not key or answered is None:
        return
    file = dial.leg_var(leg, "group_confirm_file") or ""
    prompt_ms: float | None = 0.0 if not file or file.lower() == "silence" else media.get(file)
    if prompt_ms is None:
        plan.answer_at, plan.fail_at, plan.fail_cause = None, answered, "DESTINATION_OUT_OF_ORDER"
        return
    own = dial.leg_var(leg, "group_confirm_timeout")
    if own is not None and own.strip().isdigit():
        limit = answered + int(own) * scale if int(own) > 0 else None
    elif _true(dial.vars.get("group_confirm_cancel_timeout")):
        limit = None
    end = min(limit, deadline) if limit is not None else deadline
    t = answered
    keys = plan.target.dtmf
    while keys and t <= end:
        t += prompt_ms / 1000.0 * scale
        pressed, keys = keys[:len(key)], keys[len(key):]
        if pressed == key and t <= end:
            plan.answer_at = t
            return
    plan.answer_at = None
    if limit is not None and limit <= deadline:
        plan.fail_at, plan.fail_cause = max(limit, answered), "ALLOTTED_TIMEOUT"
    else:
        plan.fail_at, plan.fail_cause = deadline, "NO_ANSWER"


def plan_group(
    dial: DialString,
    legs: tuple[DialLeg, ...],
    target_for: Callable[[str], TargetBehaviour],
    *,
    timeout_s: float,
    scale: float,
    confirm_media: ConfirmMedia | None = None,
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
        limit = leg_timeout * scale if leg_timeout is not None and plan.creates_channel else None
        if limit is not None and (plan.answer_at is None or plan.answer_at > limit) and (
                plan.fail_at is None or plan.fail_at > limit):
            plan.answer_at, plan.fail_at, plan.fail_cause = None, limit, "ALLOTTED_TIMEOUT"
        if plan.answer_at is not None and plan.answer_at > deadline:
            plan.answer_at = None
        _confirm(plan, dial, confirm_media or {}, limit=limit, deadline=deadline, scale=scale)
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
    for plan in plans:
        causes[plan.uuid] = plan.fail_cause or "NORMAL_CLEARING"
    with_channel = [p for p in plans if p.creates_channel]
    if any(p.fail_cause == "NO_ANSWER" and p.fail_at == deadline for p in with_channel):
        cause = "NO_ANSWER"  # the deadline ended the originate (IDX_TIMEOUT)
    elif with_channel:
        cause = with_channel[0].fail_cause or "NORMAL_CLEARING"
    else:
        cause = max(plans, key=lambda p: p.fail_at or 0.0).fail_cause or "NORMAL_CLEARING"
    return GroupPlan(plans, None, end_at, cause, causes)


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
