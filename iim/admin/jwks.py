"""The OIDC issuer's signing keys: discovered, fetched with a deadline, cached, refetched on an unknown ``kid``.

Two halves. :class:`KeyCache` is the pure decision (keys + times in, "use this key / fetch first / unknown /
unavailable" out): when to refetch (keys older than ``ttl_s``, or a ``kid`` not in the set), never more
often than every ``min_refetch_s`` (a stream of tokens with made-up ``kid`` values costs the issuer one
request per interval, not one per token), and how long keys fetched earlier still verify while the issuer
is away (``max_stale_s``). :class:`JwksClient` does the I/O: ``/.well-known/openid-configuration`` (its
``issuer`` must be ours) -> ``jwks_uri`` -> the key set, under one deadline; one fetch at a time.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client import Counter

from iim.core.lifecycle import AsyncResource
from iim.core.metrics import REGISTRY
from iim.core.strict_json import BadJson, loads

__all__ = ["IssuerUnavailable", "JwksClient", "KeyCache", "KeyUnknown", "Lookup", "SigningKey", "is_allowed_url",
           "usable_keys"]

log = logging.getLogger("iim.admin.oidc")

JWKS_FETCHES = Counter("iim_oidc_jwks_fetches", "Fetches of the OIDC issuer's discovery document and key set, "
                       "by outcome (ok, failed)", ["outcome"], registry=REGISTRY)

MAX_DOCUMENT_BYTES = 256 * 1024
MAX_KEYS = 100
MIN_RSA_BITS = 2048
_CURVES: Mapping[str, type[ec.EllipticCurve]] = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1}


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One key of the issuer: pyjwt's key and the JWK members it came from (its ``alg``, if it names one)."""

    key: jwt.PyJWK
    jwk: Mapping[str, Any]

    def fits(self, alg: str) -> bool:
        """The key's own ``alg`` (if any) is ``alg``, and its type/curve/size is what ``alg`` needs: a token
        cannot pick an algorithm the key was not made for (RS256 header, EC key; HS256 with the public key)."""
        if "alg" in self.jwk and self.jwk["alg"] != alg:
            return False
        public = self.key.key
        if alg[:2] in ("RS", "PS"):
            return isinstance(public, rsa.RSAPublicKey) and public.key_size >= MIN_RSA_BITS
        curve = _CURVES.get(alg)
        return curve is not None and isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, curve)


class KeyUnknown(Exception):
    """No key of the issuer has this ``kid`` (after a refetch, or too soon to refetch)."""


class IssuerUnavailable(Exception):
    """The issuer's keys cannot be had now (down, slow, or answering garbage); retry later."""


class Lookup(enum.Enum):
    FOUND = "found"
    FETCH = "fetch"  # fetch first, then look again
    UNKNOWN = "unknown"
    UNAVAILABLE = "unavailable"


@dataclass
class KeyCache:
    """The cached key set and the refetch decision; times are the caller's clock (monotonic seconds)."""

    ttl_s: float = 300.0
    min_refetch_s: float = 30.0
    max_stale_s: float = 86_400.0
    keys: dict[str, SigningKey] = field(default_factory=dict)
    fetched_at: float | None = None
    attempted_at: float | None = None
    failing: bool = False

    def lookup(self, kid: str, now: float) -> Lookup:
        """What to do for a token signed with ``kid``: use the key, fetch first, or refuse (401 / 503)."""
        may_fetch = self.attempted_at is None or now - self.attempted_at >= self.min_refetch_s
        if not may_fetch:
            return self.settled(kid, now)
        if kid in self.keys and self.fetched_at is not None and now - self.fetched_at < self.ttl_s:
            return Lookup.FOUND
        return Lookup.FETCH

    def settled(self, kid: str, now: float) -> Lookup:
        """The answer without fetching (again): the key if held and not too stale, else unknown or unavailable."""
        usable = self.fetched_at is not None and now - self.fetched_at < self.max_stale_s
        if kid in self.keys and usable:
            return Lookup.FOUND
        return Lookup.UNAVAILABLE if self.failing or not usable else Lookup.UNKNOWN

    def fetched(self, keys: Mapping[str, SigningKey], now: float) -> None:
        self.keys = dict(keys)
        self.fetched_at = self.attempted_at = now
        self.failing = False

    def failed(self, now: float) -> None:
        self.attempted_at = now
        self.failing = True


def is_allowed_url(url: str) -> bool:
    """``https://`` anywhere; plain ``http://`` only to a loopback host (a local issuer, tests)."""
    parts = urlsplit(url)
    if not parts.hostname or parts.username or parts.password:
        return False
    if parts.scheme == "https":
        return True
    if parts.scheme != "http":
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def usable_keys(document: Any, algorithms: Sequence[str]) -> dict[str, SigningKey]:
    """The signing keys of a JWK Set that can verify one of ``algorithms``, by ``kid``; others are skipped.

    Raises:
        ValueError: not a JWK Set (no ``keys`` list).
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK Set (no keys list)")  # noqa: TRY004 -- a bad document, as JSON errors are
    out: dict[str, SigningKey] = {}
    for jwk in document["keys"][:MAX_KEYS]:
        if not isinstance(jwk, dict) or not isinstance(jwk.get("kid"), str) or jwk.get("use", "sig") != "sig":
            continue
        if jwk.get("kty") not in ("RSA", "EC") or "d" in jwk:  # a private key published by mistake: refuse
            continue
        try:
            key = SigningKey(jwt.PyJWK(jwk), jwk)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        if any(key.fits(alg) for alg in algorithms) and jwk["kid"] not in out:
            out[jwk["kid"]] = key
    return out


class JwksClient(AsyncResource):
    """The issuer's keys by ``kid``, for :class:`iim.admin.oidc.OidcVerifier`.

    Raises (from :meth:`key`): :class:`KeyUnknown` (401 for the caller) or :class:`IssuerUnavailable` (503).
    """

    def __init__(self, issuer: str, algorithms: Sequence[str], *, timeout_s: float, cache: KeyCache,
                 clock: Callable[[], float] | None = None) -> None:
        self._issuer = issuer
        self._algorithms = tuple(algorithms)
        self._timeout_s = timeout_s
        self._cache = cache
        self._clock = clock
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout_s))

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def key(self, kid: str) -> SigningKey:
        """The key with this ``kid``."""
        decision = self._cache.lookup(kid, self._now())
        if decision is Lookup.FETCH:
            async with self._lock:  # one fetch at a time; who waited looks again and usually finds the key
                if self._cache.lookup(kid, self._now()) is Lookup.FETCH:
                    await self._refresh()
                decision = self._cache.settled(kid, self._now())
        if decision is Lookup.FOUND:
            return self._cache.keys[kid]
        if decision is Lookup.UNAVAILABLE:
            raise IssuerUnavailable("the OIDC issuer's keys cannot be fetched")
        raise KeyUnknown(kid)

    async def _refresh(self) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                keys = await self._fetch()
        except (OSError, TimeoutError, aiohttp.ClientError, ValueError) as exc:
            JWKS_FETCHES.labels("failed").inc()
            self._cache.failed(self._now())
            log.warning("OIDC keys not fetched from %s: %s", self._issuer, str(exc) or type(exc).__name__)
            return
        JWKS_FETCHES.labels("ok").inc()
        self._cache.fetched(keys, self._now())
        log.info("OIDC keys fetched from %s: %s", self._issuer, ", ".join(sorted(keys)) or "none usable")

    async def _fetch(self) -> dict[str, SigningKey]:
        discovery = await self._get_json(self._issuer.rstrip("/") + "/.well-known/openid-configuration")
        if not isinstance(discovery, dict) or discovery.get("issuer") != self._issuer:
            raise ValueError("discovery document names another issuer")
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not is_allowed_url(jwks_uri):
            raise ValueError("discovery document has no usable jwks_uri (https, or http to loopback)")
        return usable_keys(await self._get_json(jwks_uri), self._algorithms)

    async def _get_json(self, url: str) -> Any:
        if self._session is None:
            raise OSError("JWKS client not started")
        async with self._session.get(url, allow_redirects=False, headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status} from {urlsplit(url).path}")
            body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
            if len(body) > MAX_DOCUMENT_BYTES:
                raise ValueError("document too large")
        try:
            return loads(body)
        except BadJson as exc:
            raise ValueError(f"not JSON: {exc}") from exc
