"""Tokens at rest: sealed with AES-256-GCM, each bound to where it lives (tenant, row, column).

One key for the process, given by reference (``IIM_LINK_TOKEN_KEY_REF``: 32 bytes as 64 hex digits or base64).
A stop-gap behind one small interface (:class:`Sealer`): the per-tenant envelope encryption of the ``crypto``
work (data keys wrapped by a master key) replaces :class:`AesGcmSealer` without touching its callers. A sealed
value copied into another row, column or tenant does not open (the tag covers the place).
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Protocol
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from iim.core.envelope import CipherError, key_from_secret

__all__ = ["AesGcmSealer", "SealError", "Sealer"]

_NONCE = 12
_KEY = 32


class SealError(ValueError):
    """A sealed value that does not open here (wrong key or place, tampered), or a malformed key."""


class Sealer(Protocol):
    """Seal and open one secret field of one row."""

    def seal(self, tenant: UUID, row: UUID, column: str, plaintext: str) -> str: ...

    def open(self, tenant: UUID, row: UUID, column: str, sealed: str) -> str: ...


def _aad(tenant: UUID, row: UUID, column: str) -> bytes:
    return f"iim.link.v1\x1f{tenant}\x1f{row}\x1f{column}".encode()


class AesGcmSealer:
    """``base64(nonce(12) || ciphertext || tag(16))`` under one AES-256 key."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != _KEY:
            raise SealError("the token key must be 32 bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "AesGcmSealer(key='***')"

    @classmethod
    def from_secret(cls, text: str) -> AesGcmSealer:
        """A key given as 64 hex digits or as base64 of 32 bytes."""
        try:
            return cls(key_from_secret(text, "the token key"))
        except CipherError as exc:
            raise SealError(str(exc)) from None

    def seal(self, tenant: UUID, row: UUID, column: str, plaintext: str) -> str:
        nonce = os.urandom(_NONCE)
        sealed = nonce + self._aead.encrypt(nonce, plaintext.encode(), _aad(tenant, row, column))
        return base64.b64encode(sealed).decode()

    def open(self, tenant: UUID, row: UUID, column: str, sealed: str) -> str:
        try:
            raw = base64.b64decode(sealed, validate=True)
        except (binascii.Error, ValueError):
            raise SealError("not a sealed value") from None
        if len(raw) < _NONCE + 16:
            raise SealError("sealed value too short")
        try:
            return self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], _aad(tenant, row, column)).decode()
        except (InvalidTag, UnicodeDecodeError):
            raise SealError("the sealed value does not open with this key in this place") from None
