"""Standard Webhooks v1 and device JWS: what verifies, and that everything else is a SignatureError."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from iot_bridge.events import parse_event
from iot_bridge.signing import (
    MalformedSignature,
    MissingSignatureHeaders,
    SignatureError,
    SignatureMismatch,
    TimestampOutOfRange,
    UnknownKey,
    VerifiedJws,
    VerifiedMessage,
    decode_secret,
    load_public_key,
    sign_jws,
    sign_webhook,
    verify_jws,
    verify_webhook,
)

# Standard Webhooks reference vector (libraries/python/tests/test_webhooks.py).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

NOW = 1_772_000_000
SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(100, 132))
BODY = b'{"event_id":"e1","device_id":"d1","type":"smoke","occurred_at":"2026-01-01T00:00:00Z"}'


def _headers(msg_id: str = "msg_1", ts: int | str = NOW, body: bytes = BODY, secret: bytes = SECRET,
             signature: str | None = None) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": signature if signature is not None else sign_webhook(msg_id, int(ts), body, secret)}


# --- secrets ------------------------------------------------------------------------------------------------

def test_secret_with_and_without_whsec_prefix_decodes_the_same() -> None:
    assert decode_secret(VECTOR_SECRET) == decode_secret(VECTOR_SECRET.removeprefix("whsec_"))
    assert len(decode_secret(VECTOR_SECRET)) == 24
    assert decode_secret(f"  {VECTOR_SECRET}\n") == decode_secret(VECTOR_SECRET)


@pytest.mark.parametrize("text", ["whsec_" + base64.b64encode(b"x" * 23).decode(), "whsec_", "whsec_not base64!",
                                  "whsec_abc", ""])
def test_short_or_non_base64_secret_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="secret"):
        decode_secret(text)


# --- Standard Webhooks v1 -----------------------------------------------------------------------------------

def test_standard_webhooks_reference_vector_signs_and_verifies() -> None:
    secret = decode_secret(VECTOR_SECRET)
    assert sign_webhook(VECTOR_ID, VECTOR_TS, VECTOR_BODY, secret) == VECTOR_SIGNATURE
    headers = {"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TS), "webhook-signature": VECTOR_SIGNATURE}
    assert verify_webhook(headers, VECTOR_BODY, [secret], now=VECTOR_TS) == VerifiedMessage(VECTOR_ID, VECTOR_TS, 0)


def test_signature_is_hmac_sha256_over_id_timestamp_and_raw_body() -> None:
    expected = hmac.new(SECRET, b"msg_1.%d." % NOW + BODY, hashlib.sha256).digest()
    assert sign_webhook("msg_1", NOW, BODY, SECRET) == "v1," + base64.b64encode(expected).decode()


def test_header_names_are_matched_case_insensitively() -> None:
    headers = {name.upper(): value for name, value in _headers().items()}
    assert verify_webhook(headers, BODY, [SECRET], now=NOW).msg_id == "msg_1"


def test_aiohttp_style_multidict_headers_are_accepted() -> None:
    assert verify_webhook(CIMultiDict(_headers()), BODY, [SECRET], now=NOW).timestamp == NOW


def test_a_repeated_header_is_malformed() -> None:
    headers = CIMultiDict(_headers())
    headers.add("Webhook-Signature", sign_webhook("msg_1", NOW, BODY, SECRET))
    with pytest.raises(MalformedSignature, match="more than once"):
        verify_webhook(headers, BODY, [SECRET], now=NOW)
    with pytest.raises(MalformedSignature, match="more than once"):
        verify_webhook({**_headers(), "Webhook-Id": "msg_2"}, BODY, [SECRET], now=NOW)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_is_reported_by_name(missing: str) -> None:
    headers = _headers()
    del headers[missing]
    with pytest.raises(MissingSignatureHeaders, match=missing):
        verify_webhook(headers, BODY, [SECRET], now=NOW)


def test_signature_with_rotated_second_key_is_accepted() -> None:
    verified = verify_webhook(_headers(secret=OTHER_SECRET), BODY, [SECRET, OTHER_SECRET], now=NOW)
    assert verified.key_index == 1


def test_header_with_several_signatures_passes_when_any_one_matches() -> None:
    good = sign_webhook("msg_1", NOW, BODY, SECRET)
    stale = sign_webhook("msg_1", NOW, BODY, OTHER_SECRET)
    header = f"v1a,{base64.b64encode(b'x' * 64).decode()} {stale}  {good} v2,whatever"
    assert verify_webhook(_headers(signature=header), BODY, [SECRET], now=NOW).key_index == 0


def test_wrong_secret_is_a_mismatch() -> None:
    with pytest.raises(SignatureMismatch):
        verify_webhook(_headers(secret=OTHER_SECRET), BODY, [SECRET], now=NOW)


@pytest.mark.parametrize("tampered", [BODY + b" ", BODY.replace(b"smoke", b"co__e"), b""])
def test_changed_body_is_a_mismatch(tampered: bytes) -> None:
    with pytest.raises(SignatureMismatch):
        verify_webhook(_headers(), tampered, [SECRET], now=NOW)


def test_signature_for_another_message_id_is_a_mismatch() -> None:
    headers = _headers()
    headers["webhook-id"] = "msg_2"
    with pytest.raises(SignatureMismatch):
        verify_webhook(headers, BODY, [SECRET], now=NOW)


def test_no_secrets_for_the_sender_is_an_unknown_key() -> None:
    with pytest.raises(UnknownKey):
        verify_webhook(_headers(), BODY, [], now=NOW)


@pytest.mark.parametrize("offset", [-300, 0, 300])
def test_timestamp_within_tolerance_on_both_sides_is_accepted(offset: int) -> None:
    assert verify_webhook(_headers(ts=NOW + offset), BODY, [SECRET], now=NOW).timestamp == NOW + offset


@pytest.mark.parametrize(("offset", "word"), [(-301, "past"), (301, "future"), (-86_400, "past")])
def test_timestamp_beyond_tolerance_on_either_side_is_refused(offset: int, word: str) -> None:
    with pytest.raises(TimestampOutOfRange, match=word):
        verify_webhook(_headers(ts=NOW + offset), BODY, [SECRET], now=NOW)


def test_custom_tolerance_is_honoured() -> None:
    verify_webhook(_headers(ts=NOW - 30), BODY, [SECRET], now=NOW, tolerance_s=30)
    with pytest.raises(TimestampOutOfRange):
        verify_webhook(_headers(ts=NOW - 31), BODY, [SECRET], now=NOW, tolerance_s=30)


def test_signature_is_checked_before_the_timestamp_so_the_clock_cannot_be_probed() -> None:
    with pytest.raises(SignatureMismatch):
        verify_webhook(_headers(ts=NOW - 10_000, secret=OTHER_SECRET), BODY, [SECRET], now=NOW)


@pytest.mark.parametrize("stamp", ["hello", "1700000000.9", "-5", "1e9", " 1772000000", "1772000000\n",
                                   "\uff11\uff17\uff17", "1" * 13, ""])
def test_non_integer_timestamp_is_malformed(stamp: str) -> None:
    headers = _headers()
    headers["webhook-timestamp"] = stamp
    with pytest.raises(MalformedSignature, match="integer"):
        verify_webhook(headers, BODY, [SECRET], now=NOW)


@pytest.mark.parametrize("msg_id", ["", "a" * 129, "msg 1", "msg/1", "msg\n1", "méssage"])
def test_message_id_outside_charset_or_length_is_malformed(msg_id: str) -> None:
    headers = _headers()
    headers["webhook-id"] = msg_id
    with pytest.raises(MalformedSignature, match="webhook-id"):
        verify_webhook(headers, BODY, [SECRET], now=NOW)


@pytest.mark.parametrize("header", [
    "garbage", "v1,a,b", "v1,!!!!", "v1,", ",abc", "v1", "   ", "",
    "v1," + base64.b64encode(b"x" * 31).decode(),
    "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE",  # padding missing
    "V1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    "v1a,AAAA",  # only a version we do not verify
    "v1," + "A" * 5000,
    " ".join(["v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="] * 17),
])
def test_garbage_signature_header_is_malformed_not_a_value_error(header: str) -> None:
    with pytest.raises(MalformedSignature):
        verify_webhook(_headers(signature=header), BODY, [SECRET], now=NOW)


def test_all_signature_errors_share_a_base_with_a_reason() -> None:
    with pytest.raises(SignatureError) as info:
        verify_webhook({}, BODY, [SECRET], now=NOW)
    assert "webhook-id" in info.value.reason


@settings(max_examples=300, deadline=None)
@given(msg_id=st.text(max_size=40), stamp=st.text(max_size=20), signature=st.text(max_size=120),
       body=st.binary(max_size=40))
def test_arbitrary_header_values_raise_nothing_but_signature_errors(msg_id: str, stamp: str, signature: str,
                                                                   body: bytes) -> None:
    headers = {"webhook-id": msg_id, "webhook-timestamp": stamp, "webhook-signature": signature}
    try:
        verify_webhook(headers, body, [SECRET], now=NOW)
    except SignatureError:
        pass


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.sampled_from(["v1", "v1a", "v2", "x", ""]).flatmap(
    lambda version: st.tuples(st.just(version), st.sampled_from(["", ",", ",AAAA", ",a,b", ",==", ",AAAAAAAA"]))),
    max_size=5))
def test_structured_signature_garbage_raises_only_signature_errors(entries: list[tuple[str, str]]) -> None:
    header = " ".join(version + rest for version, rest in entries)
    with pytest.raises(SignatureError):
        verify_webhook(_headers(signature=header), BODY, [SECRET], now=NOW)


# --- JWS ----------------------------------------------------------------------------------------------------

EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
KEYS: dict[str, Any] = {"dev-ec": EC_KEY.public_key(), "dev-ed": ED_KEY.public_key()}
EVENT = {"event_id": "e1", "device_id": "dev-ec", "type": "smoke", "occurred_at": "2026-01-01T00:00:00Z",
         "payload": {"ppm": 400}}


def _claims(sub: str = "dev-ec", **changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"iat": NOW, "jti": "msg-1", "sub": sub, "event": EVENT}
    claims.update(changes)
    return claims


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _craft(header: dict[str, Any], payload: bytes, key: Any = EC_KEY) -> bytes:
    """A compact JWS with any header and any payload bytes, signed independently of the code under test."""
    signing_input = _b64(json.dumps(header).encode()) + b"." + _b64(payload)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(signing_input)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    elif isinstance(key, bytes):
        signature = hmac.new(key, signing_input, hashlib.sha256).digest()
    else:
        signature = b""
    return signing_input + b"." + _b64(signature)


@pytest.mark.parametrize(("kid", "key", "alg"), [("dev-ec", EC_KEY, "ES256"), ("dev-ed", ED_KEY, "EdDSA")])
def test_jws_signed_with_the_device_key_verifies(kid: str, key: Any, alg: str) -> None:
    verified = verify_jws(sign_jws(_claims(sub=kid), key, kid), KEYS, now=NOW)
    assert isinstance(verified, VerifiedJws)
    assert (verified.msg_id, verified.timestamp, verified.key_id, verified.algorithm) == ("msg-1", NOW, kid, alg)
    assert verified.claims["event"] == EVENT
    assert verified.event_raw == json.dumps(EVENT, separators=(",", ":"), sort_keys=True).encode()
    assert parse_event(verified.event_raw).payload == {"ppm": 400}


def test_claims_are_kept_out_of_the_repr() -> None:
    verified = verify_jws(sign_jws(_claims(), EC_KEY, "dev-ec"), KEYS, now=NOW)
    assert "ppm" not in repr(verified)


@pytest.mark.parametrize(("kid", "key", "alg"), [("dev-ec", EC_KEY, "ES256"), ("dev-ed", ED_KEY, "EdDSA")])
def test_jws_from_pyjwt_verifies_and_ours_verifies_in_pyjwt(kid: str, key: Any, alg: str) -> None:
    theirs = jwt.encode(_claims(sub=kid), key, algorithm=alg, headers={"kid": kid}).encode()
    assert verify_jws(theirs, KEYS, now=NOW).key_id == kid
    ours = sign_jws(_claims(sub=kid), key, kid)
    decoded = jwt.decode(ours, KEYS[kid], algorithms=[alg], options={"verify_iat": False})
    assert decoded["jti"] == "msg-1"


def test_trailing_newline_after_the_token_is_tolerated() -> None:
    assert verify_jws(sign_jws(_claims(), EC_KEY, "dev-ec") + b"\r\n", KEYS, now=NOW).msg_id == "msg-1"


def test_alg_none_is_refused() -> None:
    token = _craft({"alg": "none", "kid": "dev-ec"}, json.dumps(_claims()).encode(), key=None)
    with pytest.raises(MalformedSignature, match="alg"):
        verify_jws(token + b"AAAA", KEYS, now=NOW)
    unsigned = token.rsplit(b".", 1)[0] + b"."
    with pytest.raises(MalformedSignature):
        verify_jws(unsigned, KEYS, now=NOW)


def test_hs256_signed_with_the_public_key_is_refused() -> None:
    public_pem = EC_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    token = _craft({"alg": "HS256", "kid": "dev-ec"}, json.dumps(_claims()).encode(), key=public_pem)
    with pytest.raises(MalformedSignature, match="alg"):
        verify_jws(token, KEYS, now=NOW)


@pytest.mark.parametrize("alg", ["ES384", "RS256", "PS256", "ES256K", "es256", "EdDSA "])
def test_other_algorithms_are_refused(alg: str) -> None:
    token = _craft({"alg": alg, "kid": "dev-ec"}, json.dumps(_claims()).encode())
    with pytest.raises(MalformedSignature):
        verify_jws(token, KEYS, now=NOW)


def test_alg_that_does_not_match_the_device_key_type_is_a_mismatch() -> None:
    token = _craft({"alg": "EdDSA", "kid": "dev-ec"}, json.dumps(_claims()).encode(), key=ED_KEY)
    with pytest.raises(SignatureMismatch, match="EdDSA"):
        verify_jws(token, KEYS, now=NOW)


def test_unknown_kid_is_an_unknown_key() -> None:
    with pytest.raises(UnknownKey):
        verify_jws(sign_jws(_claims(sub="dev-new"), EC_KEY, "dev-new"), KEYS, now=NOW)


def test_token_signed_by_another_devices_key_is_a_mismatch() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(SignatureMismatch):
        verify_jws(sign_jws(_claims(), other, "dev-ec"), KEYS, now=NOW)


def test_tampered_payload_is_a_mismatch() -> None:
    header, _, signature = sign_jws(_claims(), EC_KEY, "dev-ec").split(b".")
    forged = _b64(json.dumps(_claims(event={**EVENT, "type": "cleared"})).encode())
    with pytest.raises(SignatureMismatch):
        verify_jws(b".".join([header, forged, signature]), KEYS, now=NOW)


def test_es256_signature_of_wrong_length_is_a_mismatch() -> None:
    token = sign_jws(_claims(), EC_KEY, "dev-ec")
    with pytest.raises(SignatureMismatch):
        verify_jws(token[:-4], KEYS, now=NOW)


def test_sub_naming_another_device_is_a_mismatch() -> None:
    token = sign_jws(_claims(sub="dev-ed"), EC_KEY, "dev-ec")
    with pytest.raises(SignatureMismatch, match="sub"):
        verify_jws(token, KEYS, now=NOW)


@pytest.mark.parametrize("offset", [-300, 300])
def test_iat_at_the_tolerance_edge_is_accepted(offset: int) -> None:
    assert verify_jws(sign_jws(_claims(iat=NOW + offset), EC_KEY, "dev-ec"), KEYS, now=NOW).timestamp == NOW + offset


@pytest.mark.parametrize("offset", [-301, 301])
def test_iat_beyond_tolerance_on_either_side_is_refused(offset: int) -> None:
    with pytest.raises(TimestampOutOfRange):
        verify_jws(sign_jws(_claims(iat=NOW + offset), EC_KEY, "dev-ec"), KEYS, now=NOW)


def test_bad_signature_is_reported_before_a_stale_iat() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(SignatureMismatch):
        verify_jws(sign_jws(_claims(iat=NOW - 10_000), other, "dev-ec"), KEYS, now=NOW)


def test_expired_or_not_yet_valid_token_is_refused() -> None:
    with pytest.raises(TimestampOutOfRange, match="expired"):
        verify_jws(sign_jws(_claims(exp=NOW), EC_KEY, "dev-ec"), KEYS, now=NOW)
    with pytest.raises(TimestampOutOfRange, match="not yet"):
        verify_jws(sign_jws(_claims(nbf=NOW + 1), EC_KEY, "dev-ec"), KEYS, now=NOW)
    assert verify_jws(sign_jws(_claims(exp=NOW + 1, nbf=NOW), EC_KEY, "dev-ec"), KEYS, now=NOW).msg_id == "msg-1"


@pytest.mark.parametrize("changes", [{"iat": float(NOW)}, {"iat": str(NOW)}, {"iat": True}, {"iat": None},
                                     {"exp": "soon"}, {"jti": ""}, {"jti": "a b"}, {"jti": 7}, {"event": "smoke"},
                                     {"event": [EVENT]}])
def test_claims_of_the_wrong_type_are_malformed(changes: dict[str, Any]) -> None:
    with pytest.raises(MalformedSignature, match="claim"):
        verify_jws(sign_jws(_claims(**changes), EC_KEY, "dev-ec"), KEYS, now=NOW)


@pytest.mark.parametrize("missing", ["iat", "jti", "event"])
def test_missing_claims_are_malformed(missing: str) -> None:
    claims = _claims()
    del claims[missing]
    with pytest.raises(MalformedSignature, match=missing):
        verify_jws(sign_jws(claims, EC_KEY, "dev-ec"), KEYS, now=NOW)


def test_missing_sub_is_a_mismatch() -> None:
    claims = _claims()
    del claims["sub"]
    with pytest.raises(SignatureMismatch):
        verify_jws(sign_jws(claims, EC_KEY, "dev-ec"), KEYS, now=NOW)


@pytest.mark.parametrize("payload", [
    b'{"iat": 1772000000, "jti": "m", "sub": "dev-ec", "event": {}, "jti": "n"}',
    b'{"iat": 1772000000, "jti": "m", "sub": "dev-ec", "event": {"a": 1, "a": 2}}',
    b'{"iat": NaN}', b"[]", b"\xff", b"not json",
])
def test_correctly_signed_but_non_strict_payload_is_malformed(payload: bytes) -> None:
    with pytest.raises(MalformedSignature, match="payload"):
        verify_jws(_craft({"alg": "ES256", "kid": "dev-ec"}, payload), KEYS, now=NOW)


@pytest.mark.parametrize("header", [{"alg": "ES256"}, {"alg": "ES256", "kid": 1}, {"alg": "ES256", "kid": "a b"},
                                    {"alg": "ES256", "kid": "dev-ec", "crit": ["exp"]}, {"kid": "dev-ec"}])
def test_bad_jws_header_is_malformed(header: dict[str, Any]) -> None:
    with pytest.raises(MalformedSignature):
        verify_jws(_craft(header, json.dumps(_claims()).encode()), KEYS, now=NOW)


@pytest.mark.parametrize("token", [b"", b"a.b", b"a.b.c.d", b"a..c", b"e30.e30.!!", b"a.b.c", b"=.=.=",
                                   b'{"payload": "e30", "signatures": []}', b"\xff\xfe.x.y", b"A" * (1 << 21)])
def test_non_compact_or_undecodable_token_is_malformed(token: bytes) -> None:
    with pytest.raises(MalformedSignature):
        verify_jws(token, KEYS, now=NOW)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.lists(st.binary(max_size=40).map(_b64), min_size=3, max_size=3).map(b".".join))
def test_arbitrary_tokens_raise_nothing_but_signature_errors(token: bytes) -> None:
    try:
        verify_jws(token, KEYS, now=NOW)
    except SignatureError:
        pass


def test_sign_jws_refuses_keys_it_cannot_use() -> None:
    with pytest.raises(TypeError):
        sign_jws(_claims(), ec.generate_private_key(ec.SECP384R1()), "dev-ec")


def _pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_public_keys_load_from_pem_for_both_algorithms() -> None:
    token = sign_jws(_claims(), EC_KEY, "dev-ec")
    assert verify_jws(token, {"dev-ec": load_public_key(_pem(EC_KEY))}, now=NOW).key_id == "dev-ec"
    assert isinstance(load_public_key(_pem(ED_KEY)), ed25519.Ed25519PublicKey)


@pytest.mark.parametrize("pem", [_pem(ec.generate_private_key(ec.SECP384R1())),
                                 _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
                                 b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", b"", b"garbage"])
def test_other_public_keys_or_garbage_are_a_value_error(pem: bytes) -> None:
    with pytest.raises(ValueError):
        load_public_key(pem)
