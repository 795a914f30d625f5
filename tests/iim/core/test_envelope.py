"""``iim.core.envelope``: a sealed field opens only with its tenant's key in the place it was sealed for."""

from __future__ import annotations

import base64
from uuid import UUID, uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iim.core.envelope import CipherError, DataKey, MasterKey, new_data_key_bytes

TENANT = UUID("00000000-0000-4000-8000-000000000001")
MASTER = MasterKey.from_bytes(bytes(range(32)))


def _key(tenant: UUID = TENANT, key_id: int = 1) -> DataKey:
    return MASTER.unwrap(tenant, key_id, MASTER.wrap(tenant, key_id, new_data_key_bytes()))


def test_a_sealed_body_opens_in_its_place_and_holds_no_clear_text() -> None:
    key = _key()
    sealed = key.seal("sms_outbox", "incident/1/sms/0", "body", "Пожар на кухне: 123456")
    assert "123456" not in sealed
    assert "Пожар" not in sealed
    assert key.open("sms_outbox", "incident/1/sms/0", "body", sealed) == "Пожар на кухне: 123456"
    assert key.seal("sms_outbox", "incident/1/sms/0", "body", "same") != key.seal(
        "sms_outbox", "incident/1/sms/0", "body", "same")  # a fresh nonce each time


@pytest.mark.parametrize(("table", "row", "column"), [
    ("sms_outbox", "incident/1/sms/1", "body"),  # another row
    ("sms_inbound", "incident/1/sms/0", "body"),  # another table
    ("sms_outbox", "incident/1/sms/0", "msisdn"),  # another column
])
def test_a_sealed_body_moved_to_another_row_table_or_column_does_not_open(table: str, row: str, column: str) -> None:
    key = _key()
    sealed = key.seal("sms_outbox", "incident/1/sms/0", "body", "secret")
    with pytest.raises(CipherError):
        key.open(table, row, column, sealed)


def test_another_tenants_key_or_a_newer_key_does_not_open_it() -> None:
    sealed = _key().seal("sms_outbox", "k", "body", "secret")
    with pytest.raises(CipherError):
        _key(uuid4()).open("sms_outbox", "k", "body", sealed)
    with pytest.raises(CipherError):
        _key(TENANT, 2).open("sms_outbox", "k", "body", sealed)


def test_a_wrapped_key_copied_to_another_tenant_or_key_id_does_not_unwrap() -> None:
    wrapped = MASTER.wrap(TENANT, 1, new_data_key_bytes())
    assert len(wrapped) == 60
    with pytest.raises(CipherError):
        MASTER.unwrap(uuid4(), 1, wrapped)
    with pytest.raises(CipherError):
        MASTER.unwrap(TENANT, 2, wrapped)
    with pytest.raises(CipherError):
        MasterKey.from_bytes(bytes(32)).unwrap(TENANT, 1, wrapped)


def test_rewrap_under_a_new_master_keeps_the_data_key() -> None:
    key = _key()
    sealed = key.seal("sms_outbox", "k", "body", "kept")
    new_master = MasterKey.from_bytes(bytes(reversed(range(32))))
    again = new_master.unwrap(TENANT, 1, key.rewrap(new_master))
    assert again.open("sms_outbox", "k", "body", sealed) == "kept"
    assert new_master.key_id != MASTER.key_id


def test_master_keys_are_read_from_hex_or_base64_and_anything_else_is_refused() -> None:
    raw = bytes(range(32))
    assert MasterKey.from_secret(raw.hex()).key_id == MASTER.key_id
    assert MasterKey.from_secret(base64.b64encode(raw).decode() + "\n").key_id == MASTER.key_id
    for bad in ("", "00" * 31, "not a key", base64.b64encode(bytes(16)).decode()):
        with pytest.raises(CipherError):
            MasterKey.from_secret(bad)


def test_the_master_key_id_is_a_fingerprint_not_the_key() -> None:
    assert bytes(range(32)).hex()[:16] != MASTER.key_id
    assert len(MASTER.key_id) == 16
    assert repr(MASTER) == f"MasterKey(key_id='{MASTER.key_id}')"
    assert repr(_key()) == f"DataKey(tenant={TENANT!r}, key_id=1)"


@given(st.text(max_size=50))
def test_garbage_in_place_of_a_sealed_body_is_a_cipher_error_never_another_exception(garbage: str) -> None:
    with pytest.raises(CipherError):
        _key().open("sms_outbox", "k", "body", garbage)


@given(st.binary(min_size=1, max_size=100))
def test_tampered_ciphertext_is_refused(noise: bytes) -> None:
    key = _key()
    raw = bytearray(base64.b64decode(key.seal("sms_outbox", "k", "body", "secret")))
    for i, b in enumerate(noise[: len(raw)]):
        raw[i] ^= b or 1
    with pytest.raises(CipherError):
        key.open("sms_outbox", "k", "body", base64.b64encode(bytes(raw)).decode())
