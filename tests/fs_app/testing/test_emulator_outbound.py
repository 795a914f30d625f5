"""Outbound-socket behaviour of the emulator (FreeSWITCH dials the application)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from fs_app.esl import (
    Api,
    BgApi,
    ChannelData,
    CommandReply,
    Connect,
    DisconnectNotice,
    EventSubscribe,
    Execute,
    Exit,
    Filter,
    GetVar,
    HangupCmd,
    Linger,
    MyEvents,
    NoLinger,
    Resume,
)
from fs_app.testing import CallResult, CallSpec, FreeSwitchEmulator, TargetBehaviour
from fs_app.testing.peers import AppServer, EslPeer

GW = "sofia/gateway/ims/79001234567"
Handler = Callable[[EslPeer], Awaitable[None]]


async def run_call(handler: Handler, spec: CallSpec | None = None, emu: FreeSwitchEmulator | None = None,
                   ) -> tuple[CallResult, EslPeer]:
    emu = emu or FreeSwitchEmulator(targets={GW: TargetBehaviour.answer(after_ms=50, hangup_after_ms=100)},
                                    time_scale=0.05)
    async with AppServer(handler) as app:
        result = await asyncio.wait_for(emu.place_call("127.0.0.1", app.port, spec or CallSpec()), 10)
        for _ in range(100):
            if app.peers and (app.peers[0].done or app.errors):
                break
            await asyncio.sleep(0.01)
    assert not app.errors, app.errors
    assert emu.errors == []
    return result, app.peers[0]


async def start(peer: EslPeer, *, linger: bool = True) -> ChannelData:
    peer.send(Connect())
    data = await peer.expect(ChannelData)
    assert isinstance(data, ChannelData)
    if linger:
        assert (await peer.reply(Linger())).reply_text == "+OK will linger"
    assert (await peer.reply(MyEvents())).reply_text == "+OK Events Enabled"
    return data


async def finish(peer: EslPeer) -> None:
    if not any(isinstance(m, DisconnectNotice) and m.is_linger for m in peer.messages):
        await peer.expect(lambda m: isinstance(m, DisconnectNotice) and m.is_linger)
    assert (await peer.reply(Exit())).reply_text == "+OK bye"
    notice = await peer.expect(DisconnectNotice)
    assert isinstance(notice, DisconnectNotice)
    assert notice.disposition == "disconnect"
    await peer.wait_eof()


async def test_place_call_bridge_happy_path() -> None:
    async def app(peer: EslPeer) -> None:
        data = await start(peer)
        assert data.socket_mode == "async"
        assert data.control == "full"
        assert data.channel.get("Caller-Caller-ID-Number") == "79007654321"
        assert data.channel.get("Caller-Destination-Number") == "79001234567"
        peer.send(Execute(app="bridge", arg=f"{{ignore_early_media=true}}{GW}", event_uuid="e-bridge"))
        done = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="bridge")
        assert done.application_uuid == "e-bridge"
        assert done.variable("originate_disposition") == "SUCCESS"
        assert done.variable("DIALSTATUS") == "SUCCESS"
        assert done.variable("bridge_hangup_cause") == "NORMAL_CLEARING"
        peer.send(HangupCmd("NORMAL_CLEARING"))
        await finish(peer)

    result, peer = await run_call(app, CallSpec(destination="79001234567", caller_id_number="79007654321"))
    assert result.bridged_to == GW
    assert result.originate_disposition == "SUCCESS"
    assert result.hangup_cause == "NORMAL_CLEARING"
    assert result.answered
    assert result.disconnect == "linger-exit"
    assert result.error is None
    assert result.connected_at is not None
    assert result.first_command_at is not None
    assert result.bridge_command_at is not None
    assert result.bridge_command_at >= result.connected_at
    names = [e.name for e in peer.events()]
    assert names == [
        "CHANNEL_PARK", "CHANNEL_EXECUTE", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_ANSWER",
        "CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE", "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HANGUP", "CHANNEL_UNPARK",
        "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_STATE", "CHANNEL_STATE", "CHANNEL_HANGUP_COMPLETE",
    ]
    assert "CHANNEL_DESTROY" not in names
    seqs = [e.sequence or 0 for e in peer.events()]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert {e.get("Core-UUID") for e in peer.events()} == {peer.events()[0].get("Core-UUID")}
    sizes = [len(e.headers) for e in peer.events() if e.name.startswith("CHANNEL_EXECUTE")]
    assert all(n > 100 for n in sizes)
    assert result.events == names
    assert result.commands[0] == Connect()


async def test_nothing_is_sent_before_connect_and_first_non_connect_gets_no_reply() -> None:
    async def app(peer: EslPeer) -> None:
        with pytest.raises(TimeoutError):
            await peer.next(timeout=0.1)
        peer.send(Linger())  # processed, but FreeSWITCH does not answer a first command other than connect
        with pytest.raises(TimeoutError):
            await peer.next(timeout=0.1)
        peer.send(Connect())
        await peer.expect(ChannelData)
        assert (await peer.reply(MyEvents())).reply_text == "+OK Events Enabled"
        peer.send(HangupCmd())
        await finish(peer)  # the silent first "linger" took effect

    result, _ = await run_call(app)
    assert result.disconnect == "linger-exit"


async def test_first_command_timeout() -> None:
    async def app(peer: EslPeer) -> None:
        notice = await peer.expect(DisconnectNotice, timeout=2)
        assert isinstance(notice, DisconnectNotice)
        assert notice.disposition == "disconnect"
        await peer.wait_eof()

    result, _ = await run_call(app, CallSpec(first_command_timeout_s=0.2))
    assert result.disconnect == "first-command-timeout"
    assert result.hangup_cause == "NORMAL_CLEARING"


async def test_single_channel_refuses_full_only_commands() -> None:
    async def app(peer: EslPeer) -> None:
        peer.send(Connect())
        data = await peer.expect(ChannelData)
        assert isinstance(data, ChannelData)
        assert data.control == "single-channel"
        for cmd in (Linger(), Api("status"), BgApi("status"), EventSubscribe("plain", ("ALL",)), NoLinger()):
            assert (await peer.reply(cmd)).reply_text == "-ERR command not found"
        assert (await peer.reply(MyEvents())).reply_text == "+OK Events Enabled"
        assert (await peer.reply(GetVar("destination_number"))).reply_text == "7100"
        peer.send(Execute(app="hangup", arg="NORMAL_CLEARING", event_uuid="h"))
        notice = await peer.expect(DisconnectNotice)
        assert isinstance(notice, DisconnectNotice)
        assert notice.disposition == "disconnect"
        await peer.wait_eof()

    result, _ = await run_call(app, CallSpec(socket_args="async"))
    assert result.disconnect == "no-linger"


async def test_sync_mode_reply_after_app_and_no_teardown_events() -> None:
    async def app(peer: EslPeer) -> None:
        peer.send(Connect())
        data = await peer.expect(ChannelData)
        assert isinstance(data, ChannelData)
        assert data.socket_mode == "static"
        await peer.command(Linger())
        await peer.command(MyEvents())
        peer.send(Execute(app="playback", arg="tone_stream://%(200,0,440);loops=2", event_uuid="p"))
        reply = await peer.next()
        assert isinstance(reply, CommandReply)
        assert reply.reply_text == "+OK"
        complete = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="playback")
        assert complete.get("Application-Response") == "FILE PLAYED"
        peer.send(Execute(app="hangup", arg="NORMAL_CLEARING", event_uuid="h"))
        await finish(peer)
        assert "CHANNEL_HANGUP_COMPLETE" not in [e.name for e in peer.events()]
        assert "CHANNEL_PARK" not in [e.name for e in peer.events()]

    await run_call(app, CallSpec(socket_args="full"))


async def test_prefix_matching_and_crlf() -> None:
    async def app(peer: EslPeer) -> None:
        peer.send(b"connect please\r\n\r\n")
        await peer.expect(ChannelData)
        assert (await peer.reply(b"linger 7\r\n\r\n")).reply_text == "+OK will linger 7 seconds"
        assert (await peer.reply(b"myevents json\r\n\r\n")).reply_text == "+OK Events Enabled"
        assert (await peer.reply(b"events plain CHANNEL_ANSWER\n\n")).reply_text == (
            "+OK event listener enabled plain")
        assert (await peer.reply(b"getvarXX\n\n")).reply_text == "-ERR command not found"
        assert (await peer.reply(b"no_such_command\n\n")).reply_text == "-ERR command not found"
        peer.send(b"exit now\n\n")
        assert (await peer.expect(CommandReply)).reply_text == "+OK bye"
        await peer.wait_eof()

    result, _ = await run_call(app)
    assert result.disconnect == "app-exit"
    assert result.hangup_cause == "NORMAL_CLEARING"


async def test_getvar_truncation_and_unset() -> None:
    long_value = "x" * 600

    async def app(peer: EslPeer) -> None:
        await start(peer)
        assert (await peer.reply(GetVar("iim_long"))).reply_text == "x" * 511
        assert (await peer.reply(GetVar("iim_unset"))).reply_text == "-ERR command not found"
        peer.send(Execute(app="set", arg="iim_x=hello world", event_uuid="s"))
        done = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="set")
        assert done.variable("iim_x") == "hello world"
        assert b"variable_iim_x: hello%20world\n" in peer.raw()
        assert (await peer.reply(GetVar("iim_x"))).reply_text == "hello world"
        assert (await peer.reply(GetVar("caller_id_number"))).reply_text == "1000"
        peer.send(HangupCmd("NORMAL_CLEARING"))
        await finish(peer)

    await run_call(app, CallSpec(variables={"iim_long": long_value}))


async def test_api_bgapi_and_background_job_subscription(monkeypatch: pytest.MonkeyPatch) -> None:
    async def app(peer: EslPeer) -> None:
        data = await start(peer)
        uuid = data.unique_id
        api = await peer.api(Api(f"uuid_getvar {uuid} destination_number"))
        assert api.body == "7100"
        reply = await peer.command(BgApi("status", job_uuid="job-1"))
        assert isinstance(reply, CommandReply)
        assert reply.job_uuid == "job-1"
        with pytest.raises(TimeoutError):  # not subscribed: BACKGROUND_JOB is not in myevents
            await peer.expect_event("BACKGROUND_JOB", timeout=0.1)
        await peer.command(EventSubscribe("plain", ("BACKGROUND_JOB",)))
        await peer.command(BgApi(f"uuid_getvar {uuid} destination_number", job_uuid="job-2"))
        job = await peer.expect_event("BACKGROUND_JOB")
        assert job.job_uuid == "job-2"
        assert job.body == "7100"
        assert job.get("Job-Owner-UUID") == uuid
        peer.send(HangupCmd())
        await finish(peer)

    await run_call(app)


async def test_filter_and_json_events() -> None:
    async def app(peer: EslPeer) -> None:
        await start(peer)
        await peer.command(Filter("Event-Name", "CHANNEL_EXECUTE_COMPLETE"))
        assert (await peer.reply(EventSubscribe("json", ("ALL",)))).reply_text == "+OK event listener enabled json"
        peer.send(Execute(app="answer", event_uuid="a"))
        done = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE")
        assert done.format == "json"
        assert done.get("Application") == "answer"
        assert done.variable("endpoint_disposition") == "ANSWER"
        peer.send(HangupCmd())
        await finish(peer)
        assert {e.name for e in peer.events()} == {"CHANNEL_EXECUTE_COMPLETE"}

    await run_call(app)


@pytest.mark.parametrize(
    ("targets", "arg", "cause", "dialstatus"),
    [
        ({GW: TargetBehaviour.busy()}, GW, "USER_BUSY", "BUSY"),
        ({GW: TargetBehaviour.no_answer()}, f"[leg_timeout=1]{GW}", "ALLOTTED_TIMEOUT", "ALLOTTED_TIMEOUT"),
        ({GW: TargetBehaviour.no_answer()}, f"{{originate_timeout=1}}{GW}", "NO_ANSWER", "NOANSWER"),
        ({GW: TargetBehaviour.unreachable()}, GW, "NORMAL_TEMPORARY_FAILURE", "NORMAL_TEMPORARY_FAILURE"),
        ({}, "user/1234", "USER_NOT_REGISTERED", "USER_NOT_REGISTERED"),
    ],
)
async def test_bridge_failure_hangs_up_a_leg_before_execute_complete(
    targets: dict[str, TargetBehaviour], arg: str, cause: str, dialstatus: str
) -> None:
    async def app(peer: EslPeer) -> None:
        await start(peer)
        peer.send(Execute(app="bridge", arg=arg, event_uuid="b"))
        hangup = await peer.expect_event("CHANNEL_HANGUP")
        assert hangup.get("Hangup-Cause") == cause
        done = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="bridge")
        assert done.variable("originate_disposition") == cause
        assert done.variable("DIALSTATUS") == dialstatus
        peer.send(Execute(app="hangup", arg=cause, event_uuid="late"))  # still +OK, never runs
        assert (await peer.expect(CommandReply)).reply_text == "+OK"
        await finish(peer)

    emu = FreeSwitchEmulator(targets=targets, time_scale=0.05)
    result, _ = await run_call(app, emu=emu)
    assert result.hangup_cause == cause
    assert result.originate_disposition == cause
    assert result.bridged_to is None


async def test_bridge_sequential_and_simultaneous_with_continue_on_fail() -> None:
    busy, answer, ring = "sofia/external/busy@h", "sofia/external/ok@h", "sofia/external/ring@h"
    emu = FreeSwitchEmulator(
        targets={busy: TargetBehaviour.busy(after_ms=10), answer: TargetBehaviour.answer(after_ms=100, hangup_after_ms=50),
                 ring: TargetBehaviour.no_answer()},
        time_scale=0.05,
    )

    async def app(peer: EslPeer) -> None:
        await start(peer)
        peer.send(Execute(app="set", arg="continue_on_fail=true", event_uuid="s"))
        peer.send(Execute(app="bridge", arg=f"[leg_timeout=1]{ring}|{busy}", event_uuid="b1"))
        first = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="bridge")
        assert first.variable("originate_disposition") == "USER_BUSY"
        assert "ALLOTTED_TIMEOUT" in (first.variable("originate_causes") or "")
        peer.send(Execute(app="bridge", arg=f"{busy},{answer}", event_uuid="b2"))
        second = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="bridge")
        assert second.variable("originate_disposition") == "SUCCESS"
        assert second.get("Other-Leg-Channel-Name") == answer
        peer.send(HangupCmd("USER_BUSY"))
        await finish(peer)

    result, peer = await run_call(app, emu=emu)
    assert result.bridged_to == answer
    assert result.hangup_cause == "USER_BUSY"
    assert [e.name for e in peer.events()].count("CHANNEL_BRIDGE") == 1


async def test_caller_cancel_while_bridge_rings() -> None:
    async def app(peer: EslPeer) -> None:
        await start(peer)
        peer.send(Execute(app="bridge", arg=GW, event_uuid="b"))
        hangup = await peer.expect_event("CHANNEL_HANGUP")
        assert hangup.get("Hangup-Cause") == "ORIGINATOR_CANCEL"
        done = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="bridge")
        assert done.variable("originate_disposition") == "ORIGINATOR_CANCEL"
        await finish(peer)

    emu = FreeSwitchEmulator(targets={GW: TargetBehaviour.no_answer()}, time_scale=0.05)
    result, _ = await run_call(app, CallSpec(caller_hangup_after_ms=500), emu=emu)
    assert result.hangup_cause == "ORIGINATOR_CANCEL"


async def test_caller_bye_during_playback_and_hangup_after_bridge() -> None:
    async def app(peer: EslPeer) -> None:
        await start(peer)
        peer.send(Execute(app="answer", event_uuid="a"))
        peer.send(Execute(app="playback", arg="tone_stream://%(4000,0,440)", event_uuid="p"))
        done = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="playback")
        assert done.get("Application-Response") == "PLAYBACK ERROR"
        assert done.get("Hangup-Cause") == "NORMAL_CLEARING"
        sock = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="socket")
        assert sock.get("Application-Response") == "PLAYBACK ERROR"
        await finish(peer)

    emu = FreeSwitchEmulator(time_scale=0.05, playback_ms=4000, park_delay_ms=1)
    result, _ = await run_call(app, CallSpec(caller_hangup_after_ms=1500), emu=emu)
    assert result.hangup_cause == "NORMAL_CLEARING"
    assert result.variables["sip_hangup_disposition"] == "recv_bye"


async def test_callee_hangup_with_hangup_after_bridge() -> None:
    async def app(peer: EslPeer) -> None:
        await start(peer)
        peer.send(Execute(app="set", arg="hangup_after_bridge=true", event_uuid="s"))
        peer.send(Execute(app="bridge", arg=GW, event_uuid="b"))
        await finish(peer)
        names = [e.name for e in peer.events()]
        assert names.index("CHANNEL_UNBRIDGE") < names.index("CHANNEL_HANGUP") < names.index("CHANNEL_UNPARK")

    result, _ = await run_call(app)
    assert result.hangup_cause == "NORMAL_CLEARING"


async def test_play_and_get_digits_with_scripted_dtmf() -> None:
    async def app(peer: EslPeer) -> None:
        await start(peer)
        peer.send(Execute(app="answer", event_uuid="a"))
        peer.send(Execute(app="play_and_get_digits",
                          arg="1 4 1 6000 # tone_stream://%(200,0,440) silence_stream://250 iim_digits \\d+ 3000",
                          event_uuid="pg"))
        done = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="play_and_get_digits")
        assert done.variable("iim_digits") == "42"
        assert done.variable("read_result") == "success"
        assert [e.get("DTMF-Digit") for e in peer.events("DTMF")] == ["4", "2", "#"]
        peer.send(HangupCmd())
        await finish(peer)

    result, _ = await run_call(app, CallSpec(dtmf="42#"))
    assert result.digits_collected == "42"


async def test_no_linger_disconnects_right_after_hangup() -> None:
    async def app(peer: EslPeer) -> None:
        await start(peer, linger=False)
        peer.send(Execute(app="hangup", arg="NORMAL_CLEARING", event_uuid="h"))
        notice = await peer.expect(DisconnectNotice)
        assert isinstance(notice, DisconnectNotice)
        assert notice.disposition == "disconnect"
        assert notice.body == "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
        await peer.wait_eof()
        assert peer.events()[-1].name == "CHANNEL_HANGUP_COMPLETE"

    result, _ = await run_call(app)
    assert result.disconnect == "no-linger"


async def test_linger_n_closes_by_itself() -> None:
    async def app(peer: EslPeer) -> None:
        peer.send(Connect())
        await peer.expect(ChannelData)
        await peer.command(Linger(2))
        await peer.command(MyEvents())
        peer.send(Execute(app="hangup", event_uuid="h"))
        notice = await peer.expect(DisconnectNotice)
        assert isinstance(notice, DisconnectNotice)
        assert notice.linger_time == 2
        final = await peer.expect(DisconnectNotice)
        assert isinstance(final, DisconnectNotice)
        assert final.disposition == "disconnect"
        await peer.wait_eof()

    result, _ = await run_call(app)
    assert result.disconnect == "linger-timeout"


async def test_app_closing_socket_hangs_up_normal_clearing() -> None:
    async def app(peer: EslPeer) -> None:
        await start(peer)
        peer.send(Execute(app="answer", event_uuid="a"))
        await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="answer")
        peer.close()

    result, _ = await run_call(app)
    assert result.disconnect == "app-closed"
    assert result.hangup_cause == "NORMAL_CLEARING"


async def test_resume_is_recorded() -> None:
    async def app(peer: EslPeer) -> None:
        await start(peer)
        assert (await peer.reply(Resume())).reply_text == "+OK"
        peer.close()

    result, _ = await run_call(app)
    assert result.resumed


async def test_an_application_the_switch_has_but_the_emulator_does_not_model_completes_at_once() -> None:
    async def app(peer: EslPeer) -> None:
        await start(peer)
        peer.send(Execute(app="export", arg="iim_tag=abc", event_uuid="e"))
        peer.send(Execute(app="log", arg="INFO hello", event_uuid="u"))
        done = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="log")
        assert done.get("Application-Response") == "_none_"
        assert done.variable("iim_tag") == "abc"
        assert "iim_tag" in (done.variable("export_vars") or "")
        peer.send(HangupCmd("CALL_REJECTED"))
        await finish(peer)

    result, _ = await run_call(app)
    assert result.hangup_cause == "CALL_REJECTED"


async def test_an_application_the_switch_does_not_have_hangs_the_call_up_without_executing() -> None:
    async def app(peer: EslPeer) -> None:
        await start(peer)
        peer.send(Execute(app="answer", event_uuid="a"))
        await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="answer")
        peer.send(Execute(app="voicemail", arg="default 127.0.0.1 1000", event_uuid="v"))
        assert (await peer.expect(CommandReply)).reply_text == "+OK"
        hangup = await peer.expect_event("CHANNEL_HANGUP")
        assert hangup.get("Hangup-Cause") == "DESTINATION_OUT_OF_ORDER"
        await finish(peer)
        assert [e.get("Application") for e in peer.events("CHANNEL_EXECUTE")] == ["answer"]
        assert [e.get("Application") for e in peer.events("CHANNEL_EXECUTE_COMPLETE")] == ["answer", "socket"]

    emu = FreeSwitchEmulator(time_scale=0.05)
    result, _ = await run_call(app, emu=emu)
    assert result.hangup_cause == "DESTINATION_OUT_OF_ORDER"
    assert [app for _, app in emu.invalid_applications] == ["voicemail"]


async def test_connect_failure_is_reported() -> None:
    emu = FreeSwitchEmulator()
    async with AppServer(lambda peer: asyncio.sleep(0)) as server:
        port = server.port
    result = await emu.place_call("127.0.0.1", port, CallSpec())
    assert result.disconnect == "connect-failed"
    assert result.error is not None
