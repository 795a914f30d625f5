"""Messages callers leave, uploaded by a switch on another host: ``PUT /v1/recordings/{tenant}/{call}.wav``.

With ``IIM_RECORDINGS_UPLOAD`` the switch records a message to ``http_cache://http://IIM/v1/recordings/...``
(a URL IIM signs for that one call). FreeSWITCH 1.10.12's mod_http_cache records it to a local file and, when
``record`` closes the file, PUTs it here with curl: ``Content-Type: application/octet-stream`` (the WAV type
only with a ``mime.types`` the project's configuration does not ship), ``Content-Length``, ``Expect:
100-continue``, no retry, no overall timeout (only ``connect-timeout``), and all of that before ``record``
returns -- so the file is here (or refused) by the time the router asks :class:`RecordedMessages` to keep
and announce it, exactly as when the switch writes into a shared directory.

What this side enforces, so a bad body never costs more than its bounds and never leaves a file behind:

* the signature (HMAC over tenant, call and expiry, :func:`iim.core.signing.link_signature`) and the expiry,
  checked before ``100 Continue`` so a refused body is not even sent; every refusal of the link -- bad,
  expired, replayed -- is the same 404 with the same body;
* one upload per call: the first request past the signature claims the call (a marker under
  ``.uploads/{exp}/`` in the recordings directory, shared by IIM instances sharing the directory), so a
  replay within the link's life is refused even after the message was deleted (no consent, erasure);
* a declared length, at most :attr:`RecordingUploads.max_bytes`, then at most what the WAV's own format
  allows for the longest message (``fs_app.messages.MAX_MESSAGE_S``): 413 beyond either;
* a PCM WAV header (RIFF/WAVE, ``fmt`` 16-bit PCM, 1-2 channels, 8-48 kHz, a ``data`` chunk the body holds):
  415 otherwise;
* the whole body within ``timeout_s``: 408 after it;
* written to a private temporary file and linked into place under the message's name only if that name is
  free (atomic, never overwriting), then the temporary name removed: a refused or broken upload leaves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from uuid import UUID

import aiohttp
from aiohttp import web
from prometheus_client import Counter

from fs_app.messages import MAX_MESSAGE_S, message_file_name
from iim.core.metrics import REGISTRY
from iim.core.signing import link_signature, link_signature_ok

__all__ = ["UPLOAD_ROUTE", "NotWav", "RecordingUploads", "UploadLinks", "WavFormat", "parse_wav_header",
           "upload_routes"]

log = logging.getLogger("iim.home.recording_upload")

UPLOAD_ROUTE = "/v1/recordings/{tenant:[0-9a-f-]{36}}/{call:[A-Za-z0-9-]{1,64}}.wav"
UPLOADS = Counter("iim_recording_uploads", "PUT /v1/recordings by result: stored, refused (the link: one 404), "
                  "too_large, not_wav, no_length, timeout, broken (the peer went mid-body), failed (our disk)",
                  ["result"], registry=REGISTRY)
_CALL = re.compile(r"[A-Za-z0-9-]{1,64}")
_EXP = re.compile(r"[0-9]{1,12}")
_SIG = re.compile(r"[0-9a-f]{64}")
_LABEL = "iim-recording-upload-v1"
_MIN_SECRET = 32
_NOT_FOUND = "no such recording"
_CLAIMS = ".uploads"
#: How far into the body the ``data`` chunk must start (libsndfile writes 44 bytes for plain PCM).
MAX_HEADER = 4096
#: Seconds of audio allowed beyond the longest message (``record`` stops on its own limit; rounding, slack).
_SLACK_S = 5
_FLUSH = 256 * 1024
_PRUNE_EVERY_S = 60.0


class NotWav(ValueError):
    """The body does not start with a 16-bit PCM WAV header this side accepts."""


class _Refused(Exception):
    def __init__(self, status: int, result: str, text: str) -> None:
        super().__init__(text)
        self.status, self.result, self.text = status, result, text


@dataclass(frozen=True, slots=True)
class WavFormat:
    channels: int
    rate: int
    header_len: int  # bytes before the first sample
    data_len: int  # the ``data`` chunk's declared size

    @property
    def byte_rate(self) -> int:
        return self.rate * self.channels * 2


def parse_wav_header(head: bytes) -> WavFormat | None:
    """The format of a WAV whose first bytes are ``head``; None while more bytes are needed; NotWav otherwise.

    Chunks between ``fmt`` and ``data`` (``LIST``, ``fact``, ``PEAK``) are skipped; the ``data`` chunk must
    start within :data:`MAX_HEADER` bytes."""
    if len(head) < 12:
        if not b"RIFF".startswith(head[:4]):
            raise NotWav("not a RIFF file")
        return None
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise NotWav("not a RIFF/WAVE file")
    offset, fmt = 12, None
    while True:
        if offset + 8 > MAX_HEADER:
            raise NotWav("no data chunk in the header")
        if len(head) < offset + 8:
            return None
        chunk, size = head[offset:offset + 4], struct.unpack_from("<I", head, offset + 4)[0]
        body = offset + 8
        if chunk == b"data":
            if fmt is None:
                raise NotWav("data before fmt")
            channels, rate = fmt
            return WavFormat(channels, rate, body, size)
        if chunk == b"fmt ":
            if size < 16 or body + size > MAX_HEADER:
                raise NotWav("bad fmt chunk")
            if len(head) < body + 16:
                return None
            tag, channels, rate, byte_rate, align, bits = struct.unpack_from("<HHIIHH", head, body)
            if tag not in (1, 0xFFFE) or bits != 16 or not 1 <= channels <= 2 or not 8000 <= rate <= 48000 \
                    or byte_rate != rate * channels * 2 or align != channels * 2:
                raise NotWav("not 16-bit PCM, 1-2 channels, 8-48 kHz")
            fmt = channels, rate
        offset = body + size + (size & 1)


class UploadLinks:
    """Signs and checks the switch's upload URLs: one call, one tenant, until ``exp``."""

    def __init__(self, secret: bytes, base_url: str, *, ttl_s: int = MAX_MESSAGE_S + 180,
                 clock: Callable[[], float] = time.time) -> None:
        if len(secret) < _MIN_SECRET:
            raise ValueError(f"the recording upload secret must be at least {_MIN_SECRET} bytes")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self._secret = secret
        self.base_url = base_url.rstrip("/")
        self.ttl_s = ttl_s
        self._clock = clock

    def url(self, tenant: str, call_uuid: str) -> str:
        """Where the switch records the call's message (``http_cache://`` + the signed upload URL). The expiry
        covers the greeting and the longest message: the PUT starts when the recording ends."""
        tenant_id = UUID(tenant)  # ValueError for anything else: the router passes the snapshot's own
        if not _CALL.fullmatch(call_uuid):
            raise ValueError("not a call uuid")
        exp = str(int(self._clock()) + self.ttl_s)
        sig = link_signature(self._secret, _LABEL, str(tenant_id), call_uuid, exp)
        return f"http_cache://{self.base_url}/v1/recordings/{tenant_id}/{call_uuid}.wav?exp={exp}&sig={sig}"

    def check(self, tenant: str, call_uuid: str, exp: str, sig: str) -> bool:
        """Whether this is a genuine, unexpired upload URL. Never raises."""
        if not (_EXP.fullmatch(exp) and _SIG.fullmatch(sig) and _CALL.fullmatch(call_uuid)):
            return False
        try:
            tenant_id = UUID(tenant)
        except ValueError:
            return False
        if not link_signature_ok(self._secret, sig, _LABEL, str(tenant_id), call_uuid, exp):
            return False
        return self._clock() < int(exp)


class _Part:
    """The temporary file an upload is written to (blocking; run in a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: BinaryIO = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def commit(self, final: Path) -> bool:
        """Link into place if ``final`` is free (False if taken); the temporary name goes either way."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        try:
            os.link(self.path, final)
        except FileExistsError:
            return False
        finally:
            self.path.unlink(missing_ok=True)
        return True

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        self.path.unlink(missing_ok=True)


@dataclass(slots=True)
class RecordingUploads:
    """Receives the switch's uploads into IIM's recordings directory."""

    directory: Path
    links: UploadLinks
    timeout_s: float = 30.0
    max_seconds: int = MAX_MESSAGE_S + _SLACK_S
    clock: Callable[[], float] = time.time
    _pruned_at: float = 0.0

    @property
    def max_bytes(self) -> int:
        """The largest body accepted before its header is read (48 kHz stereo for the longest message)."""
        return MAX_HEADER + 48000 * 2 * 2 * self.max_seconds

    def refusal(self, request: web.Request) -> _Refused | None:
        """What is wrong with the request before its body: the link, then the declared length."""
        info, query = request.match_info, request.query
        if not self.links.check(info["tenant"], info["call"], query.get("exp", ""), query.get("sig", "")):
            return _Refused(404, "refused", _NOT_FOUND)
        length = request.content_length
        if length is None:
            return _Refused(411, "no_length", "a Content-Length is required")
        if length > self.max_bytes:
            return _Refused(413, "too_large", "the recording is too large")
        return None

    def _claim(self, call_uuid: str, exp: str) -> bool:
        """The call's one upload (blocking): False when it was claimed before. Old claims (their links
        expired: nothing can use them) are pruned now and then."""
        claims = self.directory / _CLAIMS
        now = self.clock()
        if now - self._pruned_at >= _PRUNE_EVERY_S:
            self._pruned_at = now
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(claims):
                    if _EXP.fullmatch(entry.name) and int(entry.name) < now:
                        shutil.rmtree(entry.path, ignore_errors=True)
        bucket = claims / exp
        bucket.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            os.close(os.open(bucket / call_uuid, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return False
        return True

    async def receive(self, request: web.Request) -> None:
        """Check, claim, read and store one upload; :class:`_Refused` for every refusal."""
        refused = self.refusal(request)
        if refused is not None:
            raise refused
        call, exp = request.match_info["call"], request.query["exp"]
        if not await asyncio.to_thread(self._claim, call, exp):
            raise _Refused(404, "refused", _NOT_FOUND)  # a replay: the same answer as a bad link
        length = request.content_length
        assert length is not None
        part = await asyncio.to_thread(_Part, self.directory / f".{message_file_name(call)}.{secrets.token_hex(6)}")
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._copy(request.content, length, part)
            if not await asyncio.to_thread(part.commit, self.directory / message_file_name(call)):
                raise _Refused(404, "refused", _NOT_FOUND)
        except TimeoutError:
            raise _Refused(408, "timeout", "the recording took too long") from None
        except (ConnectionError, aiohttp.ClientPayloadError, asyncio.IncompleteReadError):
            raise _Refused(400, "broken", "the recording did not arrive whole") from None
        finally:
            await asyncio.to_thread(part.discard)

    async def _copy(self, body: aiohttp.StreamReader, length: int, part: _Part) -> None:
        head = bytearray()
        pending = bytearray()
        fmt: WavFormat | None = None
        received = 0
        async for chunk in body.iter_chunked(64 * 1024):
            received += len(chunk)
            if fmt is None:
                head += chunk
                try:
                    fmt = parse_wav_header(bytes(head[:MAX_HEADER]))
                except NotWav as exc:
                    raise _Refused(415, "not_wav", f"not a PCM WAV recording: {exc}") from None
                if fmt is None:
                    if len(head) >= MAX_HEADER:
                        raise _Refused(415, "not_wav", "not a PCM WAV recording: no data chunk")
                    continue
                if length > fmt.header_len + fmt.byte_rate * self.max_seconds:
                    raise _Refused(413, "too_large", "the recording is longer than the longest message")
                pending += head
            else:
                pending += chunk
            if len(pending) >= _FLUSH:
                await asyncio.to_thread(part.write, bytes(pending))
                pending.clear()
        if received != length:
            raise asyncio.IncompleteReadError(b"", length)
        if fmt is None:
            raise _Refused(415, "not_wav", "not a PCM WAV recording: no data chunk")
        if fmt.data_len > length - fmt.header_len:
            raise _Refused(415, "not_wav", "not a PCM WAV recording: the data chunk is cut short")
        await asyncio.to_thread(part.write, bytes(pending))


def upload_routes(uploads: RecordingUploads) -> list[web.RouteDef]:
    """``PUT /v1/recordings/{tenant}/{call}.wav?exp=&sig=``: 201, or a 4xx that leaves nothing behind (503 when
    our own disk fails)."""

    def answer(refused: _Refused) -> web.Response:
        UPLOADS.labels(refused.result).inc()
        if refused.result != "refused":
            log.warning("recording upload refused: %s", refused.text)
        return web.Response(status=refused.status, text=refused.text)

    async def expect(request: web.Request) -> web.StreamResponse | None:
        """Refuse before ``100 Continue`` (curl then never sends the body); else let the body come."""
        refused = uploads.refusal(request)
        if refused is not None:
            return answer(refused)
        if request.headers.get("Expect", "").lower() != "100-continue":
            return web.Response(status=417, text="unknown Expect")
        if request.version >= aiohttp.HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    async def put_recording(request: web.Request) -> web.StreamResponse:
        try:
            await uploads.receive(request)
        except _Refused as refused:
            return answer(refused)
        except OSError as exc:
            UPLOADS.labels("failed").inc()
            log.error("recording upload not stored: %r", exc)
            raise web.HTTPServiceUnavailable(text="try again", headers={"Retry-After": "5"}) from None
        UPLOADS.labels("stored").inc()
        log.info("recording uploaded", extra={"call_id": request.match_info["call"]})
        return web.Response(status=201)

    return [web.put(UPLOAD_ROUTE, put_recording, expect_handler=expect)]
