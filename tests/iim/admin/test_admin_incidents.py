"""Operators' incidents and tests through the admin API: real PostgreSQL, the FreeSWITCH emulator over real
sockets (the scenario worker's placer and our outbound server for the IVR), a real vendor cloud for notifications,
and the API over a real socket with bearer tokens."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from fs_app.testing import TargetBehaviour
from iim.admin import cli
from iim.admin.api import create_registry_app, mount_registry
from iim.admin.auth import TokenTable, hash_token
from iim.admin.incidents import operator_routes
from iim.admin.settings import AdminSettings
from iim.connectors.contract import ConnectorContext, ConnectorLookup
from iim.connectors.registry import ConnectorRegistry
from iim.connectors.webhook import WebhookConnector
from iim.core.metrics import REGISTRY
from iim.core.secrets import resolve_secret
from iim.http import create_app as create_root_app
from iim.scenarios.operator.desk import OperatorDesk
from policy_cache import registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import DeviceCapability, DeviceCreate, DeviceStatus, DeviceType
from tests.connector_peer import SIGNING_SECRET_TEXT, STATIC_TOKEN, StepClock, VendorPeer, serve
from tests.iim.scenarios.test_scenario_worker import Alarms, alarms_rig


@dataclass
class Desk:
    alarms: Alarms
    base: str
    session: aiohttp.ClientSession
    other_tenant: UUID

    @property
    def tenant(self) -> UUID:
        return self.alarms.rig.tenant_id

    async def call(self, method: str, path: str, token: str = "op-a", *, body: Any = None,
                   params: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.session.request(method, self.base + path, json=body, params=params,
                                        headers={"Authorization": f"Bearer {token}"}) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None

    def t(self, tail: str, tenant: UUID | None = None) -> str:
        return f"/v1/tenants/{tenant or self.tenant}{tail}"

    async def audit(self, action: str) -> list[dict[str, Any]]:
        return await self.alarms.rows("SELECT actor, entity, entity_id, detail, correlation FROM iim.audit_log "
                                      "WHERE action = $1 ORDER BY id", action)

    async def outcome(self, incident: UUID, destination: str) -> str | None:
        rows = await self.alarms.rows("SELECT outcome FROM iim.incident_action WHERE incident_id = $1 "
                                      "AND destination = $2 AND kind = 'call'", incident, destination)
        return rows[0]["outcome"] if rows else None


def _tokens(tenant: UUID, other: UUID) -> TokenTable:
    entries = {
        "admin": {"actor": "root@noc", "role": "admin"},
        "op-a": {"actor": "alice@tenant-a", "role": "operator", "tenant": str(tenant)},
        "op-b": {"actor": "bob@tenant-b", "role": "operator", "tenant": str(other)},
        "view-a": {"actor": "auditor@tenant-a", "role": "viewer", "tenant": str(tenant)},
    }
    return TokenTable.from_json(json.dumps({hash_token(k): v for k, v in entries.items()}))


@asynccontextmanager
async def desk_api(app_pool: Pool, pg_db: Any, tmp_path: Path, *, time_scale: float = 0.01,
                   connectors: ConnectorLookup | None = None, worker_here: bool = True) -> AsyncIterator[Desk]:
    async with alarms_rig(app_pool, pg_db, tmp_path, time_scale=time_scale, connectors=connectors) as alarms:
        other = uuid4()
        desk = OperatorDesk(lambda: app_pool, lambda: alarms.worker if worker_here else None, connectors)
        root = create_root_app([])
        mount_registry(root, create_registry_app(lambda: app_pool, AdminSettings(), tokens=_tokens(
            alarms.rig.tenant_id, other), extra_routes=operator_routes(desk)))
        server = TestServer(root, host="127.0.0.1", port=0)
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                yield Desk(alarms, str(server.make_url("")).rstrip("/"), session, other)
        finally:
            await server.close()


async def _until(check: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def _ringing(desk: Desk, number: str) -> None:
    async def rang() -> bool:
        return desk.alarms.calls_to(number) > 0
    await _until(rang)


# -- reading ------------------------------------------------------------------------------------------------

async def test_operators_list_their_tenants_incidents_filtered_and_paginated(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    async with desk_api(app_pool, pg_db, tmp_path) as desk:
        rig = desk.alarms.rig
        desk.alarms.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="2"))
        smoke = await desk.alarms.raise_alarm("smoke")
        assert await desk.alarms.settled(smoke) == "false_alarm"
        co = await desk.alarms.raise_alarm("co")
        assert await desk.alarms.settled(co) == "false_alarm"

        status, page = await desk.call("GET", desk.t("/incidents"))
        assert status == 200, page
        assert [i["id"] for i in page["items"]] == [str(co), str(smoke)]  # newest first
        assert (page["items"][0]["state"], page["items"][0]["scenario"]) == ("false_alarm", "smoke_co")

        status, first = await desk.call("GET", desk.t("/incidents"), params={"limit": "1"})
        assert [i["id"] for i in first["items"]] == [str(co)]
        assert first["next_after"]
        status, second = await desk.call("GET", desk.t("/incidents"),
                                         params={"limit": "1", "after": first["next_after"]})
        assert [i["id"] for i in second["items"]] == [str(smoke)]

        for params, expected in (({"state": "acknowledged"}, []), ({"state": "false_alarm"}, [co, smoke]),
                                 ({"household_id": str(rig.household_id)}, [co, smoke]),
                                 ({"household_id": str(uuid4())}, []),
                                 ({"since": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}, []),
                                 ({"until": (datetime.now(UTC) - timedelta(hours=1)).isoformat()}, [])):
            status, page = await desk.call("GET", desk.t("/incidents"), params=params)
            assert status == 200, (params, page)
            assert [i["id"] for i in page["items"]] == [str(i) for i in expected], params

        for bad in ({"state": "burning"}, {"after": "not-a-cursor"}, {"since": "2026-01-01T00:00:00"},
                    {"limit": "0"}, {"colour": "red"}):
            status, problem = await desk.call("GET", desk.t("/incidents"), params=bad)
            assert (status, problem["error_id"]) == (400, "invalid-parameter"), bad


async def test_the_timeline_shows_the_event_decisions_calls_sms_and_audit_in_time_order(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    async with desk_api(app_pool, pg_db, tmp_path) as desk:
        rig = desk.alarms.rig
        desk.alarms.script(rig.owner, TargetBehaviour.busy())
        desk.alarms.script(rig.backup, TargetBehaviour.answer(after_ms=100, dtmf="1"))
        incident = await desk.alarms.raise_alarm("smoke")
        assert await desk.alarms.settled(incident) == "acknowledged"
        await desk.alarms.rows("SELECT 1")  # chains the staged audit lines

        status, shown = await desk.call("GET", desk.t(f"/incidents/{incident}"), token="view-a")
        assert status == 200, shown
        assert shown["incident"]["state"] == "acknowledged"
        assert [e["type"] for e in shown["events"]] == ["smoke"]
        calls = {a["destination"]: a["outcome"] for a in shown["actions"] if a["kind"] == "call"}
        assert calls == {rig.owner: "busy", rig.backup: "acknowledge"}
        assert {s["msisdn"] for s in shown["sms"]} == {rig.owner, rig.backup}
        actions = [a["action"] for a in shown["audit"]]
        assert actions[0] == "incident.opened"
        assert {"incident.call", "incident.acknowledged"} <= set(actions)
        kinds = [e["kind"] for e in shown["timeline"]]
        assert kinds[0] == "event"
        assert {"decision", "call", "sms"} <= set(kinds)
        times = [e["at"] for e in shown["timeline"]]
        assert [datetime.fromisoformat(t) for t in times] == sorted(datetime.fromisoformat(t) for t in times)
        assert "payload" not in json.dumps(shown["events"])


async def test_another_tenants_incident_is_not_found_whichever_path_names_it(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    async with desk_api(app_pool, pg_db, tmp_path) as desk:
        desk.alarms.script(desk.alarms.rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="2"))
        incident = await desk.alarms.raise_alarm("smoke")
        assert await desk.alarms.settled(incident) == "false_alarm"
        for path in (desk.t(f"/incidents/{incident}"), desk.t(f"/incidents/{incident}", desk.other_tenant)):
            status, problem = await desk.call("GET", path, token="op-b")
            assert (status, problem["error_id"]) == (404, "not-found"), path
            status, problem = await desk.call("POST", path + "/reopen", token="op-b",
                                              body={"reason": "x", "resume_calls": True})
            assert (status, problem["error_id"]) == (404, "not-found"), path
        status, _ = await desk.call("GET", desk.t("/incidents"), token="op-b")
        assert status == 404
        status, problem = await desk.call("GET", desk.t(f"/incidents/{uuid4()}"))
        assert (status, problem["error_id"]) == (404, "not-found")
        status, problem = await desk.call("GET", desk.t("/incidents", uuid4()), token="admin")
        assert (status, problem["error_id"]) == (404, "not-found")  # no such tenant
        status, problem = await desk.call("POST", desk.t(f"/incidents/{incident}/reopen"), token="view-a",
                                          body={"reason": "x", "resume_calls": True})
        assert (status, problem["error_id"]) == (403, "forbidden")  # a viewer of the tenant may not decide


# -- deciding -----------------------------------------------------------------------------------------------

async def test_closing_a_ringing_incident_stops_the_escalation_as_a_key_press_does(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    async with desk_api(app_pool, pg_db, tmp_path, time_scale=1.0) as desk:
        rig = desk.alarms.rig
        desk.alarms.script(rig.owner, TargetBehaviour.no_answer())
        incident = await desk.alarms.raise_alarm("smoke")
        await _ringing(desk, rig.owner)

        status, problem = await desk.call("POST", desk.t(f"/incidents/{incident}/close"), body={})
        assert (status, problem["error_id"]) == (422, "validation-failed")  # a false alarm needs a reason
        status, closed = await desk.call("POST", desk.t(f"/incidents/{incident}/close"),
                                         body={"reason": "the owner burnt toast"})
        assert status == 200, closed
        assert closed["state"] == "false_alarm"
        assert closed["closed_at"]

        async def hung_up() -> bool:  # the owner's ringing call is ended at once, not after its 30 s
            return await desk.outcome(incident, rig.owner) is not None
        await _until(hung_up, timeout=10)
        await asyncio.sleep(0.5)
        assert desk.alarms.calls_to(rig.backup) == 0  # nobody else is called
        assert (await desk.alarms.incident(incident))["state"] == "false_alarm"

        decided = await desk.audit("incident.operator_decision")
        assert [(a["actor"], a["detail"]["decision"], a["detail"]["note"]) for a in decided] == [
            ("alice@tenant-a", "false_alarm", "the owner burnt toast")]
        assert decided[0]["correlation"]["channel"] == "admin-api"
        assert [a["actor"] for a in await desk.audit("incident.false_alarm")] == ["alice@tenant-a"]

        status, problem = await desk.call("POST", desk.t(f"/incidents/{incident}/acknowledge"), body={})
        assert (status, problem["error_id"]) == (409, "conflict")  # it has ended


async def test_acknowledging_sends_the_on_acknowledge_messages_and_reopening_calls_nobody_unless_asked(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    async with desk_api(app_pool, pg_db, tmp_path, time_scale=1.0) as desk:
        rig = desk.alarms.rig
        desk.alarms.script(rig.owner, TargetBehaviour.no_answer())
        incident = await desk.alarms.raise_alarm("smoke")
        await _ringing(desk, rig.owner)
        status, acked = await desk.call("POST", desk.t(f"/incidents/{incident}/acknowledge"),
                                        body={"note": "seen on camera"})
        assert (status, acked["state"]) == (200, "acknowledged"), acked
        acks = await desk.alarms.rows("SELECT key FROM iim.incident_action WHERE incident_id = $1 "
                                      "AND starts_with(key, $2)", incident, f"{incident}/ack/")
        assert acks  # smoke_co's on_acknowledge notification, as after a DTMF 1

        status, held = await desk.call("POST", desk.t(f"/incidents/{incident}/reopen"),
                                       body={"reason": "smoke again", "resume_calls": False})
        assert status == 200, held
        assert (held["state"], held["held"], held["deadline"], held["closed_at"]) == ("open", True, None, None)
        await asyncio.sleep(1.0)
        assert (desk.alarms.calls_to(rig.backup), desk.alarms.calls_to(rig.owner)) == (0, 1)
        status, problem = await desk.call("POST", desk.t(f"/incidents/{incident}/reopen"),
                                          body={"reason": "again", "resume_calls": True})
        assert (status, problem["error_id"]) == (409, "conflict")  # it is live

        status, closed = await desk.call("POST", desk.t(f"/incidents/{incident}/close"), body={"reason": "x"})
        assert closed["state"] == "false_alarm"
        status, resumed = await desk.call("POST", desk.t(f"/incidents/{incident}/reopen"),
                                          body={"reason": "it was real", "resume_calls": True})
        assert status == 200, resumed
        await _ringing(desk, rig.backup)  # the next group: the owner (tried) is not called again
        assert desk.alarms.calls_to(rig.owner) == 1
        reopened = await desk.audit("incident.reopened")
        assert [(a["actor"], a["detail"]["resume_calls"]) for a in reopened] == [
            ("alice@tenant-a", False), ("alice@tenant-a", True)]
        await desk.call("POST", desk.t(f"/incidents/{incident}/close"), body={"reason": "done"})


async def test_decisions_and_test_calls_are_503_where_no_scenario_worker_runs(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    async with desk_api(app_pool, pg_db, tmp_path, worker_here=False) as desk:
        rig = desk.alarms.rig
        desk.alarms.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="2"))
        incident = await desk.alarms.raise_alarm("smoke")
        assert await desk.alarms.settled(incident) == "false_alarm"
        status, shown = await desk.call("GET", desk.t(f"/incidents/{incident}"))
        assert status == 200, shown  # reads need only the database
        for path, body in ((f"/incidents/{incident}/reopen", {"reason": "x", "resume_calls": False}),
                           ("/test-calls", {"household_id": str(rig.household_id), "contact": rig.owner})):
            async with desk.session.post(desk.base + desk.t(path), json=body,
                                         headers={"Authorization": "Bearer op-a"}) as resp:
                problem = await resp.json(content_type=None)
                assert (resp.status, problem["error_id"]) == (503, "service-unavailable"), path
                assert resp.headers["Retry-After"]
        assert (await desk.alarms.incident(incident))["state"] == "false_alarm"


# -- tests --------------------------------------------------------------------------------------------------

def _originates(result: str, purpose: str) -> float:
    return REGISTRY.get_sample_value("iim_outreach_originates_total", {"result": result, "purpose": purpose}) or 0.0


async def test_a_test_call_rings_through_the_alert_path_and_reports_the_key_pressed_without_an_incident(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    async with desk_api(app_pool, pg_db, tmp_path) as desk:
        rig = desk.alarms.rig
        desk.alarms.script(rig.backup, TargetBehaviour.answer(after_ms=100, dtmf="1"))
        before = _originates("answered", "test")
        status, result = await desk.call("POST", desk.t("/test-calls"),
                                         body={"household_id": str(rig.household_id), "contact": rig.backup})
        assert status == 200, result
        assert (result["outcome"], result["digit"], result["confirmed"]) == ("answered", "1", True)
        assert result["destination"] == rig.backup
        assert desk.alarms.calls_to(rig.backup) == 1
        assert _originates("answered", "test") == before + 1
        assert await desk.alarms.rows("SELECT id FROM iim.incident") == []  # nobody else can be paged
        placed, finished = await desk.audit("test_call.placed"), await desk.audit("test_call.finished")
        assert [a["actor"] for a in placed + finished] == ["alice@tenant-a"] * 2
        assert (finished[0]["detail"]["outcome"], finished[0]["detail"]["confirmed"]) == ("answered", True)
        assert finished[0]["correlation"]["call_id"] == result["call_id"]
        assert finished[0]["correlation"]["purpose"] == "test"

        desk.alarms.script(rig.owner, TargetBehaviour.busy())
        status, busy = await desk.call("POST", desk.t("/test-calls"), body={
            "household_id": str(rig.household_id), "contact": str(await _subscriber(desk, rig.owner))})
        assert (status, busy["outcome"], busy["confirmed"]) == (200, "busy", False)


async def _subscriber(desk: Desk, msisdn: str) -> UUID:
    rows = await desk.alarms.rows("SELECT id FROM iim.subscriber WHERE msisdn = $1", msisdn)
    return UUID(str(rows[0]["id"]))


async def test_a_test_call_is_refused_by_the_guard_and_never_reaches_a_stranger(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    async with desk_api(app_pool, pg_db, tmp_path) as desk:
        rig = desk.alarms.rig
        status, problem = await desk.call("POST", desk.t("/test-calls"),
                                          body={"household_id": str(rig.household_id), "contact": "+79990001122"})
        assert (status, problem["error_id"]) == (422, "invalid-reference")
        async with tenant_tx(app_pool, rig.tenant_id) as conn:
            await conn.execute("INSERT INTO iim.originate_limit (country_codes) VALUES ('{+44}')")
        status, refused = await desk.call("POST", desk.t("/test-calls"),
                                          body={"household_id": str(rig.household_id), "contact": rig.owner})
        assert status == 200, refused
        assert (refused["outcome"], refused["refusal_reason"]) == ("refused", "outside_plan")
        assert desk.alarms.calls_to(rig.owner) == 0
        assert [a["detail"]["reason"] for a in await desk.audit("test_call.refused")] == ["outside_plan"]
        status, problem = await desk.call("POST", desk.t("/test-calls"), token="view-a",
                                          body={"household_id": str(rig.household_id), "contact": rig.owner})
        assert (status, problem["error_id"]) == (403, "forbidden")
        status, problem = await desk.call("POST", desk.t("/test-calls"),
                                          body={"household_id": "nope", "contact": rig.owner, "extra": 1})
        assert (status, problem["error_id"]) == (422, "validation-failed")


async def test_a_test_notification_reaches_the_vendor_and_reports_its_answer(
        app_pool: Pool, pg_db: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACME_TOKEN", STATIC_TOKEN)
    monkeypatch.setenv("ACME_SIGNING", SIGNING_SECRET_TEXT)
    vendor = VendorPeer()
    runner, vendor.url = await serve(vendor.app())
    context = ConnectorContext(resolve_secret=resolve_secret, http_session=aiohttp.ClientSession, clock=StepClock())
    connectors = ConnectorRegistry(context, factories={"webhook": WebhookConnector})
    await connectors.load([{"name": "acme", "plugin": "webhook", "config": {
        "base_url": vendor.url, "paths": {"send_notification": "/notify"},
        "auth": {"kind": "bearer", "token_ref": "env:ACME_TOKEN"}, "signing_secret_ref": "env:ACME_SIGNING",
        "request_timeout_s": 0.3, "retry": {"attempts": 2, "backoff_base_s": 0.05, "backoff_max_s": 0.1}}}])
    try:
        async with desk_api(app_pool, pg_db, tmp_path, connectors=connectors) as desk:
            async with tenant_tx(app_pool, desk.tenant) as conn:
                speaker = await registry.create(conn, registry.DEVICE, DeviceCreate(
                    household_id=desk.alarms.rig.household_id, name="Cloud speaker", type=DeviceType.SPEAKER,
                    connector="acme", connector_ref="kitchen-speaker-9",
                    capabilities=frozenset({DeviceCapability.CLOUD_ANNOUNCE}), status=DeviceStatus.ONLINE),
                    actor="test")
            status, sent = await desk.call("POST", desk.t("/test-notifications"),
                                           body={"connector": "acme", "device_id": str(speaker.id), "text": "hello"})
            assert status == 200, sent
            assert (sent["delivered"], sent["vendor_message_id"], sent["error"]) == (True, "vendor-1", None)
            assert (vendor.received[0].body["target"], vendor.received[0].body["text"]) == ("kitchen-speaker-9",
                                                                                           "hello")
            vendor.script("/notify", *[("status", 503)] * 4)
            status, failed = await desk.call("POST", desk.t("/test-notifications"),
                                             body={"connector": "acme", "device_id": str(speaker.id)})
            assert status == 200, failed
            assert failed["delivered"] is False
            assert failed["error"].startswith("ConnectorUnavailable")
            lines = await desk.audit("test_notify")
            assert [(a["actor"], a["detail"]["delivered"]) for a in lines] == [("alice@tenant-a", True),
                                                                               ("alice@tenant-a", False)]
            for body in ({"connector": "other", "device_id": str(speaker.id)},
                         {"connector": "acme", "device_id": str(uuid4())}):
                status, problem = await desk.call("POST", desk.t("/test-notifications"), body=body)
                assert (status, problem["error_id"]) == (422, "invalid-reference"), body
    finally:
        await connectors.aclose()
        await vendor.close()
        await runner.cleanup()


async def test_the_cli_lists_shows_closes_reopens_and_places_a_test_call(
        app_pool: Pool, pg_db: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    async with desk_api(app_pool, pg_db, tmp_path) as desk:
        rig = desk.alarms.rig
        monkeypatch.setenv("IIM_ADMIN_TOKEN", "op-a")
        monkeypatch.setenv("IIM_TENANT", str(desk.tenant))

        async def iim(*argv: str) -> tuple[int, str, str]:
            capsys.readouterr()
            code = await asyncio.to_thread(cli.main, [*argv, "--api", desk.base])
            out = capsys.readouterr()
            return code, out.out, out.err

        desk.alarms.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="2"))
        incident = await desk.alarms.raise_alarm("smoke")
        assert await desk.alarms.settled(incident) == "false_alarm"
        await desk.alarms.rows("SELECT 1")  # chains the staged audit lines (the service's flusher does it)
        code, out, _ = await iim("incident", "list", "--state", "false_alarm")
        assert code == 0
        assert str(incident) in out
        code, out, _ = await iim("incident", "show", str(incident))
        assert code == 0
        assert "device event smoke" in out
        assert "incident.false_alarm" in out
        code, out, _ = await iim("incident", "reopen", str(incident), "--reason", "check", "--no-resume-calls",
                                 "-o", "json")
        assert code == 0
        assert json.loads(out)["held"] is True
        code, out, _ = await iim("incident", "close", str(incident), "--reason", "checked")
        assert code == 0
        code, _, err = await iim("incident", "acknowledge", str(incident))
        assert code == 1
        assert "conflict" in err

        desk.alarms.script(rig.backup, TargetBehaviour.answer(after_ms=100, dtmf="1"))
        code, out, err = await iim("test", "call", "--household", str(rig.household_id), "--contact", rig.backup)
        assert code == 0, err
        assert "confirmed" in err
        desk.alarms.script(rig.security, TargetBehaviour.busy())
        code, _, err = await iim("test", "call", "--household", str(rig.household_id), "--contact", rig.security)
        assert code == cli.EXIT_TEST_FAILED
        assert "test call: busy" in err
        assert [a["actor"] for a in await desk.audit("incident.reopened")] == ["alice@tenant-a"]
