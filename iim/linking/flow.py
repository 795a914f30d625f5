"""The pure half of account linking: values, URLs and answers in, decisions out; no I/O, no clock of its own.

State and PKCE (RFC 7636): the state is 256 random bits, stored only as its SHA-256; the code verifier is 512
random bits (86 characters of the unreserved set) and only its S256 challenge leaves IIM before the token
exchange. The callback's query is parsed strictly (one ``state``, then ``code`` or ``error``, each once and of a
bounded alphabet), so whatever arrives there is either a well-formed answer or :class:`Malformed`. A token
endpoint's answer becomes a :class:`TokenGrant` or a :class:`TokenFailure`; a grant naming any scope beyond what
was asked (and IIM never asks beyond its three) is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from yarl import URL

from iim.connectors.contract import LinkScope
from iim.connectors.linking import AccountLinking

__all__ = [
    "CallbackAnswer", "Denied", "Malformed", "TokenFailure", "TokenGrant", "authorization_url", "granted_scopes",
    "new_state", "new_verifier", "parse_callback", "parse_token_answer", "refresh_due", "s256_challenge",
    "state_digest",
]

_STATE = re.compile(r"[A-Za-z0-9_-]{43}")
_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_CODE = re.compile(r"[\x20-\x7e]{1,2048}")  # RFC 6749 Appendix A.11: VSCHAR
_ERROR = re.compile(r"[a-z_]{1,64}")  # the registered error codes; anything else is reported as "other"
_DEFAULT_LIFETIME_S = 3600
_MAX_LIFETIME_S = 366 * 86_400


def new_state() -> str:
    """256 random bits, URL-safe (43 characters)."""
    return secrets.token_urlsafe(32)


def state_digest(state: str) -> bytes:
    """What is stored of a state: its SHA-256 (whoever reads the table cannot complete a linking)."""
    return hashlib.sha256(state.encode()).digest()


def new_verifier() -> str:
    """A PKCE code verifier: 512 random bits as 86 characters of RFC 7636's unreserved set."""
    return secrets.token_urlsafe(64)


def s256_challenge(verifier: str) -> str:
    """``BASE64URL(SHA256(ASCII(code_verifier)))`` without padding (RFC 7636 §4.2)."""
    if not _VERIFIER.fullmatch(verifier):
        raise ValueError("a code verifier is 43-128 characters of [A-Za-z0-9._~-]")
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def authorization_url(config: AccountLinking, *, state: str, challenge: str, scopes: frozenset[LinkScope]) -> str:
    """Where the household's browser goes to consent: the vendor's authorize endpoint with our parameters."""
    url = URL(config.authorize_url)
    return str(url.update_query({
        "response_type": "code", "client_id": config.client_id, "redirect_uri": config.redirect_uri,
        "scope": config.vendor_scope(scopes), "state": state, "code_challenge": challenge,
        "code_challenge_method": "S256",
    }))


# --- the callback ------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CallbackAnswer:
    """The vendor sent the household back with a code."""

    state: str
    code: str


@dataclass(frozen=True, slots=True)
class Denied:
    """The vendor sent the household back with an error (``access_denied``: they declined)."""

    state: str
    error: str


@dataclass(frozen=True, slots=True)
class Malformed:
    """Not an answer to any linking (the reason is for the log, never for the page)."""

    reason: str


def parse_callback(query: Iterable[tuple[str, str]]) -> CallbackAnswer | Denied | Malformed:
    """The callback's query: exactly one well-formed ``state`` and either one ``code`` or one ``error``."""
    seen: dict[str, list[str]] = {}
    for name, value in query:
        if name in ("state", "code", "error"):
            seen.setdefault(name, []).append(value)
    for name, values in seen.items():
        if len(values) != 1:
            return Malformed(f"{name} given {len(values)} times")
    state = seen.get("state", [None])[0]
    if state is None or not _STATE.fullmatch(state):
        return Malformed("no well-formed state")
    code, error = seen.get("code", [None])[0], seen.get("error", [None])[0]
    if (code is None) == (error is None):
        return Malformed("exactly one of code and error is expected")
    if error is not None:
        return Denied(state, error if _ERROR.fullmatch(error) else "other")
    assert code is not None
    if not _CODE.fullmatch(code):
        return Malformed("the code is not a well-formed authorization code")
    return CallbackAnswer(state, code)


# --- the token endpoint ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TokenGrant:
    """Tokens the authorization server issued. ``refresh_token`` is ``None`` when it issued none (on a refresh:
    keep the old one, RFC 6749 §6)."""

    access_token: str
    expires_in: int
    refresh_token: str | None
    scopes: frozenset[LinkScope]

    def __repr__(self) -> str:
        return f"TokenGrant(expires_in={self.expires_in}, scopes={sorted(self.scopes)}, refresh={self.refresh_token is not None})"


@dataclass(frozen=True, slots=True)
class TokenFailure:
    """Why no grant: ``invalid_grant`` (the code or refresh token is dead: re-link), ``refused`` (another 4xx:
    our client or request is wrong), ``too_wide`` (a scope beyond what we asked), ``unavailable`` (5xx or an
    answer that is not one: try again later)."""

    kind: Literal["invalid_grant", "refused", "too_wide", "unavailable"]
    detail: str
    #: tokens the server issued all the same (a grant too wide): ``(token, type hint)`` to revoke
    issued: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:
        return f"TokenFailure({self.kind!r}, {self.detail!r}, issued={len(self.issued)})"


def granted_scopes(config: AccountLinking, requested: frozenset[LinkScope],
                   scope: str | None) -> frozenset[LinkScope] | TokenFailure:
    """The IIM scopes a grant carries; absent means as requested (RFC 6749 §5.1). Refused when it names a scope
    IIM does not know or did not ask for: wider access is not accepted, even if the household consented."""
    if scope is None:
        return requested
    by_name = {name: ours for ours, name in config.scope_names.items()}
    found: set[LinkScope] = set()
    for name in scope.split():
        ours = by_name.get(name)
        if ours is None or ours not in requested:
            return TokenFailure("too_wide", "the grant names a scope IIM did not ask for")
        found.add(ours)
    if not found:
        return TokenFailure("refused", "the grant names no scope")
    return frozenset(found)


def parse_token_answer(config: AccountLinking, requested: frozenset[LinkScope], status: int,
                       body: bytes) -> TokenGrant | TokenFailure:
    """One answer of the token endpoint (RFC 6749 §5.1, §5.2)."""
    try:
        doc = json.loads(body) if body else None
    except (ValueError, RecursionError):
        doc = None
    if 400 <= status < 500:
        code = doc.get("error") if isinstance(doc, Mapping) else None
        if code == "invalid_grant":
            return TokenFailure("invalid_grant", "the authorization server says invalid_grant")
        shown = code if isinstance(code, str) and _ERROR.fullmatch(code) else "unknown"
        return TokenFailure("refused", f"HTTP {status} ({shown})")
    if status != 200:
        return TokenFailure("unavailable", f"HTTP {status}")
    if not isinstance(doc, Mapping):
        return TokenFailure("unavailable", "the answer is not a JSON object")
    access, token_type = doc.get("access_token"), doc.get("token_type")
    if not isinstance(access, str) or not 0 < len(access) <= 8192:
        return TokenFailure("unavailable", "no access_token in the answer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        return TokenFailure("unavailable", "token_type is not bearer")
    refresh = doc.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or not 0 < len(refresh) <= 8192):
        return TokenFailure("unavailable", "a malformed refresh_token")
    expires_in = doc.get("expires_in", _DEFAULT_LIFETIME_S)
    if type(expires_in) is not int or not 0 < expires_in <= _MAX_LIFETIME_S:
        expires_in = _DEFAULT_LIFETIME_S
    scope = doc.get("scope")
    if scope is not None and not isinstance(scope, str):
        return TokenFailure("unavailable", "a malformed scope")
    scopes = granted_scopes(config, requested, scope)
    if isinstance(scopes, TokenFailure):
        issued = ((access, "access_token"),) + (() if refresh is None else ((refresh, "refresh_token"),))
        return TokenFailure(scopes.kind, scopes.detail, issued)
    return TokenGrant(access, expires_in, refresh, scopes)


def refresh_due(expires_at: float, now: float, before_s: float) -> bool:
    """Renew when the access token has less than ``before_s`` left."""
    return expires_at - now <= before_s
