"""The retention purge against PostgreSQL: per-tenant settings beat the defaults, each tenant's round is audited."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID, uuid4

import asyncpg
import pytest
from pydantic import ValidationError

from iim.privacy.purger import ACTOR, RetentionPurger
from iim.privacy.retention import DAY_S, RetentionDefaults, next_round_delay
from policy_cache import audit, registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import (
    DeviceCreate,
    DeviceType,
    HouseholdCreate,
    RetentionPolicyCreate,
    SubscriberCreate,
)
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


async def _recording(pool: Pool, tenant: UUID, directory: Path, *, expires_in_s: float) -> str:
    """A message a caller left an hour ago (row and file), kept until now + ``expires_in_s``; its file name."""
    name = f"iim-{uuid4()}.wav"
    (directory / name).write_bytes(b"RIFF....WAVE")
    async with tenant_tx(pool, tenant) as conn:
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(
            msisdn="+7912" + str(uuid4().int)[:7]), actor="t")
        await conn.execute(
            "INSERT INTO iim.recorded_message (call_uuid, subscriber_id, caller, file_name, created_at, expires_at) "
            "VALUES ($1, $2, '+79990000000', $3, now() - interval '1 h', now() + make_interval(secs => $4))",
            str(uuid4()), sub.id, name, expires_in_s)
    return name


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def _recordings_kept(pool: Pool, tenant: UUID) -> list[str]:
    async with tenant_tx(pool, tenant) as conn:
        return [r["file_name"] for r in await conn.fetch("SELECT file_name FROM iim.recorded_message")]


async def test_recordings_past_their_retention_go_row_and_file_and_the_purge_is_audited(
        app_pool: Pool, tmp_path: Path) -> None:
    short, default = await create_tenant(app_pool, "rec-short"), await create_tenant(app_pool, "rec-default")
    async with tenant_tx(app_pool, short) as conn:
        await registry.create(conn, registry.RETENTION_POLICY, RetentionPolicyCreate(recording_s=60), actor="t")
    await _recording(app_pool, short, tmp_path, expires_in_s=30 * DAY_S)  # older than the tenant's 60 s
    await _recording(app_pool, default, tmp_path, expires_in_s=-60)  # its own expiry passed
    kept = await _recording(app_pool, default, tmp_path, expires_in_s=30 * DAY_S)
    purger = RetentionPurger(app_pool, RetentionDefaults(), recordings_dir=tmp_path)

    purged = await purger.run_once()

    assert purged[short] == {"recording": 1}
    assert purged[default] == {"recording": 1}
    assert await _recordings_kept(app_pool, short) == []
    assert await _recordings_kept(app_pool, default) == [kept]
    assert _files(tmp_path) == [kept]  # the other two files are gone with their rows
    async with tenant_tx(app_pool, short) as conn:
        line = (await audit.entries(conn, entity="tenant", entity_id=short, limit=1))[0]
        assert await audit.verify_chain(conn, short) is None
    assert (line.actor, line.action, line.detail) == (ACTOR, "retention.purged", {"recording": 1})


async def test_a_recording_file_that_cannot_be_deleted_keeps_its_row_for_the_next_round(
        app_pool: Pool, tmp_path: Path) -> None:
    tenant = await create_tenant(app_pool, "rec-stuck")
    name = await _recording(app_pool, tenant, tmp_path, expires_in_s=-60)
    (tmp_path / name).unlink()
    (tmp_path / name).mkdir()  # a directory where the file was: unlink() fails with an OSError
    purger = RetentionPurger(app_pool, RetentionDefaults(), recordings_dir=tmp_path)

    assert tenant not in await purger.run_once()  # logged; the round's other kinds go on
    assert await _recordings_kept(app_pool, tenant) == [name]  # rolled back: tried again next round

    (tmp_path / name).rmdir()
    assert (await purger.run_once())[tenant] == {"recording": 1}
    assert await _recordings_kept(app_pool, tenant) == []


def test_a_full_batch_means_another_round_at_once() -> None:
    assert next_round_delay({"sms_body": 1000}, 1000, 3600.0) == 0.0
    assert next_round_delay({"sms_body": 3}, 1000, 3600.0) == 3600.0


def test_audit_details_are_kept_at_least_a_day() -> None:
    with pytest.raises(ValueError, match="at least a day"):
        RetentionDefaults(audit_detail_s=60)


async def _hub_commands(pool: Pool, tenant: UUID, ages_h: list[int]) -> None:
    """A hub and one command sent ``age`` hours ago for each age."""
    async with tenant_tx(pool, tenant) as conn:
        home = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(name="h", time_zone="UTC"), actor="t")
        hub = await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=home.id, name="hub", type=DeviceType.HUB, external_id=f"hub-{uuid4().hex[:8]}"), actor="t")
        for age in ages_h:
            await conn.execute(
                "INSERT INTO iim.hub_command (device_id, command_id, name, actor, sent_at) "
                "VALUES ($1, $2, 'reboot', 'op', now() - make_interval(hours => $3))", hub.id, f"c-{age}h", age)


async def _commands_kept(pool: Pool, tenant: UUID) -> list[str]:
    async with tenant_tx(pool, tenant) as conn:
        return [r["command_id"] for r in await conn.fetch("SELECT command_id FROM iim.hub_command ORDER BY sent_at")]


async def test_hub_commands_past_the_tenants_retention_or_the_default_are_purged_and_audited(
        app_pool: Pool) -> None:
    short, default = await create_tenant(app_pool, "cmd-short"), await create_tenant(app_pool, "cmd-default")
    async with tenant_tx(app_pool, short) as conn:
        await registry.create(conn, registry.RETENTION_POLICY, RetentionPolicyCreate(hub_command_s=DAY_S),
                              actor="t")
    await _hub_commands(app_pool, short, [1, 30, 72])
    await _hub_commands(app_pool, default, [1, 72, 24 * 12])
    purger = RetentionPurger(app_pool, RetentionDefaults(hub_command_s=10 * DAY_S))

    purged = await purger.run_once()

    assert purged[short] == {"hub_command": 2}
    assert purged[default] == {"hub_command": 1}
    assert await _commands_kept(app_pool, short) == ["c-1h"]
    assert await _commands_kept(app_pool, default) == ["c-72h", "c-1h"]
    async with tenant_tx(app_pool, short) as conn:
        line = (await audit.entries(conn, entity="tenant", entity_id=short, limit=1))[0]
        assert await audit.verify_chain(conn, short) is None
    assert (line.actor, line.action, line.detail) == (ACTOR, "retention.purged", {"hub_command": 2})
    assert await purger.run_once() == {}


async def test_hub_commands_are_kept_at_least_a_day(app_pool: Pool) -> None:
    """The row is what makes a retried command idempotent: no retention may free its id within a day."""
    with pytest.raises(ValueError, match="at least a day"):
        RetentionDefaults(hub_command_s=3600)
    with pytest.raises(ValidationError):
        RetentionPolicyCreate(hub_command_s=3600)
    tenant = await create_tenant(app_pool, "cmd-floor")
    async with tenant_tx(app_pool, tenant) as conn:
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("INSERT INTO iim.retention_policy (hub_command_s) VALUES (3600)")
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await app_pool.fetch("SELECT * FROM iim.hub_command_purge(3600, 10)")
