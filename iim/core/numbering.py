"""Numbering plans: a dialled or typed number to E.164, under the plan of the tenant it belongs to.

Subscribers are stored, indexed and compared in E.164 (``+79001234567``). People and switches use other
forms: the national form with a trunk prefix (``8 900 123-45-67`` in Russia, ``020 7946 0018`` in the UK),
the international prefix instead of ``+`` (``810`` or ``00`` in Russia, ``00`` in the UK and Germany), the
E.164 digits without the plus (what many IMS cores send), and, where it cannot be mistaken, the bare national
significant number (``900 1234567``). Which forms mean what is a property of the country, so it is data: one
:class:`NumberingPlan` per tenant (``iim.numbering_plan``, migration 0024; none: :data:`DEFAULT_PLAN`, Russia).

Pure and total: :func:`to_e164` returns an E.164 string or raises :class:`NotANumber` (a ``ValueError`` whose
``reason`` is safe to show: it never echoes more than a short prefix of the input). The same function serves
the policy cache (inbound numbers from the switch), the toll-fraud guard (alert-call destinations) and the
admin API (numbers people type), so the three can never disagree about what a number is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "DEFAULT_PLAN", "E164", "NotANumber", "NumberingPlan", "PlanError", "to_e164", "try_e164",
]

#: E.164: ``+``, a country code that does not start with 0, 7 to 15 digits in all (the registry's pattern).
E164 = re.compile(r"\+[1-9][0-9]{6,14}")
#: What a typed number may look like before it is cleaned: digits, one leading ``+``, and the separators
#: people write (blanks, ``-``, ``.``, ``(``, ``)``, ``/``). Longer input is refused before any work.
_TYPED = re.compile(r"\+?[0-9 \t\u00a0().\-/]{1,40}")
_SEPARATORS = str.maketrans("", "", " \t\u00a0().-/")
_MAX_INPUT = 64


class PlanError(ValueError):
    """A plan that cannot be applied consistently (a bad country code, prefixes that overlap ...)."""


class NotANumber(ValueError):
    """The input is not a number under the plan; ``reason`` says why without repeating the input."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class NumberingPlan:
    """How one country's numbers are dialled: the country code, the trunk (national) prefix, the
    international prefixes and the lengths of a national significant number (NSN, the digits after the
    country code). All digits, no ``+``."""

    country_code: str
    trunk_prefix: str = ""
    international_prefixes: tuple[str, ...] = ("00",)
    national_lengths: tuple[int, ...] = (10,)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[1-9][0-9]{0,2}", self.country_code):
            raise PlanError("country code: 1 to 3 digits, not starting with 0")
        if not re.fullmatch(r"[0-9]{0,3}", self.trunk_prefix):
            raise PlanError("trunk prefix: up to 3 digits")
        if not 1 <= len(self.international_prefixes) <= 4 or not all(
                re.fullmatch(r"[0-9]{2,4}", p) for p in self.international_prefixes):
            raise PlanError("international prefixes: 1 to 4 of 2-4 digits each")
        if not self.national_lengths or not all(
                6 <= n <= 15 - len(self.country_code) for n in self.national_lengths):
            raise PlanError(f"national lengths: at least one, each 6 to {15 - len(self.country_code)} digits")
        if self.trunk_prefix and self.trunk_prefix in self.international_prefixes:
            raise PlanError("the trunk prefix cannot also be an international prefix")

    @property
    def max_dialled_digits(self) -> int:
        """The longest dialled form: an international prefix and a 15-digit E.164 number."""
        return max(len(p) for p in self.international_prefixes) + 15

    def describe(self) -> str:
        return (f"+{self.country_code}, trunk {self.trunk_prefix or 'none'}, international "
                f"{'/'.join(self.international_prefixes)}, national numbers of "
                f"{'/'.join(map(str, self.national_lengths))} digits")


#: The plan of a tenant without its own row: Russia (``8`` national, ``810`` or ``00`` international).
DEFAULT_PLAN = NumberingPlan("7", "8", ("810", "00"), (10,))


def _e164_problem(digits: str, plan: NumberingPlan) -> str | None:
    """Why ``+digits`` is not a number under ``plan`` (None: it is)."""
    if not (7 <= len(digits) <= 15 and digits.isdigit() and digits[0] != "0"):  # E164, without a regex
        return "an E.164 number has 7 to 15 digits and no leading 0 after the prefix"
    if digits.startswith(plan.country_code) and len(digits) - len(plan.country_code) not in plan.national_lengths:
        return (f"a +{plan.country_code} number has {'/'.join(map(str, plan.national_lengths))} digits after the "
                f"country code, this one {len(digits) - len(plan.country_code)}")
    return None


def _readings(digits: str, plan: NumberingPlan) -> set[str]:
    """Every E.164 number the digits (no ``+``) can stand for under ``plan``."""
    readings: set[str] = set()
    for prefix in plan.international_prefixes:
        if digits.startswith(prefix) and _e164_problem(digits[len(prefix):], plan) is None:
            readings.add("+" + digits[len(prefix):])
    lengths = plan.national_lengths
    if digits.startswith(plan.country_code):
        cc_nsn = digits[len(plan.country_code):]
        if len(cc_nsn) in lengths and cc_nsn[0] != "0":
            readings.add("+" + digits)
    if len(digits) in lengths and digits[0] != "0":  # a bare national number
        readings.add("+" + plan.country_code + digits)
    trunk = plan.trunk_prefix
    if trunk and digits.startswith(trunk):
        nsn = digits[len(trunk):]
        if len(nsn) in lengths and nsn[0] != "0":
            readings.add("+" + plan.country_code + nsn)
    return readings


def to_e164(number: str, plan: NumberingPlan = DEFAULT_PLAN) -> str:
    """``number`` as E.164 under ``plan``, or :class:`NotANumber`.

    ``+`` and digits is E.164 as written. Other digits are read every way the plan allows: after an
    international prefix; after the trunk prefix (a national number of a plan length); the country code and
    a national number (E.164 without ``+``); a bare national number. Numbers in the plan's own country must
    have a plan length, foreign ones only E.164's. Exactly one reading is the answer; none is an error, and
    so are two (``81012345678`` in Russia: ``+12345678`` or ``+71012345678``?): a number is never guessed.
    """
    if len(number) > _MAX_INPUT or not _TYPED.fullmatch(number.strip()):
        raise NotANumber("not a phone number: digits, a leading +, blanks and - . ( ) / only, at most 40")
    digits = number.strip().translate(_SEPARATORS)
    if digits.startswith("+"):
        problem = _e164_problem(digits[1:], plan)
        if problem is not None:
            raise NotANumber(f"international number: {problem}")
        return digits
    if not digits:
        raise NotANumber("no digits")
    readings = _readings(digits, plan)
    if len(readings) == 1:
        return readings.pop()
    if readings:
        raise NotANumber(f"ambiguous under the plan ({plan.describe()}): write it with +")
    problems = [f"after the international prefix {p}: {_e164_problem(digits[len(p):], plan)}"
                for p in plan.international_prefixes if digits.startswith(p)]
    if len(problems) == 1:
        raise NotANumber(problems[0])
    raise NotANumber(f"not a number under the plan ({plan.describe()})")


def try_e164(number: str, plan: NumberingPlan = DEFAULT_PLAN) -> str | None:
    """:func:`to_e164`, or None where it raises: for the call path, where an odd number is just unknown.
    Plain digits (what a switch sends) take a short way: no cleaning, no messages."""
    if number.isdigit() and number.isascii() and len(number) <= _MAX_INPUT:
        readings = _readings(number, plan)
        return readings.pop() if len(readings) == 1 else None
    try:
        return to_e164(number, plan)
    except NotANumber:
        return None
