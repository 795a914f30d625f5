"""Bearer tokens for the admin API, mapped to an actor, a role and (optionally) one tenant.

The token table is configured by reference (``IIM_ADMIN_TOKENS_REF=env:VAR`` or ``file:/path``)
and holds JSON keyed by the SHA-256 (hex) of each token, never the token itself::

    {"<sha256 hex of token>": {"actor": "alice@noc", "role": "operator", "tenant": "<tenant uuid>"}}

Roles:

* ``admin``    -- everything, including creating, changing and deleting tenants (``tenant`` must be null);
* ``operator`` -- reads and writes the registry of exactly one tenant (``tenant`` required);
* ``viewer``   -- reads only; of one tenant, or of every tenant when ``tenant`` is null.

A presented token is hashed and compared with *every* stored hash with
:func:`hmac.compare_digest`, so the time taken does not tell which entry (if any) matched.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from iim.admin.problems import Forbidden, Unauthenticated
from iim.core.secrets import resolve_secret


class Role(enum.StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"


class TokenEntry(BaseModel):
    """What one token grants."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    actor: str = Field(min_length=1, max_length=200, description="who acts; written into every audit row")
    role: Role
    tenant: UUID | None = None

    @model_validator(mode="after")
    def _tenant_matches_role(self) -> TokenEntry:
        if self.role is Role.OPERATOR and self.tenant is None:
            raise ValueError("an operator token must name its tenant")
        if self.role is Role.ADMIN and self.tenant is not None:
            raise ValueError("an admin token is not bound to a tenant (use operator or viewer)")
        return self


class TokenConfigError(ValueError):
    """The token table cannot be read or is not valid; the message never contains a token."""


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of one request."""

    actor: str
    role: Role
    tenant: UUID | None

    def can_read(self, tenant_id: UUID) -> bool:
        return self.tenant is None or self.tenant == tenant_id

    def can_write(self, tenant_id: UUID) -> bool:
        if self.role is Role.ADMIN:
            return True
        return self.role is Role.OPERATOR and self.tenant == tenant_id

    def require_read(self, tenant_id: UUID) -> None:
        if not self.can_read(tenant_id):
            raise Forbidden(f"{self.role} token of {self.actor!r} may not read this tenant")

    def require_write(self, tenant_id: UUID) -> None:
        self.require_read(tenant_id)
        if not self.can_write(tenant_id):
            raise Forbidden(f"{self.role} token of {self.actor!r} may not change this tenant's registry")

    def require_admin(self) -> None:
        if self.role is not Role.ADMIN:
            raise Forbidden(f"only an admin token may manage tenants ({self.actor!r} is {self.role})")


def hash_token(token: str) -> str:
    """The key under which ``token`` is stored in the table: SHA-256, lower-case hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random bearer token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


class TokenTable:
    """Immutable hash -> :class:`TokenEntry` map with a constant-time lookup."""

    def __init__(self, entries: Mapping[str, TokenEntry]) -> None:
        self._entries: tuple[tuple[bytes, TokenEntry], ...] = tuple(
            (bytes.fromhex(digest), entry) for digest, entry in entries.items()
        )

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def from_json(cls, text: str) -> TokenTable:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TokenConfigError(f"admin token table is not JSON (line {exc.lineno})") from exc
        if not isinstance(raw, dict):
            raise TokenConfigError("admin token table must be a JSON object keyed by token SHA-256")
        entries: dict[str, TokenEntry] = {}
        for key, value in raw.items():
            digest = key.lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                # Do not echo the key: a misconfigured table may hold a plaintext token.
                raise TokenConfigError("admin token table keys must be SHA-256 hex digests of the tokens")
            try:
                entries[digest] = TokenEntry.model_validate(value)
            except ValidationError as exc:
                raise TokenConfigError(f"admin token entry {digest[:8]}...: {exc.errors()[0]['msg']}") from exc
        return cls(entries)

    @classmethod
    def load(cls, ref: str | None) -> TokenTable:
        """Resolve ``env:VAR`` / ``file:/path``; an unset reference yields an empty table (all requests 401)."""
        if not ref:
            return cls({})
        try:
            text = resolve_secret(ref)
        except (LookupError, ValueError) as exc:
            raise TokenConfigError(f"admin token table: {exc}") from exc
        return cls.from_json(text)

    def authenticate(self, token: str) -> Principal | None:
        presented = hashlib.sha256(token.encode()).digest()
        found: TokenEntry | None = None
        for digest, entry in self._entries:
            # No early exit: every entry is compared whatever matched before.
            if hmac.compare_digest(presented, digest):
                found = entry
        if found is None:
            return None
        return Principal(actor=found.actor, role=found.role, tenant=found.tenant)


def principal_from_header(authorization: str | None, table: TokenTable) -> Principal:
    """Authenticate an ``Authorization: Bearer <token>`` header or raise :class:`Unauthenticated`."""
    if not authorization:
        raise Unauthenticated("an Authorization: Bearer <token> header is required")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the Authorization header must use the Bearer scheme")
    principal = table.authenticate(token)
    if principal is None:
        raise Unauthenticated("the bearer token is not valid")
    return principal
