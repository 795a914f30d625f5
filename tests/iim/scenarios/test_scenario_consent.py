"""Consent purposes enforced by the scenario worker (real PostgreSQL, the FreeSWITCH emulator over sockets):
a refused action fails with one ``consent.refused`` audit line and the incident moves on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest_asyncio

from fs_app.testing import TargetBehaviour
from iim.scenarios.consent import refusal, subjects
from iim.scenarios.engine import Contact, IncidentFacts, Notify, PlaceCall, RecordMessage, SendSms
from iim.scenarios.model import ContactRole
from iot_bridge.event_types import EventType
from policy_cache import registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import ConsentPurpose, DeviceCreate, DeviceStatus, DeviceType, PresenceState
from tests.iim.scenarios.test_scenario_worker import Alarms, alarms, alarms_rig
from tests.pg import opened

__all__ = ["alarms"]  # the default rig (every consent held) as a fixture here


async def _refusals(alarms: Alarms, incident: UUID) -> list[dict[str, Any]]:
    return await alarms.rows(
        "SELECT detail->>'kind' AS kind, detail->>'purpose' AS purpose FROM iim.audit_log "
        "WHERE entity = 'incident' AND entity_id = $1 AND action = 'consent.refused' ORDER BY id", str(incident))


async def _wearable(alarms: Alarms) -> str:
    async with tenant_tx(alarms.pool, alarms.rig.tenant_id) as conn:
        await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=alarms.rig.household_id, name="Watch", type=DeviceType.WEARABLE,
            external_id=f"watch-{alarms.rig.tenant_id.hex[:6]}", status=DeviceStatus.ONLINE), actor="test")
    return f"watch-{alarms.rig.tenant_id.hex[:6]}"


@pytest_asyncio.fixture
async def no_escalation(app_pool: Pool, pg_db: Any, tmp_path: Path) -> AsyncIterator[Alarms]:
    async with alarms_rig(app_pool, pg_db, tmp_path, consents=(ConsentPurpose.HEALTH_EVENTS,
                                                               ConsentPurpose.CALL_RECORDING)) as rig:
        yield rig


@pytest_asyncio.fixture
async def no_health(app_pool: Pool, pg_db: Any, tmp_path: Path) -> AsyncIterator[Alarms]:
    async with alarms_rig(app_pool, pg_db, tmp_path, consents=(ConsentPurpose.EMERGENCY_ESCALATION,
                                                               ConsentPurpose.CALL_RECORDING)) as rig:
        yield rig


@pytest_asyncio.fixture
async def no_recording(app_pool: Pool, pg_db: Any, tmp_path: Path) -> AsyncIterator[Alarms]:
    async with alarms_rig(app_pool, pg_db, tmp_path, consents=(ConsentPurpose.HEALTH_EVENTS,
                                                               ConsentPurpose.EMERGENCY_ESCALATION)) as rig:
        yield rig


async def test_without_emergency_escalation_only_the_household_is_called(no_escalation: Alarms) -> None:
    rig = no_escalation.rig
    incident = await no_escalation.raise_alarm("smoke")
    assert await no_escalation.settled(incident) == "exhausted"
    assert no_escalation.calls_to(rig.owner) == 1
    assert no_escalation.calls_to(rig.backup) == 0
    assert no_escalation.calls_to(rig.security) == 0
    refused = await no_escalation.rows(
        "SELECT destination, outcome FROM iim.incident_action WHERE incident_id = $1 AND kind = 'call' "
        "AND destination <> $2 ORDER BY destination", incident, rig.owner)
    assert refused == [{"destination": rig.backup, "outcome": "refused"},
                       {"destination": rig.security, "outcome": "refused"}]
    assert await _refusals(no_escalation, incident) == [{"kind": "call", "purpose": "emergency_escalation"}] * 2
    # The texts of the chain still go out: only calls outside the household need the consent.
    sms = await no_escalation.rows("SELECT msisdn FROM iim.sms_outbox WHERE incident_id = $1 ORDER BY msisdn", incident)
    assert [s["msisdn"] for s in sms] == sorted([rig.owner, rig.backup])


async def test_without_health_events_a_fall_is_not_spoken_about(no_health: Alarms) -> None:
    watch = await _wearable(no_health)
    incident = await no_health.raise_alarm("fall", device=watch)
    assert await no_health.settled(incident) == "exhausted"
    assert no_health.calls_to(no_health.rig.owner) == 0
    assert no_health.calls_to(no_health.rig.backup) == 0
    assert await no_health.rows("SELECT 1 FROM iim.sms_outbox WHERE incident_id = $1", incident) == []
    purposes = {r["purpose"] for r in await _refusals(no_health, incident)}
    assert purposes == {"health_events"}


async def test_with_health_events_the_wearer_is_called(alarms: Alarms) -> None:
    watch = await _wearable(alarms)
    alarms.script(alarms.rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="2"))
    incident = await alarms.raise_alarm("fall", device=watch)
    assert await alarms.settled(incident) == "resolved"
    assert alarms.calls_to(alarms.rig.owner) == 1
    assert await _refusals(alarms, incident) == []


async def test_without_call_recording_the_doorphone_does_not_record_and_the_rest_goes_on(
        no_recording: Alarms) -> None:
    rig = no_recording.rig
    incident = await no_recording.raise_alarm("doorbell", device=rig.doorphone)
    assert await no_recording.settled(incident, timeout=40) == "exhausted"
    records = await no_recording.rows("SELECT outcome FROM iim.incident_action WHERE incident_id = $1 "
                                      "AND kind = 'record'", incident)
    assert records == [{"outcome": "refused"}]
    assert await _refusals(no_recording, incident) == [{"kind": "record", "purpose": "call_recording"}]
    sms = await no_recording.rows("SELECT tenant_id, key, body, body_key FROM iim.sms_outbox "
                                  "WHERE incident_id = $1 AND msisdn = $2", incident, rig.owner)
    texts = [await opened(no_recording.pool, s) or "" for s in sms]
    assert any(text.startswith("Missed visitor") for text in texts)


# -- the rule, pure ---------------------------------------------------------------------------------------

def _facts(event: EventType, *contacts: Contact) -> IncidentFacts:
    return IncidentFacts(event_type=event, device_type=DeviceType.WEARABLE, device_id="w", device_name="Watch",
                         device_status=DeviceStatus.ONLINE, device_sip_uri="sip:door@x", household_name="Flat",
                         presence=PresenceState.HOME, time_zone="UTC", contacts=contacts, home_targets=())


OWNER = Contact(ContactRole.OWNER, "+79000000001", "owner", 0, "Anna")
WEARER = Contact(ContactRole.MEMBER, "+79000000004", "wearer", 5, "Grandpa", frozenset({"health_events"}), True)
BACKUP = Contact(ContactRole.BACKUP_CONTACT, "+79000000002", "backup", 10)


def test_the_wearer_bound_to_the_device_is_the_subject_not_the_owner() -> None:
    facts = _facts(EventType.FALL, OWNER, WEARER, BACKUP)
    assert subjects(facts) == (WEARER,)
    assert refusal(SendSms("k", 0, ContactRole.OWNER, OWNER.msisdn, "fall"), facts) is None
    assert subjects(_facts(EventType.FALL, OWNER, BACKUP)) == (OWNER,)


def test_each_purpose_gates_its_actions() -> None:
    nobody = _facts(EventType.FALL, OWNER, BACKUP)
    assert refusal(Notify("k", 0, "fall"), nobody).purpose == "health_events"  # type: ignore[union-attr]
    smoke = _facts(EventType.SMOKE, OWNER, BACKUP)
    assert refusal(Notify("k", 0, "smoke"), smoke) is None
    call_backup = PlaceCall("k", 0, ContactRole.BACKUP_CONTACT, BACKUP.msisdn, None, 30, "smoke")
    assert refusal(call_backup, smoke).purpose == "emergency_escalation"  # type: ignore[union-attr]
    call_owner = PlaceCall("k", 0, ContactRole.OWNER, OWNER.msisdn, None, 30, "smoke")
    assert refusal(call_owner, smoke) is None
    record = RecordMessage("k", 0, "sip:door@x", "leave a message", 60)
    assert refusal(record, smoke).purpose == "call_recording"  # type: ignore[union-attr]
    assert refusal(record, _facts(EventType.SMOKE)).detail.endswith("nobody who could give it")  # type: ignore[union-attr]
