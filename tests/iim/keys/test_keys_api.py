"""Data keys in the admin API against PostgreSQL: status per tenant, a rotation run as a background job with its
progress, admin only, audited with the caller as actor, and in the OpenAPI document."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from iim.admin.api import create_registry_app, mount_registry
from iim.admin.auth import TokenTable, hash_token
from iim.http import create_app as create_root_app
from iim.keys import store as key_store
from iim.keys.keyring import Keyring
from iim.keys_api import KeyRotations, RotateBody, key_routes
from iim.sms import store as sms_store
from policy_cache import audit
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from tests.conftest import eventually
from tests.pg import TEST_MASTER_KEY, PgDatabase, create_tenant

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADMIN, OPERATOR = "adm-secret", "op-secret"


@dataclass
class Api:
    url: str
    pool: Pool
    tenant: UUID
    rotations: KeyRotations
    session: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None, *, token: str = ADMIN) -> tuple[int, Any]:
        async with self.session.request(method, self.url + path, json=body,
                                        headers={"Authorization": f"Bearer {token}"}) as resp:
            return resp.status, await resp.json(content_type=None)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(pg_db: PgDatabase) -> AsyncIterator[Api]:
    pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=4)
    directory = await connect_pool(pg_db.cache_url, role=DbRole.CACHE, min_size=1, max_size=2)
    tenant = await create_tenant(pool, "Keys")
    table = {hash_token(ADMIN): {"actor": "root@noc", "role": "admin", "tenant": None},
             hash_token(OPERATOR): {"actor": "alice@tenant", "role": "operator", "tenant": str(tenant)}}
    keyring = Keyring(pool, TEST_MASTER_KEY)
    rotations = KeyRotations(lambda: pool, lambda: keyring)
    root = create_root_app([])
    mount_registry(root, create_registry_app(
        lambda: pool, tokens=TokenTable.from_json(json.dumps(table)), directory_pool=lambda: directory,
        extra_routes=tuple(key_routes(rotations, lambda: pool, lambda: directory, lambda: keyring))))
    server = TestServer(root, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with rotations, aiohttp.ClientSession() as session:
            yield Api(str(server.make_url("")).rstrip("/"), pool, tenant, rotations, session)
    finally:
        await server.close()
        await directory.close()
        await pool.close()


async def _sealed_rows(api: Api, count: int) -> None:
    """``count`` SMS sealed with the tenant's active data key, and one row from before sealing (clear)."""
    keyring = Keyring(api.pool, TEST_MASTER_KEY)
    async with tenant_tx(api.pool, api.tenant) as conn:
        for n in range(count):
            await sms_store.enqueue_sms(conn, key=f"k/{n}", msisdn="+79001112233", body=f"body {n}",
                                        data_key=await keyring.active(conn, api.tenant))
        await conn.execute("INSERT INTO iim.sms_outbox (key, msisdn, body) VALUES ('legacy', '+79001112233', "
                           "'written in clear long ago')")


def _keys_of(page: dict[str, Any], tenant: UUID) -> dict[str, Any]:
    [item] = [i for i in page["items"] if i["tenant_id"] == str(tenant)]
    return item


async def test_status_then_a_rotation_job_reseals_every_row_reports_progress_and_is_audited(api: Api) -> None:
    await _sealed_rows(api, 5)
    status, page = await api.call("GET", f"/v1/keys?tenant_id={api.tenant}")
    assert status == 200, page
    assert page["master_key_id"] == TEST_MASTER_KEY.key_id
    before = _keys_of(page, api.tenant)
    assert (before["active_key_id"], before["clear_rows"]) == (1, 1)
    assert [(k["key_id"], k["rows"], k["current_master"]) for k in before["keys"]] == [(1, 5, True)]

    status, job = await api.call("POST", f"/v1/tenants/{api.tenant}/keys/rotate", {"batch": 2})
    assert status == 202, job
    assert (job["state"], job["actor"], job["finish"]) == ("running", "root@noc", False)
    done: dict[str, Any] = {}

    async def poll() -> None:
        status, body = await api.call("GET", f"/v1/tenants/{api.tenant}/keys/rotation")
        assert status == 200, body
        done.update(body)

    await poll()
    await eventually(lambda: not api.rotations.running(UUID(job["id"])), timeout=30.0)
    await poll()
    assert (done["id"], done["state"], done["key_id"], done["unreadable"], done["runs"]) == (
        job["id"], "done", 2, 0, 1)
    assert done["resealed"]["sms_outbox"] == 6
    assert done["finished_at"] is not None

    status, page = await api.call("GET", "/v1/keys")
    after = _keys_of(page, api.tenant)
    assert (after["active_key_id"], after["clear_rows"]) == (2, 0)
    assert [(k["key_id"], k["rows"]) for k in after["keys"]] == [(1, 0), (2, 6)]
    assert (after["rotation"]["id"], after["rotation"]["state"]) == (job["id"], "done")

    await audit.flush_pending(api.pool)
    async with tenant_tx(api.pool, api.tenant, readonly=True) as conn:
        lines = await conn.fetch("SELECT actor, action FROM iim.audit_log WHERE action LIKE 'keys.%' ORDER BY id")
        assert await audit.verify_chain(conn, api.tenant) is None
    assert [(r["actor"], r["action"]) for r in lines] == [
        ("root@noc", "keys.rotation_requested"), ("root@noc", "keys.data_key_rotated"),
        ("root@noc", "keys.rows_resealed"), ("root@noc", "keys.rotation_done")]


async def test_key_routes_are_admin_only(api: Api) -> None:
    for method, path, body in (("GET", "/v1/keys", None),
                               ("POST", f"/v1/tenants/{api.tenant}/keys/rotate", {}),
                               ("GET", f"/v1/tenants/{api.tenant}/keys/rotation", None)):
        status, problem = await api.call(method, path, body, token=OPERATOR)
        assert status == 403, (path, problem)
        status, _ = await api.call(method, path, body, token="not-a-token")
        assert status == 401, path


async def test_bad_requests_are_clear_4xx(api: Api) -> None:
    unknown = uuid4()
    status, problem = await api.call("POST", f"/v1/tenants/{unknown}/keys/rotate", {})
    assert (status, problem["error_id"]) == (404, "not-found")
    assert await api.rotations.job(unknown) is None  # nothing started for a tenant that does not exist
    status, _ = await api.call("GET", f"/v1/keys?tenant_id={unknown}")
    assert status == 404
    status, _ = await api.call("GET", f"/v1/tenants/{unknown}/keys/rotation")
    assert status == 404
    status, problem = await api.call("POST", f"/v1/tenants/{api.tenant}/keys/rotate", {"batch": 0})
    assert status == 422, problem
    status, problem = await api.call("POST", f"/v1/tenants/{api.tenant}/keys/rotate", {"master": True})
    assert status == 422, problem
    status, _ = await api.call("GET", "/v1/keys?tenant_id=nope")
    assert status == 400


async def test_the_key_routes_are_in_the_openapi_document(api: Api) -> None:
    status, doc = await api.call("GET", "/v1/openapi.json")
    assert status == 200
    operations = {op["operationId"] for item in doc["paths"].values() for op in item.values()}
    assert {"listDataKeys", "rotateDataKey", "getDataKeyRotation"} <= operations
    assert "202" in doc["paths"]["/v1/tenants/{tenant_id}/keys/rotate"]["post"]["responses"]


async def test_a_start_while_a_rotation_runs_answers_the_running_job(api: Api) -> None:
    async with api.pool.acquire() as holder:
        async with tenant_tx(api.pool, api.tenant) as conn:
            first, created = await api.rotations.open(conn, api.tenant, RotateBody(finish=True), actor="root@noc")
        assert created
        assert await key_store.job_lock(holder, first.id)  # another service runs it: it stays running meanwhile
        async with api.session.post(f"{api.url}/v1/tenants/{api.tenant}/keys/rotate", json={"batch": 7},
                                    headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
            again = await resp.json()
            assert (resp.status, resp.headers.get("Idempotent-Replayed")) == (202, "true"), again
        assert (again["id"], again["state"], again["finish"], again["batch"]) == (str(first.id), "running", True, 500)
        await key_store.job_unlock(holder, first.id)
    # The start launched it here too: taken up once the other service let it go (after the backoff).
    await eventually(lambda: not api.rotations.running(first.id), timeout=30.0)
    _, last = await api.call("GET", f"/v1/tenants/{api.tenant}/keys/rotation")
    assert (last["id"], last["state"]) == (str(first.id), "done")
    async with tenant_tx(api.pool, api.tenant, readonly=True) as conn:
        requested = await conn.fetchval("SELECT count(*) FROM iim.audit_log WHERE action = 'keys.rotation_requested' "
                                        "AND detail->>'job_id' = $1", str(first.id))
    assert requested == 1  # the second start started nothing
