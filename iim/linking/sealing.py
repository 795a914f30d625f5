"""Link secrets at rest (tokens, PKCE code verifiers): sealed under the tenant's data key, like every other
secret IIM keeps (:mod:`iim.core.envelope`: AES-256-GCM, associated data = tenant, table, row, column; the data
key wrapped by the master key). A sealed value copied into another row, column or tenant does not open.

:class:`AesGcmSealer` is the *old* format (one process-wide key, ``IIM_LINK_TOKEN_KEY_REF``), kept only to open
rows written before the envelope, so they can be re-sealed under it (:mod:`iim.linking.resealing`).
"""

from __future__ import annotations

import base64
import binascii
import os
from typing import Protocol
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from iim.core.envelope import CipherError, DataKey, key_from_secret
from iim.keys.keyring import Keyring, KeyUnavailable
from iim.linking.store import Sealed
from policy_cache.db import Connection

__all__ = ["AesGcmSealer", "SealError", "Sealer", "open_secret", "seal_secret"]

_NONCE = 12
_KEY = 32


class SealError(ValueError):
    """A sealed value that does not open here (wrong key or place, tampered), or a malformed key."""


class Sealer(Protocol):
    """Seal and open one secret field of one row (the old format's interface)."""

    def seal(self, tenant: UUID, row: UUID, column: str, plaintext: str) -> str: ...

    def open(self, tenant: UUID, row: UUID, column: str, sealed: str) -> str: ...


def _aad(tenant: UUID, row: UUID, column: str) -> bytes:
    return f"iim.link.v1\x1f{tenant}\x1f{row}\x1f{column}".encode()


class AesGcmSealer:
    """The old format: ``base64(nonce(12) || ciphertext || tag(16))`` under one AES-256 key."""

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


def seal_secret(key: DataKey, table: str, row: UUID, column: str, plaintext: str) -> Sealed:
    """``plaintext`` sealed for ``table.column`` of ``row`` under the tenant's data ``key``."""
    return Sealed(key.seal(table, str(row), column, plaintext), key.key_id)


async def open_secret(conn: Connection, keyring: Keyring, tenant: UUID, table: str, row: UUID, column: str,
                      value: Sealed, legacy: Sealer | None = None) -> str:
    """The plaintext of a sealed link secret, in ``tenant``'s transaction ``conn``: with the data key named
    beside it, or, for a value in the old format, with ``legacy``. :class:`SealError` when it does not open
    (wrong place, unknown key, no old key given)."""
    if value.key_id is None:
        if legacy is None:
            raise SealError("sealed in the old format, and the old link token key (IIM_LINK_TOKEN_KEY_REF) "
                            "is not given")
        return legacy.open(tenant, row, column, value.text)
    try:
        key = await keyring.key(conn, tenant, value.key_id)
        return key.open(table, str(row), column, value.text)
    except (KeyUnavailable, CipherError) as exc:
        raise SealError(str(exc)) from None
