"""Signed, expiring URLs for rendered speech, so a vendor cloud can fetch one file and nothing else.

``GET {base_url}/v1/audio/{key}.wav?exp={unix seconds}&sig={base64url HMAC-SHA256}``: the signature
covers the key and the expiry, so a URL handed to one speaker cloud cannot be stretched in time or
turned into another file, and the keys (content hashes) are never enumerable without it. The route
checks, in order: the key is 64 hex digits (else the router answers 404; nothing else can reach the
file system), the signature and expiry (403, whether or not the file exists, so the answer leaks
nothing), then the file (404).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable
from typing import Protocol

from aiohttp import web
from yarl import URL

from iim.tts.engine import AudioStore, RenderedAudio

__all__ = ["AUDIO_ROUTE", "PROMPT_ROUTE", "AudioUrlSigner", "SystemPrompts", "audio_routes", "prompt_routes",
           "prompt_url"]

AUDIO_ROUTE = "/v1/audio/{key:[0-9a-f]{64}}.wav"
PROMPT_ROUTE = "/v1/prompts/{name:[a-z-]{1,40}}.wav"
_KEY = re.compile(r"[0-9a-f]{64}")
_EXP = re.compile(r"[0-9]{1,12}")
_SIG = re.compile(r"[A-Za-z0-9_-]{43}")
_MIN_SECRET = 32
#: Tolerated clock difference when refusing expiries too far ahead (a lowered ttl_s takes effect at once).
_FUTURE_SLACK_S = 60


class AudioUrlSigner:
    """Makes and checks audio URLs.

    Args:
        secret: HMAC key, at least 32 bytes (resolve it from a credential reference).
        base_url: IIM's public URL as vendors reach it, e.g. ``https://iim.example.net``.
        ttl_s: how long a URL stays valid.
        clock: unix seconds; ``time.time`` unless a test injects its own.
    """

    def __init__(self, secret: bytes, base_url: str, ttl_s: int, *,
                 clock: Callable[[], float] = time.time) -> None:
        if len(secret) < _MIN_SECRET:
            raise ValueError(f"the audio URL secret must be at least {_MIN_SECRET} bytes")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
            raise ValueError("base_url must be an absolute http(s) URL without query or fragment")
        self._secret = secret
        self.base_url = base_url.rstrip("/")
        self.ttl_s = ttl_s
        self._clock = clock

    def __repr__(self) -> str:
        return f"AudioUrlSigner(base_url={self.base_url!r}, ttl_s={self.ttl_s})"

    def _signature(self, key: str, exp: str) -> str:
        digest = hmac.new(self._secret, f"iim-audio-v1\x00{key}\x00{exp}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def sign(self, key: str) -> str:
        """The URL of the WAV named ``key``, valid for ``ttl_s`` from now."""
        if not _KEY.fullmatch(key):
            raise ValueError("an audio key is 64 lowercase hex digits")
        exp = str(int(self._clock()) + self.ttl_s)
        return f"{self.base_url}/v1/audio/{key}.wav?exp={exp}&sig={self._signature(key, exp)}"

    def check(self, key: str, exp: str, sig: str) -> bool:
        """Is ``(key, exp, sig)`` ours and unexpired? Constant-time over the signature; never raises."""
        if not (_KEY.fullmatch(key) and _EXP.fullmatch(exp) and _SIG.fullmatch(sig)):
            return False
        genuine = hmac.compare_digest(self._signature(key, exp), sig)
        now = self._clock()
        return genuine and now < int(exp) <= now + self.ttl_s + _FUTURE_SLACK_S

    def seconds_left(self, exp: str) -> int:
        """How long a checked URL stays valid (for ``Cache-Control``)."""
        return max(0, min(int(exp) - int(self._clock()), self.ttl_s))


def audio_routes(signer: AudioUrlSigner, store: AudioStore) -> list[web.RouteDef]:
    """``GET /v1/audio/{key}.wav``: the signed file as ``audio/wav`` (403 bad/expired signature, 404 unknown)."""

    async def get_audio(request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        query = request.query
        if not signer.check(key, query.get("exp", ""), query.get("sig", "")):
            raise web.HTTPForbidden(text="invalid or expired audio URL")
        path = store.path_for(key)
        if path is None:
            raise web.HTTPNotFound(text="no such audio")
        return web.FileResponse(path, headers={
            "Content-Type": "audio/wav", "X-Content-Type-Options": "nosniff",
            "Cache-Control": f"private, max-age={signer.seconds_left(query['exp'])}"})

    return [web.get(AUDIO_ROUTE, get_audio)]


class SystemPrompts(Protocol):
    """Where :func:`prompt_routes` gets a system prompt's file (``EspeakTts.system``)."""

    async def system(self, name: str) -> RenderedAudio: ...


def prompt_url(base_url: str, name: str) -> str:
    """What FreeSWITCH plays for the system prompt ``name``: fetched over HTTP from IIM and cached by
    mod_http_cache, so the switch needs no sound package and may run on another host."""
    return f"http_cache://{base_url.rstrip('/')}/v1/prompts/{name}.wav"


def prompt_routes(prompts: SystemPrompts) -> list[web.RouteDef]:
    """``GET /v1/prompts/{name}.wav``: a system prompt (no private text, the same for every call), cacheable."""

    async def get_prompt(request: web.Request) -> web.StreamResponse:
        try:
            made = await prompts.system(request.match_info["name"])
        except KeyError:
            raise web.HTTPNotFound(text="no such prompt") from None
        return web.FileResponse(made.path, headers={
            "Content-Type": "audio/wav", "X-Content-Type-Options": "nosniff",
            "Cache-Control": "public, max-age=86400"})

    return [web.get(PROMPT_ROUTE, get_prompt)]
