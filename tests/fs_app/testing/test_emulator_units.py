"""Unit tests of the emulator's building blocks: dial strings, encoding, framing, templates, load helper."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fs_app.esl import EslCodec, Event, url_encode
from fs_app.testing import (
    CallSpec,
    DialStringError,
    FreeSwitchEmulator,
    TargetBehaviour,
    parse_dialstring,
    wire,
)
from fs_app.testing.__main__ import main as cli_main
from fs_app.testing.channel import CallerProfile
from fs_app.testing.core import SwitchCore, new_uuid
from fs_app.testing.load import LoadProfile, run_load, run_profile
from fs_app.testing.originate import endpoint_user, plan_group
from fs_app.testing.outbound import parse_socket_data
from fs_app.testing.trivial_app import serve


def test_dialstring_groups_legs_and_vars() -> None:
    dial = parse_dialstring("{a=1,b='x,y'}[leg_timeout=5]sofia/gw/ims/1,[x=1]ep2|ep3")
    assert dict(dial.vars) == {"a": "1", "b": "x,y"}
    groups = dial.branches[0].groups
    assert [[leg.endpoint for leg in g] for g in groups] == [["sofia/gw/ims/1", "ep2"], ["ep3"]]
    assert dict(groups[0][0].vars) == {"leg_timeout": "5"}
    assert dial.leg_var(groups[0][0], "leg_timeout") == "5"
    assert dial.leg_var(groups[0][1], "a") == "1"
    assert dial.simultaneous


def test_dialstring_enterprise_escapes_and_delimiters() -> None:
    dial = parse_dialstring("<e=1>{a=1}ep1:_:{^^:c=3:d=4}ep2,ep\\,3")
    assert len(dial.branches) == 2
    assert dict(dial.enterprise_vars) == {"e": "1"}
    assert dict(dial.branches[1].vars) == {"c": "3", "d": "4"}
    assert [leg.endpoint for leg in dial.legs] == ["ep1", "ep2", "ep\\,3"]
    with pytest.raises(DialStringError):
        parse_dialstring("{a=1")
    with pytest.raises(DialStringError):
        parse_dialstring("  ")


def _split_top_char_by_char(text: str, sep: str) -> list[str] | None:
    """The splitter's first form, one character at a time: the reference the token-jumping one must match."""
    parts: list[str] = []
    depth: list[str] = []
    quote = False
    buf: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            buf.append(text[i:i + 2])
            i += 2
            continue
        if ch == "'":
            quote = not quote
        elif not quote:
            if ch in "{[<":
                depth.append({"{": "}", "[": "]", "<": ">"}[ch])
            elif depth and ch == depth[-1]:
                depth.pop()
            elif not depth and text.startswith(sep, i):
                parts.append("".join(buf))
                buf = []
                i += len(sep)
                continue
        buf.append(ch)
        i += 1
    if depth:
        return None
    parts.append("".join(buf))
    return parts


@given(st.text(alphabet="ab,|:_'\\{}[]<>=^ ", max_size=40), st.sampled_from([",", "|", ":_:", ":", "^"]))
def test_dialstring_splitting_matches_the_character_by_character_reference(text: str, sep: str) -> None:
    from fs_app.testing.dialstring import _split_top

    expected = _split_top_char_by_char(text, sep)
    if expected is None:
        with pytest.raises(DialStringError):
            _split_top(text, sep)
    else:
        assert _split_top(text, sep) == expected


def test_endpoint_user() -> None:
    assert endpoint_user("sofia/external/callee@127.0.0.1:5090") == ("callee", "127.0.0.1", 5090)
    assert endpoint_user("sofia/gateway/ims/79001234567") == ("79001234567", "ims", 0)
    assert endpoint_user("user/1001@example.com") == ("1001", "example.com", 0)


def test_plan_group_timeouts() -> None:
    targets = {"a": TargetBehaviour.no_answer(), "b": TargetBehaviour.answer(after_ms=3000),
               "c": TargetBehaviour.busy(after_ms=100)}
    dial = parse_dialstring("[leg_timeout=2]a,b,c")
    plan = plan_group(dial, dial.branches[0].groups[0], targets.__getitem__, timeout_s=60, scale=1.0)
    assert plan.winner is not None
    assert plan.winner.endpoint == "b"
    assert sorted(plan.causes.values()) == ["ALLOTTED_TIMEOUT", "NONE", "USER_BUSY"]
    dial = parse_dialstring("a")
    plan = plan_group(dial, dial.branches[0].groups[0], targets.__getitem__, timeout_s=1, scale=1.0)
    assert plan.winner is None
    assert plan.cause == "NO_ANSWER"
    assert plan.end_at == 1.0


@given(st.text(alphabet=st.characters(max_codepoint=0x2FF), max_size=40))
def test_encode_value_matches_codec_url_encode(value: str) -> None:
    assert wire.encode_value(value) == url_encode(value)


# "%XX" is passed through, so it cannot round-trip; an "ARRAY::" value is a list in event-json, by design.
_VALUES = st.text(max_size=30).filter(lambda v: "%" not in v and not v.startswith("ARRAY::"))


@given(st.lists(st.tuples(st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,20}", fullmatch=True), _VALUES),
                min_size=1, max_size=10, unique_by=lambda p: p[0]))
def test_serialised_events_parse_back(pairs: list[tuple[str, str]]) -> None:
    headers = [("Event-Name", "CUSTOM"), *[(k, v) for k, v in pairs if k != "Event-Name"]]
    body = wire.serialize_plain(headers).encode()
    frame = wire.event_header(len(body), "plain") + body
    [event] = EslCodec().feed(frame)
    assert isinstance(event, Event)
    for name, value in headers:
        assert event.get(name) == (value or "_undef_")
    as_json = json.loads(wire.serialize_json(headers))
    assert all(as_json[k] == v for k, v in headers)


def test_wire_layouts() -> None:
    assert wire.command_reply("+OK") == b"Content-Type: command/reply\nReply-Text: +OK\n\n"
    assert wire.bgapi_reply("u") == b"Content-Type: command/reply\nReply-Text: +OK Job-UUID: u\nJob-UUID: u\n\n"
    assert wire.api_response(b"") == (b"Content-Type: api/response\nContent-Length: 14\n\n", b"-ERR no reply\n")
    assert wire.event_header(5, "json") == b"Content-Length: 5\nContent-Type: text/event-json\n\n"
    head, body = wire.disconnect_notice("u")
    assert head == (b"Content-Type: text/disconnect-notice\nControlled-Session-UUID: u\n"
                    b"Content-Disposition: disconnect\nContent-Length: 67\n\n")
    assert len(body) == 67
    assert wire.linger_notice("u", "sofia/x/a@b:1", -1) == (
        b"Content-Type: text/disconnect-notice\nControlled-Session-UUID: u\nContent-Disposition: linger\n"
        b"Channel-Name: sofia/x/a@b:1\nLinger-Time: -1\nContent-Length: 0\n\n")
    assert wire.rude_rejection()[0] == b"Content-Type: text/rude-rejection\nContent-Length: 24\n\n"
    assert len(wire.LOST_EVENTS_BODY) == 39


def test_caller_profile_omits_empty_fields_and_keeps_order() -> None:
    profile = CallerProfile({"Direction": "inbound", "Caller-ID-Number": "1000", "Unique-ID": "u"})
    text = profile.render("Caller")
    assert text.startswith("Caller-Direction: inbound\nCaller-Caller-ID-Number: 1000\nCaller-Unique-ID: u\n")
    assert "Caller-Username" not in text
    assert "Caller-Channel-Answered-Time: 0\n" in text
    profile.set("Callee-ID-Name", "Outbound Call")
    rendered = profile.render("Other-Leg")
    assert rendered.index("Other-Leg-Caller-ID-Number") < rendered.index("Other-Leg-Callee-ID-Name: Outbound%20Call")
    assert rendered.index("Other-Leg-Callee-ID-Name") < rendered.index("Other-Leg-Unique-ID")


def test_core_sequence_and_uuid() -> None:
    core = SwitchCore(first_sequence=100)
    assert [core.next_seq() for _ in range(3)] == [100, 101, 102]
    uuids = {new_uuid() for _ in range(1000)}
    assert len(uuids) == 1000
    assert all(len(u) == 36 and u[14] == "4" for u in uuids)


def test_parse_socket_data() -> None:
    assert parse_socket_data("127.0.0.1:8084 async full") == ("127.0.0.1", 8084, None, True, True)
    assert parse_socket_data("10.0.0.1 full") == ("10.0.0.1", 8084, None, False, True)
    assert parse_socket_data("[::1]:9000/app async") == ("::1", 9000, "app", True, False)


async def test_load_helper_against_trivial_app() -> None:
    server = await serve("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        emu = FreeSwitchEmulator(default_target=TargetBehaviour.answer(0, 0))
        report = await run_load("127.0.0.1", port, rate=200, count=40, emulator=emu)
        assert report.completed == 40
        assert report.failed == 0
        assert report.rejected == 0
        assert len(report.latencies_ms) == 40
        assert report.percentile(99) >= report.percentile(50) > 0
        assert report.summary()["disconnects"] == {"linger-exit": 40}
        capped = await run_profile("127.0.0.1", port, LoadProfile(rate=1000, count=20, concurrency=1))
        assert capped.rejected > 0
        assert capped.completed + capped.rejected == 20
    finally:
        server.close()
        await server.wait_closed()


async def test_load_helper_reports_failures() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        report = await run_load("127.0.0.1", port, rate=100, count=5, spec=CallSpec(max_duration_s=2))
        assert report.completed == 0
        assert report.failures["no bridge command"] == 5
    finally:
        server.close()
        await server.wait_closed()


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["--help"])
    assert exc.value.code == 0
    assert "fs-emulator" in capsys.readouterr().out


def test_xml_events_parse_with_the_codec() -> None:
    headers = [("Event-Name", "CUSTOM"), ("Event-Subclass", "a::b"), ("X-Val", "a b&c")]
    body = wire.serialize_xml(headers, "hello <world>").encode()
    [event] = EslCodec().feed(wire.event_header(len(body), "xml") + body)
    assert isinstance(event, Event)
    assert event.name == "CUSTOM"
    assert event.get("X-Val") == "a b&c"
    assert event.body == "hello <world>"
