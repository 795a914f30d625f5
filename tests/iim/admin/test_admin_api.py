"""The registry admin API against a real PostgreSQL, over a real socket, mounted as ``iim serve`` mounts it.

The root application is the service's own ``/metrics`` + ``/health`` app with the registry mounted
under ``/v1`` (``mount_registry``); requests go through aiohttp's ``TestServer`` on 127.0.0.1.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.trace import SpanKind

from iim.admin.api import OwnedPools, create_registry_app, mount_registry
from iim.admin.auth import TokenTable, hash_token
from iim.admin.settings import AdminSettings
from iim.http import create_app as create_root_app
from policy_cache.db import DbRole, Pool, connect, connect_pool
from tests.pg import PgDatabase, create_tenant
from tests.tracing_rig import Spans

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROBLEM = "application/problem+json"


@dataclass
class Api:
    base: str
    session: aiohttp.ClientSession
    tenant_a: UUID
    tenant_b: UUID
    pg: PgDatabase

    async def call(self, method: str, path: str, token: str | None = "admin", *, body: Any = None,
                   raw: bytes | None = None, headers: dict[str, str] | None = None,
                   params: dict[str, str] | None = None) -> tuple[int, Any, aiohttp.ClientResponse]:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {"headers": hdrs, "params": params}
        if body is not None:
            kwargs["json"] = body
        elif raw is not None:
            kwargs["data"] = raw
            hdrs.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.base + path, **kwargs) as resp:
            text = await resp.text()
            data = json.loads(text) if text else None
            return resp.status, data, resp

    def t(self, tenant: UUID, tail: str = "") -> str:
        return f"/v1/tenants/{tenant}{tail}"


def _tokens(tenant_a: UUID, tenant_b: UUID) -> TokenTable:
    entries = {
        "admin": {"actor": "root@noc", "role": "admin"},
        "op-a": {"actor": "alice@tenant-a", "role": "operator", "tenant": str(tenant_a)},
        "op-b": {"actor": "bob@tenant-b", "role": "operator", "tenant": str(tenant_b)},
        "view-a": {"actor": "auditor@tenant-a", "role": "viewer", "tenant": str(tenant_a)},
        "view-all": {"actor": "auditor@noc", "role": "viewer"},
    }
    return TokenTable.from_json(json.dumps({hash_token(k): v for k, v in entries.items()}))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(pg_db: PgDatabase) -> AsyncIterator[Api]:
    app_pool: Pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=4)
    cache_pool: Pool = await connect_pool(pg_db.cache_url, role=DbRole.CACHE, min_size=1, max_size=2)
    # The tenants' ids are fixed before the tokens; the tenants are created through the API below.
    tenant_a, tenant_b = uuid4(), uuid4()
    root = create_root_app([])
    registry = create_registry_app(lambda: app_pool, AdminSettings(max_body_bytes=4096),
                                   directory_pool=lambda: cache_pool, tokens=_tokens(tenant_a, tenant_b))
    mount_registry(root, registry)
    server = TestServer(root, host="127.0.0.1", port=0)
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        api = Api(str(server.make_url("")).rstrip("/"), session, tenant_a, tenant_b, pg_db)
        # The API picks a new tenant's id, but the operator tokens must name theirs up front: these two
        # are made through the registry (tenant CRUD through the API is tested below).
        await create_tenant(app_pool, "Operator A", tenant_id=tenant_a)
        await create_tenant(app_pool, "Operator B", tenant_id=tenant_b)
        yield api
    finally:
        await session.close()
        await server.close()
        await app_pool.close()
        await cache_pool.close()


async def _audit(api: Api, tenant: UUID, entity_id: str) -> list[dict[str, Any]]:
    status, page, _ = await api.call("GET", api.t(tenant, "/audit"), params={"entity_id": entity_id})
    assert status == 200, page
    items: list[dict[str, Any]] = page["items"]
    return items


def _assert_problem(status: int, body: Any, resp: aiohttp.ClientResponse, expected_status: int,
                    error_id: str) -> None:
    assert status == expected_status, body
    assert resp.content_type == PROBLEM
    assert body["error_id"] == error_id
    assert body["status"] == expected_status
    assert body["type"] == f"urn:iim:problem:{error_id}"
    assert body["title"]
    assert body["detail"]


# -- tenants ------------------------------------------------------------------------------------------------

async def test_tenant_crud_by_admin(api: Api) -> None:
    status, created, resp = await api.call("POST", "/v1/tenants", body={"name": "Brand new operator"})
    assert status == 201, created
    tid = created["id"]
    assert resp.headers["Location"] == f"/v1/tenants/{tid}"
    status, shown, _ = await api.call("GET", f"/v1/tenants/{tid}")
    assert (status, shown["name"]) == (200, "Brand new operator")
    status, page, _ = await api.call("GET", "/v1/tenants", params={"limit": "1000"})
    assert status == 200
    assert {str(api.tenant_a), str(api.tenant_b), tid} <= {t["id"] for t in page["items"]}
    status, changed, _ = await api.call("PATCH", f"/v1/tenants/{tid}", body={"name": "Renamed"})
    assert (status, changed["name"]) == (200, "Renamed")
    audit = await _audit(api, UUID(tid), tid)
    assert [(a["action"], a["actor"]) for a in audit] == [("tenant.update", "root@noc"), ("tenant.create", "root@noc")]
    assert audit[0]["detail"]["changed"]["name"] == {"from": "Brand new operator", "to": "Renamed"}
    # Deleting a tenant takes its whole registry with it (consents included); its audit log stays.
    sub = await _create(api, "subscribers", {"msisdn": _msisdn()}, tenant=UUID(tid), token="admin")
    await _create(api, "consents", {"subscriber_id": sub["id"], "purpose": "presence", "evidence": {"by": "t"}},
                  tenant=UUID(tid), token="admin")
    status, body, _ = await api.call("DELETE", f"/v1/tenants/{tid}")
    assert (status, body) == (204, None)
    status, body, resp = await api.call("GET", f"/v1/tenants/{tid}")
    _assert_problem(status, body, resp, 404, "not-found")
    status, body, resp = await api.call("GET", f"/v1/tenants/{tid}/subscribers")
    _assert_problem(status, body, resp, 404, "not-found")
    actions = [a["action"] for a in (await api.call("GET", f"/v1/tenants/{tid}/audit"))[1]["items"]]
    assert actions[0] == "tenant.delete"
    assert "consent.create" in actions


async def test_only_admin_manages_tenants(api: Api) -> None:
    for token in ("op-a", "view-all"):
        status, body, resp = await api.call("POST", "/v1/tenants", token, body={"name": "x"})
        _assert_problem(status, body, resp, 403, "forbidden")
        status, body, resp = await api.call("PATCH", f"/v1/tenants/{api.tenant_a}", token, body={"name": "x"})
        _assert_problem(status, body, resp, 403, "forbidden")
        status, body, resp = await api.call("DELETE", f"/v1/tenants/{api.tenant_a}", token)
        _assert_problem(status, body, resp, 403, "forbidden")


async def test_tenant_listing_is_scoped_to_the_token(api: Api) -> None:
    status, page, _ = await api.call("GET", "/v1/tenants", "op-a")
    assert status == 200
    assert [t["id"] for t in page["items"]] == [str(api.tenant_a)]
    status, page, _ = await api.call("GET", "/v1/tenants", "view-all", params={"limit": "1000"})
    assert {str(api.tenant_a), str(api.tenant_b)} <= {t["id"] for t in page["items"]}
    status, body, resp = await api.call("GET", f"/v1/tenants/{api.tenant_b}", "op-a")
    _assert_problem(status, body, resp, 403, "forbidden")


# -- full CRUD per entity -----------------------------------------------------------------------------------

async def _create(api: Api, plural: str, body: dict[str, Any], tenant: UUID | None = None,
                  token: str = "op-a") -> dict[str, Any]:
    tenant = tenant or api.tenant_a
    status, created, resp = await api.call("POST", api.t(tenant, f"/{plural}"), token, body=body)
    assert status == 201, created
    assert resp.headers["Location"] == f"/v1/tenants/{tenant}/{plural}/{created['id']}"
    row: dict[str, Any] = created
    return row


def _msisdn() -> str:
    return "+7900" + str(uuid4().int)[:7]


async def _fixtures(api: Api) -> dict[str, str]:
    home = await _create(api, "households", {"name": "Home", "time_zone": "Europe/Moscow"})
    sub = await _create(api, "subscribers", {"msisdn": _msisdn()})
    dev = await _create(api, "devices", {"household_id": home["id"], "name": "Speaker", "type": "speaker"})
    return {"household_id": home["id"], "subscriber_id": sub["id"], "device_id": dev["id"]}


CRUD = [
    ("brands", lambda f: {"name": f"Brand {uuid4().hex[:6]}"}, None),
    ("regions", lambda f: {"name": f"Region {uuid4().hex[:6]}"}, None),
    ("households", lambda f: {"name": "Dacha", "time_zone": "Asia/Novosibirsk", "presence": "away"},
     {"presence": "home", "external_id": "ext-1"}),
    ("subscribers", lambda f: {"msisdn": _msisdn(), "sip_aor": f"sip:{uuid4().hex[:8]}@iim.local"},
     {"display_name": "Ivan", "sip_aor": None}),
    ("devices", lambda f: {"household_id": f["household_id"], "name": "Hub", "type": "hub",
                           "capabilities": ["sip", "tts"], "connector": "webhook", "connector_ref": uuid4().hex},
     {"status": "online", "enabled": False, "capabilities": []}),
    ("bindings", lambda f: {"subscriber_id": f["subscriber_id"], "household_id": f["household_id"],
                            "device_id": f["device_id"], "role": "member"},
     {"role": "backup_contact", "priority": 5}),
    ("policies", lambda f: {"subscriber_id": f["subscriber_id"], "ring_mode": "simultaneous",
                            "quiet_start": "23:00:00", "quiet_end": "07:00:00", "allowed_callers": ["+79001112233"]},
     {"dnd": True, "phone_timeout_s": 45}),
    ("credential-refs", lambda f: {"name": f"cred-{uuid4().hex[:6]}", "kind": "api_key", "ref": "env:OEM_KEY"},
     {"ref": "vault:kv/oem#key", "description": "rotated"}),
    ("originate-limits", lambda f: {"max_concurrent": 2, "max_per_hour": 50, "country_codes": ["+7", "+375"]},
     {"max_concurrent": 5, "country_codes": None}),
    ("originate-allows", lambda f: {"prefix": "+44" + str(uuid4().int)[:8], "note": "UK office, ticket 12"}, None),
    ("numbering-plans", lambda f: {"country_code": "7", "trunk_prefix": "8", "international_prefixes": ["810", "00"],
                                   "national_lengths": [10]},
     {"international_prefixes": ["00"]}),
]


@pytest.mark.parametrize(("plural", "make", "patch"), CRUD, ids=[c[0] for c in CRUD])
async def test_full_crud(api: Api, plural: str, make: Any, patch: dict[str, Any] | None) -> None:
    deps = await _fixtures(api)
    body = make(deps)
    created = await _create(api, plural, body)
    for key, value in body.items():
        assert created[key] == value or sorted(created[key]) == sorted(value), key
    assert created["tenant_id"] == str(api.tenant_a)
    path = api.t(api.tenant_a, f"/{plural}/{created['id']}")
    status, shown, _ = await api.call("GET", path, "view-a")
    assert (status, shown) == (200, created)
    status, page, _ = await api.call("GET", api.t(api.tenant_a, f"/{plural}"), "view-a", params={"limit": "1000"})
    assert created["id"] in {row["id"] for row in page["items"]}
    if patch is not None:
        status, changed, _ = await api.call("PATCH", path, body=patch)
        assert status == 200, changed
        for key, value in patch.items():
            assert changed[key] == value, key
        assert changed["updated_at"] >= created["updated_at"]
    else:
        status, body_, resp = await api.call("PATCH", path, body={"name": "x"})
        _assert_problem(status, body_, resp, 405, "method-not-allowed")
        assert "DELETE" in resp.headers["Allow"]
    status, gone, _ = await api.call("DELETE", path)
    assert (status, gone) == (204, None)
    status, body_, resp = await api.call("GET", path)
    _assert_problem(status, body_, resp, 404, "not-found")
    status, body_, resp = await api.call("DELETE", path)
    _assert_problem(status, body_, resp, 404, "not-found")
    # The admin's changes are audited under the admin, the operator's under the operator.
    entity = plural.rstrip("s").replace("-", "_").replace("policie", "policy")
    actions = [(a["action"], a["actor"]) for a in await _audit(api, api.tenant_a, created["id"])]
    expected = [(f"{entity}.delete", "root@noc"), (f"{entity}.create", "alice@tenant-a")]
    if patch is not None:
        expected.insert(1, (f"{entity}.update", "root@noc"))
    assert actions == expected


async def test_pagination_by_keyset(api: Api) -> None:
    tenant = (await api.call("POST", "/v1/tenants", body={"name": "Paged"}))[1]["id"]
    ids = set()
    for i in range(5):
        status, row, _ = await api.call("POST", f"/v1/tenants/{tenant}/regions", body={"name": f"R{i}"})
        ids.add(row["id"])
    seen: list[str] = []
    params = {"limit": "2"}
    while True:
        status, page, _ = await api.call("GET", f"/v1/tenants/{tenant}/regions", params=params)
        assert status == 200
        assert len(page["items"]) <= 2
        seen += [r["id"] for r in page["items"]]
        if page["next_after"] is None:
            break
        params = {"limit": "2", "after": page["next_after"]}
    assert seen == sorted(ids, key=lambda s: UUID(s).int)
    status, body, resp = await api.call("GET", f"/v1/tenants/{tenant}/regions", params={"limit": "0"})
    _assert_problem(status, body, resp, 400, "invalid-parameter")
    assert body["errors"][0]["loc"] == ["query", "limit"]
    status, body, resp = await api.call("GET", f"/v1/tenants/{tenant}/regions", params={"colour": "red"})
    _assert_problem(status, body, resp, 400, "invalid-parameter")
    assert body["errors"][0]["loc"] == ["query", "colour"]


async def test_list_filters(api: Api) -> None:
    deps = await _fixtures(api)
    other = await _fixtures(api)
    status, page, _ = await api.call("GET", api.t(api.tenant_a, "/devices"),
                                     params={"household_id": deps["household_id"]})
    assert [d["id"] for d in page["items"]] == [deps["device_id"]]
    status, sub, _ = await api.call("GET", api.t(api.tenant_a, f"/subscribers/{other['subscriber_id']}"))
    status, page, _ = await api.call("GET", api.t(api.tenant_a, "/subscribers"), params={"msisdn": sub["msisdn"]})
    assert [s["id"] for s in page["items"]] == [other["subscriber_id"]]
    status, body, resp = await api.call("GET", api.t(api.tenant_a, "/subscribers"), params={"msisdn": "123"})
    _assert_problem(status, body, resp, 400, "invalid-parameter")


# -- validation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("plural", "body", "loc", "err_type"),
    [
        ("subscribers", {"msisdn": "8 900 123-45-6x"}, ["body", "msisdn"], "string_pattern_mismatch"),
        ("subscribers", {"msisdn": "+79001234567", "colour": "red"}, ["body", "colour"], "extra_forbidden"),
        ("households", {"name": "H", "time_zone": "Mars/Olympus_Mons"}, ["body", "time_zone"], "value_error"),
        ("households", {"name": "H", "time_zone": "MSK"}, ["body", "time_zone"], "value_error"),
        ("households", {"name": "H"}, ["body", "time_zone"], "missing"),
        ("households", {"name": "H", "time_zone": "UTC", "home_networks": ["192.0.2.0/24", "home wifi"]},
         ["body", "home_networks", 1], "value_error"),
        ("households", {"name": "H", "time_zone": "UTC", "home_networks": "192.0.2.0/24"},
         ["body", "home_networks"], "list_type"),
        ("devices", {"household_id": str(uuid4()), "name": "D", "type": "hub", "presence_hint": "yes"},
         ["body", "presence_hint"], "bool_type"),
        ("devices", {"household_id": str(uuid4()), "name": "D", "type": "toaster"}, ["body", "type"], "enum"),
        ("devices", {"household_id": "nope", "name": "D", "type": "hub"}, ["body", "household_id"], "uuid_parsing"),
        ("bindings", {"subscriber_id": str(uuid4()), "household_id": str(uuid4()), "role": "member",
                      "priority": "5"}, ["body", "priority"], "int_type"),
        ("policies", {"household_id": str(uuid4()), "allowed_callers": ["+7 900 12x"]},
         ["body", "allowed_callers", 0], "string_pattern_mismatch"),
        ("policies", {"household_id": str(uuid4()), "blocked_callers": ["+79001234567", "+7 900 123"]},
         ["body", "blocked_callers", 1], "not_a_number"),
        ("consents", {"subscriber_id": str(uuid4()), "purpose": "read_sms", "evidence": {}},
         ["body", "evidence"], "too_short"),
    ],
)
async def test_validation_errors_are_problems_with_locations(
    api: Api, plural: str, body: dict[str, Any], loc: list[Any], err_type: str
) -> None:
    status, problem, resp = await api.call("POST", api.t(api.tenant_a, f"/{plural}"), body=body)
    _assert_problem(status, problem, resp, 422, "validation-failed")
    assert {"loc": loc, "msg": problem["errors"][0]["msg"], "type": err_type} in problem["errors"], problem
    assert "input" not in problem["errors"][0]  # the offending value is never echoed back


async def test_policy_model_rules(api: Api) -> None:
    deps = await _fixtures(api)
    status, problem, resp = await api.call("POST", api.t(api.tenant_a, "/policies"), body={
        "subscriber_id": deps["subscriber_id"], "household_id": deps["household_id"]})
    _assert_problem(status, problem, resp, 422, "validation-failed")
    assert "exactly one of" in problem["errors"][0]["msg"]


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "error_id"),
    [
        (b"{", "application/json", 400, "malformed-request"),
        (b'{"msisdn": "+79001234567", "msisdn": "+79001234568"}', "application/json", 400, "malformed-request"),
        (b'["+79001234567"]', "application/json", 400, "malformed-request"),
        (b'{"msisdn": NaN}', "application/json", 400, "malformed-request"),
        (b"msisdn=+79001234567", "application/x-www-form-urlencoded", 415, "unsupported-media-type"),
        (b'{"msisdn": "' + b"9" * 5000 + b'"}', "application/json", 413, "body-too-large"),
    ],
)
async def test_malformed_bodies(api: Api, raw: bytes, content_type: str, status: int, error_id: str) -> None:
    got, problem, resp = await api.call("POST", api.t(api.tenant_a, "/subscribers"), raw=raw,
                                        headers={"Content-Type": content_type})
    _assert_problem(got, problem, resp, status, error_id)


async def test_body_limit_holds_without_content_length(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"msisdn": "'
        for _ in range(10):
            yield b"9" * 1000
        yield b'"}'

    async with api.session.post(api.base + api.t(api.tenant_a, "/subscribers"), data=chunks(),
                                headers={"Authorization": "Bearer admin", "Content-Type": "application/json"}) as resp:
        assert resp.status == 413
        assert (await resp.json(content_type=PROBLEM))["error_id"] == "body-too-large"


# -- not found, conflicts, references -----------------------------------------------------------------------

async def test_not_found_cases(api: Api) -> None:
    for path in (api.t(api.tenant_a, f"/households/{uuid4()}"), api.t(api.tenant_a, "/households/not-a-uuid"),
                 f"/v1/tenants/{uuid4()}/households", "/v1/tenants/zzz/households", "/v1/nothing-here"):
        status, body, resp = await api.call("GET", path)
        _assert_problem(status, body, resp, 404, "not-found")
    status, body, resp = await api.call("POST", f"/v1/tenants/{uuid4()}/regions", body={"name": "R"})
    _assert_problem(status, body, resp, 404, "not-found")


async def test_unsupported_method_is_405_with_allow(api: Api) -> None:
    status, body, resp = await api.call("PUT", "/v1/tenants", body={"name": "x"})
    _assert_problem(status, body, resp, 405, "method-not-allowed")
    assert set(resp.headers["Allow"].split(", ")) >= {"GET", "POST"}


async def test_duplicate_msisdn_conflicts_within_a_tenant_only(api: Api) -> None:
    msisdn = _msisdn()
    await _create(api, "subscribers", {"msisdn": msisdn})
    status, problem, resp = await api.call("POST", api.t(api.tenant_a, "/subscribers"), body={"msisdn": msisdn})
    _assert_problem(status, problem, resp, 409, "conflict")
    assert problem["errors"] == [{"loc": ["body", "msisdn"], "msg": "already taken in this tenant", "type": "unique"}]
    other = await _create(api, "subscribers", {"msisdn": msisdn}, tenant=api.tenant_b, token="op-b")
    assert other["msisdn"] == msisdn
    assert other["tenant_id"] == str(api.tenant_b)


async def test_a_device_external_id_names_one_device_per_tenant(api: Api) -> None:
    """The bridge finds an event's device by this id: a second device with it would make the signer ambiguous."""
    home = await _create(api, "households", {"name": "Home", "time_zone": "Europe/Moscow"})
    ext = f"smoke-{uuid4().hex[:8]}"
    await _create(api, "devices", {"household_id": home["id"], "name": "Smoke", "type": "sensor", "external_id": ext})
    status, problem, resp = await api.call("POST", api.t(api.tenant_a, "/devices"), body={
        "household_id": home["id"], "name": "CO", "type": "sensor", "external_id": ext})
    _assert_problem(status, problem, resp, 409, "conflict")
    assert problem["errors"] == [{"loc": ["body", "external_id"], "msg": "already taken in this tenant",
                                  "type": "unique"}]


async def test_references_must_exist_in_the_same_tenant(api: Api) -> None:
    deps_b = await _fixtures_in(api, api.tenant_b, "op-b")
    status, problem, resp = await api.call("POST", api.t(api.tenant_a, "/devices"), "op-a", body={
        "household_id": deps_b["household_id"], "name": "Sneaky", "type": "hub"})
    _assert_problem(status, problem, resp, 422, "invalid-reference")
    deps_a = await _fixtures(api)
    status, problem, resp = await api.call("POST", api.t(api.tenant_a, "/bindings"), "op-a", body={
        "subscriber_id": deps_b["subscriber_id"], "household_id": deps_a["household_id"], "role": "owner"})
    _assert_problem(status, problem, resp, 422, "invalid-reference")


async def _fixtures_in(api: Api, tenant: UUID, token: str) -> dict[str, str]:
    home = await _create(api, "households", {"name": "Home", "time_zone": "UTC"}, tenant=tenant, token=token)
    sub = await _create(api, "subscribers", {"msisdn": _msisdn()}, tenant=tenant, token=token)
    return {"household_id": home["id"], "subscriber_id": sub["id"]}


async def test_policy_optimistic_concurrency(api: Api) -> None:
    deps = await _fixtures(api)
    policy = await _create(api, "policies", {"household_id": deps["household_id"]})
    path = api.t(api.tenant_a, f"/policies/{policy['id']}")
    status, changed, _ = await api.call("PATCH", path, body={"dnd": True},
                                        params={"expected_version": str(policy["version"])})
    assert (status, changed["version"]) == (200, policy["version"] + 1)
    status, problem, resp = await api.call("PATCH", path, body={"dnd": False},
                                           params={"expected_version": str(policy["version"])})
    _assert_problem(status, problem, resp, 409, "version-conflict")


# -- tenant isolation and roles -----------------------------------------------------------------------------

async def test_operator_cannot_reach_another_tenant(api: Api) -> None:
    theirs = await _fixtures_in(api, api.tenant_b, "op-b")
    sub_b = theirs["subscriber_id"]
    # Through tenant B's paths: forbidden outright.
    for method, tail, body in (("GET", "/subscribers", None), ("GET", f"/subscribers/{sub_b}", None),
                               ("POST", "/subscribers", {"msisdn": _msisdn()}),
                               ("PATCH", f"/subscribers/{sub_b}", {"display_name": "pwned"}),
                               ("DELETE", f"/subscribers/{sub_b}", None), ("GET", "/audit", None)):
        status, problem, resp = await api.call(method, api.t(api.tenant_b, tail), "op-a", body=body)
        _assert_problem(status, problem, resp, 403, "forbidden")
    # Through the operator's own tenant path, tenant B's rows do not exist (row-level security).
    for method, body in (("GET", None), ("PATCH", {"display_name": "pwned"}), ("DELETE", None)):
        status, problem, resp = await api.call(method, api.t(api.tenant_a, f"/subscribers/{sub_b}"), "op-a",
                                               body=body)
        _assert_problem(status, problem, resp, 404, "not-found")
    status, page, _ = await api.call("GET", api.t(api.tenant_a, "/subscribers"), "op-a", params={"limit": "1000"})
    assert sub_b not in {s["id"] for s in page["items"]}
    status, row, _ = await api.call("GET", api.t(api.tenant_b, f"/subscribers/{sub_b}"), "op-b")
    assert (status, row.get("display_name")) == (200, None)


async def test_viewer_reads_but_cannot_write(api: Api) -> None:
    deps = await _fixtures(api)
    status, _, _ = await api.call("GET", api.t(api.tenant_a, f"/households/{deps['household_id']}"), "view-a")
    assert status == 200
    status, _, _ = await api.call("GET", api.t(api.tenant_b, "/households"), "view-all")
    assert status == 200
    for token in ("view-a", "view-all"):
        for method, tail, body in (("POST", "/households", {"name": "H", "time_zone": "UTC"}),
                                   ("PATCH", f"/households/{deps['household_id']}", {"name": "x"}),
                                   ("DELETE", f"/households/{deps['household_id']}", None)):
            status, problem, resp = await api.call(method, api.t(api.tenant_a, tail), token, body=body)
            _assert_problem(status, problem, resp, 403, "forbidden")
    status, problem, resp = await api.call("GET", api.t(api.tenant_b, "/households"), "view-a")
    _assert_problem(status, problem, resp, 403, "forbidden")


@pytest.mark.parametrize("token", [None, "not-a-token", ""])
async def test_bad_or_missing_token_is_401(api: Api, token: str | None) -> None:
    status, problem, resp = await api.call("GET", "/v1/tenants", token)
    _assert_problem(status, problem, resp, 401, "unauthenticated")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


# -- audit, consents ----------------------------------------------------------------------------------------

async def test_every_change_is_audited_with_actor_and_request_id(api: Api) -> None:
    sub = await _create(api, "subscribers", {"msisdn": _msisdn()})
    path = api.t(api.tenant_a, f"/subscribers/{sub['id']}")
    status, _, resp = await api.call("PATCH", path, "op-a", body={"display_name": "Olga"},
                                     headers={"X-Request-ID": "req-42"})
    assert status == 200
    assert resp.headers["X-Request-ID"] == "req-42"
    # A no-op change writes nothing (there is nothing to audit).
    await api.call("PATCH", path, "op-a", body={"display_name": "Olga"})
    await api.call("DELETE", path, "op-a")
    rows = await _audit(api, api.tenant_a, sub["id"])
    assert [(r["action"], r["actor"]) for r in rows] == [
        ("subscriber.delete", "alice@tenant-a"), ("subscriber.update", "alice@tenant-a"),
        ("subscriber.create", "alice@tenant-a")]
    assert rows[1]["correlation"] == {"channel": "admin-api", "request_id": "req-42"}
    assert all(r["correlation"]["channel"] == "admin-api" for r in rows)
    # The same rows, read straight from the table (not through the API's own view of them).
    conn = await connect(api.pg.admin_url, role=DbRole.OWNER)
    try:
        actors = await conn.fetch("SELECT action, actor FROM iim.audit_log WHERE entity_id = $1 ORDER BY id",
                                  sub["id"])
    finally:
        await conn.close()
    assert [(r["action"], r["actor"]) for r in actors] == [(a, b) for a, b in reversed(
        [(r["action"], r["actor"]) for r in rows])]
    status, chain, _ = await api.call("GET", api.t(api.tenant_a, "/audit/verify"), "view-a")
    assert status == 200
    assert chain["intact"] is True
    assert chain["head_id"] >= rows[0]["id"]


async def test_consent_grant_and_revoke_keeps_the_row(api: Api) -> None:
    sub = await _create(api, "subscribers", {"msisdn": _msisdn()})
    body = {"subscriber_id": sub["id"], "purpose": "read_sms", "scope": {"senders": ["+79001112233"]},
            "expires_at": "2099-01-01T00:00:00Z", "evidence": {"channel": "ivr", "call_id": "c-1"}}
    consent = await _create(api, "consents", body)
    assert consent["revoked_at"] is None
    assert consent["granted_at"]
    status, problem, resp = await api.call("POST", api.t(api.tenant_a, "/consents"), body=body)
    _assert_problem(status, problem, resp, 409, "conflict")  # one active consent per purpose
    path = api.t(api.tenant_a, f"/consents/{consent['id']}")
    status, problem, resp = await api.call("DELETE", path)
    _assert_problem(status, problem, resp, 405, "method-not-allowed")
    status, problem, resp = await api.call("PATCH", path, body={"purpose": "presence"})
    _assert_problem(status, problem, resp, 405, "method-not-allowed")
    status, revoked, _ = await api.call("POST", path + "/revoke", "op-a")
    assert status == 200
    assert revoked["revoked_at"] is not None
    assert {k: v for k, v in revoked.items() if k not in ("revoked_at", "updated_at")} == \
        {k: v for k, v in consent.items() if k not in ("revoked_at", "updated_at")}
    status, again, _ = await api.call("POST", path + "/revoke", "op-a")
    assert (status, again["revoked_at"]) == (200, revoked["revoked_at"])  # idempotent
    status, shown, _ = await api.call("GET", path, "view-a")
    assert shown == revoked
    status, page, _ = await api.call("GET", api.t(api.tenant_a, "/consents"),
                                     params={"subscriber_id": sub["id"], "purpose": "read_sms"})
    assert [c["id"] for c in page["items"]] == [consent["id"]]
    rows = await _audit(api, api.tenant_a, consent["id"])
    assert [(r["action"], r["actor"]) for r in rows] == [("consent.revoke", "alice@tenant-a"),
                                                         ("consent.create", "alice@tenant-a")]
    assert rows[1]["detail"]["after"]["evidence"].startswith("sha256:")  # evidence is not copied into the audit
    # A new consent may be granted once the old one is revoked.
    await _create(api, "consents", body)
    status, problem, resp = await api.call("POST", path + "/revoke", "view-a")
    _assert_problem(status, problem, resp, 403, "forbidden")
    status, problem, resp = await api.call("POST", path + "/revoke", raw=b'{"reason": "x"}')
    _assert_problem(status, problem, resp, 400, "malformed-request")


# -- the document and the wiring ----------------------------------------------------------------------------

async def test_openapi_is_served_without_a_token(api: Api) -> None:
    status, doc, resp = await api.call("GET", "/openapi.json", None)
    assert status == 200
    assert resp.content_type == "application/json"
    assert doc["openapi"] == "3.1.0"
    assert "/v1/tenants/{tenant_id}/subscribers" in doc["paths"]
    status, doc2, _ = await api.call("GET", "/v1/openapi.json", None)
    assert doc2 == doc


async def test_registry_leaves_the_service_routes_alone(api: Api) -> None:
    async with api.session.get(api.base + "/metrics") as resp:
        assert resp.status == 200
        assert "problem" not in resp.content_type
    async with api.session.get(api.base + "/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"
    _status, _, resp = await api.call("GET", "/v1/tenants")
    assert resp.headers["Cache-Control"] == "no-store"


async def test_store_unavailable_is_503_with_retry_after() -> None:
    def no_pool() -> Pool:
        raise LookupError("not connected")

    root = web.Application()
    tokens = TokenTable.from_json(json.dumps({hash_token("t"): {"actor": "a", "role": "admin"}}))
    mount_registry(root, create_registry_app(no_pool, tokens=tokens))
    server = TestServer(root, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session, session.get(
            str(server.make_url("/v1/tenants")), headers={"Authorization": "Bearer t"}
        ) as resp:
            assert resp.status == 503
            assert (await resp.json(content_type=PROBLEM))["error_id"] == "store-unavailable"
            assert int(resp.headers["Retry-After"]) > 0
    finally:
        await server.close()


async def test_owned_pools_follow_the_app_lifecycle(api: Api) -> None:
    pools = OwnedPools(api.pg.app_url, api.pg.cache_url, max_size=2)
    root = web.Application()
    root.cleanup_ctx.append(pools.ctx)
    tokens = TokenTable.from_json(json.dumps({hash_token("t"): {"actor": "a", "role": "admin"}}))
    mount_registry(root, create_registry_app(pools.app, tokens=tokens, directory_pool=pools.directory))
    with pytest.raises(LookupError):
        pools.app()
    server = TestServer(root, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session, session.get(
            str(server.make_url("/v1/tenants")), headers={"Authorization": "Bearer t"}, params={"limit": "1000"}
        ) as resp:
            assert resp.status == 200
            ids = {t["id"] for t in (await resp.json())["items"]}
            assert {str(api.tenant_a), str(api.tenant_b)} <= ids
    finally:
        await server.close()
    with pytest.raises(LookupError):
        pools.directory()


# -- toll fraud: the numbering plan, caps and allow-list (issue 14, item 7) ------------------------------------

async def _refused_number(api: Api, method: str, path: str, number: str, reason: str) -> None:
    status, body, resp = await api.call(method, path, "op-b", body={"msisdn": number})
    _assert_problem(status, body, resp, 422, "validation-failed")
    assert [(e["loc"], e["type"]) for e in body["errors"]] == [(["body", "msisdn"], reason)]
    assert number in body["detail"]


async def test_a_contact_number_outside_the_tenants_plan_is_a_422_until_the_allow_list_admits_it(api: Api) -> None:
    """Issue 14 item 7: the admin API accepted premium numbers as contacts."""
    subs = api.t(api.tenant_b, "/subscribers")
    for number in ("+78091234567", "+78031234567", "+882161234567", "+19005551234", "+8707612345678"):
        await _refused_number(api, "POST", subs, number, "special_range")
    await _refused_number(api, "POST", subs, "+447700900123", "outside_plan")
    ok = await _create(api, "subscribers", {"msisdn": "+79035550101"}, tenant=api.tenant_b, token="op-b")
    await _refused_number(api, "PATCH", f"{subs}/{ok['id']}", "+78091234567", "special_range")

    broad = await _create(api, "originate-allows", {"prefix": "+7"}, tenant=api.tenant_b, token="op-b")
    uk = await _create(api, "originate-allows", {"prefix": "+44", "note": "UK office"}, tenant=api.tenant_b,
                       token="op-b")
    await _create(api, "subscribers", {"msisdn": "+447700900123"}, tenant=api.tenant_b, token="op-b")
    await _refused_number(api, "POST", subs, "+449012345678", "special_range")  # UK premium: not by +44
    await _refused_number(api, "POST", subs, "+78091234567", "special_range")  # nor +7809 by +7
    one = await _create(api, "originate-allows", {"prefix": "+78091234567", "note": "hotline"},
                        tenant=api.tenant_b, token="op-b")
    await _create(api, "subscribers", {"msisdn": "+78091234567"}, tenant=api.tenant_b, token="op-b")

    # The plan replaces the default (+7): a Belarus-only tenant, its allow-list still on top.
    limits = await _create(api, "originate-limits", {"country_codes": ["+375"], "max_concurrent": 3},
                           tenant=api.tenant_b, token="op-b")
    await _create(api, "subscribers", {"msisdn": "+375291234567"}, tenant=api.tenant_b, token="op-b")
    for entry in (broad, uk, one):
        status, _, _ = await api.call("DELETE", api.t(api.tenant_b, f"/originate-allows/{entry['id']}"), "op-b")
        assert status == 204
    await _refused_number(api, "POST", subs, "+79035550102", "outside_plan")
    status, _, _ = await api.call("DELETE", api.t(api.tenant_b, f"/originate-limits/{limits['id']}"), "op-b")
    assert status == 204
    await _create(api, "subscribers", {"msisdn": "+79035550102"}, tenant=api.tenant_b, token="op-b")


async def test_caps_and_allow_list_changes_are_audited_with_the_actor(api: Api) -> None:
    limits = await _create(api, "originate-limits", {"max_concurrent": 1}, tenant=api.tenant_b, token="op-b")
    path = api.t(api.tenant_b, f"/originate-limits/{limits['id']}")
    assert limits["country_codes"] is None  # the service's default plan
    status, changed, _ = await api.call("PATCH", path, "op-b", body={"max_per_hour": 20})
    assert (status, changed["max_per_hour"], changed["max_concurrent"]) == (200, 20, 1)
    status, body, resp = await api.call("POST", api.t(api.tenant_b, "/originate-limits"), "op-b", body={})
    _assert_problem(status, body, resp, 409, "conflict")  # one row per tenant
    status, body, resp = await api.call("PATCH", path, "op-b", body={"country_codes": ["7"]})
    _assert_problem(status, body, resp, 422, "validation-failed")
    status, body, resp = await api.call("PATCH", path, "op-b", body={"max_concurrent": -1})
    _assert_problem(status, body, resp, 422, "validation-failed")
    status, body, resp = await api.call("POST", api.t(api.tenant_b, "/originate-allows"), "op-b",
                                        body={"prefix": "+7 809"})
    _assert_problem(status, body, resp, 422, "validation-failed")
    rows = await _audit(api, api.tenant_b, limits["id"])
    assert [(r["action"], r["actor"]) for r in rows] == [
        ("originate_limit.update", "bob@tenant-b"), ("originate_limit.create", "bob@tenant-b")]
    assert rows[0]["detail"]["changed"] == {"max_per_hour": {"from": 200, "to": 20}}
    status, _, _ = await api.call("DELETE", path, "op-b")
    assert status == 204


# -- numbering plans: numbers typed in national form (issue 15, item 4) -------------------------------------

async def test_a_number_typed_in_national_form_is_stored_in_e164_under_the_default_plan(api: Api) -> None:
    digits = str(uuid4().int)[:7]
    subs = api.t(api.tenant_a, "/subscribers")
    created = await _create(api, "subscribers", {"msisdn": f"8 (901) {digits[:3]}-{digits[3:5]}-{digits[5:]}"})
    assert created["msisdn"] == f"+7901{digits}"
    status, page, _ = await api.call("GET", subs, "view-a", params={"msisdn": f"8901{digits}"})
    assert (status, [row["id"] for row in page["items"]]) == (200, [created["id"]])
    status, changed, _ = await api.call("PATCH", f"{subs}/{created['id']}", body={"msisdn": f"810 7 902 {digits}"})
    assert (status, changed["msisdn"]) == (200, f"+7902{digits}")


async def test_a_number_the_plan_cannot_read_is_a_422_and_a_national_premium_one_is_refused_like_its_e164_form(
        api: Api) -> None:
    subs = api.t(api.tenant_a, "/subscribers")
    for typed in ("12345", "8 900 123", "81012345678"):
        status, body, resp = await api.call("POST", subs, "op-a", body={"msisdn": typed})
        _assert_problem(status, body, resp, 422, "validation-failed")
        assert [(e["loc"], e["type"]) for e in body["errors"]] == [(["body", "msisdn"], "not_a_number")]
    for typed in ("8 809 123-45-67", "+7 809 123 45 67"):
        status, body, resp = await api.call("POST", subs, "op-a", body={"msisdn": typed})
        _assert_problem(status, body, resp, 422, "validation-failed")
        assert [(e["loc"], e["type"]) for e in body["errors"]] == [(["body", "msisdn"], "special_range")]
    status, body, resp = await api.call("GET", subs, "op-a", params={"msisdn": "12345"})
    _assert_problem(status, body, resp, 400, "invalid-parameter")


async def test_a_tenant_with_a_uk_plan_types_uk_national_numbers_and_the_plan_change_is_audited(api: Api) -> None:
    tenant = UUID((await api.call("POST", "/v1/tenants", body={"name": "UK operator"}))[1]["id"])
    await _create(api, "originate-limits", {"country_codes": ["+44"]}, tenant=tenant, token="admin")
    plan = await _create(api, "numbering-plans", {"country_code": "44", "trunk_prefix": "0",
                                                  "international_prefixes": ["00"], "national_lengths": [9, 10]},
                         tenant=tenant, token="admin")
    subs = api.t(tenant, "/subscribers")
    created = await _create(api, "subscribers", {"msisdn": "020 7946 0018"}, tenant=tenant, token="admin")
    assert created["msisdn"] == "+442079460018"
    status, body, resp = await api.call("POST", subs, body={"msisdn": "8 900 123-45-67"})  # Russian national form
    _assert_problem(status, body, resp, 422, "validation-failed")
    assert "+44, trunk 0" in body["detail"]
    path = api.t(tenant, f"/numbering-plans/{plan['id']}")
    status, body, resp = await api.call("PATCH", path, body={"trunk_prefix": "00"})  # the international prefix
    _assert_problem(status, body, resp, 422, "validation-failed")
    status, body, resp = await api.call("POST", api.t(tenant, "/numbering-plans"), body={
        "country_code": "44", "international_prefixes": ["0"]})
    _assert_problem(status, body, resp, 422, "validation-failed")
    status, changed, _ = await api.call("PATCH", path, body={"national_lengths": [10]})
    assert (status, changed["national_lengths"]) == (200, [10])
    rows = await _audit(api, tenant, plan["id"])
    assert [(r["action"], r["actor"]) for r in rows] == [
        ("numbering_plan.update", "root@noc"), ("numbering_plan.create", "root@noc")]
    assert rows[0]["detail"]["changed"] == {"national_lengths": {"from": [9, 10], "to": [10]}}


async def test_caller_lists_typed_in_national_form_are_stored_in_e164(api: Api) -> None:
    deps = await _fixtures(api)
    policy = await _create(api, "policies", {
        "subscriber_id": deps["subscriber_id"], "allowed_callers": ["8 (916) 000-00-01", "+79160000001"],
        "blocked_callers": ["0079160000002"]})
    assert (policy["allowed_callers"], policy["blocked_callers"]) == (["+79160000001"], ["+79160000002"])
    status, changed, _ = await api.call("PATCH", api.t(api.tenant_a, f"/policies/{policy['id']}"),
                                        body={"blocked_callers": ["89160000003"]})
    assert (status, changed["blocked_callers"], changed["allowed_callers"]) == (200, ["+79160000003"],
                                                                                 ["+79160000001"])


async def test_a_request_with_a_traceparent_is_a_server_span_of_the_callers_trace_named_by_its_route(
        api: Api, spans: Spans) -> None:
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    status, _, resp = await api.call("GET", api.t(api.tenant_a), "op-a", headers={"traceparent": caller})
    assert status == 200
    span = spans.one("GET /v1/tenants/{tenant_id}")
    assert span.kind is SpanKind.SERVER
    assert span.context is not None
    assert f"{span.context.trace_id:032x}" == caller[3:35]
    assert span.parent is not None
    assert f"{span.parent.span_id:016x}" == caller[36:52]
    attributes = span.attributes or {}
    assert attributes["http.route"] == "/v1/tenants/{tenant_id}"
    assert attributes["http.response.status_code"] == 200
    assert attributes["iim.tenant"] == str(api.tenant_a)
    assert attributes["iim.request_id"] == resp.headers["X-Request-ID"]


@pytest.mark.parametrize("traceparent", ["00-zz", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "x" * 5000,
                                         "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"])
async def test_a_malformed_traceparent_starts_a_new_trace_and_is_no_error(api: Api, spans: Spans,
                                                                         traceparent: str) -> None:
    status, _, _ = await api.call("GET", api.t(api.tenant_a), "op-a", headers={"traceparent": traceparent})
    assert status == 200
    assert spans.one("GET /v1/tenants/{tenant_id}").parent is None


async def test_a_refused_request_is_traced_with_its_status(api: Api, spans: Spans) -> None:
    status, _, _ = await api.call("GET", api.t(api.tenant_b), "op-a")
    assert status == 403
    span = spans.one("GET /v1/tenants/{tenant_id}")
    assert (span.attributes or {})["http.response.status_code"] == 403
