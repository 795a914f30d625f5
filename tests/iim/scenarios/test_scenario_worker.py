"""The scenario worker end to end: intake -> pgqueuer jobs -> engine -> originate at the emulator -> IVR.

Real PostgreSQL, the FreeSWITCH emulator over real sockets (inbound ESL for originate, our outbound
server for the IVR it dials back). Scripted callees: who answers, what they press.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import pytest_asyncio

from fs_app.call import Call
from fs_app.dialstring import DialSettings
from fs_app.inbound import InboundClient, InboundSettings
from fs_app.outbound import OutboundServer, OutboundSettings
from fs_app.outreach.calls import AlertCall, AlertCallPlacer, originate_command
from fs_app.outreach.guard import OriginateLimits
from fs_app.outreach.ivr import IvrRegistry, with_alert_calls
from fs_app.testing import FreeSwitchEmulator, InboundServer, TargetBehaviour
from iim.connectors.contract import ConnectorLookup
from iim.core.metrics import REGISTRY
from iim.keys.keyring import Keyring
from iim.scenarios import store
from iim.scenarios.worker import IncidentWorker, WorkerSettings, _safe_alert_call
from iot_bridge.events import DeviceEvent, body_fingerprint
from iot_bridge.intake import KnownDevice, accept_event
from policy_cache import audit
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import ConsentPurpose
from tests.alarm_rig import SCENARIO_CONSENTS, AlarmRig, build_rig
from tests.pg import TEST_MASTER_KEY, opened
from tests.tcp_proxy import TcpFaultProxy

GW = "sofia/gateway/ims/{}"
_numbers = itertools.count(100)


def numbers() -> dict[str, str]:
    n = next(_numbers)
    return {"owner": f"+7903{n:04d}001", "backup": f"+7903{n:04d}002", "security": f"+7903{n:04d}003"}


@dataclass
class Alarms:
    rig: AlarmRig
    pool: Pool
    emu: FreeSwitchEmulator
    inbound: InboundServer
    worker: IncidentWorker
    #: between the worker's inbound ESL client and the emulator, with ``esl_proxy=True``
    proxy: TcpFaultProxy | None = None

    def script(self, number: str, behaviour: TargetBehaviour) -> None:
        self.emu.targets[GW.format(number)] = behaviour

    def calls_to(self, number: str) -> int:
        return len(self.emu.originates_to(number))

    async def raise_alarm(self, event_type: str = "smoke", device: str | None = None,
                          opener: Any = None) -> UUID:
        raw = self.rig.event(event_type, device=device)
        event = DeviceEvent.model_validate(json.loads(raw))
        async with tenant_tx(self.pool, self.rig.tenant_id) as conn:
            row = await conn.fetchrow("SELECT id, household_id, type::text AS type FROM iim.device "
                                      "WHERE external_id = $1", event.device_id)
        assert row is not None
        device_row = KnownDevice(self.rig.tenant_id, row["id"], row["household_id"], event.device_id, row["type"])
        outcome = await accept_event(self.pool, device_row, event, fingerprint=body_fingerprint(raw),
                                     channel="device", msg_id=None, opener=opener)
        assert outcome.incident_id is not None
        return outcome.incident_id

    async def incident(self, incident_id: UUID) -> dict[str, Any]:
        async with tenant_tx(self.pool, self.rig.tenant_id) as conn:
            row = await conn.fetchrow("SELECT state::text AS state, step, reason FROM iim.incident WHERE id = $1",
                                      incident_id)
        assert row is not None
        return dict(row)

    async def settled(self, incident_id: UUID, timeout: float = 20.0) -> str:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            state = (await self.incident(incident_id))["state"]
            if state not in ("open", "notifying"):
                return str(state)
            if asyncio.get_running_loop().time() > deadline:
                actions = await self.rows("SELECT key, kind, destination, dispatched_at, outcome, detail "
                                          "FROM iim.incident_action WHERE incident_id = $1 ORDER BY key", incident_id)
                raise AssertionError(f"incident still {state}: {actions}")
            await asyncio.sleep(0.05)

    async def rows(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        await audit.flush_pending(self.pool)  # audit lines are staged, then chained
        async with tenant_tx(self.pool, self.rig.tenant_id) as conn:
            return [dict(r) for r in await conn.fetch(sql, *args)]


async def _route(call: Call) -> None:
    await call.hangup("NORMAL_CLEARING")


@contextlib.asynccontextmanager
async def alarms_rig(app_pool: Pool, pg_db: Any, tmp_path: Path, *,
                     connectors: ConnectorLookup | None = None, speech: Any = None,
                     time_scale: float = 0.01, limits: OriginateLimits | None = None,
                     esl_proxy: bool = False, prompt_location: Any = None,
                     consents: Sequence[ConsentPurpose] = SCENARIO_CONSENTS) -> AsyncIterator[Alarms]:
    """A tenant, the emulator (callees scripted per number), our outbound server for the IVR, the worker."""
    n = numbers()
    rig = await build_rig(app_pool, tmp_path, owner=n["owner"], backup=n["backup"], security=n["security"],
                          consents=consents)
    # Without ``speech`` the worker leaves the prompt to FreeSWITCH's say: (IIM_ALERT_PROMPT_TTS=freeswitch), which
    # plays only on a switch that loads a TTS module: this one loads mod_flite.
    emu = FreeSwitchEmulator(time_scale=time_scale, default_target=TargetBehaviour.no_answer(),
                             tts_engines=() if speech is not None else ("flite",))
    inbound = await emu.start_inbound()
    registry = IvrRegistry()
    server = OutboundServer(with_alert_calls(registry, _route),
                            OutboundSettings(port=0, exit_wait=0.5))
    await server.start()
    proxy = None
    if esl_proxy:
        proxy = TcpFaultProxy(f"esl://127.0.0.1:{inbound.port}")
        await proxy.start()
    client = InboundClient(InboundSettings(port=proxy.port if proxy else inbound.port, command_timeout=2.0,
                                           backoff_initial=0.05, backoff_max=0.2, events=("BACKGROUND_JOB",)))
    await client.start()
    await client.wait_connected(5)
    placer = AlertCallPlacer(client, registry, socket_address=f"127.0.0.1:{server.port}",
                             gateway_dial=DialSettings(phone_endpoint=GW.replace("{}", "{msisdn}")),
                             answer_grace_s=2.0, connect_wait_s=0.3, api_timeout_s=0.5, prompt_s=1.0,
                             poll_s=0.2)
    worker = IncidentWorker(app_pool, pg_db.app_url, placer, WorkerSettings(
        heartbeat_timeout=timedelta(seconds=2), unreachable_retries=(0.3, 0.3),
        default_limits=limits or OriginateLimits()), connectors=connectors, speech=speech,
        prompt_location=prompt_location, keyring=Keyring(app_pool, TEST_MASTER_KEY))
    await worker.start()
    try:
        yield Alarms(rig, app_pool, emu, inbound, worker, proxy)
    finally:
        await worker.aclose()
        await client.aclose()
        if proxy is not None:
            await proxy.close()
        await server.aclose(drain_timeout=1.0)
        await emu.close()


@pytest_asyncio.fixture
async def alarms(app_pool: Pool, pg_db: Any, tmp_path: Path) -> AsyncIterator[Alarms]:
    async with alarms_rig(app_pool, pg_db, tmp_path) as rig:
        yield rig


async def test_owner_presses_2_false_alarm_stops_everything(alarms: Alarms) -> None:
    rig = alarms.rig
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=200, dtmf="2"))
    incident = await alarms.raise_alarm("smoke")
    assert await alarms.settled(incident) == "false_alarm"
    assert alarms.calls_to(rig.owner) == 1
    assert alarms.calls_to(rig.backup) == 0
    sms = await alarms.rows("SELECT msisdn, status FROM iim.sms_outbox WHERE incident_id = $1", incident)
    assert sms == [{"msisdn": rig.owner, "status": "queued"}]  # smoke: call and SMS the owner at once
    audit = [r["action"] for r in await alarms.rows(
        "SELECT action FROM iim.audit_log WHERE entity = 'incident' AND entity_id = $1 ORDER BY id", str(incident))]
    assert audit[0] == "incident.opened"
    assert "incident.call" in audit
    assert audit[-1] == "incident.false_alarm"


async def test_nobody_answers_escalates_owner_backup_security_once_each(alarms: Alarms) -> None:
    rig = alarms.rig
    incident = await alarms.raise_alarm("smoke")
    assert await alarms.settled(incident) == "exhausted"
    order = sorted((o.monotonic, o.destination) for n in (rig.owner, rig.backup, rig.security)
                    for o in alarms.emu.originates_to(n))
    assert [d for _, d in order] == [rig.owner, rig.backup, rig.security]
    calls = await alarms.rows("SELECT outcome FROM iim.incident_action WHERE incident_id = $1 AND kind = 'call'",
                              incident)
    assert sorted(c["outcome"] for c in calls) == ["no_answer"] * 3


async def test_backup_confirms_with_1_acknowledged_and_on_acknowledge_runs(alarms: Alarms) -> None:
    rig = alarms.rig
    alarms.script(rig.owner, TargetBehaviour.busy())
    alarms.script(rig.backup, TargetBehaviour.answer(after_ms=100, dtmf="1"))
    incident = await alarms.raise_alarm("smoke")
    assert await alarms.settled(incident) == "acknowledged"
    assert alarms.calls_to(rig.security) == 0
    await _eventually_rows(alarms, "SELECT 1 FROM iim.incident_action WHERE incident_id = $1 "
                                   "AND starts_with(key, $2) AND outcome IS NOT NULL", incident, f"{incident}/ack/")


async def _eventually_rows(alarms: Alarms, sql: str, *args: Any) -> list[dict[str, Any]]:
    for _ in range(200):
        rows = await alarms.rows(sql, *args)
        if rows:
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError("no rows")


async def test_numbers_outside_the_tenants_plan_are_refused_audited_and_never_dialled(alarms: Alarms) -> None:
    rig = alarms.rig
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
        await conn.execute("INSERT INTO iim.originate_limit (country_codes) VALUES ('{+44}')")
    incident = await alarms.raise_alarm("smoke")
    assert await alarms.settled(incident) == "exhausted"
    assert alarms.calls_to(rig.owner) == alarms.calls_to(rig.backup) == alarms.calls_to(rig.security) == 0
    refused = await alarms.rows(
        "SELECT detail->>'reason' AS reason FROM iim.audit_log WHERE action = 'originate.refused' "
        "AND entity_id = $1", str(incident))
    assert [r["reason"] for r in refused] == ["outside_plan"] * 3


async def _rebind(alarms: Alarms, old: str, new: str) -> None:
    """A contact's number changed behind the admin API's back (SQL, a seed, an old row)."""
    async with tenant_tx(alarms.pool, alarms.rig.tenant_id) as conn:
        await conn.execute("UPDATE iim.subscriber SET msisdn = $2 WHERE msisdn = $1", old, new)


async def test_an_alarm_to_a_premium_number_is_refused_while_the_normal_contacts_are_called(alarms: Alarms) -> None:
    """Issue 14 item 7: with no allow-list at all, +7809 (Russian premium rate) was dialled."""
    rig = alarms.rig
    premium = "+78095550" + rig.backup[-3:]
    await _rebind(alarms, rig.backup, premium)
    alarms.script(rig.security, TargetBehaviour.answer(after_ms=100))
    incident = await alarms.raise_alarm("smoke")
    assert await alarms.settled(incident) == "acknowledged"  # the security service took the call
    assert alarms.calls_to(premium) == 0
    assert alarms.calls_to(rig.owner) == alarms.calls_to(rig.security) == 1
    refused = await alarms.rows(
        "SELECT detail->>'reason' AS reason, detail->>'detail' AS detail FROM iim.audit_log "
        "WHERE action = 'originate.refused' AND entity_id = $1", str(incident))
    assert [r["reason"] for r in refused] == ["special_range"]
    assert "+7809" in refused[0]["detail"]


async def test_an_allow_list_entry_inside_a_premium_range_admits_that_number(alarms: Alarms) -> None:
    rig = alarms.rig
    premium = "+78095551" + rig.backup[-3:]
    await _rebind(alarms, rig.backup, premium)
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
        await conn.execute("INSERT INTO iim.originate_allow (prefix, note) VALUES ('+7', 'too broad'), ($1, 'ok')",
                           premium)
    alarms.script(premium, TargetBehaviour.answer(after_ms=100, dtmf="1"))
    incident = await alarms.raise_alarm("smoke")
    assert await alarms.settled(incident) == "acknowledged"
    assert alarms.calls_to(premium) == 1


async def test_the_hourly_cap_queues_calls_beyond_it_and_refuses_them_only_after_the_longest_wait(
    app_pool: Pool, pg_db: Any, tmp_path: Path
) -> None:
    async with alarms_rig(app_pool, pg_db, tmp_path, limits=OriginateLimits(max_wait_s=2.0)) as alarms:
        rig = alarms.rig
        async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
            await conn.execute("INSERT INTO iim.originate_limit (max_per_hour) VALUES (1)")
        incident = await alarms.raise_alarm("smoke")
        assert await alarms.settled(incident) == "exhausted"
        assert alarms.calls_to(rig.owner) == 1
        assert alarms.calls_to(rig.backup) == alarms.calls_to(rig.security) == 0
        lines = await alarms.rows("SELECT action, detail->>'reason' AS reason, detail->>'detail' AS detail "
                                  "FROM iim.audit_log WHERE action LIKE 'originate.%' AND entity_id = $1 "
                                  "ORDER BY id", str(incident))
        assert [(r["action"], r["reason"]) for r in lines] == [
            ("originate.queued", "hourly_cap"), ("originate.refused", "hourly_cap")] * 2
        assert all("waited" in r["detail"] for r in lines if r["action"] == "originate.refused")


@pytest.mark.timeout(60)
async def test_three_simultaneous_alarms_under_a_concurrency_cap_of_one_all_get_their_calls_one_after_another(
    alarms: Alarms
) -> None:
    """Issue 14 item 7: two of three simultaneous alarms ended "exhausted" with zero calls."""
    rig = alarms.rig
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
        await conn.execute("INSERT INTO iim.originate_limit (max_concurrent) VALUES (1)")
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=300, dtmf="1"))
    queued_before = REGISTRY.get_sample_value("iim_originate_queued_total", {"reason": "concurrent_cap"}) or 0.0
    incidents = await asyncio.gather(
        alarms.raise_alarm("smoke", opener=alarms.worker.begin_in),
        alarms.raise_alarm("co", opener=alarms.worker.begin_in),
        alarms.raise_alarm("smoke", device=rig.jws_sensor, opener=alarms.worker.begin_in))
    assert len(set(incidents)) == 3
    assert [await alarms.settled(i, timeout=40) for i in incidents] == ["acknowledged"] * 3
    assert alarms.calls_to(rig.owner) == 3
    calls = await alarms.rows("SELECT dispatched_at, finished_at FROM iim.incident_action "
                              "WHERE incident_id = ANY($1::uuid[]) AND kind = 'call' ORDER BY dispatched_at",
                              list(incidents))
    assert len(calls) == 3
    for earlier, later in itertools.pairwise(calls):  # one after another: never two at once
        assert earlier["finished_at"] <= later["dispatched_at"]
    lines = await alarms.rows("SELECT action FROM iim.audit_log WHERE action LIKE 'originate.%' "
                              "AND entity_id = ANY($1::text[])", [str(i) for i in incidents])
    assert {r["action"] for r in lines} == {"originate.queued"}  # told, never refused
    assert 1 <= len(lines) <= 2  # once per waiting call, however often it looked again
    assert REGISTRY.get_sample_value("iim_originate_queued_total", {"reason": "concurrent_cap"}) == (
        queued_before + len(lines))


async def test_notification_without_a_connected_device_is_settled_with_the_decision_as_sms(alarms: Alarms) -> None:
    rig = alarms.rig
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="1"))
    incident = await alarms.raise_alarm("smoke")
    assert await alarms.settled(incident) == "acknowledged"
    notify = await alarms.rows("SELECT key, outcome, detail, started_at, finished_at FROM iim.incident_action "
                               "WHERE incident_id = $1 AND kind = 'notify'", incident)
    assert [(n["outcome"], n["detail"]) for n in notify] == [("sms_fallback", "no connected device")]
    assert notify[0]["finished_at"] == notify[0]["started_at"]  # now() of one transaction: the decision's
    texts = await alarms.rows("SELECT msisdn FROM iim.sms_outbox WHERE key = $1", f"{notify[0]['key']}/sms/0")
    assert [t["msisdn"] for t in texts] == [rig.owner]


async def test_concurrent_claims_never_exceed_the_concurrent_cap_nor_dial_an_action_twice(alarms: Alarms) -> None:
    rig = alarms.rig
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
        incident = await conn.fetchval(
            "INSERT INTO iim.incident (household_id, device_id, hazard, first_event_id) "
            "VALUES ($1, $2, 'smoke', 'cap-race') RETURNING id", rig.household_id, rig.sensor_id)
        for n in range(8):
            await conn.execute(
                "INSERT INTO iim.incident_action (key, incident_id, step, kind, destination, call_uuid) "
                "VALUES ($1, $2, 0, 'call', $3, gen_random_uuid())", f"{incident}/0/0/{n}", incident, rig.owner)

    async def claim(n: int) -> tuple[bool, int, int]:
        async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
            return await store.claim_originate(conn, f"{incident}/0/0/{n % 8}", max_concurrent=3, max_per_hour=100)

    results = await asyncio.gather(*(claim(n) for n in range(16)))  # every action claimed twice at once
    claimed_keys = [n % 8 for n, (claimed, _, _) in enumerate(results) if claimed]
    assert len(claimed_keys) == 3
    assert len(set(claimed_keys)) == 3  # no action dispatched twice
    window = await alarms.rows("SELECT sum(calls) AS calls FROM iim.originate_window")
    assert window[0]["calls"] == 3


async def _call_actions(alarms: Alarms, n: int) -> UUID:
    rig = alarms.rig
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
        incident: UUID = await conn.fetchval(
            "INSERT INTO iim.incident (household_id, device_id, hazard, first_event_id) "
            "VALUES ($1, $2, 'smoke', 'caps') RETURNING id", rig.household_id, rig.sensor_id)
        for k in range(n):
            await conn.execute(
                "INSERT INTO iim.incident_action (key, incident_id, step, kind, destination, call_uuid) "
                "VALUES ($1, $2, 0, 'call', $3, gen_random_uuid())", f"{incident}/0/0/{k}", incident, rig.owner)
    return incident


async def test_a_settled_call_frees_its_place_under_the_concurrent_cap(alarms: Alarms) -> None:
    incident = await _call_actions(alarms, 3)

    async def claim(k: int) -> tuple[bool, int, int]:
        async with tenant_tx(alarms.pool, alarms.rig.tenant_id) as conn:
            return await store.claim_originate(conn, f"{incident}/0/0/{k}", max_concurrent=1, max_per_hour=100)

    assert await claim(0) == (True, 0, 0)
    assert await claim(1) == (False, 1, 1)  # the first call still rings
    async with tenant_tx(alarms.pool, alarms.rig.tenant_id) as conn:
        await store.record_outcome(conn, f"{incident}/0/0/0", "no_answer")
    assert await claim(1) == (True, 0, 1)
    async with tenant_tx(alarms.pool, alarms.rig.tenant_id) as conn:  # put back to be retried later
        await conn.execute("UPDATE iim.incident_action SET dispatched_at = NULL WHERE key = $1", f"{incident}/0/0/1")
    assert await claim(2) == (True, 0, 2)  # hourly count keeps both dispatches


async def test_a_decision_far_below_the_caps_claims_its_calls_itself_and_near_them_leaves_them(alarms: Alarms
                                                                                                 ) -> None:
    rig = alarms.rig
    incident = await _call_actions(alarms, 0)

    async def persist(n: int, max_concurrent: int) -> dict[str, Any]:
        action = {"key": f"{incident}/0/0/{n}", "incident_id": str(incident), "step": 0, "kind": "call",
                  "destination": rig.owner, "spec": {}, "call_uuid": str(store.call_uuid_for(f"{incident}/{n}"))}
        async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
            result: dict[str, Any] = await conn.fetchval(
                "SELECT iim.persist_decision($1::jsonb)",
                {"actions": [action], "claim": {"keys": [action["key"]], "max_concurrent": max_concurrent,
                                                "max_per_hour": 1_000_000}})
        return result

    far = await persist(0, 10_000)
    assert far["claims"] == [{"key": f"{incident}/0/0/0", "claimed": True}]
    near = await persist(1, 10)  # within 4 x max_connections of the cap: claimed exactly after the commit
    assert near["claims"] == [{"key": f"{incident}/0/0/1", "claimed": False}]
    again = await persist(0, 10_000)  # the same key again writes nothing and claims nothing
    assert again == {"inserted": [], "claims": []}
    rows = await alarms.rows("SELECT key, dispatched_at IS NOT NULL AS dispatched FROM iim.incident_action "
                             "WHERE incident_id = $1 ORDER BY key", incident)
    assert [r["dispatched"] for r in rows] == [True, False]
    window = await alarms.rows("SELECT sum(calls) AS calls FROM iim.originate_window")
    assert window[0]["calls"] == 1


async def test_the_first_call_is_claimed_with_the_event_and_placed_without_a_job(alarms: Alarms) -> None:
    rig = alarms.rig
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
        await conn.execute("INSERT INTO iim.originate_limit (max_concurrent, max_per_hour) VALUES (10000, 1000000)")
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=300, dtmf="1"))
    with_decision = REGISTRY.get_sample_value("iim_originate_claims_total", {"path": "decision"}) or 0.0
    incident = await alarms.raise_alarm("smoke", opener=alarms.worker.begin_in)
    assert REGISTRY.get_sample_value("iim_originate_claims_total", {"path": "decision"}) == with_decision + 1
    calls = await alarms.rows("SELECT dispatched_at IS NOT NULL AS dispatched FROM iim.incident_action "
                              "WHERE incident_id = $1 AND kind = 'call'", incident)
    assert calls == [{"dispatched": True}]  # committed with the event itself
    async with alarms.pool.acquire() as conn:
        jobs = await conn.fetchval("SELECT count(*) FROM iim_jobs.pgqueuer WHERE convert_from(payload, 'UTF8') LIKE $1",
                                   f"%{incident}%")
    assert jobs == 0
    assert await alarms.settled(incident) == "acknowledged"
    assert alarms.calls_to(rig.owner) == 1


async def test_a_call_still_ringing_at_the_group_deadline_is_hung_up_and_the_escalation_moves_on(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    # The same path moves an incident on when the worker that placed the call died while it rang.
    async with alarms_rig(app_pool, pg_db, tmp_path, time_scale=1.0) as alarms:
        rig = alarms.rig
        alarms.script(rig.owner, TargetBehaviour.answer(after_ms=25_000))
        alarms.script(rig.backup, TargetBehaviour.answer(after_ms=100, dtmf="1"))
        incident = await alarms.raise_alarm("smoke", opener=alarms.worker.begin_in)
        deadline = asyncio.get_running_loop().time() + 5
        while not alarms.calls_to(rig.owner):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
            await conn.execute("UPDATE iim.incident SET deadline = now() - interval '1 second' WHERE id = $1",
                               incident)
        assert await alarms.settled(incident, timeout=10) == "acknowledged"
        assert alarms.calls_to(rig.owner) == alarms.calls_to(rig.backup) == 1
        owner = await _eventually_rows(  # the hung-up call is settled too, never redialled
            alarms, "SELECT outcome FROM iim.incident_action WHERE incident_id = $1 AND kind = 'call' "
                    "AND destination = $2 AND outcome IS NOT NULL", incident, rig.owner)
        assert owner[0]["outcome"] in ("no_answer", "failed")


async def test_the_sweep_deletes_toll_fraud_counters_older_than_the_caps_window(alarms: Alarms) -> None:
    async with tenant_tx(alarms.pool, alarms.rig.tenant_id) as conn:
        await conn.execute("INSERT INTO iim.originate_window (minute, shard, calls) VALUES "
                           "(date_trunc('minute', now()) - interval '3 hours', 0, 5), "
                           "(date_trunc('minute', now()) - interval '30 minutes', 0, 2)")
    alarms.worker.settings.window_prune_interval_s = 0.05
    deadline = asyncio.get_running_loop().time() + 5
    while len(await alarms.rows("SELECT 1 FROM iim.originate_window")) > 1:
        assert asyncio.get_running_loop().time() < deadline, "old counters still there"
        await asyncio.sleep(0.05)
    assert await alarms.rows("SELECT calls FROM iim.originate_window") == [{"calls": 2}]  # the hourly cap reads it


async def test_freeswitch_down_sends_sms_then_retries_the_call(alarms: Alarms) -> None:
    rig = alarms.rig
    await alarms.inbound.close()
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="1"))
    incident = await alarms.raise_alarm("smoke")
    fallback = await _eventually_rows(
        alarms, "SELECT tenant_id, key, msisdn, body, body_key FROM iim.sms_outbox "
                "WHERE incident_id = $1 AND key LIKE '%/unreachable/%'", incident)
    assert fallback[0]["msisdn"] == rig.owner
    assert "could not call" in (await opened(alarms.pool, fallback[0]) or "")
    alarms.inbound = await alarms.emu.start_inbound(port=alarms.inbound.port)
    assert await alarms.settled(incident) == "acknowledged"
    assert alarms.calls_to(rig.owner) == 1


async def test_a_retried_call_the_switch_took_after_all_is_not_dialled_again(alarms: Alarms) -> None:
    # The first attempt counted as unreachable, yet the switch had taken the call (its answer lost with the
    # link, or a take-over that could not ask): the switch's note of the uuid says so, and the retry asks it
    # before dialling. Before, the retry was a fresh originate: the owner was called twice for one step.
    rig = alarms.rig
    await alarms.inbound.close()
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="1"))
    alarms.script(rig.backup, TargetBehaviour.answer(after_ms=100, dtmf="1"))
    incident = await alarms.raise_alarm("smoke")
    await _eventually_rows(
        alarms, "SELECT 1 FROM iim.sms_outbox WHERE incident_id = $1 AND key LIKE '%/unreachable/%'", incident)
    owner_call = str(store.call_uuid_for(f"{incident}/0/0/0"))
    alarms.emu.hash_db[f"iim_originated_{owner_call}"] = "1"  # what api_on_originate leaves on the switch
    alarms.inbound = await alarms.emu.start_inbound(port=alarms.inbound.port)
    assert await alarms.settled(incident) == "acknowledged"
    assert alarms.calls_to(rig.owner) == 0
    assert alarms.calls_to(rig.backup) == 1
    owner = await alarms.rows("SELECT outcome, detail FROM iim.incident_action WHERE incident_id = $1 "
                              "AND kind = 'call' AND destination = $2", incident, rig.owner)
    assert owner[0]["outcome"] == "failed"
    assert "ended while its placer was gone" in owner[0]["detail"]


async def test_a_group_waits_for_its_unreachable_calls_retry_rather_than_skip_that_contact(alarms: Alarms) -> None:
    # The switch blinked as the owner's call went out and the retry is due after the group's own deadline:
    # the deadline moves past the retry, so the owner is called once the switch is back instead of being
    # passed over for the backup (the chaos run's "lost" calls: retries superseded by the next step).
    rig = alarms.rig
    alarms.worker.settings.unreachable_retries = (120.0,)
    await alarms.inbound.close()
    incident = await alarms.raise_alarm("smoke")
    await _eventually_rows(
        alarms, "SELECT 1 FROM iim.sms_outbox WHERE incident_id = $1 AND key LIKE '%/unreachable/%'", incident)
    held = await alarms.rows("SELECT deadline > now() + interval '119 seconds' AS held, step FROM iim.incident "
                             "WHERE id = $1", incident)
    assert held == [{"held": True, "step": 0}]
    assert alarms.calls_to(rig.backup) == 0


async def test_cleared_event_resolves_a_live_incident(alarms: Alarms) -> None:
    rig = alarms.rig
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=5000))  # rings for a while (x0.01: 50 ms)
    incident = await alarms.raise_alarm("smoke")
    raw = rig.event("cleared")
    event = DeviceEvent.model_validate(json.loads(raw))
    device = KnownDevice(rig.tenant_id, rig.sensor_id, rig.household_id, rig.sensor, "sensor")
    await accept_event(alarms.pool, device, event, fingerprint=body_fingerprint(raw), channel="device", msg_id=None)
    assert await alarms.settled(incident) in ("resolved", "acknowledged")


async def test_cleared_event_resolves_every_live_incident_of_the_device(alarms: Alarms) -> None:
    rig = alarms.rig
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:  # both incidents stay live: a long wait first
        await conn.execute(
            "INSERT INTO iim.scenario (name, trigger, steps, enabled) VALUES ('wait first', $1, $2, true)",
            {"event_types": ["smoke", "co"]}, [{"action": "wait", "seconds": 600}])
    smoke = await alarms.raise_alarm("smoke")
    co = await alarms.raise_alarm("co")  # the same device: its own incident
    assert smoke != co
    raw = rig.event("cleared")
    event = DeviceEvent.model_validate(json.loads(raw))
    device = KnownDevice(rig.tenant_id, rig.sensor_id, rig.household_id, rig.sensor, "sensor")
    await accept_event(alarms.pool, device, event, fingerprint=body_fingerprint(raw), channel="device", msg_id=None)
    assert await alarms.settled(smoke) == "resolved"
    assert await alarms.settled(co) == "resolved"


@pytest.mark.parametrize("hazard", ["smoke", "co"])
async def test_each_hazard_gets_its_own_incident(alarms: Alarms, hazard: str) -> None:
    device = alarms.rig.jws_sensor if hazard == "co" else None
    alarms.script(alarms.rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="2"))
    incident = await alarms.raise_alarm(hazard, device=device)
    assert await alarms.settled(incident) == "false_alarm"



async def test_intake_starts_the_incident_in_its_own_transaction(alarms: Alarms) -> None:
    rig = alarms.rig
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=300, dtmf="2"))
    incident = await alarms.raise_alarm("smoke", opener=alarms.worker.begin_in)
    # Committed with the event: the first group's call and SMS exist as soon as the 202 could be sent.
    actions = await alarms.rows("SELECT kind FROM iim.incident_action WHERE incident_id = $1 ORDER BY kind", incident)
    assert [a["kind"] for a in actions] == ["call", "sms"]
    assert await alarms.settled(incident) == "false_alarm"
    assert alarms.calls_to(rig.owner) == 1


async def test_a_failing_inline_start_still_accepts_the_event_and_the_worker_starts_it(alarms: Alarms) -> None:
    rig = alarms.rig
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="2"))

    async def broken(conn: Any, tenant: UUID, incident: UUID) -> None:
        await conn.execute("SELECT 1")
        raise RuntimeError("engine bug")

    incident = await alarms.raise_alarm("smoke", opener=broken)
    assert await alarms.settled(incident) == "false_alarm"
    assert alarms.calls_to(rig.owner) == 1


async def test_an_inline_start_failing_after_it_wrote_leaves_nothing_half_written(alarms: Alarms) -> None:
    rig = alarms.rig
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="2"))

    async def half(conn: Any, tenant: UUID, incident: UUID) -> None:
        await conn.execute("UPDATE iim.incident SET reason = 'half-written' WHERE id = $1", incident)
        raise RuntimeError("failed after writing")

    incident = await alarms.raise_alarm("smoke", opener=half)
    events = await alarms.rows("SELECT count(*) AS n FROM iim.device_event WHERE incident_id = $1", incident)
    assert events == [{"n": 1}]  # the event itself was accepted once
    assert await alarms.settled(incident) == "false_alarm"
    assert (await alarms.incident(incident))["reason"] != "half-written"
    assert alarms.calls_to(rig.owner) == 1


async def test_ivr_prompt_is_rendered_by_our_tts_while_the_phone_rings(app_pool: Pool, pg_db: Any,
                                                                       tmp_path: Path) -> None:
    from fs_app.esl import Execute
    from iim.tts.engine import EspeakTts

    tts = EspeakTts(tmp_path / "tts")
    async with alarms_rig(app_pool, pg_db, tmp_path, speech=tts, time_scale=0.1) as alarms:
        alarms.emu.keep_results = True
        rig = alarms.rig
        alarms.script(rig.owner, TargetBehaviour.answer(after_ms=15_000, dtmf="2"))  # x0.1: rings 1.5 s
        incident = await alarms.raise_alarm("smoke")
        assert await alarms.settled(incident) == "false_alarm"
        prompts = [c.arg or "" for r in alarms.emu.results for c in r.commands
                   if isinstance(c, Execute) and c.app == "play_and_get_digits"]
        assert prompts
        assert str(tmp_path / "tts") in prompts[0]  # the WAV file, not FreeSWITCH's own say:
    await tts.aclose()


# -- the prompt when speech fails: the generic one, with the IVR's instructions, and nothing private --------

@pytest.fixture
def switch_heard(monkeypatch: pytest.MonkeyPatch) -> bytearray:
    """Every byte the emulated FreeSWITCH received, on every connection (inbound ESL and the IVR's socket)."""
    from fs_app.testing.listener import EslListener

    heard = bytearray()
    received = EslListener.data_received

    def recording(self: EslListener, data: bytes) -> None:
        heard.extend(data)
        received(self, data)

    monkeypatch.setattr(EslListener, "data_received", recording)
    return heard


def _played(alarms: Alarms) -> list[str]:
    from fs_app.esl import Execute
    from fs_app.testing.apps import separate_args

    return [separate_args(c.arg or "")[5] for r in alarms.emu.results for c in r.commands
            if isinstance(c, Execute) and c.app == "play_and_get_digits"]


async def _speech_failed_and_the_callee_confirmed(app_pool: Pool, pg_db: Any, tmp_path: Path, tts: Any,
                                                  heard: bytearray) -> None:
    from iim.tts import generic

    async with alarms_rig(app_pool, pg_db, tmp_path, speech=tts, time_scale=0.1) as alarms:
        alarms.emu.keep_results = True
        rig = alarms.rig
        alarms.script(rig.owner, TargetBehaviour.answer(after_ms=5_000, dtmf="1"))  # x0.1: rings 0.5 s
        before = REGISTRY.get_sample_value("iim_alert_prompt_fallbacks_total", {"reason": "unavailable"}) or 0
        incident = await alarms.raise_alarm("smoke")
        assert await alarms.settled(incident) == "acknowledged"  # the callee knew to press 1
        [prompt] = _played(alarms)
        notes = await alarms.rows("SELECT detail FROM iim.audit_log WHERE entity_id = $1 AND action = "
                                  "'incident.degraded'", str(incident))
    assert (REGISTRY.get_sample_value("iim_alert_prompt_fallbacks_total", {"reason": "unavailable"}) or 0) > before
    # The generic prompt, put together from the shipped phrases: "... press 1 to confirm the alarm, press 2 ...".
    expected = await tts.generic({"1": "acknowledge", "2": "false_alarm"})
    assert prompt == str(expected.path)
    assert expected.duration_s > 10  # every instruction, in both languages
    assert generic.generic_segments({"1": "acknowledge", "2": "false_alarm"})[1:3] == [
        "press-1-ru", "meaning-acknowledge-ru"]
    assert [n["detail"]["degraded"] for n in notes] == ["prompt"]
    assert notes[0]["detail"]["reason"] == "unavailable"
    # Nothing private reached the switch, on any connection, in any command.
    for private in ("Flat 12", "Kitchen smoke sensor", "say:", "Alarm: "):
        assert private.encode() not in heard
    assert b"play_and_get_digits" in heard  # the recording saw the IVR's commands


async def test_with_speech_gone_the_callee_hears_the_generic_prompt_and_the_switch_no_private_text(
        app_pool: Pool, pg_db: Any, tmp_path: Path, switch_heard: bytearray) -> None:
    from iim.tts.engine import EspeakTts

    tts = EspeakTts(tmp_path / "tts", library=str(tmp_path / "libespeak-ng-removed.so"))  # the library is gone
    await _speech_failed_and_the_callee_confirmed(app_pool, pg_db, tmp_path, tts, switch_heard)
    assert tts.health()["status"] == "degraded"
    await tts.aclose()


async def test_when_the_engine_cannot_say_the_prompts_text_the_callee_hears_the_generic_prompt(
        app_pool: Pool, pg_db: Any, tmp_path: Path, switch_heard: bytearray) -> None:
    from iim.tts.engine import EspeakTts

    tts = EspeakTts(tmp_path / "tts", voices={"en-us": "no-such-voice"})  # alive (Russian), the English text fails
    assert await tts.render("Дым на кухне")
    await _speech_failed_and_the_callee_confirmed(app_pool, pg_db, tmp_path, tts, switch_heard)
    await tts.aclose()
async def test_esl_link_reset_right_after_originate_neither_redials_nor_hangs_up_the_answering_owner(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    # The control link drops 50 ms after the originate and stays down 6 s; the owner answers after 2 s
    # (the call reaches our IVR over its own socket) and presses 1.
    async with alarms_rig(app_pool, pg_db, tmp_path, time_scale=1.0, esl_proxy=True) as alarms:
        rig = alarms.rig
        assert alarms.proxy is not None
        alarms.script(rig.owner, TargetBehaviour.answer(after_ms=2000, dtmf="1"))
        incident = await alarms.raise_alarm("smoke", opener=alarms.worker.begin_in)
        deadline = asyncio.get_running_loop().time() + 5
        while not alarms.calls_to(rig.owner):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        alarms.proxy.cut()
        await asyncio.sleep(6)
        alarms.proxy.restore()
        assert await alarms.settled(incident, timeout=20) == "acknowledged"
        assert alarms.calls_to(rig.owner) == 1  # no second originate
        assert alarms.calls_to(rig.backup) == 0
        unreachable = await alarms.rows("SELECT key FROM iim.sms_outbox WHERE incident_id = $1 "
                                        "AND key LIKE '%/unreachable/%'", incident)
        assert unreachable == []  # no "could not call you"
        owner = await alarms.rows("SELECT outcome FROM iim.incident_action WHERE incident_id = $1 AND kind = 'call'",
                                  incident)
        assert owner == [{"outcome": "acknowledge"}]


async def test_esl_link_reset_while_the_owner_rings_unanswered_picks_up_the_outcome_after_reconnect(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    # Down 1 s right after the originate; the owner's phone rings out 3 s later: the BACKGROUND_JOB arrives
    # on the reconnected link (its Job-UUID is the call's uuid) and the escalation moves on to the backup.
    async with alarms_rig(app_pool, pg_db, tmp_path, time_scale=1.0, esl_proxy=True) as alarms:
        rig = alarms.rig
        assert alarms.proxy is not None
        alarms.script(rig.owner, TargetBehaviour.reject("NO_ANSWER", after_ms=3000, ring=True))
        alarms.script(rig.backup, TargetBehaviour.answer(after_ms=100, dtmf="1"))
        incident = await alarms.raise_alarm("smoke", opener=alarms.worker.begin_in)
        deadline = asyncio.get_running_loop().time() + 5
        while not alarms.calls_to(rig.owner):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        alarms.proxy.cut()
        await asyncio.sleep(1)
        alarms.proxy.restore()
        assert await alarms.settled(incident, timeout=30) == "acknowledged"
        assert alarms.calls_to(rig.owner) == 1
        assert alarms.calls_to(rig.backup) == 1
        owner = await alarms.rows("SELECT outcome FROM iim.incident_action WHERE incident_id = $1 AND kind = 'call' "
                                  "AND destination = $2", incident, rig.owner)
        assert owner == [{"outcome": "no_answer"}]
        unreachable = await alarms.rows("SELECT key FROM iim.sms_outbox WHERE incident_id = $1 "
                                        "AND key LIKE '%/unreachable/%'", incident)
        assert unreachable == []


async def test_a_switch_that_stays_down_makes_each_call_unreachable_with_sms_and_the_escalation_goes_on(
        alarms: Alarms) -> None:
    # The bounded decision for a configured but unreachable FreeSWITCH: nobody waits for it; every contact
    # is texted, each call counts as unreachable once its retries are spent, and the chain runs to its end.
    rig = alarms.rig
    await alarms.inbound.close()
    incident = await alarms.raise_alarm("smoke", opener=alarms.worker.begin_in)
    assert await alarms.settled(incident, timeout=30) == "exhausted"
    calls = await alarms.rows("SELECT destination, outcome FROM iim.incident_action WHERE incident_id = $1 "
                              "AND kind = 'call' ORDER BY key", incident)
    assert [c["outcome"] for c in calls] == ["unreachable"] * 3
    texted = await alarms.rows("SELECT DISTINCT msisdn FROM iim.sms_outbox WHERE incident_id = $1 "
                               "AND key LIKE '%/unreachable/%'", incident)
    assert {t["msisdn"] for t in texted} == {rig.owner, rig.backup, rig.security}
    assert alarms.emu.originates_to(rig.owner) == []


async def test_a_call_claimed_but_never_sent_before_a_crash_is_placed_once_by_the_next_worker(
        alarms: Alarms, pg_db: Any) -> None:
    # The claim commits with the event; the process that claimed it "dies" before sending (its after-commit
    # callback never runs). Two workers look for such calls: the owner is called exactly once, not skipped.
    rig = alarms.rig
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:  # far below the caps: claimed with the decision
        await conn.execute("INSERT INTO iim.originate_limit (max_concurrent, max_per_hour) VALUES (10000, 1000000)")
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=300, dtmf="1"))
    alarms.worker.settings.unsent_grace_s = 0.3
    alarms.worker.settings.unsent_interval_s = 0.1

    async def claim_and_die(conn: Any, tenant: UUID, incident: UUID) -> None:
        await alarms.worker.begin_in(conn, tenant, incident)  # the calls are claimed; never placed here

    second = IncidentWorker(alarms.pool, pg_db.app_url, alarms.worker.placer, WorkerSettings(
        unsent_grace_s=0.3, unsent_interval_s=0.1), keyring=alarms.worker.keyring)
    async with second:
        incident = await alarms.raise_alarm("smoke", opener=claim_and_die)
        claimed = await alarms.rows("SELECT dispatched_at IS NOT NULL AS claimed FROM iim.incident_action "
                                    "WHERE incident_id = $1 AND kind = 'call'", incident)
        assert claimed == [{"claimed": True}]
        assert await alarms.settled(incident) == "acknowledged"
    assert alarms.calls_to(rig.owner) == 1
    assert alarms.calls_to(rig.backup) == 0
    sent = await alarms.rows("SELECT sent_at IS NOT NULL AS sent FROM iim.incident_action WHERE incident_id = $1 "
                             "AND kind = 'call'", incident)
    assert sent == [{"sent": True}]
    taken = await alarms.rows("SELECT count(*) AS n FROM iim.audit_log WHERE action = 'incident.call_taken_over' "
                              "AND entity_id = $1", str(incident))
    assert taken == [{"n": 1}]


async def test_a_claimed_call_the_switch_reported_to_another_iim_is_never_dialled_again(alarms: Alarms) -> None:
    # The worker that claimed the call sent it and died before it recorded "sent": the switch rang the owner,
    # nobody answered, and the originate's BACKGROUND_JOB went to every IIM's link. The take-over must not ring
    # the owner a second time for the same step (the chaos run's duplicate calls).
    rig = alarms.rig
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
        await conn.execute("INSERT INTO iim.originate_limit (max_concurrent, max_per_hour) VALUES (10000, 1000000)")
    alarms.script(rig.owner, TargetBehaviour.no_answer())
    alarms.worker.settings.unsent_grace_s = 1.0
    alarms.worker.settings.unsent_interval_s = 0.1

    async def claim_and_die(conn: Any, tenant: UUID, incident: UUID) -> None:
        await alarms.worker.begin_in(conn, tenant, incident)  # claimed; this process never sends it

    incident = await alarms.raise_alarm("smoke", opener=claim_and_die)
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
        row = await store.load_incident(conn, incident)
        assert row is not None
        assert row.group is not None
        [action] = [a for a in row.group if a.kind == "call"]
    alert = _safe_alert_call(alarms.worker.settings, rig.tenant_id, row, action)
    assert isinstance(alert, AlertCall)
    dead = InboundClient(InboundSettings(port=alarms.inbound.port, command_timeout=2.0, events=("BACKGROUND_JOB",)))
    async with dead:  # the dead worker's own link: its originate went out before it died
        await dead.wait_connected(5)
        command = originate_command(alert, gateway_dial=DialSettings(phone_endpoint=GW.replace("{}", "{msisdn}")),
                                    socket_address="127.0.0.1:9")
        job = await dead.bgapi(command, job_uuid=alert.call_uuid, timeout=30)
    assert not job.ok  # nobody answered
    sent = await _eventually_rows(alarms, "SELECT 1 FROM iim.incident_action WHERE incident_id = $1 "
                                          "AND kind = 'call' AND sent_at IS NOT NULL", incident)
    assert sent == [{"?column?": 1}]  # witnessed by this process's link
    await asyncio.sleep(2.0)  # past the take-over grace
    assert alarms.calls_to(rig.owner) == 1


async def test_a_step_whose_call_was_claimed_but_never_sent_is_not_judged_before_the_call_is_placed(
        alarms: Alarms) -> None:
    # The chaos run's lost alarms: the process died between claim and originate, the step's deadline came
    # before the take-over, and the engine moved on to the backup: the owner was never called.
    rig = alarms.rig
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:
        await conn.execute("INSERT INTO iim.originate_limit (max_concurrent, max_per_hour) VALUES (10000, 1000000)")
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=300, dtmf="1"))
    alarms.worker.settings.unsent_grace_s = 1.5
    alarms.worker.settings.unsent_interval_s = 0.1

    async def claim_and_die(conn: Any, tenant: UUID, incident: UUID) -> None:
        await alarms.worker.begin_in(conn, tenant, incident)  # claimed; this process never sends it

    incident = await alarms.raise_alarm("smoke", opener=claim_and_die)
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:  # the step's deadline comes before the take-over
        await conn.execute("UPDATE iim.incident SET deadline = now() WHERE id = $1", incident)
    await alarms.worker.tick(rig.tenant_id, incident, reason="deadline")
    assert await alarms.settled(incident) == "acknowledged"
    assert alarms.calls_to(rig.owner) == 1
    assert alarms.calls_to(rig.backup) == 0


async def test_a_call_sent_and_marked_sent_is_never_taken_over(alarms: Alarms) -> None:
    rig = alarms.rig
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=20_000, dtmf="1"))  # rings 200 ms at this time scale
    alarms.worker.settings.unsent_grace_s = 0.1
    alarms.worker.settings.unsent_interval_s = 0.05
    incident = await alarms.raise_alarm("smoke", opener=alarms.worker.begin_in)
    sent = await _eventually_rows(alarms, "SELECT 1 FROM iim.incident_action WHERE incident_id = $1 "
                                          "AND kind = 'call' AND sent_at IS NOT NULL", incident)
    assert sent == [{"?column?": 1}]  # recorded while the phone still rings
    assert await alarms.settled(incident) == "acknowledged"
    assert alarms.calls_to(rig.owner) == 1


async def test_a_persistent_alarm_does_not_call_everyone_again_until_cleared_or_the_cool_down(
        alarms: Alarms) -> None:
    rig = alarms.rig
    first = await alarms.raise_alarm("smoke")
    assert await alarms.settled(first) == "exhausted"  # nobody answered: owner, backup, security once each
    called = [alarms.calls_to(n) for n in (rig.owner, rig.backup, rig.security)]
    assert called == [1, 1, 1]

    again = await alarms.raise_alarm("smoke")  # the alarm persists: held, nobody is called again
    deadline = asyncio.get_running_loop().time() + 10
    while not (await alarms.incident(again))["reason"].startswith("held until"):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert (await alarms.incident(again))["state"] == "open"
    assert [alarms.calls_to(n) for n in (rig.owner, rig.backup, rig.security)] == called
    assert await alarms.rows("SELECT key FROM iim.incident_action WHERE incident_id = $1", again) == []

    raw = rig.event("cleared")  # the device reports clear: the held incident is resolved ...
    event = DeviceEvent.model_validate(json.loads(raw))
    device = KnownDevice(rig.tenant_id, rig.sensor_id, rig.household_id, rig.sensor, "sensor")
    await accept_event(alarms.pool, device, event, fingerprint=body_fingerprint(raw), channel="device", msg_id=None)
    assert await alarms.settled(again) == "resolved"

    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="1"))
    rearmed = await alarms.raise_alarm("smoke")  # ... and an alarm after it starts a full chain
    assert await alarms.settled(rearmed) == "acknowledged"
    assert alarms.calls_to(rig.owner) == 2


async def test_a_held_alarm_starts_its_full_chain_when_the_cool_down_ends(alarms: Alarms) -> None:
    rig = alarms.rig
    alarms.worker.settings.rearm_cool_down = timedelta(seconds=2)
    first = await alarms.raise_alarm("smoke")
    assert await alarms.settled(first) == "exhausted"
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="1"))
    again = await alarms.raise_alarm("smoke")
    assert await alarms.settled(again, timeout=20) == "acknowledged"
    assert alarms.calls_to(rig.owner) == 2
    reasons = [r["action"] for r in await alarms.rows(
        "SELECT action FROM iim.audit_log WHERE entity_id = $1 ORDER BY id", str(again))]
    assert "incident.held" in reasons
