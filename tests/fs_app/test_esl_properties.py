"""Property tests for the ESL codec (hypothesis).

* any re-chunking of any recorded FS->app stream gives the messages feeding it whole gives;
* ``CommandDecoder.feed(serialise(cmd)) == [cmd]`` for generated commands of every kind;
* ``url_decode(url_encode(s)) == s`` when ``s`` holds no ``%XX``, and ``url_decode`` equals
  ``urllib``'s unquote-then-replace on any text;
* generated events serialised the FreeSWITCH way (plain and JSON) parse back to their values;
* header lookups on the lazy block agree with the split dictionary.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import string
from typing import Any
from urllib.parse import unquote_to_bytes

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fs_app.esl import (
    Api,
    Auth,
    BgApi,
    Command,
    CommandDecoder,
    Connect,
    DivertEvents,
    EslCodec,
    Event,
    EventSubscribe,
    Execute,
    Exit,
    Filter,
    FilterDelete,
    GetVar,
    HangupCmd,
    Linger,
    Log,
    MyEvents,
    NixEvent,
    NoEvents,
    NoLinger,
    NoLog,
    RawCommand,
    Resume,
    SendEvent,
    serialise,
    url_decode,
    url_encode,
)
from tests.esl_fixtures import all_fs_streams, canonical, feed_all, feed_chunks

# IIM_ESL_FUZZ_SCALE=N runs N times the examples (a longer local run; CI uses 1).
SCALE = max(1, int(os.environ.get("IIM_ESL_FUZZ_SCALE", "1")))
PROPERTY = settings(max_examples=120 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _recorded() -> tuple[bytes, ...]:
    return tuple(all_fs_streams())


@functools.cache
def _expected(index: int) -> list[Any]:
    return [canonical(m) for m in feed_all(_recorded()[index])]


# ---------------------------------------------------------------- re-chunking


def test_every_recorded_stream_byte_by_byte() -> None:
    for index, data in enumerate(_recorded()):
        codec = EslCodec()
        messages = [m for i in range(len(data)) for m in codec.feed(data[i : i + 1])]
        assert codec.feed_eof()
        assert [canonical(m) for m in messages] == _expected(index)


@st.composite
def _rechunked(draw: st.DrawFn) -> tuple[int, list[bytes]]:
    index = draw(st.integers(0, len(_recorded()) - 1))
    data = _recorded()[index]
    mode = draw(st.sampled_from(["cuts", "small", "sizes"]))
    if mode == "cuts":
        cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=60))))
    else:
        top = 8 if mode == "small" else 70_000
        cuts, pos = [], 0
        sizes = draw(st.lists(st.integers(1, top), min_size=1, max_size=40))
        while pos < len(data):
            pos += sizes[len(cuts) % len(sizes)]
            cuts.append(min(pos, len(data)))
    bounds = [0, *cuts, len(data)]
    return index, [data[a:b] for a, b in itertools.pairwise(bounds)]


@PROPERTY
@given(_rechunked())
def test_any_rechunking_gives_the_same_messages(case: tuple[int, list[bytes]]) -> None:
    index, pieces = case
    assert [canonical(m) for m in feed_chunks(pieces)] == _expected(index)


# ---------------------------------------------------------------- commands round trip

_WORD = st.text(string.ascii_letters + string.digits + "_-:.", min_size=1, max_size=20)
_UUIDISH = st.uuids().map(str)
# One line, no surrounding whitespace (what a command argument may be); any Unicode inside.
_LINE = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), min_size=1, max_size=40
).filter(lambda s: s == s.strip())
_ARG = st.one_of(
    st.none(),
    st.text(st.characters(blacklist_categories=["Cs"]), max_size=60),
    st.text("ab \n\r:é", min_size=1000, max_size=1100),  # straddles the header/body threshold
)
_HEADER_NAME = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=20).filter(
    lambda s: s.lower() != "content-length"
)
_HEADER_VALUE = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=30
).filter(lambda s: not s.startswith(" "))  # FreeSWITCH strips leading spaces of header values
_HEADERS = st.lists(st.tuples(_HEADER_NAME, _HEADER_VALUE), max_size=4).map(tuple)


def _not_keyword(word: str) -> bool:
    return word.lower() not in {"delete", "plain", "json", "xml"}


COMMANDS: st.SearchStrategy[Command] = st.one_of(
    st.just(Connect()),
    st.builds(Auth, _LINE),
    st.builds(MyEvents, st.sampled_from([None, "plain", "json", "xml"]), st.one_of(st.none(), _UUIDISH)),
    st.builds(Linger, st.one_of(st.none(), st.integers(-1, 10**9))),
    st.just(NoLinger()),
    st.builds(
        EventSubscribe,
        st.sampled_from(["plain", "json", "xml"]),
        st.lists(_WORD, min_size=1, max_size=5).map(tuple),
    ),
    st.just(NoEvents()),
    st.builds(Filter, _WORD.filter(_not_keyword), _LINE),
    st.builds(FilterDelete, _WORD, st.one_of(st.none(), _LINE)),
    st.builds(
        Execute,
        _WORD,
        _ARG,
        st.one_of(st.none(), _UUIDISH),
        st.one_of(_UUIDISH, st.just("")),
        st.booleans(),
        st.one_of(st.none(), st.integers(-1, 1000)),
    ),
    st.builds(
        HangupCmd,
        st.sampled_from(["NORMAL_CLEARING", "USER_BUSY", "CALL_REJECTED"]),
        st.one_of(st.none(), _UUIDISH),
    ),
    st.builds(Api, _LINE),
    st.builds(BgApi, _LINE, st.one_of(_UUIDISH, st.just(""))),
    st.builds(GetVar, _LINE),
    st.just(Resume()),
    st.just(Exit()),
    st.builds(Log, _WORD),
    st.just(NoLog()),
    st.builds(DivertEvents, st.booleans()),
    st.builds(NixEvent, st.lists(_WORD, min_size=1, max_size=5).map(tuple)),
    st.builds(SendEvent, _WORD, _HEADERS, st.one_of(st.none(), st.text(max_size=50))),
    st.builds(
        RawCommand,
        st.builds(
            lambda w, rest: f"x_{w}{rest}", _WORD, st.one_of(st.just(""), _LINE.map(lambda s: " " + s))
        ),
        _HEADERS,
        st.one_of(st.none(), st.binary(max_size=50)),
    ),
)


@PROPERTY
@given(COMMANDS)
def test_command_round_trip(cmd: Command) -> None:
    wire = serialise(cmd)
    assert CommandDecoder().feed(wire) == [cmd]


@PROPERTY
@given(st.lists(COMMANDS, min_size=1, max_size=8), st.integers(1, 7))
def test_command_stream_round_trip_in_pieces(cmds: list[Command], step: int) -> None:
    wire = b"".join(serialise(c) for c in cmds)
    decoder = CommandDecoder()
    assert [c for i in range(0, len(wire), step) for c in decoder.feed(wire[i : i + step])] == cmds


# ---------------------------------------------------------------- URL coding

_HAS_ESCAPE = re.compile("%[0-9A-F]{2}")


@PROPERTY
@given(st.text(min_size=1).filter(lambda s: not _HAS_ESCAPE.search(s)))
def test_url_round_trip(value: str) -> None:
    encoded = url_encode(value)
    assert encoded.isascii()
    assert not any(c in encoded for c in "\r\n :")
    assert url_decode(encoded) == value


@PROPERTY
@given(
    st.one_of(st.text(), st.text("%0123456789abcdefABCDEFxz\\é"), st.text(st.characters(max_codepoint=0x7F)))
)
def test_url_decode_matches_urllib(value: str) -> None:
    expected = unquote_to_bytes(value.encode("utf-8", "surrogatepass")).decode("utf-8", "replace")
    assert url_decode(value) == expected


def test_url_encode_is_freeswitch_s() -> None:
    assert url_encode("") == "_undef_"
    assert url_encode("a b:c@d%") == "a%20b%3Ac%40d%25"
    assert url_encode("50%25 off") == "50%25%20off"  # an existing %XX passes through
    assert url_encode("%2b") == "%252b"  # lowercase is encoded again
    assert url_encode("é") == "%C3%A9"
    assert url_encode(b"\xed\xa0\xbd") == "%ED%A0%BD"
    assert url_encode("/(),'.-_") == "/(),'.-_"


# ---------------------------------------------------------------- generated events

_NAME = st.text(
    st.characters(blacklist_categories=["Cs", "Cc", "Zs", "Zl", "Zp"], blacklist_characters=":"),
    min_size=1,
    max_size=24,
).filter(lambda s: s not in {"Event-Name", "Content-Length"})
_VALUE = st.one_of(
    st.text(max_size=40),
    st.text(": %é\n\r|ARY", max_size=20),
    st.just("ARRAY::a|:b c|:%"),
).filter(lambda s: not _HAS_ESCAPE.search(s))


def _split_array(value: str) -> list[str]:
    return value[7:].split("|:") if value.startswith("ARRAY::") else [value]


def _serialise_plain(name: str, headers: list[tuple[str, str]], body: str | None) -> bytes:
    """switch_event_serialize + mod_event_socket's event framing."""
    lines = [f"Event-Name: {url_encode(name)}", *(f"{k}: {url_encode(v)}" for k, v in headers)]
    inner = ("\n".join(lines) + "\n").encode()
    if body is not None:
        raw = body.encode()
        inner += f"Content-Length: {len(raw)}\n\n".encode() + raw
    else:
        inner += b"\n"
    return f"Content-Length: {len(inner)}\nContent-Type: text/event-plain\n\n".encode() + inner


@PROPERTY
@given(
    st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=20),
    st.lists(st.tuples(_NAME, _VALUE), max_size=12),
    st.one_of(st.none(), st.text(min_size=1, max_size=60)),  # FS writes no inner body when it is empty
    st.integers(1, 64),
)
def test_generated_plain_events_parse_back(
    name: str, headers: list[tuple[str, str]], body: str | None, step: int
) -> None:
    assume(not _HAS_ESCAPE.search(name))
    frame = _serialise_plain(name, headers, body)
    codec = EslCodec()
    messages = [m for i in range(0, len(frame), step) for m in codec.feed(frame[i : i + step])]
    assert codec.feed_eof()
    [event] = messages
    assert isinstance(event, Event)
    assert event.name == name
    assert event.body == body
    first: dict[str, str] = {}
    every: dict[str, list[str]] = {}
    for key, value in headers:
        first.setdefault(key, value or "_undef_")
        every.setdefault(key, []).extend(_split_array(value or "_undef_"))
    for key, value in first.items():  # lookups on the block (the first few), then on the dict
        assert event.get(key) == value
    inner_length = {} if body is None else {"Content-Length": str(len(body.encode()))}
    assert dict(event.headers) == {"Event-Name": name, **first, **inner_length}
    for key, values in every.items():
        assert list(event.headers.get_all(key)) == values


@PROPERTY
@given(
    st.text(min_size=1, max_size=20),
    st.dictionaries(
        _NAME.filter(lambda n: n != "_body"),
        st.one_of(st.text(max_size=40), st.lists(st.text(max_size=8), min_size=1, max_size=3)),
        max_size=10,
    ),
    st.one_of(st.none(), st.text(max_size=40)),
)
def test_generated_json_events_parse_back(name: str, headers: dict[str, Any], body: str | None) -> None:
    obj: dict[str, Any] = {"Event-Name": name, **headers}
    if body is not None:
        obj["Content-Length"] = str(len(body.encode()))
        obj["_body"] = body
    inner = json.dumps(obj, separators=(",", ":")).encode()  # FS writes unformatted JSON
    frame = f"Content-Length: {len(inner)}\nContent-Type: text/event-json\n\n".encode() + inner
    [event] = feed_all(frame)
    assert isinstance(event, Event)
    assert (event.name, event.format, event.body) == (name, "json", body)
    for key, value in headers.items():
        if isinstance(value, list):
            assert event.headers.get_all(key) == tuple(value)
            assert event.get(key) == "ARRAY::" + "|:".join(value)
        else:
            assert event.get(key) == value


# ---------------------------------------------------------------- lazy lookups == split

_BLOCK_LINE = st.text("ab:% \r", min_size=1, max_size=8)  # an empty line would end the block


@PROPERTY
@given(st.lists(_BLOCK_LINE, min_size=1, max_size=10), st.lists(st.text("ab:% \r\n", max_size=4), max_size=6))
def test_lookups_agree_with_split(lines: list[str], probes: list[str]) -> None:
    inner = ("\n".join(["Event-Name: X", *lines]) + "\n\n").encode()
    frame = f"Content-Length: {len(inner)}\nContent-Type: text/event-plain\n\n".encode() + inner
    [split] = feed_all(frame)
    assert isinstance(split, Event)
    as_dict = dict(split.headers)
    names = [line.partition(":")[0] for line in lines] + probes
    for name in names:
        [lazy] = feed_all(frame)
        assert isinstance(lazy, Event)
        assert lazy.get(name) == as_dict.get(name), name
        assert (name in lazy.headers) == (name in as_dict)
