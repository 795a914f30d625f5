"""Keyset page cursors of the list APIs: opaque to clients, a row's sort time and id (newest first).

One codec for every list (incidents, hub commands): a cursor is refused the same way wherever it came from.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime

__all__ = ["decode_cursor", "encode_cursor"]

_REFUSED = "not a cursor this API gave"


def encode_cursor(at: datetime, ident: str) -> str:
    """The cursor after the row sorted at ``at`` with id ``ident``."""
    return base64.urlsafe_b64encode(f"{at.isoformat()}|{ident}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The time and id a cursor holds. Raises ValueError for anything :func:`encode_cursor` did not make (the
    caller checks the id's own form)."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        when, sep, ident = text.partition("|")
        at = datetime.fromisoformat(when) if sep else None
    except (binascii.Error, UnicodeDecodeError, ValueError):
        at = None
    if at is None or at.tzinfo is None:
        raise ValueError(_REFUSED)
    return at, ident
