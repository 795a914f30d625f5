"""EslSession on bytes only (no sockets): what answers which command, and what is a violation.

Unit tests pin the reply FIFO, execute completion by Application-UUID, bgapi by Job-UUID and
the errors; hypothesis checks that chunking never changes the event sequence of a recorded
session, and that arbitrary bytes give events or the session's own errors and nothing else.
"""

from __future__ import annotations

import functools
import itertools
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fs_app.esl import (
    CLOSED,
    NEED_DATA,
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
    EslSession,
    Event,
    Execute,
    ExecuteComplete,
    JobDone,
    Linger,
    LocalProtocolError,
    MyEvents,
    RawCommand,
    RemoteProtocolError,
    Reply,
    SessionEvent,
    UnexpectedReply,
    url_encode,
)
from tests.esl_fixtures import canonical, chunks, streams

SCALE = max(1, int(os.environ.get("IIM_ESL_FUZZ_SCALE", "1")))
PROPERTY = settings(max_examples=60 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])

OK = b"Content-Type: command/reply\nReply-Text: +OK\n\n"
ERR = b"Content-Type: command/reply\nReply-Text: -ERR no such application\n\n"
CHANNEL_DATA = b"Event-Name: CHANNEL_DATA\nUnique-ID: call-1\nReply-Text: +OK\nSocket-Mode: async\nControl: full\n\n"


def reply(text: str, **headers: str) -> bytes:
    extra = "".join(f"{k.replace('_', '-')}: {v}\n" for k, v in headers.items())
    return f"Content-Type: command/reply\nReply-Text: {text}\n{extra}\n".encode()


def api_response(body: str) -> bytes:
    data = body.encode()
    return b"Content-Type: api/response\nContent-Length: %d\n\n" % len(data) + data


def event(name: str, body: str | None = None, **headers: str) -> bytes:
    lines = [f"Event-Name: {name}"] + [f"{k.replace('_', '-')}: {url_encode(v)}" for k, v in headers.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body.encode())}")
    inner = ("\n".join(lines) + "\n\n" + (body or "")).encode()
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(inner) + inner


def drain(session: EslSession) -> list[SessionEvent]:
    out: list[SessionEvent] = []
    while (ev := session.next_event()) is not NEED_DATA:
        out.append(ev)
        if ev is CLOSED:
            break
    return out


def feed(session: EslSession, data: bytes) -> list[SessionEvent]:
    session.receive_data(data)
    return drain(session)


def connected() -> EslSession:
    """An outbound session past ``connect`` (the first command FreeSWITCH answers)."""
    session = EslSession("outbound")
    _, token = session.send(Connect())
    [answer] = feed(session, CHANNEL_DATA)
    assert isinstance(answer, Reply)
    assert answer.token == token
    return session


# ------------------------------------------------------------------------ replies


def test_replies_answer_commands_in_the_order_they_were_sent() -> None:
    session = connected()
    _, linger = session.send(Linger())
    _, events = session.send(MyEvents())
    _, status = session.send(Api("status"))
    out = feed(session, reply("+OK will linger") + reply("+OK Events Enabled") + api_response("UP 0 years\n"))
    assert [(type(e).__name__, e.token) for e in out if isinstance(e, Reply)] == [
        ("Reply", linger), ("Reply", events), ("Reply", status)]
    assert [e.reply for e in out if isinstance(e, Reply)] == [
        CommandReply("+OK will linger"), CommandReply("+OK Events Enabled"), ApiResponse("UP 0 years\n")]
    assert session.outstanding == 0


def test_the_connect_reply_carries_the_channel_data() -> None:
    session = EslSession("outbound")
    data, token = session.send(Connect())
    assert data == b"connect\n\n"
    [answer] = feed(session, CHANNEL_DATA)
    assert isinstance(answer, Reply)
    assert answer.token == token
    assert isinstance(answer.reply, ChannelData)
    assert answer.reply.unique_id == "call-1"


def test_tokens_are_distinct_and_hashable() -> None:
    session = connected()
    tokens = [session.send(MyEvents())[1] for _ in range(3)]
    assert len({*tokens}) == 3


def test_events_between_replies_pass_through_unwrapped() -> None:
    session = connected()
    _, token = session.send(MyEvents())
    out = feed(session, event("CHANNEL_PARK", Unique_ID="call-1") + reply("+OK Events Enabled"))
    assert isinstance(out[0], Event)
    assert out[0].name == "CHANNEL_PARK"
    assert isinstance(out[1], Reply)
    assert out[1].token == token


def test_a_first_outbound_command_other_than_connect_expects_no_reply() -> None:
    session = EslSession("outbound")
    session.send(Linger())  # FreeSWITCH runs it silently
    _, token = session.send(Connect())
    [answer] = feed(session, CHANNEL_DATA)
    assert isinstance(answer, Reply)
    assert answer.token == token


def test_a_raw_connect_is_a_connect_as_freeswitch_prefix_matches_it() -> None:
    session = EslSession("outbound")
    [cmd] = CommandDecoder().feed(b"connect please\r\n\r\n")
    assert isinstance(cmd, RawCommand)
    token = session.register(cmd)
    [answer] = feed(session, CHANNEL_DATA)
    assert isinstance(answer, Reply)
    assert answer.token == token


def test_inbound_greeting_and_auth_reply() -> None:
    session = EslSession("inbound")
    assert feed(session, b"Content-Type: auth/request\n\n") == [AuthRequest()]
    _, token = session.send(Auth("ClueCon"))
    [answer] = feed(session, reply("+OK accepted"))
    assert answer == Reply(token, CommandReply("+OK accepted"))


# ---------------------------------------------------------------------- execute


def test_execute_completes_on_its_application_uuid_among_other_events() -> None:
    session = connected()
    _, playback = session.send(Execute("playback", "a.wav", event_uuid="ev-1"))
    _, bridge = session.send(Execute("bridge", "sofia/x", event_uuid="ev-2"))
    out = feed(
        session,
        reply("+OK") + reply("+OK")
        + event("CHANNEL_EXECUTE", Application="playback", Application_UUID="ev-1")
        + event("CHANNEL_EXECUTE_COMPLETE", Application="set", Application_UUID="someone-else")
        + event("CHANNEL_EXECUTE_COMPLETE", Application="bridge", Application_UUID="ev-2")
        + event("DTMF", DTMF_Digit="1")
        + event("CHANNEL_EXECUTE_COMPLETE", Application="playback", Application_UUID="ev-1"),
    )
    kinds = [(type(e).__name__, getattr(e, "token", None) or getattr(e, "name", None)) for e in out]
    assert kinds == [
        ("Reply", playback), ("Reply", bridge), ("Event", "CHANNEL_EXECUTE"), ("Event", "CHANNEL_EXECUTE_COMPLETE"),
        ("ExecuteComplete", bridge), ("Event", "DTMF"), ("ExecuteComplete", playback),
    ]
    done = out[-1]
    assert isinstance(done, ExecuteComplete)
    assert done.event.get("Application") == "playback"


def test_a_completion_before_its_reply_is_still_matched() -> None:
    session = connected()
    _, token = session.send(Execute("playback", "a.wav", event_uuid="ev-1"))
    out = feed(session, event("CHANNEL_EXECUTE_COMPLETE", Application_UUID="ev-1") + reply("+OK"))
    assert [type(e).__name__ for e in out] == ["ExecuteComplete", "Reply"]
    assert {e.token for e in out if isinstance(e, ExecuteComplete | Reply)} == {token}


def test_a_refused_execute_expects_no_completion() -> None:
    session = connected()
    session.send(Execute("nosuchapp", event_uuid="ev-1"))
    out = feed(session, ERR + event("CHANNEL_EXECUTE_COMPLETE", Application_UUID="ev-1"))
    assert isinstance(out[0], Reply)
    assert not out[0].ok
    assert isinstance(out[1], Event)


def test_a_forgotten_execute_completes_as_an_ordinary_event() -> None:
    session = connected()
    _, token = session.send(Execute("playback", "a.wav", event_uuid="ev-1"))
    session.forget(token)
    out = feed(session, reply("+OK") + event("CHANNEL_EXECUTE_COMPLETE", Application_UUID="ev-1"))
    assert [type(e).__name__ for e in out] == ["Reply", "Event"]


# ------------------------------------------------------------------------ bgapi


def test_bgapi_is_done_on_the_background_job_with_its_job_uuid() -> None:
    session = EslSession("inbound")
    _, first = session.send(BgApi("originate a", job_uuid="job-1"))
    _, second = session.send(BgApi("originate b", job_uuid="job-2"))
    out = feed(
        session,
        reply("+OK Job-UUID: job-1", Job_UUID="job-1") + reply("+OK Job-UUID: job-2", Job_UUID="job-2")
        + event("BACKGROUND_JOB", "-ERR USER_BUSY\n", Job_UUID="job-2")
        + event("BACKGROUND_JOB", "+OK c-1\n", Job_UUID="job-1"),
    )
    jobs = [e for e in out if isinstance(e, JobDone)]
    assert [(j.token, j.job_uuid, j.body) for j in jobs] == [
        (second, "job-2", "-ERR USER_BUSY\n"), (first, "job-1", "+OK c-1\n")]


def test_bgapi_without_job_uuid_learns_it_from_the_reply() -> None:
    session = EslSession("inbound")
    _, token = session.send(BgApi("status", job_uuid=""))
    out = feed(session, reply("+OK Job-UUID: fs-made", Job_UUID="fs-made") + event("BACKGROUND_JOB", "UP\n",
                                                                                      Job_UUID="fs-made"))
    assert isinstance(out[1], JobDone)
    assert out[1].token == token


def test_a_background_job_we_did_not_start_is_an_ordinary_event() -> None:
    # FreeSWITCH sends every job's BACKGROUND_JOB to every subscriber, other clients' jobs too.
    session = EslSession("inbound")
    session.send(BgApi("status", job_uuid="mine"))
    out = feed(session, reply("+OK Job-UUID: mine", Job_UUID="mine") + event("BACKGROUND_JOB", "x", Job_UUID="other"))
    assert isinstance(out[1], Event)
    assert out[1].job_uuid == "other"


# ----------------------------------------------------------------------- errors


def test_a_reply_with_nothing_outstanding_is_an_unexpected_reply_error() -> None:
    session = connected()
    session.receive_data(event("CHANNEL_PARK") + OK + event("CHANNEL_ANSWER"))
    assert isinstance(session.next_event(), Event)  # what came before the violation is delivered
    with pytest.raises(UnexpectedReply, match="no command outstanding"):
        session.next_event()
    with pytest.raises(UnexpectedReply):  # and the session stays failed
        session.next_event()
    with pytest.raises(LocalProtocolError):
        session.send(MyEvents())


def test_a_malformed_frame_is_an_error_after_the_events_before_it() -> None:
    session = connected()
    session.receive_data(event("CHANNEL_PARK") + b"Content-Length: 12x\nContent-Type: text/event-plain\n\n")
    assert isinstance(session.next_event(), Event)
    with pytest.raises(RemoteProtocolError, match="Content-Length"):
        session.next_event()


def test_eof_mid_frame_is_an_error() -> None:
    session = connected()
    frame = event("CHANNEL_HANGUP")
    session.receive_data(frame[:-5])
    assert session.next_event() is NEED_DATA
    session.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="mid-frame"):
        session.next_event()


def test_eof_between_frames_closes_the_session() -> None:
    session = connected()
    notice = b"Content-Type: text/disconnect-notice\nContent-Length: 23\n\nDisconnected, goodbye.\n"
    out = feed(session, notice)
    assert isinstance(out[0], DisconnectNotice)
    session.receive_data(b"")
    assert session.next_event() is CLOSED
    assert session.next_event() is CLOSED
    with pytest.raises(LocalProtocolError):
        session.send(MyEvents())


def test_an_illegal_command_takes_no_place_in_the_reply_fifo() -> None:
    session = connected()
    with pytest.raises(LocalProtocolError):
        session.send(Api("status\nexit"))
    _, token = session.send(Api("status"))
    [answer] = feed(session, api_response("UP\n"))
    assert isinstance(answer, Reply)
    assert answer.token == token


# ------------------------------------------------------------- recorded streams


def _summary(ev: SessionEvent) -> tuple[Any, ...]:
    if isinstance(ev, Reply):
        return ("Reply", ev.token, canonical(ev.reply))
    if isinstance(ev, ExecuteComplete | JobDone):
        return (type(ev).__name__, ev.token, canonical(ev.event))
    if ev is CLOSED or ev is NEED_DATA:
        return (repr(ev),)
    return ("Message", canonical(ev))


def _conversations() -> list[tuple[str, str]]:
    return [(name, conn) for name, conn, direction in streams() if direction == "fs>app"]


def _session_for(name: str, conn: str) -> EslSession:
    """A session that sent what the recorded application sent on this connection."""
    session = EslSession("inbound" if conn.startswith("inbound") else "outbound")
    decoder = CommandDecoder()
    for data in chunks(name, conn, "app>fs"):
        for cmd in decoder.feed(data):
            session.register(cmd)
    return session


def _run(name: str, conn: str, pieces: list[bytes]) -> list[tuple[Any, ...]]:
    session = _session_for(name, conn)
    out: list[tuple[Any, ...]] = []
    try:
        for piece in pieces:
            session.receive_data(piece)
            out.extend(_summary(ev) for ev in drain(session))
        session.receive_data(b"")
        out.extend(_summary(ev) for ev in drain(session))
    except RemoteProtocolError as exc:
        out.append(("error", type(exc).__name__))
    return out


@functools.cache
def _expected(name: str, conn: str) -> list[tuple[Any, ...]]:
    return _run(name, conn, [b"".join(chunks(name, conn))])


@pytest.mark.skipif(not streams(), reason="recorded sessions are not present")
def test_every_recorded_conversation_settles_every_command() -> None:
    for name, conn in _conversations():
        out = _expected(name, conn)
        assert not [k for k in out if k[0] == "error"], (name, conn)
        assert out[-1] == ("CLOSED",), (name, conn)
    bridge = _expected("o02_bridge_answered_callee_hangs_up", "outbound")
    assert [k[0] for k in bridge].count("ExecuteComplete") >= 1
    jobs = _expected("i02_api_bgapi_basics", "inbound")
    assert [k[0] for k in jobs].count("JobDone") >= 1


@pytest.mark.skipif(not streams(), reason="recorded sessions are not present")
@PROPERTY
@given(data=st.data())
def test_any_chunking_of_a_recorded_conversation_gives_the_same_events(data: st.DataObject) -> None:
    conversations = _conversations()
    name, conn = conversations[data.draw(st.integers(0, len(conversations) - 1), label="conversation")]
    whole = b"".join(chunks(name, conn))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(whole) - 1)), max_size=40), label="cuts"))
    bounds = [0, *cuts, len(whole)]
    pieces = [whole[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    assert _run(name, conn, pieces) == _expected(name, conn)


@settings(max_examples=300 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    outbound=st.booleans(),
    sent=st.lists(st.sampled_from([Connect(), MyEvents(), Execute("answer", event_uuid="e"), BgApi("x", "j")]),
                  max_size=4),
    pieces=st.lists(
        st.one_of(st.binary(max_size=64), st.sampled_from([OK, ERR, CHANNEL_DATA, event("CHANNEL_EXECUTE_COMPLETE",
                   Application_UUID="e"), event("BACKGROUND_JOB", "+OK", Job_UUID="j"), b"\n\n", b"Content-Length: "])),
        max_size=12),
)
def test_arbitrary_bytes_give_events_or_the_sessions_own_errors(
    outbound: bool, sent: list[Any], pieces: list[bytes]
) -> None:
    session = EslSession("outbound" if outbound else "inbound")
    for cmd in sent:
        session.send(cmd)
    try:
        for piece in [*(p for p in pieces if p), b""]:  # b"" is the end of the stream
            session.receive_data(piece)
            for _ in range(10_000):
                if session.next_event() in (NEED_DATA, CLOSED):
                    break
            else:
                raise AssertionError("next_event never asked for more data")
    except RemoteProtocolError:
        pass  # the only error bytes can cause: never a hang, a crash or another type


def _run_batched(name: str, conn: str, pieces: list[bytes]) -> list[tuple[Any, ...]]:
    """As :func:`_run`, through :meth:`EslSession.receive_events` (the drivers' hot path)."""
    session = _session_for(name, conn)
    out: list[tuple[Any, ...]] = []
    for piece in pieces:
        out.extend(_summary(ev) for ev in session.receive_events(piece))
        if session.error is not None:
            out.append(("error", type(session.error).__name__))
            return out
    session.receive_data(b"")
    try:
        out.extend(_summary(ev) for ev in drain(session))
    except RemoteProtocolError as exc:
        out.append(("error", type(exc).__name__))
    return out


@pytest.mark.skipif(not streams(), reason="recorded sessions are not present")
@PROPERTY
@given(data=st.data())
def test_receiving_events_in_batches_gives_what_next_event_gives(data: st.DataObject) -> None:
    conversations = _conversations()
    name, conn = conversations[data.draw(st.integers(0, len(conversations) - 1), label="conversation")]
    whole = b"".join(chunks(name, conn))
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(whole) - 1)), max_size=40), label="cuts"))
    pieces = [whole[a:b] for a, b in itertools.pairwise([0, *cuts, len(whole)]) if b > a]
    assert _run_batched(name, conn, pieces) == _expected(name, conn)


def test_a_batch_stops_at_a_violation_after_the_events_before_it() -> None:
    session = EslSession("inbound")
    session.send(MyEvents())
    events = session.receive_events(OK + OK + event("HEARTBEAT"))
    assert [type(ev).__name__ for ev in events] == ["Reply"]
    assert isinstance(session.error, UnexpectedReply)
    with pytest.raises(UnexpectedReply):
        session.next_event()
