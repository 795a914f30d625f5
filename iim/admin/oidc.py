"""Bearer JWTs from an OIDC issuer, turned into a :class:`~iim.admin.auth.Principal`.

A token is accepted only when all of these hold (pyjwt does the signature and the time claims):

* its header names an algorithm of ``IIM_OIDC_ALGORITHMS`` (asymmetric only) and a ``kid`` the issuer
  publishes, and that key was made for that algorithm (:meth:`~iim.admin.jwks.SigningKey.fits`);
* ``iss`` is the issuer, ``aud`` holds the audience, ``exp``/``iat`` present and ``nbf`` if present hold within
  ``leeway_s``, and ``exp - iat`` is no longer than ``max_token_lifetime_s``;
* ``sub`` is a printable name and the roles claim (``iim_roles``) is a list of valid grants::

      "iim_roles": [{"role": "operator", "tenant": "<uuid>"},
                    {"role": "viewer", "tenant": "<uuid>", "brand": "<uuid>"}]

The actor written into audit rows is ``"<sub> (<iss>)"``. Every refusal is the same
:class:`~iim.admin.problems.Unauthenticated` (which check failed is logged, not answered); keys that cannot
be fetched are :class:`~iim.admin.problems.IdentityUnavailable` (503 + Retry-After).
"""

from __future__ import annotations

import logging
import re
from uuid import UUID

import jwt
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, model_validator

from iim.admin.auth import BAD_TOKEN, Grant, Principal, Role
from iim.admin.jwks import IssuerUnavailable, JwksClient, KeyCache, KeyUnknown
from iim.admin.problems import IdentityUnavailable, Unauthenticated
from iim.admin.settings import OidcSettings
from iim.core.lifecycle import AsyncResource

__all__ = ["BAD_TOKEN", "OidcVerifier", "RoleClaim", "grants_from_claim"]

log = logging.getLogger("iim.admin.oidc")

MAX_TOKEN_CHARS = 8192
MAX_GRANTS = 50
#: Printable ASCII, no surrounding blanks, at most 100 characters: with the issuer (at most 96) the actor fits
#: the audit log's 200.
_SUB = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]{0,98}[\x21-\x7e])?$")


class RoleClaim(BaseModel):
    """One entry of the roles claim: a role and its scope (same rules as a static token, plus brand/region)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    role: Role
    tenant: UUID | None = None
    brand: UUID | None = None
    region: UUID | None = None

    @model_validator(mode="after")
    def _scope_fits_role(self) -> RoleClaim:
        if self.role is Role.ADMIN and (self.tenant, self.brand, self.region) != (None, None, None):
            raise ValueError("an admin role is not scoped")
        if self.role is Role.OPERATOR and self.tenant is None:
            raise ValueError("an operator role must name its tenant")
        if (self.brand is not None or self.region is not None) and self.tenant is None:
            raise ValueError("a brand or region scope needs its tenant")
        return self


_CLAIM = TypeAdapter(list[RoleClaim])


def grants_from_claim(value: object) -> tuple[Grant, ...]:
    """The grants of a roles claim; raises ``ValueError`` when any entry is invalid (the token grants nothing)."""
    if not isinstance(value, list) or len(value) > MAX_GRANTS:
        raise ValueError(f"the roles claim must be a list of at most {MAX_GRANTS} entries")
    try:
        claims = _CLAIM.validate_python(value)
    except ValidationError as exc:
        raise ValueError(f"invalid roles claim: {exc.errors()[0]['msg']}") from exc
    return tuple(Grant(c.role, c.tenant, c.brand, c.region) for c in claims)


class _Rejected(Exception):
    """Why a token was refused (logged; the caller gets :data:`BAD_TOKEN`)."""


class OidcVerifier(AsyncResource):
    """Verifies bearer JWTs of ``settings.issuer``; owns the key client (started and closed with it)."""

    def __init__(self, settings: OidcSettings, *, jwks: JwksClient | None = None) -> None:
        if settings.issuer is None or settings.audience is None:
            raise ValueError("OidcVerifier needs IIM_OIDC_ISSUER and IIM_OIDC_AUDIENCE")
        self._settings = settings
        self._issuer: str = settings.issuer
        self._audience: str = settings.audience
        self._jwks = jwks or JwksClient(
            settings.issuer, settings.algorithms, timeout_s=settings.fetch_timeout_s,
            cache=KeyCache(ttl_s=settings.jwks_ttl_s, min_refetch_s=settings.jwks_min_refetch_s,
                           max_stale_s=settings.jwks_max_stale_s))

    async def start(self) -> None:
        await self._jwks.start()

    async def aclose(self) -> None:
        await self._jwks.aclose()

    async def authenticate(self, token: str) -> Principal:
        """The principal of a valid token; :class:`Unauthenticated` or :class:`IdentityUnavailable` otherwise."""
        try:
            return await self._verify(token)
        except _Rejected as exc:
            log.info("OIDC bearer token refused: %s", exc)
            raise Unauthenticated(BAD_TOKEN) from None
        except IssuerUnavailable as exc:
            raise IdentityUnavailable("the identity provider's keys cannot be fetched; retry later",
                                      retry_after_s=self._settings.retry_after_s) from exc

    async def _verify(self, token: str) -> Principal:
        s = self._settings
        if len(token) > MAX_TOKEN_CHARS:
            raise _Rejected("token too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _Rejected(f"malformed header: {type(exc).__name__}") from exc
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in s.algorithms:
            raise _Rejected(f"algorithm {str(alg)[:20]!r} not accepted")
        if not isinstance(kid, str) or not 1 <= len(kid) <= 200:
            raise _Rejected("no kid")
        try:
            key = await self._jwks.key(kid)
        except KeyUnknown as exc:
            raise _Rejected("unknown kid") from exc
        if not key.fits(alg):
            raise _Rejected(f"key {kid[:40]!r} is not a {alg} key")
        try:
            claims = jwt.decode(
                token, key.key.key, algorithms=[alg], audience=self._audience, issuer=self._issuer,
                leeway=s.leeway_s, options={"require": ["exp", "iat", "iss", "aud", "sub"], "verify_signature": True},
            )
        except jwt.PyJWTError as exc:
            raise _Rejected(f"{type(exc).__name__}: {exc}") from exc
        return self._principal(claims)

    def _principal(self, claims: dict[str, object]) -> Principal:
        s = self._settings
        exp, iat, sub = claims["exp"], claims["iat"], claims["sub"]
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            raise _Rejected("exp/iat not numbers")
        if exp - iat > s.max_token_lifetime_s:
            raise _Rejected(f"lifetime {exp - iat:.0f} s exceeds {s.max_token_lifetime_s} s")
        if not isinstance(sub, str) or not _SUB.match(sub):
            raise _Rejected("sub is not a printable name of at most 100 characters")
        try:
            grants = grants_from_claim(claims.get(s.roles_claim, []))
        except ValueError as exc:
            raise _Rejected(str(exc)) from exc
        return Principal(f"{sub} ({self._issuer})", grants)

