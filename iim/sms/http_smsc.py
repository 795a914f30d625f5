"""HTTP SMSC API transport: JSON submits out, receipts and MO in, both signed (Standard Webhooks v1).

Submit: ``POST <url>`` with ``{"to", "text", "flash", "reference", "from"}``; the SMSC answers 2xx
``{"message_id": "..."}``. ``reference`` (also ``webhook-id`` and ``Idempotency-Key``) is the outbox row
id: the same on every retry, so an SMSC that deduplicates by it never sends a resubmission twice. The SMSC
segments the text itself, so one message id covers the whole SMS.

Answers: 429 -> ``Throttled``; 503 -> ``QueueFull``; other 5xx -> ``TemporaryFailure``; other 4xx ->
``Rejected(status)``; connection errors and timeouts -> ``TransportDown``.

Inbound (:meth:`HttpSmscTransport.web_app`, mounted by the service): ``POST /receipts``
``{"message_id", "state", "error"}`` and ``POST /mo`` ``{"id", "from", "to", "text"}``, each verified with
the same secret before anything is parsed; 401 when not authentic, 400 when malformed, 503 when our handler
failed (the SMSC retries), 200 once handled (an MO is stored by then).

The shared secret comes from a credential reference (``env:`` / ``file:``; ``whsec_<base64>``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web

from iim.core.lifecycle import AsyncResource
from iim.core.secrets import resolve_secret
from iim.core.signing import SignatureError, decode_secret, sign_webhook, verify_webhook
from iim.sms.transport import (
    MoHandler,
    MoSms,
    OutboundSms,
    QueueFull,
    Receipt,
    ReceiptHandler,
    ReceiptState,
    Rejected,
    SubmitResult,
    TemporaryFailure,
    Throttled,
    TransportDown,
    to_e164,
)

__all__ = ["HttpSmscSettings", "HttpSmscTransport"]

log = logging.getLogger("iim.messaging.http_smsc")

_STATES = {s.value: s for s in ReceiptState}
_STATES.update({"delivrd": ReceiptState.DELIVERED, "undeliv": ReceiptState.UNDELIVERED,
                "failed": ReceiptState.UNDELIVERED, "rejectd": ReceiptState.REJECTED})


@dataclass(frozen=True, slots=True)
class HttpSmscSettings:
    url: str
    #: credential reference of the shared signing secret (``env:NAME`` or ``file:/path``)
    secret_ref: str
    name: str = "http"
    source_addr: str | None = None
    timeout: float = 10.0
    max_connections: int = 64
    #: accepted clock skew of inbound callbacks
    tolerance_s: int = 300


class HttpSmscTransport(AsyncResource):
    """:class:`iim.sms.transport.SmsTransport` over an HTTP SMSC API."""

    def __init__(self, settings: HttpSmscSettings) -> None:
        self.settings = settings
        self._secret: bytes | None = None
        self._session: aiohttp.ClientSession | None = None
        self._on_mo: MoHandler | None = None
        self._on_receipt: ReceiptHandler | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def ready(self) -> bool:
        return self._session is not None and not self._session.closed

    def bind_inbound(self, on_mo: MoHandler, on_receipt: ReceiptHandler) -> None:
        self._on_mo, self._on_receipt = on_mo, on_receipt

    def check_secret(self) -> None:
        """Resolve and decode the shared secret now (``LookupError``/``ValueError``): a start-up check."""
        self._key()

    def _key(self) -> bytes:
        if self._secret is None:
            self._secret = decode_secret(resolve_secret(self.settings.secret_ref))
        return self._secret

    async def start(self) -> None:
        self._key()  # fail at start-up, not at the first SMS, when the reference does not resolve
        if self.ready:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            connector=aiohttp.TCPConnector(limit=self.settings.max_connections))

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def submit(self, msg: OutboundSms) -> SubmitResult:
        if msg.done_parts:  # accepted earlier (the SMSC segments): nothing left to send
            return SubmitResult(tuple(msg.done_parts[i] for i in sorted(msg.done_parts)))
        session = self._session
        if session is None or session.closed:
            raise TransportDown(f"HTTP SMSC {self.name} not started")
        source = msg.source or self.settings.source_addr
        payload: dict[str, Any] = {"to": msg.msisdn, "text": msg.body, "flash": msg.flash,
                                   "reference": str(msg.reference)}
        if source:
            payload["from"] = source
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        msg_id = str(msg.reference)
        ts = int(time.time())
        headers = {"Content-Type": "application/json", "Idempotency-Key": msg_id, "webhook-id": msg_id,
                   "webhook-timestamp": str(ts), "webhook-signature": sign_webhook(msg_id, ts, body, self._key())}
        try:
            async with session.post(self.settings.url, data=body, headers=headers) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportDown(f"HTTP SMSC {self.name}: {exc!r}") from exc
        if 200 <= status < 300:
            try:
                message_id = str(json.loads(text)["message_id"])
            except (ValueError, KeyError, TypeError):
                # Accepted, but without an id receipts cannot match; it is sent all the same (never resent).
                log.warning("HTTP SMSC %s: 2xx without message_id", self.name, extra={"sms_id": msg_id})
                message_id = f"noid:{msg_id}"
            return SubmitResult((message_id,))
        detail = f"HTTP {status}: {text[:200]}"
        if status == 429:
            raise Throttled(detail, code=status)
        if status == 503:
            raise QueueFull(detail, code=status)
        if status >= 500:
            raise TemporaryFailure(detail, code=status)
        raise Rejected(detail, code=status)

    # --- inbound -------------------------------------------------------------------------------------------

    def web_app(self) -> web.Application:
        """Routes for the SMSC's callbacks; mount with ``app.add_subapp("/smsc/<name>/", transport.web_app())``."""
        app = web.Application(client_max_size=256 * 1024)
        app.router.add_post("/receipts", self._receipt_route)
        app.router.add_post("/mo", self._mo_route)
        return app

    async def _verified(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            verify_webhook(request.headers, raw, [self._key()], now=time.time(), tolerance_s=self.settings.tolerance_s)
        except SignatureError as exc:
            log.warning("HTTP SMSC %s: callback refused: %s", self.name, exc.reason)
            raise web.HTTPUnauthorized(text=json.dumps({"error": "signature"}),
                                       content_type="application/json") from exc
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise web.HTTPBadRequest(text='{"error":"json"}', content_type="application/json") from exc
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text='{"error":"object expected"}', content_type="application/json")
        return data

    async def _receipt_route(self, request: web.Request) -> web.Response:
        data = await self._verified(request)
        message_id, state = data.get("message_id"), str(data.get("state", "")).lower()
        if not isinstance(message_id, str) or not message_id or state not in _STATES:
            raise web.HTTPBadRequest(text='{"error":"message_id and state required"}', content_type="application/json")
        error = data.get("error")
        receipt = Receipt(self.name, message_id, _STATES[state], None if error is None else str(error)[:200])
        if self._on_receipt is not None:
            try:
                await self._on_receipt(receipt)
            except Exception:
                log.exception("HTTP SMSC %s: receipt handler failed", self.name)
                return web.json_response({"error": "retry"}, status=503)
        return web.json_response({"ok": True})

    async def _mo_route(self, request: web.Request) -> web.Response:
        data = await self._verified(request)
        source, destination, text = data.get("from"), data.get("to"), data.get("text")
        if not (isinstance(source, str) and isinstance(destination, str) and isinstance(text, str)):
            raise web.HTTPBadRequest(text='{"error":"from, to and text required"}', content_type="application/json")
        sms_id = data.get("id")
        mo = MoSms(self.name, to_e164(source, 0), to_e164(destination, 0), text, datetime.now(UTC),
                   str(sms_id) if sms_id not in (None, "") else None,
                   source_received=None if source.strip().startswith("+") else source)
        if self._on_mo is not None:
            try:
                await self._on_mo(mo)
            except Exception:
                log.exception("HTTP SMSC %s: MO handler failed", self.name)
                return web.json_response({"error": "retry"}, status=503)
        return web.json_response({"ok": True})
