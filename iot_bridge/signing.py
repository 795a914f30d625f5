"""Authenticity and freshness of device messages: Standard Webhooks ``v1`` (HMAC-SHA256) and compact JWS.

Both verifiers raise only :class:`SignatureError` subclasses, whatever the peer sends (the PyPI
``standardwebhooks`` library lets ``ValueError`` escape on a header such as ``v1,a,b``, which turns a bad
request into a 500). Both check in the same order, so that a sender without a key learns nothing but
"malformed" or "mismatch":

1. the format of everything (headers / JWS segments and header, lengths, charsets, integer timestamp);
2. the key (:class:`UnknownKey` when there is none for the sender);
3. the signature (:class:`SignatureMismatch`);
4. only then the content that needs a valid signature to be trusted: JWS claims, and the timestamp against
   ``now`` (:class:`TimestampOutOfRange`), bounded on both sides (Stripe's check bounds only the past).
   Checking the clock last means nobody can probe our clock or tolerance without a valid key.

Replay inside the tolerance window is not handled here: the intake ledger (``iim.device_event``, unique
per device and ``event_id``, kept indefinitely) answers a replayed event with its first answer and acts no more.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from iim.core import strict_json
from iim.core.signing import (
    MSG_ID,
    MalformedSignature,
    MissingSignatureHeaders,
    SignatureError,
    SignatureMismatch,
    TimestampOutOfRange,
    UnknownKey,
    VerifiedMessage,
    check_time,
    decode_secret,
    sign_webhook,
    verify_webhook,
)

__all__ = [
    "JWS_ALGORITHMS", "PrivateKey", "PublicKey",
    "SignatureError", "MissingSignatureHeaders", "MalformedSignature", "TimestampOutOfRange",
    "SignatureMismatch", "UnknownKey",
    "VerifiedMessage", "VerifiedJws",
    "decode_secret", "sign_webhook", "verify_webhook",
    "load_public_key", "sign_jws", "verify_jws",
]

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

#: The only JWS algorithms accepted: asymmetric, one curve each, no ``none``, no HMAC (key confusion).
JWS_ALGORITHMS = frozenset({"ES256", "EdDSA"})

_KID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_B64URL_SEGMENT = re.compile(rb"[A-Za-z0-9_-]+")
_MAX_JWS = 1 << 20
_MAX_JWS_HEADER = 1024


@dataclass(frozen=True, slots=True)
class VerifiedJws:
    """A verified JWS. ``event_raw`` is the ``event`` claim in canonical JSON (feed it to ``parse_event``)."""

    msg_id: str
    timestamp: int
    key_id: str | None
    algorithm: str
    claims: dict[str, Any] = field(repr=False)
    event_raw: bytes = field(repr=False)


# --- JWS (device-held private keys) ------------------------------------------------------------------------

def load_public_key(pem: bytes) -> PublicKey:
    """A device's public key from PEM; only EC P-256 and Ed25519 (the two JWS algorithms we accept)."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a PEM public key: {exc}") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ValueError("only EC P-256 and Ed25519 public keys are accepted")


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64url(segment: bytes, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
    except binascii.Error:
        raise MalformedSignature(f"JWS {what} is not base64url") from None


def sign_jws(claims: dict[str, Any], private_key: PrivateKey, kid: str) -> bytes:
    """A compact JWS of ``claims`` (ES256 for an EC P-256 key, EdDSA for Ed25519); for devices, tests, benchmarks."""
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        alg = "EdDSA"
    elif isinstance(private_key.curve, ec.SECP256R1):
        alg = "ES256"
    else:
        raise TypeError("only EC P-256 and Ed25519 private keys can sign")
    header = strict_json.canonical_json({"alg": alg, "kid": kid, "typ": "JWT"})
    signing_input = _b64url(header) + b"." + _b64url(strict_json.canonical_json(claims))
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        signature = private_key.sign(signing_input)
    else:
        r, s = decode_dss_signature(private_key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signing_input + b"." + _b64url(signature)


def _jws_header(segment: bytes) -> tuple[str, str]:
    if len(segment) > _MAX_JWS_HEADER:
        raise MalformedSignature("JWS header too long")
    try:
        header = strict_json.loads(_unb64url(segment, "header"), max_depth=2)
    except strict_json.BadJson as exc:
        raise MalformedSignature(f"JWS header: {exc.reason}") from None
    if not isinstance(header, dict):
        raise MalformedSignature("JWS header is not an object")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in JWS_ALGORITHMS:
        raise MalformedSignature(f"JWS alg must be one of {', '.join(sorted(JWS_ALGORITHMS))}")
    if "crit" in header:
        raise MalformedSignature("JWS critical header parameters are not supported")
    kid = header.get("kid")
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise MalformedSignature("JWS kid must be a device id")
    return alg, kid


def _verify_jws_signature(alg: str, key: object, signing_input: bytes, signature: bytes) -> None:
    """Checks the key type against ``alg`` first: a key is only ever used with its own algorithm."""
    try:
        if alg == "EdDSA" and isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, signing_input)
            return
        if (alg == "ES256" and isinstance(key, ec.EllipticCurvePublicKey)
                and isinstance(key.curve, ec.SECP256R1)):
            if len(signature) != 64:
                raise SignatureMismatch("ES256 signature must be 64 bytes")
            der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
            key.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
            return
    except InvalidSignature:
        raise SignatureMismatch("JWS signature does not verify") from None
    raise SignatureMismatch(f"the device key does not sign with {alg}")


def _int_claim(claims: dict[str, Any], name: str) -> int | None:
    value = claims.get(name)
    if value is None and name not in claims:
        return None
    if type(value) is not int:
        raise MalformedSignature(f"claim {name} must be integer unix seconds")
    return value


def verify_jws(token: bytes, keys: Mapping[str, PublicKey], *, now: float, tolerance_s: int = 300) -> VerifiedJws:
    """Verify a device's compact JWS (``Content-Type: application/jose``).

    Header ``kid`` names the device and selects its key from ``keys``; ``alg`` must be ES256 or EdDSA and match
    the key. Claims: ``iat`` (int, within ±``tolerance_s`` of ``now``), ``jti`` (message id), ``sub`` (must equal
    ``kid``), ``event`` (object). ``exp``/``nbf``, when present, must be integers and hold at ``now`` (no leeway).
    The payload is parsed with :func:`iim.core.strict_json.loads` (duplicate keys refused). Check order: see the
    module docstring.
    """
    token = token.strip(b" \t\r\n")
    if len(token) > _MAX_JWS:
        raise MalformedSignature("JWS too long")
    segments = token.split(b".")
    if len(segments) != 3 or not all(_B64URL_SEGMENT.fullmatch(part) for part in segments):
        raise MalformedSignature("not a compact JWS (three base64url segments)")
    header_b64, payload_b64, signature_b64 = segments
    alg, kid = _jws_header(header_b64)
    signature = _unb64url(signature_b64, "signature")
    payload = _unb64url(payload_b64, "payload")
    key = keys.get(kid)
    if key is None:
        raise UnknownKey("no key for this device")
    _verify_jws_signature(alg, key, header_b64 + b"." + payload_b64, signature)

    try:
        claims = strict_json.loads(payload)
    except strict_json.BadJson as exc:
        raise MalformedSignature(f"JWS payload: {exc.reason}") from None
    if not isinstance(claims, dict):
        raise MalformedSignature("JWS payload is not an object")
    iat = _int_claim(claims, "iat")
    if iat is None:
        raise MalformedSignature("claim iat is required")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not MSG_ID.fullmatch(jti):
        raise MalformedSignature("claim jti must be 1..128 characters of [A-Za-z0-9_.:-]")
    if claims.get("sub") != kid:
        raise SignatureMismatch("claim sub does not name the signing device")
    event = claims.get("event")
    if not isinstance(event, dict):
        raise MalformedSignature("claim event must be an object")
    exp, nbf = _int_claim(claims, "exp"), _int_claim(claims, "nbf")
    check_time(iat, now, tolerance_s)
    if exp is not None and now >= exp:
        raise TimestampOutOfRange("token expired")
    if nbf is not None and now < nbf:
        raise TimestampOutOfRange("token not yet valid")
    event_raw = json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
    return VerifiedJws(msg_id=jti, timestamp=iat, key_id=kid, algorithm=alg, claims=claims, event_raw=event_raw)
