"""Numbers people dial or type, to E.164 under a tenant's numbering plan (iim.core.numbering)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iim.core.numbering import DEFAULT_PLAN, E164, NotANumber, NumberingPlan, PlanError, to_e164, try_e164

UK = NumberingPlan("44", "0", ("00",), (9, 10))
GERMANY = NumberingPlan("49", "0", ("00",), (6, 7, 8, 9, 10, 11))
NANP = NumberingPlan("1", "1", ("011",), (10,))
PLANS = (DEFAULT_PLAN, UK, GERMANY, NANP)


@pytest.mark.parametrize("typed", [
    "+79001234567", "+7 900 123-45-67", "+7 (900) 123-45-67", "8 900 1234567", "89001234567", "8-900-123-45-67",
    "0079001234567", "810 7 900 123 45 67", "79001234567", "900 123 45 67", " 89001234567 ",
])
def test_every_russian_form_of_a_mobile_number_is_the_same_e164(typed: str) -> None:
    assert to_e164(typed, DEFAULT_PLAN) == "+79001234567"


@pytest.mark.parametrize(("typed", "plan", "e164"), [
    ("020 7946 0018", UK, "+442079460018"),
    ("07700 900123", UK, "+447700900123"),
    ("0044 20 7946 0018", UK, "+442079460018"),
    ("00 7 900 123 45 67", UK, "+79001234567"),
    ("030 1234567", GERMANY, "+49301234567"),
    ("0049 30 1234567", GERMANY, "+49301234567"),
    ("1 212 555 0100", NANP, "+12125550100"),
    ("212-555-0100", NANP, "+12125550100"),
    ("011 7 900 123 45 67", NANP, "+79001234567"),
    ("810 44 20 7946 0018", DEFAULT_PLAN, "+442079460018"),
    ("8 812 123-45-67", DEFAULT_PLAN, "+78121234567"),
    ("812 123 45 67", DEFAULT_PLAN, "+78121234567"),  # a bare St Petersburg number starts with the trunk digit
])
def test_national_and_international_forms_follow_the_plan(typed: str, plan: NumberingPlan, e164: str) -> None:
    assert to_e164(typed, plan) == e164


@pytest.mark.parametrize(("typed", "plan", "why"), [
    ("12345", DEFAULT_PLAN, "not a number under the plan"),
    ("+7900123", DEFAULT_PLAN, "10 digits after the country code"),
    ("8 900 123", DEFAULT_PLAN, "not a number under the plan"),
    ("8 900 1234567", UK, "not a number under the plan"),  # a Russian national number means nothing in the UK
    ("+0123456789", DEFAULT_PLAN, "no leading 0"),
    ("81012345678", DEFAULT_PLAN, "ambiguous"),  # 810 1 2345678 abroad, or 8 101 234-56-78 at home?
    ("8900123456x", DEFAULT_PLAN, "not a phone number"),
    ("+7 900 +123", DEFAULT_PLAN, "not a phone number"),
    ("", DEFAULT_PLAN, "not a phone number"),
    ("9" * 41, DEFAULT_PLAN, "not a phone number"),
    ("0", UK, "not a number under the plan"),
])
def test_what_is_not_a_number_under_the_plan_is_a_clear_error(typed: str, plan: NumberingPlan, why: str) -> None:
    with pytest.raises(NotANumber, match=why) as caught:
        to_e164(typed, plan)
    assert len(typed.strip()) < 5 or typed.strip() not in caught.value.reason  # the input is never echoed back
    assert try_e164(typed, plan) is None


@pytest.mark.parametrize("plan", [
    {"country_code": "07"}, {"country_code": "7", "trunk_prefix": "00"}, {"country_code": "7", "national_lengths": ()},
    {"country_code": "7", "international_prefixes": ()}, {"country_code": "7", "national_lengths": (15,)},
    {"country_code": "7", "international_prefixes": ("8",)},
])
def test_a_plan_that_cannot_be_applied_is_refused(plan: dict[str, object]) -> None:
    with pytest.raises(PlanError):
        NumberingPlan(**plan)  # type: ignore[arg-type]


def _nsn(plan: NumberingPlan) -> st.SearchStrategy[str]:
    return st.sampled_from(plan.national_lengths).flatmap(
        lambda n: st.from_regex(rf"[1-9][0-9]{{{n - 1}}}", fullmatch=True))


@st.composite
def _plan_and_nsn(draw: st.DrawFn) -> tuple[NumberingPlan, str]:
    plan = draw(st.sampled_from(PLANS))
    return plan, draw(_nsn(plan))


@given(_plan_and_nsn(), st.sampled_from(["", " ", "-", "(", ")"]))
def test_a_number_in_its_national_form_is_its_e164_form_or_refused_never_another_number(
        case: tuple[NumberingPlan, str], sep: str) -> None:
    plan, nsn = case
    e164 = "+" + plan.country_code + nsn
    assert to_e164(e164, plan) == e164
    assert to_e164(f"+{plan.country_code}{sep}{nsn}", plan) == e164
    forms = [plan.trunk_prefix + sep + nsn, plan.country_code + nsn, nsn,
             *(p + sep + plan.country_code + nsn for p in plan.international_prefixes)]
    for form in forms:
        assert try_e164(form, plan) in (e164, None), form


@given(st.sampled_from(PLANS), st.text(max_size=50))
def test_any_input_is_an_e164_number_or_a_not_a_number_error(plan: NumberingPlan, text: str) -> None:
    try:
        result = to_e164(text, plan)
    except NotANumber:
        return
    assert E164.fullmatch(result)


@given(_nsn(DEFAULT_PLAN))
def test_the_trunk_form_of_a_russian_number_is_never_ambiguous(nsn: str) -> None:
    if nsn.startswith("10"):
        return  # 8 10...: also 810 + a foreign number (no Russian area code starts with 1)
    assert to_e164("8" + nsn) == to_e164("+7" + nsn) == "+7" + nsn


@given(st.sampled_from(PLANS), st.from_regex(r"[0-9]{1,22}", fullmatch=True))
def test_the_call_paths_short_way_for_plain_digits_agrees_with_the_full_reading(plan: NumberingPlan,
                                                                              digits: str) -> None:
    try:
        expected: str | None = to_e164(digits, plan)
    except NotANumber:
        expected = None
    assert try_e164(digits, plan) == expected
