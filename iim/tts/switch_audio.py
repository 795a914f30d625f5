"""What FreeSWITCH plays for IIM: rendered prompts fetched over HTTP, so the switch may run on another host.

An alert call's own prompt (the private text rendered while the phone rings) and the generic prompt are files
in IIM's speech cache. With ``IIM_SWITCH_AUDIO_BASE_URL`` set, the switch gets them as
``http_cache://{base}/v1/audio/{id}.wav?exp={unix s}&sig={HMAC}``: mod_http_cache downloads the file once and
plays its own copy (every try of ``play_and_get_digits`` included). Without it (single-host mode) the switch
gets the file's local path, which only works when both share a file system.

* ``id`` is content-addressed but keyed: an HMAC of the cache key (itself a hash of voice and text), so a URL
  seen in the switch's log can neither be turned back into, nor checked against, a guessed text. Only ids
  this process signed resolve (a bounded table), so nothing can be listed or enumerated.
* ``sig`` covers the id and the expiry; ``exp`` is rounded up to ``granularity_s``, so the same prompt signed
  again within that window is the same URL and a cache hit at the switch (mod_http_cache keys its cache by
  the whole URL, query string included; its file name's extension is read before the ``?``).
* Every refusal (bad or expired signature, unknown id, evicted file) is the same ``404`` with the same body:
  the answer tells a prober nothing. ``Cache-Control: max-age`` is the URL's remaining validity, so the switch
  never fetches a URL again after it has expired.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from aiohttp import web
from prometheus_client import Counter
from yarl import URL

from iim.core.metrics import REGISTRY
from iim.core.signing import link_signature
from iim.tts.engine import AudioStore

__all__ = ["SWITCH_AUDIO_ROUTE", "Playable", "SwitchAudio", "switch_audio_routes"]

log = logging.getLogger(__name__)

SWITCH_AUDIO_ROUTE = "/v1/audio/{id:[0-9a-f]{64}}.wav"
SWITCH_AUDIO_FETCHES = Counter("iim_switch_audio_requests", "Prompt fetches by the switch (GET /v1/audio on the "
                               "HTTP site), by result: served, or refused (one 404 for every reason)",
                               ["result"], registry=REGISTRY)
_ID = re.compile(r"[0-9a-f]{64}")
_EXP = re.compile(r"[0-9]{1,12}")
_SIG = re.compile(r"[0-9a-f]{64}")
_MIN_SECRET = 32
#: Tolerated clock difference when refusing expiries too far ahead.
_FUTURE_SLACK_S = 60
_NOT_FOUND = "no such audio"


class Playable(Protocol):
    """A rendered file (``iim.tts.engine.RenderedAudio``): its cache key and where it lies here."""

    @property
    def path(self) -> Path: ...

    @property
    def key(self) -> str: ...


class SwitchAudio:
    """Turns rendered prompts into what the switch plays, and resolves the URLs it fetches.

    Args:
        secret: HMAC key, at least 32 bytes (by reference: ``IIM_SWITCH_AUDIO_SECRET_REF``).
        base_url: where the switch reaches *this* IIM's HTTP site (not a balancer in front of several: the
            file is in this process's cache); ``None``: single-host mode, the switch gets local paths.
        ttl_s: a URL's least validity: longer than the longest alert call (ring, every try of the IVR).
        granularity_s: expiries are rounded up to this, so a prompt signed twice is one URL (one download).
        max_ids: how many signed ids resolve at once (least recently signed forgotten first).
        clock: unix seconds.
    """

    def __init__(self, secret: bytes, base_url: str | None, *, ttl_s: int = 900, granularity_s: int = 300,
                 max_ids: int = 4096, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < _MIN_SECRET:
            raise ValueError(f"the switch audio secret must be at least {_MIN_SECRET} bytes")
        if ttl_s <= 0 or granularity_s <= 0 or max_ids <= 0:
            raise ValueError("ttl_s, granularity_s and max_ids must be positive")
        if base_url is not None:
            url = URL(base_url)
            if url.scheme not in ("http", "https") or not url.host or url.query_string or url.fragment:
                raise ValueError("the switch audio base URL must be an absolute http(s) URL without query or "
                                 "fragment")
        self._secret = secret
        self.base_url = base_url.rstrip("/") if base_url is not None else None
        self.ttl_s = ttl_s
        self.granularity_s = granularity_s
        self._max_ids = max_ids
        self._clock = clock
        self._keys: OrderedDict[str, str] = OrderedDict()  # id -> cache key

    def __repr__(self) -> str:
        return f"SwitchAudio(base_url={self.base_url!r}, ttl_s={self.ttl_s})"

    def _mac(self, *parts: str) -> str:
        return link_signature(self._secret, *parts)

    def playable(self, audio: Playable) -> str:
        """What the switch is told to play: the signed ``http_cache://`` URL, or the local path (single host)."""
        if self.base_url is None:
            return str(audio.path)
        audio_id = self._mac("iim-switch-audio-id-v1", audio.key)
        self._keys[audio_id] = audio.key
        self._keys.move_to_end(audio_id)
        while len(self._keys) > self._max_ids:
            self._keys.popitem(last=False)
        exp = str(math.ceil((self._clock() + self.ttl_s) / self.granularity_s) * self.granularity_s)
        sig = self._mac("iim-switch-audio-v1", audio_id, exp)
        return f"http_cache://{self.base_url}/v1/audio/{audio_id}.wav?exp={exp}&sig={sig}"

    def resolve(self, audio_id: str, exp: str, sig: str) -> str | None:
        """The cache key of a genuine, unexpired URL this process signed; None otherwise. Never raises."""
        if not (_ID.fullmatch(audio_id) and _EXP.fullmatch(exp) and _SIG.fullmatch(sig)):
            return None
        genuine = hmac.compare_digest(self._mac("iim-switch-audio-v1", audio_id, exp), sig)
        now = self._clock()
        if not genuine or not now < int(exp) <= now + self.ttl_s + self.granularity_s + _FUTURE_SLACK_S:
            return None
        return self._keys.get(audio_id)

    def seconds_left(self, exp: str) -> int:
        return max(0, int(exp) - int(self._clock()))


def switch_audio_routes(audio: SwitchAudio, store: AudioStore) -> list[web.RouteDef]:
    """``GET /v1/audio/{id}.wav?exp=&sig=`` on the HTTP site the switch reaches: the prompt, or one 404."""

    async def get_audio(request: web.Request) -> web.StreamResponse:
        query = request.query
        exp = query.get("exp", "")
        key = audio.resolve(request.match_info["id"], exp, query.get("sig", ""))
        path = store.path_for(key) if key is not None else None
        if path is None:
            SWITCH_AUDIO_FETCHES.labels("refused").inc()
            raise web.HTTPNotFound(text=_NOT_FOUND)
        SWITCH_AUDIO_FETCHES.labels("served").inc()
        log.debug("prompt served to the switch", extra={"remote": request.remote})
        return web.FileResponse(path, headers={
            "Content-Type": "audio/wav", "X-Content-Type-Options": "nosniff",
            "Cache-Control": f"private, max-age={audio.seconds_left(exp)}"})

    return [web.get(SWITCH_AUDIO_ROUTE, get_audio)]
