"""The anti-toll-fraud guard (pure) and the in-process originate ledger."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fs_app.outreach.guard import OriginateLimits, Refusal, check_destination, destination_kind

MOBILE = "+79001234567"
SPEAKER = "sip:speaker-1@iim.local"
BOUND = frozenset({MOBILE, SPEAKER, "+4915112345678"})
RU_ONLY = OriginateLimits(max_concurrent=2, max_per_hour=5, allowed_prefixes=("+7",))


def check(destination: str, *, limits: OriginateLimits = RU_ONLY, in_flight: int = 0,
          last_hour: int = 0, bound: frozenset[str] = BOUND) -> str | None:
    refusal = check_destination(destination, bound=bound, limits=limits, in_flight=in_flight, last_hour=last_hour)
    return refusal.reason if refusal else None


@pytest.mark.parametrize(("destination", "kwargs", "expected"), [
    (MOBILE, {}, None),
    (SPEAKER, {}, None),  # prefixes restrict numbers only
    ("+4915112345678", {}, "prefix_not_allowed"),
    ("+4915112345678", {"limits": OriginateLimits()}, None),  # no prefixes = any country
    ("+79007654321", {}, "destination_not_bound"),
    ("sip:speaker-2@iim.local", {}, "destination_not_bound"),
    ("sip:SPEAKER-1@iim.local", {}, "destination_not_bound"),  # exact match only
    ("79001234567", {}, "malformed_destination"),  # no +
    ("+7900", {}, "malformed_destination"),  # 4 digits
    ("+1234567", {}, "malformed_destination"),  # 7 digits
    ("+1234567890123456", {}, "malformed_destination"),  # 16 digits
    ("+7900123456\uff17", {}, "malformed_destination"),  # a full-width 7 is not an ASCII digit
    ("+79001234567 ", {}, "malformed_destination"),
    ("+79001234567\n", {}, "malformed_destination"),
    ("sip:speaker-1@iim.local;transport=tcp", {}, "malformed_destination"),
    ("sip:a@b,sofia/gateway/x/+1", {}, "malformed_destination"),
    ("user/1001", {}, "malformed_destination"),
    ("", {}, "malformed_destination"),
    ("sip:" + "a" * 5000, {}, "malformed_destination"),
    (MOBILE, {"in_flight": 2}, "concurrent_cap"),
    (MOBILE, {"in_flight": 1}, None),
    (MOBILE, {"last_hour": 5}, "hourly_cap"),
    (MOBILE, {"last_hour": 4}, None),
    (MOBILE, {"in_flight": 9, "last_hour": 99}, "concurrent_cap"),
    ("+79007654321", {"in_flight": 9}, "destination_not_bound"),  # the most specific reason first
    (MOBILE, {"limits": OriginateLimits(max_concurrent=0)}, "concurrent_cap"),
    (MOBILE, {"bound": frozenset()}, "destination_not_bound"),
])
def test_check_destination_table(destination: str, kwargs: dict[str, object], expected: str | None) -> None:
    assert check(destination, **kwargs) == expected  # type: ignore[arg-type]


def test_refusal_names_the_reason_and_shows_little() -> None:
    refusal = check_destination("x" * 10_000, bound=BOUND, limits=RU_ONLY, in_flight=0, last_hour=0)
    assert isinstance(refusal, Refusal)
    assert refusal.reason == "malformed_destination"
    assert len(refusal.detail) < 200


def test_limits_reject_negative_caps() -> None:
    with pytest.raises(ValueError):
        OriginateLimits(max_concurrent=-1)


@settings(max_examples=300, deadline=None)
@given(destination=st.one_of(st.text(max_size=80), st.from_regex(r"\+[0-9]{6,17}", fullmatch=True),
                             st.from_regex(r"sip:[a-z0-9.\-]{0,10}@[a-z.]{0,10}(:[0-9]{0,6})?", fullmatch=True)),
       bound=st.frozensets(st.text(max_size=20), max_size=5),
       in_flight=st.integers(-5, 50), last_hour=st.integers(-5, 500),
       prefixes=st.lists(st.text(max_size=4), max_size=3))
def test_random_destinations_only_refuse_or_pass(
    destination: str, bound: frozenset[str], in_flight: int, last_hour: int, prefixes: list[str]
) -> None:
    limits = OriginateLimits(max_concurrent=10, max_per_hour=200, allowed_prefixes=tuple(prefixes))
    for bound_set in (bound, bound | {destination}):
        result = check_destination(destination, bound=bound_set, limits=limits, in_flight=in_flight,
                                   last_hour=last_hour)
        assert result is None or isinstance(result, Refusal)
        if result is None:  # a pass is only ever a well-formed, bound destination within the caps
            assert destination in bound_set
            assert destination_kind(destination) is not None
            assert in_flight < 10
            assert last_hour < 200


def test_destination_kind_never_raises_on_non_strings() -> None:
    assert destination_kind(None) is None
    assert destination_kind(79001234567) is None
    assert destination_kind(b"+79001234567") is None
