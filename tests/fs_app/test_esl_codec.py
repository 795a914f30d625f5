"""ESL codec against real FreeSWITCH 1.10.12 bytes, plus exact serialiser output.

Every recorded connection stream (tests/data/esl-transcripts) must parse in both
directions; spot checks pin the typed content of each message kind.
"""

from __future__ import annotations

import pytest

from fs_app.esl import (
    Api,
    ApiResponse,
    Auth,
    AuthRequest,
    BgApi,
    ChannelData,
    CommandDecoder,
    CommandReply,
    Connect,
    DisconnectNotice,
    DivertEvents,
    EslCodec,
    EslInjectionError,
    Event,
    EventSubscribe,
    Execute,
    Exit,
    Filter,
    FilterDelete,
    GetVar,
    HangupCmd,
    Linger,
    LocalProtocolError,
    Log,
    LogData,
    MalformedEvent,
    MyEvents,
    NixEvent,
    NoEvents,
    NoLinger,
    NoLog,
    RawCommand,
    RemoteProtocolError,
    Resume,
    RudeRejection,
    SendEvent,
    UnknownMessage,
    serialise,
    url_decode,
    url_encode,
)
from fs_app.esl._commands import ARG_IN_BODY_THRESHOLD
from tests.esl_fixtures import (
    canonical,
    chunks,
    feed_all,
    feed_chunks,
    iter_events,
    scenario_names,
    stream,
    streams,
)

STREAMS = streams()
FS_STREAMS = [s for s in STREAMS if s[2] == "fs>app"]
APP_STREAMS = [s for s in STREAMS if s[2] == "app>fs"]

UUID = "9d8ef86c-aa3a-4b1a-b623-dbbe4668dcd6"  # o01's call


def _ids(streams: list[tuple[str, str, str]]) -> list[str]:
    return [f"{n}:{c}" for n, c, _ in streams]


def _messages(name: str, conn: str = "outbound") -> list[object]:
    return list(feed_all(stream(name, conn)))


# ---------------------------------------------------------------- every recording


def test_recordings_are_present() -> None:
    assert len(scenario_names()) >= 21, scenario_names()
    assert len(FS_STREAMS) >= 25
    assert len(APP_STREAMS) == len(FS_STREAMS)


@pytest.mark.parametrize(("name", "conn", "direction"), FS_STREAMS, ids=_ids(FS_STREAMS))
def test_every_fs_stream_parses_cleanly(name: str, conn: str, direction: str) -> None:
    reads = chunks(name, conn, direction)
    messages = feed_chunks(reads)  # as recorded, one read at a time; asserts feed_eof()
    assert messages
    bad = [m for m in messages if isinstance(m, MalformedEvent | UnknownMessage)]
    assert not bad
    # The recorded read boundaries do not matter.
    assert [canonical(m) for m in messages] == [canonical(m) for m in feed_all(b"".join(reads))]
    for event in iter_events(messages):
        assert event.name
        assert dict(event.headers)  # every header splits and decodes


@pytest.mark.parametrize(("name", "conn", "direction"), APP_STREAMS, ids=_ids(APP_STREAMS))
def test_every_app_stream_decodes_and_reserialises(name: str, conn: str, direction: str) -> None:
    writes = chunks(name, conn, direction)
    decoder = CommandDecoder()
    commands = [cmd for write in writes for cmd in decoder.feed(write)]
    assert len(commands) == len(writes)  # the recorder wrote one command per write()
    for write, cmd in zip(writes, commands, strict=True):
        assert CommandDecoder().feed(write) == [cmd]
        # Our serialiser writes exactly what the recorder sent.
        assert serialise(cmd) == write, cmd


# ---------------------------------------------------------------- outbound spot checks


def test_connect_reply_is_channel_data() -> None:
    reply = _messages("o01_answer_playback_hangup_linger")[0]
    assert isinstance(reply, ChannelData)
    assert reply.ok
    assert reply.reply_text == "+OK\n"  # travels URL-encoded: %2BOK%0A
    assert reply.socket_mode == "async"
    assert reply.control == "full"
    assert reply.unique_id == UUID
    channel = reply.channel
    assert channel.name == "CHANNEL_DATA"
    assert channel.unique_id == UUID
    assert channel.get("Channel-Name") == "sofia/external/iimrec@127.0.0.1:5070"
    assert channel.headers.raw("Channel-Name") == "sofia/external/iimrec%40127.0.0.1%3A5070"
    assert channel.get("Caller-Destination-Number") == "7101"
    assert channel.variable("socket_host") == "127.0.0.1"
    assert len(channel.headers) == 142
    assert channel.headers["Content-Type"] == "command/reply"


@pytest.mark.parametrize(
    ("name", "mode", "control"),
    [
        ("o07_not_full_single_channel", "async", "single-channel"),
        ("o08_sync_mode_playback", "static", "full"),
    ],
)
def test_connect_reply_socket_mode_and_control(name: str, mode: str, control: str) -> None:
    reply = _messages(name)[0]
    assert isinstance(reply, ChannelData)
    assert (reply.socket_mode, reply.control) == (mode, control)


def test_outbound_event_sequence_and_application_uuid() -> None:
    messages = _messages("o01_answer_playback_hangup_linger")
    events = [m for m in messages if isinstance(m, Event)]
    assert [e.name for e in events][:5] == [
        "CHANNEL_PARK",
        "CHANNEL_EXECUTE",
        "CHANNEL_PROGRESS_MEDIA",
        "CHANNEL_ANSWER",
        "CHANNEL_EXECUTE_COMPLETE",
    ]
    assert all(e.unique_id == UUID and e.format == "plain" for e in events)
    sequences = [e.sequence for e in events]
    assert all(isinstance(s, int) for s in sequences)
    execs = [e for e in events if e.name == "CHANNEL_EXECUTE"]
    completes = [e for e in events if e.name == "CHANNEL_EXECUTE_COMPLETE"]
    assert [e.get("Application") for e in execs] == ["answer", "playback", "hangup"]
    # Event-UUID we sent comes back as Application-UUID on both events.
    sent = [
        c
        for c in CommandDecoder().feed(stream("o01_answer_playback_hangup_linger", "outbound", "app>fs"))
        if isinstance(c, Execute)
    ]
    assert [e.application_uuid for e in execs] == [c.event_uuid for c in sent]
    assert {e.application_uuid for e in completes} >= {c.event_uuid for c in sent}
    playback = next(e for e in completes if e.get("Application") == "playback")
    assert playback.get("Application-Response") == "FILE PLAYED"
    assert playback.get("Application-Data") == "tone_stream://%(200,0,440);loops=2"


def test_linger_and_disconnect_notices() -> None:
    messages = _messages("o01_answer_playback_hangup_linger")
    notices = [m for m in messages if isinstance(m, DisconnectNotice)]
    assert len(notices) == 2
    linger, final = notices
    assert linger.is_linger
    assert linger.disposition == "linger"
    assert linger.linger_time == -1
    assert linger.controlled_session_uuid == UUID
    assert linger.channel_name == "sofia/external/iimrec@127.0.0.1:5070"  # raw, not URL-encoded
    assert linger.body == ""
    assert final.disposition == "disconnect"
    assert not final.is_linger
    assert final.body == "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
    assert len(final.body.encode()) == 67
    assert messages[-2] == CommandReply("+OK bye")
    assert messages[-1] is final


def test_linger_with_seconds() -> None:
    notices = [m for m in _messages("o12_linger_timeout_without_exit") if isinstance(m, DisconnectNotice)]
    assert notices[0].linger_time == 2
    reply = _messages("o12_linger_timeout_without_exit")[1]
    assert reply == CommandReply("+OK will linger 2 seconds")


def test_array_values_and_repeated_headers() -> None:
    messages = _messages("o03_bridge_fork_busy_and_answer")
    arrays = [e for e in iter_events(messages) if e.headers.raw("variable_originate_causes") is not None]
    assert arrays
    event = arrays[-1]
    raw = event.headers.raw("variable_originate_causes")
    assert raw is not None
    assert raw.startswith("ARRAY%3A%3A")
    value = event.get("variable_originate_causes")
    assert value is not None
    assert value.startswith("ARRAY::")
    items = event.headers.get_all("variable_originate_causes")
    assert len(items) == 2
    assert items[0].endswith(";USER_BUSY")
    assert items[1].endswith(";NONE")
    # CHANNEL_HANGUP_COMPLETE carries Hangup-Cause twice.
    hangup = next(e for e in iter_events(messages) if e.name == "CHANNEL_HANGUP_COMPLETE")
    assert hangup.get("Hangup-Cause") == "NORMAL_CLEARING"
    assert hangup.headers.get_all("Hangup-Cause") == ("NORMAL_CLEARING", "NORMAL_CLEARING")
    assert hangup.headers.get_all("No-Such-Header") == ()


def test_dtmf_event() -> None:
    events = list(iter_events(_messages("o09_play_and_get_digits_dtmf")))
    dtmf = next(e for e in events if e.name == "DTMF")
    assert dtmf.get("DTMF-Digit") == "1"
    done = next(
        e
        for e in events
        if e.name == "CHANNEL_EXECUTE_COMPLETE" and e.get("Application") == "play_and_get_digits"
    )
    assert done.variable("iim_digits") == "1"


# ---------------------------------------------------------------- json, api, bgapi, log


def test_json_events_outbound() -> None:
    messages = _messages("o10_getvar_api_bgapi_filter_json")
    json_events = [m for m in messages if isinstance(m, Event) and m.format == "json"]
    assert [e.name for e in json_events][:3] == [
        "CHANNEL_EXECUTE_COMPLETE",
        "CHANNEL_EXECUTE",
        "CHANNEL_HANGUP",
    ]
    first = json_events[0]
    assert first.get("Application") == "playback"
    assert first.unique_id == "c30974b1-92c4-440d-8272-3e0853010268"
    assert first.get("Event-Date-Local", "").count(":") == 2  # raw in JSON, not URL-encoded
    assert first.headers.raw("Channel-Name") == "sofia/external/iimrec@127.0.0.1:5070"
    # getvar / api / bgapi replies of the same session
    assert CommandReply("7110") in messages
    assert ApiResponse("iimrec") in messages  # no trailing newline in uuid_getvar's output
    job = next(m for m in messages if isinstance(m, Event) and m.name == "BACKGROUND_JOB")
    assert job.body == "7110"
    assert job.get("Job-Owner-UUID") == "c30974b1-92c4-440d-8272-3e0853010268"


def test_json_events_inbound_with_body() -> None:
    messages = _messages("i05_event_json_short_call", "inbound")
    events = [m for m in messages if isinstance(m, Event)]
    assert events
    assert all(e.format == "json" for e in events)
    names = {e.name for e in events}
    assert {"CHANNEL_CREATE", "CHANNEL_ANSWER", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY"} <= names
    job = next(e for e in events if e.name == "BACKGROUND_JOB")
    assert job.body == "+OK 174fe612-15b1-49d6-81b9-43a8be156f2c\n"
    assert "_body" not in job.headers
    assert job.get("Content-Length") == str(len(job.body))


def test_inbound_api_and_bgapi() -> None:
    messages = _messages("i02_api_bgapi_basics", "inbound")
    assert messages[0] == AuthRequest()
    assert messages[1] == CommandReply("+OK accepted")
    apis = [m for m in messages if isinstance(m, ApiResponse)]
    assert apis[0].body.startswith("UP 0 years")
    assert apis[0].ok
    assert apis[2] == ApiResponse("-ERR nosuchcommand Command not found!\n")
    assert not apis[2].ok
    replies = [m for m in messages if isinstance(m, CommandReply) and m.job_uuid]
    assert [r.job_uuid for r in replies][
        1
    ] == "7b0c2f1e-0000-4000-8000-11a7e5c0de01"  # our own Job-UUID honoured
    assert replies[0].reply_text == f"+OK Job-UUID: {replies[0].job_uuid}"
    assert replies[0].headers["Job-UUID"] == replies[0].job_uuid
    jobs = [m for m in messages if isinstance(m, Event) and m.name == "BACKGROUND_JOB"]
    assert [j.job_uuid for j in jobs] == [r.job_uuid for r in replies]
    assert jobs[0].body is not None
    assert jobs[0].body.startswith("UP 0 years")
    assert jobs[0].get("Job-Command") == "status"
    assert messages[-1] == DisconnectNotice(
        None, "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
    )


def test_background_job_failures() -> None:
    messages = _messages("i04_bgapi_originate_failures", "inbound")
    bodies = [m.body for m in messages if isinstance(m, Event) and m.name == "BACKGROUND_JOB"]
    assert bodies == ["-ERR USER_NOT_REGISTERED\n", "-ERR USER_BUSY\n"]
    assert ApiResponse("-ERR USER_BUSY\n") in messages


def test_log_data_and_misc_replies() -> None:
    messages = _messages("i07_misc_replies_and_log", "inbound")
    logs = [m for m in messages if isinstance(m, LogData)]
    assert [log.level for log in logs] == [6, 7, 5, 7, 6]
    assert logs[0].headers["Log-File"] == "switch_xml.c"
    assert logs[0].headers["User-Data"] == ""
    assert logs[0].body.endswith(
        "No files to include at /srv/fs/etc/freeswitch/autoload_configs/../sip_profiles/external/*.xml\n"
    )
    assert len(logs[0].body.encode()) == 153
    texts = [m.reply_text for m in messages if isinstance(m, CommandReply)]
    assert "-ERR invalid session id [00000000-0000-4000-8000-000000000000]" in texts
    assert "+OK filter deleted. [all][]" in texts
    assert "-ERR not loging" in texts


def test_wrong_password_then_notice() -> None:
    messages = _messages("i01_auth_wrong_password", "inbound")
    assert messages == [
        AuthRequest(),
        CommandReply("-ERR invalid"),
        DisconnectNotice(None, "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"),
    ]
    assert not messages[1].ok  # type: ignore[union-attr]


def test_custom_event_subclass_first() -> None:
    events = list(iter_events(_messages("i06_sofia_register_events", "inbound")))
    register = next(e for e in events if e.subclass == "sofia::register")
    assert register.name == "CUSTOM"
    assert register.headers.raw("Event-Subclass") == "sofia%3A%3Aregister"  # it precedes Event-Name
    assert {e.subclass for e in events} >= {"sofia::register", "sofia::unregister", "sofia::expire"}


# ---------------------------------------------------------------- synthetic edge cases


def _wrap(inner: bytes, ctype: str = "text/event-plain") -> bytes:
    return f"Content-Length: {len(inner)}\nContent-Type: {ctype}\n\n".encode() + inner


def _plain(headers: list[tuple[str, str]], body: bytes | None = None) -> bytes:
    """An event-plain frame serialised as switch_event_serialize does."""
    inner = "".join(f"{k}: {url_encode(v)}\n" for k, v in headers).encode()
    if body is not None:
        inner += f"Content-Length: {len(body)}\n\n".encode() + body
    else:
        inner += b"\n"
    return _wrap(inner)


def test_invalid_utf8_is_replaced() -> None:
    [event] = feed_all(_wrap(b"Event-Name: CUSTOM\nvariable_sip_user_agent: Phone%ED%A0%BD\n\n"))
    assert isinstance(event, Event)
    assert event.get("variable_sip_user_agent") == "Phone\ufffd\ufffd\ufffd"
    assert url_decode("%ED%A0%BD") == "\ufffd\ufffd\ufffd"
    assert url_decode("caf%C3%A9") == "café"
    # and raw invalid bytes in a body
    [api] = feed_all(b"Content-Type: api/response\nContent-Length: 3\n\n\xff\xfeA")
    assert api == ApiResponse("\ufffd\ufffdA")


def test_content_length_counts_bytes() -> None:
    body = "Grüße, 日本 🎉\n".encode()
    assert len(body) != len(body.decode())
    data = f"Content-Type: api/response\nContent-Length: {len(body)}\n\n".encode() + body
    data += b"Content-Type: command/reply\nReply-Text: +OK\n\n"
    assert feed_all(data) == [ApiResponse(body.decode()), CommandReply("+OK")]
    frame = _plain([("Event-Name", "BACKGROUND_JOB"), ("Job-UUID", "u")], body)
    [event] = feed_all(frame + frame)[:1]
    assert isinstance(event, Event)
    assert event.body == body.decode()
    # split inside a multibyte character
    assert [canonical(m) for m in feed_chunks([frame[:-5], frame[-5:]])] == [canonical(event)]


def test_multibyte_header_values_roundtrip() -> None:
    values = {"variable_caller": "Jürgen 日本 🎉", "variable_colon": "a: b%20c", "variable_empty": ""}
    [event] = feed_all(_plain([("Event-Name", "CUSTOM"), *values.items()]))
    assert isinstance(event, Event)
    assert event.get("variable_caller") == "Jürgen 日本 🎉"
    assert event.get("variable_colon") == "a: b c"  # FreeSWITCH does not re-encode %20 (no round trip)
    assert event.get("variable_empty") == "_undef_"


def test_event_headers_are_read_only() -> None:
    [event] = feed_all(_plain([("Event-Name", "CUSTOM"), ("A", "1")]))
    assert isinstance(event, Event)
    with pytest.raises(AttributeError):
        event.name = "X"  # type: ignore[misc]
    with pytest.raises(TypeError):
        event.headers["A"] = "2"  # type: ignore[index]
    assert event.get("A") == "1"
    assert event.get("B") is None
    assert event.get("B", "d") == "d"
    with pytest.raises(KeyError):
        event.headers["B"]


def test_lookups_agree_with_split() -> None:
    block = "Event-Name: X\nA: 1\nA: 2\nB:3\nC:  4\nnocolon\nD:E: 5\n: empty\nF%20: %41"
    body = (block + "\n\n").encode()
    frame = f"Content-Length: {len(body)}\nContent-Type: text/event-plain\n\n".encode() + body
    names = ["Event-Name", "A", "B", "C", "D", "D:E", "nocolon", "", "F%20", "Missing", "E: 5", "A\nB"]
    [fresh] = feed_all(frame)
    assert isinstance(fresh, Event)
    looked_up = {n: fresh.headers.raw(n) for n in names[:5]}  # below the split threshold
    [split] = feed_all(frame)
    assert isinstance(split, Event)
    as_dict = dict(split.headers)
    assert looked_up == {n: split.headers.raw(n) for n in names[:5]}
    for name in names:
        [lazy] = feed_all(frame)
        assert isinstance(lazy, Event)
        assert lazy.headers.raw(name) == split.headers.raw(name), name  # block search == dict
    assert as_dict == {
        "Event-Name": "X",
        "A": "1",
        "B": "3",
        "C": " 4",
        "D": "E: 5",
        "": "empty",
        "F%20": "A",
    }
    assert split.headers.get_all("A") == ("1", "2")


def test_event_with_inner_body_and_malformed_events() -> None:
    [job] = feed_all(_plain([("Event-Name", "BACKGROUND_JOB")], b"+OK done\n"))
    assert isinstance(job, Event)
    assert job.body == "+OK done\n"
    no_name = _plain([("Job-UUID", "x")])
    trailing = _wrap(b"Event-Name: X\n\ngarbage")
    short = _wrap(b"Event-Name: X\nContent-Length: 99\n\nabc")
    bad_json = _wrap(b"{nope", "text/event-json")
    not_str = _wrap(b'{"Event-Name": "X", "A": 1234}', "text/event-json")
    bad_xml = _wrap(b"<event", "text/event-xml")
    messages = feed_all(
        no_name + trailing + short + bad_json + not_str + bad_xml + b"Content-Type: auth/request\n\n"
    )
    assert [type(m) for m in messages] == [MalformedEvent] * 6 + [AuthRequest]
    reasons = [m.reason for m in messages if isinstance(m, MalformedEvent)]
    assert reasons[:3] == [
        "event without Event-Name",
        "bytes after the headers without Content-Length",
        "inner body shorter than its Content-Length",
    ]


def test_xml_event() -> None:
    xml = (
        b"<event><headers><Event-Name>CUSTOM</Event-Name><Event-Subclass>a%3A%3Ab</Event-Subclass>"
        b"<Content-Length>2</Content-Length></headers><body>hi</body></event>"
    )
    [event] = feed_all(f"Content-Length: {len(xml)}\nContent-Type: text/event-xml\n\n".encode() + xml)
    assert isinstance(event, Event)
    assert (event.name, event.format, event.subclass, event.body) == ("CUSTOM", "xml", "a::b", "hi")


def test_rude_rejection_unknown_type_and_stray_blank_lines() -> None:
    data = (
        b"\n\nContent-Type: text/rude-rejection\nContent-Length: 24\n\nAccess Denied, go away.\n"
        b"\nContent-Type: text/x-new\nX-Extra: 1\nContent-Length: 2\n\nhi"
    )
    messages = feed_all(data)
    assert messages[0] == RudeRejection("Access Denied, go away.\n")
    unknown = messages[1]
    assert isinstance(unknown, UnknownMessage)
    assert (unknown.content_type, unknown.body, unknown.headers["X-Extra"]) == ("text/x-new", b"hi", "1")


def test_queue_overflow_kill_notice() -> None:
    body = b"killed listener because of lost events\n"
    [notice] = feed_all(b"Content-Type: text/disconnect-notice\nContent-Length: 39\n\n" + body)
    assert notice == DisconnectNotice(None, body.decode())


def test_partial_stream_is_reported_at_eof() -> None:
    codec = EslCodec()
    assert codec.feed(b"Content-Type: api/response\nContent-Length: 10\n\nabc") == []
    assert codec.buffered == 3
    assert not codec.feed_eof()
    assert codec.feed(b"defghij") == [ApiResponse("abcdefghij")]
    assert codec.feed_eof()
    assert codec.feed(b"\n") == []
    assert codec.feed_eof()
    codec.feed(b"Content-Type: comm")
    assert not codec.feed_eof()


@pytest.mark.parametrize(
    "data",
    [
        b"Content-Type: api/response\nContent-Length: abc\n\n",
        b"Content-Type: api/response\nContent-Length: -1\n\n",
        b"Content-Type: api/response\nContent-Length: \xd9\xa3\n\n",  # Arabic-Indic digit 3
        b"Content-Type: api/response\nContent-Length: " + b"9" * 5000 + b"\n\n",
        b"Content-Type: api/response\nContent-Length: 99999999999\n\n",
        b"Content-Length: 99999999999\nContent-Type: text/event-plain\n\n",
        b"Content-Type: command/reply\nthis line has no colon\n\n",
    ],
)
def test_framing_errors_raise_and_poison(data: bytes) -> None:
    codec = EslCodec()
    with pytest.raises(RemoteProtocolError):
        codec.feed(data)
    with pytest.raises(RemoteProtocolError):
        codec.feed(b"Content-Type: auth/request\n\n")


def test_oversized_header_block_raises() -> None:
    codec = EslCodec(max_header_block=1000)
    codec.feed(b"Content-Type: x\n" + b"A: b\n" * 150)
    with pytest.raises(RemoteProtocolError):
        codec.feed(b"A: b\n" * 100)


def test_odd_numbers_do_not_crash() -> None:
    """Regression: int() of Unicode digits, '--5' or 5000 digits raised ValueError."""
    data = (
        "Content-Type: log/data\nContent-Length: 0\nLog-Level: \u00b2\n\n"
        "Content-Type: text/disconnect-notice\nLinger-Time: --5\nContent-Length: 0\n\n"
        "Content-Type: text/disconnect-notice\nLinger-Time: \u0663\nContent-Length: 0\n\n"
    ).encode()
    inner = b"Event-Name: X\nEvent-Sequence: %C2%B2\nContent-Length: " + b"9" * 5000 + b"\n\nab"
    data += f"Content-Length: {len(inner)}\nContent-Type: text/event-plain\n\n".encode() + inner
    inner = b"Event-Name: X\nEvent-Sequence: \xc2\xb2\n\n"
    data += f"Content-Length: {len(inner)}\nContent-Type: text/event-plain\n\n".encode() + inner
    log, notice, notice2, long_cl, seq = feed_all(data)
    assert isinstance(log, LogData)
    assert log.level is None
    assert isinstance(notice, DisconnectNotice)
    assert notice.linger_time is None
    assert isinstance(notice2, DisconnectNotice)
    assert notice2.linger_time is None
    assert isinstance(long_cl, MalformedEvent)
    assert isinstance(seq, Event)
    assert seq.sequence is None


# ---------------------------------------------------------------- serialisers


EV = "0b6e1c44-6a1f-4f7e-9b7e-2d1c3e4f5a6b"
JOB = "9d1c0000-1111-4222-8333-444455556666"


@pytest.mark.parametrize(
    ("cmd", "wire"),
    [
        (Connect(), b"connect\n\n"),
        (Auth("ClueCon"), b"auth ClueCon\n\n"),
        (MyEvents(), b"myevents\n\n"),
        (MyEvents("json"), b"myevents json\n\n"),
        (MyEvents("plain", EV), f"myevents {EV} plain\n\n".encode()),
        (Linger(), b"linger\n\n"),
        (Linger(10), b"linger 10\n\n"),
        (NoLinger(), b"nolinger\n\n"),
        (EventSubscribe(), b"event plain ALL\n\n"),
        (
            EventSubscribe("plain", ("BACKGROUND_JOB", "CHANNEL_HANGUP_COMPLETE")),
            b"event plain BACKGROUND_JOB CHANNEL_HANGUP_COMPLETE\n\n",
        ),
        (EventSubscribe("json", ("CUSTOM", "sofia::register")), b"event json CUSTOM sofia::register\n\n"),
        (NoEvents(), b"noevents\n\n"),
        (Filter("Unique-ID", EV), f"filter Unique-ID {EV}\n\n".encode()),
        (Filter("Event-Name", "CHANNEL_EXECUTE_COMPLETE"), b"filter Event-Name CHANNEL_EXECUTE_COMPLETE\n\n"),
        (
            FilterDelete("Event-Name", "CHANNEL_EXECUTE_COMPLETE"),
            b"filter delete Event-Name CHANNEL_EXECUTE_COMPLETE\n\n",
        ),
        (FilterDelete("all"), b"filter delete all\n\n"),
        (
            Execute("bridge", "{ignore_early_media=true}sofia/gateway/gw1/15551234567", event_uuid=EV),
            b"sendmsg\ncall-command: execute\nexecute-app-name: bridge\n"
            b"execute-app-arg: {ignore_early_media=true}sofia/gateway/gw1/15551234567\n"
            b"event-lock: true\nEvent-UUID: " + EV.encode() + b"\n\n",
        ),
        (
            Execute("answer", uuid=EV, event_uuid=EV, event_lock=False, loops=2),
            f"sendmsg {EV}\ncall-command: execute\nexecute-app-name: answer\nloops: 2\nEvent-UUID: {EV}\n\n".encode(),
        ),
        (HangupCmd(), b"sendmsg\ncall-command: hangup\nhangup-cause: NORMAL_CLEARING\n\n"),
        (
            HangupCmd("USER_BUSY", EV),
            f"sendmsg {EV}\ncall-command: hangup\nhangup-cause: USER_BUSY\n\n".encode(),
        ),
        (Api("status"), b"api status\n\n"),
        (Api("uuid_getvar abc destination_number"), b"api uuid_getvar abc destination_number\n\n"),
        (
            BgApi(
                "originate {origination_uuid=x}sofia/gateway/gw1/1 &socket('127.0.0.1:8084 async full')", JOB
            ),
            b"bgapi originate {origination_uuid=x}sofia/gateway/gw1/1 &socket('127.0.0.1:8084 async full')\n"
            b"Job-UUID: " + JOB.encode() + b"\n\n",
        ),
        (GetVar("destination_number"), b"getvar destination_number\n\n"),
        (Resume(), b"resume\n\n"),
        (Exit(), b"exit\n\n"),
        (Log("7"), b"log 7\n\n"),
        (NoLog(), b"nolog\n\n"),
        (DivertEvents(), b"divert_events on\n\n"),
        (DivertEvents(on=False), b"divert_events off\n\n"),
        (NixEvent(("HEARTBEAT",)), b"nixevent HEARTBEAT\n\n"),
        (
            SendEvent("CUSTOM", (("Event-Subclass", "iim::x"),), "hé"),
            b"sendevent CUSTOM\nEvent-Subclass: iim::x\nContent-Length: 3\n\nh\xc3\xa9",
        ),
        (RawCommand("uuid_foo", (("A", "b"),), b"xy"), b"uuid_foo\nA: b\nContent-Length: 2\n\nxy"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, bytes) else "",
)
def test_serialise_exact_bytes(cmd: object, wire: bytes) -> None:
    assert serialise(cmd) == wire  # type: ignore[arg-type]
    assert CommandDecoder().feed(wire) == [cmd]


def test_long_or_multiline_args_travel_in_a_body() -> None:
    long_arg = "x" * (ARG_IN_BODY_THRESHOLD + 1) + "é"
    wire = serialise(Execute("playback", long_arg, event_uuid=EV))
    body = long_arg.encode()
    assert wire == (
        b"sendmsg\ncall-command: execute\nexecute-app-name: playback\nevent-lock: true\n"
        b"Event-UUID: " + EV.encode() + b"\ncontent-type: text/plain\n"
        b"Content-Length: " + str(len(body)).encode() + b"\n\n" + body
    )
    assert CommandDecoder().feed(wire) == [Execute("playback", long_arg, event_uuid=EV)]
    for arg in ("line1\nline2", "a\rb", " leading space"):
        wire = serialise(Execute("set", arg, event_uuid=EV))
        assert b"execute-app-arg" not in wire
        assert wire.endswith(arg.encode())
        assert CommandDecoder().feed(wire) == [Execute("set", arg, event_uuid=EV)]


@pytest.mark.parametrize(
    "cmd",
    [
        Auth("ClueCon\nexit"),
        Api("status\r\nexit"),
        Api("status\n"),
        BgApi("status", "u\nu"),
        Filter("Unique-ID", "x\ny"),
        FilterDelete("Unique-ID", "x\ry"),
        GetVar("a\nb"),
        Execute("answer\n", event_uuid=EV),
        Execute("answer", uuid="u\nexit", event_uuid=EV),
        Execute("answer", event_uuid="e\ne"),
        HangupCmd("NORMAL_CLEARING\n\napi status"),
        HangupCmd(uuid="u\r"),
        MyEvents("json", "u\nu"),
        Log("7\n"),
        SendEvent("CUSTOM", (("A", "b\nc"),)),
        SendEvent("CUSTOM", (("A\n", "b"),)),
        SendEvent("CUSTOM", (("Content-Length", "99"),)),
        RawCommand("api status\n\nexit"),
        RawCommand("x", (("content-length", "5"),), b"12345"),
    ],
)
def test_injection_is_refused(cmd: object) -> None:
    with pytest.raises(EslInjectionError):
        serialise(cmd)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "cmd",
    [
        Api(""),
        Api(" status"),
        Auth(""),
        GetVar("x "),
        EventSubscribe("plain", ("A B",)),
        EventSubscribe("plain", ("",)),
        SendEvent("CUSTOM", (("A:B", "c"),)),
        Execute("", event_uuid=EV),
    ],
)
def test_illegal_commands_are_refused(cmd: object) -> None:
    with pytest.raises(LocalProtocolError):
        serialise(cmd)  # type: ignore[arg-type]


def test_command_decoder_line_endings_and_chunking() -> None:
    wire = b"\r\n\nauth ClueCon\r\n\r\nevent plain ALL\n\r\nsendevent X\nContent-Length: 0\n\nexit\n\n"
    expected = [Auth("ClueCon"), EventSubscribe("plain", ("ALL",)), SendEvent("X", (), ""), Exit()]
    assert CommandDecoder().feed(wire) == expected
    decoder = CommandDecoder()
    assert [c for i in range(len(wire)) for c in decoder.feed(wire[i : i + 1])] == expected
