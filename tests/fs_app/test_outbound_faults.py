"""Faults on the outbound socket: silent, resetting and garbling peers, hangups mid-command,
overflow, isolation between calls, shutdown drain. The peer answers with recorded FreeSWITCH frames."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from fs_app.call import Call, CallGone
from fs_app.esl import Command, CommandDecoder, EslTimeout, Execute
from fs_app.outbound import OutboundServer, OutboundSettings
from fs_app.passthrough import make_passthrough_handler
from iim.core import metrics
from tests.recorded_switch import _kind, load_steps, replay_call

O2 = "o02_bridge_answered_callee_hangs_up"


def _sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


class RawSwitch:
    """A hand-driven FreeSWITCH side speaking recorded frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = CommandDecoder()
        self.commands: list[Command] = []
        steps = load_steps(O2)
        self.connect_reply = steps[0].frames[0]
        self.linger_reply = steps[1].frames[0]
        self.myevents_reply = steps[2].frames[0]
        self.ok_reply = steps[3].frames[0]
        self.bridge_events = steps[3].frames[1:]
        self.teardown_events = steps[4].frames[1:]

    @classmethod
    async def dial(cls, server: OutboundServer) -> RawSwitch:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        return cls(reader, writer)

    async def expect(self, count: int, timeout: float = 2.0) -> list[Command]:
        async with asyncio.timeout(timeout):
            while len(self.commands) < count:
                data = await self.reader.read(65536)
                if not data:
                    break
                self.commands.extend(self.decoder.feed(data))
        return self.commands

    async def handshake(self) -> None:
        await self.expect(3)
        self.writer.write(self.connect_reply + self.linger_reply + self.myevents_reply)
        await self.writer.drain()

    def frame_with(self, kind: str) -> bytes:
        for frame in self.bridge_events + self.teardown_events:
            if f"Event-Name: {kind}\n".encode() in frame:
                return frame
        raise LookupError(kind)

    async def closed_by_server(self, timeout: float = 2.0) -> bool:
        async with asyncio.timeout(timeout):
            while await self.reader.read(65536):
                pass
        self.writer.close()
        return True

    def reset(self) -> None:
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


async def _idle(server: OutboundServer) -> None:
    for _ in range(300):
        if server.active_calls == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{server.active_calls} call task(s) leaked")


async def test_silent_peer_is_dropped_after_connect_timeout(outbound_server) -> None:
    before = _sample("iim_esl_errors_total", kind="connect_timeout")
    handled: list[Call] = []

    async def handler(call: Call) -> None:
        handled.append(call)

    server = await outbound_server(handler, connect_timeout=0.2)
    peer = await RawSwitch.dial(server)
    assert [_kind(c) for c in await peer.expect(3)] == ["Connect", "Linger", "MyEvents"]
    assert await peer.closed_by_server()
    await _idle(server)
    assert handled == []
    assert _sample("iim_esl_errors_total", kind="connect_timeout") == before + 1


async def test_a_call_asks_the_switch_for_connect_linger_and_myevents_then_its_application_and_no_filter() -> None:
    """The shipped settings: a server-side ``filter`` would run on every channel event of the whole switch,
    once per socket (it is tested before myevents' Unique-ID check) and recompile its regex each time."""

    async def handler(call: Call) -> None:
        await call.bridge("sofia/gateway/ims/" + (call.destination_number or ""))

    server = OutboundServer(handler, OutboundSettings(port=0))
    await server.start()
    try:
        peer = await RawSwitch.dial(server)
        await peer.handshake()
        assert [_kind(c) for c in await peer.expect(4)] == ["Connect", "Linger", "MyEvents", "execute:bridge"]
        peer.writer.close()
        await peer.writer.wait_closed()
        await _idle(server)
    finally:
        await server.aclose(drain_timeout=1.0)


async def test_peer_reset_mid_bridge_fails_only_that_call(outbound_server) -> None:
    outcomes: list[str] = []

    async def handler(call: Call) -> None:
        try:
            await call.bridge("sofia/gateway/ims/" + (call.destination_number or ""))
            await call.hangup()
            outcomes.append("completed")
        except CallGone:
            outcomes.append("gone")
            raise

    server = await outbound_server(handler)
    peer = await RawSwitch.dial(server)
    await peer.handshake()
    other = asyncio.create_task(replay_call(O2, "127.0.0.1", server.port))
    await peer.expect(4)
    peer.writer.write(peer.ok_reply + peer.bridge_events[0])
    await peer.writer.drain()
    peer.reset()
    replayed = await other
    await _idle(server)
    assert sorted(outcomes) == ["completed", "gone"]
    assert [_kind(c) for c in replayed.commands][-1] == "hangup"  # then closed: the channel is gone


async def test_garbled_frame_aborts_the_connection_and_is_counted(outbound_server) -> None:
    before = _sample("iim_esl_errors_total", kind="protocol")

    async def handler(call: Call) -> None:
        await call.wait_hangup(timeout=5)

    server = await outbound_server(handler)
    peer = await RawSwitch.dial(server)
    await peer.handshake()
    peer.writer.write(b"Content-Length: 12x\nContent-Type: text/event-plain\n\n")
    assert await peer.closed_by_server()
    await _idle(server)
    assert _sample("iim_esl_errors_total", kind="protocol") == before + 1


async def test_a_reply_to_no_command_aborts_the_connection_and_is_counted(outbound_server) -> None:
    # Past a reply nobody asked for, every later reply would be given to the wrong command.
    before = _sample("iim_esl_errors_total", kind="unexpected_reply")
    gone: list[BaseException] = []

    async def handler(call: Call) -> None:
        try:
            await call.wait_hangup(timeout=5)
            await call.execute("playback", "x.wav")
        except CallGone as exc:
            gone.append(exc)
            raise

    server = await outbound_server(handler)
    peer = await RawSwitch.dial(server)
    await peer.handshake()
    peer.writer.write(peer.ok_reply)
    assert await peer.closed_by_server()
    await _idle(server)
    assert len(gone) == 1
    assert _sample("iim_esl_errors_total", kind="unexpected_reply") == before + 1


async def test_hangup_complete_mid_playback_fails_the_command_promptly(outbound_server) -> None:
    errors: list[BaseException] = []

    async def handler(call: Call) -> None:
        try:
            await call.playback("/tmp/long.wav")
        except CallGone as exc:
            errors.append(exc)

    server = await outbound_server(handler)
    peer = await RawSwitch.dial(server)
    await peer.handshake()
    await peer.expect(4)
    peer.writer.write(peer.ok_reply + peer.frame_with("CHANNEL_HANGUP") + peer.frame_with("CHANNEL_HANGUP_COMPLETE"))
    assert await peer.closed_by_server()  # a hung-up channel's socket is closed, no ``exit`` asked
    assert len(peer.commands) == 4
    await _idle(server)
    assert len(errors) == 1


async def test_unanswered_command_times_out_and_runs_the_fallback(outbound_server) -> None:
    async def broken(call: Call) -> None:
        await call.execute("playback", "/tmp/x.wav")

    fallback = make_passthrough_handler("sofia/gateway/ims/{destination}")
    server = await outbound_server(broken, fallback=fallback, command_timeout=0.2)
    peer = await RawSwitch.dial(server)
    await peer.handshake()
    await peer.expect(5, timeout=3)
    assert isinstance(peer.commands[3], Execute)
    assert peer.commands[3].app == "playback"
    assert isinstance(peer.commands[4], Execute)
    assert peer.commands[4].app == "bridge"
    peer.writer.close()
    await _idle(server)


async def test_handler_bug_degrades_to_bridging_the_dialled_number(outbound_server) -> None:
    async def buggy(call: Call) -> None:
        raise LookupError("no policy")

    server = await outbound_server(buggy, fallback=make_passthrough_handler("sofia/gateway/ims/{destination}"))
    result = await replay_call(O2, "127.0.0.1", server.port)
    assert [_kind(c) for c in result.commands] == ["Connect", "Linger", "MyEvents", "execute:bridge", "hangup"]
    await _idle(server)


async def test_event_queue_overflow_drops_oldest_and_is_counted(outbound_server) -> None:
    before = _sample("iim_esl_queue_overflow_total")
    release = asyncio.Event()
    received: list[str] = []

    async def slow_consumer(call: Call) -> None:
        await release.wait()
        async for event in call.events():
            received.append(event.name)

    server = await outbound_server(slow_consumer, event_queue_size=10)
    peer = await RawSwitch.dial(server)
    await peer.handshake()
    park = peer.bridge_events[0]
    peer.writer.write(park * 25)
    await peer.writer.drain()
    for _ in range(100):
        if _sample("iim_esl_queue_overflow_total") >= before + 15:
            break
        await asyncio.sleep(0.01)
    release.set()
    peer.writer.close()
    await _idle(server)
    assert _sample("iim_esl_queue_overflow_total") == before + 15
    assert len(received) == 10


async def test_shutdown_waits_for_calls_in_progress(outbound_server) -> None:
    finished: list[bool] = []

    async def handler(call: Call) -> None:
        await asyncio.sleep(0.3)
        await call.hangup()
        finished.append(True)

    server = await outbound_server(handler)
    replay = asyncio.create_task(replay_call(O2, "127.0.0.1", server.port))
    await asyncio.sleep(0.1)
    await server.aclose(drain_timeout=3.0)
    assert finished == [True]
    await replay


async def test_execute_after_hangup_complete_is_refused(outbound_server) -> None:
    refused: list[BaseException] = []

    async def handler(call: Call) -> None:
        await call.wait_hangup_complete(2.0)
        with pytest.raises(CallGone) as info:
            await call.execute("playback", "x.wav")
        refused.append(info.value)

    server = await outbound_server(handler)
    peer = await RawSwitch.dial(server)
    await peer.handshake()
    peer.writer.write(peer.frame_with("CHANNEL_HANGUP") + peer.frame_with("CHANNEL_HANGUP_COMPLETE"))
    assert await peer.closed_by_server()
    assert len(peer.commands) == 3  # the handshake only: no command after hangup, not even ``exit``
    await _idle(server)
    assert len(refused) == 1


def test_esl_timeout_is_a_connection_error() -> None:
    from fs_app.esl import EslConnectionError

    assert issubclass(EslTimeout, EslConnectionError)
