"""``iim serve`` with account linking: the callback on IIM's HTTP site, the admin routes, the connectors using
the household's token, its tokens sealed under the tenant's data key (no key of its own to give). Links sealed
with the old process-wide key (``IIM_LINK_TOKEN_KEY_REF``) are re-sealed under the envelope at start while that key
is given; without it, a start is refused while such tokens remain (their started linkings are dropped)."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import pytest

from iim.connectors.contract import Notification
from iim.core.errors import ConfigError
from iim.keys.keyring import Keyring
from iim.linking.sealing import open_secret
from iim.linking.store import ACCOUNT_LINK, Sealed
from iim.service import DatabaseUrls, Service
from iim.settings import Settings
from policy_cache.bootstrap import load_demo
from policy_cache.db import Connection, Pool
from tests.connector_peer import SIGNING_SECRET_TEXT, VendorPeer, serve
from tests.iim.linking.legacy_rows import OLD_KEY, legacy_link, legacy_state
from tests.oauth_peer import CLIENT_ID, CLIENT_SECRET, SCOPES, AuthorizationServer
from tests.pg import TEST_MASTER_KEY, TEST_MASTER_KEY_ENV, PgDatabase


@pytest.fixture
async def urls(pg_db: PgDatabase, app_pool: Pool, admin_conn: Connection,
               monkeypatch: pytest.MonkeyPatch) -> DatabaseUrls:
    for name, value in {**TEST_MASTER_KEY_ENV, "IIM_TEST_VENDOR_SIGNING": SIGNING_SECRET_TEXT,
                        "IIM_TEST_LINK_CLIENT": CLIENT_SECRET}.items():
        monkeypatch.setenv(name, value)  # every service of the module shares the tenants' data keys
    async with app_pool.acquire() as conn:
        await load_demo(conn)
    await admin_conn.execute("DELETE FROM iim.account_link")
    return DatabaseUrls(pg_db.app_url, pg_db.cache_url)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"esl_port": 0, "http_port": 0, "bridge_port": 0, "data_dir": str(tmp_path / "pg")}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    table = {hashlib.sha256(b"admin-token").hexdigest(): {"actor": "root@noc", "role": "admin"}}
    monkeypatch.setenv("IIM_TEST_ADMIN_TOKENS", json.dumps(table))
    monkeypatch.setenv("IIM_ADMIN_TOKENS_REF", "env:IIM_TEST_ADMIN_TOKENS")
    return {"Authorization": "Bearer admin-token"}


async def test_the_service_links_a_household_and_its_connector_uses_the_token(
        urls: DatabaseUrls, tmp_path: Path, admin_conn: Connection, tokens: dict[str, str]) -> None:
    port = _free_port()
    async with _peers() as (vendor, auth):
        auth.redirect_uri = f"http://127.0.0.1:{port}/oauth2/callback"
        settings = _settings(tmp_path, http_port=port, connectors=_webhook(vendor, auth))  # no token key to give
        async with Service(settings, database=urls) as service, aiohttp.ClientSession() as http:
            policy = service.running.policy
            assert policy is not None
            base = f"http://127.0.0.1:{service.running.http_port}"
            async with http.get(f"{base}/v1/tenants", headers=tokens) as resp:
                tenant = (await resp.json())["items"][0]["id"]
            async with http.get(f"{base}/v1/tenants/{tenant}/households", headers=tokens) as resp:
                household = (await resp.json())["items"][0]["id"]
            links = f"{base}/v1/tenants/{tenant}/households/{household}/connectors/webhook/links"
            async with http.post(links, headers=tokens, json={"scopes": ["send_notifications"]}) as resp:
                assert resp.status == 201, await resp.text()
                started = await resp.json()
            async with http.get(started["authorization_url"], allow_redirects=False) as resp:
                back = resp.headers["Location"]
            async with http.get(back, allow_redirects=False) as resp:
                assert resp.status == 200, await resp.text()
            await policy.connectors.get("webhook").send_notification(_kitchen())
            assert vendor.received[0].headers["Authorization"].removeprefix("Bearer ") in vendor.valid_tokens
            sealed = await admin_conn.fetchrow("SELECT access_token_key, refresh_token_key FROM iim.account_link")
            assert sealed is not None
            assert None not in tuple(sealed)  # under the tenant's data key
            async with http.get(f"{base}/openapi.json") as resp:
                paths = (await resp.json())["paths"]
            assert set(paths["/v1/tenants/{tenant_id}/households/{id}/connectors/{name}/links"]) == {
                "post", "get", "delete"}


async def test_links_sealed_with_the_old_key_are_resealed_under_the_envelope_at_start_and_keep_working(
        urls: DatabaseUrls, tmp_path: Path, admin_conn: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    tenant, household = await _demo_home(admin_conn)
    link_id, access, refresh = await legacy_link(admin_conn, tenant, household)
    state_id = await legacy_state(admin_conn, tenant, household)
    monkeypatch.setenv("IIM_TEST_OLD_LINK_KEY", OLD_KEY)
    async with _peers() as (vendor, auth):
        vendor.valid_tokens.add(access)
        settings = _settings(tmp_path, link_token_key_ref="env:IIM_TEST_OLD_LINK_KEY",
                             connectors=_webhook(vendor, auth))
        async with Service(settings, database=urls) as service:
            row = await admin_conn.fetchrow("SELECT * FROM iim.account_link WHERE id = $1", link_id)
            state = await admin_conn.fetchrow("SELECT * FROM iim.link_state WHERE id = $1", state_id)
            assert row is not None
            assert state is not None
            assert None not in (row["access_token_key"], row["refresh_token_key"], state["verifier_key"])
            async with admin_conn.transaction():
                await admin_conn.execute("SELECT set_config('app.tenant', $1, true)", str(tenant))
                for column, clear in (("access_token", access), ("refresh_token", refresh)):
                    value = Sealed(row[f"{column}_sealed"], row[f"{column}_key"])
                    assert await open_secret(admin_conn, Keyring(None, TEST_MASTER_KEY), tenant, ACCOUNT_LINK,
                                             link_id, column, value) == clear  # the envelope, no old key
            policy = service.running.policy
            assert policy is not None
            await policy.connectors.get("webhook").send_notification(_kitchen())
            assert vendor.received[-1].headers["Authorization"] == f"Bearer {access}"
        # Converted: the old key is no longer needed.
        async with Service(_settings(tmp_path, connectors=_webhook(vendor, auth)), database=urls) as service:
            policy = service.running.policy
            assert policy is not None
            await policy.connectors.get("webhook").send_notification(_kitchen())
            assert vendor.received[-1].headers["Authorization"] == f"Bearer {access}"


async def test_a_start_without_the_old_key_is_refused_while_tokens_in_the_old_format_remain(
        urls: DatabaseUrls, tmp_path: Path, admin_conn: Connection) -> None:
    tenant, household = await _demo_home(admin_conn)
    link_id, _access, _refresh = await legacy_link(admin_conn, tenant, household)
    before = await admin_conn.fetchrow("SELECT * FROM iim.account_link WHERE id = $1", link_id)
    with pytest.raises(ConfigError, match="IIM_LINK_TOKEN_KEY_REF") as refused:
        async with Service(_settings(tmp_path), database=urls):
            pass
    assert "1 account link(s) in 1 tenant(s)" in str(refused.value)
    assert await admin_conn.fetchrow("SELECT * FROM iim.account_link WHERE id = $1", link_id) == before


async def test_started_linkings_in_the_old_format_are_dropped_without_the_old_key_and_the_start_goes_on(
        urls: DatabaseUrls, tmp_path: Path, admin_conn: Connection, tokens: dict[str, str]) -> None:
    tenant, household = await _demo_home(admin_conn)
    await legacy_state(admin_conn, tenant, household)
    async with Service(_settings(tmp_path), database=urls) as service, aiohttp.ClientSession() as http:
        assert await admin_conn.fetchval("SELECT count(*) FROM iim.link_state") == 0
        base = f"http://127.0.0.1:{service.running.http_port}"
        async with http.get(f"{base}/oauth2/callback?state=x") as resp:
            assert resp.status == 400  # linking runs: the callback answers (an unknown state)


async def _demo_home(admin_conn: Connection) -> tuple[UUID, UUID]:
    await admin_conn.execute("DELETE FROM iim.link_state")
    row = await admin_conn.fetchrow("SELECT tenant_id, household_id FROM iim.device WHERE connector_ref = $1",
                                    "kitchen-speaker-1")
    assert row is not None
    return row["tenant_id"], row["household_id"]


def _kitchen() -> Notification:
    return Notification(target="kitchen-speaker-1", title="t", text="x")


@asynccontextmanager
async def _peers() -> AsyncIterator[tuple[VendorPeer, AuthorizationServer]]:
    vendor = VendorPeer()
    auth = AuthorizationServer(vendor)
    vendor_runner, vendor.url = await serve(vendor.app())
    auth_runner, auth.url = await serve(auth.app())
    try:
        yield vendor, auth
    finally:
        await auth_runner.cleanup()
        await vendor_runner.cleanup()
        await vendor.close()


def _webhook(vendor: VendorPeer, auth: AuthorizationServer) -> list[dict[str, object]]:
    return [{"name": "webhook", "plugin": "webhook", "config": {
        "base_url": vendor.url, "paths": {"send_notification": "/notify"},
        "signing_secret_ref": "env:IIM_TEST_VENDOR_SIGNING",
        "account_linking": {"authorize_url": f"{auth.url}/authorize", "token_url": f"{auth.url}/token",
                            "revocation_url": f"{auth.url}/revoke", "client_id": CLIENT_ID,
                            "client_secret_ref": "env:IIM_TEST_LINK_CLIENT",
                            "redirect_uri": auth.redirect_uri or "http://127.0.0.1/oauth2/callback",
                            "scope_names": SCOPES}}}]
