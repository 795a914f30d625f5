"""Incoming SMS read aloud on the home's speakers (spec 3.2, 5.2), under consent.

:meth:`SmsReadoutService.on_mo` is the messaging layer's hook for every stored MO SMS:

1. one tenant-scoped transaction: a per-SMS advisory lock, the idempotency check, the facts (subscriber
   by destination MSISDN, its households, devices, policies, newest ``read_sms`` consent), the pure
   decision (:func:`iim.home.sms_policy.decide_sms_readout`) and the first audit row - the refusal
   with its reasons, or the claim listing the planned devices. The claim is committed before anything
   is said, so a redelivered MO (same ``sms_id``) is never read twice: at most once is the right side
   for private content, and the phone has the SMS anyway;
2. TTS renders the text (cached) and a signed URL is made; each speaker gets ``deliver_tts``. TTS down
   -> the same devices get the text by ``send_notification`` (spec 7.2); displays always get text;
3. a connector that is down, unknown or failing leaves the SMS on the phone (nothing to send: the phone
   already has it) and is recorded;
4. one audit row per device: what (a keyed hash of the text, never the text), where (device id),
   under which consent.

The SMS body goes nowhere but the connectors and TTS of a permitted delivery: logs carry ``sms_id``,
audit rows carry hashes. The statements (facts, claim, audit rows) are :mod:`iim.home.store`'s.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID

from iim.connectors.contract import (
    Capability,
    Connector,
    ConnectorError,
    ConnectorUnavailable,
    Notification,
    TtsDelivery,
)
from iim.core.tracing import SpanKind, attrs, span
from iim.home import metrics, store
from iim.home.ports import ConnectorLookup, MoMessage, RenderedSpeech, SmsSink, SpeechRenderer, UrlSigner
from iim.home.sms_policy import (
    DEFAULT_MAX_AGE,
    DEFAULT_TEMPLATE,
    SmsReadout,
    Target,
    decide_sms_readout,
)
from iim.sms import store as sms_store
from policy_cache.db import Pool, tenant_tx

__all__ = ["ACTOR", "Delivery", "SmsReadoutService", "text_digest"]

log = logging.getLogger("iim.home.sms")

ACTOR = "iim:home_delivery"
# Audit actions; the first two are also the idempotency keys (one of them exists per handled sms_id).
CLAIMED = "sms.readout.claimed"
NOT_READ = "sms.not_read"
READ_ALOUD = "sms.read_aloud"
SHOWN = "sms.shown"
FAILED = "sms.delivery_failed"

DeliveryKind = Literal["tts", "text"]
DeliveryResult = Literal["delivered", "unavailable", "failed", "timeout", "no_connector"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """What happened on one device."""

    target: Target
    kind: DeliveryKind
    result: DeliveryResult
    why: str  # tts | display | tts_unavailable | no_tts_capability
    vendor_ref: str | None = None
    error: str | None = None  # exception class only: vendor messages may echo the text


def text_digest(key: bytes, text: str) -> str:
    """A keyed hash of what was said: proves a given text was read without letting anyone guess short ones
    (a plain sha256 of a 6-digit code is reversed in a second)."""
    return "hmac-sha256:" + hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


class SmsReadoutService:
    """The MO hook: decide, read aloud / show, fall back, audit. See the module docstring.

    Args:
        pool: the app-role pool (tenant-scoped transactions).
        renderer: TTS (``render(text, voice=...)``, sync or async, cached); any error means TTS is down.
        signer: signed, expiring audio URLs for the vendor clouds.
        connectors: connector instances by name.
        sms_sink: accepted for symmetry with the call path; an SMS needs no phone fallback (the phone
            already has it), so nothing is sent through it.
        hash_key: key of the audit's text hashes (from the secret store); a random per-process key if
            omitted, which still hides the text but cannot be re-verified after a restart.
    """

    def __init__(
        self,
        pool: Pool,
        renderer: SpeechRenderer,
        signer: UrlSigner,
        connectors: ConnectorLookup,
        sms_sink: SmsSink | None = None,
        *,
        voice: str | None = None,
        template: str = DEFAULT_TEMPLATE,
        max_age: timedelta = DEFAULT_MAX_AGE,
        connector_timeout_s: float = 10.0,
        hash_key: bytes | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._pool = pool
        self._renderer = renderer
        self._render_is_async = inspect.iscoroutinefunction(renderer.render)
        self._signer = signer
        self._connectors = connectors
        self._sms_sink = sms_sink
        self._voice = voice
        template.format(sender="", body="")  # a template with unknown fields fails here, not per SMS
        self._template = template
        self._max_age = max_age
        self._timeout = connector_timeout_s
        self._hash_key = hash_key if hash_key is not None else os.urandom(32)
        self._clock = clock

    async def on_mo(self, tenant_id: UUID | str, mo: MoMessage) -> None:
        """The messaging hook (``iim.sms.outbox.MoHook``): :meth:`handle`, outcome dropped."""
        await self.handle(tenant_id, mo)

    async def handle(self, tenant_id: UUID | str, mo: MoMessage) -> str:
        """:meth:`_handle` in a span (a child of the MO's): ids and outcomes only, never the text or numbers."""
        with span("sms.readout", attributes=attrs(tenant=str(tenant_id), sms_id=str(mo.sms_id))) as traced:
            outcome = await self._handle(tenant_id, mo)
            if traced.is_recording():
                traced.set_attribute("iim.outcome", outcome)
            return outcome

    async def _handle(self, tenant_id: UUID | str, mo: MoMessage) -> str:
        """Handle one stored MO SMS; returns the outcome (read_aloud, shown, nothing, failed, duplicate).

        Raises only when PostgreSQL cannot be reached (asyncpg/OSError): then nothing was said and a
        retry is safe. Connector and TTS failures are recorded, never raised.
        """
        started = time.perf_counter()
        tenant = tenant_id if isinstance(tenant_id, UUID) else UUID(str(tenant_id))
        sms_id = str(mo.sms_id)
        if not 1 <= len(sms_id) <= 200:
            raise ValueError("sms_id must be 1..200 characters")
        readout = await self._claim(tenant, mo, sms_id)
        if readout is None:
            metrics.SMS_READOUTS.labels("duplicate").inc()
            log.info("MO SMS already handled: not read again", extra={"sms_id": sms_id, "tenant_id": str(tenant)})
            return "duplicate"
        for code in readout.codes:
            metrics.SMS_REFUSALS.labels(code).inc()
        if readout.nothing:
            metrics.SMS_READOUTS.labels("nothing").inc()
            metrics.SMS_SECONDS.observe(time.perf_counter() - started)
            log.info("MO SMS not read in the home", extra={"sms_id": sms_id, "tenant_id": str(tenant),
                                                             "codes": list(readout.codes)})
            return "nothing"
        deliveries = await self._deliver(readout)
        outcome = ("read_aloud" if any(d.kind == "tts" and d.result == "delivered" for d in deliveries)
                   else "shown" if any(d.result == "delivered" for d in deliveries) else "failed")
        async with tenant_tx(self._pool, tenant) as conn:
            for d in deliveries:
                await store.audit_sms(conn, tenant, ACTOR, self._action(d), sms_id, self._detail(readout, d))
        metrics.SMS_READOUTS.labels(outcome).inc()
        metrics.SMS_SECONDS.observe(time.perf_counter() - started)
        log.info("MO SMS delivered in the home" if outcome != "failed" else
                 "MO SMS not delivered in the home: it stays on the phone",
                 extra={"sms_id": sms_id, "tenant_id": str(tenant), "outcome": outcome,
                        "deliveries": [f"{d.target.device_id}:{d.kind}:{d.result}" for d in deliveries]})
        return outcome

    async def _claim(self, tenant: UUID, mo: MoMessage, sms_id: str) -> SmsReadout | None:
        """Decide and write the first audit row, once per sms_id; ``None`` if it was handled before."""
        with span("sms.readout.decide") as traced:
            readout = await self._claim_in(tenant, mo, sms_id)
            if traced.is_recording():
                traced.set_attributes(attrs(duplicate=readout is None) if readout is None else attrs(
                    duplicate=False, consent_id=readout.consent_id, codes=list(readout.codes),
                    read_aloud=len(readout.read_aloud), show_text=len(readout.show_text)))
        return readout

    async def _claim_in(self, tenant: UUID, mo: MoMessage, sms_id: str) -> SmsReadout | None:
        async with tenant_tx(self._pool, tenant) as conn:
            if not await store.claim_sms(conn, tenant, sms_id, [CLAIMED, NOT_READ]):
                return None
            facts = await store.load_sms_facts(conn, tenant, mo)
            readout = decide_sms_readout(facts, self._clock(), template=self._template, max_age=self._max_age)
            if readout.nothing:
                await store.audit_sms(conn, tenant, ACTOR, NOT_READ, sms_id, {
                    "consent_id": readout.consent_id, "codes": list(readout.codes),
                    "reasons": list(readout.reasons)})
                await sms_store.forget_mo_body(conn, sms_id)  # not read out: no reason to keep it
            else:
                assert readout.text is not None
                await store.audit_sms(conn, tenant, ACTOR, CLAIMED, sms_id, {
                    "consent_id": readout.consent_id, "text_hash": text_digest(self._hash_key, readout.text),
                    "read_aloud": [t.device_id for t in readout.read_aloud],
                    "show_text": [t.device_id for t in readout.show_text],
                    "codes": list(readout.codes), "reasons": list(readout.reasons)})
        return readout

    # -- delivery ---------------------------------------------------------------------------------------
    async def _render(self, text: str) -> RenderedSpeech:
        if self._render_is_async:
            result = self._renderer.render(text, voice=self._voice)
        else:
            result = await asyncio.to_thread(self._renderer.render, text, voice=self._voice)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _deliver(self, readout: SmsReadout) -> list[Delivery]:
        assert readout.text is not None
        url: str | None = None
        if readout.read_aloud:
            try:
                with span("sms.readout.tts"):
                    audio = await self._render(readout.text)
                url = self._signer.sign(audio.key)
            except Exception as exc:  # noqa: BLE001 - any TTS failure means "show text instead" (spec 7.2)
                metrics.TTS_FALLBACKS.inc()
                log.warning("TTS unavailable, showing the SMS as text",
                            extra={"sms_id": readout.sms_id, "error": type(exc).__name__})
        jobs = [self._speak(t, readout, url) if url is not None else self._show(t, readout, "tts_unavailable")
                for t in readout.read_aloud]
        jobs += [self._show(t, readout, "display") for t in readout.show_text]
        deliveries = list(await asyncio.gather(*jobs))
        for d in deliveries:
            metrics.SMS_DELIVERIES.labels(d.kind, d.result).inc()
        return deliveries

    def _connector(self, target: Target) -> Connector | None:
        try:
            return self._connectors.get(target.connector)
        except KeyError:
            return None

    async def _speak(self, target: Target, readout: SmsReadout, url: str) -> Delivery:
        try:
            connector = self._connector(target)
        except ConnectorUnavailable:
            return Delivery(target, "tts", "unavailable", "tts", error="ConnectorUnavailable")
        if connector is None:
            return Delivery(target, "tts", "no_connector", "tts")
        if Capability.DELIVER_TTS not in connector.manifest.capabilities:
            return await self._show(target, readout, "no_tts_capability")
        assert readout.text is not None
        delivery = TtsDelivery(target=target.connector_ref, audio_url=url, text=readout.text,
                               correlation={"sms_id": readout.sms_id})
        return await self._call(target, "tts", "tts", connector, lambda: connector.deliver_tts(delivery),
                                readout.sms_id)

    async def _show(self, target: Target, readout: SmsReadout, why: str) -> Delivery:
        try:
            connector = self._connector(target)
        except ConnectorUnavailable:
            return Delivery(target, "text", "unavailable", why, error="ConnectorUnavailable")
        if connector is None:
            return Delivery(target, "text", "no_connector", why)
        assert readout.text is not None
        note = Notification(target=target.connector_ref, title=readout.title, text=readout.text,
                            correlation={"sms_id": readout.sms_id})
        return await self._call(target, "text", why, connector, lambda: connector.send_notification(note),
                                readout.sms_id)

    async def _call(self, target: Target, kind: DeliveryKind, why: str, connector: Connector,
                    send: Callable[[], Awaitable[str]], sms_id: str) -> Delivery:
        with span("sms.readout.deliver", kind=SpanKind.CLIENT, attributes=attrs(
                sms_id=sms_id, device_id=target.device_id, connector=target.connector, delivery=kind,
                why=why)) as traced:
            delivery = await self._call_in(target, kind, why, connector, send, sms_id)
            if traced.is_recording():
                traced.set_attributes(attrs(result=delivery.result, error=delivery.error))
            return delivery

    async def _call_in(self, target: Target, kind: DeliveryKind, why: str, connector: Connector,
                       send: Callable[[], Awaitable[str]], sms_id: str) -> Delivery:
        if connector.health().state == "down":
            return Delivery(target, kind, "unavailable", why, error="health_down")
        try:
            ref = await asyncio.wait_for(send(), self._timeout)
        except TimeoutError:
            return Delivery(target, kind, "timeout", why, error="TimeoutError")
        except ConnectorUnavailable as exc:
            return Delivery(target, kind, "unavailable", why, error=type(exc).__name__)
        except ConnectorError as exc:
            return Delivery(target, kind, "failed", why, error=type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - a plugin's bug must not lose the other devices' audit rows
            log.warning("connector raised an unexpected error",
                        extra={"sms_id": sms_id, "connector": target.connector,
                               "error": type(exc).__name__})
            return Delivery(target, kind, "failed", why, error=type(exc).__name__)
        return Delivery(target, kind, "delivered", why, vendor_ref=str(ref)[:200])

    @staticmethod
    def _action(d: Delivery) -> str:
        if d.result != "delivered":
            return FAILED
        return READ_ALOUD if d.kind == "tts" else SHOWN

    def _detail(self, readout: SmsReadout, d: Delivery) -> dict[str, Any]:
        assert readout.text is not None
        detail: dict[str, Any] = {
            "device_id": d.target.device_id, "household_id": d.target.household_id,
            "connector": d.target.connector, "consent_id": readout.consent_id, "kind": d.kind, "why": d.why,
            "result": d.result, "text_hash": text_digest(self._hash_key, readout.text),
        }
        if d.vendor_ref is not None:
            detail["vendor_ref"] = d.vendor_ref
        if d.error is not None:
            detail["error"] = d.error
        if d.result != "delivered":
            detail["fallback"] = "phone: the SMS stays on the subscriber's phone"
        return detail
