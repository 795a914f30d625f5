"""The chaos harness's own parts: the seeded schedule and the fault proxy's originate triggers."""

from __future__ import annotations

import asyncio

from benchmarks._chaos.proxy import FaultProxy
from benchmarks._chaos.schedule import KINDS, plan

UUID = "0b5f7c9e-1c2d-4e3f-8a9b-0c1d2e3f4a5b"
ORIGINATE = (f"bgapi originate {{origination_uuid={UUID},iim_incident_id=x}}sofia/gateway/ims/+79610000001 "
             "&socket('127.0.0.1:1 async full')\nJob-UUID: j1\n\n").encode()


def test_the_schedule_is_the_seeds_and_holds_every_kind_of_fault() -> None:
    first = plan(7, 40, 60.0)
    assert first == plan(7, 40, 60.0)
    assert first != plan(8, 40, 60.0)
    assert {f.kind for f in first} == set(KINDS)
    assert all(1.0 <= f.at <= 60.0 for f in first)
    assert [f.at for f in first] == sorted(f.at for f in first)
    assert {f.resource for f in first if f.kind.startswith("kill") or f.kind == "tts_down"} == {"instances"}


async def _upstream() -> tuple[asyncio.Server, list[bytes]]:
    got: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            got.append(data)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, got


async def test_a_before_trigger_eats_the_originate_and_an_after_trigger_lets_it_through() -> None:
    server, got = await _upstream()
    proxy = FaultProxy("esl", [("127.0.0.1", server.sockets[0].getsockname()[1])], watch_originates=True)
    await proxy.start()
    seen: list[str] = []
    try:
        fired = proxy.arm("before", seen.append)
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"api status\n\n")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(ORIGINATE)
        await writer.drain()
        assert await asyncio.wait_for(fired, 2) == UUID
        await asyncio.sleep(0.1)
        assert seen == [UUID]
        assert b"originate" not in b"".join(got)  # claimed, never sent
        writer.close()

        after = proxy.arm("after", seen.append)
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(ORIGINATE)
        await writer.drain()
        assert await asyncio.wait_for(after, 2) == UUID
        await asyncio.sleep(0.1)
        assert b"originate" in b"".join(got)
        assert [u for _, u in proxy.originates] == [UUID, UUID]
        writer.close()
    finally:
        await proxy.close()
        server.close()


async def test_disarming_one_trigger_leaves_the_others_armed() -> None:
    proxy = FaultProxy("esl", [("127.0.0.1", 9)], watch_originates=True)
    await proxy.start()
    try:
        first = proxy.arm("after", lambda _u: None)
        second = proxy.arm("after", lambda _u: None)
        proxy.disarm(first)
        assert first.cancelled()
        assert not second.done()
    finally:
        await proxy.close()
    assert second.cancelled()


async def test_a_cut_path_refuses_connections_until_restored() -> None:
    server, got = await _upstream()
    proxy = FaultProxy("smpp", [("127.0.0.1", server.sockets[0].getsockname()[1])])
    await proxy.start()
    try:
        proxy.cut()
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            assert await asyncio.wait_for(reader.read(), 2) == b""  # reset at once
        except ConnectionResetError:
            pass
        writer.close()
        proxy.restore()
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"hello")
        await writer.drain()
        await asyncio.sleep(0.1)
        assert got == [b"hello"]
        writer.close()
    finally:
        await proxy.close()
        server.close()


async def test_commands_that_only_mention_originate_go_through_in_order() -> None:
    # A chunk after an originate, or ``hash select/iim_originated/...``, was dropped by the proxy: the switch's
    # replies then answered the wrong commands (the "unexpected api/response" of earlier chaos runs).
    server, got = await _upstream()
    proxy = FaultProxy("esl", [("127.0.0.1", server.sockets[0].getsockname()[1])], watch_originates=True)
    await proxy.start()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        sent = [ORIGINATE, b"api uuid_exists x\n\n", b"api hash select/iim_originated/x\n\n", b"api status\n\n"]
        for chunk in sent:
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.05)
        deadline = asyncio.get_running_loop().time() + 2
        while b"".join(got) != b"".join(sent):
            assert asyncio.get_running_loop().time() < deadline, b"".join(got)
            await asyncio.sleep(0.02)
        writer.close()
    finally:
        await proxy.close()
        server.close()
