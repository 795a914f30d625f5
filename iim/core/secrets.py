"""Secrets by reference: ``env:NAME`` or ``file:/path``, never values in settings or rows."""

from __future__ import annotations

import os

__all__ = ["resolve_secret"]


def resolve_secret(ref: str, *, default: str | None = None) -> str:
    """Resolve a ``credential_ref`` (``env:NAME`` or ``file:/path``); the value is never logged."""
    scheme, _, where = ref.partition(":")
    if scheme == "env":
        value = os.environ.get(where)
    elif scheme == "file":
        try:
            with open(where, encoding="utf-8") as fh:
                value = fh.read().strip()
        except OSError:
            value = None
    else:
        raise ValueError(f"unsupported credential reference scheme {scheme!r} (use env: or file:)")
    if value is None:
        if default is None:
            raise LookupError(f"credential reference {ref!r} does not resolve")
        return default
    return value
