"""Messages callers leave for a household (the ``record_message`` fallback): kept, announced, fetched by link.

The switch records into IIM's recordings directory (``IIM_RECORDINGS_DIR``: the switch's own when both run on
one host, or a directory both mount), or uploads it there (``IIM_RECORDINGS_UPLOAD``: a switch on another host
PUTs it to :mod:`iim.home.recording_upload` before its ``record`` returns). After the recording, :class:`RecordedMessages` (the router's ``message``
notifier):

1. keeps it: a row in ``iim.recorded_message`` (the home store), only under the subscriber's ``call_recording``
   consent; without it the file is deleted and the household gets the plain missed-call SMS;
2. announces it: one SMS to the subscriber (outbox key ``message:<call uuid>``, so once per call) with a signed,
   expiring link to ``GET /v1/messages/{tenant}/{id}.wav`` on IIM's HTTP site;
3. and, when the subscriber's households have devices at cloud connectors (the vendor's app), one notification
   per connector with the same link (``send_notification``, the account link's ``send_notifications`` scope).
   Once per call per connector: a row in ``iim.message_notification`` is claimed before sending, as the outbox
   key does for the SMS, so a retried announcement (or one after a restart) sends nothing twice; a failed one
   may be claimed again by a later announcement. The SMS is queued first and never waits for a vendor: a
   connector that is down, unlinked, in an open circuit or slow (each send has a deadline) is counted in
   ``iim_recorded_message_notifications`` and logged, and every attempt is audited (``message.notified`` /
   ``message.notify_failed``) beside the message's own ``message.kept``.

Caller-controlled text reaches neither channel raw: the caller's number is rendered (digits and a leading
``+``, or "an unknown number").

The link is an HMAC (:func:`iim.core.signing.link_signature`) over tenant, message id and expiry; the expiry is
never past the message's own (retention). Every refusal -- bad or expired signature, unknown or expired
message, consent revoked since, file gone -- is the same 404 with the same body.
"""

from __future__ import annotations

import asyncio
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
from iim.connectors.contract import (
    Capability,
    Connector,
    ConnectorError,
    ConnectorUnavailable,
    Notification,
    NotLinked,
)
from iim.core.metrics import REGISTRY
from iim.core.signing import link_signature, link_signature_ok
from iim.home import store
from iim.home.ports import ConnectorLookup, SmsSink
from iim.home.store import NotifyTarget, find_recorded_message, store_recorded_message
from policy_cache.db import Pool, tenant_tx
from policy_cache.snapshot import RoutingSnapshot

__all__ = ["MESSAGE_ROUTE", "MessageLinks", "RecordedMessages", "message_key", "message_routes", "message_text",
           "rendered_caller"]

log = logging.getLogger("iim.home.message")

MESSAGE_ROUTE = "/v1/messages/{tenant:[0-9a-f-]{36}}/{id:[0-9a-f-]{36}}.wav"
MESSAGES = Counter("iim_recorded_messages", "Messages callers left, by what became of them: announced, "
                   "no_consent (deleted), no_file, failed", ["result"], registry=REGISTRY)
MESSAGE_FETCHES = Counter("iim_recorded_message_requests", "GET /v1/messages by result: served, or refused "
                          "(one 404 for every reason)", ["result"], registry=REGISTRY)
_FILE = re.compile(r"iim-[A-Za-z0-9-]{1,64}\.wav")
_EXP = re.compile(r"[0-9]{1,12}")
_SIG = re.compile(r"[0-9a-f]{64}")
_CALLER = re.compile(r"\+?[0-9]{2,20}")
_LABEL = "iim-message-v1"
ACTOR = "iim:recorded_message"
NOTIFY_TITLE = "Voice message"
MESSAGE_NOTIFICATIONS = Counter("iim_recorded_message_notifications", "Recorded messages' notifications through "
                                "connectors, by result: sent, unavailable (down, open circuit, not loaded), "
                                "not_linked, timeout, failed, duplicate (sent before), no_capability",
                                ["connector", "result"], registry=REGISTRY)
_MIN_SECRET = 32
_NOT_FOUND = "no such message"


def message_key(call_uuid: str) -> str:
    """The outbox key of a message's SMS (one per call)."""
    return f"message:{call_uuid}"


def rendered_caller(caller: str | None) -> str:
    """The caller's number as the household may read it: digits (and a leading ``+``) only; anything else the
    caller's side put in the caller id is not shown."""
    return caller if caller and _CALLER.fullmatch(caller) else "an unknown number"


def message_text(caller: str | None, seconds: int | None, link: str) -> str:
    length = f" ({seconds} s)" if seconds else ""
    return f"Missed call from {rendered_caller(caller)}: a message was left{length}. Listen: {link}"


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
    #: the cloud connectors (``None``: the SMS only)
    connectors: ConnectorLookup | None = None
    #: each connector's send has this deadline (the call's hangup waits for it)
    notify_timeout_s: float = 10.0
    #: a failed notification is tried again by later announcements of the same call, this many times in all
    notify_attempts: int = 3

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
            if message_id is not None and not await store.message_audited(conn, message_id, "message.kept"):
                await store.audit_message(conn, tenant, ACTOR, "message.kept", message_id, facts.uuid, {
                    "consent": "call_recording", "expires_at": kept_until.isoformat(),
                    "duration_ms": taken.recorded_ms, "sms_key": message_key(facts.uuid)})
        if message_id is None:
            path.unlink(missing_ok=True)  # no consent to keep recordings: not kept, not announced
            MESSAGES.labels("no_consent").inc()
            log.info("recorded message deleted: no call_recording consent", extra={"call_id": facts.uuid})
            return False
        seconds = round(taken.recorded_ms / 1000) if taken.recorded_ms else None
        text = message_text(facts.caller, seconds, self.links.url(tenant, message_id, kept_until))
        await self.sms.send(tenant, snapshot.msisdn, text, message_key(facts.uuid))
        MESSAGES.labels("announced").inc()
        if self.connectors is not None:
            try:
                await self.notify(tenant, UUID(snapshot.subscriber_id), message_id, facts.uuid, text)
            except Exception:  # the SMS is queued: a notification problem never undoes the announcement
                log.exception("recorded message: connector notifications not sent", extra={"call_id": facts.uuid})
        return True

    # -- notifications through the household's connectors ---------------------------------------------------

    def _connector(self, name: str) -> tuple[Connector | None, str | None]:
        """The ready connector ``name``, or why not (``no_connector``: not configured; ``unavailable``)."""
        assert self.connectors is not None
        try:
            connector = self.connectors.get(name)
        except KeyError:
            return None, "no_connector"
        except ConnectorUnavailable:
            return None, "unavailable"
        return (connector, None) if connector is not None else (None, "no_connector")

    async def notify(self, tenant: UUID, subscriber_id: UUID, message_id: UUID, call_uuid: str, text: str) -> None:
        """One notification per connector of the subscriber's households, each claimed first (once per call per
        connector), sent with a deadline, settled and audited. Raises only when PostgreSQL fails."""
        claimed: list[tuple[NotifyTarget, int, Connector | None, str | None]] = []
        async with tenant_tx(self.pool, tenant) as conn:
            if not await store.consent_in_force(conn, subscriber_id, "call_recording", self.clock()):
                return  # revoked since the message was kept: the household is not told about it again
            for target in await store.message_notify_targets(conn, subscriber_id):
                connector, why = self._connector(target.connector)
                if why == "no_connector":
                    continue  # a device of a connector this instance does not run: nothing to send through
                if connector is not None and Capability.SEND_NOTIFICATION not in connector.manifest.capabilities:
                    MESSAGE_NOTIFICATIONS.labels(target.connector, "no_capability").inc()
                    continue
                attempt = await store.claim_message_notification(conn, message_id, target,
                                                                 max_attempts=self.notify_attempts)
                if attempt is None:
                    MESSAGE_NOTIFICATIONS.labels(target.connector, "duplicate").inc()
                    continue
                claimed.append((target, attempt, connector, why))
        if not claimed:
            return
        note = {"call_id": call_uuid, "message_id": str(message_id)}
        outcomes = await asyncio.gather(*(self._send(connector, why, target, text, note)
                                          for target, _, connector, why in claimed))
        async with tenant_tx(self.pool, tenant) as conn:
            for (target, attempt, _, _), (result, ref, error) in zip(claimed, outcomes, strict=True):
                sent = result == "sent"
                await store.settle_message_notification(conn, message_id, target.connector, sent=sent, result=result,
                                                        vendor_ref=ref)
                detail: dict[str, object] = {"connector": target.connector, "device_id": str(target.device_id),
                                             "result": result, "attempt": attempt, "consent": "call_recording",
                                             "sms_key": message_key(call_uuid)}
                if ref is not None:
                    detail["vendor_ref"] = ref[:200]
                if error is not None:
                    detail["error"] = error
                await store.audit_message(conn, tenant, ACTOR, "message.notified" if sent else "message.notify_failed",
                                          message_id, call_uuid, detail)
        for (target, _, _, _), (result, _, error) in zip(claimed, outcomes, strict=True):
            MESSAGE_NOTIFICATIONS.labels(target.connector, result).inc()
            if result != "sent":
                log.warning("recorded message: notification through %s not sent (%s); the SMS stands",
                            target.connector, result, extra={"call_id": call_uuid, "connector": target.connector,
                                                             "result": result, "error": error})

    async def _send(self, connector: Connector | None, why: str | None, target: NotifyTarget, text: str,
                    correlation: dict[str, str]) -> tuple[str, str | None, str | None]:
        """(result, vendor ref, error class) of one send; never raises (a plugin's bug reads as ``failed``)."""
        if connector is None:
            return why or "unavailable", None, "ConnectorUnavailable"
        try:
            if connector.health().state == "down":
                return "unavailable", None, "health_down"
            async with asyncio.timeout(self.notify_timeout_s):
                ref = await connector.send_notification(Notification(
                    target=target.connector_ref, title=NOTIFY_TITLE, text=text, correlation=correlation))
        except TimeoutError:
            return "timeout", None, "TimeoutError"
        except NotLinked:
            return "not_linked", None, "NotLinked"
        except ConnectorUnavailable as exc:
            return "unavailable", None, type(exc).__name__
        except ConnectorError as exc:
            return "failed", None, type(exc).__name__
        except Exception as exc:  # noqa: BLE001 -- a plugin's bug must not lose the other connectors' rows
            return "failed", None, type(exc).__name__
        return "sent", str(ref)[:200], None

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
