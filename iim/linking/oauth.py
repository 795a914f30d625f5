"""The OAuth2 client's HTTP: the token endpoint (code exchange, refresh) and revocation (RFC 7009).

A thin driver around :mod:`iim.linking.flow`: each exchange is one POST under the configured deadline, the
answer is read up to 64 KiB and handed to the pure parser. Client authentication is HTTP Basic or in the body
(RFC 6749 §2.3.1); a public client sends only its ``client_id``. Transport failures and deadlines are
``TokenFailure("unavailable")``, never an exception to the caller; nothing here logs a token.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from typing import Self
from urllib.parse import quote

import aiohttp

from iim.connectors.contract import LinkScope
from iim.connectors.linking import AccountLinking
from iim.linking.flow import TokenFailure, TokenGrant, parse_token_answer

__all__ = ["OAuthClient"]

log = logging.getLogger(__name__)

_MAX_ANSWER = 64 * 1024


class OAuthClient:
    """Talks to vendors' authorization servers; one ``aiohttp`` session, owned (``async with``)."""

    def __init__(self, session_factory: Callable[[], aiohttp.ClientSession] | None = None) -> None:
        self._factory = session_factory or (lambda: aiohttp.ClientSession(headers={"User-Agent": "iim-linking"}))
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = self._factory()
        return self

    async def __aexit__(self, *exc: object) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def exchange_code(self, config: AccountLinking, client_secret: str | None, *, code: str, verifier: str,
                            requested: frozenset[LinkScope]) -> TokenGrant | TokenFailure:
        """The authorization code and its PKCE verifier for tokens (RFC 6749 §4.1.3, RFC 7636 §4.5)."""
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": config.redirect_uri,
                "code_verifier": verifier}
        return await self._token(config, client_secret, form, requested)

    async def refresh(self, config: AccountLinking, client_secret: str | None, *, refresh_token: str,
                      scopes: frozenset[LinkScope]) -> TokenGrant | TokenFailure:
        """A refresh token for a new access token (RFC 6749 §6), asking for no more than the link holds."""
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token,
                "scope": config.vendor_scope(scopes)}
        return await self._token(config, client_secret, form, scopes)

    async def revoke(self, config: AccountLinking, client_secret: str | None, *, token: str,
                     hint: str) -> bool:
        """RFC 7009: True when the server answered 200 (also for a token it no longer knows)."""
        if config.revocation_url is None:
            return False
        form = {"token": token, "token_type_hint": hint}
        try:
            status, _ = await self._post(config, config.revocation_url, client_secret, form)
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("token revocation at %s failed: %s", config.revocation_url, type(exc).__name__)
            return False
        return status == 200

    async def _token(self, config: AccountLinking, client_secret: str | None, form: dict[str, str],
                     requested: frozenset[LinkScope]) -> TokenGrant | TokenFailure:
        try:
            status, body = await self._post(config, config.token_url, client_secret, form)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return TokenFailure("unavailable", f"token endpoint: {type(exc).__name__}")
        return parse_token_answer(config, requested, status, body)

    async def _post(self, config: AccountLinking, url: str, client_secret: str | None,
                    form: dict[str, str]) -> tuple[int, bytes]:
        session = self._session
        if session is None or session.closed:
            raise aiohttp.ClientConnectionError("the OAuth client is not open")
        headers = {"Accept": "application/json"}
        form = dict(form)
        if client_secret is not None and config.client_auth == "basic":
            pair = f"{quote(config.client_id, safe='')}:{quote(client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"] = config.client_id
            if client_secret is not None:
                form["client_secret"] = client_secret
        async with asyncio.timeout(config.request_timeout_s), session.post(
                url, data=form, headers=headers, allow_redirects=False) as resp:
            body = await resp.content.read(_MAX_ANSWER + 1)
            return resp.status, b"" if len(body) > _MAX_ANSWER else body
