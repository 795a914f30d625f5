"""The span tree of an incoming SMS read aloud: SMS MO -> readout (decision, speech, delivery to the speaker).

A real SMSC process (smpp34) delivers the MO over SMPP to the sender, which stores it in PostgreSQL and hands it
to the readout service; the speaker's vendor cloud is a real HTTP peer. Spans carry ids and outcomes, never the
text or the numbers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from iim.home.sms_readout import SmsReadoutService
from iim.sms.smsc_sim import SmscProcess
from policy_cache.db import Pool
from tests.conftest import eventually
from tests.home_delivery_rig import (
    Connectors,
    HmacSigner,
    HttpConnector,
    VendorCloud,
    WavRenderer,
    build_home,
    create_tenant,
)
from tests.iim.sms.test_messaging_outbox import sender
from tests.tracing_rig import Spans, is_child

SENDER = "79161234567"


@pytest.fixture(scope="module")
def smsc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmscProcess]:
    proc = SmscProcess(tmp_path_factory.mktemp("smsc") / "smsc.jsonl")
    proc.start_sync()
    yield proc
    proc.stop_sync()


async def test_an_mo_read_aloud_on_a_speaker_is_one_tree_mo_readout_decision_speech_delivery(
        app_pool: Pool, smsc: SmscProcess, tmp_path: Path, spans: Spans) -> None:
    tenant = await create_tenant(app_pool)
    owner = f"+7905{uuid4().int % 10_000_000:07d}"
    await build_home(app_pool, tenant, owner, consent_scope={"allowed_senders": ["+7916"]})
    cloud = VendorCloud()
    await cloud.start()
    connector = HttpConnector(cloud.url)
    await connector.setup()
    body = f"Your code is {uuid4().hex[:8]}"
    try:
        readout = SmsReadoutService(app_pool, WavRenderer(tmp_path), HmacSigner(), Connectors(webhook=connector),
                                    None, connector_timeout_s=2.0)
        async with sender(app_pool, smsc, on_mo=readout.on_mo):
            assert await smsc.deliver(destination=owner[1:], source=SENDER, text=body) == 0
            await eventually(lambda: bool(spans.named("sms.readout")), timeout=10)
            await asyncio.sleep(0)
    finally:
        await connector.unload()
        await cloud.stop()
    assert len(cloud.paths("/tts")) == 1

    mo = spans.one("sms.mo")
    assert mo.parent is None
    attributes = mo.attributes or {}
    assert attributes["iim.outcome"] == "stored"
    assert attributes["iim.tenant"] == str(tenant)
    sms_id = attributes["iim.sms_id"]
    handled = spans.one("sms.readout")
    assert is_child(handled, mo)
    assert (handled.attributes or {})["iim.sms_id"] == sms_id
    assert (handled.attributes or {})["iim.outcome"] == "read_aloud"
    decide = spans.one("sms.readout.decide")
    assert is_child(decide, handled)
    assert (decide.attributes or {})["iim.read_aloud"] == 1
    assert is_child(spans.one("sms.readout.tts"), handled)
    deliver = spans.one("sms.readout.deliver")
    assert is_child(deliver, handled)
    assert (deliver.attributes or {})["iim.delivery"] == "tts"
    assert (deliver.attributes or {})["iim.result"] == "delivered"
    assert (deliver.attributes or {})["iim.connector"] == "webhook"
    for span in spans.all():
        for value in (span.attributes or {}).values():
            text = str(value)
            for private in (body, SENDER, owner[1:]):
                assert private not in text, span.name
