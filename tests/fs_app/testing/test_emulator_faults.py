"""Fault knobs: fragmentation, coalescing, floods, stalls, resets, queue-overflow kills, huge frames."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import pytest

from fs_app.esl import (
    ChannelData,
    CommandReply,
    Connect,
    DisconnectNotice,
    EslCodec,
    EslMessage,
    Event,
    EventSubscribe,
    Execute,
    Exit,
    HangupCmd,
    Linger,
    MyEvents,
    url_encode,
)
from fs_app.testing import CallResult, CallSpec, FaultConfig, FreeSwitchEmulator, TargetBehaviour
from fs_app.testing.faults import FrameWriter
from fs_app.testing.peers import AppServer, EslPeer
from fs_app.testing.recording import signature

GW = "sofia/gateway/ims/79001234567"


async def run_call(handler: Callable[[EslPeer], Awaitable[None]], faults: FaultConfig,
                   spec: CallSpec | None = None) -> tuple[CallResult, EslPeer]:
    emu = FreeSwitchEmulator(targets={GW: TargetBehaviour.answer(after_ms=20, hangup_after_ms=20)},
                             time_scale=0.05, faults=faults)
    async with AppServer(handler, timeout=10) as app:
        result = await asyncio.wait_for(emu.place_call("127.0.0.1", app.port, spec or CallSpec(max_duration_s=5)),
                                        15)
        for _ in range(200):
            if app.peers and app.peers[0].done:
                break
            await asyncio.sleep(0.01)
    assert not app.errors, app.errors
    return result, app.peers[0]


async def drain(peer: EslPeer) -> None:
    """Read until the connection ends (EOFError)."""
    while True:
        await peer.next(timeout=2)


async def standard_call(peer: EslPeer) -> None:
    peer.send(Connect())
    await peer.expect(ChannelData)
    await peer.command(Linger())
    await peer.command(MyEvents())
    peer.send(Execute(app="bridge", arg=GW, event_uuid="b"))
    await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="bridge")
    peer.send(HangupCmd())
    await peer.expect(lambda m: isinstance(m, DisconnectNotice) and m.is_linger)
    await peer.command(Exit())
    await peer.wait_eof()


async def test_fragmented_stream_parses_to_the_same_messages() -> None:
    _, plain_peer = await run_call(standard_call, FaultConfig())
    result, peer = await run_call(standard_call, FaultConfig(fragment=True, fragment_max=7, seed=3))
    assert result.disconnect == "linger-exit"
    assert max(len(c) for c in peer.chunks) <= 7 * 4  # reads may join a few fragments, never whole frames
    assert sum(1 for c in peer.chunks if len(c) <= 7) > 100
    # CHANNEL_PARK is timing dependent (it fires 20 ms after connect; slow replies let it pass before myevents)
    def sigs(msgs: Sequence[EslMessage]) -> list[tuple[str, ...]]:
        return [s for s in map(signature, msgs) if s != ("event", "CHANNEL_PARK", "")]

    assert sigs(peer.messages) == sigs(plain_peer.messages)
    # byte-at-a-time decoding of the same bytes gives the same messages
    codec = EslCodec()
    one_by_one = [m for b in peer.raw() for m in codec.feed(bytes([b]))]
    assert [signature(m) for m in one_by_one] == [signature(m) for m in peer.messages]


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


async def test_writer_two_sends_per_event_by_default_and_coalescing() -> None:
    transport = RecordingTransport()
    writer = FrameWriter(transport, FaultConfig())
    writer.write_pair(b"head", b"body")
    assert transport.writes == [b"head", b"body"]

    transport = RecordingTransport()
    writer = FrameWriter(transport, FaultConfig(coalesce=True))
    for i in range(1500):
        writer.write_pair(b"h%d" % i, b"b")
    assert transport.writes == []
    await asyncio.sleep(0)
    assert len(transport.writes) == 1
    assert transport.writes[0].count(b"b") == 1500

    transport = RecordingTransport()
    writer = FrameWriter(transport, FaultConfig(fragment=True, fragment_max=3, seed=1))
    writer.write(b"0123456789" * 10)
    writer.close()
    for _ in range(200):
        await asyncio.sleep(0)
    assert b"".join(transport.writes) == b"0123456789" * 10
    assert all(1 <= len(w) <= 3 for w in transport.writes)
    assert transport.closed


async def test_flood_of_events_coalesced() -> None:
    async def app(peer: EslPeer) -> None:
        peer.send(Connect())
        await peer.expect(ChannelData)
        await peer.command(MyEvents())
        await peer.command(Linger())
        peer.send(Execute(app="answer", event_uuid="a"))
        await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="answer")
        peer.send(HangupCmd())
        await peer.expect(lambda m: isinstance(m, DisconnectNotice) and m.is_linger)
        await peer.command(Exit())
        await peer.wait_eof()

    result, peer = await run_call(app, FaultConfig(coalesce=True, flood_events=1200))
    assert result.disconnect == "linger-exit"
    assert len(peer.events("CHANNEL_APPLICATION")) == 1200
    assert max(len(c) for c in peer.chunks) >= 60_000  # big coalesced writes arrive as full reads


async def test_stall_makes_a_silent_peer() -> None:
    async def app(peer: EslPeer) -> None:
        peer.send(Connect())
        await peer.expect(ChannelData)
        await peer.command(MyEvents())
        peer.send(Execute(app="bridge", arg=GW, event_uuid="b"))
        with pytest.raises(TimeoutError):
            await peer.expect(CommandReply, timeout=0.3)
        peer.close()

    result, _ = await run_call(app, FaultConfig(stall_on_app="bridge"), CallSpec(max_duration_s=0.5))
    assert result.disconnect == "stalled"
    assert result.hangup_cause == "NORMAL_CLEARING"


async def test_reset_mid_call_sends_rst() -> None:
    async def app(peer: EslPeer) -> None:
        peer.send(Connect())
        await peer.expect(ChannelData)
        await peer.command(MyEvents())
        peer.send(Execute(app="bridge", arg=GW, event_uuid="b"))
        with pytest.raises(EOFError):
            await drain(peer)

    result, peer = await run_call(app, FaultConfig(reset_on_app="bridge"))
    assert result.disconnect == "reset"
    assert peer.reset  # ECONNRESET, not a clean FIN
    assert result.hangup_cause == "NORMAL_CLEARING"


async def test_queue_overflow_kills_listener() -> None:
    async def app(peer: EslPeer) -> None:
        peer.send(Connect())
        await peer.expect(ChannelData)
        await peer.command(MyEvents())
        await peer.command(Linger())
        peer.send(Execute(app="answer", event_uuid="a"))
        notice = await peer.expect(DisconnectNotice)
        assert isinstance(notice, DisconnectNotice)
        assert notice.body == "killed listener because of lost events\n"
        assert notice.disposition == "disconnect"
        await peer.wait_eof()

    result, peer = await run_call(app, FaultConfig(overflow_after_events=3))
    assert result.disconnect == "killed"
    assert len(peer.events()) == 3
    assert b"Content-Length: 39\n\nkilled listener because of lost events\n" in peer.raw()


async def test_huge_connect_reply_and_many_header_lines() -> None:
    async def app(peer: EslPeer) -> None:
        peer.send(Connect())
        data = await peer.expect(ChannelData)
        assert isinstance(data, ChannelData)
        block_len = peer.raw().find(b"\n\n") + 2
        assert block_len > 65536  # libesl would truncate this header block
        await peer.command(MyEvents())
        peer.send(Execute(app="answer", event_uuid="a"))
        done = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="answer")
        assert len(done.headers) > 1000
        peer.close()

    await run_call(app, FaultConfig(huge_connect_reply=True, event_header_lines=1100))


@pytest.mark.parametrize("fmt", ["plain", "json"])
async def test_multibyte_values(fmt: str) -> None:
    async def app(peer: EslPeer) -> None:
        peer.send(Connect())
        data = await peer.expect(ChannelData)
        assert isinstance(data, ChannelData)
        name = data.channel.get("Caller-Caller-ID-Name") or ""
        assert name == "Ёжик Иванов ☎"
        assert f"Caller-Caller-ID-Name: {url_encode(name)}\n".encode() in peer.raw()
        await peer.command(EventSubscribe(fmt, ("CHANNEL_EXECUTE_COMPLETE",)))
        peer.send(Execute(app="answer", event_uuid="a"))
        done = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE")
        assert isinstance(done, Event)
        assert done.variable("emulator_utf8") == "Привет, мир — 你好 ☎ ünïcödé"
        peer.close()

    await run_call(app, FaultConfig(multibyte_values=True))


async def test_early_notice_without_linger_drops_later_events() -> None:
    async def app(peer: EslPeer) -> None:
        peer.send(Connect())
        await peer.expect(ChannelData)
        await peer.command(MyEvents())
        peer.send(Execute(app="hangup", event_uuid="h"))
        await peer.wait_eof()

    result, peer = await run_call(app, FaultConfig(early_notice=True))
    assert result.disconnect == "no-linger"
    names = [e.name for e in peer.events()]
    assert names[-1] == "CHANNEL_HANGUP"
    assert "CHANNEL_HANGUP_COMPLETE" not in names
