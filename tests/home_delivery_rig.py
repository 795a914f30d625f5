"""Real stand-ins for the home-delivery tests: a vendor cloud (aiohttp server), a small HTTP connector that
talks to it, a renderer writing real WAV files, an HMAC URL signer and a household builder (SMS go through the
service's own ``iim.home.outbox_sink``). Nothing here mocks another package: each is a working implementation of a
protocol."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import wave
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from datetime import time as dtime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import aiohttp
from aiohttp import web
from pydantic import BaseModel

from iim.connectors.contract import (
    Capability,
    Connector,
    ConnectorError,
    ConnectorHealth,
    ConnectorManifest,
    ConnectorUnavailable,
    Notification,
    TtsDelivery,
    UserActionRequest,
    UserActionResult,
)
from policy_cache import registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import (
    BindingCreate,
    BindingRole,
    ConsentCreate,
    ConsentPurpose,
    DeviceCapability,
    DeviceCreate,
    DeviceStatus,
    DeviceType,
    FallbackAction,
    HouseholdCreate,
    PolicyCreate,
    PresenceState,
    RingMode,
    SubscriberCreate,
    TenantCreate,
)

# -- the vendor cloud ---------------------------------------------------------------------------------------

@dataclass
class VendorCloud:
    """A smart-home vendor's API. Behaviour per device reference: ``ok`` (default), ``down`` (503),
    ``refuse`` (400), and for user actions ``accept``/``decline``/``slow``/``none``/``media:<aor>``."""

    behaviour: dict[str, str] = field(default_factory=dict)
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _runner: web.AppRunner | None = None

    def paths(self, path: str) -> list[dict[str, Any]]:
        return [body for p, body in self.received if p == path]

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append((request.path, body))
        self.arrived.set()
        how = self.behaviour.get(str(body.get("target")), "ok")
        if how == "down":
            return web.json_response({"error": "maintenance"}, status=503)
        if how == "refuse":
            return web.json_response({"error": "unknown device"}, status=400)
        if request.path == "/action":
            if how == "slow":
                await asyncio.sleep(float(body["timeout_s"]) * 4)
                return web.json_response({"choice": None})
            if how == "none":
                return web.json_response({"choice": None})
            if how.startswith("media:"):
                return web.json_response({"choice": "accept", "detail": f"media=sip:{how[6:]}"})
            return web.json_response({"choice": how if how in ("accept", "decline") else "accept"})
        return web.json_response({"id": f"v-{len(self.received)}"})

    async def start(self) -> None:
        app = web.Application()
        for path in ("/tts", "/notify", "/action"):
            app.router.add_post(path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class _NoConfig(BaseModel):
    pass


class HttpConnector:
    """A working connector over plain HTTP/JSON (the shape of a webhook/OEM connector)."""

    manifest = ConnectorManifest("webhook", "0.1", frozenset(Capability), _NoConfig)

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._session: aiohttp.ClientSession | None = None

    async def setup(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))

    async def unload(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _post(self, path: str, body: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        assert self._session is not None
        try:
            async with self._session.post(self.base_url + path, json=body,
                                          timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                data: dict[str, Any] = await resp.json()
                if resp.status >= 500:
                    raise ConnectorUnavailable(f"vendor answered {resp.status}")
                if resp.status >= 400:
                    raise ConnectorError(f"vendor refused: {resp.status}")
                return data
        except aiohttp.ClientError as exc:
            raise ConnectorUnavailable(type(exc).__name__) from exc

    async def send_notification(self, notification: Notification) -> str:
        data = await self._post("/notify", {"target": notification.target, "title": notification.title,
                                            "text": notification.text, **dict(notification.correlation)})
        return str(data["id"])

    async def request_user_action(self, request: UserActionRequest) -> UserActionResult:
        data = await self._post("/action", {"target": request.target, "prompt": request.prompt,
                                            "options": list(request.options), "timeout_s": request.timeout_s,
                                            **dict(request.correlation)}, timeout=request.timeout_s * 10)
        return UserActionResult(data.get("choice"), data.get("detail", ""))

    async def deliver_tts(self, delivery: TtsDelivery) -> str:
        data = await self._post("/tts", {"target": delivery.target, "audio_url": delivery.audio_url,
                                         "text": delivery.text, **dict(delivery.correlation)})
        return str(data["id"])

    def health(self) -> ConnectorHealth:
        return ConnectorHealth("up")

    async def probe(self) -> ConnectorHealth:
        return self.health()


class Connectors:
    """Connector instances by name."""

    def __init__(self, **connectors: Connector) -> None:
        self._by_name = dict(connectors)

    def get(self, name: str) -> Connector | None:
        return self._by_name.get(name)


# -- TTS and URLs ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rendered:
    path: Path
    key: str
    voice: str | None
    duration_s: float
    cached: bool


class WavRenderer:
    """Writes 100 ms of silence per 10 characters as a real WAV, cached by (voice, text)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.rendered: list[str] = []

    def render(self, text: str, *, voice: str | None = None) -> Rendered:
        key = hashlib.sha256(f"{voice}\0{text}".encode()).hexdigest()[:32]
        path = self.directory / f"{key}.wav"
        frames = 800 * max(1, len(text) // 10)
        if path.exists():
            return Rendered(path, key, voice, frames / 8000, True)
        with wave.open(str(path), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(8000)
            wav.writeframes(b"\0\0" * frames)
        self.rendered.append(key)
        return Rendered(path, key, voice, frames / 8000, False)


class TtsDown(Exception):
    pass


class BrokenRenderer:
    """A TTS engine whose binary is missing."""

    async def render(self, text: str, *, voice: str | None = None) -> Rendered:
        raise TtsDown("espeak-ng: not found")


class HmacSigner:
    def __init__(self, base: str = "https://iim.example.net/tts", secret: bytes = b"k" * 32, ttl: int = 300) -> None:
        self.base, self.secret, self.ttl = base, secret, ttl

    def sign(self, key: str) -> str:
        expires = int(time.time()) + self.ttl
        sig = hmac.new(self.secret, f"{key}:{expires}".encode(), hashlib.sha256).hexdigest()
        return f"{self.base}/{key}.wav?exp={expires}&sig={sig}"


# -- MO messages and homes -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mo:
    sms_id: str
    source: str
    destination: str
    body: str
    received_at: datetime


@dataclass
class Home:
    tenant_id: UUID
    household_id: UUID
    subscriber_id: UUID
    msisdn: str
    devices: dict[str, UUID]
    consent_id: UUID | None


async def create_tenant(pool: Pool, name: str = "home") -> UUID:
    tenant = uuid4()
    async with tenant_tx(pool, tenant) as conn:
        await registry.create(conn, registry.TENANT, TenantCreate(name=name), actor="test")
    return tenant


async def build_home(
    pool: Pool,
    tenant: UUID,
    msisdn: str,
    *,
    presence: PresenceState = PresenceState.HOME,
    time_zone: str = "Europe/Moscow",
    consent_scope: Mapping[str, Any] | None = None,
    consent_expires: datetime | None = None,
    announce_consent: bool = False,
    recording_consent: bool | None = None,
    speaker: bool = True,
    display: bool = False,
    sip_speaker: bool = False,
    announce_speaker: bool = False,
    speaker_ref: str | None = None,
    quiet: tuple[dtime, dtime] | None = None,
    dnd: bool = False,
    blocked: list[str] | None = None,
    ring_mode: RingMode = RingMode.PHONE_ONLY,
    fallback: FallbackAction = FallbackAction.MISSED_CALL_SMS,
) -> Home:
    """A household with one owner and the devices asked for; ``consent_scope`` None = no read_sms consent."""
    kw: dict[str, Any] = {"actor": "test"}
    devices: dict[str, UUID] = {}
    suffix = msisdn[-7:]
    async with tenant_tx(pool, tenant) as conn:
        hh = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(name=f"flat {suffix}", time_zone=time_zone,
                                                                             presence=presence), **kw)
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=msisdn), **kw)
        await registry.create(conn, registry.BINDING, BindingCreate(subscriber_id=sub.id, household_id=hh.id,
                                                                    role=BindingRole.OWNER), **kw)
        if speaker:
            caps = {DeviceCapability.TTS} | ({DeviceCapability.CLOUD_ANNOUNCE} if announce_speaker else set())
            devices["speaker"] = (await registry.create(conn, registry.DEVICE, DeviceCreate(
                household_id=hh.id, name="Kitchen speaker", type=DeviceType.SPEAKER, capabilities=frozenset(caps),
                connector="webhook", connector_ref=speaker_ref or f"spk-{suffix}", status=DeviceStatus.ONLINE),
                **kw)).id
        if display:
            devices["display"] = (await registry.create(conn, registry.DEVICE, DeviceCreate(
                household_id=hh.id, name="Hall panel", type=DeviceType.HUB,
                capabilities=frozenset({DeviceCapability.DISPLAY}), connector="webhook",
                connector_ref=f"panel-{suffix}", status=DeviceStatus.ONLINE), **kw)).id
        if sip_speaker:
            devices["sip"] = (await registry.create(conn, registry.DEVICE, DeviceCreate(
                household_id=hh.id, name="SIP speaker", type=DeviceType.SPEAKER,
                capabilities=frozenset({DeviceCapability.SIP, DeviceCapability.TTS}),
                sip_uri=f"sip:sip-{suffix}@iim.local", status=DeviceStatus.ONLINE), **kw)).id
        consent_id = None
        if consent_scope is not None:
            consent = await registry.create(conn, registry.CONSENT, ConsentCreate(
                subscriber_id=sub.id, purpose=ConsentPurpose.READ_SMS, scope=dict(consent_scope),
                expires_at=consent_expires, evidence={"channel": "test"}), **kw)
            consent_id = consent.id
        if announce_consent:
            await registry.create(conn, registry.CONSENT, ConsentCreate(
                subscriber_id=sub.id, purpose=ConsentPurpose.ANNOUNCE_CALLS, evidence={"channel": "test"}), **kw)
        if recording_consent or (recording_consent is None and fallback is FallbackAction.RECORD_MESSAGE):
            # without it the message is not recorded (None: granted to a record_message home)
            await registry.create(conn, registry.CONSENT, ConsentCreate(
                subscriber_id=sub.id, purpose=ConsentPurpose.CALL_RECORDING, evidence={"channel": "test"}), **kw)
        await registry.create(conn, registry.POLICY, PolicyCreate(
            subscriber_id=sub.id, quiet_start=quiet[0] if quiet else None, quiet_end=quiet[1] if quiet else None,
            dnd=dnd, blocked_callers=blocked or [], ring_mode=ring_mode, fallback=fallback), **kw)
    return Home(tenant, hh.id, sub.id, msisdn, devices, consent_id)


async def audit_rows(pool: Pool, tenant: UUID, sms_id: str) -> list[dict[str, Any]]:
    async with tenant_tx(pool, tenant, readonly=True) as conn:
        rows = await conn.fetch("SELECT action, detail, correlation FROM iim.audit_log WHERE entity = 'sms' "
                                "AND entity_id = $1 ORDER BY id", sms_id)
    return [dict(r) for r in rows]
