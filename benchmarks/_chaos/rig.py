"""The chaos tenant: one household per alarm (its smoke sensor, owner, backup, security service and a cloud
speaker behind the ``chaos`` connector), a short smoke scenario, generous toll-fraud caps; and who answers.

The scenario is ``smoke_co``'s shape with 5 s rings (the CI run must finish in about a minute): call the
owner (IVR: 1 confirms) with an SMS; then the backup contact with an SMS; then the security service.
A confirmed alarm notifies the household's speaker through the connector (an SMS when that fails).
"""

from __future__ import annotations

import base64
import json
import random
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from fs_app.testing import TargetBehaviour
from iim.scenarios.model import (
    CallStep,
    ContactRole,
    IvrCheck,
    IvrOutcome,
    NotifyStep,
    Scenario,
    SmsStep,
    Trigger,
)
from iot_bridge.event_types import EventType

RING_S = 5
_IVR = IvrCheck(prompt="Alarm at {household}. Press 1 to confirm.", digits={"1": IvrOutcome.ACKNOWLEDGE},
                tries=1, digit_timeout_s=3)
SCENARIO = Scenario(
    name="chaos_smoke",
    trigger=Trigger(event_types=[EventType.SMOKE]),
    steps=[
        CallStep(action="call", to=ContactRole.OWNER, ivr=_IVR, ring_s=RING_S, with_next=True),
        SmsStep(action="sms", to=ContactRole.OWNER, text="ALARM: {event} at {household}. We are calling you."),
        CallStep(action="call", to=ContactRole.BACKUP_CONTACT, ivr=_IVR, ring_s=RING_S, with_next=True),
        SmsStep(action="sms", to=ContactRole.BACKUP_CONTACT, text="ALARM: {event} at {household}; no answer."),
        CallStep(action="call", to=ContactRole.SECURITY_SERVICE, ring_s=RING_S, message="Alarm at {household}."),
    ],
    on_acknowledge=[NotifyStep(action="notify", text="The {event} alarm at {household} was confirmed.")],
)


@dataclass(frozen=True)
class Household:
    n: int
    device: str
    owner: str
    backup: str
    security: str


@dataclass(frozen=True)
class ChaosTenant:
    tenant: uuid.UUID
    secret: bytes
    households: tuple[Household, ...]


def msisdns(n: int) -> tuple[str, str, str]:
    return f"+7961{n:07d}", f"+7962{n:07d}", f"+7963{n:07d}"


def callee_plan(rng: random.Random, households: tuple[Household, ...]) -> dict[str, TargetBehaviour]:
    """Who answers: most owners confirm; some do not answer, are busy or answer without pressing a key,
    and then the backup confirms (or, rarely, not either, and the security service is called)."""
    targets: dict[str, TargetBehaviour] = {}
    confirm = TargetBehaviour.answer(after_ms=300, dtmf="1")
    for h in households:
        roll = rng.random()
        if roll < 0.6:
            targets[h.owner] = confirm
            continue
        targets[h.owner] = (TargetBehaviour.no_answer() if roll < 0.75 else TargetBehaviour.busy(after_ms=200)
                            if roll < 0.85 else TargetBehaviour.answer(after_ms=300))
        targets[h.backup] = confirm if rng.random() < 0.8 else TargetBehaviour.no_answer()
        targets[h.security] = TargetBehaviour.answer(after_ms=300, hangup_after_ms=1500)
    return targets


async def seed(admin_url: str, households: int, secret_file: Path) -> ChaosTenant:
    """A fresh tenant with ``households`` households (one sensor each), the scenario and the caps."""
    tenant = uuid.uuid4()
    secret = secrets.token_bytes(32)
    secret_file.write_text("whsec_" + base64.b64encode(secret).decode())  # noqa: ASYNC240 - once, before the run
    secret_file.chmod(0o600)  # noqa: ASYNC240
    t = str(tenant)
    conn = await asyncpg.connect(admin_url)
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO iim.tenant (id, name) VALUES ($1, 'chaos')", tenant)
            ref = await conn.fetchval(
                "INSERT INTO iim.credential_ref (tenant_id, name, kind, ref) VALUES ($1, 'chaos-hmac', "
                "'webhook_secret', $2) RETURNING id", tenant, f"file:{secret_file}")
            await conn.execute("""
                INSERT INTO iim.household (tenant_id, id, name, time_zone, presence)
                SELECT $1, md5($2 || 'h' || i)::uuid, 'Flat ' || i, 'Europe/Moscow', 'away'
                  FROM generate_series(1, $3) i""", tenant, t, households)
            for role, prefix, prio in (("owner", "+7961", 10), ("backup_contact", "+7962", 20),
                                       ("security_service", "+7963", 30)):
                await conn.execute("""
                    INSERT INTO iim.subscriber (tenant_id, id, msisdn)
                    SELECT $1, md5($2 || $4 || i)::uuid, $5 || lpad(i::text, 7, '0')
                      FROM generate_series(1, $3) i""", tenant, t, households, role, prefix)
                await conn.execute("""
                    INSERT INTO iim.binding (tenant_id, subscriber_id, household_id, role, priority)
                    SELECT $1, md5($2 || $4 || i)::uuid, md5($2 || 'h' || i)::uuid, $4::iim.binding_role, $5
                      FROM generate_series(1, $3) i""", tenant, t, households, role, prio)
            # The owners consent to escalation (iim.scenarios.consent): without it the backup and the security
            # service are never called and the run would not exercise the escalation path at all.
            await conn.execute("""
                INSERT INTO iim.consent (tenant_id, subscriber_id, purpose)
                SELECT $1, md5($2 || 'owner' || i)::uuid, 'emergency_escalation'
                  FROM generate_series(1, $3) i""", tenant, t, households)
            await conn.execute("""
                INSERT INTO iim.device (tenant_id, id, household_id, name, type, external_id, credential_ref_id,
                                        status)
                SELECT $1, md5($2 || 'd' || i)::uuid, md5($2 || 'h' || i)::uuid, 'smoke ' || i, 'sensor',
                       'chaos-' || i, $4, 'online'
                  FROM generate_series(1, $3) i""", tenant, t, households, ref)
            await conn.execute("""
                INSERT INTO iim.device (tenant_id, id, household_id, name, type, connector, connector_ref, status)
                SELECT $1, md5($2 || 's' || i)::uuid, md5($2 || 'h' || i)::uuid, 'speaker ' || i, 'speaker',
                       'chaos', 'spk-' || i, 'online'
                  FROM generate_series(1, $3) i""", tenant, t, households)
            doc = SCENARIO.model_dump(mode="json", exclude_none=True)
            await conn.execute(
                "INSERT INTO iim.scenario (tenant_id, name, trigger, conditions, steps, on_acknowledge, enabled) "
                "VALUES ($1, $2, $3::jsonb, $4::jsonb, $5::jsonb, $6::jsonb, true)",
                tenant, SCENARIO.name, json.dumps(doc["trigger"]), json.dumps(doc.get("conditions", [])),
                json.dumps(doc["steps"]), json.dumps(doc.get("on_acknowledge", [])))
            await conn.execute("INSERT INTO iim.originate_limit (tenant_id, max_concurrent, max_per_hour) "
                               "VALUES ($1, 10000, 1000000)", tenant)
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    homes = tuple(Household(i, f"chaos-{i}", *msisdns(i)) for i in range(1, households + 1))
    return ChaosTenant(tenant, secret, homes)
