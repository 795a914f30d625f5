"""The retention purge against PostgreSQL: per-tenant settings beat the defaults, each tenant's round is audited."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest

from iim.privacy.purger import ACTOR, RetentionPurger
from iim.privacy.retention import DAY_S, RetentionDefaults, next_round_delay
from policy_cache import audit, registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import DeviceCreate, DeviceType, HouseholdCreate, RetentionPolicyCreate
from tests.pg import create_tenant


async def _content(pool: Pool, tenant: UUID) -> None:
    """An incoming SMS with its body and a device event with its payload, received an hour ago."""
    tag = uuid4().hex[:10]
    async with tenant_tx(pool, tenant) as conn:
        home = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(name="h", time_zone="UTC"), actor="t")
        device = await registry.create(conn, registry.DEVICE, DeviceCreate(household_id=home.id, name="d",
                                                                           type=DeviceType.SENSOR), actor="t")
        await conn.execute(
            "INSERT INTO iim.sms_inbound (sms_id, content_hash, transport, source, destination, body, body_length, "
            "received_at) VALUES ($1, $2, 'smpp', '+79990000000', '+79990000001', 'hello', 5, now() - interval '1 h')",
            f"s:{tag}", "0" * 64)
        await conn.execute(
            "INSERT INTO iim.device_event (event_id, device_id, type, occurred_at, received_at, fingerprint, payload, "
            "channel, response) VALUES ($1, $2, 'smoke', now(), now() - interval '1 h', $3, '{\"x\": 1}', 'device', "
            "'{}')", f"e-{tag}", device.id, "1" * 64)


async def _kept(pool: Pool, tenant: UUID) -> tuple[int, int]:
    async with tenant_tx(pool, tenant) as conn:
        return (await conn.fetchval("SELECT count(*) FROM iim.sms_inbound WHERE body IS NOT NULL"),
                await conn.fetchval("SELECT count(*) FROM iim.device_event WHERE payload_purged_at IS NULL"))


async def test_a_tenants_retention_beats_the_default_and_its_purge_is_audited(app_pool: Pool) -> None:
    short, default = await create_tenant(app_pool, "short"), await create_tenant(app_pool, "default")
    for tenant in (short, default):
        await _content(app_pool, tenant)
    async with tenant_tx(app_pool, short) as conn:
        await registry.create(conn, registry.RETENTION_POLICY,
                              RetentionPolicyCreate(sms_body_s=60, event_payload_s=60), actor="t")
    purger = RetentionPurger(app_pool, RetentionDefaults(sms_body_s=DAY_S, event_payload_s=DAY_S))

    purged = await purger.run_once()

    assert purged[short] == {"sms_body": 1, "event_payload": 1}
    assert default not in purged
    assert await _kept(app_pool, short) == (0, 0)
    assert await _kept(app_pool, default) == (1, 1)
    async with tenant_tx(app_pool, short) as conn:
        line = (await audit.entries(conn, entity="tenant", entity_id=short, limit=1))[0]
        assert await audit.verify_chain(conn, short) is None
    assert (line.actor, line.action) == (ACTOR, "retention.purged")
    assert line.detail == {"sms_body": 1, "event_payload": 1}
    assert await purger.run_once() == {}  # nothing left to purge: no audit row either


def test_a_full_batch_means_another_round_at_once() -> None:
    assert next_round_delay({"sms_body": 1000}, 1000, 3600.0) == 0.0
    assert next_round_delay({"sms_body": 3}, 1000, 3600.0) == 3600.0


def test_audit_details_are_kept_at_least_a_day() -> None:
    with pytest.raises(ValueError, match="at least a day"):
        RetentionDefaults(audit_detail_s=60)
