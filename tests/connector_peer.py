"""A fake vendor cloud for the connector tests: a real aiohttp server, not a mock of our client.

It checks what a real vendor would (our Standard Webhooks signature, our bearer token), issues OAuth2
client-credentials tokens, misbehaves on command (5xx, slow answers, 429 with Retry-After, revoked tokens)
and answers user actions either in the response or later by a signed callback to ``callback_url``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from iim.core.signing import SignatureError, sign_webhook, verify_webhook

SIGNING_SECRET = b"vendor-shared-secret-0123456789abcdef"
SIGNING_SECRET_TEXT = "whsec_" + base64.b64encode(SIGNING_SECRET).decode()
STATIC_TOKEN = "static-bearer-token-s3cr3t"
CLIENT_ID = "iim-client"
CLIENT_SECRET = "client-secret-s3cr3t"


@dataclass
class Received:
    path: str
    headers: Mapping[str, str]
    body: dict[str, Any]


@dataclass
class VendorPeer:
    """Behaviours are queued per path with :meth:`script`; an empty queue means "answer 200"."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    token_requests: list[Mapping[str, str]] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)
    token_lifetime_s: int = 3600
    refuse_client: bool = False
    signature_failures: int = 0
    #: paths of the health probes (``GET``) that arrived signed and authorised
    probes: list[str] = field(default_factory=list)
    _scripts: dict[str, deque[tuple[Any, ...]]] = field(default_factory=dict)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _session: aiohttp.ClientSession | None = None
    _issued: int = 0
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_received(self, count: int = 1) -> None:
        """Until ``count`` requests (signed and authorised) have arrived."""
        while len(self.received) < count:
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), 5.0)

    def script(self, path: str, *behaviours: tuple[Any, ...]) -> None:
        """Queue behaviours: ("status", 500), ("sleep", 1.0), ("retry_after", "2"), ("choice", "accept"),
        ("pending",), ("callback", "decline", 0.05), ("ok",)."""
        self._scripts.setdefault(path, deque()).extend(behaviours)

    def revoke_tokens(self) -> None:
        self.valid_tokens.clear()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth/token", self._token)
        app.router.add_post("/{tail:.*}", self._capability)
        app.router.add_get("/{tail:.*}", self._probe)
        return app

    async def close(self) -> None:
        for task in list(self._tasks):
            await task
        if self._session is not None:
            await self._session.close()

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.token_requests.append({"authorization": request.headers.get("Authorization", ""),
                                    **{k: str(v) for k, v in form.items()}})
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if self.refuse_client or request.headers.get("Authorization") != expected:
            return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        self._issued += 1
        token = f"tok-{self._issued}-{secrets.token_hex(8)}"
        self.valid_tokens.add(token)
        return web.json_response({"access_token": token, "token_type": "Bearer",
                                  "expires_in": self.token_lifetime_s})

    async def _capability(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            verify_webhook(request.headers, raw, [SIGNING_SECRET], now=time.time())
        except SignatureError:
            self.signature_failures += 1
            return web.json_response({"error": "bad signature"}, status=401)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ")
        if token != STATIC_TOKEN and token not in self.valid_tokens:
            return web.json_response({"error": "invalid_token"}, status=401)
        body = json.loads(raw)
        self.received.append(Received(request.path, dict(request.headers), body))
        self._arrived.set()
        queue = self._scripts.get(request.path)
        behaviour = queue.popleft() if queue else ("ok",)
        kind = behaviour[0]
        if kind == "status":
            return web.json_response({"error": "scripted"}, status=behaviour[1])
        if kind == "sleep":
            await asyncio.sleep(behaviour[1])
            return web.json_response({"id": "vendor-slow"})
        if kind == "retry_after":
            return web.json_response({"error": "slow down"}, status=429, headers={"Retry-After": behaviour[1]})
        if kind == "choice":
            return web.json_response({"choice": behaviour[1]})
        if kind == "pending":
            return web.json_response({"status": "pending"}, status=202)
        if kind == "callback":
            task = asyncio.create_task(self._call_back(body["callback_url"], body["request_id"], behaviour[1],
                                                       behaviour[2]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return web.json_response({"status": "pending"}, status=202)
        return web.json_response({"id": f"vendor-{len(self.received)}"})

    async def _probe(self, request: web.Request) -> web.Response:
        """A health probe: signed like the capabilities (over an empty body) and authorised; scripted the same
        way by path (("status", 503), ("sleep", 5.0), ("retry_after", "30"))."""
        try:
            verify_webhook(request.headers, b"", [SIGNING_SECRET], now=time.time())
        except SignatureError:
            self.signature_failures += 1
            return web.json_response({"error": "bad signature"}, status=401)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token != STATIC_TOKEN and token not in self.valid_tokens:
            return web.json_response({"error": "invalid_token"}, status=401)
        self.probes.append(request.path)
        queue = self._scripts.get(request.path)
        behaviour = queue.popleft() if queue else ("ok",)
        if behaviour[0] == "status":
            return web.json_response({"error": "scripted"}, status=behaviour[1])
        if behaviour[0] == "sleep":
            await asyncio.sleep(behaviour[1])
        if behaviour[0] == "retry_after":
            return web.json_response({"error": "slow down"}, status=429, headers={"Retry-After": behaviour[1]})
        return web.json_response({"status": "ok"})

    async def _call_back(self, url: str, request_id: str, choice: str, delay: float) -> None:
        await asyncio.sleep(delay)
        status, _ = await self.post_callback(url, {"request_id": request_id, "choice": choice})
        assert status == 204, status

    async def post_callback(self, url: str, doc: dict[str, Any], *, secret: bytes = SIGNING_SECRET,
                            timestamp: int | None = None) -> tuple[int, Any]:
        """POST a Standard Webhooks-signed answer, as the vendor would."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        body = json.dumps(doc).encode()
        msg_id = f"cb_{secrets.token_hex(6)}"
        ts = int(time.time()) if timestamp is None else timestamp
        headers = {"webhook-id": msg_id, "webhook-timestamp": str(ts),
                   "webhook-signature": sign_webhook(msg_id, ts, body, secret),
                   "Content-Type": "application/json"}
        async with self._session.post(url, data=body, headers=headers) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """Start ``app`` on a free loopback port: ``(runner, base URL)``."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


class StepClock:
    """Real time plus an offset tests can advance; ``sleep`` records the delay and jumps instead of waiting."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.offset += delay
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.offset += seconds
