"""Tokens at rest: sealed values open only with the key, in the tenant, row and column they were sealed for."""

from __future__ import annotations

import base64
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iim.linking.sealing import AesGcmSealer, SealError

SEALER = AesGcmSealer.from_secret("ab" * 32)
T, ROW = uuid4(), uuid4()


def test_a_sealed_token_opens_where_it_was_sealed_and_hides_its_value() -> None:
    sealed = SEALER.seal(T, ROW, "access_token", "at-secret-token")
    assert "secret" not in sealed
    assert SEALER.open(T, ROW, "access_token", sealed) == "at-secret-token"
    assert SEALER.seal(T, ROW, "access_token", "at-secret-token") != sealed  # a fresh nonce each time


@pytest.mark.parametrize("where", [(uuid4(), ROW, "access_token"), (T, uuid4(), "access_token"),
                                   (T, ROW, "refresh_token")])
def test_a_sealed_token_moved_to_another_place_does_not_open(where: tuple) -> None:  # type: ignore[type-arg]
    sealed = SEALER.seal(T, ROW, "access_token", "at")
    with pytest.raises(SealError):
        SEALER.open(*where, sealed)


def test_another_key_or_a_flipped_bit_does_not_open() -> None:
    sealed = SEALER.seal(T, ROW, "c", "value")
    with pytest.raises(SealError):
        AesGcmSealer.from_secret(base64.b64encode(b"k" * 32).decode()).open(T, ROW, "c", sealed)
    raw = bytearray(base64.b64decode(sealed))
    raw[-1] ^= 1
    with pytest.raises(SealError):
        SEALER.open(T, ROW, "c", base64.b64encode(bytes(raw)).decode())


@pytest.mark.parametrize("key", ["", "ab" * 31, "not a key at all", base64.b64encode(b"k" * 16).decode()])
def test_malformed_keys_are_refused(key: str) -> None:
    with pytest.raises(SealError):
        AesGcmSealer.from_secret(key)
    assert "ab" not in repr(SEALER)


@given(st.text(max_size=80))
def test_garbage_never_opens_and_raises_only_seal_error(garbage: str) -> None:
    with pytest.raises(SealError):
        SEALER.open(T, ROW, "c", garbage)
