"""Alert calls: originate text, outcome mapping, the IVR registry, and end to end over real sockets.

End-to-end tests run the emulator's inbound socket (our InboundClient sends ``bgapi
originate ... &socket(...)``) and our OutboundServer with :func:`with_alert_calls`; the
emulator dials that server when the scripted callee answers and presses the scripted keys.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fs_app.call import Call
from fs_app.dialstring import DialSettings
from fs_app.esl import Event, Execute, HangupCmd
from fs_app.inbound import InboundClient, InboundPool, InboundSettings
from fs_app.outbound import OutboundServer, OutboundSettings
from fs_app.outreach.calls import (
    AlertCall,
    AlertCallPlacer,
    CallOutcome,
    CallOutcomeKind,
    originate_command,
    outcome_of_job,
    refused_outcome,
)
from fs_app.outreach.guard import Refusal
from fs_app.outreach.ivr import IvrRegistry, IvrResult, RegistryFull, app_arg, with_alert_calls
from fs_app.testing import CallSpec, FreeSwitchEmulator, InboundServer, TargetBehaviour
from fs_app.testing.apps import separate_args
from fs_app.testing.media import write_silent_wav
from tests.conftest import eventually
from tests.tcp_proxy import TcpFaultProxy

MOBILE = "+79001234567"
GW = "sofia/gateway/ims/{}"
SCALE = 0.01  # scripted durations x0.01: a 5 s digit timeout takes 50 ms


def new_uuid() -> str:
    return str(uuidlib.uuid4())


def alert(destination: str = MOBILE, **kw: Any) -> AlertCall:
    fields: dict[str, object] = {
        "call_uuid": new_uuid(), "destination": destination, "caller_id_number": "74950000000",
        "caller_id_name": "IIM Alarm", "ring_s": 30, "prompt": "ivr/ivr-alarm.wav", "digits": "12",
        "tries": 3, "digit_timeout_s": 5, "variables": {"iim_incident_id": "inc-1", "iim_action_key": "call-1"},
    }
    fields.update(kw)
    return AlertCall(**fields)  # type: ignore[arg-type]  # a table of any fields, valid or not


# --------------------------------------------------------------------- originate text


def test_originate_command_shape() -> None:
    call = alert(call_uuid="33ac64a1-7e7f-4644-84ca-b6948f665156")
    cmd = originate_command(call, gateway_dial=DialSettings(), socket_address="127.0.0.1:8084")
    assert cmd == (
        "originate {origination_uuid=33ac64a1-7e7f-4644-84ca-b6948f665156,origination_caller_id_number=74950000000,"
        "origination_caller_id_name='IIM Alarm',originate_timeout=30,ignore_early_media=true,iim_alert=1,"
        "api_on_originate='hash insert/iim_originated/33ac64a1-7e7f-4644-84ca-b6948f665156/1',"
        "iim_incident_id=inc-1,iim_action_key=call-1}sofia/gateway/ims/+79001234567 "
        "&socket('127.0.0.1:8084 async full')"
    )
    speaker = originate_command(alert("sip:speaker-1@iim.local", caller_id_name="IIM"),
                                gateway_dial=DialSettings(), socket_address="127.0.0.1:8084")
    assert "origination_caller_id_name=IIM," in speaker
    assert "}user/speaker-1@iim.local &socket(" in speaker
    custom = originate_command(call, gateway_dial=lambda d: f"sofia/gateway/pstn/{d.lstrip('+')}",
                               socket_address="[::1]:8084")
    assert "}sofia/gateway/pstn/79001234567 &socket('[::1]:8084 async full')" in custom


@pytest.mark.parametrize("change", [
    {"destination": "+79001234567,sofia/gateway/evil/+1900"},
    {"destination": "+79001234567 &bridge(x)"},
    {"destination": "+7900123\r\n4567"},
    {"destination": "sip:a@b}{x=1"},
    {"destination": "sip:a b@iim.local"},
    {"call_uuid": "not-a-uuid"},
    {"call_uuid": "33AC64A1-7E7F-4644-84CA-B6948F665156"},
    {"caller_id_number": "7495,api_on_answer=system"},
    {"caller_id_name": "IIM'} &system(rm)"},
    {"caller_id_name": "Alarm\r\nsendmsg"},
    {"caller_id_name": " IIM"},
    {"variables": {"iim_incident_id": "a,b"}},
    {"variables": {"iim_incident_id": "a}b"}},
    {"variables": {"iim_incident_id": "a b"}},
    {"variables": {"iim_incident_id": "a'b"}},
    {"variables": {"iim_incident_id": "a\nb"}},
    {"variables": {"iim_incident_id": "x:_:sofia/gateway/evil/+1"}},
    {"variables": {"Iim_incident": "x"}},
    {"variables": {"iim-incident": "x"}},
    {"variables": {"api_on_answer": "system"}},
    {"variables": {"execute_on_answer": "x"}},
    {"variables": {"origination_caller_id_number": "1900"}},
    {"variables": {"iim_alert": "0"}},
    {"variables": {"session_in_hangup_hook": "true"}},
    {"digits": "1x"},
    {"digits": "11"},
    {"prompt": "say:${system(rm -rf /)}"},
    {"prompt": " ivr/a.wav"},
    {"prompt": ""},
    {"prompt": "ivr/a.wav\nexecute-app-name: system"},
    {"tries": 0},
    {"ring_s": 0},
    {"ring_s": True},
    {"record_s": 10, "digits": "", "record_path": None},
    {"record_s": 10, "digits": "", "record_path": "/tmp/a b.wav"},
    {"record_s": 10, "record_path": "/tmp/a.wav"},  # with digits
])
def test_malformed_alert_calls_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        originate_command(alert(**change), gateway_dial=DialSettings(), socket_address="127.0.0.1:8084")


@pytest.mark.parametrize(("dial", "address"), [
    (lambda d: f"sofia/gateway/ims/{d} &system(x)", "127.0.0.1:8084"),
    (lambda d: f"{{x=1}}sofia/gateway/ims/{d}", "127.0.0.1:8084"),
    (lambda d: f"sofia/gateway/ims/{d}:_:sofia/gateway/other/{d}", "127.0.0.1:8084"),
    (lambda d: f"sofia/gateway/ims/{d},user/1", "127.0.0.1:8084"),
    (DialSettings(phone_endpoint="sofia/gateway/{gw}/{msisdn}"), "127.0.0.1:8084"),
    (DialSettings(), "127.0.0.1:8084 async full') &system('x"),
    (DialSettings(), "127.0.0.1"),
    (DialSettings(), "host name:8084"),
])
def test_injecting_endpoints_and_addresses_are_refused(dial: object, address: str) -> None:
    with pytest.raises(ValueError):
        originate_command(alert(), gateway_dial=dial, socket_address=address)  # type: ignore[arg-type]


def test_forged_alert_call_is_revalidated() -> None:
    call = alert()
    object.__setattr__(call, "destination", "+79001234567,user/evil")
    with pytest.raises(ValueError):
        originate_command(call, gateway_dial=DialSettings(), socket_address="127.0.0.1:8084")


def test_alert_call_variables_are_frozen() -> None:
    source = {"iim_incident_id": "a"}
    call = alert(variables=source)
    source["iim_incident_id"] = "b,evil"
    assert call.variables["iim_incident_id"] == "a"
    with pytest.raises(TypeError):
        call.variables["x"] = "y"  # type: ignore[index]


@pytest.mark.parametrize(("body", "kind", "cause"), [
    ("+OK 33ac64a1-7e7f-4644-84ca-b6948f665156\n", None, None),
    ("-ERR NO_ANSWER\n", CallOutcomeKind.NO_ANSWER, "NO_ANSWER"),
    ("-ERR NO_USER_RESPONSE\n", CallOutcomeKind.NO_ANSWER, "NO_USER_RESPONSE"),
    ("-ERR ORIGINATOR_CANCEL\n", CallOutcomeKind.NO_ANSWER, "ORIGINATOR_CANCEL"),
    ("-ERR ALLOTTED_TIMEOUT\n", CallOutcomeKind.NO_ANSWER, "ALLOTTED_TIMEOUT"),
    ("-ERR USER_BUSY\n", CallOutcomeKind.BUSY, "USER_BUSY"),
    ("-ERR CALL_REJECTED\n", CallOutcomeKind.BUSY, "CALL_REJECTED"),
    ("-ERR SUBSCRIBER_ABSENT\n", CallOutcomeKind.FAILED, "SUBSCRIBER_ABSENT"),
    ("-ERR USER_NOT_REGISTERED\n", CallOutcomeKind.FAILED, "USER_NOT_REGISTERED"),
    ("-ERR\n", CallOutcomeKind.FAILED, "UNKNOWN"),
    ("-USAGE: <call url> ...\n", CallOutcomeKind.FAILED, None),
])
def test_job_bodies_map_to_outcomes(body: str, kind: CallOutcomeKind | None, cause: str | None) -> None:
    outcome = outcome_of_job(body)
    if kind is None:
        assert outcome is None
    else:
        assert outcome is not None
        assert (outcome.kind, outcome.hangup_cause) == (kind, cause)


def test_refused_outcome_carries_the_reason() -> None:
    outcome = refused_outcome(Refusal("hourly_cap", "200 calls"))
    assert outcome.kind is CallOutcomeKind.REFUSED
    assert outcome.detail.startswith("hourly_cap")


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(min_codepoint=0x20, exclude_categories=("Cs",)), min_size=1, max_size=40))
def test_prompts_survive_freeswitch_argument_splitting(prompt: str) -> None:
    # play_and_get_digits splits its data on blanks, honouring '...' and backslash escapes.
    assert separate_args(f"1 1 {app_arg(prompt)} x") == ["1", "1", prompt, "x"]


# ------------------------------------------------------------------------- registry


async def test_registry_claim_resolve_discard() -> None:
    registry = IvrRegistry(max_pending=2)
    first, second = alert(), alert()
    ticket = registry.expect(first)
    with pytest.raises(ValueError):
        registry.expect(first)
    registry.expect(second)
    with pytest.raises(RegistryFull):
        registry.expect(alert())
    assert registry.lookup(first.call_uuid) is first
    assert registry.claim(first.call_uuid) is first
    assert ticket.arrived.done()
    assert registry.claim(first.call_uuid) is None  # a second connection for the same call
    assert registry.claim(new_uuid()) is None
    result = IvrResult("1", True, False, None, "digit")
    assert registry.resolve(first.call_uuid, result)
    assert await ticket == result
    assert not registry.resolve(first.call_uuid, result)
    registry.discard(second.call_uuid)
    registry.discard(second.call_uuid)
    assert len(registry) == 0


async def test_registry_sweeps_abandoned_entries() -> None:
    registry = IvrRegistry(max_pending=1, max_age_s=0.0)
    stale = registry.expect(alert())
    await asyncio.sleep(0.01)
    registry.expect(alert())  # the stale one is swept, not RegistryFull
    assert (await stale).detail == "abandoned"
    assert len(registry) == 1


# ----------------------------------------------------------------------- end to end


@dataclass
class Rig:
    emu: FreeSwitchEmulator
    inbound: InboundServer
    server: OutboundServer
    client: InboundClient
    registry: IvrRegistry
    placer: AlertCallPlacer
    fallthrough: list[str] = field(default_factory=list)
    results: list[tuple[str, IvrResult]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def script(self, destination: str, behaviour: TargetBehaviour) -> None:
        self.emu.targets[GW.format(destination)] = behaviour


def client_for(port: int) -> InboundClient:
    return InboundClient(InboundSettings(
        port=port, command_timeout=2.0, backoff_initial=0.02, backoff_max=0.1,
        events=("BACKGROUND_JOB", "RECORD_START", "RECORD_STOP", "DTMF")))


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    # The switch's sounds directory holds the prompt the calls play (it has no sound package of its own).
    sounds = tmp_path / "sounds"
    write_silent_wav(sounds / "ivr" / "ivr-alarm.wav")
    emu = FreeSwitchEmulator(time_scale=SCALE, default_target=TargetBehaviour.no_answer(), write_recordings=True,
                             sounds_dir=sounds)
    emu.keep_results = True
    inbound = await emu.start_inbound()
    registry = IvrRegistry()
    fallthrough: list[str] = []
    results: list[tuple[str, IvrResult]] = []

    async def route(call: Call) -> None:
        fallthrough.append(call.destination_number or "")
        await call.hangup("NORMAL_CLEARING")

    async def persist(uuid: str, result: IvrResult) -> None:
        results.append((uuid, result))

    server = OutboundServer(with_alert_calls(registry, route, on_result=persist),
                            OutboundSettings(port=0, exit_wait=0.5))
    await server.start()
    client = client_for(inbound.port)
    await client.start()
    await client.wait_connected(5)
    placer = AlertCallPlacer(client, registry, socket_address=f"127.0.0.1:{server.port}", answer_grace_s=2.0,
                             connect_wait_s=0.3, api_timeout_s=0.5)
    rig = Rig(emu, inbound, server, client, registry, placer, fallthrough, results)
    client.add_listener(rig.events.append)
    yield rig
    await client.aclose()
    await server.aclose(drain_timeout=2.0)
    await rig.emu.close()  # the test may have replaced (restarted) the emulator
    await emu.close()
    assert not [e for e in emu.errors if "background task failed" in e], emu.errors


async def test_callee_presses_1(rig: Rig) -> None:
    rig.script(MOBILE, TargetBehaviour.answer(after_ms=300, dtmf="1"))
    call = alert()
    outcome = await rig.placer.place(call)
    assert outcome == CallOutcome(CallOutcomeKind.ANSWERED, None, "1", False, "digit")
    originates = rig.emu.originates_to(MOBILE)
    assert len(originates) == 1  # exactly one call to the number
    sent = originates[0]
    assert sent.uuid == call.call_uuid
    assert sent.endpoints == (GW.format(MOBILE),)
    assert sent.variables["iim_alert"] == "1"
    assert sent.variables["iim_incident_id"] == "inc-1"
    assert sent.variables["origination_caller_id_name"] == "IIM Alarm"
    assert sent.variables["originate_timeout"] == "30"
    assert sent.result == f"+OK {call.call_uuid}"
    assert sent.at == pytest.approx(time.time(), abs=5)
    await eventually(lambda: len(rig.results) == 1)
    assert rig.results[0][0] == call.call_uuid
    assert len(rig.registry) == 0
    dtmf = [e for e in rig.events if e.name == "DTMF"]
    assert [e.get("DTMF-Digit") for e in dtmf] == ["1"]
    assert dtmf[0].unique_id == call.call_uuid
    await eventually(lambda: any(r.uuid == call.call_uuid and r.hangup_cause for r in rig.emu.results))
    socket_call = next(r for r in rig.emu.results if r.uuid == call.call_uuid)
    assert socket_call.hangup_cause == "NORMAL_CLEARING"
    assert socket_call.disconnect == "app-closed"  # hung up: closed, no ``exit``
    pagd = [c for c in socket_call.commands if isinstance(c, Execute) and c.app == "play_and_get_digits"]
    assert [c.arg for c in pagd] == ["1 1 3 5000 none ivr/ivr-alarm.wav silence_stream://250 iim_alert_digit [12]"]
    assert rig.fallthrough == []


async def test_callee_presses_nothing(rig: Rig) -> None:
    rig.script(MOBILE, TargetBehaviour.answer())
    outcome = await rig.placer.place(alert())
    assert (outcome.kind, outcome.digit, outcome.hangup_cause, outcome.detail) == (
        CallOutcomeKind.ANSWERED, None, None, "no_input")


async def test_invalid_key_then_valid_and_only_invalid(rig: Rig) -> None:
    rig.script(MOBILE, TargetBehaviour.answer(dtmf="92"))
    assert (await rig.placer.place(alert())).digit == "2"
    rig.script(MOBILE, TargetBehaviour.answer(dtmf="99"))
    outcome = await rig.placer.place(alert(tries=2))
    assert (outcome.kind, outcome.digit, outcome.detail) == (CallOutcomeKind.ANSWERED, None, "invalid_input")
    rig.script(MOBILE, TargetBehaviour.answer(dtmf="#"))  # '#' is a key, not a terminator
    assert (await rig.placer.place(alert(digits="1#"))).digit == "#"


async def test_prompt_with_blanks_and_quotes_reaches_the_switch_as_one_argument(rig: Rig) -> None:
    assert rig.emu.sounds_dir is not None
    write_silent_wav(rig.emu.sounds_dir / "alarm" / "it's real, press 1.wav")
    rig.script(MOBILE, TargetBehaviour.answer(dtmf="2"))
    call = alert(prompt="alarm/it's real, press 1.wav")
    assert (await rig.placer.place(call)).digit == "2"
    await eventually(lambda: any(r.uuid == call.call_uuid and r.hangup_cause for r in rig.emu.results))
    socket_call = next(r for r in rig.emu.results if r.uuid == call.call_uuid)
    [pagd] = [c for c in socket_call.commands if isinstance(c, Execute) and c.app == "play_and_get_digits"]
    assert separate_args(pagd.arg or "")[5] == call.prompt


async def test_a_spoken_prompt_fails_on_a_switch_without_a_tts_engine_and_says_so(rig: Rig) -> None:
    # FreeSWITCH's say: needs a TTS module the shipped configuration does not load: the prompt fails at once,
    # every try, and the key the callee would have pressed is never read.
    rig.script(MOBILE, TargetBehaviour.answer(dtmf="2"))
    call = alert(prompt="say:Fire alarm at home! Press 1 if it's real, 2 if it's false.")
    outcome = await rig.placer.place(call)
    assert (outcome.digit, outcome.detail) == (None, "prompt_failed")


async def test_callee_hangs_up_during_the_prompt(rig: Rig) -> None:
    rig.script(MOBILE, TargetBehaviour.answer(hangup_after_ms=2000))
    outcome = await rig.placer.place(alert(digit_timeout_s=30))
    assert outcome == CallOutcome(CallOutcomeKind.ANSWERED, "NORMAL_CLEARING", None, False, "hangup")


async def test_busy_no_answer_and_failure(rig: Rig) -> None:
    rig.script("+79001110001", TargetBehaviour.busy(after_ms=100))
    rig.script("+79001110002", TargetBehaviour.no_answer())
    rig.script("+79001110003", TargetBehaviour.unreachable())
    rig.script("+79001110004", TargetBehaviour.reject("CALL_REJECTED"))
    outcomes = await asyncio.gather(*(rig.placer.place(alert(f"+7900111000{i}")) for i in range(1, 5)))
    assert [(o.kind, o.hangup_cause) for o in outcomes] == [
        (CallOutcomeKind.BUSY, "USER_BUSY"), (CallOutcomeKind.NO_ANSWER, "NO_ANSWER"),
        (CallOutcomeKind.FAILED, "NORMAL_TEMPORARY_FAILURE"), (CallOutcomeKind.BUSY, "CALL_REJECTED")]
    assert len(rig.registry) == 0
    assert rig.server.active_calls == 0


async def test_prompt_only_call(rig: Rig) -> None:
    rig.script(MOBILE, TargetBehaviour.answer())
    outcome = await rig.placer.place(alert(digits=""))
    assert (outcome.kind, outcome.digit, outcome.detail) == (CallOutcomeKind.ANSWERED, None, "played")


async def test_record_a_message(rig: Rig, tmp_path: Path) -> None:
    rig.script(MOBILE, TargetBehaviour.answer(hangup_after_ms=3000))
    path = tmp_path / "rec" / "msg.wav"
    call = alert(digits="", record_s=20, record_path=str(path))
    outcome = await rig.placer.place(call)
    assert (outcome.kind, outcome.recorded, outcome.detail, outcome.hangup_cause) == (
        CallOutcomeKind.ANSWERED, True, "recorded", "NORMAL_CLEARING")
    recording = rig.emu.recordings[-1]
    assert (recording.uuid, recording.path) == (call.call_uuid, str(path))
    assert 2000 <= recording.ms <= 3500
    assert path.is_file()
    await eventually(lambda: [e.name for e in rig.events if e.name.startswith("RECORD")] == [
        "RECORD_START", "RECORD_STOP"])
    stop = next(e for e in rig.events if e.name == "RECORD_STOP")
    assert stop.get("Record-File-Path") == str(path)
    assert stop.unique_id == call.call_uuid
    # The time limit reached: success-maxtime, and the whole limit is recorded.
    rig.script(MOBILE, TargetBehaviour.answer())
    outcome = await rig.placer.place(replace(call, call_uuid=new_uuid(), record_s=2))
    assert outcome.recorded
    assert (rig.emu.recordings[-1].ms, rig.emu.recordings[-1].completion_cause) == (2000, "success-maxtime")


async def test_call_exists_during_the_call_and_not_after(rig: Rig) -> None:
    rig.script(MOBILE, TargetBehaviour.answer())
    call = alert(digit_timeout_s=60, tries=1)  # 0.6 s of silence at the prompt
    placing = asyncio.create_task(rig.placer.place(call))
    await eventually(lambda: call.call_uuid in {s.uuid for s in rig.emu.sessions.values()})
    assert await rig.placer.call_exists(call.call_uuid) is True
    assert (await placing).detail == "no_input"
    assert await rig.placer.call_exists(new_uuid()) is False
    await eventually(lambda: call.call_uuid not in rig.emu.sessions)  # torn down after our hangup
    assert await rig.placer.call_exists(call.call_uuid) is False


async def test_unknown_alert_call_is_hung_up_not_routed(rig: Rig) -> None:
    rig.script(MOBILE, TargetBehaviour.answer(dtmf="1"))
    call = alert()  # never registered: as if IIM restarted between originate and answer
    job = await rig.client.bgapi(originate_command(call, gateway_dial=DialSettings(),
                                                   socket_address=f"127.0.0.1:{rig.server.port}"))
    assert job.body == f"+OK {call.call_uuid}\n"
    await eventually(lambda: any(r.uuid == call.call_uuid and r.hangup_cause for r in rig.emu.results))
    socket_call = next(r for r in rig.emu.results if r.uuid == call.call_uuid)
    assert [type(c) for c in socket_call.commands if isinstance(c, HangupCmd)] == [HangupCmd]
    assert not any(isinstance(c, Execute) for c in socket_call.commands)  # no prompt, no bridge
    assert socket_call.hangup_cause == "NORMAL_CLEARING"
    assert rig.fallthrough == []
    assert rig.results == []


async def test_non_alert_calls_go_to_the_fallthrough(rig: Rig) -> None:
    result = await rig.emu.place_call("127.0.0.1", rig.server.port, CallSpec(destination="79001234567"))
    assert rig.fallthrough == ["79001234567"]
    assert result.hangup_cause == "NORMAL_CLEARING"
    # A caller cannot pretend to be an alert call without a registered uuid.
    spoof = await rig.emu.place_call("127.0.0.1", rig.server.port,
                                     CallSpec(destination="79001234568", variables={"iim_alert": "1"}))
    assert rig.fallthrough == ["79001234567"]
    assert spoof.hangup_cause == "NORMAL_CLEARING"


async def test_socket_never_reached_means_ivr_not_connected(rig: Rig) -> None:
    rig.script(MOBILE, TargetBehaviour.answer())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    placer = AlertCallPlacer(rig.client, rig.registry, socket_address=f"127.0.0.1:{dead}", answer_grace_s=0.3)
    outcome = await placer.place(alert())
    assert outcome.kind is CallOutcomeKind.ANSWERED
    assert outcome.detail.startswith("ivr_not_connected")
    assert len(rig.registry) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_switch_down_is_unreachable() -> None:
    port = free_port()  # nothing listens there
    registry = IvrRegistry()
    client = client_for(port)
    pool = InboundPool([client_for(port)])
    await client.start()
    await pool.start()
    try:
        for link in (client, pool):
            placer = AlertCallPlacer(link, registry, socket_address="127.0.0.1:8084", connect_wait_s=0.2,
                                     api_timeout_s=0.2)
            started = time.monotonic()
            outcome = await placer.place(alert())
            assert outcome.kind is CallOutcomeKind.UNREACHABLE, outcome
            assert "switch unreachable" in outcome.detail
            assert await placer.call_exists(new_uuid()) is None
            assert time.monotonic() - started < 2
        assert len(registry) == 0
    finally:
        await client.aclose()
        await pool.aclose()


async def test_emulator_restarted_mid_call(rig: Rig) -> None:
    rig.script(MOBILE, TargetBehaviour.answer())
    call = alert(digit_timeout_s=60)  # the callee listens, silent, when the switch goes down
    placing = asyncio.create_task(rig.placer.place(call))
    await eventually(lambda: any(r.uuid == call.call_uuid and r.connected_at for r in rig.emu.results))
    await asyncio.sleep(0.1)
    port = rig.inbound.port
    await rig.emu.close()
    outcome = await asyncio.wait_for(placing, 5)
    assert (outcome.kind, outcome.digit, outcome.detail) == (CallOutcomeKind.ANSWERED, None, "socket_lost")
    await eventually(lambda: len(rig.results) == 1)
    # The switch comes back empty: the call is gone, and the worker can tell it did not survive.
    rig.emu = FreeSwitchEmulator(time_scale=SCALE)
    rig.inbound = await rig.emu.start_inbound(port=port)
    await rig.client.wait_connected(5)
    assert await rig.placer.call_exists(call.call_uuid) is False


async def test_emulator_restarted_while_ringing(rig: Rig) -> None:
    rig.script(MOBILE, TargetBehaviour.no_answer())
    call = alert(ring_s=120)  # 1.2 s of ringing at this time scale
    placing = asyncio.create_task(rig.placer.place(call))
    await eventually(lambda: len(rig.emu.originates) == 1)
    port = rig.inbound.port
    await rig.emu.close()
    rig.emu = FreeSwitchEmulator(time_scale=SCALE)
    rig.inbound = await rig.emu.start_inbound(port=port)
    outcome = await asyncio.wait_for(placing, 5)
    assert outcome.kind is CallOutcomeKind.UNREACHABLE
    assert "not on the switch" in outcome.detail or "switch unreachable" in outcome.detail
    assert len(rig.registry) == 0


async def test_fifty_concurrent_alert_calls(rig: Rig) -> None:
    expected: dict[str, tuple[CallOutcomeKind, str | None]] = {}
    calls = []
    for i in range(50):
        number = f"+7901000{i:04d}"
        kind = i % 5
        if kind == 0:
            rig.script(number, TargetBehaviour.answer(after_ms=i * 10, dtmf="1"))
            expected[number] = (CallOutcomeKind.ANSWERED, "1")
        elif kind == 1:
            rig.script(number, TargetBehaviour.answer(after_ms=i * 10, dtmf="2"))
            expected[number] = (CallOutcomeKind.ANSWERED, "2")
        elif kind == 2:
            rig.script(number, TargetBehaviour.answer(dtmf=""))
            expected[number] = (CallOutcomeKind.ANSWERED, None)
        elif kind == 3:
            rig.script(number, TargetBehaviour.busy(after_ms=i * 10))
            expected[number] = (CallOutcomeKind.BUSY, None)
        else:
            rig.script(number, TargetBehaviour.no_answer())
            expected[number] = (CallOutcomeKind.NO_ANSWER, None)
        calls.append(alert(number))
    outcomes = await asyncio.gather(*(rig.placer.place(c) for c in calls))
    got = {c.destination: (o.kind, o.digit) for c, o in zip(calls, outcomes, strict=True)}
    assert got == expected
    assert all(len(rig.emu.originates_to(c.destination)) == 1 for c in calls)
    assert len(rig.registry) == 0
    await eventually(lambda: len(rig.results) == 30)
    assert {u for u, _ in rig.results} == {c.call_uuid for c, o in zip(calls, outcomes, strict=True)
                                          if o.kind is CallOutcomeKind.ANSWERED}


async def test_link_lost_after_originate_and_never_back_is_unreachable_after_the_reconnect_deadline(
        rig: Rig) -> None:
    # The bounded decision: a switch that stays unreachable after the originate does not keep the call
    # (and its incident) waiting; past the reconnect deadline the call counts as unreachable.
    proxy = TcpFaultProxy(f"esl://127.0.0.1:{rig.inbound.port}")
    await proxy.start()
    client = client_for(proxy.port)
    await client.start()
    try:
        await client.wait_connected(5)
        placer = AlertCallPlacer(client, rig.registry, socket_address=f"127.0.0.1:{rig.server.port}",
                                 connect_wait_s=0.3, api_timeout_s=0.3, reconnect_deadline_s=1.0, poll_s=0.1)
        call = alert(ring_s=120)
        placing = asyncio.create_task(placer.place(call))
        await eventually(lambda: len(rig.emu.originates) == 1)
        proxy.cut()
        started = time.monotonic()
        outcome = await asyncio.wait_for(placing, 5)
        assert outcome.kind is CallOutcomeKind.UNREACHABLE, outcome
        assert "switch unreachable for 1 s" in outcome.detail
        assert time.monotonic() - started < 2.5
    finally:
        await client.aclose()
        await proxy.close()


async def test_inbound_client_reconnects_on_demand_rather_than_after_its_backoff() -> None:
    emu = FreeSwitchEmulator(time_scale=SCALE)
    inbound = await emu.start_inbound()
    port = inbound.port
    client = InboundClient(InboundSettings(port=port, command_timeout=2.0, backoff_initial=0.05,
                                           backoff_max=30.0, events=("BACKGROUND_JOB",)))
    await client.start()
    try:
        await client.wait_connected(5)
        await emu.close()
        await eventually(lambda: not client.connected)
        await asyncio.sleep(1.5)  # several failed attempts: the backoff has grown past a second
        emu = FreeSwitchEmulator(time_scale=SCALE)
        await emu.start_inbound(port=port)
        started = time.monotonic()
        reply = await client.api("status", timeout=5)  # wakes the reconnect
        assert reply.body.startswith("UP ")
        assert time.monotonic() - started < 0.5
    finally:
        await client.aclose()
        await emu.close()


async def test_a_call_the_switch_already_has_is_adopted_not_originated_again(rig: Rig) -> None:
    # A worker sent the originate and died before recording it: the next one finds the call on the switch
    # by its origination_uuid and takes its outcome from our IVR.
    rig.script(MOBILE, TargetBehaviour.answer(after_ms=30_000, dtmf="1"))  # 300 ms at this time scale
    call = alert()
    command = originate_command(call, gateway_dial=DialSettings(),
                                socket_address=f"127.0.0.1:{rig.server.port}")
    sent = asyncio.create_task(rig.client.bgapi(command, job_uuid=new_uuid(), timeout=10))
    await eventually(lambda: len(rig.emu.originates_to(MOBILE)) == 1)
    outcome = await rig.placer.place_or_adopt(call)
    assert outcome.kind is CallOutcomeKind.ANSWERED
    assert outcome.digit == "1"
    assert len(rig.emu.originates_to(MOBILE)) == 1  # never originated twice
    sent.cancel()


async def test_a_claimed_call_the_switch_does_not_have_is_placed(rig: Rig) -> None:
    rig.script(MOBILE, TargetBehaviour.answer(after_ms=100, dtmf="2"))
    outcome = await rig.placer.place_or_adopt(alert())
    assert (outcome.kind, outcome.digit) == (CallOutcomeKind.ANSWERED, "2")
    assert len(rig.emu.originates_to(MOBILE)) == 1


async def test_a_call_that_ended_while_the_link_was_down_is_failed_and_never_redialled(rig: Rig) -> None:
    # The switch accepted the originate and stayed up; the callee was busy while our link was cut, so the
    # BACKGROUND_JOB went nowhere. After the reconnect the call is not on the switch: it ended unseen.
    proxy = TcpFaultProxy(f"esl://127.0.0.1:{rig.inbound.port}")
    await proxy.start()
    client = client_for(proxy.port)
    await client.start()
    try:
        await client.wait_connected(5)
        placer = AlertCallPlacer(client, rig.registry, socket_address=f"127.0.0.1:{rig.server.port}",
                                 connect_wait_s=0.3, api_timeout_s=0.3, poll_s=0.05)
        rig.script(MOBILE, TargetBehaviour.busy(after_ms=20_000))  # 200 ms at this time scale
        accepted = asyncio.Event()
        placing = asyncio.create_task(placer.place(alert(), on_sent=accepted.set))
        await asyncio.wait_for(accepted.wait(), 5)
        proxy.cut()
        await asyncio.sleep(0.6)
        proxy.restore()
        outcome = await asyncio.wait_for(placing, 5)
        assert outcome.kind is CallOutcomeKind.FAILED, outcome
        assert "ended while the link was down" in outcome.detail
        assert len(rig.emu.originates_to(MOBILE)) == 1
    finally:
        await client.aclose()
        await proxy.close()


async def test_the_switch_notes_every_alert_call_it_creates(rig: Rig) -> None:
    # ``api_on_originate`` in our originate: the switch's own note outlives the call and the link.
    rig.script(MOBILE, TargetBehaviour.busy(after_ms=100))
    call = alert()
    outcome = await rig.placer.place(call)
    assert outcome.kind is CallOutcomeKind.BUSY
    reply = await rig.client.api(f"hash select/iim_originated/{call.call_uuid}")
    assert reply.body == "1"
    await rig.placer.forget(call.call_uuid)
    reply = await rig.client.api(f"hash select/iim_originated/{call.call_uuid}")
    assert reply.body == "-ERR no reply\n"


async def test_a_claimed_call_the_switch_took_and_that_ended_is_failed_and_never_dialled_again(rig: Rig) -> None:
    # A worker sent the originate and died before recording it; the callee was busy and the call is gone
    # from the switch when the take-over comes. The switch's note says it was dialled: not again.
    rig.script(MOBILE, TargetBehaviour.busy(after_ms=100))
    call = alert()
    command = originate_command(call, gateway_dial=DialSettings(), socket_address=f"127.0.0.1:{rig.server.port}")
    job = await rig.client.bgapi(command, job_uuid=call.call_uuid, timeout=10)
    assert job.body.startswith("-ERR USER_BUSY")
    sent: list[bool] = []
    outcome = await rig.placer.place_or_adopt(call, on_sent=lambda: sent.append(True))
    assert outcome.kind is CallOutcomeKind.FAILED, outcome
    assert "ended while its placer was gone" in outcome.detail
    assert sent == [True]  # recorded as sent: no later take-over dials it either
    assert len(rig.emu.originates_to(MOBILE)) == 1


async def test_a_take_over_that_cannot_ask_the_switch_dials_nothing() -> None:
    emu = FreeSwitchEmulator(time_scale=SCALE)
    inbound = await emu.start_inbound()
    client = client_for(inbound.port)
    await client.start()
    try:
        await client.wait_connected(5)
        registry = IvrRegistry()
        placer = AlertCallPlacer(client, registry, socket_address="127.0.0.1:8084", connect_wait_s=0.2,
                                 api_timeout_s=0.2)
        emu_api = emu.run_api

        def broken(name: str, arg: str | None, listener: Any = None, *, background: bool = False) -> Any:
            if name == "hash":  # a switch whose hash table cannot answer
                return "-ERR hash unavailable\n"
            return emu_api(name, arg, listener, background=background)

        emu.run_api = broken  # type: ignore[method-assign]
        outcome = await placer.place_or_adopt(alert())
        assert outcome.kind is CallOutcomeKind.UNREACHABLE, outcome
        assert "could not be asked" in outcome.detail
        assert emu.originates_to(MOBILE) == []
    finally:
        await client.aclose()
        await emu.close()


async def test_an_alert_socket_waits_while_a_worker_here_is_taking_the_call_over(rig: Rig) -> None:
    # The take-over asks the switch before it registers the call; the socket of the call, answered
    # meanwhile, waits for that registration instead of counting as orphaned and being hung up.
    taking_over: set[str] = set()
    server = OutboundServer(with_alert_calls(rig.registry, lambda call: call.hangup("NORMAL_CLEARING"),
                                             pending=taking_over.__contains__),
                            OutboundSettings(port=0, exit_wait=0.5))
    await server.start()
    try:
        rig.script(MOBILE, TargetBehaviour.answer(after_ms=10, dtmf="1"))
        call = alert()
        taking_over.add(call.call_uuid)
        command = originate_command(call, gateway_dial=DialSettings(), socket_address=f"127.0.0.1:{server.port}")
        job = asyncio.create_task(rig.client.bgapi(command, job_uuid=call.call_uuid, timeout=10))
        await asyncio.sleep(1.5)  # longer than an unclaimed socket waits on its own
        ticket = rig.registry.expect(call)
        taking_over.discard(call.call_uuid)
        result = await asyncio.wait_for(asyncio.shield(ticket.result), 5)
        assert result.digit == "1"
        await job
    finally:
        await server.aclose(drain_timeout=2.0)


async def test_a_switch_without_mod_hash_still_gets_claimed_calls_placed(rig: Rig) -> None:
    # No note can be asked for (mod_hash not loaded): a claimed call the switch does not have is placed; a
    # call never made is worse than one made twice.
    emu_api = rig.emu.run_api

    def without_hash(name: str, arg: str | None, listener: Any = None, *, background: bool = False) -> Any:
        if name == "hash":
            return "-ERR hash Command not found!\n"
        return emu_api(name, arg, listener, background=background)

    rig.emu.run_api = without_hash  # type: ignore[method-assign]
    rig.script(MOBILE, TargetBehaviour.answer(after_ms=100, dtmf="1"))
    outcome = await rig.placer.place_or_adopt(alert())
    assert (outcome.kind, outcome.digit) == (CallOutcomeKind.ANSWERED, "1")
    assert len(rig.emu.originates_to(MOBILE)) == 1
