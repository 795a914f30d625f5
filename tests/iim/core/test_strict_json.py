"""strict_json: one meaning per document, or BadJson (never any other exception)."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iim.core.strict_json import BadJson, canonical_json, loads


def test_valid_document_parses_like_the_stdlib() -> None:
    raw = b'{"a": [1, 2.5, -3e2, true, false, null, "x\\u00e9\\ud83d\\ude00"], "b": {"c": {}}}'
    assert loads(raw) == json.loads(raw)


@pytest.mark.parametrize("raw", [b"0", b'"s"', b"null", b"[]", b" {} \n"])
def test_any_json_value_is_accepted_at_top_level(raw: bytes) -> None:
    assert loads(raw) == json.loads(raw)


@pytest.mark.parametrize("raw", [
    b'{"event_id": "a", "event_id": "b"}',
    b'{"x": [{"k": 1, "k": 1}]}',
    b'[[[{"deep": {"a": 1, "b": 2, "a": 3}}]]]',
])
def test_duplicate_keys_at_any_depth_are_refused(raw: bytes) -> None:
    with pytest.raises(BadJson, match="duplicate object key"):
        loads(raw)


def test_duplicate_key_reason_names_identifier_keys_but_not_arbitrary_text() -> None:
    with pytest.raises(BadJson) as named:
        loads(b'{"event_id": 1, "event_id": 2}')
    assert "'event_id'" in named.value.reason
    with pytest.raises(BadJson) as hidden:
        loads(b'{"s\\u00e9cret\\n": 1, "s\\u00e9cret\\n": 2}')
    assert "cret" not in hidden.value.reason


@pytest.mark.parametrize("raw", [b"NaN", b"[Infinity]", b'{"x": -Infinity}', b"[1e999]", b"-1e400"])
def test_non_finite_numbers_are_refused(raw: bytes) -> None:
    with pytest.raises(BadJson):
        loads(raw)


@pytest.mark.parametrize("raw", [b"\xff{}", b'{"a": "\xc3"}', b'"\xed\xa0\x80"', b"\xc0\xaf"])
def test_invalid_utf8_is_refused(raw: bytes) -> None:
    with pytest.raises(BadJson, match="UTF-8"):
        loads(raw)


def test_byte_order_mark_is_refused() -> None:
    with pytest.raises(BadJson, match="byte order mark"):
        loads(b"\xef\xbb\xbf{}")


@pytest.mark.parametrize("raw", [b'"\\ud800"', b'{"\\udfff": 1}', b'["ok", ["\\ud83d x"]]'])
def test_lone_surrogate_escapes_are_refused(raw: bytes) -> None:
    with pytest.raises(BadJson, match="surrogate"):
        loads(raw)


def test_escaped_backslash_before_u_is_not_mistaken_for_a_surrogate() -> None:
    assert loads(b'"\\\\ud800"') == "\\ud800"


@pytest.mark.parametrize("raw", [b"", b"{", b"{'a': 1}", b"[1,]", b"{} {}", b"01", b'"\x01"', b"True", b"\x00"])
def test_non_json_is_refused(raw: bytes) -> None:
    with pytest.raises(BadJson, match="not JSON"):
        loads(raw)


def test_nesting_up_to_max_depth_is_accepted_and_one_more_is_refused() -> None:
    assert loads(b"[" * 16 + b"]" * 16) is not None
    assert loads(b'{"a":' * 16 + b"1" + b"}" * 16) is not None
    with pytest.raises(BadJson, match="nesting deeper than 16"):
        loads(b"[" * 17 + b"]" * 17)
    with pytest.raises(BadJson, match="deeper than 2"):
        loads(b'{"a": [{}]}', max_depth=2)


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    raw = b'["' + b"[{" * 1000 + b'\\"]}"]'
    assert loads(raw) == ["[{" * 1000 + '"]}']


def test_hundred_thousand_open_brackets_are_refused_fast() -> None:
    started = time.perf_counter()
    for opener in (b"[", b"{", b'{"a":'):
        with pytest.raises(BadJson, match="nesting"):
            loads(opener * 100_000)
    assert time.perf_counter() - started < 0.5


def test_recursion_error_under_a_generous_depth_limit_is_still_bad_json() -> None:
    with pytest.raises(BadJson, match="nesting too deep"):
        loads(b"[" * 100_000 + b"]" * 100_000, max_depth=1_000_000)


def test_integer_beyond_the_digit_limit_is_bad_json() -> None:
    with pytest.raises(BadJson, match="out of range"):
        loads(b"9" * 5000)


def test_bad_json_is_a_value_error_with_a_reason() -> None:
    with pytest.raises(ValueError, match="not JSON") as info:
        loads(b"nope")
    assert isinstance(info.value, BadJson)
    assert info.value.reason.startswith("not JSON")


def test_canonical_json_is_compact_sorted_and_stable() -> None:
    assert canonical_json({"b": 1, "a": [True, None, "é"]}) == b'{"a":[true,null,"\\u00e9"],"b":1}'
    with pytest.raises(ValueError):
        canonical_json(float("nan"))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_raise_nothing_but_bad_json(raw: bytes) -> None:
    try:
        loads(raw)
    except BadJson:
        pass


_JSONISH = st.text(alphabet='{}[]",:0123456789.eE+-tfrunlasNIy\\ \x00é', max_size=64)


@settings(max_examples=300, deadline=None)
@given(_JSONISH)
def test_json_shaped_text_raises_nothing_but_bad_json(text: str) -> None:
    try:
        loads(text.encode())
    except BadJson:
        pass


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(_VALUES)
def test_stdlib_serialised_values_round_trip(value: object) -> None:
    try:
        parsed = loads(json.dumps(value).encode())
    except BadJson as exc:
        reason = exc.reason
    else:
        assert parsed == value
        return
    # Only our extra rules may refuse what the stdlib wrote: lone surrogates, deep nesting.
    assert "surrogate" in reason or "nesting" in reason
