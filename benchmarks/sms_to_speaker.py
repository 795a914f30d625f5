"""MO SMS to the speaker's vendor cloud: how long from the SMSC to the connector's request?

    python -m benchmarks.sms_to_speaker [--messages N] [--warmup N] [--via smpp|hook]

A fresh PostgreSQL (embedded in a temporary directory, or ``IIM_BENCH_DATABASE_URL``) holds one tenant
with a household at home, a subscriber with a ``read_sms`` consent and a cloud speaker.

``--via smpp`` (default): the SMSC simulator (``iim.sms.smsc_sim``, its own process) sends a real
``deliver_sm`` to IIM's SMPP transceiver bind (``iim.sms.smpp.SmppTransport``); ``iim.sms.outbox``
stores the MO and calls the hook, :meth:`SmsReadoutService.on_mo`. The clock starts when the simulator
is told to deliver (so its control-HTTP hop is included). ``--via hook``: the clock starts when
``on_mo`` is called, as the messaging layer calls it.

The clock stops when the vendor cloud - a real aiohttp HTTP server on loopback, in this process -
receives the ``deliver_tts`` request. In between: the advisory lock and the idempotency check, the
registry reads under RLS, the decision, the claim's audit row and its commit, TTS (``iim.tts.engine.EspeakTts``
with espeak-ng, rendered once before the run: every message is a cache hit), the signed URL
(``iim.tts.urls.AudioUrlSigner``) and the HTTP POST over a keep-alive connection. Messages are sent one after
the other. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiohttp
from aiohttp import web
from pydantic import BaseModel

from benchmarks._bench_db import machine
from iim.connectors.contract import (
    Capability,
    Connector,
    ConnectorHealth,
    ConnectorManifest,
    ConnectorUnavailable,
    Notification,
    TtsDelivery,
    UserActionRequest,
    UserActionResult,
)
from iim.core.envelope import MasterKey
from iim.home.ports import ConnectorLookup
from iim.home.sms_readout import SmsReadoutService
from iim.keys.keyring import Keyring
from iim.sms.outbox import MoHook, SmsSender
from iim.sms.smpp import SmppSettings, SmppTransport
from iim.sms.smsc_sim import SmscProcess
from iim.tts.engine import EspeakTts
from iim.tts.urls import AudioUrlSigner
from policy_cache import registry
from policy_cache.bootstrap import bootstrap
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from policy_cache.models import (
    BindingCreate,
    BindingRole,
    ConsentCreate,
    ConsentPurpose,
    DeviceCapability,
    DeviceCreate,
    DeviceStatus,
    DeviceType,
    HouseholdCreate,
    PresenceState,
    SubscriberCreate,
    TenantCreate,
)

OWNER = "+79001234567"
SENDER = "79161234567"
BODY = "Mum: I am at the station, pick me up at seven please."


class _NoConfig(BaseModel):
    pass


class HttpConnector:
    """A minimal webhook connector: JSON over a keep-alive aiohttp session."""

    manifest = ConnectorManifest("webhook", "bench", frozenset(Capability), _NoConfig)

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def setup(self) -> None:
        return None

    async def unload(self) -> None:
        await self.session.close()

    async def _post(self, path: str, body: dict[str, Any]) -> str:
        try:
            async with self.session.post(self.base + path, json=body) as resp:
                if resp.status >= 500:
                    raise ConnectorUnavailable(str(resp.status))
                return str((await resp.json())["id"])
        except aiohttp.ClientError as exc:
            raise ConnectorUnavailable(type(exc).__name__) from exc

    async def send_notification(self, notification: Notification) -> str:
        return await self._post("/notify", {"target": notification.target, "text": notification.text})

    async def request_user_action(self, request: UserActionRequest) -> UserActionResult:
        return UserActionResult(None)

    async def deliver_tts(self, delivery: TtsDelivery) -> str:
        return await self._post("/tts", {"target": delivery.target, "audio_url": delivery.audio_url,
                                         "text": delivery.text, **dict(delivery.correlation)})

    def health(self) -> ConnectorHealth:
        return ConnectorHealth("up")

    async def probe(self) -> ConnectorHealth:
        return self.health()


class Lookup:
    def __init__(self, connector: Connector) -> None:
        self.connector = connector

    def get(self, name: str) -> Connector | None:
        return self.connector if name == "webhook" else None


@dataclass(frozen=True)
class Mo:
    sms_id: str
    source: str
    destination: str
    body: str
    received_at: datetime


async def _household(pool: Pool) -> Any:
    tenant = uuid4()
    kw: dict[str, Any] = {"actor": "bench"}
    async with tenant_tx(pool, tenant) as conn:
        await registry.create(conn, registry.TENANT, TenantCreate(name="bench"), **kw)
        hh = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(
            name="flat", time_zone="Europe/Moscow", presence=PresenceState.HOME), **kw)
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=OWNER), **kw)
        await registry.create(conn, registry.BINDING, BindingCreate(subscriber_id=sub.id, household_id=hh.id,
                                                                    role=BindingRole.OWNER), **kw)
        await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=hh.id, name="Kitchen speaker", type=DeviceType.SPEAKER,
            capabilities=frozenset({DeviceCapability.TTS, DeviceCapability.CLOUD_ANNOUNCE}),
            connector="webhook", connector_ref="kitchen-1", status=DeviceStatus.ONLINE), **kw)
        await registry.create(conn, registry.CONSENT, ConsentCreate(
            subscriber_id=sub.id, purpose=ConsentPurpose.READ_SMS, scope={"allowed_senders": ["+7916"]},
            evidence={"channel": "bench"}), **kw)
    return tenant


def _percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


class _Arrivals:
    """The vendor cloud's side: when each ``deliver_tts`` arrived, in order."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[float, str]] = asyncio.Queue()

    async def tts(self, request: web.Request) -> web.Response:
        now = time.perf_counter()
        body = await request.json()
        self.queue.put_nowait((now, str(body.get("sms_id", ""))))
        return web.json_response({"id": f"v-{self.queue.qsize()}"})


def _wiring(service: SmsReadoutService, lookup: Lookup) -> tuple[MoHook, ConnectorLookup]:
    """Type-checked only: the service's hook is what ``SmsSender(on_mo=...)`` takes."""
    return service.on_mo, lookup


async def main(messages: int, warmup: int, via: str) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="iim-bench-sms-"))
    db = await bootstrap(database_url=os.environ.get("IIM_BENCH_DATABASE_URL"), data_dir=tmp / "pg",
                         secrets_file=tmp / "secrets.json", database="iim_sms_bench", demo=False)
    cloud = _Arrivals()
    app = web.Application()
    app.router.add_post("/tts", cloud.tts)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    connector = HttpConnector(f"http://127.0.0.1:{port}")
    pool = await connect_pool(db.app_url, role=DbRole.APP, min_size=2, max_size=8)
    tts = EspeakTts(tmp / "tts")
    signer = AudioUrlSigner(os.urandom(32), "https://iim.example.net", 300)
    smsc: SmscProcess | None = None
    sender: SmsSender | None = None
    control = aiohttp.ClientSession()
    try:
        tenant = await _household(pool)
        service = SmsReadoutService(pool, tts, signer, Lookup(connector), None)
        if via == "smpp":
            smsc = SmscProcess(tmp / "smsc.jsonl")
            await smsc.start()
            transport = SmppTransport(SmppSettings(host="127.0.0.1", port=smsc.port, system_id="iim",
                                                   password="bench"))  # noqa: S106 - the simulator's account
            # No content-hash window: the benchmark sends the same text on purpose (a TTS cache hit).
            sender = SmsSender(pool, transport, keyring=Keyring(pool, MasterKey.from_bytes(os.urandom(32))),
                               on_mo=service.on_mo, mo_dedup_window=0.0)
            await sender.start()
            await transport.wait_bound()
        latencies: list[float] = []
        outcomes: dict[str, int] = {}
        for i in range(warmup + messages):
            started = time.perf_counter()
            if smsc is not None:
                async with control.post(f"http://127.0.0.1:{smsc.control_port}/deliver", json={
                        "destination": OWNER.removeprefix("+"), "source": SENDER, "text": BODY}) as resp:
                    if (await resp.json()).get("command_status") != 0:
                        raise RuntimeError("deliver_sm refused")
                outcome = "reached_the_cloud"
            else:
                mo = Mo(f"bench-{i}-{uuid4().hex[:8]}", SENDER, OWNER.removeprefix("+"), BODY, datetime.now(UTC))
                outcome = await service.handle(tenant, mo)
            arrived, _ = await asyncio.wait_for(cloud.queue.get(), 10)
            if i >= warmup:
                latencies.append((arrived - started) * 1000)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
        stats = tts.statistics()
    finally:
        await control.close()
        if sender is not None:
            await sender.aclose()
        if smsc is not None:
            await smsc.aclose()
        await connector.unload()
        await pool.close()
        await runner.cleanup()
        await db.aclose()
        shutil.rmtree(tmp, ignore_errors=True)
    latencies.sort()
    return {
        "p50_ms": round(_percentile(latencies, 0.50), 2),
        "p99_ms": round(_percentile(latencies, 0.99), 2),
        "max_ms": round(latencies[-1], 2),
        "messages": len(latencies),
        "via": via,
        "outcomes": outcomes,
        "tts": f"iim.tts.engine.EspeakTts (libespeak-ng from espeakng-loader): {stats.renders} render(s), {stats.hits} hits",
        "target_p99_ms": 100,
        "machine": machine(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--via", choices=("smpp", "hook"), default="smpp")
    ns = parser.parse_args()
    import uvloop  # the loop `iim serve` runs on

    print(json.dumps(uvloop.run(main(ns.messages, ns.warmup, ns.via))))
