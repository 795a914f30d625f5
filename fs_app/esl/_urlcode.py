"""FreeSWITCH's URL encoding (``switch_url_encode_opt``) and its lenient inverse.

FreeSWITCH percent-encodes every byte outside 0x20-0x7E and every character of
``SWITCH_URL_UNSAFE`` with uppercase hex, passes an existing ``%XX`` (two uppercase
hex digits) through unchanged, and writes an empty value as ``_undef_``.
Decoding works on bytes and replaces invalid UTF-8, because phones put arbitrary
bytes into SIP headers that end up in channel variables.
"""

from __future__ import annotations

import codecs
import re
from urllib.parse import unquote_to_bytes

_UNSAFE = frozenset(b'\r\n #%&+:;<=>?@[\\]^`{|}"')
_HEX_UPPER = frozenset(b"0123456789ABCDEF")
_ENCODED_BYTE = tuple(
    chr(b) if (0x20 <= b <= 0x7E and b not in _UNSAFE) else f"%{b:02X}" for b in range(256)
)
_NEEDS_ENCODING = re.compile(r'[^\x20-\x7e]|[\r\n #%&+:;<=>?@\[\\\]^`{|}"]')

UNDEF = "_undef_"

_escape_decode = codecs.unicode_escape_decode


def url_encode(value: str | bytes) -> str:
    """Encode ``value`` exactly as FreeSWITCH serialises an event header value."""
    if isinstance(value, str):
        if not value:
            return UNDEF
        if _NEEDS_ENCODING.search(value) is None:
            return value
        raw = value.encode("utf-8", "surrogateescape")
    else:
        if not value:
            return UNDEF
        raw = value
    out: list[str] = []
    i = 0
    n = len(raw)
    while i < n:
        b = raw[i]
        if b == 0x25 and i + 2 < n and raw[i + 1] in _HEX_UPPER and raw[i + 2] in _HEX_UPPER:
            # FreeSWITCH does not double-encode an existing %XX (uppercase only).
            out.append("%")
        else:
            out.append(_ENCODED_BYTE[b])
        i += 1
    return "".join(out)


def url_decode(value: str) -> str:
    """Decode a FreeSWITCH header value; never raises, invalid UTF-8 is replaced.

    Equal to ``unquote_to_bytes(value).decode("utf-8", "replace")``: ``%XX`` (either
    case) becomes byte XX, anything else stays as it is, including a ``%`` that does
    not start a valid escape. Plain event values are ASCII (FreeSWITCH escapes every
    other byte), so the fast path rewrites ``%XX`` as ``\\xXX`` and lets the C
    ``unicode_escape`` codec do the work, about three times faster than unquoting.
    """
    if "%" not in value:
        return value
    if value.isascii():
        try:
            text: str = _escape_decode(value.replace("\\", "\\\\").replace("%", "\\x"))[0]
        except UnicodeDecodeError:
            pass  # a "%" without two hex digits after it: keep it, the slow way
        else:
            return text if text.isascii() else text.encode("latin-1").decode("utf-8", "replace")
    return unquote_to_bytes(value.encode("utf-8", "surrogatepass")).decode("utf-8", "replace")
