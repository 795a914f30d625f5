"""Bounded decimal parsing for numbers that arrive on the wire."""

from __future__ import annotations

# Wider than any length, level or time FreeSWITCH sends, and far below the
# 4300-digit limit past which int() raises ValueError (CVE-2020-10735).
MAX_DIGITS = 18


def parse_int(text: str, *, signed: bool = False) -> int | None:
    """``int(text)`` for ASCII decimal digits (one leading ``-`` if ``signed``), else None.

    Unlike ``int()``, never raises: no Unicode digits (``"²"``), no whitespace, no
    ``_`` separators, no ``+``, and no more than :data:`MAX_DIGITS` digits.
    """
    digits = text[1:] if signed and text.startswith("-") else text
    if not digits or len(digits) > MAX_DIGITS or not (digits.isascii() and digits.isdigit()):
        return None
    return int(text)
