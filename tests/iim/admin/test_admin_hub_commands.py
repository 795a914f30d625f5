"""Operators list the commands sent to a hub through the admin API and the CLI (real PostgreSQL, real socket):
newest first, a page at a time with an opaque cursor, by state; per tenant (another tenant's hub is the same
404 as none); a cursor this API did not give is a 400, never a 5xx."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from iim import cli
from iim.admin.api import create_registry_app, mount_registry
from iim.admin.hubs import hub_command_routes
from iim.admin.settings import AdminSettings
from iim.http import create_app as create_root_app
from policy_cache import registry
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from policy_cache.models import DeviceCreate, DeviceType, HouseholdCreate
from tests.iim.admin.test_admin_api import Api, _assert_problem, _tokens
from tests.pg import PgDatabase, create_tenant

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: An hour ago: well inside any retention, so a purge elsewhere in the session leaves these rows alone.
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub_api(pg_db: PgDatabase) -> AsyncIterator[tuple[Api, Pool]]:
    app_pool: Pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=4)
    cache_pool: Pool = await connect_pool(pg_db.cache_url, role=DbRole.CACHE, min_size=1, max_size=2)
    tenant_a, tenant_b = uuid4(), uuid4()
    root = create_root_app([])
    app = create_registry_app(lambda: app_pool, AdminSettings(max_body_bytes=4096, max_page_size=3),
                              directory_pool=lambda: cache_pool, tokens=_tokens(tenant_a, tenant_b),
                              extra_routes=hub_command_routes(lambda: None))
    mount_registry(root, app)
    server = TestServer(root, host="127.0.0.1", port=0)
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        await create_tenant(app_pool, "Hubs A", tenant_id=tenant_a)
        await create_tenant(app_pool, "Hubs B", tenant_id=tenant_b)
        yield Api(str(server.make_url("")).rstrip("/"), session, tenant_a, tenant_b, pg_db), app_pool
    finally:
        await session.close()
        await server.close()
        await app_pool.close()
        await cache_pool.close()


async def _hub_with_commands(pool: Pool, tenant: UUID, commands: list[tuple[str, str, int]]) -> str:
    """A hub and the commands ``(id, state, minutes after T0)`` sent to it (as the MQTT side records them)."""
    hub = f"hub-{uuid4().hex[:10]}"
    async with tenant_tx(pool, tenant) as conn:
        home = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(name="h", time_zone="UTC"), actor="t")
        device = await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=home.id, name="hub", type=DeviceType.HUB, external_id=hub), actor="t")
        for command_id, state, minutes in commands:
            await conn.execute(
                "INSERT INTO iim.hub_command (device_id, command_id, name, arguments, actor, state, sent_at) "
                "VALUES ($1, $2, 'arm', '{\"mode\": \"away\"}', 'op@noc', $3, $4)",
                device.id, command_id, state, T0 + timedelta(minutes=minutes))
    return hub


async def test_a_hubs_commands_are_listed_newest_first_page_by_page_and_by_state(
        hub_api: tuple[Api, Pool]) -> None:
    api, pool = hub_api
    # c-3 and c-4 were sent at the same instant: the id breaks the tie, no command is skipped or repeated.
    hub = await _hub_with_commands(pool, api.tenant_a, [("c-1", "done", 0), ("c-2", "failed", 1),
                                                        ("c-3", "done", 2), ("c-4", "sent", 2),
                                                        ("c-5", "done", 3)])
    path = api.t(api.tenant_a, f"/hubs/{hub}/commands")
    seen, after = [], None
    while True:
        status, page, _ = await api.call("GET", path, "view-a", params={"limit": "2", **({"after": after}
                                                                                        if after else {})})
        assert status == 200, page
        seen.extend((c["id"], c["state"], c["hub"]) for c in page["items"])
        after = page["next_after"]
        if after is None:
            break
    assert seen == [("c-5", "done", hub), ("c-4", "sent", hub), ("c-3", "done", hub), ("c-2", "failed", hub),
                    ("c-1", "done", hub)]
    status, done, _ = await api.call("GET", path, "op-a", params={"state": "done"})
    assert [c["id"] for c in done["items"]] == ["c-5", "c-3", "c-1"]
    assert done["next_after"] is not None  # a full page (the server caps pages at 3): there may be more
    status, rest, _ = await api.call("GET", path, "op-a", params={"state": "done", "after": done["next_after"]})
    assert (status, rest) == (200, {"items": [], "next_after": None})
    first = done["items"][0]
    assert (first["name"], first["arguments"], first["actor"]) == ("arm", {"mode": "away"}, "op@noc")


async def test_another_tenants_hub_and_an_unknown_hub_are_one_404(hub_api: tuple[Api, Pool]) -> None:
    api, pool = hub_api
    theirs = await _hub_with_commands(pool, api.tenant_b, [("b-1", "sent", 0)])
    foreign = await api.call("GET", api.t(api.tenant_a, f"/hubs/{theirs}/commands"), "op-a")
    unknown = await api.call("GET", api.t(api.tenant_a, "/hubs/hub-nobody/commands"), "op-a")
    other_path = await api.call("GET", api.t(api.tenant_b, f"/hubs/{theirs}/commands"), "op-a")
    for status, problem, resp in (foreign, unknown, other_path):
        _assert_problem(status, problem, resp, 404, "not-found")
    assert {**foreign[1], "instance": None} == {**unknown[1], "instance": None}
    status, page, _ = await api.call("GET", api.t(api.tenant_b, f"/hubs/{theirs}/commands"), "op-b")
    assert (status, [c["id"] for c in page["items"]]) == (200, ["b-1"])


@pytest.mark.parametrize("params", [{"after": "bm90LWEtY3Vyc29y"}, {"after": "x" * 401}, {"after": "a/b"},
                                    {"state": "exploded"}, {"limit": "0"}, {"limit": "many"}, {"color": "red"}])
async def test_bad_query_parameters_are_a_400(hub_api: tuple[Api, Pool], params: dict[str, str]) -> None:
    api, pool = hub_api
    hub = await _hub_with_commands(pool, api.tenant_a, [("c-1", "sent", 0)])
    status, problem, resp = await api.call("GET", api.t(api.tenant_a, f"/hubs/{hub}/commands"), "op-a",
                                           params=params)
    _assert_problem(status, problem, resp, 400, "invalid-parameter")


async def test_the_cli_lists_a_hubs_commands(hub_api: tuple[Api, Pool], monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    api, pool = hub_api
    hub = await _hub_with_commands(pool, api.tenant_a, [(f"c-{i}", "done" if i % 2 else "rejected", i)
                                                        for i in range(1, 6)])
    monkeypatch.setenv("IIM_ADMIN_TOKEN", "op-a")
    base = ["hub", "command", "list", "--api", api.base, "--tenant", str(api.tenant_a), "--hub", hub]
    capsys.readouterr()
    assert await asyncio.to_thread(cli.main, [*base, "--all", "-o", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["id"] for c in listed["items"]] == ["c-5", "c-4", "c-3", "c-2", "c-1"]
    assert await asyncio.to_thread(cli.main, [*base, "--state", "rejected"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["ID", "HUB", "NAME", "STATE"]
    assert [line.split()[0] for line in table[1:]] == ["c-4", "c-2"]
