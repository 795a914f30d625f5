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


#: The one answer to every authentication failure, static token or JWT: no oracle on which check failed.
BAD_TOKEN = "a valid Authorization: Bearer <token> header is required"  # noqa: S105 -- a message, not a secret


class TokenConfigError(ValueError):
    """The token table cannot be read or is not valid; the message never contains a token."""


@dataclass(frozen=True, slots=True)
class Grant:
    """One role in one scope: every tenant (``tenant`` None), one tenant, or one brand/region of a tenant."""

    role: Role
    tenant: UUID | None = None
    brand: UUID | None = None
    region: UUID | None = None

    @property
    def tenant_wide(self) -> bool:
        return self.brand is None and self.region is None

    def reads(self, tenant_id: UUID) -> bool:
        return self.role is Role.ADMIN or self.tenant is None or self.tenant == tenant_id

    def writes(self, tenant_id: UUID) -> bool:
        return self.role is Role.ADMIN or (self.role is Role.OPERATOR and self.tenant == tenant_id)

    def covers(self, brand: UUID | None, region: UUID | None) -> bool:
        """Does this grant's brand/region scope hold a household of ``brand`` / ``region``?"""
        return (self.brand is None or self.brand == brand) and (self.region is None or self.region == region)


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of one request: who (written into audit rows) and what it may do.

    Deny by default: an action is allowed only when one grant allows it; a grant scoped to a brand or a
    region allows nothing tenant-wide, only households of its brand/region (:meth:`require_household`).
    """

    actor: str
    grants: tuple[Grant, ...]

    @classmethod
    def single(cls, actor: str, role: Role, tenant: UUID | None = None) -> Principal:
        return cls(actor, (Grant(role, tenant),))

    def _describe(self) -> str:
        roles = ", ".join(sorted({g.role.value for g in self.grants})) or "no role"
        return f"{self.actor!r} ({roles})"

    def visible_tenants(self) -> frozenset[UUID] | None:
        """The tenants this caller may see at all; ``None``: every tenant."""
        if any(g.tenant is None for g in self.grants):
            return None
        return frozenset(g.tenant for g in self.grants if g.tenant is not None)

    def can_read(self, tenant_id: UUID) -> bool:
        return any(g.tenant_wide and g.reads(tenant_id) for g in self.grants)

    def can_write(self, tenant_id: UUID) -> bool:
        return any(g.tenant_wide and g.writes(tenant_id) for g in self.grants)

    def can_reach_households(self, tenant_id: UUID) -> bool:
        """Some grant (tenant-wide or scoped) reaches households of this tenant."""
        return any(g.reads(tenant_id) for g in self.grants)

    def can_household(self, tenant_id: UUID, brand: UUID | None, region: UUID | None, *, write: bool) -> bool:
        return any((g.writes(tenant_id) if write else g.reads(tenant_id)) and g.covers(brand, region)
                   for g in self.grants)

    def require_read(self, tenant_id: UUID) -> None:
        if not self.can_read(tenant_id):
            raise Forbidden(f"{self._describe()} may not read this tenant")

    def require_write(self, tenant_id: UUID) -> None:
        self.require_read(tenant_id)
        if not self.can_write(tenant_id):
            raise Forbidden(f"{self._describe()} may not change this tenant's registry")

    def require_household(self, tenant_id: UUID, brand: UUID | None, region: UUID | None, *, write: bool) -> None:
        if not self.can_household(tenant_id, brand, region, write=write):
            raise Forbidden(f"{self._describe()} may not {'change' if write else 'read'} this household")

    def require_admin(self) -> None:
        if not any(g.role is Role.ADMIN for g in self.grants):
            raise Forbidden(f"only an admin may manage tenants ({self._describe()})")


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

    def entries(self) -> dict[str, TokenEntry]:
        """Hash (hex) -> entry: what a reload compares (never the tokens, which the table does not hold)."""
        return {digest.hex(): entry for digest, entry in self._entries}

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
        return Principal.single(found.actor, found.role, found.tenant)


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or :class:`Unauthenticated` (:data:`BAD_TOKEN`)."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated(BAD_TOKEN)
    return token


def principal_from_header(authorization: str | None, table: TokenTable) -> Principal:
    """Authenticate an ``Authorization: Bearer <token>`` header against ``table`` or raise :class:`Unauthenticated`."""
    principal = table.authenticate(bearer_token(authorization))
    if principal is None:
        raise Unauthenticated(BAD_TOKEN)
    return principal
