"""The HTTPS device bridge: ``POST /v1/events`` (devices, hubs) and ``POST /v1/webhooks/{source}`` (clouds).

A W3C ``traceparent`` header joins the request's span (and the incident's decision and calls) to the caller's trace.

Order of checks, cheapest and least revealing first: size -> tenant -> client certificate -> the sender
address's rate limit -> key lookup -> signature over the raw bytes -> strict JSON and schema -> the device's
(per hazard) and tenant's rate limits -> identity binding -> durable intake. Nothing is parsed before the
signature is checked, and no bucket of a device or tenant is charged for a request that is not theirs. Every
authentication failure gets the same answer, whether the device exists or not (the reason goes to the log).
A refusal never writes an event, and every refusal is a problem+json answer with a stable ``error_id``, a
metric and a JSON log line; replays and identity mismatches also reach the tenant's audit log, aggregated
(:mod:`iot_bridge.refusals`).

Every wait for PostgreSQL on a request (key lookups, the intake transaction) shares one deadline,
``store_deadline_s``: past it the answer is 503 with ``Retry-After`` and the connection is dropped, so the
transaction is rolled back unless its COMMIT had already been sent. In that one case the event may be written
after the 503; the device's retry with the same event_id then gets the first answer (202, replayed), and the
event is acted on once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from aiohttp import web
from prometheus_client import Counter, Histogram

from iim.core import strict_json
from iim.core.errors import STORE_UNAVAILABLE
from iim.core.metrics import REGISTRY
from iim.core.traced_http import traced_requests
from iim.core.tracing import attrs, span
from iot_bridge import signing
from iot_bridge.directory import DeviceDirectory, DeviceKeys, KeyChanges
from iot_bridge.events import (
    CloudWebhook,
    DeviceEvent,
    EventRejected,
    body_fingerprint,
    event_fingerprint,
    parse_event,
    parse_webhook,
)
from iot_bridge.intake import IncidentOpener, IntakeOutcome, StoreDown, accept_event
from iot_bridge.ratelimit import RateLimited, RateLimits, RateLimitSettings
from iot_bridge.refusals import RefusalAudit
from iot_bridge.tls import ClientCertError, ClientIdentity, TenantCaRegistry
from policy_cache.db import Pool

__all__ = ["BRIDGE_KEY", "Bridge", "BridgeConfig", "BridgeRefusal", "EVENTS", "create_bridge_app"]

log = logging.getLogger(__name__)

EVENTS = Counter("iim_bridge_events", "Device events by outcome and reason", ["outcome", "reason"],
                 registry=REGISTRY)
INTAKE_SECONDS = Histogram("iim_bridge_intake_seconds", "Time from request to committed answer",
                           buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
                           registry=REGISTRY)

PROBLEM = "application/problem+json"
TENANT_HEADER = "IIM-Tenant"
DEVICE_HEADER = "IIM-Device"
MAX_BODY = 64 * 1024
_MAX_JWS_HEADER = 1024  # base64url characters; the verifier refuses longer headers too


#: The one answer to every authentication failure: unknown device, no key, malformed or wrong signature,
#: stale timestamp. A different answer for a known device would tell an attacker which devices exist.
NOT_AUTHENTICATED = "the event could not be authenticated"


class BridgeRefusal(Exception):
    """A request refused with ``status`` and a stable ``error_id``; ``retry_after`` adds the header.
    ``reason`` (logged, never sent) says more than ``detail`` where the answer must not."""

    def __init__(self, status: int, error_id: str, detail: str, *, retry_after: int | None = None,
                 event_id: str | None = None, errors: list[dict[str, Any]] | None = None,
                 reason: str | None = None, audit: tuple[UUID, str] | None = None) -> None:
        super().__init__(detail)
        #: (tenant, actor) when the refusal goes to that tenant's audit log
        self.audit = audit
        self.reason = reason or detail
        self.errors = errors
        self.status = status
        self.error_id = error_id
        self.detail = detail
        self.retry_after = retry_after
        self.event_id = event_id


@dataclass
class BridgeConfig:
    tolerance_s: int = 300
    max_body: int = MAX_BODY
    require_client_cert: bool = False
    rate_limits: RateLimitSettings = field(default_factory=RateLimitSettings)
    store_retry_after_s: int = 5
    #: the longest a request waits for PostgreSQL in all (lookups and intake) before its 503
    store_deadline_s: float = 1.5
    clock: Callable[[], float] = time.time


class Bridge:
    def __init__(self, pool: Pool, config: BridgeConfig, *, cas: TenantCaRegistry | None = None,
                 on_accepted: Callable[[IntakeOutcome], Awaitable[None]] | None = None,
                 opener: IncidentOpener | None = None, followed: bool = False) -> None:
        self.opener = opener
        self.pool = pool
        self.config = config
        self.directory = DeviceDirectory(pool, followed=followed)
        self.refusals = RefusalAudit(pool)
        self.key_changes: KeyChanges | None = None
        self.limits = RateLimits(config.rate_limits)
        self.cas = cas
        self.on_accepted = on_accepted

    # ------------------------------------------------------------------ identity
    def client_identity(self, request: web.Request) -> ClientIdentity | None:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if isinstance(ssl_object, ssl.SSLObject) else None
        if not der:
            if self.config.require_client_cert:
                raise BridgeRefusal(401, "client-certificate-required", "a client certificate is required")
            return None
        if self.cas is None:
            raise BridgeRefusal(401, "client-certificate-refused", "no client certificate authority is configured")
        try:
            return self.cas.identify(der, now=datetime.fromtimestamp(self.config.clock(), UTC))
        except ClientCertError as exc:
            raise BridgeRefusal(401, "client-certificate-refused", exc.reason) from exc

    def tenant_of(self, request: web.Request, identity: ClientIdentity | None) -> UUID:
        raw = request.headers.get(TENANT_HEADER)
        if raw is None and identity is not None:
            raw = identity.tenant_id
        if raw is None:
            raise BridgeRefusal(400, "tenant-required", f"the {TENANT_HEADER} header is required")
        try:
            tenant = UUID(raw)
        except ValueError as exc:
            raise BridgeRefusal(400, "tenant-required", f"{TENANT_HEADER} is not a UUID") from exc
        if identity is not None and UUID(identity.tenant_id) != tenant:
            raise BridgeRefusal(403, "identity-mismatch", "the client certificate belongs to another tenant",
                                audit=(UUID(identity.tenant_id), f"{identity.kind}:{identity.external_id}"))
        return tenant

    def rate_limit_source(self, source: str) -> None:
        """Before authentication: the sender address's own bucket only."""
        self._refuse_if(self.limits.check_source(source, time.monotonic()))

    def rate_limit_sender(self, tenant: UUID, device: str, hazard: str) -> None:
        """After authentication: the device's bucket for this hazard, and the tenant's."""
        self._refuse_if(self.limits.check_sender(tenant=str(tenant), device=device, hazard=hazard,
                                                 now=time.monotonic()))

    @staticmethod
    def _refuse_if(limited: RateLimited | None) -> None:
        if limited is not None:
            raise BridgeRefusal(429, "rate-limited", f"too many requests ({limited.scope})",
                                retry_after=max(1, limited.retry_after_s))

    @asynccontextmanager
    async def store_deadline(self) -> AsyncIterator[None]:
        """The request's one deadline for PostgreSQL; past it, or with PostgreSQL away, :class:`StoreDown`."""
        try:
            async with asyncio.timeout(self.config.store_deadline_s):
                yield
        except STORE_UNAVAILABLE as exc:  # TimeoutError included: the deadline
            raise StoreDown(f"{type(exc).__name__}: {exc}" if str(exc) else
                            f"no answer from PostgreSQL within {self.config.store_deadline_s} s") from exc

    async def device_keys(self, tenant: UUID, device: str) -> DeviceKeys:
        keys = await self.directory.device(tenant, device)
        if keys is None or not (keys.hmac_secrets or keys.jws_keys):
            # Same answer as a bad signature: the endpoint is no oracle for which devices exist.
            raise BridgeRefusal(401, "signature-invalid", NOT_AUTHENTICATED, reason="unknown device or no key")
        return keys

    async def bind_identity(self, identity: ClientIdentity | None, keys: DeviceKeys) -> None:
        if identity is None:
            return
        if identity.kind == "device" and identity.external_id == keys.device.external_id:
            return
        if identity.kind == "gateway":
            household = await self.directory.gateway_household(keys.device.tenant_id, identity.external_id)
            if household == keys.device.household_id:
                return
        raise BridgeRefusal(403, "identity-mismatch",
                            "the client certificate is not bound to this device or its household gateway",
                            audit=(keys.device.tenant_id, f"{identity.kind}:{identity.external_id}"))

    # ------------------------------------------------------------------ intake
    async def accept(self, keys: DeviceKeys, event: DeviceEvent, *, fingerprint: str, channel: str,
                     msg_id: str | None, source: str) -> IntakeOutcome:
        actor = f"device:{keys.device.external_id}" if channel == "device" else channel
        if event.device_id != keys.device.external_id:
            raise BridgeRefusal(403, "identity-mismatch", "the event names another device", event_id=event.event_id,
                                audit=(keys.device.tenant_id, actor))
        with span("bridge.intake", attributes=attrs(tenant=str(keys.device.tenant_id), event_id=event.event_id,
                                                     event_type=event.type.value, channel=channel)) as traced:
            # The incident's first decision runs inside (the opener): a child of this span.
            outcome = await accept_event(self.pool, keys.device, event, fingerprint=fingerprint, channel=channel,
                                         msg_id=msg_id, opener=self.opener)
            if traced.is_recording():
                traced.set_attributes(attrs(outcome=outcome.kind, incident_id=str(outcome.incident_id)
                                            if outcome.incident_id else None, opened=outcome.opened))
        if outcome.kind == "conflict":
            raise BridgeRefusal(422, "idempotency-conflict", "event_id was already used with another body",
                                event_id=event.event_id, audit=(keys.device.tenant_id, actor))
        if outcome.kind == "replayed":
            self.refusals.record(keys.device.tenant_id, "event.replayed", source, actor=actor,
                                 entity_id=str(keys.device.id), event_id=event.event_id,
                                 detail={"channel": channel})
        EVENTS.labels(outcome.kind, outcome.body.get("action", "")).inc()
        log.info("event %s", outcome.kind, extra={"event_id": event.event_id, "tenant": str(keys.device.tenant_id),
                                                  "incident_id": outcome.body.get("incident_id"),
                                                  "action": outcome.body.get("action")})
        if outcome.kind == "accepted" and self.on_accepted is not None:
            await self.on_accepted(outcome)
        return outcome


    async def device_event(self, tenant: UUID, device: str, raw: bytes, *, jose: bool, headers: Mapping[str, str],
                           identity: ClientIdentity | None, source: str) -> IntakeOutcome:
        """One device-signed event, whatever carried it (``POST /v1/events``, a hub's MQTT message): key lookup,
        signature (compact JWS when ``jose``, else Standard Webhooks ``headers`` over ``raw``), identity binding,
        strict parsing, the device's and tenant's rate limits and the durable intake, under one store deadline.

        Raises:
            BridgeRefusal: the event is refused (the status and error id say why).
            StoreDown: PostgreSQL is away or past the deadline; nothing was committed (unless the COMMIT had
                been sent: a retry then gets the first answer).
        """
        async with self.store_deadline():
            keys = await self.device_keys(tenant, device)
            event_raw, msg_id = _verify_device_body(self, jose, headers, raw, keys, self.config.clock())
            await self.bind_identity(identity, keys)
            try:
                event = parse_event(event_raw)
            except EventRejected as exc:
                raise _rejected(exc) from exc
            self.rate_limit_sender(tenant, keys.device.external_id, hazard=event.type)
            return await self.accept(keys, event, fingerprint=body_fingerprint(event_raw), channel="device",
                                     msg_id=msg_id, source=source)

    def refused(self, exc: BridgeRefusal, source: str) -> None:
        """Count and log a refusal; the ones that concern a tenant go to its audit log (aggregated)."""
        EVENTS.labels("refused", exc.error_id).inc()
        log.warning("event refused: %s", exc.reason,
                    extra={"event_id": exc.event_id, "reason": exc.error_id, "status": exc.status, "source": source})
        if exc.audit is not None:
            tenant, actor = exc.audit
            self.refusals.record(tenant, f"event.{exc.error_id}", source, actor=actor, event_id=exc.event_id,
                                 detail={"status": exc.status, "reason": exc.reason})

    def jws_device(self, raw: bytes) -> str:
        """The device a compact JWS names (its ``kid``), read only to find the key to verify with."""
        return _jws_device(raw)


BRIDGE_KEY = web.AppKey("bridge", Bridge)


def _verify_device_body(bridge: Bridge, jose: bool, headers: Mapping[str, str], raw: bytes, keys: DeviceKeys,
                        now: float) -> tuple[bytes, str]:
    """Check the signature; return the event bytes and the message id."""
    try:
        if jose:
            jws = _verify_jws_rotating(raw, keys, now, bridge.config.tolerance_s)
            return jws.event_raw, jws.msg_id
        verified = signing.verify_webhook(headers, raw, keys.hmac_secrets, now=now,
                                          tolerance_s=bridge.config.tolerance_s)
    except signing.SignatureError as exc:
        raise BridgeRefusal(401, "signature-invalid", NOT_AUTHENTICATED, reason=exc.reason) from exc
    return raw, verified.msg_id


def _verify_jws_rotating(raw: bytes, keys: DeviceKeys, now: float, tolerance_s: int) -> signing.VerifiedJws:
    """Each of the device's public keys in turn (rotation: old and new both valid for a while)."""
    if not keys.jws_keys:
        raise signing.UnknownKey("no JWS key is registered for this device")
    mismatch: signing.SignatureError | None = None
    for key in keys.jws_keys:
        try:
            return signing.verify_jws(raw, {keys.device.external_id: key}, now=now, tolerance_s=tolerance_s)
        except signing.SignatureMismatch as exc:
            mismatch = exc
    assert mismatch is not None
    raise mismatch


def _is_jose(request: web.Request) -> bool:
    return request.content_type == "application/jose"


def _jws_device(raw: bytes) -> str:
    """The ``kid`` of a compact JWS, read before verification only to find the key to verify with (strictly:
    bounded size and depth, as the verifier reads it, so no header can cost more than a small parse)."""
    head, _, _ = raw.partition(b".")
    if len(head) > _MAX_JWS_HEADER:
        raise BridgeRefusal(401, "signature-invalid", NOT_AUTHENTICATED, reason="JWS header too long")
    try:
        header = strict_json.loads(base64.urlsafe_b64decode(head + b"=" * (-len(head) % 4)), max_depth=2)
    except (ValueError, strict_json.BadJson) as exc:  # binascii.Error is a ValueError
        raise BridgeRefusal(401, "signature-invalid", NOT_AUTHENTICATED, reason="malformed JWS header") from exc
    kid = header.get("kid") if isinstance(header, dict) else None
    if not isinstance(kid, str) or not 0 < len(kid) <= 128:
        raise BridgeRefusal(401, "signature-invalid", NOT_AUTHENTICATED, reason="the JWS header names no key")
    return kid


def _rejected(exc: EventRejected, event_id: str | None = None) -> BridgeRefusal:
    if exc.errors and exc.errors[0].get("type") != "json_invalid":
        return BridgeRefusal(422, "validation-failed", exc.reason, event_id=event_id, errors=exc.errors)
    return BridgeRefusal(400, "malformed-event", exc.reason, event_id=event_id)


async def post_event(request: web.Request) -> web.Response:
    bridge = request.app[BRIDGE_KEY]
    started = time.perf_counter()
    identity = bridge.client_identity(request)
    tenant = bridge.tenant_of(request, identity)
    raw = await request.read()
    device = _jws_device(raw) if _is_jose(request) else request.headers.get(DEVICE_HEADER)
    if device is None:
        if identity is not None and identity.kind == "device":
            device = identity.external_id
        else:
            raise BridgeRefusal(400, "device-required", f"the {DEVICE_HEADER} header is required")
    bridge.rate_limit_source(request.remote or "")
    outcome = await bridge.device_event(tenant, device, raw, jose=_is_jose(request), headers=request.headers,
                                        identity=identity, source=request.remote or "")
    INTAKE_SECONDS.observe(time.perf_counter() - started)
    headers = {"Idempotent-Replayed": "true"} if outcome.kind == "replayed" else {}
    return web.json_response(outcome.body, status=202, headers=headers)


async def post_webhook(request: web.Request) -> web.Response:
    """A cloud posts a batch for its devices, signed with the source's own key (Standard Webhooks)."""
    bridge = request.app[BRIDGE_KEY]
    source = request.match_info["source"]
    identity = bridge.client_identity(request)
    tenant = bridge.tenant_of(request, identity)
    raw = await request.read()
    bridge.rate_limit_source(request.remote or "")
    async with bridge.store_deadline():
        keys = await bridge.directory.source(tenant, source)
        if keys is None or not keys.hmac_secrets:
            raise BridgeRefusal(401, "signature-invalid", NOT_AUTHENTICATED, reason="unknown source or no key")
        try:
            verified = signing.verify_webhook(request.headers, raw, keys.hmac_secrets, now=bridge.config.clock(),
                                              tolerance_s=bridge.config.tolerance_s)
        except signing.SignatureError as exc:
            raise BridgeRefusal(401, "signature-invalid", NOT_AUTHENTICATED, reason=exc.reason) from exc
        try:
            batch: CloudWebhook = parse_webhook(raw)
        except EventRejected as exc:
            raise _rejected(exc) from exc
        if batch.source != source:
            raise BridgeRefusal(422, "source-mismatch", "the batch names another source than its URL")
        bridge.rate_limit_sender(tenant, f"webhook:{source}", hazard="batch")
        # Every device is checked before anything is written: a bad batch writes nothing. A source's key speaks
        # only for the devices served by that source (a direct device has its own key and no connector).
        devices: list[DeviceKeys] = []
        for event in batch.events:
            found = await bridge.directory.device(tenant, event.device_id)
            if found is None or found.connector != source:
                raise BridgeRefusal(422, "unknown-device", f"device {event.device_id!r} is not served by {source!r}",
                                    event_id=event.event_id)
            devices.append(found)
        results = []
        for event, device_keys in zip(batch.events, devices, strict=True):
            outcome = await bridge.accept(device_keys, event, fingerprint=event_fingerprint(event),
                                          channel=f"webhook:{source}", msg_id=verified.msg_id,
                                          source=request.remote or "")
            results.append(outcome.body)
    return web.json_response({"results": results}, status=202)


def _problem(request: web.Request, status: int, error_id: str, detail: str,
             headers: dict[str, str] | None = None, errors: list[dict[str, Any]] | None = None) -> web.Response:
    body: dict[str, Any] = {"type": f"urn:iim:problem:{error_id}", "title": error_id.replace("-", " "),
                            "status": status, "detail": detail, "instance": request.path, "error_id": error_id}
    if errors:
        body["errors"] = errors
    return web.Response(text=json.dumps(body), status=status, content_type=PROBLEM, headers=headers)


@web.middleware
async def problem_middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    try:
        return await handler(request)
    except BridgeRefusal as exc:
        request.app[BRIDGE_KEY].refused(exc, request.remote or "")
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return _problem(request, exc.status, exc.error_id, exc.detail, headers, exc.errors)
    except StoreDown as exc:
        EVENTS.labels("refused", "store-unavailable").inc()
        log.error("event store unavailable: %s", exc)
        retry = str(request.app[BRIDGE_KEY].config.store_retry_after_s)
        return _problem(request, 503, "store-unavailable", "the event store is unavailable; retry later",
                        {"Retry-After": retry})
    except web.HTTPRequestEntityTooLarge:
        EVENTS.labels("refused", "body-too-large").inc()
        return _problem(request, 413, "body-too-large", "the request body is over the size limit")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _problem(request, exc.status, f"http-{exc.status}", exc.reason, None)
    except Exception:
        # A bug, not the client's fault: logged with its traceback, answered without internals.
        EVENTS.labels("refused", "internal-error").inc()
        log.exception("device bridge internal error")
        return _problem(request, 500, "internal-error", "internal error; the event was not accepted")


def create_bridge_app(pool: Pool, config: BridgeConfig | None = None, *, cas: TenantCaRegistry | None = None,
                      on_accepted: Callable[[IntakeOutcome], Awaitable[None]] | None = None,
                      opener: IncidentOpener | None = None, keys_dsn: str | None = None) -> web.Application:
    """The bridge's aiohttp app. ``opener`` (the scenario worker's ``begin_in``) starts new incidents inside
    the intake transaction; without it a tick job does that a moment later. ``keys_dsn`` (an ``iim_app`` URL):
    follow key and device changes there (``NOTIFY iim_bridge_keys``) so a revoked key or a disabled device is
    refused at once; without it cached keys live for their time limit (30 s)."""
    config = config or BridgeConfig()
    app = web.Application(middlewares=[traced_requests(), problem_middleware], client_max_size=config.max_body)
    bridge = app[BRIDGE_KEY] = Bridge(pool, config, cas=cas, on_accepted=on_accepted, opener=opener,
                                      followed=keys_dsn is not None)
    if keys_dsn is not None:
        bridge.key_changes = KeyChanges(bridge.directory, keys_dsn)

    async def run_alongside(_app: web.Application) -> AsyncIterator[None]:
        async with bridge.refusals:
            if bridge.key_changes is None:
                yield
                return
            async with bridge.key_changes:
                yield

    app.cleanup_ctx.append(run_alongside)
    app.router.add_post("/v1/events", post_event)
    app.router.add_post("/v1/webhooks/{source}", post_webhook)
    from iot_bridge.openapi import openapi_view  # the document describes the routes registered above
    app.router.add_get("/openapi.json", openapi_view)
    return app
