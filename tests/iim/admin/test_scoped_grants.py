"""Brand/region-scoped grants on every household-bound route of the admin API, table-driven, against a real
PostgreSQL and a real OIDC issuer: a grant scoped to brand A reaches a household of brand A (the answer a
tenant-wide grant gets), and gets one refusal, the same body, for brand B and for an id that does not exist."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from iim.admin.api import create_registry_app, mount_registry
from iim.admin.auth import hash_token
from iim.admin.hubs import hub_command_routes
from iim.admin.incidents import operator_routes
from iim.admin.links import link_routes
from iim.admin.routes import build_routes
from iim.admin.routing import Access, Route
from iim.admin.settings import AdminSettings, OidcSettings
from iim.http import create_app as create_root_app
from iim.scenarios.operator.desk import OperatorDesk
from iot_bridge.mqtt import store as hub_store
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from tests.oidc_issuer import AUDIENCE, running_issuer
from tests.pg import PgDatabase, create_tenant

pytestmark = pytest.mark.asyncio(loop_scope="module")

SCENARIO = {"trigger": {"event_types": ["smoke"]}, "steps": [{"action": "sms", "to": "owner", "text": "smoke"}]}


def _extra_routes(app_pool: Pool) -> tuple[Route, ...]:
    desk = OperatorDesk(lambda: app_pool, lambda: None, None)
    return (*operator_routes(desk), *link_routes(lambda: None), *hub_command_routes(lambda: None))


@dataclass
class Home:
    """The rows of one household (or, for ``unknown``, ids that name nothing)."""

    hh: str
    spare: str  # a household to delete
    fresh: str  # a household with no policy yet
    dev: str
    dev_spare: str
    hub: str
    bind: str
    bind_spare: str
    free_sub: str
    pol: str
    scen: str
    scen_spare: str
    sia: str
    sia_spare: str
    inc: str
    cmd: str = "c-1"
    brand: str = ""
    n: int = field(default=0)

    def tag(self) -> str:
        self.n += 1
        return f"{self.hub}-{self.n}"


@dataclass
class Rig:
    base: str
    session: aiohttp.ClientSession
    tenant: UUID
    scoped: str  # operator scoped to brand A
    wide: str  # operator of the whole tenant
    a: Home
    b: Home
    unknown: Home

    async def call(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        async with self.session.request(method, f"{self.base}/v1/tenants/{self.tenant}{path}", headers=headers,
                                        json=body) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> str:
    async with session.post(url, json=body, headers={"Authorization": "Bearer boot"}) as resp:
        answer = await resp.json()
        assert resp.status == 201, answer
        return str(answer["id"])


async def _home(app_pool: Pool, session: aiohttp.ClientSession, base: str, tenant: UUID, brand: str,
                tag: str) -> Home:
    async def post(tail: str, body: dict[str, Any]) -> str:
        return await _post(session, f"{base}/v1/tenants/{tenant}{tail}", body)

    def household() -> dict[str, Any]:
        return {"name": f"home-{uuid4().hex[:8]}", "time_zone": "Europe/Moscow", "brand_id": brand}

    hh, spare, fresh = [await post("/households", household()) for _ in range(3)]
    dev = await post("/devices", {"household_id": hh, "name": "hub", "type": "hub", "external_id": f"hub-{tag}"})
    dev_spare = await post("/devices", {"household_id": hh, "name": "spare", "type": "sensor"})
    subs = [await post("/subscribers", {"msisdn": f"+7903555{tag}{i:02d}"}) for i in range(3)]
    bind = await post("/bindings", {"subscriber_id": subs[0], "household_id": hh, "role": "owner"})
    bind_spare = await post("/bindings", {"subscriber_id": subs[1], "household_id": hh, "role": "member"})
    pol = await post("/policies", {"household_id": hh})
    scen = await post("/scenarios", {"name": f"smoke-{tag}", "household_id": hh, **SCENARIO})
    scen_spare = await post("/scenarios", {"name": f"spare-{tag}", "household_id": hh, **SCENARIO})
    sia = await post("/sia-accounts", {"account": f"A{tag}1", "device_id": dev})
    sia_spare = await post("/sia-accounts", {"account": f"A{tag}2", "device_id": dev})
    async with tenant_tx(app_pool, tenant) as conn:
        inc = await conn.fetchval("INSERT INTO iim.incident (household_id, device_id, hazard, first_event_id) "
                                  "VALUES ($1, $2, 'smoke', $3) RETURNING id", UUID(hh), UUID(dev), f"ev-{tag}")
        assert await hub_store.insert_command(conn, UUID(dev), "c-1", "arm", {}, "test") is not None
    return Home(hh, spare, fresh, dev, dev_spare, f"hub-{tag}", bind, bind_spare, subs[2], pol, scen, scen_spare,
                sia, sia_spare, str(inc), brand=brand)


def _unknown() -> Home:
    ids = [str(uuid4()) for _ in range(14)]
    return Home(*ids[:5], "hub-nobody", *ids[5:], brand=str(uuid4()))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(pg_db: PgDatabase, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tokens_file = tmp_path_factory.mktemp("tokens") / "tokens.json"
    tokens_file.write_text(json.dumps({hash_token("boot"): {"actor": "root@noc", "role": "admin"}}))
    app_pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=4)
    async with running_issuer() as issuer:
        root = create_root_app([])
        mount_registry(root, create_registry_app(
            lambda: app_pool, AdminSettings(tokens_ref=f"file:{tokens_file}", tokens_check_interval_s=0),
            oidc=OidcSettings(issuer=issuer.url, audience=AUDIENCE), extra_routes=_extra_routes(app_pool)))
        server = TestServer(root, host="127.0.0.1", port=0)
        await server.start_server()
        session = aiohttp.ClientSession()
        try:
            base = str(server.make_url("")).rstrip("/")
            tenant = await create_tenant(app_pool, "Scoped")
            brand_a, brand_b = [await _post(session, f"{base}/v1/tenants/{tenant}/brands", {"name": name})
                                for name in ("Alpha", "Beta")]
            a = await _home(app_pool, session, base, tenant, brand_a, "10")
            b = await _home(app_pool, session, base, tenant, brand_b, "20")
            scoped = issuer.token("ann", [{"role": "operator", "tenant": str(tenant), "brand": brand_a}])
            wide = issuer.token("wes", [{"role": "operator", "tenant": str(tenant)}])
            yield Rig(base, session, tenant, scoped, wide, a, b, _unknown())
        finally:
            await session.close()
            await server.close()
            await app_pool.close()


Body = Callable[[Home], Any] | None


@dataclass(frozen=True)
class Case:
    operation: str
    method: str
    path: Callable[[Home], str]
    ok: int  # the answer once the guard lets the request through (no worker, linking or broker here: 503s)
    body: Body = None


#: Every household-bound route; DELETEs last (they remove the rows they name).
CASES: tuple[Case, ...] = (
    Case("listHouseholds", "GET", lambda h: f"/households?brand_id={h.brand}", 200),
    Case("createHousehold", "POST", lambda h: "/households", 201,
         lambda h: {"name": f"new-{uuid4().hex[:6]}", "time_zone": "Europe/Moscow", "brand_id": h.brand}),
    Case("getHousehold", "GET", lambda h: f"/households/{h.hh}", 200),
    Case("updateHousehold", "PATCH", lambda h: f"/households/{h.hh}", 200, lambda h: {"name": "renamed"}),
    Case("getHouseholdPresence", "GET", lambda h: f"/households/{h.hh}/presence", 200),
    Case("putHouseholdPresence", "PUT", lambda h: f"/households/{h.hh}/presence", 200,
         lambda h: {"subject": "kid", "state": "home", "ttl_s": 600}),
    Case("deleteHouseholdPresence", "DELETE", lambda h: f"/households/{h.hh}/presence?subject=kid", 200),
    Case("startAccountLink", "POST", lambda h: f"/households/{h.hh}/connectors/acme/links", 503,
         lambda h: {"scopes": ["read_events"]}),
    Case("getAccountLink", "GET", lambda h: f"/households/{h.hh}/connectors/acme/links", 503),
    Case("revokeAccountLink", "DELETE", lambda h: f"/households/{h.hh}/connectors/acme/links", 503),
    Case("listDevices", "GET", lambda h: f"/devices?household_id={h.hh}", 200),
    Case("createDevice", "POST", lambda h: "/devices", 201,
         lambda h: {"household_id": h.hh, "name": "lamp", "type": "sensor"}),
    Case("getDevice", "GET", lambda h: f"/devices/{h.dev}", 200),
    Case("updateDevice", "PATCH", lambda h: f"/devices/{h.dev}", 200, lambda h: {"name": "hub 2"}),
    Case("listBindings", "GET", lambda h: f"/bindings?household_id={h.hh}", 200),
    Case("createBinding", "POST", lambda h: "/bindings", 201,
         lambda h: {"subscriber_id": h.free_sub, "household_id": h.hh, "role": "member"}),
    Case("getBinding", "GET", lambda h: f"/bindings/{h.bind}", 200),
    Case("updateBinding", "PATCH", lambda h: f"/bindings/{h.bind}", 200, lambda h: {"priority": 3}),
    Case("createPolicy", "POST", lambda h: "/policies", 201, lambda h: {"household_id": h.fresh}),
    Case("getPolicy", "GET", lambda h: f"/policies/{h.pol}", 200),
    Case("updatePolicy", "PATCH", lambda h: f"/policies/{h.pol}", 200, lambda h: {"dnd": True}),
    Case("listScenarios", "GET", lambda h: f"/scenarios?household_id={h.hh}", 200),
    Case("createScenario", "POST", lambda h: "/scenarios", 201,
         lambda h: {"name": f"new-{h.tag()}", "household_id": h.hh, **SCENARIO}),
    Case("getScenario", "GET", lambda h: f"/scenarios/{h.scen}", 200),
    Case("updateScenario", "PATCH", lambda h: f"/scenarios/{h.scen}", 200, lambda h: {"enabled": True}),
    Case("listSiaAccounts", "GET", lambda h: f"/sia-accounts?device_id={h.dev}", 200),
    Case("createSiaAccount", "POST", lambda h: "/sia-accounts", 201,
         lambda h: {"account": f"B{h.tag().replace('hub-', '').replace('-', '')}", "device_id": h.dev}),
    Case("getSiaAccount", "GET", lambda h: f"/sia-accounts/{h.sia}", 200),
    Case("updateSiaAccount", "PATCH", lambda h: f"/sia-accounts/{h.sia}", 200, lambda h: {"enabled": False}),
    Case("listIncidents", "GET", lambda h: f"/incidents?household_id={h.hh}", 200),
    Case("getIncident", "GET", lambda h: f"/incidents/{h.inc}", 200),
    Case("acknowledgeIncident", "POST", lambda h: f"/incidents/{h.inc}/acknowledge", 503, lambda h: {}),
    Case("closeIncident", "POST", lambda h: f"/incidents/{h.inc}/close", 503, lambda h: {"reason": "drill"}),
    Case("reopenIncident", "POST", lambda h: f"/incidents/{h.inc}/reopen", 503, lambda h: {"reason": "again", "resume_calls": False}),
    Case("placeTestCall", "POST", lambda h: "/test-calls", 503,
         lambda h: {"household_id": h.hh, "contact": h.bind}),
    Case("sendTestNotification", "POST", lambda h: "/test-notifications", 422,
         lambda h: {"connector": "acme", "device_id": h.dev}),
    Case("sendHubCommand", "POST", lambda h: f"/hubs/{h.hub}/commands", 503, lambda h: {"id": "c-2", "name": "arm"}),
    Case("listHubCommands", "GET", lambda h: f"/hubs/{h.hub}/commands", 200),
    Case("getHubCommand", "GET", lambda h: f"/hubs/{h.hub}/commands/{h.cmd}", 200),
    Case("deleteSiaAccount", "DELETE", lambda h: f"/sia-accounts/{h.sia_spare}", 204),
    Case("deleteScenario", "DELETE", lambda h: f"/scenarios/{h.scen_spare}", 204),
    Case("deletePolicy", "DELETE", lambda h: f"/policies/{h.pol}", 204),
    Case("deleteBinding", "DELETE", lambda h: f"/bindings/{h.bind_spare}", 204),
    Case("deleteDevice", "DELETE", lambda h: f"/devices/{h.dev_spare}", 204),
    Case("deleteHousehold", "DELETE", lambda h: f"/households/{h.spare}", 204),
)

#: Routes about no single household: a scoped grant is refused there, whatever it asks.
TENANT_WIDE = frozenset({
    "getTenant", "listAudit", "verifyAudit", "verifyAuditHeads", "listPolicies", "eraseSubscriber",
    *(f"{verb}{noun}" for verb in ("list", "create", "get", "update", "delete", "revoke") for noun in (
        "Brands", "Brand", "Regions", "Region", "Subscribers", "Subscriber", "Consents", "Consent",
        "CredentialRefs", "CredentialRef", "OriginateLimits", "OriginateLimit", "OriginateAllows", "OriginateAllow",
        "NumberingPlans", "NumberingPlan", "RetentionPolicies", "RetentionPolicy")),
    "grantConsent", "addOriginateAllow", "setOriginateLimit", "setNumberingPlan", "setRetentionPolicy",
})


def _tenant_routes() -> list[Route]:
    return [r for r in (*build_routes(), *_extra_routes(None))  # type: ignore[arg-type]
            if "{tenant_id}" in r.path and r.access is not Access.ADMIN]


async def test_every_household_route_is_in_the_matrix_and_every_other_is_tenant_wide() -> None:
    """A new route must say how a scoped grant finds its household (and join CASES), or be tenant-wide."""
    cases = {c.operation for c in CASES}
    routes = {r.operation_id: r for r in _tenant_routes()}
    scoped = {op for op, r in routes.items() if r.scope is not None or r.household_scoped}
    assert scoped == cases, (scoped ^ cases)
    assert set(routes) - cases <= TENANT_WIDE, set(routes) - cases - TENANT_WIDE


def _refusal(status: int, body: Any) -> tuple[int, str]:
    assert isinstance(body, dict), (status, body)
    return status, json.dumps({k: v for k, v in body.items() if k != "instance"}, sort_keys=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.operation)
async def test_brand_scoped_grant_reaches_its_brand_and_is_refused_the_same_elsewhere(rig: Rig, case: Case) -> None:
    refusals = set()
    for home in (rig.b, rig.unknown):
        status, body = await rig.call(case.method, case.path(home), rig.scoped, case.body and case.body(home))
        assert status in (403, 404), (case.operation, home is rig.unknown, status, body)
        refusals.add(_refusal(status, body))
    assert len(refusals) == 1, refusals  # no existence oracle: brand B and nothing answer alike
    (status, text), = refusals
    expected = (404, "no such row") if status == 404 else (403, "forbidden")
    assert (status, json.loads(text)["detail" if status == 404 else "error_id"]) == expected

    status, body = await rig.call(case.method, case.path(rig.a), rig.scoped, case.body and case.body(rig.a))
    assert status == case.ok, (case.operation, body)
    status, body = await rig.call(case.method, case.path(rig.b), rig.wide, case.body and case.body(rig.b))
    assert status == case.ok, (case.operation, "tenant-wide", body)  # a tenant-wide grant is unaffected


async def test_scoped_grant_cannot_move_rows_out_of_its_brand_nor_make_them_tenant_wide(rig: Rig) -> None:
    for path, body in ((f"/households/{rig.a.hh}", {"brand_id": rig.b.brand}),
                       (f"/households/{rig.a.hh}", {"brand_id": None}),
                       (f"/scenarios/{rig.a.scen}", {"household_id": rig.b.hh}),
                       (f"/scenarios/{rig.a.scen}", {"household_id": None}),
                       (f"/sia-accounts/{rig.a.sia}", {"device_id": rig.b.dev}),
                       ("/scenarios", {"name": "everyone", **SCENARIO}),
                       ("/bindings", {"subscriber_id": rig.a.free_sub, "household_id": rig.a.hh,
                                      "device_id": rig.b.dev, "role": "member"})):
        status, answer = await rig.call("PATCH" if "/" in path[1:] else "POST", path, rig.scoped, body)
        assert (status, answer["error_id"]) == (403, "forbidden"), (path, body, answer)
    status, answer = await rig.call("PATCH", f"/scenarios/{rig.a.scen}", rig.scoped, {"household_id": rig.a.fresh})
    assert status == 200, answer  # within its brand: allowed
    status, answer = await rig.call("PATCH", f"/households/{rig.a.hh}", rig.scoped, {"brand_id": rig.a.brand})
    assert status == 200, answer
