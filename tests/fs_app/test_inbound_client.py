"""Inbound client against a FreeSWITCH that answers with recorded bytes: auth, api, bgapi,
reconnect with re-subscription, lost jobs, several nodes."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from fs_app.esl import Auth, EslConnectionError, EslTimeout, EventSubscribe
from fs_app.inbound import InboundClient, InboundPool, InboundSettings
from iim.core.retry import backoff_delay
from tests.recorded_switch import RecordedInboundSwitch

SESSIONS = ("i02_api_bgapi_basics", "i01_auth_wrong_password")


@pytest.fixture
async def switch() -> AsyncIterator[RecordedInboundSwitch]:
    fs = RecordedInboundSwitch(*SESSIONS)
    await fs.start()
    yield fs
    await fs.close()


def _client(fs: RecordedInboundSwitch, **kw: object) -> InboundClient:
    opts: dict[str, object] = {"host": "127.0.0.1", "port": fs.port, "backoff_initial": 0.02,
                               "backoff_max": 0.1, "command_timeout": 1.0,
                               "events": ("CHANNEL_CREATE", "CHANNEL_ANSWER", "CHANNEL_HANGUP_COMPLETE",
                                          "BACKGROUND_JOB")}
    opts.update(kw)
    return InboundClient(InboundSettings(**opts))  # type: ignore[arg-type]


async def test_authenticates_subscribes_and_runs_api(switch: RecordedInboundSwitch) -> None:
    client = _client(switch)
    await client.start()
    try:
        await client.wait_connected(2)
        status = await client.api("status")
        assert status.ok
        assert status.body.startswith("UP ")
        missing = await client.api("nosuchcommand")
        assert not missing.ok
        assert missing.body == "-ERR nosuchcommand Command not found!\n"
        assert isinstance(switch.commands[0], Auth)
        assert switch.commands[1] == EventSubscribe(
            "plain", ("CHANNEL_CREATE", "CHANNEL_ANSWER", "CHANNEL_HANGUP_COMPLETE", "BACKGROUND_JOB"))
    finally:
        await client.aclose()


async def test_bgapi_resolves_on_its_background_job(switch: RecordedInboundSwitch) -> None:
    client = _client(switch)
    await client.start()
    try:
        result = await client.bgapi("status", job_uuid="11111111-2222-4333-8444-555555555555", timeout=2)
        assert result.job_uuid == "11111111-2222-4333-8444-555555555555"
        assert result.ok
        assert result.body.startswith("UP ")
        assert result.event.get("Job-Command") == "status"
    finally:
        await client.aclose()


async def test_wrong_password_is_reported_and_retried_with_backoff(switch: RecordedInboundSwitch) -> None:
    client = _client(switch, password="wrong")
    await client.start()
    try:
        for _ in range(100):
            if switch.connections >= 3:
                break
            await asyncio.sleep(0.02)
        assert not client.connected
        assert client.last_error is not None
        assert "refused auth" in client.last_error
        assert switch.connections >= 3
        with pytest.raises(EslTimeout):
            await client.api("status", timeout=0.1)
    finally:
        await client.aclose()


async def test_reconnects_and_subscribes_again_after_the_node_drops(switch: RecordedInboundSwitch) -> None:
    client = _client(switch)
    await client.start()
    try:
        await client.wait_connected(2)
        await switch.stop_listening()
        switch.drop_all()
        await asyncio.sleep(0.05)
        assert not client.connected
        pending = asyncio.create_task(client.api("status", timeout=3))
        await asyncio.sleep(0.1)
        await switch.start(switch.port)
        reply = await pending
        assert reply.ok
        subscriptions = [c for c in switch.commands if isinstance(c, EventSubscribe)]
        assert len(subscriptions) == 2
        assert client.connects == 2
    finally:
        await client.aclose()


async def test_job_in_flight_when_the_node_drops_fails_with_unknown_outcome(switch: RecordedInboundSwitch) -> None:
    client = _client(switch)
    await client.start()
    try:
        await client.wait_connected(2)
        switch.mute = True
        job = asyncio.create_task(client.bgapi("status", timeout=3))
        await asyncio.sleep(0.05)
        switch.drop_all()
        with pytest.raises(EslConnectionError):
            await job
    finally:
        await client.aclose()


async def test_pool_sends_work_to_a_connected_node(switch: RecordedInboundSwitch) -> None:
    down = InboundClient(InboundSettings(host="127.0.0.1", port=1, backoff_initial=0.05, backoff_max=0.1,
                                         connect_timeout=0.2))
    up = _client(switch, name="fs-b")
    pool = InboundPool([down, up])
    await pool.start()
    try:
        await up.wait_connected(2)
        for _ in range(3):
            chosen = await pool.pick(timeout=1)
            assert chosen is up
        assert (await pool.api("status")).ok
    finally:
        await pool.aclose()


def test_backoff_grows_exponentially_within_jitter_bounds_and_caps() -> None:
    rng = random.Random(7)
    for attempt, full in [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (50, 30.0)]:
        delays = [backoff_delay(attempt, 0.5, 30.0, rng=rng) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > full / 4  # really jittered


async def test_another_clients_background_job_reaches_listeners_and_settles_nothing() -> None:
    # FreeSWITCH sends every BACKGROUND_JOB to every subscriber: for the other client it is just an event.
    from fs_app.esl import Event
    from fs_app.testing import FreeSwitchEmulator

    emu = FreeSwitchEmulator(time_scale=0.01, write_recordings=False)
    server = await emu.start_inbound()
    settings = {"host": "127.0.0.1", "port": server.port, "command_timeout": 2.0, "events": ("BACKGROUND_JOB",)}
    mine, other = InboundClient(InboundSettings(**settings)), InboundClient(InboundSettings(**settings))  # type: ignore[arg-type]
    seen: list[Event] = []
    other.add_listener(seen.append)
    try:
        await mine.start()
        await other.start()
        await mine.wait_connected(2)
        await other.wait_connected(2)
        result = await mine.bgapi("status", job_uuid="job-of-mine", timeout=2)
        assert result.ok
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert [e.job_uuid for e in seen] == ["job-of-mine"]
        assert other.connected
        assert other.connects == 1
        assert (await other.api("status")).ok  # its own reply FIFO is intact
    finally:
        await mine.aclose()
        await other.aclose()
        await server.close()
        await emu.close()


class _OutOfStepSwitch:
    """An Event Socket that authenticates, then answers every command with the other kind of reply (a bgapi
    with an api/response, an api with ``+OK Job-UUID``): replies out of step with the commands."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"Content-Type: auth/request\n\n")
        try:
            while True:
                command = await reader.readuntil(b"\n\n")
                if command.startswith((b"auth", b"event")):
                    writer.write(b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n")
                elif command.startswith(b"bgapi"):
                    writer.write(b"Content-Type: api/response\nContent-Length: 5\n\n+OK\n\n")
                else:
                    writer.write(b"Content-Type: command/reply\nReply-Text: +OK Job-UUID: x\nJob-UUID: x\n\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


async def test_replies_out_of_step_reset_the_connection_and_leave_the_outcome_unknown() -> None:
    # A bgapi answered by an api/response was reported as the switch refusing the originate: the placer then
    # took the call as never dialled while it rang. The stream can no longer be trusted: reset it, and the
    # outcome is unknown (asked of the switch later), never a refusal.
    fs = _OutOfStepSwitch()
    await fs.start()
    client = InboundClient(InboundSettings(host="127.0.0.1", port=fs.port, command_timeout=1.0, backoff_initial=0.02,
                                           backoff_max=0.1, events=("BACKGROUND_JOB",)))
    await client.start()
    try:
        await client.wait_connected(2)
        with pytest.raises(EslConnectionError, match="answered by api/response"):
            await client.bgapi("originate {origination_uuid=x}user/1 &park()", job_uuid="x", timeout=2)
        await client.wait_connected(2)
        with pytest.raises(EslConnectionError, match="answered by command/reply"):
            await client.api("uuid_exists x")
        await client.wait_connected(2)
        assert fs.connections >= 3  # each out-of-step reply cost its connection
    finally:
        await client.aclose()
        await fs.close()
