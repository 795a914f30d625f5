"""The admin API with OIDC bearer JWTs from a local issuer (a real peer) and static tokens from a file that is
reloaded, against a real PostgreSQL: the actor in audit rows, tenant and brand scopes, one 401, the 503."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from iim.admin.api import create_registry_app, mount_registry
from iim.admin.auth import BAD_TOKEN, hash_token
from iim.admin.settings import AdminSettings, OidcSettings
from iim.http import create_app as create_root_app
from policy_cache.audit import SYSTEM_CHAIN
from policy_cache.db import DbRole, Pool, connect_pool
from tests.oidc_issuer import AUDIENCE, Issuer, running_issuer
from tests.pg import PgDatabase, create_tenant

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Rig:
    base: str
    session: aiohttp.ClientSession
    issuer: Issuer
    tokens_file: Path
    tenant_a: UUID
    tenant_b: UUID

    async def call(self, method: str, path: str, token: str | None, body: Any = None) -> tuple[int, Any, Any]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        async with self.session.request(method, self.base + path, headers=headers, json=body) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None, resp.headers

    def operator(self, tenant: UUID, sub: str = "alice", **scope: UUID) -> str:
        role = {"role": "operator", "tenant": str(tenant), **{k: str(v) for k, v in scope.items()}}
        return self.issuer.token(sub, [role])

    def write_tokens(self, tokens: dict[str, dict[str, str]]) -> None:
        self.tokens_file.write_text(json.dumps({hash_token(k): v for k, v in tokens.items()}))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(pg_db: PgDatabase, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tokens_file = tmp_path_factory.mktemp("tokens") / "tokens.json"
    tokens_file.write_text(json.dumps({hash_token("boot"): {"actor": "root@noc", "role": "admin"}}))
    app_pool: Pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=4)
    cache_pool: Pool = await connect_pool(pg_db.cache_url, role=DbRole.CACHE, min_size=1, max_size=2)
    async with running_issuer() as issuer:
        oidc = OidcSettings(issuer=issuer.url, audience=AUDIENCE, fetch_timeout_s=1.0, jwks_min_refetch_s=0,
                            jwks_ttl_s=1, jwks_max_stale_s=1, retry_after_s=7)
        root = create_root_app([])
        registry = create_registry_app(
            lambda: app_pool, AdminSettings(tokens_ref=f"file:{tokens_file}", tokens_check_interval_s=0),
            directory_pool=lambda: cache_pool, oidc=oidc)
        mount_registry(root, registry)
        server = TestServer(root, host="127.0.0.1", port=0)
        await server.start_server()
        session = aiohttp.ClientSession()
        try:
            tenant_a = await create_tenant(app_pool, "Operator A")
            tenant_b = await create_tenant(app_pool, "Operator B")
            yield Rig(str(server.make_url("")).rstrip("/"), session, issuer, tokens_file, tenant_a, tenant_b)
        finally:
            await session.close()
            await server.close()
            await app_pool.close()
            await cache_pool.close()


@pytest.fixture(autouse=True)
def _issuer_up(rig: Rig) -> None:
    rig.issuer.mode = "ok"


async def _household(rig: Rig, tenant: UUID, token: str, **extra: Any) -> dict[str, Any]:
    status, body, _ = await rig.call("POST", f"/v1/tenants/{tenant}/households", token,
                                     {"name": f"home-{uuid4().hex[:6]}", "time_zone": "Europe/Moscow", **extra})
    assert status == 201, body
    return dict(body)


async def test_jwt_operator_writes_its_tenant_and_the_audit_names_its_sub_and_issuer(rig: Rig) -> None:
    token = rig.operator(rig.tenant_a, sub="alice@corp")
    home = await _household(rig, rig.tenant_a, token)
    status, page, _ = await rig.call("GET", f"/v1/tenants/{rig.tenant_a}/audit?entity_id={home['id']}", "boot")
    assert status == 200, page
    assert [row["actor"] for row in page["items"]] == [f"alice@corp ({rig.issuer.url})"]
    status, tenants, _ = await rig.call("GET", "/v1/tenants", token)
    assert status == 200
    assert [t["id"] for t in tenants["items"]] == [str(rig.tenant_a)]


async def test_jwt_roles_are_scoped_to_their_tenant_and_deny_by_default(rig: Rig) -> None:
    status, body, _ = await rig.call("GET", f"/v1/tenants/{rig.tenant_b}/households", rig.operator(rig.tenant_a))
    assert (status, body["error_id"]) == (403, "forbidden")
    no_roles = rig.issuer.token("nobody", [])
    status, body, _ = await rig.call("GET", f"/v1/tenants/{rig.tenant_a}/households", no_roles)
    assert (status, body["error_id"]) == (403, "forbidden")
    viewer = rig.issuer.token("vera", [{"role": "viewer", "tenant": str(rig.tenant_a)}])
    status, _, _ = await rig.call("GET", f"/v1/tenants/{rig.tenant_a}/households", viewer)
    assert status == 200
    status, body, _ = await rig.call("POST", f"/v1/tenants/{rig.tenant_a}/households", viewer,
                                     {"name": "x", "time_zone": "Europe/Moscow"})
    assert status == 403
    status, body, _ = await rig.call("POST", "/v1/tenants", rig.operator(rig.tenant_a), {"name": "new"})
    assert status == 403


async def test_every_authentication_failure_is_the_same_401(rig: Rig) -> None:
    now = int(time.time())
    bad = [None, "nope", rig.issuer.token(exp=now - 3600, iat=now - 4000), rig.issuer.token(aud="other"),
           rig.issuer.token(iss="https://evil.example"), rig.issuer.token(kid="unknown-kid", key=rig.issuer.key("rsa-1")),
           rig.operator(rig.tenant_a)[:-4] + "AAAA"]
    answers = set()
    for token in bad:
        status, body, headers = await rig.call("GET", f"/v1/tenants/{rig.tenant_a}/households", token)
        assert status == 401, body
        assert headers["WWW-Authenticate"].startswith("Bearer")
        answers.add(json.dumps({k: v for k, v in body.items() if k != "instance"}, sort_keys=True))
    assert len(answers) == 1
    assert BAD_TOKEN in answers.pop()


async def test_issuer_down_is_503_for_jwts_while_static_tokens_keep_working(rig: Rig) -> None:
    rig.issuer.mode = "down"
    await asyncio.sleep(1.1)  # the cached keys are past max_stale (1 s in this rig)
    status, body, headers = await rig.call("GET", f"/v1/tenants/{rig.tenant_a}/households", rig.operator(rig.tenant_a))
    assert (status, body["error_id"], headers["Retry-After"]) == (503, "identity-unavailable", "7")
    status, _, _ = await rig.call("GET", f"/v1/tenants/{rig.tenant_a}/households", "boot")
    assert status == 200
    rig.issuer.mode = "ok"
    status, _, _ = await rig.call("GET", f"/v1/tenants/{rig.tenant_a}/households", rig.operator(rig.tenant_a))
    assert status == 200


async def test_brand_scoped_operator_reaches_only_its_brands_households(rig: Rig) -> None:
    brands = []
    for name in ("North", "South"):
        status, brand, _ = await rig.call("POST", f"/v1/tenants/{rig.tenant_a}/brands", "boot", {"name": name})
        assert status == 201, brand
        brands.append(UUID(brand["id"]))
    north, south = brands
    home_n = await _household(rig, rig.tenant_a, "boot", brand_id=str(north))
    home_s = await _household(rig, rig.tenant_a, "boot", brand_id=str(south))
    token = rig.operator(rig.tenant_a, sub="nora", brand=north)
    base = f"/v1/tenants/{rig.tenant_a}/households"
    status, body, _ = await rig.call("GET", f"{base}/{home_n['id']}", token)
    assert status == 200, body
    status, body, _ = await rig.call("PATCH", f"{base}/{home_n['id']}", token, {"name": "renamed"})
    assert (status, body["name"]) == (200, "renamed")
    for path in (f"{base}/{home_s['id']}", f"{base}/{uuid4()}", base, f"/v1/tenants/{rig.tenant_a}/subscribers"):
        status, body, _ = await rig.call("GET", path, token)
        assert (status, body["error_id"]) == (403, "forbidden"), path  # no existence oracle for other brands
    status, _, _ = await rig.call("DELETE", f"{base}/{home_s['id']}", token)
    assert status == 403
    viewer = rig.issuer.token("vic", [{"role": "viewer", "tenant": str(rig.tenant_a), "brand": str(north)}])
    status, _, _ = await rig.call("GET", f"{base}/{home_n['id']}", viewer)
    assert status == 200
    status, _, _ = await rig.call("PATCH", f"{base}/{home_n['id']}", viewer, {"name": "nope"})
    assert status == 403


async def test_static_token_file_is_reloaded_without_restart_and_a_bad_one_is_refused(rig: Rig) -> None:
    path = f"/v1/tenants/{rig.tenant_a}/households"
    status, _, _ = await rig.call("GET", path, "later")
    assert status == 401
    rig.write_tokens({"boot": {"actor": "root@noc", "role": "admin"},
                      "later": {"actor": "late@noc", "role": "viewer", "tenant": str(rig.tenant_a)}})
    status, _, _ = await rig.call("GET", path, "later")
    assert status == 200
    rig.tokens_file.write_text('{"plain-token": {"actor": "x", "role": "admin"}}')
    for token in ("boot", "later"):
        status, _, _ = await rig.call("GET", path, token)
        assert status == 200  # the refused file left the table as it was
    status, _, _ = await rig.call("GET", path, "plain-token")
    assert status == 401
    rig.write_tokens({"boot": {"actor": "root@noc", "role": "admin"}})
    status, _, _ = await rig.call("GET", path, "later")
    assert status == 401  # revoked


async def _system_rows(rig: Rig, source: str) -> list[dict[str, Any]]:
    """The service chain's rows about this token file, oldest first (read through the API, as an auditor does)."""
    status, page, _ = await rig.call("GET", f"/v1/tenants/{SYSTEM_CHAIN}/audit?entity_id={source}&limit=100", "boot")
    assert status == 200, page
    return list(reversed(page["items"]))


async def test_token_file_reloads_applied_and_refused_are_audited_in_the_services_chain_without_secrets(
        rig: Rig) -> None:
    source = f"file:{rig.tokens_file}"
    path = f"/v1/tenants/{rig.tenant_a}/households"
    vera = {"actor": "vera@noc", "role": "viewer", "tenant": str(rig.tenant_a)}
    rig.write_tokens({"boot": {"actor": "root@noc", "role": "admin"}, "vera-secret-token": vera})
    status, _, _ = await rig.call("GET", path, "vera-secret-token")
    assert status == 200
    rig.tokens_file.write_text('{"plain-token": {"actor": "x", "role": "admin"}}')
    status, _, _ = await rig.call("GET", path, "boot")
    assert status == 200  # refused: the old table stays
    # No request after this change: the auditor's own look at the file applies and audits it.
    rig.write_tokens({"boot": {"actor": "root@noc", "role": "admin"}})

    key_id = hash_token("vera-secret-token")[:8]
    described = {"key_id": key_id, "actor": "vera@noc", "role": "viewer", "tenant": str(rig.tenant_a)}

    async def audited() -> list[dict[str, Any]]:
        deadline = time.monotonic() + 10
        while not (rows := await _system_rows(rig, source)) or rows[-1]["detail"].get("removed") != [described]:
            assert time.monotonic() < deadline, rows
            await asyncio.sleep(0.1)
        return rows[-3:]

    added, refused, removed = await audited()
    assert added["action"] == "admin_tokens.reloaded"
    assert added["actor"] == "admin-token-reload"
    assert added["entity"] == "admin_token_table"
    assert added["detail"] == {"tokens": 2, "previous": 1, "added": [described], "removed": [], "changed": []}
    assert refused["action"] == "admin_tokens.reload_refused"
    assert refused["detail"] == {"error": "admin token table keys must be SHA-256 hex digests of the tokens",
                                 "tokens_in_force": 2}
    assert removed["action"] == "admin_tokens.reloaded"
    assert removed["detail"] == {"tokens": 1, "previous": 2, "added": [], "removed": [described], "changed": []}
    assert "process" in added["correlation"]
    text = json.dumps([added, refused, removed])
    for secret in ("vera-secret-token", hash_token("vera-secret-token"), "plain-token", hash_token("boot")):
        assert secret not in text
    status, chain, _ = await rig.call("GET", f"/v1/tenants/{SYSTEM_CHAIN}/audit/verify", "boot")
    assert (status, chain["intact"]) == (200, True)
    # The service's chain is for admins and unscoped viewers: a tenant's operator does not see it.
    status, _, _ = await rig.call("GET", f"/v1/tenants/{SYSTEM_CHAIN}/audit", rig.operator(rig.tenant_a))
    assert status == 403


async def test_brand_scoped_grants_list_what_their_filters_confine_to_their_brand(rig: Rig) -> None:
    base = f"/v1/tenants/{rig.tenant_a}"
    brands = []
    for name in ("East", "West"):
        status, brand, _ = await rig.call("POST", f"{base}/brands", "boot", {"name": name})
        assert status == 201, brand
        brands.append(brand["id"])
    east, west = brands
    home_e = await _household(rig, rig.tenant_a, "boot", brand_id=east)
    home_w = await _household(rig, rig.tenant_a, "boot", brand_id=west)
    status, person, _ = await rig.call("POST", f"{base}/subscribers", "boot", {"msisdn": "+79035550101"})
    assert status == 201, person
    for home in (home_e, home_w):
        status, body, _ = await rig.call("POST", f"{base}/devices", "boot",
                                         {"household_id": home["id"], "name": "speaker", "type": "speaker"})
        assert status == 201, body
        status, body, _ = await rig.call("POST", f"{base}/bindings", "boot", {
            "subscriber_id": person["id"], "household_id": home["id"], "role": "owner"})
        assert status == 201, body
    token = rig.operator(rig.tenant_a, sub="edna", brand=UUID(east))

    status, page, _ = await rig.call("GET", f"{base}/households?brand_id={east}", token)
    assert status == 200, page
    assert [h["id"] for h in page["items"]] == [home_e["id"]]
    for tail in (f"/devices?household_id={home_e['id']}", f"/bindings?household_id={home_e['id']}"):
        status, page, _ = await rig.call("GET", base + tail, token)
        assert status == 200, (tail, page)
        assert {row["household_id"] for row in page["items"]} == {home_e["id"]}, tail

    # What the filters do not confine to its brand is the same 403, whether the rows exist or not.
    for tail in ("/households", f"/households?brand_id={west}", f"/households?brand_id={east}&brand_id={west}",
                 "/households?brand_id=not-a-uuid", f"/households?region_id={uuid4()}", "/devices",
                 f"/devices?household_id={home_w['id']}", f"/devices?household_id={uuid4()}",
                 f"/bindings?household_id={home_w['id']}", f"/bindings?subscriber_id={person['id']}"):
        status, body, _ = await rig.call("GET", base + tail, token)
        assert (status, body["error_id"]) == (403, "forbidden"), tail
