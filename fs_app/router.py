"""The call handler that routes every subscriber call by policy.

It looks the callee up in the policy cache (memory only), asks the pure
:func:`fs_app.routing.decide` what to do, turns the answer into FreeSWITCH
commands and walks the fallback chain when nobody answers. Anything it cannot
decide (unknown callee, cache not loaded, a bug) goes to the safe default: the
dialled number, unchanged. Policy lives in data; this module is mechanism only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol

from fs_app import metrics
from fs_app.call import Call, bridge_result
from fs_app.dialstring import BRIDGE_IMPORT, DialSettings, bridge_dial_string
from fs_app.messages import MessageTaken, take_message
from fs_app.outbound import CallHandler
from fs_app.passthrough import relay_cause
from fs_app.routing import CallFacts, RoutingDecision, decide
from iim.core.numbering import NumberingPlan, try_e164
from iim.core.tracing import Span, SpanKind, attrs, recording, start
from policy_cache.snapshot import RoutingSnapshot

log = logging.getLogger("iim.call.router")


class SnapshotSource(Protocol):
    """What the router needs from the policy cache."""

    @property
    def ready(self) -> bool: ...

    def lookup(self, number: str) -> RoutingSnapshot | None: ...

    def plan_for(self, tenant_id: str) -> NumberingPlan: ...


DecisionSink = Callable[[CallFacts, RoutingDecision | None, str], None]
#: Who took a routed call: the answering device's id, None for the mobile (``CallDecisionAudit.record_answer``).
AnswerSink = Callable[[CallFacts, RoutingDecision, str | None], None]
MissedCallNotifier = Callable[[RoutingSnapshot, CallFacts], Awaitable[None]]
#: Keeps and announces a message the caller left (``iim.home.recorded_message``); True when the household was told
#: (then the missed-call SMS is not sent as well).
MessageNotifier = Callable[[RoutingSnapshot, CallFacts, MessageTaken], Awaitable[bool]]
#: Takes a call whose home has cloud speakers to announce on (``iim.home.cloud_call.cloud_call_step``).
AnnouncementStep = Callable[[Call, RoutingDecision], Awaitable[str]]
#: Sees every call routed to a known subscriber and not rejected (the scenario trigger intake). It must return at
#: once: it only queues (``iim.scenarios.triggers.intake.TriggerIntake.offer``); whatever it raises is logged.
InboundObserver = Callable[[RoutingSnapshot, CallFacts], object]


def _no_sink(_facts: CallFacts, _decision: RoutingDecision | None, _outcome: str) -> None:
    return None


def _no_answer_sink(_facts: CallFacts, _decision: RoutingDecision, _device_id: str | None) -> None:
    return None


def _answered_device(decision: RoutingDecision, imported: str | None) -> str | None:
    """The imported device id if it is one of this decision's legs (the switch's word is not trusted blindly)."""
    if imported is None:
        return None
    return imported if any(leg.device_id == imported for leg in decision.legs) else None


def _announces(decision: RoutingDecision) -> bool:
    """Speakers to announce through their cloud: the announcement step takes the call (it rings the SIP legs
    and the mobile too, in the ring mode's order)."""
    return decision.action == "ring" and bool(decision.announcements)


class PolicyRouter:
    """Routes each call by its callee's policy snapshot; never drops a call it cannot route."""

    def __init__(
        self,
        source: SnapshotSource,
        passthrough: CallHandler,
        *,
        dial: DialSettings | None = None,
        record_decision: DecisionSink = _no_sink,
        record_answer: AnswerSink = _no_answer_sink,
        missed_call: MissedCallNotifier | None = None,
        message: MessageNotifier | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        announce: AnnouncementStep | None = None,
        on_inbound: InboundObserver | None = None,
    ) -> None:
        self._source = source
        self._passthrough = passthrough
        self._dial = dial or DialSettings()
        self._record = record_decision
        self._record_answer = record_answer
        self._missed_call = missed_call
        self._message = message
        self._clock = clock
        self._announce = announce
        self._on_inbound = on_inbound
        self._routes = {name: metrics.CALLS_ROUTED.labels(name) for name in
                        ("policy", "reject", "fallback", "unknown_callee", "cache_not_ready", "decision_error")}

    async def __call__(self, call: Call) -> None:
        # Spans: the call, its decision, its bridge (and fallback); ids and outcomes only, never the numbers. Not
        # made current (the call path's way: no context switch); no-ops unless tracing is on.
        traced = start("call.inbound", kind=SpanKind.SERVER, attributes=attrs(call_id=call.uuid) if recording()
                       else None)
        try:
            await self._route(call, traced)
        except BaseException as exc:
            traced.record_exception(exc)
            raise
        finally:
            traced.end()

    async def _route(self, call: Call, traced: Span) -> None:
        facts = CallFacts(call.destination_number or "", call.caller_id_number, call.uuid)
        decided = start("call.decide", parent=traced)
        decision, route, snapshot, facts = self._decide(facts)
        if decided.is_recording():
            decided.set_attributes(attrs(route=route, action=decision.action if decision else None,
                                         policy_version=decision.policy_version if decision else None,
                                         legs=len(decision.legs) if decision else None))
            if snapshot is not None:
                traced.set_attribute("iim.tenant", snapshot.tenant_id)
        decided.end()
        self._routes[route].inc()
        self._record(facts, decision, route)
        if decision is None or snapshot is None:
            log.debug("routing by dialled number", extra={"call_id": call.uuid, "route": route})
            await self._passthrough(call)
            return
        log.debug("routing by policy", extra={"call_id": call.uuid, "action": decision.action,
                                             "policy_version": decision.policy_version, "rules": decision.rules})
        if decision.action == "reject":
            await call.hangup(decision.reject_cause or "CALL_REJECTED")
            return
        self._observe(snapshot, facts)
        if self._announce is not None and _announces(decision):
            outcome = await self._announce(call, decision)
            log.debug("cloud announcement", extra={"call_id": call.uuid, "outcome": outcome})
            return
        cause: str | None = None
        if decision.action == "ring":
            dial = bridge_dial_string(decision, self._dial, call_uuid=call.uuid)
            bridged = start("call.bridge", parent=traced)
            try:
                # One write: the variables that let us walk the fallback chain, then the bridge.
                events = await call.execute_many(
                    [("multiset", f"continue_on_fail=true hangup_after_bridge=true {BRIDGE_IMPORT}"),
                     ("bridge", dial)],
                    timeout=None,
                )
                result = bridge_result(events[-1])
                if bridged.is_recording():
                    bridged.set_attributes(attrs(legs=len(decision.legs), answered=result.answered,
                                                 hangup_cause=result.hangup_cause))
            finally:
                bridged.end()
            if result.answered:
                if any(leg.kind == "speaker" for leg in decision.legs):
                    # Who took it is a question only when the home rang too (one audit row, off the call path).
                    device = _answered_device(decision, result.device_id)
                    log.debug("call answered", extra={"call_id": call.uuid, "device_id": device,
                                                      "leg": "phone" if device is None else "speaker"})
                    self._record_answer(facts, decision, device)
                return
            if call.hung_up:
                # The caller gave up while it rang: still a missed call (as a mobile shows one), so the
                # notifier runs; nothing is recorded from a caller who has gone.
                await self._fallback(call, decision, snapshot, facts)
                return
            cause = result.hangup_cause
        fallback = start("call.fallback", parent=traced,
                         attributes=attrs(fallback=decision.fallback) if recording() else None)
        try:
            await self._fallback(call, decision, snapshot, facts)
        finally:
            fallback.end()
        if not call.hung_up:
            # A caller who left a message was answered: end it normally, not with the failed leg's cause.
            await call.hangup(relay_cause(cause) if cause and not call.answered else "NORMAL_CLEARING")

    def _observe(self, snapshot: RoutingSnapshot, facts: CallFacts) -> None:
        """Tell the trigger intake (queue only, never awaited): it must not delay or break routing the call."""
        if self._on_inbound is None:
            return
        try:
            self._on_inbound(snapshot, facts)
        except Exception:
            metrics.ERRORS.labels("inbound_observer").inc()
            log.exception("inbound call observer failed; routing goes on", extra={"call_id": facts.uuid})

    def _decide(self, facts: CallFacts
                ) -> tuple[RoutingDecision | None, str, RoutingSnapshot | None, CallFacts]:
        """The decision, its route label, the callee's snapshot and the facts it was made on: the callee found
        by any form of its number (the cache reads them under the tenant's numbering plans), the numbers in
        E.164 under the callee's tenant's plan, as the policy's caller lists are (``8916...`` is ``+7916...``)."""
        if not self._source.ready:
            return None, "cache_not_ready", None, facts
        snapshot = self._source.lookup(facts.destination)
        if snapshot is None:
            return None, "unknown_callee", None, facts
        plan = self._source.plan_for(snapshot.tenant_id)
        caller = facts.caller and (facts.caller if facts.caller.startswith("+") else try_e164(facts.caller, plan))
        facts = CallFacts(snapshot.msisdn, caller or facts.caller, facts.uuid)
        try:
            decision = decide(snapshot, facts, self._clock())
        except (ValueError, LookupError, ArithmeticError) as exc:
            metrics.ERRORS.labels("decision").inc()
            log.exception("routing decision failed", extra={"call_id": facts.uuid, "error": repr(exc)})
            return None, "decision_error", None, facts
        route = {"ring": "policy", "reject": "reject", "fallback": "fallback"}[decision.action]
        return decision, route, snapshot, facts

    async def _fallback(
        self, call: Call, decision: RoutingDecision, snapshot: RoutingSnapshot, facts: CallFacts
    ) -> None:
        """Nobody answered (or DND): voicemail, a recorded message, or a missed-call SMS."""
        taken: MessageTaken | None = None
        if decision.fallback in ("voicemail", "record_message") and not call.hung_up:
            taken = await take_message(call, self._dial, snapshot.msisdn, voicemail=decision.fallback == "voicemail",
                                       tenant=snapshot.tenant_id)
        announced = False
        if decision.fallback == "record_message" and taken is not None and taken.recorded and self._message:
            announced = await self._message(snapshot, facts, taken)
        if decision.fallback in ("missed_call_sms", "voicemail", "record_message") and self._missed_call \
                and not announced:
            await self._missed_call(snapshot, facts)
