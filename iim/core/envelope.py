"""Envelope encryption of fields: pure AES-256-GCM, no I/O.

A tenant's *data key* seals its sensitive fields; the data key is stored only *wrapped* (sealed) by the
*master key*, which is given by reference and never stored. Every ciphertext is bound by its associated data
to where it lives -- tenant, table, row, column -- so a ciphertext copied into another row, column or tenant
does not open (GCM's tag fails), and a wrapped key copied to another tenant or key id does not unwrap.

Sealed text is ``base64(nonce(12) || ciphertext || tag(16))``: it fits the text columns the fields already
had. Which data key sealed it is stored beside it (a ``*_key`` column), so during a rotation old and new keys
are both readable.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass, field
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["CipherError", "DataKey", "MasterKey", "field_aad", "key_from_secret", "new_data_key_bytes"]

_NONCE = 12
_KEY = 32


class CipherError(ValueError):
    """A ciphertext that does not open (wrong key, wrong place, tampered) or a malformed key."""


def field_aad(tenant: UUID, table: str, row: str, column: str) -> bytes:
    """The associated data of one field: where it lives (the row is its unique key within the tenant)."""
    for part in (table, row, column):
        if "\x1f" in part:
            raise CipherError("associated data parts must not contain the unit separator")
    return "\x1f".join(("iim.field.v1", str(tenant), table, row, column)).encode()


def _wrap_aad(tenant: UUID, key_id: int) -> bytes:
    return f"iim.data_key.v1\x1f{tenant}\x1f{key_id}".encode()


def new_data_key_bytes() -> bytes:
    """32 random bytes (a fresh AES-256 key)."""
    return os.urandom(_KEY)


def _seal(aead: AESGCM, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE)  # random 96-bit nonces: fine far below 2^32 messages per key (rotate before)
    return nonce + aead.encrypt(nonce, plaintext, aad)


def _open(aead: AESGCM, sealed: bytes, aad: bytes) -> bytes:
    if len(sealed) < _NONCE + 16:
        raise CipherError("ciphertext too short")
    try:
        return aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], aad)
    except InvalidTag:
        raise CipherError("ciphertext does not open with this key in this place") from None


def key_from_secret(secret: str, what: str = "a key") -> bytes:
    """A 256-bit key from its secret text (64 hex digits, or base64 of 32 bytes); CipherError otherwise."""
    text = secret.strip()
    raw: bytes | None = None
    if len(text) == 2 * _KEY:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = None
    if raw is None:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != _KEY:
        raise CipherError(f"{what} is 32 bytes, given as 64 hex digits or base64")
    return raw


@dataclass(frozen=True, slots=True)
class MasterKey:
    """The key that wraps data keys; ``key_id`` is a fingerprint (stored with each wrapped key), not the key."""

    key_id: str
    _aead: AESGCM = field(repr=False)

    @classmethod
    def from_secret(cls, secret: str) -> MasterKey:
        """A master key from its secret text: 32 bytes as 64 hex digits or as base64."""
        return cls.from_bytes(key_from_secret(secret, "a master key"))

    @classmethod
    def from_bytes(cls, raw: bytes) -> MasterKey:
        if len(raw) != _KEY:
            raise CipherError("a master key is 32 bytes")
        key_id = hashlib.sha256(b"iim.master_key.id\x1f" + raw).hexdigest()[:16]
        return cls(key_id, AESGCM(raw))

    def wrap(self, tenant: UUID, key_id: int, data_key: bytes) -> bytes:
        """``data_key`` sealed for storage as tenant ``tenant``'s key ``key_id``."""
        return _seal(self._aead, data_key, _wrap_aad(tenant, key_id))

    def unwrap(self, tenant: UUID, key_id: int, wrapped: bytes) -> DataKey:
        raw = _open(self._aead, wrapped, _wrap_aad(tenant, key_id))
        if len(raw) != _KEY:
            raise CipherError("an unwrapped data key is not 32 bytes")
        return DataKey(tenant, key_id, AESGCM(raw), raw)


@dataclass(frozen=True, slots=True)
class DataKey:
    """One tenant's data key, unwrapped (held in memory only)."""

    tenant: UUID
    key_id: int
    _aead: AESGCM = field(repr=False)
    _raw: bytes = field(repr=False)

    def seal(self, table: str, row: str, column: str, plaintext: str) -> str:
        """``plaintext`` sealed for ``table.column`` of ``row`` in this key's tenant (base64 text)."""
        sealed = _seal(self._aead, plaintext.encode(), field_aad(self.tenant, table, row, column))
        return base64.b64encode(sealed).decode("ascii")

    def open(self, table: str, row: str, column: str, sealed: str) -> str:
        """The plaintext of a field sealed by :meth:`seal` for the same place; :class:`CipherError` otherwise."""
        try:
            raw = base64.b64decode(sealed, validate=True)
        except (binascii.Error, ValueError):
            raise CipherError("sealed field is not base64") from None
        plaintext = _open(self._aead, raw, field_aad(self.tenant, table, row, column))
        try:
            return plaintext.decode()
        except UnicodeDecodeError:
            raise CipherError("sealed field is not UTF-8 text") from None

    def rewrap(self, master: MasterKey) -> bytes:
        """This key wrapped by ``master`` (master-key rotation)."""
        return master.wrap(self.tenant, self.key_id, self._raw)
