"""Inbound-socket behaviour of the emulator (the application connects to 8021)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fs_app.esl import (
    Api,
    ApiResponse,
    Auth,
    AuthRequest,
    BgApi,
    ChannelData,
    CommandReply,
    Connect,
    DisconnectNotice,
    Event,
    EventSubscribe,
    Exit,
    Filter,
    Linger,
    Log,
    LogData,
    MyEvents,
    NoEvents,
    NoLinger,
    RudeRejection,
    SendEvent,
)
from fs_app.testing import FreeSwitchEmulator, InboundServer, TargetBehaviour
from fs_app.testing.peers import AppServer, EslPeer

CALLEE = "sofia/external/callee@127.0.0.1:5090"
BUSY = "sofia/external/busy@127.0.0.1:5091"


@pytest.fixture
async def emu() -> AsyncIterator[FreeSwitchEmulator]:
    emulator = FreeSwitchEmulator(
        targets={CALLEE: TargetBehaviour.answer(after_ms=100, hangup_after_ms=200), BUSY: TargetBehaviour.busy()},
        time_scale=0.1,
    )
    yield emulator
    await emulator.close()


@pytest.fixture
async def server(emu: FreeSwitchEmulator) -> InboundServer:
    return await emu.start_inbound()


_PEERS: list[EslPeer] = []


@pytest.fixture(autouse=True)
async def _close_peers() -> AsyncIterator[None]:
    yield
    for peer in _PEERS:
        peer.close()
    _PEERS.clear()
    await asyncio.sleep(0.01)


async def client(server: InboundServer, *, auth: bool = True) -> EslPeer:
    peer = await EslPeer.connect("127.0.0.1", server.port)
    _PEERS.append(peer)
    assert isinstance(await peer.next(), AuthRequest)
    if auth:
        assert (await peer.reply(Auth("ClueCon"))).reply_text == "+OK accepted"
    return peer


async def test_auth_greeting_wrong_password_and_unauthenticated_commands(server: InboundServer) -> None:
    peer = await client(server, auth=False)
    assert (await peer.reply(Api("status"))).reply_text == "-ERR command not found"
    assert (await peer.reply(Auth("wrong"))).reply_text == "-ERR invalid"
    notice = await peer.next()
    assert isinstance(notice, DisconnectNotice)
    assert notice.disposition is None
    await peer.wait_eof()
    assert peer.raw().startswith(b"Content-Type: auth/request\n\n")
    assert peer.raw().endswith(b"Content-Type: text/disconnect-notice\nContent-Length: 67\n\nDisconnected, goodbye.\n"
                               b"See you at ClueCon! http://www.cluecon.com/\n")


async def test_auth_timeout(emu: FreeSwitchEmulator) -> None:
    server = await emu.start_inbound(auth_timeout_s=0.1)
    peer = await client(server, auth=False)
    assert isinstance(await peer.next(timeout=2), DisconnectNotice)
    await peer.wait_eof()


async def test_acl_rude_rejection(emu: FreeSwitchEmulator) -> None:
    server = await emu.start_inbound(acl_allow=["10.0.0.0/8"])
    peer = await EslPeer.connect("127.0.0.1", server.port)
    _PEERS.append(peer)
    msg = await peer.next()
    assert isinstance(msg, RudeRejection)
    assert msg.body == "Access Denied, go away.\n"
    await peer.wait_eof()
    assert peer.raw() == b"Content-Type: text/rude-rejection\nContent-Length: 24\n\nAccess Denied, go away.\n"
    allowed = await emu.start_inbound(acl_allow=["127.0.0.0/8"])
    await client(allowed)


async def test_session_commands_without_a_session(server: InboundServer) -> None:
    peer = await client(server)
    assert (await peer.reply(Linger())).reply_text == "-ERR not controlling a session"
    assert (await peer.reply(NoLinger())).reply_text == "-ERR not controlling a session"
    assert (await peer.reply(b"divert_events on\n\n")).reply_text == "-ERR not controlling a session."
    assert (await peer.reply(b"resume\n\n")).reply_text == "-ERR command not found"
    assert (await peer.reply(b"myevents\n\n")).reply_text == "-ERR command not found"
    assert (await peer.reply(b"sendmsg 00000000-0000-4000-8000-000000000000\ncall-command: hangup\n\n")
            ).reply_text == "-ERR invalid session id [00000000-0000-4000-8000-000000000000]"
    assert (await peer.reply(b"filter Event-Name\n\n")).reply_text == "-ERR invalid syntax"
    assert (await peer.reply(NoEvents())).reply_text == "-ERR not listening for events"
    assert (await peer.reply(b"nolog\n\n")).reply_text == "-ERR not loging"
    assert (await peer.reply(Exit())).reply_text == "+OK bye"
    assert isinstance(await peer.next(), DisconnectNotice)
    await peer.wait_eof()


async def test_api_commands(server: InboundServer) -> None:
    peer = await client(server)
    status = await peer.api(Api("status"))
    assert isinstance(status, ApiResponse)
    assert status.body.startswith("UP 0 years")
    assert (await peer.api(Api("show channels"))).body == "\n0 total.\n"
    assert (await peer.api(Api("nosuchcommand"))).body == "-ERR nosuchcommand Command not found!\n"
    assert (await peer.api(Api("uuid_getvar nope x"))).body == "-ERR No such channel!\n"
    assert (await peer.api(Api("version"))).body.startswith("FreeSWITCH Version 1.10.12")


async def test_bgapi_job_uuid_and_subscription(server: InboundServer) -> None:
    peer = await client(server)
    reply = await peer.command(BgApi("status", job_uuid="my-job"))
    assert isinstance(reply, CommandReply)
    assert reply.reply_text == "+OK Job-UUID: my-job"
    assert reply.job_uuid == "my-job"
    with pytest.raises(TimeoutError):
        await peer.expect_event("BACKGROUND_JOB", timeout=0.1)
    await peer.command(EventSubscribe("plain", ("BACKGROUND_JOB",)))
    reply = await peer.command(b"bgapi status\n\n")
    assert isinstance(reply, CommandReply)
    assert reply.job_uuid
    job = await peer.expect_event("BACKGROUND_JOB")
    assert job.job_uuid == reply.job_uuid
    assert (job.body or "").startswith("UP ")
    assert "Job-Owner-UUID" not in job.headers


async def test_originate_park_events_and_uuid_kill(server: InboundServer, emu: FreeSwitchEmulator) -> None:
    watcher = await client(server)
    await watcher.command(EventSubscribe("json", ("ALL",)))
    control = await client(server)
    await control.command(EventSubscribe("plain", ("BACKGROUND_JOB",)))
    uuid = "11111111-2222-4333-8444-555555555555"
    await control.command(BgApi(f"originate {{origination_uuid={uuid},originate_timeout=10}}{CALLEE} &park",
                                job_uuid="j1"))
    job = await control.expect_event("BACKGROUND_JOB", timeout=5)
    assert job.body == f"+OK {uuid}\n"
    await watcher.expect_event("CHANNEL_PARK", timeout=5)
    rows = (await control.api(Api("show channels"))).body
    assert uuid in rows
    assert rows.endswith("\n\n1 total.\n")
    assert (await control.api(Api(f"uuid_kill {uuid}"))).body == "+OK\n"
    await watcher.expect_event("CHANNEL_DESTROY", timeout=5)
    names = [e.name for e in watcher.events() if e.unique_id == uuid]
    assert names[:5] == ["CHANNEL_OUTGOING", "CHANNEL_STATE", "CHANNEL_CREATE", "CHANNEL_STATE", "CHANNEL_STATE"]
    assert names[-3:] == ["CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY", "CHANNEL_STATE"]
    assert all(e.format == "json" for e in watcher.events())
    hangup = next(e for e in watcher.events() if e.name == "CHANNEL_HANGUP")
    assert hangup.get("Hangup-Cause") == "NORMAL_CLEARING"
    assert emu.sessions == {}


async def test_uuid_kill_of_a_ringing_originate_ends_its_job_at_once_with_that_cause(
        server: InboundServer, emu: FreeSwitchEmulator) -> None:
    emu.targets["sofia/external/slow@127.0.0.1:5092"] = TargetBehaviour.answer(after_ms=60_000)  # x0.1: 6 s
    control = await client(server)
    await control.command(EventSubscribe("plain", ("BACKGROUND_JOB", "CHANNEL_CREATE")))
    uuid = "11111111-2222-4333-8444-666666666666"
    await control.command(BgApi(f"originate {{origination_uuid={uuid},originate_timeout=30}}"
                                "sofia/external/slow@127.0.0.1:5092 &park", job_uuid="j2"))
    await control.expect_event("CHANNEL_CREATE", timeout=5)
    started = asyncio.get_running_loop().time()
    assert (await control.api(Api(f"uuid_kill {uuid} ORIGINATOR_CANCEL"))).body == "+OK\n"
    job = await control.expect_event("BACKGROUND_JOB", timeout=5)
    assert job.body == "-ERR ORIGINATOR_CANCEL\n"
    assert asyncio.get_running_loop().time() - started < 1.0  # not when the callee would have answered
    assert emu.sessions == {}


async def test_originate_failures(server: InboundServer) -> None:
    peer = await client(server)
    await peer.command(EventSubscribe("plain", ("BACKGROUND_JOB", "CHANNEL_CREATE", "CHANNEL_HANGUP_COMPLETE")))
    await peer.command(BgApi("originate user/1005 &park"))
    assert (await peer.expect_event("BACKGROUND_JOB")).body == "-ERR USER_NOT_REGISTERED\n"
    await peer.command(BgApi("originate error/user_busy &park"))
    assert (await peer.expect_event("BACKGROUND_JOB")).body == "-ERR USER_BUSY\n"
    assert not peer.events("CHANNEL_CREATE")  # neither creates a channel
    api = await peer.api(Api(f"originate {{originate_timeout=5}}{BUSY} &park"))
    assert isinstance(api, ApiResponse)
    assert api.body == "-ERR USER_BUSY\n"
    await peer.expect_event("CHANNEL_HANGUP_COMPLETE")
    idx = [type(m).__name__ for m in peer.messages]
    assert idx.index("ApiResponse") < max(i for i, m in enumerate(peer.messages) if isinstance(m, Event))


async def test_originate_to_outbound_socket(server: InboundServer) -> None:
    uuid = "33ac64a1-7e7f-4644-84ca-b6948f665156"
    seen: list[ChannelData] = []

    async def app(peer: EslPeer) -> None:
        peer.send(Connect())
        data = await peer.expect(ChannelData)
        assert isinstance(data, ChannelData)
        seen.append(data)
        await peer.command(Linger())
        await peer.command(MyEvents())
        await peer.command(b"sendmsg\ncall-command: hangup\nhangup-cause: NORMAL_CLEARING\n\n")
        await peer.expect(lambda m: isinstance(m, DisconnectNotice) and m.is_linger)
        await peer.command(Exit())
        await peer.wait_eof()

    async with AppServer(app) as outbound:
        control = await client(server)
        await control.command(EventSubscribe("plain", ("BACKGROUND_JOB",)))
        await control.command(BgApi(
            f"originate {{origination_uuid={uuid},originate_timeout=10,ignore_early_media=true}}{CALLEE} "
            f"&socket('127.0.0.1:{outbound.port} async full')"))
        job = await control.expect_event("BACKGROUND_JOB", timeout=5)
        assert job.body == f"+OK {uuid}\n"
        assert outbound.peers  # the outbound connection was made before the job result
        for _ in range(200):
            if outbound.peers[0].done:
                break
            await asyncio.sleep(0.01)
    assert not outbound.errors, outbound.errors
    data = seen[0]
    assert data.unique_id == uuid
    assert data.channel.get("Call-Direction") == "outbound"
    assert data.channel.get("Answer-State") == "answered"
    assert data.channel.get("variable_ignore_early_media") == "true"


async def test_myevents_uuid_gets_session_notice(server: InboundServer) -> None:
    uuid = "3596b1d1-af14-4dee-817d-4968922d3fec"
    control = await client(server)
    await control.api(Api(f"originate {{origination_uuid={uuid}}}{CALLEE} &park"))
    mine = await client(server)
    assert (await mine.reply(MyEvents(uuid=uuid))).reply_text == "+OK Events Enabled"
    assert (await mine.reply(b"myevents 00000000-0000-4000-8000-000000000000 json\n\n")
            ).reply_text == "-ERR aready enabled."
    notice = await mine.expect(DisconnectNotice, timeout=5)
    assert isinstance(notice, DisconnectNotice)
    assert notice.controlled_session_uuid == uuid
    assert notice.disposition == "disconnect"
    await mine.wait_eof()
    names = [e.name for e in mine.events()]
    assert names[-1] == "CHANNEL_HANGUP_COMPLETE"
    assert "CHANNEL_DESTROY" not in names


async def test_registration_events(server: InboundServer, emu: FreeSwitchEmulator) -> None:
    peer = await client(server)
    await peer.command(EventSubscribe("plain", ("CUSTOM", "sofia::register", "sofia::expire")))
    emu.register_user("1001", expires=60)
    emu.unregister_user("1001")
    emu.register_user("1002", expires=5)
    emu.expire_user("1002")
    reg = await peer.expect_event("CUSTOM")
    assert reg.subclass == "sofia::register"
    assert reg.get("expires") == "60"
    assert reg.get("from-user") == "1001"
    reg2 = await peer.expect_event("CUSTOM")
    assert reg2.subclass == "sofia::register"
    assert reg2.get("from-user") == "1002"
    exp = await peer.expect_event("CUSTOM")
    assert exp.subclass == "sofia::expire"
    assert int(exp.get("expires") or 0) > 1_700_000_000
    assert len(peer.events()) == 3  # sofia::unregister was not subscribed
    emu.register_user("1005")
    await peer.api(Api("status"))
    assert emu.target_for("user/1005").kind == "answer"
    assert emu.target_for("user/1006").kind == "not_registered"


async def test_filters_sendevent_and_log(server: InboundServer) -> None:
    peer = await client(server)
    assert (await peer.reply(b"filter add Event-Subclass my::thing\n\n")).reply_text == (
        "+OK filter added. [Event-Subclass]=[my::thing]")
    await peer.command(EventSubscribe("plain", ("CUSTOM", "my::thing", "my::other")))
    reply = await peer.reply(SendEvent("CUSTOM", (("Event-Subclass", "my::other"), ("X", "1"))))
    assert reply.reply_text.startswith("+OK ")
    await peer.command(SendEvent("CUSTOM", (("Event-Subclass", "my::thing"), ("X", "2"))))
    event = await peer.expect_event("CUSTOM")
    assert event.get("X") == "2"
    assert (await peer.reply(Filter("Event-Name", "HEARTBEAT"))).reply_text == (
        "+OK filter added. [Event-Name]=[HEARTBEAT]")
    assert (await peer.reply(b"filter delete all\n\n")).reply_text == "+OK filter deleted. [all][]"
    assert (await peer.reply(Log("7"))).reply_text == "+OK log level 7 [7]"
    await peer.command(BgApi("originate error/user_busy &park"))
    log = await peer.expect(LogData)
    assert isinstance(log, LogData)
    assert log.level == 7
    assert "Parsing global variables" in log.body
    assert (await peer.reply(b"nolog\n\n")).reply_text == "+OK no longer logging"
    assert (await peer.reply(NoEvents())).reply_text == "+OK no longer listening for events"


async def test_drop_connections_and_restart_listener(server: InboundServer) -> None:
    peer = await client(server)
    other = await client(server)
    assert server.drop_connections() == 2
    notice = await peer.next()
    assert isinstance(notice, DisconnectNotice)
    assert notice.body == "The system is being shut down.\n"
    await peer.wait_eof()
    await other.wait_eof()
    peer = await client(server)
    assert server.drop_connections(reset=True) == 1
    with pytest.raises(EOFError):
        await peer.next()
    assert peer.reset
    port = server.port
    await server.stop_listening()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await server.start_listening()
    assert server.port == port
    await client(server)
