"""Messages callers leave for a household (the ``record_message`` fallback): kept, announced, fetched by link.

The switch records into IIM's recordings directory (``IIM_RECORDINGS_DIR``: the switch's own when both run on
one host, or a directory both mount), or uploads it there (``IIM_RECORDINGS_UPLOAD``: a switch on another host
PUTs it to :mod:`iim.home.recording_upload` before its ``record`` returns). After the recording, :class:`RecordedMessages` (the router's ``message``
notifier):

1. keeps it: a row in ``iim.recorded_message`` (the home store), only under the subscriber's ``call_recording``
   consent; without it the file is deleted and the household gets the plain missed-call SMS;
2. announces it: one SMS to the subscriber (outbox key ``message:<call uuid>``, so once per call) with a signed,
   expiring link to ``GET /v1/messages/{tenant}/{id}.wav`` on IIM's HTTP site.

The link is an HMAC (:func:`iim.core.signing.link_signature`) over tenant, message id and expiry; the expiry is
never past the message's own (retention). Every refusal -- bad or expired signature, unknown or expired
message, consent revoked since, file gone -- is the same 404 with the same body.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID

import asyncpg
from aiohttp import web
from prometheus_client import Counter

from fs_app.messages import MessageTaken, message_file_name
from fs_app.routing import CallFacts
from iim.core.metrics import REGISTRY
from iim.core.signing import link_signature, link_signature_ok
from iim.home.ports import SmsSink
from iim.home.store import find_recorded_message, store_recorded_message
from policy_cache.db import Pool, tenant_tx
from policy_cache.snapshot import RoutingSnapshot

__all__ = ["MESSAGE_ROUTE", "MessageLinks", "RecordedMessages", "message_key", "message_routes", "message_text"]

log = logging.getLogger("iim.home.message")

MESSAGE_ROUTE = "/v1/messages/{tenant:[0-9a-f-]{36}}/{id:[0-9a-f-]{36}}.wav"
MESSAGES = Counter("iim_recorded_messages", "Messages callers left, by what became of them: announced, "
                   "no_consent (deleted), no_file, failed", ["result"], registry=REGISTRY)
MESSAGE_FETCHES = Counter("iim_recorded_message_requests", "GET /v1/messages by result: served, or refused "
                          "(one 404 for every reason)", ["result"], registry=REGISTRY)
_FILE = re.compile(r"iim-[A-Za-z0-9-]{1,64}\.wav")
_EXP = re.compile(r"[0-9]{1,12}")
_SIG = re.compile(r"[0-9a-f]{64}")
_LABEL = "iim-message-v1"
_MIN_SECRET = 32
_NOT_FOUND = "no such message"


def message_key(call_uuid: str) -> str:
    """The outbox key of a message's SMS (one per call)."""
    return f"message:{call_uuid}"


def message_text(caller: str | None, seconds: int | None, link: str) -> str:
    length = f" ({seconds} s)" if seconds else ""
    return f"Missed call from {caller or 'an unknown number'}: a message was left{length}. Listen: {link}"


class MessageLinks:
    """Signs and checks the links to recorded messages (HMAC key by reference: ``IIM_MESSAGE_LINK_SECRET_REF``)."""

    def __init__(self, secret: bytes, base_url: str, *, ttl_s: int = 7 * 86400,
                 clock: Callable[[], float] = time.time) -> None:
        if len(secret) < _MIN_SECRET:
            raise ValueError(f"the message link secret must be at least {_MIN_SECRET} bytes")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self._secret = secret
        self.base_url = base_url.rstrip("/")
        self.ttl_s = ttl_s
        self._clock = clock

    def url(self, tenant: UUID, message_id: UUID, kept_until: datetime) -> str:
        exp = str(int(min(self._clock() + self.ttl_s, kept_until.timestamp())))
        sig = link_signature(self._secret, _LABEL, str(tenant), str(message_id), exp)
        return f"{self.base_url}/v1/messages/{tenant}/{message_id}.wav?exp={exp}&sig={sig}"

    def check(self, tenant: str, message_id: str, exp: str, sig: str) -> tuple[UUID, UUID] | None:
        """(tenant, message id) of a genuine, unexpired link; None otherwise. Never raises."""
        if not (_EXP.fullmatch(exp) and _SIG.fullmatch(sig)):
            return None
        try:
            ids = UUID(tenant), UUID(message_id)
        except ValueError:
            return None
        if not link_signature_ok(self._secret, sig, _LABEL, str(ids[0]), str(ids[1]), exp):
            return None
        return ids if self._clock() < int(exp) else None


@dataclass(frozen=True, slots=True)
class RecordedMessages:
    """The router's ``message`` notifier and the link resolver, over the home store."""

    pool: Pool
    recordings_dir: Path
    links: MessageLinks
    sms: SmsSink
    retention: timedelta = timedelta(days=30)
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    def file_of(self, call_uuid: str) -> Path | None:
        """The call's recording in our directory (by name only: nothing outside it is ever opened), whether the
        switch wrote it there (a shared directory) or uploaded it (``PUT /v1/recordings``)."""
        name = message_file_name(call_uuid)
        if not _FILE.fullmatch(name):
            return None
        path = self.recordings_dir / name
        return path if path.is_file() else None

    async def __call__(self, snapshot: RoutingSnapshot, facts: CallFacts, taken: MessageTaken) -> bool:
        """Keep and announce the message; False (the caller then sends the missed-call SMS) when it was not kept.
        Never raises: the call's hangup goes on."""
        try:
            return await self._keep_and_announce(snapshot, facts, taken)
        except Exception:
            MESSAGES.labels("failed").inc()
            log.exception("recorded message not kept", extra={"call_id": facts.uuid})
            return False

    async def _keep_and_announce(self, snapshot: RoutingSnapshot, facts: CallFacts, taken: MessageTaken) -> bool:
        path = self.file_of(facts.uuid)
        if path is None:
            MESSAGES.labels("no_file").inc()
            log.warning("recorded message not found in the recordings directory", extra={"call_id": facts.uuid})
            return False
        tenant, now = UUID(snapshot.tenant_id), self.clock()
        kept_until = now + self.retention
        async with tenant_tx(self.pool, tenant) as conn:
            message_id = await store_recorded_message(
                conn, call_uuid=facts.uuid, subscriber_id=UUID(snapshot.subscriber_id), caller=facts.caller,
                file_name=path.name, duration_ms=taken.recorded_ms, expires_at=kept_until, now=now)
        if message_id is None:
            path.unlink(missing_ok=True)  # no consent to keep recordings: not kept, not announced
            MESSAGES.labels("no_consent").inc()
            log.info("recorded message deleted: no call_recording consent", extra={"call_id": facts.uuid})
            return False
        seconds = round(taken.recorded_ms / 1000) if taken.recorded_ms else None
        text = message_text(facts.caller, seconds, self.links.url(tenant, message_id, kept_until))
        await self.sms.send(tenant, snapshot.msisdn, text, message_key(facts.uuid))
        MESSAGES.labels("announced").inc()
        return True

    async def resolve(self, tenant: str, message_id: str, exp: str, sig: str) -> Path | None:
        """The file behind a genuine link to a message still kept; None for every other case."""
        ids = self.links.check(tenant, message_id, exp, sig)
        if ids is None:
            return None
        async with tenant_tx(self.pool, ids[0], readonly=True) as conn:
            name = await find_recorded_message(conn, ids[1], self.clock())
        if name is None or not _FILE.fullmatch(name):
            return None
        path = self.recordings_dir / name
        return path if path.is_file() else None


def message_routes(messages: RecordedMessages) -> list[web.RouteDef]:
    """``GET /v1/messages/{tenant}/{id}.wav?exp=&sig=``: the recording, or one 404 (503 while the store stalls)."""

    async def get_message(request: web.Request) -> web.StreamResponse:
        query = request.query
        try:
            path = await messages.resolve(request.match_info["tenant"], request.match_info["id"],
                                          query.get("exp", ""), query.get("sig", ""))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("recorded message lookup failed: %r", exc)
            raise web.HTTPServiceUnavailable(text="try again", headers={"Retry-After": "5"}) from None
        if path is None:
            MESSAGE_FETCHES.labels("refused").inc()
            raise web.HTTPNotFound(text=_NOT_FOUND)
        MESSAGE_FETCHES.labels("served").inc()
        return web.FileResponse(path, headers={"Content-Type": "audio/wav", "X-Content-Type-Options": "nosniff",
                                               "Cache-Control": "private, no-store"})

    return [web.get(MESSAGE_ROUTE, get_message)]
