"""The outbound server and the passthrough handler against real FreeSWITCH bytes (recorded sessions)."""

from __future__ import annotations

import asyncio

from fs_app.call import Call
from fs_app.esl import Execute, HangupCmd
from fs_app.outbound import OutboundServer
from fs_app.passthrough import make_passthrough_handler
from tests.recorded_switch import _kind, replay_call


async def _wait_idle(server: OutboundServer) -> None:
    for _ in range(200):
        if server.active_calls == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("call task still running")


async def test_answered_bridge_is_hung_up_normally_then_the_socket_closed(outbound_server) -> None:
    server = await outbound_server(make_passthrough_handler("sofia/gateway/ims/{destination}"))
    result = await replay_call("o02_bridge_answered_callee_hangs_up", "127.0.0.1", server.port)
    assert [_kind(c) for c in result.commands] == [
        "Connect", "Linger", "MyEvents", "execute:bridge", "hangup",
    ]  # no ``exit``: the channel is gone, the socket is simply closed
    bridge = result.commands[3]
    assert isinstance(bridge, Execute)
    assert bridge.arg == "{ignore_early_media=true}sofia/gateway/ims/7102"
    assert bridge.event_lock
    hangup = result.commands[4]
    assert isinstance(hangup, HangupCmd)
    assert hangup.cause == "NORMAL_CLEARING"
    await _wait_idle(server)


async def test_failed_sequential_bridge_hung_up_by_freeswitch_needs_no_hangup(outbound_server) -> None:
    server = await outbound_server(make_passthrough_handler("sofia/gateway/ims/{destination}"))
    result = await replay_call("o04_bridge_sequential_noanswer_then_busy_fails", "127.0.0.1", server.port)
    assert [_kind(c) for c in result.commands] == ["Connect", "Linger", "MyEvents", "execute:bridge"]
    await _wait_idle(server)


async def test_failed_bridge_with_continue_on_fail_relays_the_callee_cause(outbound_server) -> None:
    seen: dict[str, object] = {}

    async def handler(call: Call) -> None:
        await call.set("continue_on_fail", "true")
        result = await call.bridge("{ignore_early_media=true}sofia/gateway/ims/" + (call.destination_number or ""))
        seen["result"] = result
        await call.hangup(result.hangup_cause or "NORMAL_CLEARING")

    server = await outbound_server(handler)
    result = await replay_call("o04b_bridge_fails_continue_on_fail_app_hangs_up", "127.0.0.1", server.port)
    bridge_result = seen["result"]
    assert not bridge_result.answered  # type: ignore[attr-defined]
    assert bridge_result.disposition == "USER_BUSY"  # type: ignore[attr-defined]
    hangups = [c for c in result.commands if (isinstance(c, Execute) and c.app == "hangup") or isinstance(c, HangupCmd)]
    assert hangups
    await _wait_idle(server)


async def test_caller_cancel_while_ringing_ends_the_call_without_commands(outbound_server) -> None:
    causes: list[str | None] = []

    async def handler(call: Call) -> None:
        await call.bridge("{ignore_early_media=true}sofia/gateway/ims/" + (call.destination_number or ""))
        causes.append(call.hangup_cause)

    server = await outbound_server(handler)
    result = await replay_call("o05_caller_cancels_while_bridge_rings", "127.0.0.1", server.port)
    assert [_kind(c) for c in result.commands] == ["Connect", "Linger", "MyEvents", "execute:bridge"]
    await _wait_idle(server)
    assert causes == ["ORIGINATOR_CANCEL"]


async def test_dtmf_is_collected_from_play_and_get_digits(outbound_server) -> None:
    digits: list[str] = []

    async def handler(call: Call) -> None:
        await call.answer()
        digits.append(await call.play_and_get_digits("tone_stream://%(200,0,440)", timeout_ms=6000))
        await call.hangup()

    server = await outbound_server(handler)
    await replay_call("o09_play_and_get_digits_dtmf", "127.0.0.1", server.port)
    await _wait_idle(server)
    assert digits == ["1"]
