"""Scenarios in the registry: repository CRUD with audit rows, the admin API (422 for a bad definition) and
``iim scenario ...`` (CRUD, templates install, simulate from the database), against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from pydantic import JsonValue

from iim import cli as iim_cli
from iim.admin import cli as admin_cli
from iim.admin.api import create_registry_app, mount_registry
from iim.admin.auth import TokenTable, hash_token
from iim.http import create_app as create_root_app
from iim.scenarios import registry as scenario_registry
from iim.scenarios.model import Scenario
from iim.scenarios.templates import TEMPLATES
from policy_cache import audit, registry
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from policy_cache.errors import InvalidData, NotFound, VersionConflict
from policy_cache.models import (
    BindingCreate,
    BindingRole,
    DeviceCapability,
    DeviceCreate,
    DeviceStatus,
    DeviceType,
    HouseholdCreate,
    PresenceState,
    ScenarioCreate,
    ScenarioUpdate,
    SubscriberCreate,
)
from tests.pg import PgDatabase, create_tenant

pytestmark = pytest.mark.asyncio(loop_scope="module")

ACTOR = "operator:alice"
TOKEN = "scenario-admin-token"


@dataclass
class Live:
    url: str
    pool: Pool
    tenant: UUID
    session: aiohttp.ClientSession

    def path(self, tail: str) -> str:
        return f"{self.url}/v1/tenants/{self.tenant}{tail}"

    async def call(self, method: str, tail: str, body: Any = None,
                   params: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.session.request(method, self.path(tail), json=body, params=params,
                                        headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(pg_db: PgDatabase) -> AsyncIterator[Live]:
    pool: Pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=4)
    directory: Pool = await connect_pool(pg_db.cache_url, role=DbRole.CACHE, min_size=1, max_size=2)
    tenant = await create_tenant(pool, "scenario tenant")
    table = {hash_token(TOKEN): {"actor": "root@noc", "role": "admin"}}
    root = create_root_app([])
    mount_registry(root, create_registry_app(lambda: pool, directory_pool=lambda: directory,
                                             tokens=TokenTable.from_json(json.dumps(table))))
    server = TestServer(root, host="127.0.0.1", port=0)
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        yield Live(str(server.make_url("")).rstrip("/"), pool, tenant, session)
    finally:
        await session.close()
        await server.close()
        await pool.close()
        await directory.close()


def _msisdn() -> str:
    return "+7912" + str(uuid4().int)[:7]


def _definition(template: str, **changes: Any) -> dict[str, Any]:
    data = TEMPLATES[template].model_dump(mode="json")
    data.update(changes)
    return data


async def _household(live: Live, name: str = "Flat 7") -> UUID:
    async with tenant_tx(live.pool, live.tenant) as conn:
        home = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(name=name, time_zone="Europe/Moscow"),
                                     actor=ACTOR)
    return home.id


# -- repository ---------------------------------------------------------------------------------------------

async def test_repository_crud_writes_one_audit_row_per_change(live: Live) -> None:
    home = await _household(live)
    async with tenant_tx(live.pool, live.tenant) as conn:
        definition = _definition("smoke_co", name="smoke flat 7")
        del definition["enabled"]  # a new scenario is inert until enabled
        data = ScenarioCreate.model_validate({**definition, "household_id": home}, strict=False)
        made = await scenario_registry.create_scenario(conn, data, actor=ACTOR)
        assert (made.name, made.household_id, made.enabled, made.version) == ("smoke flat 7", home, False, 1)
        assert made.steps == _definition("smoke_co")["steps"]
        entry = (await audit.entries(conn, limit=1))[0]
        assert (entry.action, entry.entity, entry.entity_id, entry.actor) == (
            "scenario.create", "scenario", str(made.id), ACTOR)
        assert entry.detail["after"]["name"] == "smoke flat 7"
        assert entry.detail["after"]["on_acknowledge"] == _definition("smoke_co")["on_acknowledge"]

        assert await scenario_registry.get_scenario(conn, made.id) == made
        assert await scenario_registry.get_scenario_by_name(conn, "smoke flat 7") == made
        assert [s.id for s in await scenario_registry.list_scenarios(conn, household_id=home)] == [made.id]
        assert await scenario_registry.list_scenarios(conn, household_id=home, enabled=True) == []

        enabled = await scenario_registry.update_scenario(conn, made.id, ScenarioUpdate(enabled=True), actor=ACTOR,
                                                   expected_version=1)
        assert (enabled.enabled, enabled.version) == (True, 2)
        entry = (await audit.entries(conn, limit=1))[0]
        assert (entry.action, entry.detail) == ("scenario.update", {"changed": {"enabled": {"from": False,
                                                                                           "to": True}}})
        with pytest.raises(VersionConflict):
            await scenario_registry.update_scenario(conn, made.id, ScenarioUpdate(enabled=False), actor=ACTOR,
                                             expected_version=1)
        assert Scenario.from_record(enabled) == TEMPLATES["smoke_co"].model_copy(update={"name": "smoke flat 7"})

        await scenario_registry.delete_scenario(conn, made.id, actor=ACTOR)
        assert (await audit.entries(conn, limit=1))[0].action == "scenario.delete"
        with pytest.raises(NotFound):
            await scenario_registry.get_scenario(conn, made.id)
        assert await audit.verify_chain(conn, live.tenant) is None


async def test_repository_refuses_a_definition_that_does_not_validate(live: Live) -> None:
    bad_step: dict[str, JsonValue] = {"action": "sms", "to": "owner", "text": "call {me}"}
    async with tenant_tx(live.pool, live.tenant) as conn:
        with pytest.raises(InvalidData, match=r"steps\.0\.sms\.text: Value error, unknown placeholder \{me\}"):
            await scenario_registry.create_scenario(conn, ScenarioCreate(
                name="bad", trigger={"event_types": ["smoke"]}, steps=[bad_step]), actor=ACTOR)
    async with tenant_tx(live.pool, live.tenant) as conn:
        made = await scenario_registry.create_scenario(conn, ScenarioCreate(
            name="good", trigger={"event_types": ["smoke"]}, steps=[{"action": "call", "to": "owner"}]), actor=ACTOR)
        with pytest.raises(InvalidData, match="the last"):
            await scenario_registry.update_scenario(conn, made.id, ScenarioUpdate(
                steps=[{"action": "call", "to": "owner", "with_next": True}]), actor=ACTOR)
    async with tenant_tx(live.pool, live.tenant) as conn:
        # A change to one part is checked together with the stored rest.
        with pytest.raises(InvalidData, match="trigger"):
            await scenario_registry.update_scenario(conn, made.id, ScenarioUpdate(trigger={"event_types": ["flood"]}),
                                             actor=ACTOR)


async def test_scenarios_for_a_household_come_own_first_then_tenant_wide(live: Live) -> None:
    home, other = await _household(live, "Own"), await _household(live, "Other")
    steps: list[dict[str, JsonValue]] = [{"action": "call", "to": "owner"}]
    async with tenant_tx(live.pool, live.tenant) as conn:
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=_msisdn()), actor=ACTOR)
        for name, household, subscriber, enabled in (
            ("z-own", home, None, True), ("b-own-off", home, None, False), ("a-wide", None, None, True),
            ("c-other", other, None, True), ("d-subscriber", None, sub.id, True),
        ):
            await scenario_registry.create_scenario(conn, ScenarioCreate(
                name=f"{name}-{home}", household_id=household, subscriber_id=subscriber,
                trigger={"event_types": ["smoke"]}, steps=steps, enabled=enabled), actor=ACTOR)
        found = [s.name.split("-")[0] for s in await scenario_registry.scenarios_for_household(conn, home)
                 if s.name.endswith(str(home))]
        assert found == ["z", "a"]
        found = [s.name.split("-")[0] for s in await scenario_registry.scenarios_for_household(conn, home, enabled_only=False)
                 if s.name.endswith(str(home))]
        assert found == ["b", "z", "a"]


# -- admin API ----------------------------------------------------------------------------------------------

async def test_api_crud_with_audit(live: Live) -> None:
    home = await _household(live, "API home")
    body = {**_definition("wearable_fall", name=f"wearable {home}"), "household_id": str(home), "enabled": True}
    status, made = await live.call("POST", "/scenarios", body)
    assert status == 201, made
    assert (made["household_id"], made["enabled"], made["version"]) == (str(home), True, 1)
    assert made["steps"][0]["ivr"]["digits"] == {"1": "escalate", "2": "resolved"}

    status, page = await live.call("GET", "/scenarios", params={"name": f"wearable {home}"})
    assert (status, [s["id"] for s in page["items"]]) == (200, [made["id"]])
    status, changed = await live.call("PATCH", f"/scenarios/{made['id']}",
                                      {"conditions": [{"kind": "presence", "states": ["home"]}]},
                                      params={"expected_version": "1"})
    assert status == 200, changed
    assert (changed["conditions"], changed["version"]) == ([{"kind": "presence", "states": ["home"]}], 2)
    status, stale = await live.call("PATCH", f"/scenarios/{made['id']}", {"enabled": False},
                                    params={"expected_version": "1"})
    assert (status, stale["error_id"]) == (409, "version-conflict")

    status, trail = await live.call("GET", "/audit", params={"entity_id": made["id"]})
    assert status == 200
    assert [(r["action"], r["actor"]) for r in trail["items"]] == [("scenario.update", "root@noc"),
                                                                   ("scenario.create", "root@noc")]
    assert trail["items"][1]["correlation"]["channel"] == "admin-api"

    status, _ = await live.call("DELETE", f"/scenarios/{made['id']}")
    assert status == 204
    status, gone = await live.call("GET", f"/scenarios/{made['id']}")
    assert (status, gone["error_id"]) == (404, "not-found")


@pytest.mark.parametrize(
    ("change", "loc", "message"),
    [
        ({"steps": [{"action": "sms", "to": "owner", "text": "hi {owner_name}"}]},
         ["body", "steps", 0, "sms", "text"], "unknown placeholder {owner_name}"),
        ({"steps": [{"action": "call", "to": "owner", "ivr": {"prompt": "p", "digits": {"0x": "acknowledge"}}}]},
         ["body", "steps", 0, "call", "ivr", "digits", "0x", "[key]"], "should match pattern"),
        ({"steps": [{"action": "call", "to": "owner", "with_next": True}]}, ["body", "steps"],
         "step 0 (the last) has with_next"),
        ({"trigger": {"event_types": ["earthquake"]}}, ["body", "trigger", "event_types", 0], "Input should be"),
        ({"conditions": [{"kind": "weather", "states": ["rain"]}]}, ["body", "conditions", 0],
         "does not match any of the expected tags"),
        ({"steps": [{"action": "call", "to": "owner", "ring_s": "30"}]}, ["body", "steps", 0, "call", "ring_s"],
         "valid integer"),
    ],
)
async def test_api_answers_a_bad_scenario_with_422_and_the_location(live: Live, change: dict[str, Any],
                                                                    loc: list[Any], message: str) -> None:
    body = {**_definition("smoke_co", name=f"bad {uuid4()}"), **change}
    status, problem = await live.call("POST", "/scenarios", body)
    assert status == 422, problem
    assert problem["error_id"] == "validation-failed"
    assert any(e["loc"] == loc and message in e["msg"] for e in problem["errors"]), problem["errors"]
    status, page = await live.call("GET", "/scenarios", params={"name": body["name"]})
    assert page["items"] == []


async def test_api_refuses_a_patch_that_breaks_the_stored_scenario(live: Live) -> None:
    status, made = await live.call("POST", "/scenarios", _definition("doorphone", name=f"door {uuid4()}"))
    assert status == 201, made
    status, problem = await live.call("PATCH", f"/scenarios/{made['id']}",
                                      {"steps": [{"action": "wait", "seconds": 0}]})
    assert (status, problem["errors"][0]["loc"]) == (422, ["body", "steps", 0, "wait", "seconds"])
    status, problem = await live.call("PATCH", f"/scenarios/{made['id']}", {"name": None})
    assert (status, problem["error_id"]) == (422, "validation-failed")


# -- CLI ----------------------------------------------------------------------------------------------------

@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def iim(live: Live, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("IIM_SCENARIO_TEST_TOKEN", TOKEN)

    async def run(*argv: str) -> Result:
        capsys.readouterr()
        args = [*argv, "--api", live.url, "--token-ref", "env:IIM_SCENARIO_TEST_TOKEN", "--tenant", str(live.tenant)]
        code = await asyncio.to_thread(iim_cli.main, args)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


async def test_cli_scenario_crud(iim: Any, tmp_path: Path) -> None:
    spec = tmp_path / "leak.json"
    spec.write_text(json.dumps({"name": "leak", "trigger": {"event_types": ["water_leak"]},
                                "steps": [{"action": "notify", "text": "Water leak at {household}"}]}))
    made = await iim("scenario", "create", "--data", f"@{spec}", "--enabled", "-o", "json")
    assert made.code == 0, made.err
    row = json.loads(made.out)
    listed = await iim("scenario", "list", "--name", "leak")
    assert listed.out.splitlines()[0].split() == ["ID", "NAME", "HOUSEHOLD_ID", "SUBSCRIBER_ID", "ENABLED", "VERSION"]
    assert listed.out.splitlines()[1].split() == [row["id"], "leak", "-", "-", "True", "1"]
    bad = await iim("scenario", "update", row["id"], "--steps", '[{"action": "notify", "text": "{flat}"}]')
    assert bad.code == admin_cli.EXIT_API_ERROR
    assert "body.steps.0.notify.text: Value error, unknown placeholder {flat}" in bad.err
    gone = await iim("scenario", "delete", row["id"])
    assert gone.code == 0


async def test_cli_installs_templates_and_simulates_with_the_households_contacts(iim: Any, live: Live) -> None:
    owner, backup = _msisdn(), _msisdn()
    async with tenant_tx(live.pool, live.tenant) as conn:
        home = await registry.create(
            conn, registry.HOUSEHOLD,
            HouseholdCreate(name="Dacha", time_zone="Asia/Novosibirsk",
                            presence=PresenceState.AWAY), actor=ACTOR)
        sensor = await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=home.id, name="Hall smoke", type=DeviceType.SENSOR, status=DeviceStatus.ONLINE), actor=ACTOR)
        await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=home.id, name="Speaker", type=DeviceType.SPEAKER, sip_uri="sip:dacha-spk@iim.local",
            capabilities=frozenset({DeviceCapability.SIP})), actor=ACTOR)
        for msisdn, role, priority in ((owner, BindingRole.OWNER, 0), (backup, BindingRole.BACKUP_CONTACT, 5)):
            sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=msisdn), actor=ACTOR)
            await registry.create(conn, registry.BINDING, BindingCreate(subscriber_id=sub.id, household_id=home.id,
                                                                        role=role, priority=priority), actor=ACTOR)

    installed = await iim("scenario", "templates", "install", "--household", str(home.id), "-o", "json")
    assert installed.code == 0, installed.err
    rows = json.loads(installed.out)["items"]
    assert sorted(r["name"] for r in rows) == sorted(f"{n}@{home.id}" for n in TEMPLATES)
    assert all(r["enabled"] and r["household_id"] == str(home.id) for r in rows)
    async with tenant_tx(live.pool, live.tenant) as conn:
        stored = await scenario_registry.scenarios_for_household(conn, home.id)
        own = sorted((s for s in stored if s.household_id == home.id), key=lambda s: s.name)
        assert [Scenario.from_record(s).model_copy(update={"name": s.name.split("@")[0]}) for s in own] == [
            TEMPLATES[name] for name in sorted(TEMPLATES)]

    run = await iim("scenario", "simulate", "--name", f"smoke_co@{home.id}", "--household", str(home.id),
                    "--device", str(sensor.id), "--at", "2026-11-25T03:00", "--answer", "backup_contact=acknowledge")
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines[0] == ("scenario smoke_co@" + str(home.id) + ": smoke from sensor 'Hall smoke' at "
                        "2026-11-25T03:00:00+07:00 (Asia/Novosibirsk), presence away")
    assert f"-> call owner {owner}" in run.out
    assert f"-> sms backup_contact {backup}" in run.out
    assert "03:00." in run.out  # {time} in the household's zone
    assert lines[-1].startswith("ended acknowledged")

    door = await iim("scenario", "simulate", "--template", "doorphone", "--household", str(home.id), "-o", "json")
    assert door.code == 0, door.err
    report = json.loads(door.out)
    assert report["facts"]["home_targets"] == ["sip:dacha-spk@iim.local"]
    assert [a["destination"] for a in report["timeline"][0]["actions"]] == [owner, "sip:dacha-spk@iim.local"]

    missing = await iim("scenario", "simulate", "--name", "no such scenario")
    assert (missing.code, missing.err) == (admin_cli.EXIT_API_ERROR, "error: the tenant has no scenario named 'no such scenario'\n")
