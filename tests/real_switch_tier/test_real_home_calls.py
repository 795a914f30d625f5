"""Calls to a household on the real switch: the forked call the mobile confirms, and the message taken when
nobody answers. Both used stock sound files and mod_voicemail, which this switch does not have: the mobile
leg was hung up the moment it answered, and the voicemail fallback was an "Invalid Application" (502)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from uuid import uuid4

import pytest

from policy_cache import registry
from policy_cache.db import DbRole, connect_pool, tenant_tx
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
from tests import sipp
from tests.pg import PgDatabase, run_sync
from tests.real_switch import RealSwitch
from tests.real_switch_tier.conftest import Iim, Ports

FORKED = "79101110001"  # mobile and an (unregistered) SIP speaker together; the mobile must confirm
UNANSWERED = "79101110002"  # mobile only, 3 s, then voicemail


async def _household(pool: object, msisdn: str, ring_mode: RingMode, phone_timeout_s: int) -> None:
    tenant = uuid4()
    async with tenant_tx(pool, tenant) as tx:  # type: ignore[arg-type]
        kw = {"actor": "test"}
        await registry.create(tx, registry.TENANT, TenantCreate(name=f"home {msisdn}"), **kw)
        home = await registry.create(tx, registry.HOUSEHOLD, HouseholdCreate(
            name="Flat", time_zone="Europe/Moscow", presence=PresenceState.HOME), **kw)
        owner = await registry.create(tx, registry.SUBSCRIBER, SubscriberCreate(msisdn=f"+{msisdn}"), **kw)
        await registry.create(tx, registry.DEVICE, DeviceCreate(
            household_id=home.id, name="Speaker", type=DeviceType.SPEAKER, vendor="generic-sip",
            capabilities=frozenset({DeviceCapability.SIP, DeviceCapability.TTS}),
            sip_uri=f"sip:spk-{msisdn}@iim.local", status=DeviceStatus.ONLINE), **kw)
        await registry.create(tx, registry.BINDING, BindingCreate(
            subscriber_id=owner.id, household_id=home.id, role=BindingRole.OWNER, priority=0), **kw)
        await registry.create(tx, registry.CONSENT, ConsentCreate(
            subscriber_id=owner.id, purpose=ConsentPurpose.ANNOUNCE_CALLS, evidence={"channel": "test"}), **kw)
        await registry.create(tx, registry.POLICY, PolicyCreate(
            household_id=home.id, ring_mode=ring_mode, phone_timeout_s=phone_timeout_s, home_timeout_s=3,
            fallback=FallbackAction.VOICEMAIL), **kw)


@pytest.fixture(scope="module")
def households(pg_db: PgDatabase) -> None:
    async def create() -> None:
        pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=1)
        try:
            await _household(pool, FORKED, RingMode.SIMULTANEOUS, 20)
            await _household(pool, UNANSWERED, RingMode.PHONE_ONLY, 3)
        finally:
            await pool.close()

    run_sync(create())


async def test_a_forked_call_answered_and_confirmed_on_the_mobile_connects_the_caller(
        real_switch: RealSwitch, iim: Iim, ports: Ports, tmp_path: Path) -> None:
    with sipp.core(tmp_path, ports.core, "core_answer_press_1.xml", answer_ms=300):
        result = await asyncio.to_thread(sipp.call, tmp_path, real_switch.external_sip_port, FORKED,
                                         hold_ms=500)
    assert result.finals == [200], result.output + real_switch.log_text()[-3000:]
    log = real_switch.log_text()
    assert "/v1/prompts/confirm-call.wav downloaded" in log
    assert "Error Opening File" not in log


async def test_nobody_answering_the_caller_leaves_a_message_recorded_by_the_switch(
        real_switch: RealSwitch, iim: Iim, ports: Ports, tmp_path: Path) -> None:
    before = set((real_switch.base / "recordings").glob("iim-*.wav"))
    with sipp.core(tmp_path, ports.core, "core_ring.xml"):
        result = await asyncio.to_thread(sipp.call, tmp_path, real_switch.external_sip_port, UNANSWERED,
                                         scenario="caller_until_bye.xml")
    assert result.finals == [200], result.output + real_switch.log_text()[-3000:]
    assert set((real_switch.base / "recordings").glob("iim-*.wav")) - before, (
        real_switch.log_text()[-6000:] + iim.log_text()[-3000:])
    log = real_switch.log_text()
    assert "Invalid Application" not in log
    assert "/v1/prompts/leave-message.wav downloaded" in log
    assert "call handler failed" not in iim.log_text()
    ended = [line for line in iim.log_text().splitlines() if '"call ended"' in line]
    assert '"hangup_cause": "NORMAL_CLEARING"' in ended[-1]  # answered: not the unanswered leg's cause
