"""Alert calls: ``bgapi originate`` with our own uuid, then the IVR result from the outbound socket.

The originate text is built from validated parts only: a destination that is E.164
or a ``sip:`` URI, variables with safe names and values, the gateway template of
:class:`fs_app.dialstring.DialSettings`. The placer never raises for switch-side
trouble; every way a call can end is a :class:`CallOutcome`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Protocol

from fs_app.dialstring import DialSettings
from fs_app.esl import ApiResponse, EslConnectionError, EslError, Event
from fs_app.inbound import BackgroundJobResult, InboundClient, InboundPool, JobLost
from fs_app.outreach import metrics
from fs_app.outreach.guard import Refusal, destination_kind
from fs_app.outreach.ivr import BRIDGE_RING_S, IvrRegistry, IvrResult, IvrTicket, RegistryFull

log = logging.getLogger("iim.outreach.calls")

#: mod_hash realm where the switch itself notes every alert call it creates (``api_on_originate``): the
#: switch's own memory of "I took this call", which outlives the call, the Event Socket link and the placer.
#: A take-over asks it before placing a call whose placer died, so a call the switch once took is never
#: dialled again. Entries go when the call's outcome is recorded (``forget``), or with the switch.
ORIGINATED_REALM = "iim_originated"

DTMF_KEYS = frozenset("0123456789*#ABCD")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_VAR_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Values go inside {...} of the originate: no separators, quotes, brackets, blanks or controls.
_VAR_VALUE = re.compile(r"[^\x00-\x20\x7f'\",{}\[\]<>()|^\\]{0,256}")
_CID_NUMBER = re.compile(r"\+?[0-9]{1,20}")
_CID_NAME = re.compile(r"[\w.\- ]{0,64}")
# A recording path: one token, no controls.
_PATH = re.compile(r"[^\x00-\x20\x7f]{1,512}")
# A playable (file, tone_stream://..., say:<text>): no controls; blanks are quoted by the IVR.
_PLAYABLE = re.compile(r"[^\x00-\x1f\x7f]{1,1000}")
_UPTIME = re.compile(r"UP (\d+) years?, (\d+) days?, (\d+) hours?, (\d+) minutes?, (\d+) seconds?, "
                     r"(\d+) milliseconds?")
_ENDPOINT = re.compile(r"[A-Za-z0-9_.~/@:+\-]{1,400}")
_SOCKET_ADDRESS = re.compile(r"(?:[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):[0-9]{1,5}")
# Variables that steer FreeSWITCH (hooks, origination, media, bridging) are not correlation data.
_RESERVED_VAR = re.compile(
    r"(?:origination_|originate_|execute_|exec_|api_|sip_|socket|effective_|bridge_|transfer_|group_confirm|"
    r"hangup_|session_|record_|playback_|rtp_|media_|absolute_codec|codec_|leg_|call_timeout|continue_on_fail|"
    r"ignore_early_media|iim_alert$|uuid$|call_uuid$|direction$)|.*(?:_on_|hook)"
)

NO_ANSWER_CAUSES = frozenset({"NO_ANSWER", "NO_USER_RESPONSE", "ORIGINATOR_CANCEL", "ALLOTTED_TIMEOUT"})
BUSY_CAUSES = frozenset({"USER_BUSY", "CALL_REJECTED"})


def _is(pattern: re.Pattern[str], value: object) -> bool:
    """``value`` is a str that ``pattern`` matches whole (rows from a database are not type-checked)."""
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
           f"{name} must be an integer in [{low}, {high}], not {value!r}")


def _validate_variables(variables: Mapping[str, str]) -> None:
    _check(len(variables) <= 32, "at most 32 correlation variables")
    for name, value in variables.items():
        _check(_is(_VAR_NAME, name),
               f"variable name {name!r:.70} is not [a-z][a-z0-9_]{{0,63}}")
        _check(_RESERVED_VAR.match(name) is None, f"variable {name} steers FreeSWITCH; not a correlation variable")
        _check(_is(_VAR_VALUE, value) and ":_:" not in value,
               f"value of {name} holds characters that would break the originate: {value!r:.70}")


@dataclass(frozen=True)
class AlertCall:
    """One alert call: whom to ring, what they hear, which keys count.

    ``digits`` empty = no IVR (the prompt, if any, is played and the call ends);
    ``record_s`` > 0 = record a message to ``record_path`` instead of collecting a key.
    ``bridge_to`` (a ``sip:`` URI: a doorphone) = once answered and the prompt played, connect the call to that
    device; ``bridge_dtmf``: the answerer's keys reach it (it opens on one), else they are filtered out.
    ``bridge_endpoint`` is the device's dial string, resolved by the placer (:meth:`AlertCallPlacer.prepared`).
    ``variables`` are correlation ids (``iim_incident_id``...) carried on the channel.
    Every field is validated here, so a constructed AlertCall is safe to originate.
    """

    call_uuid: str
    destination: str
    caller_id_number: str
    caller_id_name: str
    ring_s: int
    prompt: str | None
    digits: str = ""
    tries: int = 3
    digit_timeout_s: int = 5
    record_s: int = 0
    record_path: str | None = None
    variables: Mapping[str, str] = field(default_factory=dict, hash=False)
    bridge_to: str | None = None
    bridge_dtmf: bool = False
    bridge_endpoint: str | None = None

    def __post_init__(self) -> None:
        _check(_is(_UUID, self.call_uuid),
               f"call_uuid must be a lower-case UUID, not {self.call_uuid!r:.60}")
        _check(destination_kind(self.destination) is not None,
               f"destination must be E.164 or a sip: URI, not {self.destination!r:.60}")
        _check(_is(_CID_NUMBER, self.caller_id_number),
               f"caller_id_number must be digits, not {self.caller_id_number!r:.40}")
        _check(_is(_CID_NAME, self.caller_id_name) and self.caller_id_name == self.caller_id_name.strip(),
               f"caller_id_name must be letters, digits, space, '.', '-' (<= 64): {self.caller_id_name!r:.70}")
        _check_int("ring_s", self.ring_s, 1, 300)
        _check_int("tries", self.tries, 1, 10)
        _check_int("digit_timeout_s", self.digit_timeout_s, 1, 60)
        _check_int("record_s", self.record_s, 0, 600)
        digits: object = self.digits
        _check(isinstance(digits, str) and set(digits) <= DTMF_KEYS and len(set(digits)) == len(digits),
               f"digits must be distinct DTMF keys (0-9 * # A-D), not {self.digits!r:.40}")
        _check(self.prompt is None or (_is(_PLAYABLE, self.prompt) and "${" not in self.prompt
                                       and self.prompt.strip() == self.prompt),
               f"prompt must be printable, without ${{...}} or surrounding blanks: {self.prompt!r:.70}")
        if self.record_s > 0:
            _check(self.digits == "", "record_s and digits exclude each other")
            _check(_is(_PATH, self.record_path) and "${" not in str(self.record_path),
                   f"record_s > 0 needs a record_path without blanks or controls: {self.record_path!r:.70}")
        if self.bridge_to is not None:
            _check(destination_kind(self.bridge_to) == "sip",
                   f"bridge_to must be a sip: URI, not {self.bridge_to!r:.60}")
            _check(self.digits == "" and self.record_s == 0, "a bridged call neither collects keys nor records")
        _check(isinstance(self.bridge_dtmf, bool), "bridge_dtmf must be a bool")
        _check(self.bridge_endpoint is None or (self.bridge_to is not None and _is(_ENDPOINT, self.bridge_endpoint)
                                                and ":_:" not in self.bridge_endpoint),
               f"bridge_endpoint must be one dial string for bridge_to: {self.bridge_endpoint!r:.70}")
        _validate_variables(self.variables)
        object.__setattr__(self, "variables", MappingProxyType(dict(self.variables)))


GatewayDial = DialSettings | Callable[[str], str]


def _endpoint(destination: str, gateway_dial: GatewayDial) -> str:
    kind = destination_kind(destination)
    _check(kind is not None, f"not E.164 nor a sip: URI: {destination!r:.60}")
    try:
        if isinstance(gateway_dial, DialSettings):
            if kind == "e164":
                endpoint = gateway_dial.phone_endpoint.format(msisdn=destination)
            else:
                endpoint = gateway_dial.speaker_endpoint.format(aor=destination.removeprefix("sip:"))
        else:
            endpoint = gateway_dial(destination)
    except (KeyError, IndexError, AttributeError) as exc:
        raise ValueError(f"bad endpoint template: {exc!r}") from None
    _check(_is(_ENDPOINT, endpoint) and ":_:" not in endpoint,
           f"endpoint would inject into the originate: {endpoint!r:.80}")
    return endpoint


def originate_command(call: AlertCall, *, gateway_dial: GatewayDial, socket_address: str) -> str:
    """``originate {vars}<endpoint> &socket('<address> async full')`` (the ``bgapi`` argument).

    Raises ValueError for anything that could inject into the command.
    """
    _check(_is(_SOCKET_ADDRESS, socket_address),
           f"socket_address must be host:port, not {socket_address!r:.60}")
    AlertCall.__post_init__(call)  # again: a frozen dataclass can still be forged with object.__setattr__
    endpoint = _endpoint(call.destination, gateway_dial)
    name = call.caller_id_name
    variables = [
        ("origination_uuid", call.call_uuid),
        ("origination_caller_id_number", call.caller_id_number),
        *([("origination_caller_id_name", f"'{name}'" if " " in name else name)] if name else []),
        ("originate_timeout", str(call.ring_s)),
        ("ignore_early_media", "true"),
        ("iim_alert", "1"),
        # Run by the switch as it creates the leg, before anything rings (quoted: one originate argument).
        ("api_on_originate", f"'hash insert/{ORIGINATED_REALM}/{call.call_uuid}/1'"),
        *call.variables.items(),
    ]
    block = ",".join(f"{k}={v}" for k, v in variables)
    # The quotes keep "host:port async full" one originate argument (FreeSWITCH strips them).
    command = f"originate {{{block}}}{endpoint} &socket('{socket_address} async full')"
    _check("\r" not in command and "\n" not in command, "line break in the originate")
    return command


def originate_variables(arg: str) -> dict[str, str]:
    """The ``{name=value,...}`` block of an originate's arguments (as :func:`originate_command` writes it)."""
    if not arg.startswith("{") or "}" not in arg:
        return {}
    pairs = (item.partition("=") for item in arg[1:arg.index("}")].split(","))
    return {name: value for name, eq, value in pairs if eq}


class CallOutcomeKind(StrEnum):
    ANSWERED = "answered"
    NO_ANSWER = "no_answer"
    BUSY = "busy"
    FAILED = "failed"
    UNREACHABLE = "unreachable"  # switch down, no connected node, link lost before the result
    REFUSED = "refused"  # the guard (or a malformed call) stopped it before the switch saw it


@dataclass(frozen=True)
class CallOutcome:
    """How an alert call ended. ``digit`` is the key pressed (answered calls with an IVR only)."""

    kind: CallOutcomeKind
    hangup_cause: str | None
    digit: str | None
    recorded: bool = False
    detail: str = ""


def refused_outcome(refusal: Refusal) -> CallOutcome:
    """The outcome for a destination :func:`fs_app.outreach.guard.check_destination` refused (counted)."""
    metrics.count_refusal(refusal.reason)
    metrics.ORIGINATES.labels(CallOutcomeKind.REFUSED.value, "alert").inc()
    return CallOutcome(CallOutcomeKind.REFUSED, None, None, detail=f"{refusal.reason}: {refusal.detail}")


def outcome_of_job(body: str) -> CallOutcome | None:
    """Map a failed originate's BACKGROUND_JOB body; None for ``+OK <uuid>`` (answered)."""
    if body.startswith("+OK"):
        return None
    if not body.startswith("-ERR"):
        return CallOutcome(CallOutcomeKind.FAILED, None, None, detail=body.strip()[:200])
    cause = (body[4:].split() or ["UNKNOWN"])[0]
    if cause in NO_ANSWER_CAUSES:
        return CallOutcome(CallOutcomeKind.NO_ANSWER, cause, None)
    if cause in BUSY_CAUSES:
        return CallOutcome(CallOutcomeKind.BUSY, cause, None)
    return CallOutcome(CallOutcomeKind.FAILED, cause, None)


class SwitchApi(Protocol):
    """What the placer needs from FreeSWITCH: an :class:`InboundPool`, an :class:`InboundClient`..."""

    async def bgapi(self, command: str, *, job_uuid: str | None = ..., timeout: float = ...,
                    on_accepted: Callable[[], None] | None = ...) -> BackgroundJobResult:
        ...

    async def api(self, command: str, timeout: float | None = ...) -> ApiResponse: ...


class AlertCallPlacer:
    """Places alert calls and waits for their IVR results.

    Args:
        pool: the FreeSWITCH link (``bgapi``/``api``); an InboundPool or InboundClient is
            first waited for at most ``connect_wait_s``, so a switch that is down gives
            ``unreachable`` quickly instead of after the ESL command timeout.
        ivr: the registry the outbound-socket handler (:func:`fs_app.outreach.ivr.with_alert_calls`) claims calls from.
        socket_address: where FreeSWITCH reaches our outbound server (``127.0.0.1:8084``).
        gateway_dial: endpoint templates (DialSettings) or a function destination -> endpoint.
        answer_grace_s: after ``+OK``, how long the socket connection may take to reach the IVR.
        prompt_s: how long a prompt may play (for the IVR's deadline).
        reconnect_deadline_s: the link lost after the originate was sent, how long to wait for it to come
            back and ask the switch what became of the call; past it the call counts as unreachable.
        poll_s: while following such a call, how often the switch is asked (``uuid_exists``).

    The originate's ``Job-UUID`` is the call's uuid, so its BACKGROUND_JOB is recognised on any connection
    (after a reconnect, or by a placer that adopts a call another process sent).
    """

    def __init__(
        self,
        pool: SwitchApi,
        ivr: IvrRegistry,
        *,
        socket_address: str,
        gateway_dial: GatewayDial | None = None,
        answer_grace_s: float = 5.0,
        connect_wait_s: float = 2.0,
        api_timeout_s: float = 2.0,
        job_slack_s: float = 15.0,
        prompt_s: float = 15.0,
        ivr_slack_s: float = 15.0,
        reconnect_deadline_s: float = 10.0,
        poll_s: float = 1.0,
    ) -> None:
        _check(_SOCKET_ADDRESS.fullmatch(socket_address) is not None,
               f"socket_address must be host:port, not {socket_address!r:.60}")
        self._pool = pool
        self._ivr = ivr
        self._socket_address = socket_address
        self._dial: GatewayDial = gateway_dial if gateway_dial is not None else DialSettings()
        self._answer_grace_s = answer_grace_s
        self._connect_wait_s = connect_wait_s
        self._api_timeout_s = api_timeout_s
        self._job_slack_s = job_slack_s
        self._prompt_s = prompt_s
        self._ivr_slack_s = ivr_slack_s
        self._reconnect_deadline_s = reconnect_deadline_s
        self._poll_s = poll_s
        #: Job-UUID -> the BACKGROUND_JOB awaited by a call being followed after its link was lost
        self._jobs: dict[str, asyncio.Future[Event]] = {}
        self._seen: Callable[[Mapping[str, str]], None] | None = None
        clients = pool.clients if isinstance(pool, InboundPool) else [pool] if isinstance(pool, InboundClient) else []
        for client in clients:
            client.add_listener(self._on_event)

    def watch_originates(self, seen: Callable[[Mapping[str, str]], None]) -> None:
        """Call ``seen`` with the ``iim_*`` variables of every alert call the switch reports done (its
        BACKGROUND_JOB) that this placer is not placing: every IIM's link sees every job, so a call whose placer
        died is still known to have reached the switch."""
        self._seen = seen

    def _on_event(self, event: Event) -> None:
        if event.name != "BACKGROUND_JOB":
            return
        job = event.get("Job-UUID") or ""
        if self._seen is not None and event.get("Job-Command") == "originate" and self._ivr.lookup(job) is None:
            variables = originate_variables(event.get("Job-Command-Arg") or "")
            if "iim_action_key" in variables:
                self._seen(variables)
        if not self._jobs:
            return
        fut = self._jobs.get(job)
        if fut is not None and not fut.done():
            fut.set_result(event)

    def prepared(self, call: AlertCall) -> AlertCall:
        """``call`` with its bridge's dial string resolved (the device's endpoint, as the placer dials devices);
        ValueError when it cannot be."""
        if call.bridge_to is None or call.bridge_endpoint is not None:
            return call
        return dataclasses.replace(call, bridge_endpoint=_endpoint(call.bridge_to, self._dial))

    def ivr_deadline_s(self, call: AlertCall) -> float:
        """How long the IVR of an answered call may take before we give up on its result (a bridged call's is
        known once the device answers: :data:`fs_app.outreach.ivr.BRIDGE_RING_S`)."""
        if call.bridge_to is not None:
            return self._prompt_s + BRIDGE_RING_S + self._ivr_slack_s
        if call.record_s > 0:
            return self._prompt_s + call.record_s + self._ivr_slack_s
        if call.digits:
            return call.tries * (call.digit_timeout_s + self._prompt_s) + self._ivr_slack_s
        return self._prompt_s + self._ivr_slack_s

    # -- the switch link ---------------------------------------------------------------
    async def _link(self) -> SwitchApi:
        pool = self._pool
        if isinstance(pool, InboundPool):
            return await pool.pick(self._connect_wait_s)
        if isinstance(pool, InboundClient):
            await pool.wait_connected(self._connect_wait_s)
        return pool

    async def call_exists(self, call_uuid: str, *, wait: bool = True) -> bool | None:
        """Is the call up on the switch (``uuid_exists``)? None when the switch cannot be asked (``wait``
        False: none when no node is connected right now, without waiting for one)."""
        _check(_UUID.fullmatch(call_uuid) is not None, f"not a call uuid: {call_uuid!r:.60}")
        if not wait and not self._connected_now():
            self._want_link()
            return None
        try:
            link = await self._link()
            reply = await link.api(f"uuid_exists {call_uuid}", self._api_timeout_s)
        except (EslError, OSError, TimeoutError):
            return None
        answer = reply.body.strip()
        return True if answer == "true" else False if answer == "false" else None

    async def _ask(self, link: SwitchApi, command: str) -> str | None:
        """``command``'s answer from the node that got the originate (stripped), without waiting for it to
        reconnect; None when it cannot be asked."""
        if isinstance(link, InboundClient) and not link.connected:
            link.want_connection()
            return None
        try:
            reply = await link.api(command, self._api_timeout_s)
        except (EslError, OSError, TimeoutError):
            return None
        return reply.body.strip()

    async def _exists_on(self, link: SwitchApi, call_uuid: str) -> bool | None:
        """``uuid_exists`` on the node that got the originate."""
        answer = await self._ask(link, f"uuid_exists {call_uuid}")
        return True if answer == "true" else False if answer == "false" else None

    async def _switch_took(self, link: SwitchApi, call_uuid: str) -> bool | None:
        """Did the switch ever create this call (its ``api_on_originate`` note, :data:`ORIGINATED_REALM`)?
        None when it cannot be asked. An empty ``hash select`` reaches us as ``-ERR no reply``."""
        answer = await self._ask(link, f"hash select/{ORIGINATED_REALM}/{call_uuid}")
        if answer is not None and answer.startswith("-ERR hash Command not found"):
            # A switch without mod_hash keeps no notes: the call is unknown to it (placing it again risks a
            # second call; not placing it risks none at all).
            log.warning("the switch has no mod_hash: a taken-over call cannot be checked for an earlier dial")
            return False
        return True if answer == "1" else False if answer in ("", "-ERR no reply") else None

    async def forget(self, call_uuid: str) -> None:
        """Drop the switch's note of a call whose outcome is recorded (best effort: a note left behind is a few
        bytes until the switch restarts)."""
        _check(_UUID.fullmatch(call_uuid) is not None, f"not a call uuid: {call_uuid!r:.60}")
        with contextlib.suppress(EslError, OSError, TimeoutError):
            link = await self._link()
            await link.api(f"hash delete/{ORIGINATED_REALM}/{call_uuid}", self._api_timeout_s)

    async def _uptime_s(self, link: SwitchApi) -> float | None:
        """How long the switch has been up (``status``); None when it cannot be asked or read."""
        try:
            reply = await link.api("status", self._api_timeout_s)
        except (EslError, OSError, TimeoutError):
            return None
        found = _UPTIME.search(reply.body)
        if found is None:
            return None
        years, days, hours, minutes, seconds, millis = (int(g) for g in found.groups())
        return (((years * 365 + days) * 24 + hours) * 60 + minutes) * 60 + seconds + millis / 1000

    def _connected_now(self) -> bool:
        pool = self._pool
        if isinstance(pool, InboundPool):
            return any(c.connected for c in pool.clients)
        if isinstance(pool, InboundClient):
            return pool.connected
        return True

    def _want_link(self) -> None:
        """Wake the reconnect of a node that is down (a call is waiting to ask it something)."""
        pool = self._pool
        for client in pool.clients if isinstance(pool, InboundPool) else [pool] if isinstance(pool, InboundClient) \
                else []:
            client.want_connection()

    def use_prompt(self, call_uuid: str, prompt: str) -> bool:
        """Play ``prompt`` instead of the placed one if the call has not been answered yet."""
        return self._ivr.use_prompt(call_uuid, prompt)

    async def hang_up(self, call_uuid: str) -> None:
        """End a call whose group was decided without it (best effort: it may have ended already)."""
        _check(_UUID.fullmatch(call_uuid) is not None, f"not a call uuid: {call_uuid!r:.60}")
        await self._kill(call_uuid)

    async def _kill(self, call_uuid: str) -> None:
        """Best effort: end a call whose IVR we stopped waiting for, so it does not sit there."""
        with contextlib.suppress(EslError, OSError, TimeoutError):
            link = await self._link()
            await link.api(f"uuid_kill {call_uuid} NORMAL_CLEARING", self._api_timeout_s)

    # -- placing -----------------------------------------------------------------------
    async def place(self, call: AlertCall, *, on_sent: Callable[[], None] | None = None) -> CallOutcome:
        """Originate ``call`` and wait until it is known how it ended (never raises for the switch).

        ``on_sent`` runs once the switch accepted the originate (the caller records that the call went out:
        a call claimed but never sent is placed again after a crash, one sent is not)."""
        metrics.IN_FLIGHT.inc()
        try:
            outcome = await self._place(call, on_sent)
        finally:
            metrics.IN_FLIGHT.dec()
        metrics.ORIGINATES.labels(outcome.kind.value, metrics.purpose_of(call.variables)).inc()
        log.info("alert call %s", outcome.kind.value, extra={
            "call_id": call.call_uuid, "outcome": outcome.kind.value, "hangup_cause": outcome.hangup_cause,
            "digit": outcome.digit, "recorded": outcome.recorded, "detail": outcome.detail,
            "variables": dict(call.variables)})
        return outcome

    async def place_or_adopt(self, call: AlertCall, *, on_sent: Callable[[], None] | None = None) -> CallOutcome:
        """A call claimed by a process that died before it was known to be sent: its ``origination_uuid`` is the
        idempotency key, and the switch is asked what became of it before anything is dialled:

        * up on the switch (``uuid_exists``): adopt it (its IVR, its BACKGROUND_JOB, ``uuid_exists``);
        * not up, but the switch noted creating it (:data:`ORIGINATED_REALM`): it rang and ended while its
          placer was gone: failed, never dialled again;
        * unknown to the switch: place it;
        * the switch cannot be asked: unreachable, nothing dialled (the caller texts the person and retries).

        The call is registered for its IVR first, so its socket arriving while the switch is asked is ours."""
        try:
            call = self.prepared(call)
            ticket = self._ivr.expect(call)
        except (ValueError, RegistryFull) as exc:
            return CallOutcome(CallOutcomeKind.REFUSED, None, None, detail=f"not taken over: {exc}")
        started = asyncio.get_running_loop().time()
        try:
            try:
                link = await self._link()
            except (EslError, OSError, TimeoutError) as exc:
                return CallOutcome(CallOutcomeKind.UNREACHABLE, None, None,
                                   detail=f"switch unreachable ({type(exc).__name__}: {exc}); not taken over")
            exists = await self._exists_on(link, call.call_uuid)
            took = await self._switch_took(link, call.call_uuid) if exists is False else None
            if ticket.arrived.done() or ticket.done() or exists:
                if on_sent is not None:
                    on_sent()
                metrics.IN_FLIGHT.inc()
                try:
                    outcome = await self._follow(call, ticket, link, reason="adopted from a worker that died",
                                                 accepted=True, started=started)
                finally:
                    metrics.IN_FLIGHT.dec()
                metrics.ORIGINATES.labels(outcome.kind.value, metrics.purpose_of(call.variables)).inc()
                log.info("adopted alert call %s", outcome.kind.value, extra={"call_id": call.call_uuid,
                                                                             "detail": outcome.detail})
                return outcome
            if took:
                if on_sent is not None:
                    on_sent()
                return CallOutcome(CallOutcomeKind.FAILED, None, None,
                                   detail="the switch took the call and it ended while its placer was gone; "
                                          "not redialled")
            if took is None:
                return CallOutcome(CallOutcomeKind.UNREACHABLE, None, None,
                                   detail="the switch could not be asked about the call; not taken over")
            metrics.IN_FLIGHT.inc()
            try:
                outcome = await self._send(call, ticket, link, on_sent, started)
            finally:
                metrics.IN_FLIGHT.dec()
            metrics.ORIGINATES.labels(outcome.kind.value, metrics.purpose_of(call.variables)).inc()
            log.info("taken-over alert call %s", outcome.kind.value, extra={
                "call_id": call.call_uuid, "outcome": outcome.kind.value, "hangup_cause": outcome.hangup_cause,
                "digit": outcome.digit, "detail": outcome.detail})
            return outcome
        finally:
            self._ivr.discard(call.call_uuid)

    async def _place(self, call: AlertCall, on_sent: Callable[[], None] | None) -> CallOutcome:
        try:
            call = self.prepared(call)
            command = originate_command(call, gateway_dial=self._dial, socket_address=self._socket_address)
            ticket = self._ivr.expect(call)  # before the originate: the socket may beat the job result
        except (ValueError, RegistryFull) as exc:
            return CallOutcome(CallOutcomeKind.REFUSED, None, None, detail=f"not placed: {exc}")
        started = asyncio.get_running_loop().time()
        try:
            try:
                link = await self._link()
            except (EslError, OSError, TimeoutError) as exc:  # nothing was sent
                return CallOutcome(CallOutcomeKind.UNREACHABLE, None, None,
                                   detail=f"switch unreachable ({type(exc).__name__}: {exc}); not placed")
            return await self._send(call, ticket, link, on_sent, started, command)
        finally:
            self._ivr.discard(call.call_uuid)

    async def _send(self, call: AlertCall, ticket: IvrTicket, link: SwitchApi, on_sent: Callable[[], None] | None,
                    started: float, command: str | None = None) -> CallOutcome:
        """The originate itself on ``link``, then the call followed to its outcome."""
        if command is None:
            try:
                command = originate_command(call, gateway_dial=self._dial, socket_address=self._socket_address)
            except ValueError as exc:
                return CallOutcome(CallOutcomeKind.REFUSED, None, None, detail=f"not placed: {exc}")
        try:
            job = await link.bgapi(command, job_uuid=call.call_uuid, timeout=call.ring_s + self._job_slack_s,
                                   on_accepted=on_sent)
        except (EslError, OSError, TimeoutError) as exc:
            return await self._link_lost(call, ticket, exc, started, link)
        failed = outcome_of_job(job.body)
        if failed is not None:
            return failed
        if job.value and job.value != call.call_uuid:
            log.warning("originate answered with another uuid %s", job.value, extra={"call_id": call.call_uuid})
        return await self._answered(call, ticket)

    async def _await_ivr(self, call: AlertCall, ticket: IvrTicket) -> CallOutcome:
        try:
            result: IvrResult = await asyncio.wait_for(asyncio.shield(ticket.result), self.ivr_deadline_s(call))
        except TimeoutError:
            await self._kill(call.call_uuid)
            return CallOutcome(CallOutcomeKind.ANSWERED, None, None, detail="ivr_timeout")
        return CallOutcome(CallOutcomeKind.ANSWERED, result.hangup_cause, result.digit, result.recorded,
                           result.detail)

    @staticmethod
    async def _arrival(ticket: IvrTicket, timeout: float) -> bool:
        """Has (or will, within ``timeout``) the switch's socket connection reached our IVR?"""
        if not ticket.arrived.done() and not ticket.done():
            await asyncio.wait((ticket.arrived, ticket.result), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return ticket.arrived.done() or ticket.done()

    async def _answered(self, call: AlertCall, ticket: IvrTicket) -> CallOutcome:
        if not await self._arrival(ticket, self._answer_grace_s):
            await self._kill(call.call_uuid)
            return CallOutcome(CallOutcomeKind.ANSWERED, None, None,
                               detail="ivr_not_connected: the switch did not reach our socket")
        return await self._await_ivr(call, ticket)

    async def _link_lost(self, call: AlertCall, ticket: IvrTicket, exc: BaseException, started: float,
                         link: SwitchApi) -> CallOutcome:
        """The originate's result never came (link lost, switch down, timeout): find out what became of the
        call before deciding. An answered call reaches our IVR over its own socket whatever the control link
        does, so it is never hung up or redialled because that link blinked."""
        reason = f"{type(exc).__name__}: {exc}"
        if ticket.arrived.done() or ticket.done():
            return await self._await_ivr(call, ticket)  # answered: our IVR has the call
        if not isinstance(exc, EslConnectionError | OSError | TimeoutError):
            # The switch answered the bgapi itself with -ERR: nothing was dialled.
            return CallOutcome(CallOutcomeKind.FAILED, None, None, detail=reason)
        return await self._follow(call, ticket, link, reason=reason, accepted=isinstance(exc, JobLost),
                                  started=started)

    async def _follow(self, call: AlertCall, ticket: IvrTicket, link: SwitchApi, *, reason: str, accepted: bool,
                      started: float) -> CallOutcome:
        """Follow a call sent to the switch whose BACKGROUND_JOB we may never see, until its outcome is known.

        Watched at once: the call reaching our IVR (answered), its BACKGROUND_JOB (``Job-UUID`` = the call's
        uuid) on a reconnected link, and the switch's own answer to ``uuid_exists`` every ``poll_s``:

        * on the switch: it rings or is up; wait on (no hang-up, no redial) until its ring time and IVR
          deadline have passed, then end it as an answered call that never reached the IVR;
        * not on the switch: with the originate ``accepted`` by a switch up since before it, the call ended
          while we could not see it (failed, never redialled); else the switch never got it or restarted
          meanwhile and lost it (unreachable: the caller texts the person and retries);
        * no link for ``reconnect_deadline_s``: unreachable (the caller texts the person and retries).
        """
        loop = asyncio.get_running_loop()
        job: asyncio.Future[Event] = loop.create_future()
        self._jobs[call.call_uuid] = job
        link_deadline = loop.time() + self._reconnect_deadline_s
        up_deadline = started + call.ring_s + self._answer_grace_s + self.ivr_deadline_s(call)
        try:
            while True:
                if ticket.arrived.done() or ticket.done():
                    return await self._await_ivr(call, ticket)
                if job.done():
                    failed = outcome_of_job(job.result().body or "")
                    return failed if failed is not None else await self._answered(call, ticket)
                exists = await self._exists_on(link, call.call_uuid)
                now = loop.time()
                if exists is True:
                    link_deadline = now + self._reconnect_deadline_s
                    if now >= up_deadline:
                        await self._kill(call.call_uuid)
                        return CallOutcome(CallOutcomeKind.ANSWERED, None, None,
                                           detail=f"{reason}; ivr_not_connected: up on the switch, never reached us")
                elif exists is False and not (ticket.arrived.done() or ticket.done() or job.done()):
                    took = await self._switch_took(link, call.call_uuid)
                    if took:  # it rang and ended unseen (the switch's own note): never dialled again
                        return CallOutcome(CallOutcomeKind.FAILED, None, None,
                                           detail=f"{reason}; the call ended while the link was down; "
                                                  "not redialled")
                    uptime = await self._uptime_s(link)
                    if took is None and accepted and uptime is not None and uptime > now - started:
                        return CallOutcome(CallOutcomeKind.FAILED, None, None,
                                           detail=f"{reason}; the call ended while the link was down; not redialled")
                    return CallOutcome(CallOutcomeKind.UNREACHABLE, None, None,
                                       detail=f"{reason}; the call is not on the switch (never got it, or restarted)")
                elif exists is None and now >= link_deadline:
                    return CallOutcome(CallOutcomeKind.UNREACHABLE, None, None,
                                       detail=f"{reason}; switch unreachable for {self._reconnect_deadline_s:.0f} s")
                await asyncio.wait((ticket.arrived, ticket.result, job), timeout=self._poll_s,
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            if self._jobs.get(call.call_uuid) is job:
                del self._jobs[call.call_uuid]
            if not job.done():
                job.cancel()
