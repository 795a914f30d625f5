"""Cloud-mode incoming calls (spec 3.2): a speaker without SIP announces the call through its vendor cloud.

The routing decision lists such speakers in ``RoutingDecision.announcements`` (only when the policy lets
the home ring: consent to announce calls, no quiet hours, presence...). When there is no SIP speaker to
fork to, :func:`run_cloud_announcement` takes the call:

1. ``ring_ready`` (the caller hears ringback), then every announcing speaker is asked at once,
   "Call from <caller>, answer?" (accept / decline) through ``request_user_action``; the first accept
   wins and the other requests are cancelled; a caller hanging up cancels them all;
2. accept -> bridge to the speaker's media path if its cloud gave one (a SIP/WebRTC AoR registered on
   our switch, answered as ``detail="media=sip:<aor>"``), else connect the owner's phone;
3. decline or timeout (nobody at home chose) -> the decision's fallback: voicemail, a recorded
   message, or a missed-call SMS (through the SMS sink);
4. unavailable (the cloud is down, unknown or refused) -> the owner's phone rings as the decision
   planned without the home (spec 7.2: "fallback to the ordinary phone"), then the fallback if nobody
   answers.

The channel side stays tenant-agnostic: this module only runs dialplan applications on the
:class:`fs_app.call.Call`; the tenant comes from the decision (for the SMS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal
from uuid import UUID

from fs_app.call import Call, bridge_result
from fs_app.dialstring import DialSettings, bridge_dial_string
from fs_app.messages import take_message
from fs_app.passthrough import relay_cause
from fs_app.routing import Announcement, CallFacts, Leg, RoutingDecision
from iim.connectors.contract import Connector, ConnectorError, ConnectorUnavailable, UserActionRequest
from iim.home import metrics
from iim.home.missed_call import missed_call_key, missed_call_text
from iim.home.ports import ConnectorLookup, SmsSink

__all__ = [
    "AnnounceOutcome", "AnnounceResult", "CloudAnnouncer", "cloud_call_step", "run_cloud_announcement",
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


async def _bridge(call: Call, dial: str) -> tuple[bool, str | None]:
    """Bridge as the router does (one write: the variables, then the bridge); (answered, B-leg cause)."""
    events = await call.execute_many(
        [("multiset", "continue_on_fail=true hangup_after_bridge=true"), ("bridge", dial)], timeout=None)
    result = bridge_result(events[-1])
    return result.answered, result.hangup_cause


async def _announce_unless_hung_up(call: Call, announcer: CloudAnnouncer, facts: CallFacts,
                                   decision: RoutingDecision) -> AnnounceOutcome | None:
    """The announcement, or ``None`` when the caller hangs up first (the requests are then cancelled)."""
    asking = asyncio.ensure_future(announcer.announce_all(facts, decision.announcements, facts.caller))
    hangup = asyncio.ensure_future(call.wait_hangup())
    try:
        await asyncio.wait({asking, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hangup
    if not asking.done():
        asking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asking
        return None
    return asking.result()


async def _fallback(call: Call, decision: RoutingDecision, phone: Leg | None, dial_settings: DialSettings,
                    sms_sink: SmsSink | None, caller: str | None) -> str:
    """The decision's no-answer action (as the router runs it), then the missed-call SMS."""
    what = decision.fallback
    if what == "voicemail" and phone is not None and not call.hung_up:
        await take_message(call, dial_settings, phone.target, voicemail=True)
    elif what == "record_message" and not call.hung_up:
        await take_message(call, dial_settings, phone.target if phone else "", voicemail=False)
    if what != "none" and phone is not None and sms_sink is not None and decision.tenant_id:
        try:
            await sms_sink.send(UUID(decision.tenant_id), phone.target, missed_call_text(caller),
                                missed_call_key(call.uuid))
        except Exception:  # a lost SMS must not drop the call's hangup; logged with its traceback
            log.exception("missed-call SMS not queued", extra={"call_id": call.uuid})
            return f"{what}:sms_failed"
        return f"{what}:sms"
    return what


async def run_cloud_announcement(
    call: Call,
    decision: RoutingDecision,
    announcer: CloudAnnouncer,
    dial_settings: DialSettings,
    sms_sink: SmsSink | None,
) -> str:
    """Announce ``call`` on the decision's cloud speakers and act on the answer; returns what happened,
    ``"<announcement result>:<action>"`` (e.g. ``accept:phone``, ``decline:missed_call_sms:sms``,
    ``unavailable:phone``, ``caller_hung_up``)."""
    facts = CallFacts(call.destination_number or "", call.caller_id_number, call.uuid)
    phones = [leg for leg in decision.legs if leg.kind == "phone"]
    phone = phones[0] if phones else None
    outcome_text = await _run(call, decision, announcer, dial_settings, sms_sink, facts, phone)
    metrics.CLOUD_CALLS.labels(outcome_text.split(":", 1)[0]).inc()
    log.info("cloud-announced call handled", extra={"call_id": call.uuid, "outcome": outcome_text})
    return outcome_text


async def _run(call: Call, decision: RoutingDecision, announcer: CloudAnnouncer, dial_settings: DialSettings,
               sms_sink: SmsSink | None, facts: CallFacts, phone: Leg | None) -> str:
    await call.execute("ring_ready")
    outcome = await _announce_unless_hung_up(call, announcer, facts, decision)
    if outcome is None:
        return "caller_hung_up"
    cause: str | None = None
    action = ""
    if outcome.result == "accept":
        if outcome.media_aor is not None:
            leg = Leg("speaker", outcome.media_aor, max(1, int(announcer.timeout_s)), outcome.device_id)
            action = "speaker"
        elif phone is not None:
            leg, action = phone, "phone"
        else:
            leg = None
        if leg is not None and not call.hung_up:
            dial = bridge_dial_string(replace(decision, groups=((leg,),)), dial_settings, call_uuid=call.uuid)
            answered, cause = await _bridge(call, dial)
            if answered or call.hung_up:
                return f"accept:{action}"
            action += "_no_answer:"
    elif outcome.result == "unavailable" and decision.groups and not call.hung_up:
        # Spec 7.2: the home cannot be reached -> the ordinary phone, exactly as routed without the home.
        answered, cause = await _bridge(call, bridge_dial_string(decision, dial_settings, call_uuid=call.uuid))
        if answered or call.hung_up:
            return "unavailable:phone"
        action = "phone_no_answer:"
    if call.hung_up:
        return f"{outcome.result}:{action}caller_hung_up"
    done = await _fallback(call, decision, phone, dial_settings, sms_sink, facts.caller)
    if not call.hung_up:
        await call.hangup(relay_cause(cause) if cause and not call.answered else "NORMAL_CLEARING")
    return f"{outcome.result}:{action}{done}"


CloudCallStep = Callable[[Call, RoutingDecision], Awaitable[str]]


def cloud_call_step(announcer: CloudAnnouncer, dial_settings: DialSettings, sms_sink: SmsSink | None) -> CloudCallStep:
    """What ``PolicyRouter(announce=...)`` takes: the step bound to its collaborators."""

    async def step(call: Call, decision: RoutingDecision) -> str:
        return await run_cloud_announcement(call, decision, announcer, dial_settings, sms_sink)

    return step
