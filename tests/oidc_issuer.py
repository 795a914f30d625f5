"""A small OIDC issuer for the admin-auth tests: a real aiohttp server, not a mock of our client.

It serves ``/.well-known/openid-configuration`` and the JWK Set over HTTP on 127.0.0.1, signs tokens with
keys made by ``cryptography`` (RSA 2048 and EC P-256), rotates keys, and misbehaves on command: down (503),
slow (answers after the client's deadline), or naming another issuer in its discovery document.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

AUDIENCE = "iim-admin"


@dataclass
class IssuerKey:
    kid: str
    alg: str
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    def public_jwk(self) -> dict[str, Any]:
        algo = RSAAlgorithm if self.alg.startswith("RS") else ECAlgorithm
        jwk: dict[str, Any] = json.loads(algo.to_jwk(self.private.public_key()))
        jwk.update(kid=self.kid, use="sig", alg=self.alg)
        return jwk

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)


def rsa_key(kid: str) -> IssuerKey:
    return IssuerKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str) -> IssuerKey:
    return IssuerKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


@dataclass
class Issuer:
    """``url`` is the issuer (``iss``); ``keys`` are published and may sign; ``mode`` is ok/down/slow/liar."""

    url: str = ""
    keys: list[IssuerKey] = field(default_factory=lambda: [rsa_key("rsa-1"), ec_key("ec-1")])
    mode: str = "ok"
    slow_s: float = 10.0
    jwks_requests: int = 0

    def key(self, kid: str) -> IssuerKey:
        return next(k for k in self.keys if k.kid == kid)

    def rotate(self, new: IssuerKey, *, drop: str | None = None) -> None:
        """Publish ``new`` (and stop publishing ``drop``): what an issuer does when it rolls its keys."""
        self.keys = [k for k in self.keys if k.kid != drop] + [new]

    def claims(self, sub: str = "alice", roles: Any = (), **over: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.url, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 300,
                                  "iim_roles": list(roles)}
        claims.update(over)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, sub: str = "alice", roles: Any = (), *, kid: str = "rsa-1", key: IssuerKey | None = None,
              headers: Mapping[str, Any] | None = None, **over: Any) -> str:
        """A token signed by the key ``kid`` (or by ``key``, published or not), with ``over`` claims on top
        (``None`` removes a claim)."""
        signer = key or self.key(kid)
        return jwt.encode(self.claims(sub, roles, **over), signer.private, algorithm=signer.alg,
                          headers={"kid": kid, **(headers or {})})

    async def _discovery(self, _request: web.Request) -> web.StreamResponse:
        if self.mode == "down":
            return web.Response(status=503)
        if self.mode == "slow":
            await asyncio.sleep(self.slow_s)
        issuer = "https://elsewhere.example" if self.mode == "liar" else self.url
        return web.json_response({"issuer": issuer, "jwks_uri": self.url + "/jwks",
                                  "id_token_signing_alg_values_supported": ["RS256", "ES256"]})

    async def _jwks(self, _request: web.Request) -> web.StreamResponse:
        self.jwks_requests += 1
        if self.mode == "down":
            return web.Response(status=503)
        return web.json_response({"keys": [k.public_jwk() for k in self.keys]})


@asynccontextmanager
async def running_issuer(path: str = "/realms/iim") -> AsyncIterator[Issuer]:
    """An issuer on 127.0.0.1 (a free port), its URL ``http://127.0.0.1:PORT/realms/iim``."""
    issuer = Issuer()
    app = web.Application()
    app.router.add_get(path + "/.well-known/openid-configuration", issuer._discovery)
    app.router.add_get(path + "/jwks", issuer._jwks)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    issuer.url = f"http://127.0.0.1:{port}{path}"
    try:
        yield issuer
    finally:
        await runner.cleanup()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with_public_key(issuer: Issuer, kid: str = "rsa-1") -> str:
    """The classic alg-confusion forgery: HS256, "signed" with the issuer's public key as the HMAC secret."""
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    body = issuer.claims(roles=[{"role": "admin"}])
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(body).encode())
    mac = hmac.new(issuer.key(kid).public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(mac)


def unsigned(issuer: Issuer, kid: str = "rsa-1") -> str:
    """``alg: none``: no signature at all."""
    header = {"alg": "none", "typ": "JWT", "kid": kid}
    body = issuer.claims(roles=[{"role": "admin"}])
    return b64(json.dumps(header).encode()) + "." + b64(json.dumps(body).encode()) + "."
