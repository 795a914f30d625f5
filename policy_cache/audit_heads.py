"""Signed audit chain heads, published outside the database, and their verification.

The hash chain (:mod:`policy_cache.audit`) shows an edited or deleted row, but someone who can disable the
triggers (a PostgreSQL superuser) can re-hash every row from N on and leave an intact chain. What they
cannot redo is a statement made earlier outside the database: :class:`AuditHeadPublisher` signs each
tenant's chain head (tenant, seq = the head row's id, its hash, the time) with an Ed25519 key the database
never sees, and publishes it three ways: appended to a heads file (JSON lines), as a log line, and as
:meth:`AuditHeadPublisher.latest` for the admin API's ``GET /v1/audit/head``. :func:`check_heads` (behind
``iim audit verify --heads FILE``) then proves every published head still on its chain: a re-hash from row
N <= a published seq changes that row's hash, and a truncation removes it.

A signed line::

    {"tenant_id": "...", "seq": 42, "hash": "<hex>", "at": "2026-12-06T07:50:00.000000Z",
     "key_id": "<16 hex>", "public_key": "<base64 raw>", "sig": "<base64>"}

The signature covers ``iim-audit-head-v1\\n`` + the canonical JSON of ``at``, ``hash``, ``seq``, ``tenant_id``
(sorted keys, no blanks). ``key_id`` is the first 16 hex digits of the SHA-256 of the raw public key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from iim.core.lifecycle import AsyncResource
from iim.core.secrets import resolve_secret
from policy_cache.db import Connection, Pool

__all__ = ["AuditHeadPublisher", "ChainHead", "HeadProblem", "check_heads", "load_private_key", "load_public_key",
           "read_heads", "sign_head", "verify_head_signature"]

log = logging.getLogger("iim.audit.heads")

_CONTEXT = b"iim-audit-head-v1\n"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(frozen=True, slots=True)
class ChainHead:
    """A tenant chain's last row: its id (``seq``) and ``row_hash``, read at ``at``."""

    tenant_id: UUID
    seq: int
    hash: bytes
    at: datetime


async def current_heads(pool: Pool | Connection) -> list[ChainHead]:
    """Every tenant's chain head now (``iim.audit_heads``: a definer function, the app role may call it)."""
    now = datetime.now(UTC)
    rows = await pool.fetch("SELECT tenant_id, id, row_hash FROM iim.audit_heads()")
    return [ChainHead(r["tenant_id"], int(r["id"]), bytes(r["row_hash"]), now) for r in rows]


# -- keys and signatures ---------------------------------------------------------------------------------------

def _raw_or_pem(text: str) -> bytes | None:
    """32 raw bytes given as hex or base64; None when ``text`` is neither (then PEM is tried)."""
    text = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    with contextlib.suppress(binascii.Error, ValueError):
        raw = base64.b64decode(text, validate=True)
        if len(raw) == 32:
            return raw
    return None


def load_private_key(ref: str) -> Ed25519PrivateKey:
    """The signing key behind a secret reference (``file:``/``env:``): PEM (PKCS#8) or a 32-byte seed as hex or
    base64. :class:`ValueError` when it is none of these (the key itself is never in the message)."""
    text = resolve_secret(ref)
    raw = _raw_or_pem(text)
    if raw is not None:
        return Ed25519PrivateKey.from_private_bytes(raw)
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{ref} holds no Ed25519 private key (PEM, or 32 bytes as hex/base64)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{ref} holds a key that is not Ed25519")  # noqa: TRY004 - a bad value, like the rest
    return key


def load_public_key(text: str) -> Ed25519PublicKey:
    """A verification key: PEM (SubjectPublicKeyInfo) or 32 raw bytes as hex or base64."""
    raw = _raw_or_pem(text)
    if raw is not None:
        return Ed25519PublicKey.from_public_bytes(raw)
    try:
        key = serialization.load_pem_public_key(text.strip().encode())
    except (ValueError, TypeError):
        raise ValueError("not an Ed25519 public key (PEM, or 32 bytes as hex/base64)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the public key is not Ed25519")  # noqa: TRY004 - a bad value, like the rest
    return key


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw_public(key)).hexdigest()[:16]


def _stamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _message(tenant_id: str, seq: int, hash_hex: str, at: str) -> bytes:
    body = json.dumps({"at": at, "hash": hash_hex, "seq": seq, "tenant_id": tenant_id},
                      sort_keys=True, separators=(",", ":"))
    return _CONTEXT + body.encode()


def sign_head(head: ChainHead, key: Ed25519PrivateKey) -> dict[str, Any]:
    """The published form of ``head``: its fields, the key's id and raw public key, the signature."""
    public = key.public_key()
    at = _stamp(head.at)
    signature = key.sign(_message(str(head.tenant_id), head.seq, head.hash.hex(), at))
    return {"tenant_id": str(head.tenant_id), "seq": head.seq, "hash": head.hash.hex(), "at": at,
            "key_id": key_id(public), "public_key": base64.b64encode(_raw_public(public)).decode(),
            "sig": base64.b64encode(signature).decode()}


def verify_head_signature(line: Mapping[str, Any], key: Ed25519PublicKey) -> bool:
    """Does ``line`` (a published head) carry a valid signature by ``key``? False for any malformed field."""
    try:
        tenant_id, seq, hash_hex, at = str(UUID(str(line["tenant_id"]))), line["seq"], line["hash"], line["at"]
        signature = base64.b64decode(str(line["sig"]), validate=True)
    except (KeyError, ValueError, binascii.Error):
        return False
    if not (isinstance(seq, int) and not isinstance(seq, bool) and seq >= 1 and isinstance(hash_hex, str)
            and _HEX64.fullmatch(hash_hex) and isinstance(at, str)):
        return False
    try:
        key.verify(signature, _message(tenant_id, seq, hash_hex, at))
    except InvalidSignature:
        return False
    return True


def read_heads(path: Path) -> list[dict[str, Any]]:
    """The lines of a heads file (blank lines skipped). :class:`ValueError` names a line that is not JSON."""
    heads: list[dict[str, Any]] = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")  # noqa: TRY004 - a bad file, like the rest
        heads.append(value)
    return heads


@dataclass(frozen=True, slots=True)
class HeadProblem:
    """Why a published head does not hold: ``bad_signature``, ``other_key``, ``off_chain`` (its row is gone or
    hashes differently now: re-hashed or truncated)."""

    seq: int | None
    problem: str


def check_signatures(lines: Iterable[Mapping[str, Any]], key: Ed25519PublicKey) -> list[HeadProblem]:
    """Every line signed by ``key``? (Pure: no database.)"""
    problems = []
    wanted = key_id(key)
    for line in lines:
        seq = line.get("seq") if isinstance(line.get("seq"), int) else None
        if line.get("key_id") not in (None, wanted):
            problems.append(HeadProblem(seq, "other_key"))
        elif not verify_head_signature(line, key):
            problems.append(HeadProblem(seq, "bad_signature"))
    return problems


async def check_heads(conn: Connection, tenant_id: UUID, heads: Sequence[tuple[int, str]]) -> list[int]:
    """The seqs of ``heads`` ((seq, hash hex) of this tenant) that are no longer on the tenant's chain. Run in
    the tenant's transaction (``tenant_tx``): RLS shows this tenant's rows only."""
    if not heads:
        return []
    rows = await conn.fetch("SELECT id, row_hash FROM iim.audit_log WHERE tenant_id = $1 AND id = ANY($2::bigint[])",
                            tenant_id, sorted({seq for seq, _ in heads}))
    stored = {int(r["id"]): bytes(r["row_hash"]).hex() for r in rows}
    return sorted({seq for seq, digest in heads if stored.get(seq) != digest.lower()})


# -- the publisher ---------------------------------------------------------------------------------------------

class AuditHeadPublisher(AsyncResource):
    """Signs and publishes every tenant's chain head at start, every ``interval`` seconds when it moved, and at
    stop (after the last staged lines were chained, when entered on the stack before the flusher).

    Args:
        pool: the app-role pool (``iim.audit_heads`` is the one cross-tenant read it needs).
        key: the Ed25519 signing key (:func:`load_private_key` of a ``file:``/``env:`` reference).
        heads_file: where signed heads are appended as JSON lines (``None``: log and API only).
    """

    def __init__(self, pool: Pool, key: Ed25519PrivateKey, *, heads_file: Path | None = None,
                 interval: float = 300.0) -> None:
        self._pool = pool
        self._key = key
        self._file = heads_file
        self._interval = interval
        self._published: dict[UUID, int] = {}
        self._latest: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def key_id(self) -> str:
        return key_id(self._key.public_key())

    def latest(self, tenant_id: UUID | None = None) -> list[dict[str, Any]]:
        """The last signed head of every tenant (or of ``tenant_id``) this process published."""
        if tenant_id is not None:
            found = self._latest.get(str(tenant_id))
            return [found] if found is not None else []
        return [self._latest[t] for t in sorted(self._latest)]

    async def start(self) -> None:
        if self._file is not None:
            self._file.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(*_DB_ERRORS):
            await self.publish()
        self._task = asyncio.create_task(self._run(), name="audit-heads")

    async def publish(self) -> int:
        """Sign and publish the heads that moved since the last time; the number published."""
        lines = [sign_head(h, self._key) for h in await current_heads(self._pool)
                 if self._published.get(h.tenant_id) != h.seq]
        if not lines:
            return 0
        if self._file is not None:
            text = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
            await asyncio.to_thread(_append, self._file, text)
        for line in lines:
            self._published[UUID(line["tenant_id"])] = line["seq"]
            self._latest[line["tenant_id"]] = line
            log.info("audit chain head", extra={"audit_head": line})
        return len(lines)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.publish()
            except (*_DB_ERRORS, OSError) as exc:
                log.warning("audit heads not published (%s); retrying", type(exc).__name__)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.publish()
        except (*_DB_ERRORS, OSError) as exc:
            log.warning("audit heads not published at stop (%s)", type(exc).__name__)


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())  # published means on disk
