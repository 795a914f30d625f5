"""Who is calling: a static token (bootstrap, always checked first) or an OIDC bearer JWT.

Static tokens answer even while the issuer is away, so an operator can always get in; a JWT is tried only
when the token is not a static one and looks like a JWT (three dot-separated parts). Every failure is the
same 401 (:data:`~iim.admin.auth.BAD_TOKEN`); only a JWT whose keys cannot be fetched is a 503.
"""

from __future__ import annotations

from iim.admin.auth import BAD_TOKEN, Principal, bearer_token
from iim.admin.oidc import OidcVerifier
from iim.admin.problems import Unauthenticated
from iim.admin.token_source import ReloadAuditor, TokenSource
from iim.core.lifecycle import AsyncResource

__all__ = ["Authenticator"]


class Authenticator(AsyncResource):
    """Static token table (reloadable) + optional OIDC verifier; owns the verifier's lifetime, and the auditor of
    the table's reloads when one is given."""

    def __init__(self, tokens: TokenSource, oidc: OidcVerifier | None = None, *,
                 auditor: ReloadAuditor | None = None) -> None:
        self.tokens = tokens
        self.oidc = oidc
        self.auditor = auditor

    async def start(self) -> None:
        if self.oidc is not None:
            await self.oidc.start()
        if self.auditor is not None:
            await self.auditor.start()

    async def aclose(self) -> None:
        if self.auditor is not None:
            await self.auditor.aclose()
        if self.oidc is not None:
            await self.oidc.aclose()

    async def principal(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        principal = self.tokens.current().authenticate(token)
        if principal is not None:
            return principal
        if self.oidc is not None and token.count(".") == 2:
            return await self.oidc.authenticate(token)
        raise Unauthenticated(BAD_TOKEN)
