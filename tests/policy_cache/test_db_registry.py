"""The registry: spec-driven CRUD per entity, one audit row per change (without secrets), typed errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, time, timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest
from pydantic import ValidationError

from policy_cache import audit, registry
from policy_cache.db import Connection, Pool, tenant_tx
from policy_cache.errors import Conflict, InvalidData, InvalidReference, NotFound, VersionConflict
from policy_cache.models import (
    BindingCreate,
    BindingRole,
    BindingUpdate,
    BrandCreate,
    ConsentCreate,
    ConsentPurpose,
    CredentialKind,
    CredentialRefCreate,
    CredentialRefUpdate,
    DeviceCapability,
    DeviceCreate,
    DeviceStatus,
    DeviceType,
    DeviceUpdate,
    HouseholdCreate,
    HouseholdUpdate,
    PolicyCreate,
    PolicyUpdate,
    PresenceState,
    RegionCreate,
    RingMode,
    SubscriberCreate,
    SubscriberUpdate,
    TenantUpdate,
)
from tests.pg import create_tenant

ACTOR = "operator:alice"


async def _audit_count(conn: Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM iim.audit_log"))


async def _last_audit(conn: Connection) -> Any:
    return (await audit.entries(conn, limit=1))[0]


@pytest.fixture
async def tenant(app_pool: Pool) -> UUID:
    return await create_tenant(app_pool, "repo tenant")


async def test_tenant_lifecycle(app_pool: Pool) -> None:
    tid = uuid4()
    await create_tenant(app_pool, "first name", tenant_id=tid)
    async with tenant_tx(app_pool, tid) as conn:
        entry = await _last_audit(conn)
        assert (entry.action, entry.entity, entry.entity_id) == ("tenant.create", "tenant", str(tid))
        assert entry.detail == {"after": {"id": str(tid), "name": "first name"}}
        renamed = await registry.update(conn, registry.TENANT, tid, TenantUpdate(name="second name"), actor=ACTOR)
        assert renamed.name == "second name"
        assert (await _last_audit(conn)).detail == {"changed": {"name": {"from": "first name", "to": "second name"}}}
        assert [t.id for t in await registry.list_rows(conn, registry.TENANT)] == [tid]
        await registry.delete(conn, registry.TENANT, tid, actor=ACTOR)
        with pytest.raises(NotFound):
            await registry.get(conn, registry.TENANT, tid)
        # The audit log outlives the tenant.
        assert (await _last_audit(conn)).action == "tenant.delete"
        assert await audit.verify_chain(conn, tid) is None


async def test_every_change_writes_exactly_one_audit_row(app_pool: Pool, tenant: UUID) -> None:
    async with tenant_tx(app_pool, tenant) as conn:
        steps: list[tuple[str, Any]] = []

        async def step(action: str, coro: Any) -> Any:
            before = await _audit_count(conn)
            result = await coro
            assert await _audit_count(conn) == before + 1, action
            entry = await _last_audit(conn)
            assert entry.action == action
            assert entry.actor == ACTOR
            assert entry.correlation == {"request_id": "r-1"}
            steps.append((action, entry))
            return result

        kw: dict[str, Any] = {"actor": ACTOR, "correlation": {"request_id": "r-1"}}
        brand = await step("brand.create", registry.create(conn, registry.BRAND, BrandCreate(name="brand"), **kw))
        region = await step("region.create", registry.create(conn, registry.REGION, RegionCreate(name="north"), **kw))
        home = await step("household.create", registry.create(
            conn, registry.HOUSEHOLD,
            HouseholdCreate(name="home", time_zone="Europe/Moscow", brand_id=brand.id, region_id=region.id),
            **kw))
        await step("household.update", registry.update(
            conn, registry.HOUSEHOLD, home.id, HouseholdUpdate(name="home 2"), **kw))
        away = await step("household.presence", registry.set_presence(conn, home.id, PresenceState.AWAY, **kw))
        assert away.presence is PresenceState.AWAY
        assert away.presence_changed_at >= home.presence_changed_at
        sub = await step("subscriber.create", registry.create(
            conn, registry.SUBSCRIBER,
            SubscriberCreate(msisdn="+79001112233", sip_aor="sip:+79001112233@ims.example"), **kw))
        await step("subscriber.update", registry.update(
            conn, registry.SUBSCRIBER, sub.id, SubscriberUpdate(display_name="Ann"), **kw))
        cred = await step("credential_ref.create", registry.create(
            conn, registry.CREDENTIAL_REF,
            CredentialRefCreate(name="oem-token", kind=CredentialKind.OAUTH_TOKEN, ref="vault:iim/oem#token"),
            **kw))
        await step("credential_ref.update", registry.update(
            conn, registry.CREDENTIAL_REF, cred.id, CredentialRefUpdate(ref="env:OEM_TOKEN"), **kw))
        dev = await step("device.create", registry.create(
            conn, registry.DEVICE,
            DeviceCreate(household_id=home.id, name="speaker", type=DeviceType.SPEAKER, vendor="acme",
                         capabilities=frozenset({DeviceCapability.SIP, DeviceCapability.TTS}),
                         sip_uri="sip:spk@iim.local", credential_ref_id=cred.id), **kw))
        assert dev.capabilities == frozenset({DeviceCapability.SIP, DeviceCapability.TTS})
        await step("device.update", registry.update(
            conn, registry.DEVICE, dev.id, DeviceUpdate(name="speaker 2"), **kw))
        online = await step("device.status", registry.set_device_status(conn, dev.id, DeviceStatus.ONLINE, **kw))
        assert online.status is DeviceStatus.ONLINE
        assert online.status_changed_at >= dev.status_changed_at
        bnd = await step("binding.create", registry.create(
            conn, registry.BINDING,
            BindingCreate(subscriber_id=sub.id, household_id=home.id, role=BindingRole.OWNER), **kw))
        await step("binding.update", registry.update(conn, registry.BINDING, bnd.id, BindingUpdate(priority=5), **kw))
        consent = await step("consent.create", registry.create(
            conn, registry.CONSENT,
            ConsentCreate(subscriber_id=sub.id, purpose=ConsentPurpose.ANNOUNCE_CALLS,
                          scope={"callers": "all"}, evidence={"channel": "app", "ip": "198.51.100.7"}), **kw))
        revoked = await step("consent.revoke", registry.revoke(conn, registry.CONSENT, consent.id, **kw))
        assert revoked.revoked_at is not None
        policy = await step("policy.create", registry.create(
            conn, registry.POLICY,
            PolicyCreate(household_id=home.id, ring_mode=RingMode.SIMULTANEOUS, quiet_start=time(23),
                         quiet_end=time(7)), **kw))
        await step("policy.update", registry.update(conn, registry.POLICY, policy.id, PolicyUpdate(dnd=True), **kw))
        await step("policy.delete", registry.delete(conn, registry.POLICY, policy.id, **kw))
        await step("binding.delete", registry.delete(conn, registry.BINDING, bnd.id, **kw))
        await step("device.delete", registry.delete(conn, registry.DEVICE, dev.id, **kw))
        await step("credential_ref.delete", registry.delete(conn, registry.CREDENTIAL_REF, cred.id, **kw))
        await step("subscriber.delete", registry.delete(conn, registry.SUBSCRIBER, sub.id, **kw))
        await step("household.delete", registry.delete(conn, registry.HOUSEHOLD, home.id, **kw))
        await step("region.delete", registry.delete(conn, registry.REGION, region.id, **kw))
        await step("brand.delete", registry.delete(conn, registry.BRAND, brand.id, **kw))

        # No-op updates and repeated revocations write nothing.
        before = await _audit_count(conn)
        again = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn="+79001112299"), actor=ACTOR)
        await registry.update(conn, registry.SUBSCRIBER, again.id, SubscriberUpdate(), actor=ACTOR)
        await registry.update(conn, registry.SUBSCRIBER, again.id, SubscriberUpdate(msisdn="+79001112299"), actor=ACTOR)
        assert await _audit_count(conn) == before + 1
        assert await audit.verify_chain(conn, tenant) is None

    details = json.dumps([e.detail for _, e in steps])
    assert "198.51.100.7" not in details  # consent evidence only as a digest
    consent_entry = dict(steps)["consent.create"]
    assert consent_entry.detail["after"]["evidence"].startswith("sha256:")
    assert consent_entry.detail["after"]["scope"] == {"callers": "all"}


async def test_secret_looking_fields_are_redacted_in_audit(app_pool: Pool, tenant: UUID) -> None:
    async with tenant_tx(app_pool, tenant) as conn:
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn="+79001112244"), actor=ACTOR)
        await registry.create(
            conn, registry.CONSENT,
            ConsentCreate(subscriber_id=sub.id, purpose=ConsentPurpose.READ_SMS,
                          scope={"api_key": "k-123", "nested": {"password": "p-456"}, "ok": 1},
                          evidence={"channel": "app"}), actor=ACTOR)
        entry = await _last_audit(conn)
    text = json.dumps(entry.detail)
    assert "k-123" not in text
    assert "p-456" not in text
    assert entry.detail["after"]["scope"] == {"api_key": "[redacted]", "nested": {"password": "[redacted]"}, "ok": 1}


async def test_typed_errors(app_pool: Pool, tenant: UUID) -> None:
    other = await create_tenant(app_pool, "other")
    async with tenant_tx(app_pool, other) as conn:
        foreign_home = await registry.create(
            conn, registry.HOUSEHOLD, HouseholdCreate(name="theirs", time_zone="UTC"), actor=ACTOR)
    async with tenant_tx(app_pool, tenant) as conn:
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn="+79002223344"), actor=ACTOR)
    async with tenant_tx(app_pool, tenant) as conn:
        with pytest.raises(Conflict) as conflict:
            await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn="+79002223344"), actor=ACTOR)
        assert conflict.value.entity == "subscriber"
        assert conflict.value.constraint == "subscriber_tenant_id_msisdn_key"
    async with tenant_tx(app_pool, tenant) as conn:
        with pytest.raises(InvalidReference):  # another tenant's household does not exist here
            await registry.create(
                conn, registry.BINDING,
                BindingCreate(subscriber_id=sub.id, household_id=foreign_home.id, role=BindingRole.OWNER),
                actor=ACTOR)
    async with tenant_tx(app_pool, tenant) as conn:
        with pytest.raises(NotFound):
            await registry.get(conn, registry.HOUSEHOLD, foreign_home.id)
        with pytest.raises(NotFound):
            await registry.delete(conn, registry.SUBSCRIBER, uuid4(), actor=ACTOR)
        # A CHECK constraint in the database (bypassing model validation on purpose).
        with pytest.raises(InvalidData):
            await registry.create(
                conn, registry.HOUSEHOLD,
                HouseholdCreate.model_construct(name="x", time_zone="MSK", brand_id=None, region_id=None,
                                                presence=PresenceState.UNKNOWN, external_id=None),
                actor=ACTOR)
    async with tenant_tx(app_pool, tenant) as conn:
        home = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(name="h", time_zone="UTC"), actor=ACTOR)
        cred = await registry.create(
            conn, registry.CREDENTIAL_REF,
            CredentialRefCreate(name="c", kind=CredentialKind.API_KEY, ref="env:KEY"), actor=ACTOR)
        await registry.create(
            conn, registry.DEVICE,
            DeviceCreate(household_id=home.id, name="d", type=DeviceType.HUB, credential_ref_id=cred.id),
            actor=ACTOR)
        with pytest.raises(InvalidReference):  # still used by a device
            await registry.delete(conn, registry.CREDENTIAL_REF, cred.id, actor=ACTOR)


async def test_consent_rules(app_pool: Pool, tenant: UUID) -> None:
    async with tenant_tx(app_pool, tenant) as conn:
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn="+79003334455"), actor=ACTOR)
        grant = ConsentCreate(subscriber_id=sub.id, purpose=ConsentPurpose.ANNOUNCE_CALLS,
                              expires_at=datetime.now(UTC) + timedelta(days=30), evidence={"channel": "ivr"})
        first = await registry.create(conn, registry.CONSENT, grant, actor=ACTOR)
        assert first.is_active(datetime.now(UTC))
    async with tenant_tx(app_pool, tenant) as conn:
        with pytest.raises(Conflict):  # one unrevoked consent per purpose
            await registry.create(conn, registry.CONSENT, grant, actor=ACTOR)
    # (a database error aborts its transaction: each expected failure gets its own)
    async with tenant_tx(app_pool, tenant) as conn:
        revoked = await registry.revoke(conn, registry.CONSENT, first.id, actor=ACTOR)
        count = await _audit_count(conn)
        assert await registry.revoke(conn, registry.CONSENT, first.id, actor=ACTOR) == revoked  # idempotent, no audit
        assert await _audit_count(conn) == count
        second = await registry.create(conn, registry.CONSENT, grant, actor=ACTOR)  # allowed again after revocation
        listed = await registry.list_rows(conn, registry.CONSENT, subscriber_id=sub.id)
        assert {c.id for c in listed} == {first.id, second.id}
    async with tenant_tx(app_pool, tenant) as conn:
        # The service cannot delete consent evidence.
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            await conn.execute("DELETE FROM iim.consent WHERE id = $1", first.id)


async def test_the_crud_refuses_what_a_spec_does_not_allow(app_pool: Pool, tenant: UUID) -> None:
    """Before any SQL: consents are neither deleted nor edited, brands have no version, households are
    not revoked, and a list filters only on columns of the table."""
    async with tenant_tx(app_pool, tenant) as conn:
        brand = await registry.create(conn, registry.BRAND, BrandCreate(name="b"), actor=ACTOR)
        count = await _audit_count(conn)
        with pytest.raises(TypeError, match="consent rows are not deleted"):
            await registry.delete(conn, registry.CONSENT, uuid4(), actor=ACTOR)
        with pytest.raises(TypeError, match="brand rows are not updated"):
            await registry.update(conn, registry.BRAND, brand.id, None, actor=ACTOR)
        with pytest.raises(TypeError, match="household rows have no version"):
            await registry.update(conn, registry.HOUSEHOLD, uuid4(), HouseholdUpdate(name="x"), actor=ACTOR,
                                  expected_version=1)
        with pytest.raises(TypeError, match="household rows are not revoked"):
            await registry.revoke(conn, registry.HOUSEHOLD, uuid4(), actor=ACTOR)
        with pytest.raises(ValueError, match="brand has no column 'nmae'"):
            await registry.list_rows(conn, registry.BRAND, nmae="b")
        assert await _audit_count(conn) == count
        assert await registry.get(conn, registry.BRAND, brand.id) == brand


async def test_policy_versioning(app_pool: Pool, tenant: UUID) -> None:
    async with tenant_tx(app_pool, tenant) as conn:
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn="+79004445566"), actor=ACTOR)
        policy = await registry.create(
            conn, registry.POLICY, PolicyCreate(subscriber_id=sub.id, blocked_callers=["+79990001122"]), actor=ACTOR)
        assert policy.version == 1
        assert await registry.get_policy_for(conn, subscriber_id=sub.id) == policy
        updated = await registry.update(conn, registry.POLICY, policy.id, PolicyUpdate(ring_mode=RingMode.HOME_ONLY),
                                        expected_version=1, actor=ACTOR)
        assert updated.version == 2
        unchanged = await registry.update(conn, registry.POLICY, policy.id, PolicyUpdate(ring_mode=RingMode.HOME_ONLY),
                                          actor=ACTOR)
        assert unchanged.version == 2  # no effective change, no bump
        with pytest.raises(VersionConflict):
            await registry.update(
                conn, registry.POLICY, policy.id, PolicyUpdate(dnd=True), expected_version=1, actor=ACTOR)
    async with tenant_tx(app_pool, tenant) as conn:
        with pytest.raises(Conflict):  # one policy per subscriber
            await registry.create(conn, registry.POLICY, PolicyCreate(subscriber_id=sub.id), actor=ACTOR)
    async with tenant_tx(app_pool, tenant) as conn:
        with pytest.raises(InvalidData):  # the quiet-hours pair is checked by the database as well
            await registry.update(conn, registry.POLICY, policy.id, PolicyUpdate(quiet_start=time(22)), actor=ACTOR)


async def test_lists_are_keyset_paginated(app_pool: Pool, tenant: UUID) -> None:
    async with tenant_tx(app_pool, tenant) as conn:
        for i in range(5):
            await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=f"+7900555000{i}"), actor=ACTOR)
        page1 = await registry.list_rows(conn, registry.SUBSCRIBER, limit=3)
        page2 = await registry.list_rows(conn, registry.SUBSCRIBER, limit=3, after=page1[-1].id)
        ids = [s.id for s in page1 + page2]
        assert len(ids) == len(set(ids)) >= 5
        assert ids == sorted(ids)
        found = await registry.get_subscriber_by_msisdn(conn, "+79005550003")
        assert found.msisdn == "+79005550003"


@pytest.mark.parametrize(("field", "value"), [
    ("msisdn", "89001234567"), ("msisdn", "+0123456789"), ("msisdn", "+7 900 123"), ("msisdn", "+1234"),
    ("sip_aor", "tel:+79001234567"), ("sip_aor", "sip:nobody"),
])
def test_subscriber_model_rejects_bad_identifiers(field: str, value: str) -> None:
    data: dict[str, Any] = {"msisdn": "+79001234567", field: value}
    with pytest.raises(ValidationError):
        SubscriberCreate.model_validate(data)


@pytest.mark.parametrize("zone", ["MSK", "UTC+3", "Mars/Olympus_Mons", "europe/moscow", "", "localtime"])
def test_household_model_rejects_non_iana_zones(zone: str) -> None:
    with pytest.raises(ValidationError):
        HouseholdCreate(name="h", time_zone=zone)


def test_models_are_strict() -> None:
    sub = UUID(int=1)
    with pytest.raises(ValidationError):  # unknown field
        SubscriberCreate.model_validate({"msisdn": "+79001234567", "secret": "x"})
    with pytest.raises(ValidationError):  # exactly one policy target
        PolicyCreate(subscriber_id=sub, household_id=sub)
    with pytest.raises(ValidationError):
        PolicyCreate(subscriber_id=sub, quiet_start=time(23))
    with pytest.raises(ValidationError):
        PolicyCreate(subscriber_id=sub, phone_timeout_s=0)
    with pytest.raises(ValidationError):
        CredentialRefCreate(name="x", kind=CredentialKind.API_KEY, ref="hunter2")  # a secret, not a reference
    with pytest.raises(ValidationError):
        ConsentCreate(subscriber_id=sub, purpose=ConsentPurpose.READ_SMS, evidence={})
    with pytest.raises(ValidationError):
        DeviceCreate(household_id=sub, name="d", type=DeviceType.SPEAKER, connector="alexa")  # no connector_ref
    parsed = PolicyCreate.model_validate_json(
        '{"household_id": "00000000-0000-0000-0000-000000000001", "ring_mode": "phone_then_home",'
        ' "quiet_start": "23:00", "quiet_end": "07:00"}')
    assert parsed.ring_mode is RingMode.PHONE_THEN_HOME
    assert HouseholdCreate(name="h", time_zone="America/Argentina/Buenos_Aires").time_zone.endswith("Aires")


@pytest.mark.parametrize("spec", registry.TABLES, ids=lambda t: t.name)
async def test_each_spec_describes_its_migrated_table(admin_conn: Connection, spec: Any) -> None:
    """A column added by a migration but not to the record model (or the reverse) fails here."""
    columns = {r[0] for r in await admin_conn.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = 'iim' AND table_name = $1",
        spec.name)}
    assert set(spec.record.model_fields) == columns
    assert set(spec.create.model_fields) <= columns
    assert spec.update is None or set(spec.update.model_fields) <= columns
