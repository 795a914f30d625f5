"""Incident notifications through smart-home connectors, and the fallback when the smart home is down.

The vendor cloud is a real HTTP server (tests.connector_peer.VendorPeer) behind the shipped webhook
connector; the phone side is the FreeSWITCH emulator. Smart home down -> the household gets an SMS, and
the escalation goes on by voice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import pytest
import pytest_asyncio

from fs_app.testing import TargetBehaviour
from iim.connectors.contract import ConnectorContext
from iim.connectors.registry import ConnectorRegistry
from iim.connectors.webhook import WebhookConnector
from iim.core.secrets import resolve_secret
from policy_cache import registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import DeviceCapability, DeviceCreate, DeviceStatus, DeviceType
from tests.connector_peer import SIGNING_SECRET_TEXT, STATIC_TOKEN, StepClock, VendorPeer, serve
from tests.iim.scenarios.test_scenario_worker import Alarms, alarms_rig
from tests.pg import opened

SCENARIO_STEPS = [
    {"action": "notify", "text": "Smoke at {household}: check the kitchen", "with_next": True},
    {"action": "call", "to": "owner", "ivr": {"prompt": "Press 1 to confirm, 2 if it is false",
                                              "digits": {"1": "acknowledge", "2": "false_alarm"}}},
]


@pytest.fixture(autouse=True)
def _vendor_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_TOKEN", STATIC_TOKEN)
    monkeypatch.setenv("ACME_SIGNING", SIGNING_SECRET_TEXT)


@pytest_asyncio.fixture
async def vendor() -> AsyncIterator[VendorPeer]:
    peer = VendorPeer()
    runner, peer.url = await serve(peer.app())
    yield peer
    await peer.close()
    await runner.cleanup()


@pytest_asyncio.fixture
async def connectors(vendor: VendorPeer) -> AsyncIterator[ConnectorRegistry]:
    context = ConnectorContext(resolve_secret=resolve_secret, http_session=aiohttp.ClientSession, clock=StepClock())
    registry = ConnectorRegistry(context, factories={"webhook": WebhookConnector})
    await registry.load([{"name": "acme", "plugin": "webhook", "config": {
        "base_url": vendor.url, "paths": {"send_notification": "/notify"},
        "auth": {"kind": "bearer", "token_ref": "env:ACME_TOKEN"}, "signing_secret_ref": "env:ACME_SIGNING",
        "request_timeout_s": 0.3, "retry": {"attempts": 2, "backoff_base_s": 0.05, "backoff_max_s": 0.1}}}])
    yield registry
    await registry.aclose()


@pytest_asyncio.fixture
async def alarms(app_pool: Pool, pg_db: Any, tmp_path: Path,
                 connectors: ConnectorRegistry) -> AsyncIterator[Alarms]:
    async with alarms_rig(app_pool, pg_db, tmp_path, connectors=connectors) as rig:
        async with tenant_tx(app_pool, rig.rig.tenant_id) as conn:
            await registry.create(conn, registry.DEVICE, DeviceCreate(
                household_id=rig.rig.household_id, name="Cloud speaker", type=DeviceType.SPEAKER,
                connector="acme", connector_ref="kitchen-speaker-9",
                capabilities=frozenset({DeviceCapability.CLOUD_ANNOUNCE}), status=DeviceStatus.ONLINE), actor="test")
            await conn.execute(
                "INSERT INTO iim.scenario (name, trigger, steps, enabled) VALUES ('notify first', $1, $2, true)",
                {"event_types": ["smoke"]}, SCENARIO_STEPS)
        yield rig


async def _notified(alarms: Alarms, incident: UUID, timeout: float = 10.0) -> None:
    """The notification runs beside the call (its own job): wait for its outcome."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await alarms.rows("SELECT 1 FROM iim.incident_action WHERE incident_id = $1 AND kind = 'notify' "
                                "AND outcome IS NOT NULL", incident):
        assert asyncio.get_running_loop().time() < deadline, "the notification has no outcome"
        await asyncio.sleep(0.05)


async def test_the_household_is_notified_through_its_connector(alarms: Alarms, vendor: VendorPeer) -> None:
    rig = alarms.rig
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="2"))
    incident = await alarms.raise_alarm("smoke")
    assert await alarms.settled(incident) == "false_alarm"
    await _notified(alarms, incident)
    await vendor.wait_received(1)
    note = vendor.received[0]
    assert note.path == "/notify"
    assert note.body["target"] == "kitchen-speaker-9"
    assert "Smoke at Flat 12" in note.body["text"]
    actions = await alarms.rows("SELECT kind, outcome FROM iim.incident_action WHERE incident_id = $1 "
                                "AND kind = 'notify'", incident)
    assert actions == [{"kind": "notify", "outcome": "notified"}]
    assert await alarms.rows("SELECT 1 FROM iim.sms_outbox WHERE incident_id = $1", incident) == []


async def test_smart_home_down_falls_back_to_sms_and_the_call_still_goes_out(
        alarms: Alarms, vendor: VendorPeer) -> None:
    rig = alarms.rig
    vendor.script("/notify", *[("status", 503)] * 10)
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="1"))
    incident = await alarms.raise_alarm("smoke")
    assert await alarms.settled(incident) == "acknowledged"
    assert alarms.calls_to(rig.owner) == 1
    await _notified(alarms, incident)
    sms = await alarms.rows("SELECT tenant_id, key, msisdn, body, body_key FROM iim.sms_outbox WHERE incident_id = $1",
                            incident)
    assert [s["msisdn"] for s in sms] == [rig.owner]
    assert "Smoke at Flat 12" in (await opened(alarms.pool, sms[0]) or "")
    audit = await alarms.rows("SELECT detail->>'outcome' AS outcome, detail->>'detail' AS detail FROM iim.audit_log "
                              "WHERE action = 'incident.notify' AND entity_id = $1", str(incident))
    assert audit[0]["outcome"] == "sms_fallback"
    assert "smart home unreachable" in audit[0]["detail"]
