"""A small OAuth2 authorization server for the account-linking tests: a real aiohttp server, not a mock.

``GET /authorize`` (the household's consent, given at once or declined on command), ``POST /token``
(authorization code with PKCE S256 verified, refresh with rotation: a used refresh token is dead and reusing
it kills the grant, as RFC 9700 §4.14 advises), ``POST /revoke`` (RFC 7009). Clients authenticate with HTTP
Basic. Access tokens it issues are accepted by the vendor peer (:class:`tests.connector_peer.VendorPeer`) until
they are revoked or their grant dies.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from yarl import URL

from tests.connector_peer import VendorPeer

CLIENT_ID = "iim-linking"
CLIENT_SECRET = "linking-client-s3cr3t"
SCOPES = {"read_events": "events.read", "send_notifications": "notify.send", "voice_interaction": "voice.talk"}


@dataclass
class _Grant:
    scope: str
    access: set[str] = field(default_factory=set)
    alive: bool = True


@dataclass
class AuthorizationServer:
    vendor: VendorPeer
    redirect_uri: str = ""
    url: str = ""
    access_lifetime_s: int = 3600
    #: answer the consent with ``error=access_denied``
    deny: bool = False
    #: grant this scope string instead of what was asked (a vendor widening the grant)
    grant_scope: str | None = None
    #: issue a new refresh token on each refresh (rotation)
    rotate: bool = True
    #: answer this many token requests with 503
    fail_token: int = 0
    codes: dict[str, dict[str, str]] = field(default_factory=dict)
    refresh_tokens: dict[str, _Grant] = field(default_factory=dict)
    revoked: list[tuple[str, str]] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/authorize", self._authorize)
        app.router.add_post("/token", self._token)
        app.router.add_post("/revoke", self._revoke)
        return app

    def kill_grants(self) -> None:
        """The household withdrew consent at the vendor: every refresh token is dead, access tokens too."""
        for grant in self.refresh_tokens.values():
            self._kill(grant)

    def _kill(self, grant: _Grant) -> None:
        grant.alive = False
        self.vendor.valid_tokens.difference_update(grant.access)

    def _client_ok(self, request: web.Request) -> bool:
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        return request.headers.get("Authorization") == expected

    async def _authorize(self, request: web.Request) -> web.Response:
        q = request.query
        if (q.get("client_id") != CLIENT_ID or q.get("redirect_uri") != self.redirect_uri
                or q.get("response_type") != "code" or q.get("code_challenge_method") != "S256"
                or len(q.get("code_challenge", "")) != 43 or not q.get("state")):
            return web.Response(status=400, text="bad authorization request")
        known = set(SCOPES.values())
        asked = q.get("scope", "").split()
        if not asked or not set(asked) <= known:
            return web.Response(status=400, text="bad scope")
        back = URL(self.redirect_uri)
        if self.deny:
            raise web.HTTPFound(str(back.update_query(error="access_denied", state=q["state"])))
        code = secrets.token_urlsafe(24)
        self.codes[code] = {"challenge": q["code_challenge"], "scope": " ".join(asked), "redirect_uri": self.redirect_uri}
        raise web.HTTPFound(str(back.update_query(code=code, state=q["state"])))

    def _issue(self, grant: _Grant) -> dict[str, Any]:
        access = f"at-{secrets.token_hex(12)}"
        grant.access.add(access)
        self.vendor.valid_tokens.add(access)
        return {"access_token": access, "token_type": "Bearer", "expires_in": self.access_lifetime_s,
                "scope": self.grant_scope or grant.scope}

    def _new_refresh(self, grant: _Grant) -> str:
        token = f"rt-{secrets.token_hex(16)}"
        self.refresh_tokens[token] = grant
        return token

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.token_requests.append(form)
        if self.fail_token > 0:
            self.fail_token -= 1
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        if not self._client_ok(request):
            return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") == "authorization_code":
            issued = self.codes.pop(form.get("code", ""), None)
            verifier = form.get("code_verifier", "")
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
            if issued is None or issued["redirect_uri"] != form.get("redirect_uri") or challenge != issued["challenge"]:
                return web.json_response({"error": "invalid_grant"}, status=400)
            grant = _Grant(issued["scope"])
            return web.json_response({**self._issue(grant), "refresh_token": self._new_refresh(grant)})
        if form.get("grant_type") == "refresh_token":
            grant = self.refresh_tokens.get(form.get("refresh_token", ""))
            if grant is None or not grant.alive:
                if grant is not None:
                    self._kill(grant)
                return web.json_response({"error": "invalid_grant"}, status=400)
            if not set(form.get("scope", grant.scope).split()) <= set(grant.scope.split()):
                return web.json_response({"error": "invalid_scope"}, status=400)
            answer = self._issue(grant)
            if self.rotate:
                successor = _Grant(grant.scope, grant.access)
                grant.alive, grant.access = False, set()  # the used token is dead; its grant lives on in the new one
                answer["refresh_token"] = self._new_refresh(successor)
            return web.json_response(answer)
        return web.json_response({"error": "unsupported_grant_type"}, status=400)

    async def _revoke(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        if not self._client_ok(request):
            return web.json_response({"error": "invalid_client"}, status=401)
        token, hint = form.get("token", ""), form.get("token_type_hint", "")
        self.revoked.append((token, hint))
        grant = self.refresh_tokens.get(token)
        if grant is not None:
            self._kill(grant)
        self.vendor.valid_tokens.discard(token)
        return web.Response(status=200)
