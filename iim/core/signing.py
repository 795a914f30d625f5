"""Standard Webhooks ``v1`` (HMAC-SHA256): signing and verifying, for every room that signs or verifies.

The device bridge verifies device messages with it; connectors and the HTTP SMSC sign and verify vendor
callbacks with it. :func:`verify_webhook` raises only :class:`SignatureError` subclasses, whatever the peer
sends (the PyPI ``standardwebhooks`` library lets ``ValueError`` escape on a header such as ``v1,a,b``,
which turns a bad request into a 500). Checks run in this order, so a sender without a key learns nothing
but "malformed" or "mismatch": the format of everything, the key, the signature, and only then the
timestamp against ``now`` (bounded on both sides).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "SignatureError", "MissingSignatureHeaders", "MalformedSignature", "TimestampOutOfRange",
    "SignatureMismatch", "UnknownKey", "VerifiedMessage",
    "MSG_ID", "check_time", "decode_secret", "link_signature", "link_signature_ok", "sign_webhook", "verify_webhook",
]

#: A message id (``webhook-id``, a JWS ``jti``): what the intake ledger deduplicates on.
MSG_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIG_VERSION = re.compile(r"v[0-9]{1,3}[a-z]?")
_MAX_SIGNATURE_HEADER = 2048
_MAX_SIGNATURES = 16
_MIN_SECRET = 24


class SignatureError(Exception):
    """The message is not proven authentic and fresh; answer 401. ``reason`` never echoes header values."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MissingSignatureHeaders(SignatureError):
    """One of ``webhook-id``, ``webhook-timestamp``, ``webhook-signature`` is absent."""


class MalformedSignature(SignatureError):
    """A header, token or claim does not have the required form."""


class TimestampOutOfRange(SignatureError):
    """Correctly signed, but too old or too far in the future."""


class SignatureMismatch(SignatureError):
    """Well-formed, but no signature verifies under any of the sender's keys."""


class UnknownKey(SignatureError):
    """No key is configured for the sender (unknown ``kid``, or an empty secret list)."""


@dataclass(frozen=True, slots=True)
class VerifiedMessage:
    """A verified Standard Webhooks message. ``key_index`` is the position of the secret that matched
    (watch it during rotation: once nothing matches index 0 any more, the old secret can go)."""

    msg_id: str
    timestamp: int
    key_index: int = 0


# --- Standard Webhooks v1 ---------------------------------------------------------------------------------

def decode_secret(text: str) -> bytes:
    """A ``whsec_<base64>`` (or bare base64) secret as bytes; ``ValueError`` when shorter than 24 bytes."""
    body = text.strip().removeprefix("whsec_")
    try:
        secret = base64.b64decode(body, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise ValueError("webhook secret is not base64") from None
    if len(secret) < _MIN_SECRET:
        raise ValueError(f"webhook secret must be at least {_MIN_SECRET} bytes, got {len(secret)}")
    return secret


def _webhook_digest(msg_id: str, timestamp: str, body: bytes, secret: bytes) -> bytes:
    return hmac.new(secret, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def sign_webhook(msg_id: str, timestamp: int, body: bytes, secret: bytes) -> str:
    """The ``webhook-signature`` value (``v1,<base64>``) for a message; for senders, tests and benchmarks."""
    return "v1," + base64.b64encode(_webhook_digest(msg_id, str(timestamp), body, secret)).decode()


def _webhook_headers(headers: Mapping[str, str]) -> tuple[str, str, str]:
    wanted = ("webhook-id", "webhook-timestamp", "webhook-signature")
    found: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in wanted:
            if lower in found:
                raise MalformedSignature(f"header {lower} given more than once")
            found[lower] = value
    missing = [name for name in wanted if name not in found]
    if missing:
        raise MissingSignatureHeaders(f"missing header(s): {', '.join(missing)}")
    return found["webhook-id"], found["webhook-timestamp"], found["webhook-signature"]


def _v1_signatures(header: str) -> list[bytes]:
    """The decoded ``v1`` signatures; other versions (``v1a``...) are skipped, garbage refuses the header."""
    if len(header) > _MAX_SIGNATURE_HEADER:
        raise MalformedSignature("webhook-signature header too long")
    entries = [entry for entry in header.split(" ") if entry]
    if not entries:
        raise MalformedSignature("webhook-signature header is empty")
    if len(entries) > _MAX_SIGNATURES:
        raise MalformedSignature(f"more than {_MAX_SIGNATURES} signatures")
    signatures = []
    for entry in entries:
        version, comma, value = entry.partition(",")
        if not comma or "," in value or not value or not _SIG_VERSION.fullmatch(version):
            raise MalformedSignature("webhook-signature entries must be <version>,<signature>")
        if version != "v1":
            continue
        try:
            digest = base64.b64decode(value, validate=True)
        except ValueError:  # binascii.Error, and ValueError for a non-ASCII header value ("v1,é")
            raise MalformedSignature("v1 signature is not base64") from None
        if len(digest) != hashlib.sha256().digest_size:
            raise MalformedSignature("v1 signature has the wrong length")
        signatures.append(digest)
    if not signatures:
        raise MalformedSignature("no v1 signature")
    return signatures


def check_time(timestamp: int, now: float, tolerance_s: int) -> None:
    if timestamp < now - tolerance_s:
        raise TimestampOutOfRange(f"timestamp more than {tolerance_s} s in the past")
    if timestamp > now + tolerance_s:
        raise TimestampOutOfRange(f"timestamp more than {tolerance_s} s in the future")


def verify_webhook(headers: Mapping[str, str], body: bytes, secrets: Sequence[bytes], *, now: float,
                   tolerance_s: int = 300) -> VerifiedMessage:
    """Verify a Standard Webhooks ``v1`` message over the raw ``body`` (before any JSON parsing).

    Any ``v1`` entry matching any of ``secrets`` passes (rotation: several secrets and/or several signatures).
    Header names are matched case-insensitively; a repeated header is refused. Order of checks: see the module
    docstring (format, key, signature, then the ±``tolerance_s`` timestamp window).
    """
    msg_id, timestamp_text, signature_header = _webhook_headers(headers)
    if not MSG_ID.fullmatch(msg_id):
        raise MalformedSignature("webhook-id must be 1..128 characters of [A-Za-z0-9_.:-]")
    if not _TIMESTAMP.fullmatch(timestamp_text):
        raise MalformedSignature("webhook-timestamp must be integer unix seconds")
    signatures = _v1_signatures(signature_header)
    if not secrets:
        raise UnknownKey("no webhook secret configured for this sender")
    for index, secret in enumerate(secrets):
        expected = _webhook_digest(msg_id, timestamp_text, body, secret)
        # Compare against every entry (no early exit on the entries) so timing says nothing about which failed.
        matched = False
        for given in signatures:
            matched |= hmac.compare_digest(expected, given)
        if matched:
            timestamp = int(timestamp_text)
            check_time(timestamp, now, tolerance_s)
            return VerifiedMessage(msg_id=msg_id, timestamp=timestamp, key_index=index)
    raise SignatureMismatch("no signature matches")


# --- signed links (a URL that grants one thing until its expiry) -------------------------------------------

def link_signature(secret: bytes, *parts: str) -> str:
    """HMAC-SHA256 (hex) over ``parts`` joined by NUL: a label naming the link's kind and version first, then
    what the link grants and its expiry, so a signature for one kind of link is never valid for another."""
    return hmac.new(secret, "\x00".join(parts).encode(), hashlib.sha256).hexdigest()


def link_signature_ok(secret: bytes, signature: str, *parts: str) -> bool:
    """Whether ``signature`` is :func:`link_signature` of ``parts`` (constant time)."""
    return hmac.compare_digest(link_signature(secret, *parts), signature)
