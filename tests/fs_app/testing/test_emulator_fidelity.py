"""The emulator against the real FreeSWITCH 1.10.12 recordings (golden data).

For every recorded scenario we can reproduce, the application side of the recording
is replayed against the emulator (same commands, same triggers, same scripted callee
outcomes) and the emulator's ``fs>app`` stream is compared with the recorded one:

* the message sequence (type, Event-Name, Application, Reply-Text) must be identical;
* per event, the non-variable header names must come in exactly the recorded order, the
  ``variable_*`` block must be in the same place and its names in nearly the same order;
* framing: events put Content-Length first, replies/api/notices have the recorded layout
  byte for byte (modulo uuids), the connect reply ends with the recorded four headers;
* URL encoding: a header carrying the same value in both streams is encoded identically.
"""

from __future__ import annotations

import asyncio
import difflib
import re
from dataclasses import dataclass, field

import pytest

from fs_app.esl import ChannelData, EslMessage, Event
from fs_app.testing import CallSpec, FaultConfig, FreeSwitchEmulator, TargetBehaviour
from fs_app.testing.recording import (
    Chunk,
    ReplayApp,
    app_script,
    load_recording,
    normalise,
    parse_fs_stream,
    signature,
    stream,
)
from tests.esl_fixtures import TRANSCRIPTS

CALLEE = "sofia/external/callee@127.0.0.1:5090"
BUSY = "sofia/external/busy@127.0.0.1:5091"
NOANSWER = "sofia/external/noanswer@127.0.0.1:5092"
TARGETS = {
    CALLEE: TargetBehaviour.answer(after_ms=1000, hangup_after_ms=2000),
    BUSY: TargetBehaviour.busy(),
    NOANSWER: TargetBehaviour.no_answer(),
}
SCALE = 0.01  # emulated call time runs 100x faster than the recordings


@dataclass
class Scenario:
    name: str
    spec: dict[str, object] = field(default_factory=dict)
    min_var_ratio: float = 0.97


OUTBOUND = [
    Scenario("o01_answer_playback_hangup_linger"),
    Scenario("o02_bridge_answered_callee_hangs_up", min_var_ratio=0.94),
    Scenario("o03_bridge_fork_busy_and_answer", min_var_ratio=0.88),
    Scenario("o04_bridge_sequential_noanswer_then_busy_fails", min_var_ratio=0.96),
    Scenario("o04b_bridge_fails_continue_on_fail_app_hangs_up", min_var_ratio=0.96),
    # The linger notice right after CHANNEL_HANGUP is FreeSWITCH timing; early_notice reproduces it.
    Scenario("o05_caller_cancels_while_bridge_rings",
             {"caller_hangup_after_ms": 2085, "faults": FaultConfig(early_notice=True)}),
    Scenario("o06_no_linger_disconnect"),
    Scenario("o07_not_full_single_channel", {"socket_args": "async"}),
    Scenario("o08_sync_mode_playback", {"socket_args": "full"}),
    Scenario("o09_play_and_get_digits_dtmf", {"dtmf": "1"}),
    Scenario("o10_getvar_api_bgapi_filter_json"),
    Scenario("o11_caller_bye_during_playback", {"caller_hangup_after_ms": 1545}),
    Scenario("o12_linger_timeout_without_exit"),
    Scenario("o13_app_drops_socket_mid_call"),
]


# --------------------------------------------------------------------------- helpers


def frames(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split an fs>app stream into (header block incl. blank line, body) frames."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    while pos < len(data):
        end = data.find(b"\n\n", pos)
        assert end >= 0, "incomplete frame"
        head = data[pos : end + 2]
        match = re.search(rb"(?m)^Content-Length: (\d+)$", head)
        length = int(match.group(1)) if match and not head.startswith(b"Event-Name: ") else 0
        out.append((head, data[end + 2 : end + 2 + length]))
        pos = end + 2 + length
    return out


def plain_headers(block: bytes) -> list[tuple[str, str]]:
    """Raw (still URL-encoded) ``Name: value`` pairs of an event-plain body or connect reply."""
    text = block.decode("utf-8", "replace")
    head = text.split("\n\n", 1)[0]
    pairs = []
    for line in head.split("\n"):
        name, sep, value = line.partition(": ")
        if sep:
            pairs.append((name, value))
    return pairs


def structure(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if name.startswith("variable_"):
            if not out or out[-1] != "<VARS>":
                out.append("<VARS>")
        else:
            out.append(name)
    return out


def header_names(msg: EslMessage) -> list[str]:
    headers = msg.channel.headers if isinstance(msg, ChannelData) else msg.headers  # type: ignore[union-attr]
    return list(headers)


def masked(data: bytes, *secrets: str) -> bytes:
    text = normalise(data.decode("utf-8", "replace"))
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<chan>")
    return text.encode()


async def replay_outbound(
    chunks: list[Chunk], spec: CallSpec, *, emulator: FreeSwitchEmulator | None = None
) -> tuple[ReplayApp, FreeSwitchEmulator]:
    app = ReplayApp(app_script(chunks, "outbound"), delay_scale=SCALE)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await app.run(reader, writer)
        finally:
            if not done.done():
                done.set_result(None)

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    emu = emulator or FreeSwitchEmulator(targets=TARGETS, time_scale=SCALE, playback_ms=None)
    try:
        await asyncio.wait_for(emu.place_call("127.0.0.1", port, spec), 20)
        await asyncio.wait_for(done, 10)
    finally:
        server.close()
    assert app.error is None, app.error
    return app, emu


def recorded_call_spec(rec: list[EslMessage], extra: dict[str, object]) -> CallSpec:
    data = next(m for m in rec if isinstance(m, ChannelData))
    return CallSpec(
        destination=data.channel.get("Caller-Destination-Number") or "7100",
        caller_id_number="iimrec",
        caller_id_name="IIM rec",
        caller_port=5070,
        uuid=data.unique_id,  # commands in the recording name the uuid (uuid_getvar ...)
        **extra,  # type: ignore[arg-type]
    )


def compare_streams(
    rec_data: bytes, emu_data: bytes, min_var_ratio: float, channel_name: str,
    rec_channel_name: str = "sofia/external/iimrec@127.0.0.1:5070",
) -> None:
    rec = parse_fs_stream(rec_data)
    emu = parse_fs_stream(emu_data)
    # 1. message sequence
    rec_sig = [signature(m) for m in rec]
    emu_sig = [signature(m) for m in emu]
    assert emu_sig == rec_sig, "\n".join(
        difflib.unified_diff([str(s) for s in rec_sig], [str(s) for s in emu_sig], "recorded", "emulator", n=1)
    )
    rec_frames, emu_frames = frames(rec_data), frames(emu_data)
    assert len(rec_frames) == len(emu_frames)
    for r_msg, e_msg, (r_head, r_body), (e_head, e_body) in zip(rec, emu, rec_frames, emu_frames, strict=True):
        if isinstance(r_msg, (Event, ChannelData)):
            # 2. header order / set
            r_names, e_names = header_names(r_msg), header_names(e_msg)
            assert structure(e_names) == structure(r_names), signature(r_msg)
            r_vars = [n for n in r_names if n.startswith("variable_")]
            e_vars = [n for n in e_names if n.startswith("variable_")]
            if r_vars:
                ratio = difflib.SequenceMatcher(None, r_vars, e_vars, autojunk=False).ratio()
                assert ratio >= min_var_ratio, (signature(r_msg), ratio)
            # 3. URL encoding: equal decoded values travel with identical encodings
            if isinstance(r_msg, ChannelData) or r_msg.format == "plain":
                r_raw = dict(plain_headers(r_head if isinstance(r_msg, ChannelData) else r_body))
                e_raw = dict(plain_headers(e_head if isinstance(e_msg, ChannelData) else e_body))
                r_dec = r_msg.channel.headers if isinstance(r_msg, ChannelData) else r_msg.headers
                e_dec = e_msg.channel.headers if isinstance(e_msg, ChannelData) else e_msg.headers  # type: ignore[union-attr]
                for name, raw in r_raw.items():
                    if name in e_raw and r_dec.get(name) == e_dec.get(name):
                        assert e_raw[name] == raw, (name, raw, e_raw[name])
        # 4. framing
        if isinstance(r_msg, Event):
            fmt = "json" if r_msg.format == "json" else "plain"
            assert e_head == f"Content-Length: {len(e_body)}\nContent-Type: text/event-{fmt}\n\n".encode()
            assert r_head == f"Content-Length: {len(r_body)}\nContent-Type: text/event-{fmt}\n\n".encode()
        elif isinstance(r_msg, ChannelData):
            tail_r = r_head.split(b"\nContent-Type: ", 1)[1]
            tail_e = e_head.split(b"\nContent-Type: ", 1)[1]
            assert tail_e == tail_r  # Content-Type, Reply-Text %2BOK%0A, Socket-Mode, Control + blank line
            assert e_head.startswith(b"Event-Name: CHANNEL_DATA\n")
        elif r_head.startswith(b"Content-Type: api/response"):
            assert re.fullmatch(rb"Content-Type: api/response\nContent-Length: (\d+)\n\n", e_head)
            assert int(e_head.split(b": ")[2].split(b"\n")[0]) == len(e_body)
        else:
            # command/reply (getvar values, Job-UUIDs), disconnect/linger notices: byte exact modulo uuids
            assert masked(e_head, channel_name) == masked(r_head, rec_channel_name)
            assert masked(e_body) == masked(r_body)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("scenario", OUTBOUND, ids=[s.name[:3] for s in OUTBOUND])
async def test_outbound_scenario_matches_recording(scenario: Scenario) -> None:
    chunks = load_recording(TRANSCRIPTS / f"{scenario.name}.jsonl")
    rec_data = stream(chunks, "outbound", "fs>app")
    spec = recorded_call_spec(parse_fs_stream(rec_data), scenario.spec)
    emu = FreeSwitchEmulator(targets=TARGETS, time_scale=SCALE, playback_ms=None)
    monitor_task = None
    if scenario.name.startswith("o13"):
        monitor_task = await start_monitor(emu, chunks)
    app, emu = await replay_outbound(chunks, spec, emulator=emu)
    channel_name = f"sofia/external/iimrec@127.0.0.1:{spec.caller_port}"
    compare_streams(rec_data, app.received_bytes(), scenario.min_var_ratio, channel_name)
    assert emu.errors == []
    if monitor_task is not None:
        await check_monitor(*await monitor_task, chunks)


async def start_monitor(
    emu: FreeSwitchEmulator, chunks: list[Chunk]
) -> asyncio.Task[tuple[ReplayApp, FreeSwitchEmulator]]:
    """o13's inbound monitor: subscribe to CHANNEL_HANGUP(_COMPLETE) before the call starts."""
    server = await emu.start_inbound()
    app = ReplayApp(app_script(chunks, "inbound-monitor"), delay_scale=SCALE)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    subscribed = asyncio.Event()

    async def run() -> tuple[ReplayApp, FreeSwitchEmulator]:
        task = asyncio.create_task(app.run(reader, writer))
        await app.wait_for(is_subscribed)
        subscribed.set()
        await asyncio.wait_for(task, 10)
        await server.close()
        return app, emu

    task = asyncio.create_task(run())
    await asyncio.wait_for(subscribed.wait(), 5)
    return task


async def check_monitor(app: ReplayApp, emu: FreeSwitchEmulator, chunks: list[Chunk]) -> None:
    assert app.error is None, app.error
    rec = [signature(m) for m in parse_fs_stream(stream(chunks, "inbound-monitor", "fs>app"))]
    got = [signature(m) for m in app.messages]
    assert got == rec
    hangup = next(m for m in app.messages if isinstance(m, Event) and m.name == "CHANNEL_HANGUP")
    assert hangup.get("Hangup-Cause") == "NORMAL_CLEARING"


def test_connect_reply_is_a_full_header_block_with_recorded_tail() -> None:
    """Independent of any replay: the recorded connect reply shape (no Content-Length, %2BOK%0A)."""
    chunks = load_recording(TRANSCRIPTS / "o01_answer_playback_hangup_linger.jsonl")
    head, body = frames(stream(chunks, "outbound", "fs>app"))[0]
    assert body == b""
    assert head.endswith(b"Content-Type: command/reply\nReply-Text: %2BOK%0A\nSocket-Mode: async\nControl: full\n\n")
    assert b"Content-Length" not in head


# ------------------------------------------------------------------------- inbound


def is_subscribed(sig: tuple[str, ...]) -> bool:
    return sig[0] == "reply" and "event listener" in sig[1]


async def replay_inbound(
    name: str, emu: FreeSwitchEmulator, conn: str = "inbound", *, after_subscribe: object = None
) -> ReplayApp:
    chunks = load_recording(TRANSCRIPTS / f"{name}.jsonl")
    server = await emu.start_inbound()
    app = ReplayApp(app_script(chunks, conn), delay_scale=SCALE)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    task = asyncio.create_task(app.run(reader, writer))
    if callable(after_subscribe):
        await app.wait_for(is_subscribed)
        after_subscribe()
    await asyncio.wait_for(task, 15)
    await server.close()
    assert app.error is None, app.error
    return app


def recorded_inbound(name: str, conn: str = "inbound") -> tuple[bytes, list[EslMessage]]:
    data = stream(load_recording(TRANSCRIPTS / f"{name}.jsonl"), conn, "fs>app")
    return data, parse_fs_stream(data)


async def test_i01_wrong_password() -> None:
    emu = FreeSwitchEmulator()
    app = await replay_inbound("i01_auth_wrong_password", emu)
    rec_data, _ = recorded_inbound("i01_auth_wrong_password")
    assert app.received_bytes() == rec_data  # auth/request, -ERR invalid, inbound notice: byte for byte
    assert app.eof


async def test_i02_api_bgapi_basics() -> None:
    emu = FreeSwitchEmulator()
    app = await replay_inbound("i02_api_bgapi_basics", emu)
    rec_data, rec = recorded_inbound("i02_api_bgapi_basics")
    got = parse_fs_stream(app.received_bytes())
    assert [signature(m) for m in got] == [signature(m) for m in rec]
    rec_frames, got_frames = frames(rec_data), frames(app.received_bytes())
    # show channels with no call and the unknown command are byte exact
    assert got_frames[4] == rec_frames[4] == (b"Content-Type: api/response\nContent-Length: 10\n\n", b"\n0 total.\n")
    assert got_frames[5] == rec_frames[5]
    # status: same lines, different numbers
    status_rec, status_got = rec_frames[3][1].decode(), got_frames[3][1].decode()
    assert [re.sub(r"\d+(\.\d+)?", "N", line) for line in status_got.splitlines()] == [
        re.sub(r"\d+(\.\d+)?", "N", line) for line in status_rec.splitlines()
    ]
    jobs = [m for m in got if isinstance(m, Event) and m.name == "BACKGROUND_JOB"]
    assert [list(j.headers) for j in jobs] == [
        list(m.headers) for m in rec if isinstance(m, Event) and m.name == "BACKGROUND_JOB"
    ]
    assert jobs[1].job_uuid == "7b0c2f1e-0000-4000-8000-11a7e5c0de01"  # our own Job-UUID honoured
    assert masked(got_frames[-1][0]) == masked(rec_frames[-1][0])
    assert app.eof


async def test_i04_originate_failures() -> None:
    emu = FreeSwitchEmulator(targets={BUSY: TargetBehaviour.busy(after_ms=20)}, time_scale=SCALE)
    app = await replay_inbound("i04_bgapi_originate_failures", emu)
    _, rec = recorded_inbound("i04_bgapi_originate_failures")
    got = parse_fs_stream(app.received_bytes())
    assert [signature(m) for m in got] == [signature(m) for m in rec]
    bodies = [m.body for m in got if isinstance(m, Event) and m.name == "BACKGROUND_JOB"]
    assert bodies == ["-ERR USER_NOT_REGISTERED\n", "-ERR USER_BUSY\n"]
    for r_msg, g_msg in zip(rec, got, strict=True):
        if isinstance(r_msg, Event):
            assert structure(list(g_msg.headers)) == structure(list(r_msg.headers)), r_msg.name  # type: ignore[union-attr]


async def test_i06_registration_events() -> None:
    emu = FreeSwitchEmulator()

    def register() -> None:
        emu.register_user("1001", "127.0.0.1", '"" <sip:1001@127.0.0.1:5071>', 3600, network_port=5071,
                          user_agent="IIM-recorder-SIPp")
        emu.unregister_user("1001", "127.0.0.1")
        emu.register_user("1002", "127.0.0.1", '"" <sip:1002@127.0.0.1:5072>', 5, network_port=5072,
                          user_agent="IIM-recorder-SIPp")
        emu.expire_user("1002", "127.0.0.1")

    app = await replay_inbound("i06_sofia_register_events", emu, after_subscribe=register)
    _rec_data, rec = recorded_inbound("i06_sofia_register_events")
    got = parse_fs_stream(app.received_bytes())
    assert [signature(m) for m in got] == [signature(m) for m in rec]
    r_events = [m for m in rec if isinstance(m, Event)]
    g_events = [m for m in got if isinstance(m, Event)]
    for r_ev, g_ev in zip(r_events, g_events, strict=True):
        assert list(g_ev.headers) == list(r_ev.headers)  # Event-Subclass first, exact header set and order
        for name in r_ev.headers:
            if name.startswith(("Event-Date", "Event-Sequence", "Core-UUID", "FreeSWITCH-", "call-id")):
                continue
            if name == "expires" and r_ev.subclass == "sofia::expire":
                assert int(g_ev.headers[name]) > 1_700_000_000  # absolute epoch
                continue
            assert g_ev.headers[name] == r_ev.headers[name], name
    # plain encoding of the subclass header
    assert b"Event-Subclass: sofia%3A%3Aregister\nEvent-Name: CUSTOM\n" in app.received_bytes()


async def test_i07_misc_replies_and_log() -> None:
    emu = FreeSwitchEmulator()
    app = await replay_inbound("i07_misc_replies_and_log", emu)
    _, rec = recorded_inbound("i07_misc_replies_and_log")
    got = parse_fs_stream(app.received_bytes())
    without_logs = [signature(m) for m in got if signature(m) != ("log",)]
    assert without_logs == [signature(m) for m in rec if signature(m) != ("log",)]
    logs = frames(app.received_bytes())
    log_heads = [h for h, _ in logs if h.startswith(b"Content-Type: log/data")]
    assert log_heads
    for head in log_heads:
        assert re.fullmatch(
            rb"Content-Type: log/data\nContent-Length: \d+\nLog-Level: \d\nText-Channel: \d\nLog-File: \S+\n"
            rb"Log-Func: \S+\nLog-Line: \d+\nUser-Data: \n\n", head)


async def test_i05_json_events_of_an_originated_call() -> None:
    emu = FreeSwitchEmulator(targets=TARGETS, time_scale=SCALE)
    app = await replay_inbound("i05_event_json_short_call", emu)
    _, rec = recorded_inbound("i05_event_json_short_call")
    got = parse_fs_stream(app.received_bytes())
    assert [signature(m) for m in got] == [signature(m) for m in rec]
    for r_msg, g_msg in zip(rec, got, strict=True):
        if isinstance(r_msg, Event):
            assert isinstance(g_msg, Event)
            assert g_msg.format == "json"
            assert structure(list(g_msg.headers)) == structure(list(r_msg.headers)), r_msg.name
            for name in ("Channel-State", "Channel-Call-State", "Answer-State", "Hangup-Cause", "Unique-ID",
                         "Original-Channel-Call-State", "Channel-Call-State-Number", "Caller-Destination-Number"):
                assert g_msg.get(name) == r_msg.get(name), (r_msg.name, name)
    job = next(m for m in got if isinstance(m, Event) and m.name == "BACKGROUND_JOB")
    assert job.body == "+OK 174fe612-15b1-49d6-81b9-43a8be156f2c\n"


async def test_i08_myevents_uuid_on_a_second_connection() -> None:
    emu = FreeSwitchEmulator(targets=TARGETS, time_scale=SCALE)
    chunks = load_recording(TRANSCRIPTS / "i08_inbound_myevents_uuid.jsonl")
    server = await emu.start_inbound()
    control = ReplayApp(app_script(chunks, "inbound-control"), delay_scale=SCALE)
    mine = ReplayApp(app_script(chunks, "inbound-myevents"), delay_scale=SCALE)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    control_task = asyncio.create_task(control.run(reader, writer))
    await control.wait_for(lambda sig: sig[0] == "reply" and sig[1].startswith("+OK Job-UUID"))
    reader2, writer2 = await asyncio.open_connection("127.0.0.1", server.port)
    await asyncio.wait_for(mine.run(reader2, writer2), 10)
    await asyncio.wait_for(control_task, 10)
    await server.close()
    assert mine.error is None
    assert control.error is None
    for conn, app in (("inbound-myevents", mine), ("inbound-control", control)):
        rec_data = stream(chunks, conn, "fs>app")
        rec = parse_fs_stream(rec_data)
        assert [signature(m) for m in app.messages] == [signature(m) for m in rec], conn
    notice_rec = frames(stream(chunks, "inbound-myevents", "fs>app"))[-1]
    notice_got = frames(mine.received_bytes())[-1]
    assert masked(notice_got[0]) == masked(notice_rec[0])  # session-style notice with Controlled-Session-UUID
    assert mine.eof


async def test_i03_originate_to_outbound_socket() -> None:
    chunks = load_recording(TRANSCRIPTS / "i03_bgapi_originate_to_outbound_socket.jsonl")
    emu = FreeSwitchEmulator(targets=TARGETS, time_scale=SCALE, playback_ms=None)
    outbound = ReplayApp(app_script(chunks, "outbound"), delay_scale=SCALE)
    out_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await outbound.run(reader, writer)
        out_done.set_result(None)

    app_server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = app_server.sockets[0].getsockname()[1]
    steps = app_script(chunks, "inbound")
    for step in steps:  # the recorded originate targets 127.0.0.1:8084; point it at our app server
        step.data = step.data.replace(b"127.0.0.1:8084", f"127.0.0.1:{port}".encode())
    server = await emu.start_inbound()
    inbound = ReplayApp(steps, delay_scale=SCALE)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    await asyncio.wait_for(inbound.run(reader, writer), 15)
    await asyncio.wait_for(out_done, 10)
    await server.close()
    app_server.close()
    assert inbound.error is None
    assert outbound.error is None
    rec_in = parse_fs_stream(stream(chunks, "inbound", "fs>app"))
    assert [signature(m) for m in inbound.messages] == [signature(m) for m in rec_in]
    rec_out_data = stream(chunks, "outbound", "fs>app")
    callee = "sofia/external/callee@127.0.0.1:5090"
    compare_streams(rec_out_data, outbound.received_bytes(), 0.9, callee, callee)
    data = next(m for m in outbound.messages if isinstance(m, ChannelData))
    assert data.unique_id == "33ac64a1-7e7f-4644-84ca-b6948f665156"
