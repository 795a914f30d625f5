"""A connector's account-linking settings: where its vendor's OAuth2 authorization server is, who IIM is there,
and what each of IIM's three scopes is called at that vendor.

A household links its vendor account by the authorization code grant with PKCE (RFC 6749 §4.1, RFC 7636 S256);
``iim.linking`` runs the flow and keeps the tokens, connectors only declare these settings (under
``account_linking`` in their config) and ask :class:`iim.connectors.contract.LinkedTokens` for a household's
access token when they call the vendor.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from yarl import URL

from iim.connectors.contract import LinkScope

__all__ = ["AccountLinking", "AccountLinkingCapable", "check_oauth_url"]

_VENDOR_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")  # RFC 6749 §3.3 scope-token


def check_oauth_url(value: str, what: str) -> str:
    """HTTPS only (plain HTTP only to loopback, for tests and local gateways), no credentials, no fragment."""
    try:
        url = URL(value)
    except (ValueError, TypeError):
        raise ValueError(f"{what} is not a URL") from None
    if url.scheme not in ("https", "http") or not url.host:
        raise ValueError(f"{what} must be an absolute https:// URL")
    if url.user is not None or url.password is not None:
        raise ValueError(f"{what} must not carry credentials (use a credential reference)")
    if url.scheme == "http" and not _is_loopback(url.host):
        raise ValueError(f"{what} must use https (plain http is allowed to loopback only)")
    if url.fragment:
        raise ValueError(f"{what} must not have a fragment")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _default_scope_names() -> dict[LinkScope, str]:
    return {scope: scope.value for scope in LinkScope}


class AccountLinking(BaseModel):
    """One vendor's authorization server, as IIM's OAuth2 client knows it. No secrets: references only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    authorize_url: str
    token_url: str
    #: RFC 7009 revocation endpoint; without it unlinking only forgets the tokens.
    revocation_url: str | None = None
    client_id: str = Field(min_length=1, max_length=256)
    #: ``None``: a public client (PKCE alone proves the code is ours).
    client_secret_ref: Annotated[str, StringConstraints(pattern=r"^(env|file):\S+$", max_length=1024)] | None = None
    #: ``basic``: HTTP Basic (RFC 6749 §2.3.1); ``post``: in the form body.
    client_auth: Literal["basic", "post"] = "basic"
    #: IIM's callback as registered at the vendor (``{IIM's public URL}/oauth2/callback``).
    redirect_uri: str
    #: IIM's scope -> the vendor's name for it; a grant naming anything else is refused.
    scope_names: dict[LinkScope, Annotated[str, StringConstraints(pattern=_VENDOR_SCOPE.pattern)]] = Field(
        default_factory=_default_scope_names)
    #: every request to the authorization server has this deadline
    request_timeout_s: float = Field(default=10.0, gt=0, le=60)
    #: renew an access token this long before it expires
    refresh_before_s: float = Field(default=300.0, ge=10, le=86_400)
    #: how long a started linking waits for the household to come back
    state_ttl_s: int = Field(default=600, ge=60, le=3600)

    @field_validator("authorize_url", "token_url", "revocation_url", "redirect_uri")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else check_oauth_url(value, "URL")

    @model_validator(mode="after")
    def _distinct_scope_names(self) -> AccountLinking:
        names = list(self.scope_names.values())
        if len(set(names)) != len(names):
            raise ValueError("scope_names must give each IIM scope its own vendor name")
        return self

    def vendor_scope(self, scopes: frozenset[LinkScope]) -> str:
        """The ``scope`` parameter for these IIM scopes (space-separated, in a stable order)."""
        missing = [s for s in scopes if s not in self.scope_names]
        if missing:
            raise ValueError(f"this vendor has no name for {', '.join(sorted(missing))}")
        return " ".join(self.scope_names[s] for s in sorted(scopes))


@runtime_checkable
class AccountLinkingCapable(Protocol):
    """A connector whose households link their vendor accounts (its config has ``account_linking``)."""

    @property
    def account_linking(self) -> AccountLinking | None: ...
