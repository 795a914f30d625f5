"""Alert calls through the real switch: a household whose alarm calls the owner (the IMS core, played by SIPp),
and IIM's record of it (incident, actions, audit) read from PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from iim.scenarios import registry as scenario_registry
from iot_bridge.events import DeviceEvent, body_fingerprint
from iot_bridge.intake import KnownDevice, accept_event
from policy_cache import audit
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from policy_cache.models import ScenarioCreate
from tests.alarm_rig import AlarmRig, build_rig
from tests.pg import PgDatabase

#: The owner's IVR: two tries of a short prompt, 3 s each to press a key; 1 confirms, 2 asks for help (the next
#: step at once), nobody pressing moves on too: the next step is a text to the backup contact.
TRIES, DIGIT_TIMEOUT_S = 2, 3
SCENARIO = {
    "name": "alarm-ivr", "trigger": {"event_types": ["smoke"]}, "enabled": True,
    "steps": [
        {"action": "call", "to": "owner", "ring_s": 20, "ivr": {
            "prompt": "Smoke at {household}. Press 1 to confirm, 2 for help.",
            "digits": {"1": "acknowledge", "2": "escalate"},
            "tries": TRIES, "digit_timeout_s": DIGIT_TIMEOUT_S}},
        {"action": "sms", "to": "backup_contact", "text": "Smoke at {household}; the owner did not confirm."},
    ],
}


async def household(db: PgDatabase, tmp: Path, owner: str, backup: str, security: str) -> AlarmRig:
    """A household (``tests.alarm_rig``) whose smoke alarm runs :data:`SCENARIO`."""
    pool = await connect_pool(db.app_url, role=DbRole.APP, min_size=1, max_size=1)
    try:
        rig = await build_rig(pool, tmp, name=f"alert-{owner[-4:]}", owner=owner, backup=backup, security=security)
        async with tenant_tx(pool, rig.tenant_id) as conn:
            await scenario_registry.create_scenario(
                conn, ScenarioCreate(household_id=rig.household_id, **SCENARIO), actor="test")  # type: ignore[arg-type]
    finally:
        await pool.close()
    return rig


@dataclass
class Incident:
    state: str
    actions: list[dict[str, Any]]
    audit: list[dict[str, Any]]
    sms_to: list[str]


async def raise_alarm(pool: Pool, rig: AlarmRig) -> UUID:
    """The smoke sensor's event, accepted as the device bridge accepts it: the incident opens, the worker runs."""
    raw = rig.event("smoke")
    event = DeviceEvent.model_validate(json.loads(raw))
    device = KnownDevice(rig.tenant_id, rig.sensor_id, rig.household_id, rig.sensor, "sensor")
    outcome = await accept_event(pool, device, event, fingerprint=body_fingerprint(raw), channel="device",
                                 msg_id=None)
    assert outcome.incident_id is not None
    return outcome.incident_id


async def settled(pool: Pool, rig: AlarmRig, incident: UUID, timeout: float = 60.0) -> Incident:
    """The incident once it is no longer open or notifying, with its actions, audit lines and texts."""
    deadline = time.monotonic() + timeout
    while True:
        async with tenant_tx(pool, rig.tenant_id) as conn:
            state = str(await conn.fetchval("SELECT state::text FROM iim.incident WHERE id = $1", incident))
        if state not in ("open", "notifying") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    lines = await _chained_lines(pool, rig, incident)
    async with tenant_tx(pool, rig.tenant_id) as conn:
        actions = [dict(r) for r in await conn.fetch(
            "SELECT key, kind, destination, outcome, detail FROM iim.incident_action WHERE incident_id = $1 "
            "ORDER BY key", incident)]
        sms = [r["msisdn"] for r in await conn.fetch(
            "SELECT msisdn FROM iim.sms_outbox WHERE incident_id = $1 ORDER BY created_at", incident)]
    return Incident(state, actions, lines, sms)


async def _chained_lines(pool: Pool, rig: AlarmRig, incident: UUID, quiet_s: float = 0.5,
                         timeout: float = 10.0) -> list[dict[str, Any]]:
    """The incident's audit lines once chained. Lines the service's own flusher holds (``audit_flush`` skips rows
    another round has locked) land a moment after our flush: read until the list stays the same for ``quiet_s``."""
    deadline = time.monotonic() + timeout
    seen: list[dict[str, Any]] | None = None
    while True:
        await audit.flush_pending(pool)
        async with tenant_tx(pool, rig.tenant_id) as conn:
            lines = [dict(r) for r in await conn.fetch(
                "SELECT action, detail FROM iim.audit_log WHERE entity = 'incident' AND entity_id = $1 ORDER BY id",
                str(incident))]
        if lines == seen or time.monotonic() > deadline:
            return lines
        seen = lines
        await asyncio.sleep(quiet_s)


def served_to_switch(http_port: int) -> float:
    """IIM's count of prompts the switch fetched from ``GET /v1/audio`` (its ``/metrics``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(r'^iim_switch_audio_requests_total\{result="served"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def prompts_played(switch_log: str) -> list[str]:
    """What the switch was told to play in each alert IVR (the prompt of every ``play_and_get_digits``)."""
    return re.findall(r"EXECUTE \[depth=\d+\] \S+ play_and_get_digits\(\S+ \S+ \S+ \S+ \S+ (\S+)", switch_log)
