"""The anti-toll-fraud guard (pure): shape, binding, the numbering plan and special ranges, the caps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fs_app.outreach.guard import (
    OriginateLimits,
    Refusal,
    Wait,
    check_caps,
    check_destination,
    destination_kind,
    limits_from,
    normalised_destination,
    number_refusal,
    parse_special_ranges,
    special_range_of,
    special_ranges,
)
from iim.core.numbering import NumberingPlan

MOBILE = "+79001234567"
SPEAKER = "sip:speaker-1@iim.local"
BOUND = frozenset({MOBILE, SPEAKER, "+4915112345678"})
RU_ONLY = OriginateLimits(max_concurrent=2, max_per_hour=5, country_codes=("+7",))


def check(destination: str, *, limits: OriginateLimits = RU_ONLY, in_flight: int = 0,
          last_hour: int = 0, bound: frozenset[str] = BOUND) -> str | None:
    verdict = check_destination(destination, bound=bound, limits=limits, in_flight=in_flight, last_hour=last_hour)
    if isinstance(verdict, Wait):
        return f"wait:{verdict.reason}"
    return verdict.reason if verdict else None


@pytest.mark.parametrize(("destination", "kwargs", "expected"), [
    (MOBILE, {}, None),
    (SPEAKER, {}, None),  # the plan restricts numbers only
    ("+4915112345678", {}, "outside_plan"),
    ("+4915112345678", {"limits": OriginateLimits(country_codes=())}, "outside_plan"),  # no plan: nothing
    ("+4915112345678", {"limits": OriginateLimits(allowed=("+49151",))}, None),  # the allow-list extends it
    ("+79007654321", {}, "destination_not_bound"),
    ("sip:speaker-2@iim.local", {}, "destination_not_bound"),
    ("sip:SPEAKER-1@iim.local", {}, "destination_not_bound"),  # exact match only
    ("79001234567", {}, None),  # no +: E.164 without it, read under the tenant's numbering plan
    ("89001234567", {}, None),  # the national form of MOBILE
    ("8 900 123", {}, "malformed_destination"),  # no number under the plan
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
    (MOBILE, {"in_flight": 2}, "wait:concurrent_cap"),  # a cap makes the call wait, not fail
    (MOBILE, {"in_flight": 1}, None),
    (MOBILE, {"last_hour": 5}, "wait:hourly_cap"),
    (MOBILE, {"last_hour": 4}, None),
    (MOBILE, {"in_flight": 9, "last_hour": 99}, "wait:concurrent_cap"),
    ("+79007654321", {"in_flight": 9}, "destination_not_bound"),  # the most specific reason first
    (MOBILE, {"limits": OriginateLimits(max_concurrent=0)}, "concurrent_cap"),  # no place will ever free
    (MOBILE, {"limits": OriginateLimits(max_per_hour=0)}, "hourly_cap"),
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
def test_random_destinations_only_refuse_wait_or_pass(
    destination: str, bound: frozenset[str], in_flight: int, last_hour: int, prefixes: list[str]
) -> None:
    limits = OriginateLimits(max_concurrent=10, max_per_hour=200, allowed=tuple(prefixes))
    for bound_set in (bound, bound | {destination}):
        result = check_destination(destination, bound=bound_set, limits=limits, in_flight=in_flight,
                                   last_hour=last_hour)
        assert result is None or isinstance(result, Refusal | Wait)
        if result is None:  # a pass is only ever a well-formed, bound destination within the caps
            assert destination in bound_set
            assert destination_kind(destination) is not None
            assert in_flight < 10
            assert last_hour < 200
            # ... and a number the plan or the allow-list admits, never a special range by a short entry
            if destination.startswith("+"):
                special = special_range_of(destination)
                assert special is None or any(destination.startswith(a) and special.matches(a) for a in prefixes)
        if isinstance(result, Wait):
            assert 0 < result.retry_after_s <= 30


def test_destination_kind_never_raises_on_non_strings() -> None:
    assert destination_kind(None) is None
    assert destination_kind(79001234567) is None
    assert destination_kind(b"+79001234567") is None


# -- the numbering plan and special ranges (issue 14, item 7) ---------------------------------------------

RU = OriginateLimits(country_codes=("+7",))


@pytest.mark.parametrize(("number", "limits", "expected"), [
    ("+79031234567", RU, None),  # a Russian mobile: the plan
    ("+78091234567", RU, "special_range"),  # Russian premium rate: never by the plan
    ("+78031234567", RU, "special_range"),
    ("+78091234567", OriginateLimits(allowed=("+7",)), "special_range"),  # nor by a broad allow-list entry
    ("+78091234567", OriginateLimits(allowed=("+780",)), "special_range"),  # shorter than the range
    ("+78091234567", OriginateLimits(allowed=("+7809",)), None),  # the range itself allowed
    ("+78091234567", OriginateLimits(allowed=("+78091234567",)), None),  # that one number allowed
    ("+78091234568", OriginateLimits(allowed=("+78091234567",)), "special_range"),  # ... not its neighbour
    ("+77011234567", RU, "special_range"),  # Kazakhstan shares +7
    ("+19005551234", OriginateLimits(country_codes=("+1",)), "special_range"),  # NANP premium
    ("+12129761234", OriginateLimits(country_codes=("+1",)), "special_range"),  # a 976 exchange
    ("+12125551234", OriginateLimits(country_codes=("+1",)), None),
    ("+18761234567", OriginateLimits(country_codes=("+1",)), "special_range"),  # Jamaica inside +1
    ("+19005551234", RU, "special_range"),  # special before "outside the plan": the sharper reason
    ("+882161234567", RU, "special_range"),  # Thuraya
    ("+882161234567", OriginateLimits(allowed=("+88216",)), None),
    ("+8707612345678", RU, "special_range"),  # Inmarsat
    ("+881612345678", RU, "special_range"),  # Iridium
    ("+4915112345678", RU, "outside_plan"),
    ("+4915112345678", OriginateLimits(country_codes=("+7", "+49")), None),
    ("+4990012345678", OriginateLimits(country_codes=("+49",)), "special_range"),  # German 0900
    ("+79031234567", OriginateLimits(country_codes=("+79",)), None),  # a national prefix as the plan
    ("+74951234567", OriginateLimits(country_codes=("+79",)), "outside_plan"),
])
def test_the_plan_admits_its_countries_and_never_a_special_range_unless_allowed_inside_it(
    number: str, limits: OriginateLimits, expected: str | None
) -> None:
    refusal = number_refusal(number, limits)
    assert (refusal.reason if refusal else None) == expected


def test_a_refusal_names_the_special_range_it_fell_in() -> None:
    refusal = number_refusal("+78091234567", RU)
    assert refusal is not None
    assert "+7809" in refusal.detail
    assert "premium" in refusal.detail


def test_the_shipped_ranges_hold_the_itu_and_national_premium_ranges() -> None:
    prefixes = {r.prefix for r in special_ranges()}
    assert {"+7809", "+7803", "+1900", "+870", "+881", "+882", "+883", "+979"} <= prefixes
    assert len(prefixes) == len(special_ranges())  # no range listed twice


def test_special_ranges_file_format_is_checked() -> None:
    assert parse_special_ranges(["# c", "", "+1XXX976\tpremium\tNANP 976"])[0].matches("+12129761234")
    with pytest.raises(ValueError, match="line 1"):
        parse_special_ranges(["+7809 premium no tabs"])
    with pytest.raises(ValueError):
        parse_special_ranges(["7809\tpremium\tno plus"])


def test_limits_from_a_row_keep_the_defaults_for_what_it_leaves_unset() -> None:
    defaults = OriginateLimits(max_concurrent=3, max_per_hour=7, country_codes=("+49",), max_wait_s=5)
    assert limits_from(None, defaults) == defaults
    merged = limits_from((None, None, None, ("+7809",)), defaults)
    assert (merged.max_concurrent, merged.country_codes, merged.allowed, merged.max_wait_s) == (
        3, ("+49",), ("+7809",), 5)
    assert limits_from((1, 2, (), ()), defaults).country_codes == ()  # an empty plan is not "unset"


# -- the caps: wait, then refuse --------------------------------------------------------------------------

def test_a_cap_reached_asks_to_wait_a_short_growing_while_then_refuses_after_max_wait() -> None:
    limits = OriginateLimits(max_concurrent=1, max_per_hour=100, max_wait_s=60)
    first = check_caps(limits, in_flight=1, last_hour=1)
    assert isinstance(first, Wait)
    assert first.reason == "concurrent_cap"
    assert 0.5 <= first.retry_after_s <= 1.0
    later = check_caps(limits, in_flight=1, last_hour=1, waited_s=40)
    assert isinstance(later, Wait)
    assert 2.5 <= later.retry_after_s <= 5.0
    near_the_end = check_caps(limits, in_flight=1, last_hour=1, waited_s=59.5)
    assert isinstance(near_the_end, Wait)
    assert near_the_end.retry_after_s <= 0.5
    expired = check_caps(limits, in_flight=1, last_hour=1, waited_s=60)
    assert isinstance(expired, Refusal)
    assert expired.reason == "concurrent_cap"
    assert "waited 60 s" in expired.detail
    hourly = check_caps(limits, in_flight=0, last_hour=100, waited_s=200)
    assert isinstance(hourly, Refusal)  # 200 s > max_wait_s
    assert check_caps(limits, in_flight=0, last_hour=99) is None


UK_NUMBERING = NumberingPlan("44", "0", ("00",), (9, 10))


@pytest.mark.parametrize("national", ["88091234567", "8 809 123-45-67", "81078091234567", "0078091234567"])
def test_a_premium_number_in_national_form_is_refused_like_its_e164_form(national: str) -> None:
    """Issue 15 item 4: the plan and premium checks saw only E.164, so 8 809 ... was not judged as +7 809 ..."""
    bound = frozenset({"+78091234567"})
    assert check(national, bound=bound) == check("+78091234567", bound=bound) == "special_range"
    assert number_refusal(national, RU_ONLY) == number_refusal("+78091234567", RU_ONLY)
    allowed = OriginateLimits(country_codes=("+7",), allowed=("+7809",))
    assert check(national, bound=bound, limits=allowed) is None


def test_national_forms_are_read_under_the_tenants_own_numbering_plan() -> None:
    uk = OriginateLimits(country_codes=("+44",), numbering=UK_NUMBERING)
    assert normalised_destination("09012345678", uk) == "+449012345678"
    assert check("09012345678", limits=uk, bound=frozenset({"+449012345678"})) == "special_range"  # UK premium
    assert check("020 7946 0018", limits=uk, bound=frozenset({"+442079460018"})) is None
    assert check("89001234567", limits=uk) == "malformed_destination"  # a Russian national form means nothing
    assert normalised_destination(SPEAKER, uk) == SPEAKER
    assert limits_from(None, RU_ONLY, UK_NUMBERING).numbering == UK_NUMBERING
    assert limits_from((1, 2, None, ()), RU_ONLY, UK_NUMBERING).numbering == UK_NUMBERING
    assert limits_from(None, RU_ONLY) is RU_ONLY
