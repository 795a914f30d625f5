"""Parse FreeSWITCH dial strings: ``<e=1>{a=1,b=2}[x=1]ep1,[y=2]ep2|ep3:_:ep4``.

* ``{..}`` variables apply to every leg of a branch, ``[..]`` to one leg,
  ``<..>`` to every branch of an enterprise originate;
* ``,`` rings legs simultaneously, ``|`` fails over to the next group sequentially,
  ``:_:`` separates independent enterprise branches (first answer wins);
* inside a variable block, values may be quoted with ``'`` and commas escaped with
  ``\\,``; ``^^X`` at the start of a block switches the separator to ``X``
  (``{^^:a=1:b=2}``), as switch_event_create_brackets allows.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_OPEN = {"{": "}", "[": "]", "<": ">"}


class DialStringError(ValueError):
    """The dial string is not well formed (unbalanced brackets ...)."""


@dataclass(frozen=True, slots=True)
class DialLeg:
    endpoint: str
    vars: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DialBranch:
    vars: Mapping[str, str]
    groups: tuple[tuple[DialLeg, ...], ...]


@dataclass(frozen=True, slots=True)
class DialString:
    enterprise_vars: Mapping[str, str]
    branches: tuple[DialBranch, ...]

    @property
    def vars(self) -> dict[str, str]:
        """Variables of the first branch merged over the enterprise ones."""
        merged = dict(self.enterprise_vars)
        if self.branches:
            merged.update(self.branches[0].vars)
        return merged

    @property
    def legs(self) -> list[DialLeg]:
        return [leg for branch in self.branches for group in branch.groups for leg in group]

    @property
    def simultaneous(self) -> bool:
        return len(self.branches) > 1 or any(len(g) > 1 for b in self.branches for g in b.groups)

    def leg_var(self, leg: DialLeg, name: str) -> str | None:
        """A variable as the leg sees it: ``[..]`` over ``{..}`` over ``<..>``."""
        if name in leg.vars:
            return leg.vars[name]
        for branch in self.branches:
            if any(leg in group for group in branch.groups):
                if name in branch.vars:
                    return branch.vars[name]
                break
        return self.enterprise_vars.get(name)


@functools.lru_cache(maxsize=16)
def _marks(sep: str) -> re.Pattern[str]:
    """What the splitter must look at: escapes, quotes, brackets, ``sep``; everything between is copied."""
    return re.compile(r"\\.|['{}\[\]<>]|" + re.escape(sep), re.DOTALL)


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets/quotes, honouring backslash escapes.

    Jumps from mark to mark (a per-character loop was the emulator's hottest code under load)."""
    parts: list[str] = []
    depth: list[str] = []
    quote = False
    start = 0
    for match in _marks(sep).finditer(text):
        mark = match.group()
        if len(mark) == 2 and mark[0] == "\\":
            continue
        if mark == "'":
            quote = not quote
        elif not quote:
            if mark in _OPEN:
                depth.append(_OPEN[mark])
            elif depth and mark == depth[-1]:
                depth.pop()
            elif not depth and mark == sep:
                parts.append(text[start:match.start()])
                start = match.end()
    if depth:
        raise DialStringError(f"unbalanced brackets in dial string {text!r}")
    parts.append(text[start:])
    return parts


def parse_vars(block: str) -> dict[str, str]:
    """``a=1,b='x,y',c=d\\,e`` -> ``{"a": "1", "b": "x,y", "c": "d,e"}``."""
    sep = ","
    if block.startswith("^^") and len(block) > 2:
        sep = block[2]
        block = block[3:]
    out: dict[str, str] = {}
    for item in _split_top(block, sep):
        item = item.strip()
        if not item:
            continue
        name, eq, value = item.partition("=")
        if not eq:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        out[name.strip()] = value.replace("\\,", ",").replace("\\" + sep, sep)
    return out


def _take_block(text: str, opener: str) -> tuple[dict[str, str], str]:
    """Strip leading ``opener..closer`` variable blocks (there may be several)."""
    closer = _OPEN[opener]
    merged: dict[str, str] = {}
    text = text.lstrip()
    while text.startswith(opener):
        end = _find_close(text, opener, closer)
        merged.update(parse_vars(text[1:end]))
        text = text[end + 1 :].lstrip()
    return merged, text


def _find_close(text: str, opener: str, closer: str) -> int:
    depth = 0
    quote = False
    for match in _marks(closer).finditer(text):  # brackets and quotes are marks whatever the separator
        mark = match.group()
        if mark == "'":
            quote = not quote
        elif not quote:
            if mark == opener:
                depth += 1
            elif mark == closer:
                depth -= 1
                if depth == 0:
                    return match.start()
    raise DialStringError(f"unterminated {opener}..{closer} block in {text!r}")


@functools.lru_cache(maxsize=4096)
def parse_dialstring(text: str) -> DialString:
    """Parse a bridge/originate dial string into branches, groups and legs (cached: results are shared)."""
    text = text.strip()
    if not text:
        raise DialStringError("empty dial string")
    enterprise_vars, rest = _take_block(text, "<")
    branches: list[DialBranch] = []
    for branch_text in _split_top(rest, ":_:"):
        branch_vars, body = _take_block(branch_text, "{")
        groups: list[tuple[DialLeg, ...]] = []
        for group_text in _split_top(body, "|"):
            legs: list[DialLeg] = []
            for leg_text in _split_top(group_text, ","):
                leg_vars, endpoint = _take_block(leg_text, "[")
                endpoint = endpoint.strip()
                if endpoint:
                    legs.append(DialLeg(endpoint, leg_vars))
            if legs:
                groups.append(tuple(legs))
        if groups:
            branches.append(DialBranch(branch_vars, tuple(groups)))
    if not branches:
        raise DialStringError(f"no endpoint in dial string {text!r}")
    return DialString(enterprise_vars, tuple(branches))
