"""Strict JSON for untrusted device bodies: one meaning per document, or a refusal.

The stdlib parser is permissive where that hurts a signed-webhook receiver: duplicate keys silently keep
the last value (two readers of the same bytes can disagree on ``event_id``), ``NaN``/``Infinity`` and
``1e999`` produce non-finite floats, lone ``\\ud800`` escapes yield strings PostgreSQL ``jsonb`` refuses,
and deep nesting ends in ``RecursionError``. :func:`loads` refuses all of these and raises nothing but
:class:`BadJson` for any input bytes.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["BadJson", "canonical_json", "loads"]

#: A JSON string token (possibly unterminated: the parser rejects that later) or a bracket. The string part
#: is the "unrolled loop" form (normal* (escape normal*)*): linear time, no catastrophic backtracking.
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)
#: An escape that may produce a surrogate; only then is the parsed tree searched for lone ones.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
#: Keys shown in error messages only when they look like identifiers (no log injection, no PII echo).
_PRINTABLE_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class BadJson(ValueError):
    """The body is not one unambiguous JSON document; ``reason`` says why without echoing the input."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                shown = f" {key!r}" if _PRINTABLE_KEY.fullmatch(key) else ""
                raise BadJson(f"duplicate object key{shown}")
            seen.add(key)
    return obj


def _refuse_constant(name: str) -> Any:
    raise BadJson(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadJson("number out of range")
    return value


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant,
                            parse_float=_finite_float, strict=True)


def _check_depth(text: str, max_depth: int) -> None:
    """Refuse deep nesting before the recursive parser sees it (brackets inside strings do not count)."""
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        lexeme = match.group()
        if lexeme in "[{":
            depth += 1
            if depth > max_depth:
                raise BadJson(f"nesting deeper than {max_depth}")
        elif lexeme in "]}":
            depth -= 1


def _has_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def loads(raw: bytes, *, max_depth: int = 16) -> Any:
    """Parse ``raw`` as strict UTF-8 JSON (RFC 8259 plus I-JSON's rules); raise :class:`BadJson` otherwise.

    Refused: invalid UTF-8 (a BOM too), duplicate object keys at any depth, ``NaN``/``Infinity``, numbers
    that overflow a float, lone surrogate escapes, more than ``max_depth`` nested objects/arrays, trailing data.
    """
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJson(f"invalid UTF-8 at byte {exc.start}") from None
    if text.startswith("\ufeff"):
        raise BadJson("byte order mark before JSON")
    _check_depth(text, max_depth)
    try:
        value = _DECODER.decode(text)
    except BadJson:
        raise
    except json.JSONDecodeError as exc:
        raise BadJson(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError:
        # int() beyond sys.get_int_max_str_digits, for one.
        raise BadJson("number out of range") from None
    except RecursionError:
        raise BadJson("nesting too deep") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise BadJson("lone UTF-16 surrogate in a string")
    return value


def canonical_json(value: Any) -> bytes:
    """Compact, key-sorted, ASCII serialisation: the same value always gives the same bytes (fingerprints)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
