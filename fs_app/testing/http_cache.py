"""``http_cache://`` playables as mod_http_cache 1.10.12 fetches them: over HTTP, with the project's timeouts.

The real module downloads the URL after ``http_cache://`` (``http://`` or ``https://``) on first use, keys its
cache by the whole URL (query string included), keeps the file for the response's ``Cache-Control: max-age``
(``default-max-age`` without one) and fails the playback when the download fails (an HTTP error, a refused
connection, ``connect-timeout``/``download-timeout`` in ``freeswitch-conf/autoload_configs/http_cache.conf.xml``):
``playback`` then answers ``FILE NOT FOUND`` and ``play_and_get_digits`` fails the try at once, without waiting
for a digit. So a broken prompt URL fails in the emulator as it does on the switch.

Recording to ``http_cache://`` is the module's write path: the file is recorded locally and, when ``record``
closes it (before the application returns and before ``RECORD_STOP``), PUT to the URL with curl's headers
(``Content-Type: application/octet-stream`` without a ``mime.types``, ``Content-Length``, ``Expect:
100-continue``) and no retry; 200, 201, 202 and 204 are success, anything else is logged as an error and the
recording is lost. The real module bounds only the connection (``connect-timeout``), not the transfer.
"""

from __future__ import annotations

import io
import re
import time

import aiohttp

__all__ = ["PREFIX", "PUT_OK", "HttpCache", "MediaNotFound"]

PREFIX = "http_cache://"
_MAX_AGE = re.compile(r"max-age=([0-9]+)", re.IGNORECASE)
#: The statuses mod_http_cache's ``http_put`` takes as saved.
PUT_OK = frozenset({200, 201, 202, 204})


class MediaNotFound(Exception):
    """The file could not be opened (for ``http_cache://``: not downloaded): the playback fails at once."""


class HttpCache:
    """Downloads ``http_cache://`` URLs once per max-age, like mod_http_cache; ``fetched`` lists every download.

    Args:
        connect_timeout_s, download_timeout_s: as ``connect-timeout`` and ``download-timeout`` in the config.
        default_max_age_s: ``default-max-age``: how long a response without ``max-age`` stays cached.
        max_urls: ``max-urls``: the oldest entry goes first beyond it.
    """

    def __init__(self, *, connect_timeout_s: float = 2.0, download_timeout_s: float = 5.0,
                 default_max_age_s: float = 86400.0, max_urls: int = 500) -> None:
        self._timeout = aiohttp.ClientTimeout(total=download_timeout_s, connect=connect_timeout_s)
        self.default_max_age_s = default_max_age_s
        self.max_urls = max_urls
        self._cached: dict[str, float] = {}  # URL -> expiry (monotonic)
        self._connect_timeout_s = connect_timeout_s
        self.fetched: list[str] = []
        self.failed: list[str] = []
        #: every upload: (URL, HTTP status; 0 when no response came)
        self.uploaded: list[tuple[str, int]] = []

    async def put(self, target: str, body: bytes, *, transfer_timeout_s: float = 300.0) -> int:
        """Upload a closed recording as ``http_put`` does; the HTTP status (0: no response). The real module
        has no transfer timeout (a stalled server holds the channel); the emulator gives up after
        ``transfer_timeout_s`` so a test cannot hang."""
        url = target.removeprefix(PREFIX)
        timeout = aiohttp.ClientTimeout(total=transfer_timeout_s, connect=self._connect_timeout_s)
        headers = {"Content-Type": "application/octet-stream", "User-Agent": "freeswitch-http-cache/1.0"}
        status = 0
        try:
            async with aiohttp.ClientSession(timeout=timeout) as client, \
                    client.put(url, data=io.BytesIO(body), headers=headers, expect100=True) as resp:
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, ValueError):
            status = 0
        self.uploaded.append((url, status))
        return status

    async def open(self, playable: str) -> None:
        """Make ``playable`` (``http_cache://http://...``) playable: cached, or downloaded now; MediaNotFound."""
        url = playable.removeprefix(PREFIX)
        expires = self._cached.get(url)
        if expires is not None and time.monotonic() < expires:
            return
        self._cached.pop(url, None)
        if not url.startswith(("http://", "https://")):
            raise MediaNotFound(playable)
        try:
            async with aiohttp.ClientSession(timeout=self._timeout) as client, client.get(url) as resp:
                body = await resp.read()
                status, cache_control = resp.status, resp.headers.get("Cache-Control", "")
        except (TimeoutError, aiohttp.ClientError, ValueError):
            self.failed.append(url)
            raise MediaNotFound(playable) from None
        if status >= 400 or not body:  # CURLOPT_FAILONERROR
            self.failed.append(url)
            raise MediaNotFound(playable)
        age = _MAX_AGE.search(cache_control)
        while len(self._cached) >= self.max_urls:
            del self._cached[next(iter(self._cached))]
        self._cached[url] = time.monotonic() + (float(age.group(1)) if age else self.default_max_age_s)
        self.fetched.append(url)
