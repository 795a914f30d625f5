"""Cloud-mode incoming calls (spec 3.2): a speaker without SIP announces the call through its vendor cloud.

The routing decision lists such speakers in ``RoutingDecision.announcements`` (only when the policy lets
the home ring: consent to announce calls, no quiet hours, presence...). The router then hands the call to
:func:`run_cloud_announcement`, which puts the announcement where the ring mode puts the home
(:func:`cloud_plan`, pure):

* **first** (``home_only``, ``home_then_phone`` with no SIP speaker): ``ring_ready``, then every announcing
  speaker is asked at once, "Call from <caller>, answer?" (accept / decline); the first accept wins and the
  other requests are cancelled. Accept -> the speaker's media path if its cloud gave one (a SIP/WebRTC AoR
  on our switch, ``detail="media=sip:<aor>"``), else the owner's phone. Decline or timeout -> in
  ``home_then_phone`` the mobile rings (the next step), in ``home_only`` the fallback. Unavailable (the
  cloud is down, unknown or refused) -> the mobile rings as routed without the home (spec 7.2).
* **alongside** (``simultaneous``, ``phone_then_home``, and every home that also has SIP speakers): the
  decision's dial string rings (the SIP legs and the mobile, in their order) and the announcement goes out
  at the home's turn (at once, or once the earlier groups have had their time). A leg answering cancels the
  announcement; when the ringing ends unanswered, an accept takes the call (the media path, or the mobile if
  it was not rung), anything else is the fallback. An accept while legs still ring waits for their end: the
  switch's bridge cannot be re-targeted from here.

Nobody took it -> the decision's fallback: voicemail, a recorded message, or a missed-call SMS (through the
SMS sink); a caller who hangs up first cancels the requests and still gets the missed-call SMS. The channel
side stays tenant-agnostic: this module only runs dialplan applications on the :class:`fs_app.call.Call`;
the tenant comes from the decision (for the SMS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal
from uuid import UUID

from fs_app.call import Call, bridge_result
from fs_app.dialstring import BRIDGE_IMPORT, DialSettings, bridge_dial_string
from fs_app.messages import take_message
from fs_app.passthrough import relay_cause
from fs_app.routing import Announcement, CallFacts, Leg, RoutingDecision
from iim.connectors.contract import Connector, ConnectorError, ConnectorUnavailable, UserActionRequest
from iim.home import metrics
from iim.home.missed_call import missed_call_key, missed_call_text
from iim.home.ports import ConnectorLookup, SmsSink

__all__ = [
    "AnnounceOutcome", "AnnounceResult", "AnswerSink", "CloudAnnouncer", "CloudPlan", "cloud_call_step", "cloud_plan",
    "run_cloud_announcement",
]

log = logging.getLogger("iim.home.call")

AnnounceResult = Literal["accept", "decline", "timeout", "unavailable"]
ACCEPT = "accept"
DECLINE = "decline"
# What a vendor may hand back with "accept" so we can bridge to the speaker itself.
_MEDIA = re.compile(r"media=sips?:([A-Za-z0-9._~+\-]{1,64}@[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?)")
_RANK: dict[AnnounceResult, int] = {"accept": 0, "decline": 1, "timeout": 2, "unavailable": 3}


@dataclass(frozen=True, slots=True)
class AnnounceOutcome:
    """How one announcement (or the best of several) ended."""

    result: AnnounceResult
    device_id: str
    detail: str = ""
    media_aor: str | None = None  # a SIP/WebRTC AoR to bridge to, when the speaker has a media path


class CloudAnnouncer:
    """Asks the household's cloud speakers whether to take a call.

    Args:
        connectors: connector instances by name (``Announcement.endpoint`` is ``"<connector>:<ref>"``).
        timeout_s: how long a person at home has to choose (the vendor is told; we wait ``grace_s`` more).
        prompt: what the speaker says; ``{caller}`` is the caller's number.
    """

    def __init__(
        self,
        connectors: ConnectorLookup,
        *,
        timeout_s: float = 20.0,
        grace_s: float = 2.0,
        prompt: str = "Call from {caller}, answer?",
        unknown_caller: str = "an unknown number",
    ) -> None:
        self._connectors = connectors
        self.timeout_s = timeout_s
        self._grace = grace_s
        self._prompt = prompt
        self._unknown = unknown_caller

    def _connector(self, name: str) -> Connector | None:
        try:
            return self._connectors.get(name)
        except (KeyError, ConnectorUnavailable):
            return None

    async def announce(self, call_facts: CallFacts, announcement: Announcement, caller: str | None
                       ) -> AnnounceOutcome:
        """Ask one speaker; never raises for the vendor's sake (errors are ``unavailable``)."""
        outcome = await self._announce(call_facts, announcement, caller)
        metrics.ANNOUNCEMENTS.labels(outcome.result).inc()
        log.info("call announced through the cloud", extra={
            "call_id": call_facts.uuid, "device_id": announcement.device_id, "result": outcome.result,
            "detail": outcome.detail})
        return outcome

    async def _announce(self, call_facts: CallFacts, announcement: Announcement, caller: str | None
                        ) -> AnnounceOutcome:
        device = announcement.device_id
        name, sep, ref = announcement.endpoint.partition(":")
        if not sep or not ref:
            return AnnounceOutcome("unavailable", device, "no connector reference")
        connector = self._connector(name)
        if connector is None:
            return AnnounceOutcome("unavailable", device, f"connector {name} is not loaded")
        if connector.health().state == "down":
            return AnnounceOutcome("unavailable", device, f"connector {name} is down")
        request = UserActionRequest(
            target=ref, prompt=self._prompt.format(caller=caller or self._unknown), options=(ACCEPT, DECLINE),
            timeout_s=self.timeout_s, correlation={"call_id": call_facts.uuid})
        try:
            answer = await asyncio.wait_for(connector.request_user_action(request), self.timeout_s + self._grace)
        except TimeoutError:
            return AnnounceOutcome("timeout", device, "no answer from the vendor in time")
        except ConnectorError as exc:  # ConnectorUnavailable included
            return AnnounceOutcome("unavailable", device, type(exc).__name__)
        if answer.choice is None:
            return AnnounceOutcome("timeout", device, "nobody chose")
        if answer.choice == DECLINE:
            return AnnounceOutcome("decline", device)
        if answer.choice != ACCEPT:
            return AnnounceOutcome("unavailable", device, "the vendor answered with an unknown choice")
        media = _MEDIA.search(answer.detail or "")
        return AnnounceOutcome("accept", device, media_aor=media.group(1) if media else None)

    async def announce_all(self, call_facts: CallFacts, announcements: Sequence[Announcement],
                           caller: str | None) -> AnnounceOutcome:
        """Ask every speaker at once: the first accept wins (the rest are cancelled); otherwise the most
        telling answer (decline > timeout > unavailable)."""
        if not announcements:
            return AnnounceOutcome("unavailable", "", "no speaker to announce on")
        tasks = [asyncio.ensure_future(self.announce(call_facts, a, caller)) for a in announcements]
        outcomes: list[AnnounceOutcome] = []
        try:
            for next_done in asyncio.as_completed(tasks):
                outcome = await next_done
                if outcome.result == "accept":
                    return outcome
                outcomes.append(outcome)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return min(outcomes, key=lambda o: _RANK[o.result])


#: Who took a call the home rang (the router's ``record_answer``): the answering device's id, None for the mobile.
AnswerSink = Callable[[CallFacts, RoutingDecision, str | None], None]


@dataclass(frozen=True, slots=True)
class CloudPlan:
    """When the announcement runs beside what the dial string rings (a pure reading of the decision).

    ``first``: the home is asked before anything rings (nothing else belongs to the home's turn);
    ``phone_after`` then says whether a decline or a timeout moves on to the mobile (the next step).
    ``alongside``: the dial string rings (SIP legs, the mobile) and the announcement is sent when the home's
    turn comes, ``delay_s`` after the bridge starts (0: at once), or as soon as that bridge fails.
    """

    when: Literal["first", "alongside"]
    delay_s: float = 0.0
    phone_after: bool = False


def cloud_plan(decision: RoutingDecision) -> CloudPlan:
    """The ring mode's order with the cloud speakers in it: simultaneous -> at once with the mobile;
    ``home_then_phone`` -> the home first, then the mobile; ``phone_then_home`` -> the mobile, then the home;
    ``home_only`` -> the home only. A home with SIP speakers rings them and announces at the same turn."""
    if any(leg.kind == "speaker" for leg in decision.legs):
        before = 0.0
        for group in decision.groups:
            if any(leg.kind == "speaker" for leg in group):
                break
            before += max(leg.timeout_s for leg in group)
        return CloudPlan("alongside", before)
    if decision.ring_mode == "simultaneous":
        return CloudPlan("alongside", 0.0)
    if decision.ring_mode == "phone_then_home":
        return CloudPlan("alongside", float(sum(max(leg.timeout_s for leg in g) for g in decision.groups)))
    return CloudPlan("first", phone_after=decision.ring_mode == "home_then_phone")


async def _bridge(call: Call, dial: str) -> tuple[bool, str | None, str | None]:
    """Bridge as the router does (one write: the variables, then the bridge); (answered, B-leg cause, device)."""
    events = await call.execute_many(
        [("multiset", f"continue_on_fail=true hangup_after_bridge=true {BRIDGE_IMPORT}"), ("bridge", dial)],
        timeout=None)
    result = bridge_result(events[-1])
    return result.answered, result.hangup_cause, result.device_id


async def _wait_unless_hung_up(call: Call, asking: asyncio.Future[AnnounceOutcome]) -> AnnounceOutcome | None:
    """The announcement's outcome, or ``None`` when the caller hangs up first (the requests are then cancelled)."""
    hangup = asyncio.ensure_future(call.wait_hangup())
    waiting: set[asyncio.Future[Any]] = {asking, hangup}
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hangup
    if not asking.done():
        await _cancel(asking)
        return None
    return asking.result()


async def _cancel(task: asyncio.Future[AnnounceOutcome]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _fallback(call: Call, decision: RoutingDecision, phone: Leg | None, dial_settings: DialSettings,
                    sms_sink: SmsSink | None, caller: str | None) -> str:
    """The decision's no-answer action (as the router runs it), then the missed-call SMS. A caller who has gone
    leaves no message but is still a missed call."""
    what = decision.fallback
    if what == "voicemail" and phone is not None and not call.hung_up:
        await take_message(call, dial_settings, phone.target, voicemail=True)
    elif what == "record_message" and not call.hung_up:
        await take_message(call, dial_settings, phone.target if phone else "", voicemail=False,
                           tenant=decision.tenant_id or "")
    msisdn = decision.msisdn or (phone.target if phone is not None else None)
    if what != "none" and msisdn and sms_sink is not None and decision.tenant_id:
        try:
            await sms_sink.send(UUID(decision.tenant_id), msisdn, missed_call_text(caller),
                                missed_call_key(call.uuid))
        except Exception:  # a lost SMS must not drop the call's hangup; logged with its traceback
            log.exception("missed-call SMS not queued", extra={"call_id": call.uuid})
            return f"{what}:sms_failed"
        return f"{what}:sms"
    return what


@dataclass(frozen=True, slots=True)
class _Ctx:
    call: Call
    decision: RoutingDecision
    announcer: CloudAnnouncer
    dial: DialSettings
    sms_sink: SmsSink | None
    facts: CallFacts
    phone: Leg | None
    on_answer: AnswerSink | None

    def answered(self, device: str | None) -> None:
        if self.on_answer is not None:
            legs = self.decision.legs
            self.on_answer(self.facts, self.decision, device if any(leg.device_id == device for leg in legs)
                           else None)

    async def ring(self, groups: tuple[tuple[Leg, ...], ...]) -> tuple[bool, str | None]:
        """Ring ``groups`` (this decision's settings); (answered, the B-leg cause)."""
        dial = bridge_dial_string(replace(self.decision, groups=groups), self.dial, call_uuid=self.call.uuid)
        answered, cause, device = await _bridge(self.call, dial)
        if answered:
            self.answered(device)
        return answered, cause


async def run_cloud_announcement(
    call: Call,
    decision: RoutingDecision,
    announcer: CloudAnnouncer,
    dial_settings: DialSettings,
    sms_sink: SmsSink | None,
    on_answer: AnswerSink | None = None,
) -> str:
    """Announce ``call`` on the decision's cloud speakers and act on the answer; returns what happened,
    ``"<announcement result>:<action>"`` (e.g. ``accept:phone``, ``decline:missed_call_sms:sms``,
    ``unavailable:phone``, ``timeout:phone_no_answer:missed_call_sms:sms``, ``rang:answered``,
    ``caller_hung_up:missed_call_sms:sms``)."""
    facts = CallFacts(decision.msisdn or call.destination_number or "", call.caller_id_number, call.uuid)
    phones = [leg for leg in decision.legs if leg.kind == "phone"]
    ctx = _Ctx(call, decision, announcer, dial_settings, sms_sink, facts, phones[0] if phones else None, on_answer)
    plan = cloud_plan(decision)
    if plan.when == "first":
        outcome_text = await _first(ctx, plan)
    else:
        outcome_text = await _alongside(ctx, plan)
    metrics.CLOUD_CALLS.labels(outcome_text.split(":", 1)[0]).inc()
    log.info("cloud-announced call handled", extra={"call_id": call.uuid, "outcome": outcome_text})
    return outcome_text


async def _finish(ctx: _Ctx, head: str, cause: str | None) -> str:
    """Nobody took it: the fallback (the SMS even when the caller has gone), then the hangup."""
    call = ctx.call
    done = await _fallback(call, ctx.decision, ctx.phone, ctx.dial, ctx.sms_sink, ctx.facts.caller)
    if not call.hung_up:
        await call.hangup(relay_cause(cause) if cause and not call.answered else "NORMAL_CLEARING")
    return f"{head}{done}"


async def _take_accept(ctx: _Ctx, outcome: AnnounceOutcome, *, phone_rang: bool) -> tuple[str, bool, str | None]:
    """Someone at home said "answer": the speaker's media path, else the owner's mobile (unless it just rang
    unanswered). (action, taken, B-leg cause)."""
    if outcome.media_aor is not None:
        leg, action = Leg("speaker", outcome.media_aor, max(1, int(ctx.announcer.timeout_s)), outcome.device_id), \
            "speaker"
    elif ctx.phone is not None and not phone_rang:
        leg, action = ctx.phone, "phone"
    else:
        return "", False, None
    if ctx.call.hung_up:
        return f"{action}_no_answer:", False, None
    taken, cause = await ctx.ring(((leg,),))
    return (action if taken else f"{action}_no_answer:"), taken, cause


async def _first(ctx: _Ctx, plan: CloudPlan) -> str:
    """The home is asked before anything rings; the mobile follows when the ring mode (or spec 7.2) says so."""
    call, decision = ctx.call, ctx.decision
    await call.execute("ring_ready")
    asking = asyncio.ensure_future(ctx.announcer.announce_all(ctx.facts, decision.announcements, ctx.facts.caller))
    outcome = await _wait_unless_hung_up(call, asking)
    if outcome is None:
        return await _finish(ctx, "caller_hung_up:", None)
    cause: str | None = None
    action = ""
    if outcome.result == "accept":
        action, taken, cause = await _take_accept(ctx, outcome, phone_rang=False)
        if taken:
            return f"accept:{action}"
    elif (outcome.result == "unavailable" or plan.phone_after) and decision.groups and not call.hung_up:
        # Spec 7.2 (the home cannot be reached) or the ring mode's next step: the mobile, as routed.
        taken, cause = await ctx.ring(decision.groups)
        if taken:
            return f"{outcome.result}:phone"
        action = "phone_no_answer:"
    if call.hung_up:
        action += "caller_hung_up:"
    return await _finish(ctx, f"{outcome.result}:{action}", cause)


async def _alongside(ctx: _Ctx, plan: CloudPlan) -> str:
    """The dial string rings; the announcement goes out at the home's turn. An answered leg cancels it; when the
    ringing ends unanswered, its answer decides (an accept takes the call; anything else is the fallback)."""
    call, decision = ctx.call, ctx.decision
    home_turn = asyncio.Event()

    async def ask() -> AnnounceOutcome:
        if plan.delay_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(home_turn.wait(), plan.delay_s)
        return await ctx.announcer.announce_all(ctx.facts, decision.announcements, ctx.facts.caller)

    asking = asyncio.ensure_future(ask())
    try:
        taken, cause = await ctx.ring(decision.groups)
    except BaseException:
        await _cancel(asking)
        raise
    if taken:
        await _cancel(asking)
        return "rang:answered"
    if call.hung_up:
        await _cancel(asking)
        return await _finish(ctx, "rang:caller_hung_up:", cause)
    home_turn.set()
    outcome = await _wait_unless_hung_up(call, asking)
    if outcome is None:
        return await _finish(ctx, "rang:caller_hung_up:", cause)
    action = "rang_no_answer:"
    if outcome.result == "accept":
        taken_by, taken, accept_cause = await _take_accept(ctx, outcome, phone_rang=ctx.phone is not None)
        if taken:
            return f"accept:{taken_by}"
        action += taken_by
        cause = accept_cause or cause
    if _gone(call):  # the caller may leave while the accepted leg rings
        action += "caller_hung_up:"
    return await _finish(ctx, f"{outcome.result}:{action}", cause)


def _gone(call: Call) -> bool:
    """Whether the caller has hung up (read again after an await, not narrowed away by an earlier check)."""
    return call.hung_up


CloudCallStep = Callable[[Call, RoutingDecision], Awaitable[str]]


def cloud_call_step(announcer: CloudAnnouncer, dial_settings: DialSettings, sms_sink: SmsSink | None,
                    on_answer: AnswerSink | None = None) -> CloudCallStep:
    """What ``PolicyRouter(announce=...)`` takes: the step bound to its collaborators."""

    async def step(call: Call, decision: RoutingDecision) -> str:
        return await run_cloud_announcement(call, decision, announcer, dial_settings, sms_sink, on_answer)

    return step
