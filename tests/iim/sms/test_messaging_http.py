"""The HTTP SMSC transport against a real aiohttp SMSC on loopback: signed submits, answers mapped to the
typed errors, signed receipts and MO into the outbox."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from iim.core.signing import sign_webhook, verify_webhook
from iim.keys.keyring import Keyring
from iim.sms.http_smsc import HttpSmscSettings, HttpSmscTransport
from iim.sms.outbox import BackoffPolicy, InboundSms, SmsSender
from iim.sms.store import enqueue_sms
from iim.sms.transport import (
    MoSms,
    OutboundSms,
    QueueFull,
    Receipt,
    ReceiptState,
    Rejected,
    SmsTransport,
    TemporaryFailure,
    Throttled,
    TransportDown,
)
from policy_cache import registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import SubscriberCreate
from tests.alarm_rig import new_secret, secret_text
from tests.pg import create_tenant


@dataclass
class FakeSmsc:
    """An HTTP SMSC: checks our signature, answers with ids or with the status it is told to."""

    secret: bytes
    requests: list[dict[str, Any]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    counter: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        verify_webhook(request.headers, raw, [self.secret], now=time.time())
        body = json.loads(raw)
        self.requests.append({"body": body, "idempotency": request.headers.get("Idempotency-Key")})
        status = self.answers.pop(0) if self.answers else 200
        if status != 200:
            return web.json_response({"error": "nope"}, status=status)
        self.counter += 1
        return web.json_response({"message_id": f"h-{self.counter}"})


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


@pytest.fixture
def secret_ref(tmp_path: Path) -> tuple[str, bytes]:
    secret = new_secret()
    path = tmp_path / "smsc.whsec"
    path.write_text(secret_text(secret))
    path.chmod(0o600)
    return f"file:{path}", secret


@pytest_asyncio.fixture
async def smsc(secret_ref: tuple[str, bytes]) -> AsyncIterator[tuple[FakeSmsc, str]]:
    fake = FakeSmsc(secret_ref[1])
    app = web.Application()
    app.router.add_post("/sms", fake.handle)
    runner, url = await _serve(app)
    yield fake, url + "/sms"
    await runner.cleanup()


@pytest_asyncio.fixture
async def transport(smsc: tuple[FakeSmsc, str], secret_ref: tuple[str, bytes]) -> AsyncIterator[HttpSmscTransport]:
    t = HttpSmscTransport(HttpSmscSettings(url=smsc[1], secret_ref=secret_ref[0], source_addr="IIM"))
    await t.start()
    yield t
    await t.aclose()


def signed(body: dict[str, Any], secret: bytes, *, msg_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    msg_id = msg_id or f"cb_{uuid4().hex}"
    ts = int(time.time())
    return raw, {"Content-Type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
                 "webhook-signature": sign_webhook(msg_id, ts, raw, secret)}


def test_the_http_transport_satisfies_the_protocol() -> None:
    assert isinstance(HttpSmscTransport(HttpSmscSettings(url="http://x", secret_ref="env:X")), SmsTransport)


async def test_submit_posts_signed_json_with_our_reference_and_returns_the_smsc_id(
        transport: HttpSmscTransport, smsc: tuple[FakeSmsc, str]) -> None:
    fake, _ = smsc
    msg = OutboundSms(uuid4(), "+79001234567", "Пожар на кухне", flash=True)
    result = await transport.submit(msg)
    assert result.message_ids == ("h-1",)
    [req] = fake.requests
    assert req["body"] == {"to": "+79001234567", "text": "Пожар на кухне", "flash": True,
                           "reference": str(msg.reference), "from": "IIM"}
    assert req["idempotency"] == str(msg.reference)


@pytest.mark.parametrize(("status", "error"), [(429, Throttled), (503, QueueFull), (500, TemporaryFailure),
                                               (400, Rejected), (422, Rejected)])
async def test_smsc_answers_map_to_typed_errors(transport: HttpSmscTransport, smsc: tuple[FakeSmsc, str],
                                                status: int, error: type[Exception]) -> None:
    smsc[0].answers.append(status)
    with pytest.raises(error) as refused:
        await transport.submit(OutboundSms(uuid4(), "+79001234567", "x"))
    assert type(refused.value) is error
    assert refused.value.code == status  # type: ignore[attr-defined]


async def test_an_unreachable_smsc_is_transport_down(secret_ref: tuple[str, bytes]) -> None:
    t = HttpSmscTransport(HttpSmscSettings(url="http://127.0.0.1:9/sms", secret_ref=secret_ref[0], timeout=2.0))
    await t.start()
    try:
        with pytest.raises(TransportDown):
            await t.submit(OutboundSms(uuid4(), "+79001234567", "x"))
    finally:
        await t.aclose()


async def test_callbacks_are_verified_before_they_reach_the_handlers(transport: HttpSmscTransport,
                                                                    secret_ref: tuple[str, bytes]) -> None:
    got: list[Receipt | MoSms] = []

    async def keep(item: Any) -> None:
        got.append(item)

    transport.bind_inbound(keep, keep)
    runner, base = await _serve(transport.web_app())
    secret = secret_ref[1]
    try:
        async with aiohttp.ClientSession() as http:
            raw, headers = signed({"message_id": "h-9", "state": "undelivered", "error": "27"}, secret)
            async with http.post(base + "/receipts", data=raw, headers=headers) as resp:
                assert resp.status == 200
            raw, headers = signed({"id": "mo-1", "from": "79160000000", "to": "+79001234567", "text": "hi"}, secret)
            async with http.post(base + "/mo", data=raw, headers=headers) as resp:
                assert resp.status == 200
            raw, headers = signed({"message_id": "h-9", "state": "delivered"}, new_secret())
            async with http.post(base + "/receipts", data=raw, headers=headers) as resp:
                assert resp.status == 401
            raw, headers = signed({"message_id": "h-9"}, secret)
            async with http.post(base + "/receipts", data=raw, headers=headers) as resp:
                assert resp.status == 400
    finally:
        await runner.cleanup()
    receipt, mo = got
    assert receipt == Receipt("http", "h-9", ReceiptState.UNDELIVERED, "27")
    assert isinstance(mo, MoSms)
    assert (mo.sms_id, mo.source, mo.destination, mo.body) == ("mo-1", "+79160000000", "+79001234567", "hi")
    # Without its +, the source is also kept as sent: the tenant's plan reads it (a national 8916... is +7916...).
    assert mo.source_received == "79160000000"


async def test_outbox_over_http_sends_applies_receipts_and_stores_mo_once(
        app_pool: Pool, transport: HttpSmscTransport, smsc: tuple[FakeSmsc, str],
        secret_ref: tuple[str, bytes], keyring: Keyring) -> None:
    tenant = await create_tenant(app_pool)
    async with tenant_tx(app_pool, tenant) as conn:
        await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn="+79001239999"), actor="test")
        rid = await enqueue_sms(conn, key="http-1", msisdn="+79001239999", body="Smoke alarm",
                                data_key=await keyring.active(conn, tenant))
    mos: list[tuple[UUID, InboundSms]] = []

    async def on_mo(tenant_id: UUID, mo: InboundSms) -> None:
        mos.append((tenant_id, mo))

    smsc[0].answers.append(429)  # throttled once, then accepted
    sender = SmsSender(app_pool, transport, keyring=keyring, retry=BackoffPolicy(base=0.05, cap=0.2),
                       poll_interval=0.05, throttle_pause=0.05, on_mo=on_mo)
    await sender.start()
    runner, base = await _serve(transport.web_app())
    try:
        stored = await _wait_status(app_pool, tenant, rid, "sent")
        assert (stored["smsc_message_ids"], stored["attempts"], stored["transport"]) == (["h-1"], 2, "http")
        async with aiohttp.ClientSession() as http:
            raw, headers = signed({"message_id": "h-1", "state": "delivered"}, secret_ref[1])
            async with http.post(base + "/receipts", data=raw, headers=headers) as resp:
                assert resp.status == 200
            for _ in range(2):  # redelivered by the SMSC: stored once
                raw, headers = signed({"id": "mo-77", "from": "+79160000000", "to": "+79001239999",
                                       "text": "OK, coming"}, secret_ref[1])
                async with http.post(base + "/mo", data=raw, headers=headers) as resp:
                    assert resp.status == 200
        await _wait_status(app_pool, tenant, rid, "delivered")
    finally:
        await runner.cleanup()
        await sender.aclose()
    async with tenant_tx(app_pool, tenant) as conn:
        inbound = await conn.fetch("SELECT sms_id, body, body_length FROM iim.sms_inbound")
    assert [tuple(r) for r in inbound] == [("http:mo-77", None, 10)]  # no read_sms consent: body not kept
    assert [(t, m.body) for t, m in mos] == [(tenant, "OK, coming")]


async def _wait_status(pool: Pool, tenant: UUID, rid: UUID, status: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        async with tenant_tx(pool, tenant) as conn:
            found = await conn.fetchrow("SELECT * FROM iim.sms_outbox WHERE id = $1", rid)
        assert found is not None
        if found["status"] == status:
            return dict(found)
        if time.monotonic() > deadline:
            raise AssertionError(f"status {found['status']}, wanted {status}")
        await asyncio.sleep(0.05)
