"""The alert call's IVR on the outbound socket, and the registry that ties it to its originate.

``originate ... &socket(...)`` makes FreeSWITCH connect to our outbound server once the
callee answers, on a channel whose ``Unique-ID`` is the ``origination_uuid`` we chose.
The placer registers the call here *before* it sends the originate (the connection
arrives before the originate's BACKGROUND_JOB); :func:`with_alert_calls` claims it,
plays the prompt, collects one key (or records a message) and resolves the placer's
ticket. Everything else on the socket goes to the normal subscriber routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fs_app.call import Call, CallGone
from fs_app.esl import EslError, Event
from fs_app.outbound import CallHandler
from fs_app.outreach import metrics
from iim.core.tracing import CHANNEL_VARIABLE, AttributeValue, attrs, span

if TYPE_CHECKING:
    from fs_app.outreach.calls import AlertCall

log = logging.getLogger("iim.outreach.ivr")

ALERT_MARKER = "iim_alert"
DIGIT_VARIABLE = "iim_alert_digit"
NO_PROMPT = "silence_stream://250"
#: How long the device of a bridged call (a doorphone: it answers at once when it works) may take to answer.
BRIDGE_RING_S = 10
#: The longest conversation through a bridge; then the call is ended (a forgotten handset must not hold it).
BRIDGE_MAX_S = 600

ResultHook = Callable[[str, "IvrResult"], Awaitable[None]]


@dataclass(frozen=True)
class IvrResult:
    """What happened on the answered leg.

    ``detail`` (an addition to the four fields) says which way it ended: ``digit``,
    ``no_input`` (the prompt timed out every try), ``invalid_input`` (a key outside
    ``digits`` and never a valid one), ``prompt_failed`` (the switch could not play the prompt), ``hangup`` (the callee hung up first; ``hangup_cause`` is set),
    ``socket_lost`` (the switch dropped our socket), ``recorded`` / ``not_recorded``,
    ``played`` (prompt only, no IVR), ``bridged`` (connected to the call's device, e.g. a doorphone),
    ``bridge_failed`` (the device did not answer), ``error`` (an ESL error; see the logs), ``abandoned``
    (swept from the registry, never collected).
    """

    digit: str | None
    answered: bool
    recorded: bool
    hangup_cause: str | None
    detail: str = ""


class RegistryFull(RuntimeError):
    """More alert calls pending than the registry holds: refuse rather than grow."""


class IvrTicket:
    """One pending alert call. Awaiting it gives its :class:`IvrResult`.

    ``arrived`` completes when FreeSWITCH's socket connection for the call has been
    claimed by the IVR; the placer uses it to tell "answered but our IVR never got the
    call" from "the IVR is still running".
    """

    __slots__ = ("arrived", "call", "created", "result")

    def __init__(self, call: AlertCall, loop: asyncio.AbstractEventLoop) -> None:
        self.call = call
        self.result: asyncio.Future[IvrResult] = loop.create_future()
        self.arrived: asyncio.Future[None] = loop.create_future()
        self.created = time.monotonic()

    def done(self) -> bool:
        return self.result.done()

    def __await__(self) -> Generator[object, None, IvrResult]:
        return asyncio.shield(self.result).__await__()


class IvrRegistry:
    """call_uuid -> pending alert call and the future of its IVR result.

    Bounded: at most ``max_pending`` entries; entries older than ``max_age_s`` (a placer
    that vanished without ``discard``) are swept when a new one is added.
    """

    def __init__(self, *, max_pending: int = 1000, max_age_s: float = 3600.0) -> None:
        self._pending: dict[str, IvrTicket] = {}
        self._max_pending = max_pending
        self._max_age_s = max_age_s

    def __len__(self) -> int:
        return len(self._pending)

    def expect(self, call: AlertCall) -> IvrTicket:
        """Register ``call`` before its originate is sent; await the ticket for the result."""
        self._sweep()
        if call.call_uuid in self._pending:
            raise ValueError(f"alert call {call.call_uuid} is already pending")
        if len(self._pending) >= self._max_pending:
            raise RegistryFull(f"{len(self._pending)} alert calls pending")
        ticket = IvrTicket(call, asyncio.get_running_loop())
        self._pending[call.call_uuid] = ticket
        return ticket

    def lookup(self, uuid: str) -> AlertCall | None:
        ticket = self._pending.get(uuid)
        return ticket.call if ticket is not None else None

    def use_prompt(self, uuid: str, prompt: str) -> bool:
        """Swap the prompt of a call still ringing (speech rendered while it rang); False once it is answered
        or unknown, and the call keeps the prompt it was placed with."""
        ticket = self._pending.get(uuid)
        if ticket is None or ticket.arrived.done() or ticket.done():
            return False
        ticket.call = dataclasses.replace(ticket.call, prompt=prompt)
        return True

    def claim(self, uuid: str) -> AlertCall | None:
        """The socket connection for ``uuid`` arrived: its call, once (a second connection gets None)."""
        ticket = self._pending.get(uuid)
        if ticket is None or ticket.arrived.done() or ticket.done():
            return None
        ticket.arrived.set_result(None)
        return ticket.call

    def resolve(self, uuid: str, result: IvrResult) -> bool:
        """Hand the result to the placer; False when nobody waits for it any more."""
        ticket = self._pending.pop(uuid, None)
        if ticket is None or ticket.result.done():
            return False
        ticket.result.set_result(result)
        return True

    def discard(self, uuid: str) -> None:
        """Forget ``uuid`` (placer done or gave up); a later connection for it is hung up."""
        ticket = self._pending.pop(uuid, None)
        if ticket is not None:
            for fut in (ticket.result, ticket.arrived):
                if not fut.done():
                    fut.cancel()

    def _sweep(self) -> None:
        horizon = time.monotonic() - self._max_age_s
        for uuid in [u for u, t in self._pending.items() if t.created < horizon]:
            log.warning("alert call never collected; dropped", extra={"call_id": uuid})
            # Resolved rather than cancelled: a placer still awaiting it must not see a CancelledError.
            self.resolve(uuid, IvrResult(None, False, False, None, "abandoned"))


def app_arg(text: str) -> str:
    """One argument of a blank-separated application line (play_and_get_digits, read...).

    FreeSWITCH splits those on blanks but keeps a ``'...'`` span together and honours
    ``\\'`` and ``\\\\``; a ``say:`` prompt with words needs that.
    """
    if not any(c in text for c in " '\\"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ended(call: Call, detail: str, *, digit: str | None = None, recorded: bool = False) -> IvrResult:
    return IvrResult(digit, True, recorded, call.hangup_cause, detail)


def _int_var(event: Event, name: str) -> int:
    try:
        return int(event.variable(name) or "0")
    except ValueError:
        return 0


async def _collect_digit(call: Call, alert: AlertCall, invalid_prompt: str) -> IvrResult:
    timeout_ms = alert.digit_timeout_s * 1000
    # min max tries timeout terminators file invalid_file var regexp: one key, '#' is a key too.
    args = (f"1 1 {alert.tries} {timeout_ms} none {app_arg(alert.prompt or NO_PROMPT)} {app_arg(invalid_prompt)} "
            f"{DIGIT_VARIABLE} [{alert.digits}]")
    done = await call.execute("play_and_get_digits", args,
                              timeout=alert.tries * (alert.digit_timeout_s + 120) + 30)
    digit = done.variable(DIGIT_VARIABLE)
    if digit is not None and len(digit) == 1 and digit in alert.digits:
        return _ended(call, "digit", digit=digit)
    if call.hangup_cause is not None:
        return _ended(call, "hangup")
    # FreeSWITCH says read_result=failure for silence too (no key is "too few digits"); a key outside the regexp
    # is kept in <var>_invalid. A prompt that could not be played leaves read_result unset (every try fails at
    # once, without waiting for a key).
    if done.variable(f"{DIGIT_VARIABLE}_invalid"):
        return _ended(call, "invalid_input")
    if done.variable("read_result") is None:
        log.warning("alert prompt could not be played: %s", alert.prompt or NO_PROMPT, extra={"call_id": call.uuid})
        return _ended(call, "prompt_failed")
    return _ended(call, "no_input")


async def _record(call: Call, alert: AlertCall) -> IvrResult:
    if alert.prompt:
        await call.playback(alert.prompt)
    if call.hangup_cause is not None:
        return _ended(call, "hangup")
    # path, time limit, silence threshold and hits: a silent callee does not fill record_s.
    done = await call.execute("record", f"{app_arg(alert.record_path or '')} {alert.record_s} 200 3",
                              timeout=alert.record_s + 60)
    recorded = _int_var(done, "record_ms") > 0
    return _ended(call, "recorded" if recorded else "not_recorded", recorded=recorded)


async def _wait_bridged(call: Call) -> bool:
    """True once the channel reports CHANNEL_BRIDGE (the device answered and media flows); False if the socket
    closes first."""
    async for event in call.events():
        if event.name == "CHANNEL_BRIDGE":
            return True
    return False


def bridge_dial(alert: AlertCall) -> str:
    """The ``bridge`` argument: the device's endpoint (validated by :class:`AlertCall`) with its ring time and,
    when it opens on a key, RFC 2833 DTMF on its leg."""
    assert alert.bridge_endpoint is not None
    dtmf = ",dtmf_type=rfc2833" if alert.bridge_dtmf else ""
    return f"{{originate_timeout={BRIDGE_RING_S}{dtmf}}}{alert.bridge_endpoint}"


async def _bridge(call: Call, alert: AlertCall, on_bridged: Callable[[IvrResult], None] | None) -> IvrResult:
    """Play the prompt, then connect the answerer to the call's device for the conversation. ``on_bridged`` gets
    the result as soon as the device answers (the escalation need not wait for the conversation to end). The
    answerer's keys reach the device only when it opens on one (``bridge_dtmf``); else they are filtered out."""
    if alert.prompt:
        await call.playback(alert.prompt)
    if call.hangup_cause is not None:
        return _ended(call, "hangup")
    if not alert.bridge_dtmf:
        await call.set("bridge_filter_dtmf", "true")
    bridging = asyncio.ensure_future(call.bridge(bridge_dial(alert), timeout=BRIDGE_RING_S + BRIDGE_MAX_S))
    connected = asyncio.ensure_future(_wait_bridged(call))
    try:
        await asyncio.wait((bridging, connected), return_when=asyncio.FIRST_COMPLETED)
        if connected.done() and connected.result():
            if on_bridged is not None:
                on_bridged(_ended(call, "bridged"))
            await bridging  # the conversation
            return _ended(call, "bridged")
        outcome = await bridging
        return _ended(call, "bridged" if outcome.answered else "bridge_failed")
    finally:
        for task in (connected, bridging):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, EslError, OSError, TimeoutError):
                    await task


async def run_alert_ivr(call: Call, alert: AlertCall, *, invalid_prompt: str = NO_PROMPT,
                        on_bridged: Callable[[IvrResult], None] | None = None) -> IvrResult:
    """Prompt and collect, record, or bridge to the call's device; never raises for call-side failures."""
    try:
        if alert.bridge_endpoint is not None:
            return await _bridge(call, alert, on_bridged)
        if alert.record_s > 0:
            return await _record(call, alert)
        if alert.digits:
            return await _collect_digit(call, alert, invalid_prompt)
        if alert.prompt:
            await call.playback(alert.prompt)
        return _ended(call, "hangup" if call.hangup_cause else "played")
    except CallGone:
        return _ended(call, "hangup" if call.hangup_cause else "socket_lost")
    except (EslError, OSError, TimeoutError) as exc:
        log.warning("alert IVR failed: %s", exc, extra={"call_id": call.uuid})
        return _ended(call, "error")


async def _goodbye(call: Call, prompt: str | None) -> None:
    if prompt and not call.hung_up:
        with contextlib.suppress(EslError, OSError):
            await call.playback(prompt, timeout=60)


async def _hang_up(call: Call) -> None:
    with contextlib.suppress(EslError, OSError):
        await call.hangup("NORMAL_CLEARING")


async def _run_hook(hook: ResultHook, uuid: str, result: IvrResult) -> None:
    try:
        await hook(uuid, result)
    except Exception:  # the worker's persistence must not break call teardown
        log.exception("alert result hook failed", extra={"call_id": uuid})


@dataclass(frozen=True)
class Adoption:
    """An answered alert call whose placer died, taken on here: run ``call``'s IVR, then hand ``done`` the result
    (the worker records it as the dead worker would have)."""

    call: AlertCall
    done: Callable[[IvrResult], Awaitable[None]]


#: Called with an orphaned alert call's ``iim_*`` channel variables (``iim_tenant_id``, ``iim_action_key``...);
#: returns how to run it here, or None when it is not ours to run (settled meanwhile, unknown): then it is hung up.
OrphanHook = Callable[[Mapping[str, str]], Awaitable[Adoption | None]]
#: How long the callee may wait in silence while the orphan's incident is looked up (the database may be
#: restarting at the same moment: a fault seldom comes alone).
ORPHAN_LOOKUP_S = 10.0
#: How long an alert call's socket waits for its placer to register it before it counts as orphaned.
CLAIM_WAIT_S = 0.5


def _correlation(call: Call) -> dict[str, AttributeValue]:
    return attrs(call_id=call.uuid, tenant=call.variable("iim_tenant_id"), incident_id=call.variable("iim_incident_id"),
                 event_id=call.variable("iim_event_id"))


async def _run_traced(call: Call, alert: AlertCall, *, adopted: bool, invalid_prompt: str,
                      on_bridged: Callable[[IvrResult], None] | None = None) -> IvrResult:
    """The IVR, with the call's events as spans under the originate that placed it: its context comes back on the
    channel (:data:`CHANNEL_VARIABLE`, read from the connect reply: no extra command), so they join its trace
    also when another process placed it (an adopted call)."""
    parent = call.variable(CHANNEL_VARIABLE)
    common = _correlation(call)
    with span("alert_call.answered", parent=parent, attributes={**common, **attrs(adopted=adopted)}):
        pass
    name = "alert_call.record" if alert.record_s > 0 else "alert_call.dtmf" if alert.digits else "alert_call.prompt"
    with span(name, parent=parent, attributes=common) as traced:
        result = await run_alert_ivr(call, alert, invalid_prompt=invalid_prompt, on_bridged=on_bridged)
        if traced.is_recording():
            traced.set_attributes(attrs(detail=result.detail, digit=result.digit, recorded=result.recorded))
    return result


@contextlib.contextmanager
def _hangup_traced(call: Call, result: IvrResult) -> Iterator[None]:
    with span("alert_call.hangup", parent=call.variable(CHANNEL_VARIABLE), attributes={
            **_correlation(call), **attrs(by="callee" if result.detail == "hangup" else "iim")}) as traced:
        yield
        if traced.is_recording():
            traced.set_attributes(attrs(hangup_cause=call.hangup_cause or result.hangup_cause))


def _alert_variables(call: Call) -> dict[str, str]:
    names = ("iim_tenant_id", "iim_incident_id", "iim_action_key", "iim_event_id", "origination_uuid")
    return {name: value for name in names if (value := call.variable(name))}


async def _claim_soon(registry: IvrRegistry, uuid: str, wait_s: float,
                      pending: Callable[[str], bool] | None) -> tuple[str, AlertCall | None]:
    """Claim ``uuid`` within ``wait_s``, or for as long as ``pending`` says a worker here is about to register
    it (a take-over asking the switch first), bounded by :data:`ORPHAN_LOOKUP_S`."""
    start = time.monotonic()
    while True:
        await asyncio.sleep(0.02)
        alert = registry.claim(uuid)
        if alert is not None:
            return uuid, alert
        waited = time.monotonic() - start
        if waited >= ORPHAN_LOOKUP_S or (waited >= wait_s and (pending is None or not pending(uuid))):
            return uuid, None


async def _adopt(hook: OrphanHook, uuid: str, variables: Mapping[str, str]) -> Adoption | None:
    try:
        return await asyncio.wait_for(hook(variables), ORPHAN_LOOKUP_S)
    except Exception:  # the deadline sweep still moves the incident on
        log.exception("orphaned alert call not adopted", extra={"call_id": uuid})
        return None


async def _run_adopted(adoption: Adoption, uuid: str, result: IvrResult) -> None:
    try:
        await adoption.done(result)
    except Exception:  # the deadline sweep still moves the incident on
        log.exception("adopted alert call's result not recorded", extra={"call_id": uuid})


def with_alert_calls(
    registry: IvrRegistry,
    fallthrough: CallHandler,
    *,
    on_result: ResultHook | None = None,
    on_orphan: OrphanHook | None = None,
    pending: Callable[[str], bool] | None = None,
    invalid_prompt: str = NO_PROMPT,
    goodbye_prompt: str | None = None,
) -> CallHandler:
    """An outbound-socket handler: our alert calls get the IVR, every other call ``fallthrough``.

    An alert call is recognised by ``variable_iim_alert=1`` (set in our originate) and
    must be registered under its ``Unique-ID``; one that is not (IIM restarted, or the
    placer gave up) is hung up, never routed: its destination is the callee, so routing
    it would ring them again. ``on_result`` gets every result, also when the placer is
    gone, so the worker can persist it; ``on_orphan`` gets the channel variables of an
    answered alert call nobody here placed (its worker died) and may adopt it: its IVR runs
    here and the result goes to the adoption, so the person who answered is heard. ``pending``
    says whether a worker here is about to register a call (taking it over): its socket waits
    for that registration rather than count as orphaned.
    """

    async def handle(call: Call) -> None:
        if call.variable(ALERT_MARKER) != "1":
            await fallthrough(call)
            return
        uuid = call.uuid
        alert = registry.claim(uuid)
        origination_uuid = call.variable("origination_uuid")
        if alert is None and origination_uuid and origination_uuid != uuid:
            uuid, alert = origination_uuid, registry.claim(origination_uuid)
        if alert is None:
            # A worker taking over the call may register it a moment after the switch connects (it asks the
            # switch whether the call exists first): give it that moment before treating the call as orphaned.
            uuid, alert = await _claim_soon(registry, uuid, CLAIM_WAIT_S, pending)
        if alert is None:
            # Answered, but the worker that placed it is gone (killed, restarted, or it gave up on a blinking
            # link): the person is on the line, so run the call's IVR here rather than hang up on them.
            adoption = await _adopt(on_orphan, call.uuid, _alert_variables(call)) if on_orphan is not None else None
            if adoption is None:
                metrics.IVR_RESULTS.labels("unknown_call").inc()
                log.warning("alert call not registered and not adoptable; hanging up", extra={"call_id": call.uuid})
                await _goodbye(call, goodbye_prompt)
                await _hang_up(call)
                return
            log.info("adopted an answered alert call whose worker is gone", extra={"call_id": call.uuid})
            result = await _run_traced(call, adoption.call, adopted=True, invalid_prompt=invalid_prompt)
            metrics.IVR_RESULTS.labels(result.detail).inc()
            recording = asyncio.create_task(_run_adopted(adoption, call.uuid, result))
            with _hangup_traced(call, result):
                await _goodbye(call, goodbye_prompt)
                await _hang_up(call)
            await recording
            return
        claimed = uuid

        def bridged(result: IvrResult) -> None:  # the placer learns it at once, not after the conversation
            registry.resolve(claimed, result)

        result = await _run_traced(call, alert, adopted=False, invalid_prompt=invalid_prompt, on_bridged=bridged)
        metrics.IVR_RESULTS.labels(result.detail).inc()
        if not registry.resolve(uuid, result) and result.detail != "bridged":
            log.info("alert result arrived after the placer gave up", extra={"call_id": uuid})
        hook = asyncio.create_task(_run_hook(on_result, uuid, result)) if on_result is not None else None
        log.info("alert IVR done", extra={"call_id": uuid, "digit": result.digit, "detail": result.detail,
                                           "hangup_cause": result.hangup_cause})
        with _hangup_traced(call, result):
            if result.detail != "bridged":  # after a conversation, no announcement
                await _goodbye(call, goodbye_prompt)
            await _hang_up(call)
        if hook is not None:
            await hook

    return handle
