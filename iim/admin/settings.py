"""Settings of the admin API from ``IIM_ADMIN_*`` environment variables."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from iim.admin.jwks import is_allowed_url


class AdminSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IIM_ADMIN_", extra="ignore")

    tokens_ref: str | None = Field(
        default=None,
        description="env:VAR or file:/path holding the token table JSON; unset -> every request is 401",
    )
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_page_size: int = Field(default=1000, ge=1, le=10_000)
    prefix: str = Field(default="/v1", pattern=r"^/[a-z0-9]+$", description="where the API is mounted")
    store_deadline_s: float = Field(default=5.0, gt=0,
                                    description="the longest a request waits for PostgreSQL before its 503")
    tokens_check_interval_s: float = Field(default=1.0, ge=0, le=3600,
                                           description="how often the token file is looked at for changes")


#: Asymmetric signatures only: never ``none``, never HS* (an HMAC "verified" with the issuer's public key).
SIGNING_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384"})


class OidcSettings(BaseSettings):
    """Bearer JWTs from one OIDC issuer (``IIM_OIDC_*``); unset issuer: static tokens only."""

    model_config = SettingsConfigDict(env_prefix="IIM_OIDC_", extra="ignore")

    issuer: str | None = Field(default=None, max_length=96,
                               description="the issuer URL, exactly as in the tokens' iss (https; http to loopback only)")
    audience: str | None = Field(default=None, min_length=1, max_length=200, description="the tokens' aud must hold it")
    algorithms: list[str] = Field(default=["RS256", "ES256"], min_length=1, description="accepted JWS algorithms")
    roles_claim: str = Field(default="iim_roles", pattern=r"^[A-Za-z_][A-Za-z0-9_:./-]{0,99}$",
                             description="the claim listing the caller's roles and their scopes")
    leeway_s: float = Field(default=60.0, ge=0, le=300, description="clock skew allowed on exp, nbf and iat")
    max_token_lifetime_s: int = Field(default=86_400, ge=60, le=7 * 86_400,
                                      description="tokens whose exp - iat is longer are refused")
    fetch_timeout_s: float = Field(default=5.0, gt=0, le=60, description="deadline of discovery + JWKS fetch")
    jwks_ttl_s: float = Field(default=300.0, ge=1, description="keys are refetched when older than this")
    jwks_min_refetch_s: float = Field(default=30.0, ge=0,
                                      description="fetches (unknown kid, expired cache) at most this often")
    jwks_max_stale_s: float = Field(default=86_400.0, ge=1,
                                    description="keys fetched earlier still verify this long while the issuer is away")
    retry_after_s: int = Field(default=30, ge=1, le=3600, description="Retry-After of the 503 when keys are unavailable")

    @field_validator("issuer")
    @classmethod
    def _issuer_url(cls, value: str | None) -> str | None:
        if value is not None and not is_allowed_url(value):
            raise ValueError("the OIDC issuer must be an https:// URL (http:// only to a loopback address)")
        return value

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, value: list[str]) -> list[str]:
        refused = [a for a in value if a not in SIGNING_ALGORITHMS]
        if refused:
            raise ValueError(f"algorithms {refused} are not accepted (allowed: {sorted(SIGNING_ALGORITHMS)})")
        return value

    @model_validator(mode="after")
    def _audience_with_issuer(self) -> OidcSettings:
        if self.issuer is not None and self.audience is None:
            raise ValueError("IIM_OIDC_AUDIENCE is required with IIM_OIDC_ISSUER")
        return self
