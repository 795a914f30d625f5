"""``iim serve`` with account linking: the callback on IIM's HTTP site, the admin routes, the connectors using
the household's token; and without a token key, linking is off and says so (503), nothing else changes."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from iim.connectors.contract import Notification
from iim.service import DatabaseUrls, Service
from iim.settings import Settings
from policy_cache.bootstrap import load_demo
from policy_cache.db import Connection, Pool
from tests.connector_peer import SIGNING_SECRET_TEXT, VendorPeer, serve
from tests.oauth_peer import CLIENT_ID, CLIENT_SECRET, SCOPES, AuthorizationServer
from tests.pg import PgDatabase


@pytest.fixture
async def urls(pg_db: PgDatabase, app_pool: Pool, admin_conn: Connection) -> DatabaseUrls:
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
        urls: DatabaseUrls, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokens: dict[str, str]) -> None:
    monkeypatch.setenv("IIM_TEST_LINK_KEY", "22" * 32)
    monkeypatch.setenv("IIM_TEST_VENDOR_SIGNING", SIGNING_SECRET_TEXT)
    monkeypatch.setenv("IIM_TEST_LINK_CLIENT", CLIENT_SECRET)
    vendor = VendorPeer()
    auth = AuthorizationServer(vendor)
    vendor_runner, vendor.url = await serve(vendor.app())
    auth_runner, auth.url = await serve(auth.app())
    port = _free_port()
    auth.redirect_uri = f"http://127.0.0.1:{port}/oauth2/callback"
    settings = _settings(tmp_path, http_port=port, link_token_key_ref="env:IIM_TEST_LINK_KEY", connectors=[{
        "name": "webhook", "plugin": "webhook", "config": {
            "base_url": vendor.url, "paths": {"send_notification": "/notify"},
            "signing_secret_ref": "env:IIM_TEST_VENDOR_SIGNING",
            "account_linking": {"authorize_url": f"{auth.url}/authorize", "token_url": f"{auth.url}/token",
                                "revocation_url": f"{auth.url}/revoke", "client_id": CLIENT_ID,
                                "client_secret_ref": "env:IIM_TEST_LINK_CLIENT", "redirect_uri": auth.redirect_uri,
                                "scope_names": SCOPES}}}])
    try:
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
            await policy.connectors.get("webhook").send_notification(
                Notification(target="kitchen-speaker-1", title="t", text="x"))
            assert vendor.received[0].headers["Authorization"].removeprefix("Bearer ") in vendor.valid_tokens
            async with http.get(f"{base}/openapi.json") as resp:
                paths = (await resp.json())["paths"]
            assert set(paths["/v1/tenants/{tenant_id}/households/{id}/connectors/{name}/links"]) == {
                "post", "get", "delete"}
    finally:
        await auth_runner.cleanup()
        await vendor_runner.cleanup()
        await vendor.close()


async def test_without_a_token_key_linking_is_off_and_says_so(urls: DatabaseUrls, tmp_path: Path,
                                                              tokens: dict[str, str]) -> None:
    async with Service(_settings(tmp_path), database=urls) as service, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{service.running.http_port}"
        async with http.get(f"{base}/v1/tenants", headers=tokens) as resp:
            tenant = (await resp.json())["items"][0]["id"]
        links = f"{base}/v1/tenants/{tenant}/households/{tenant}/connectors/webhook/links"
        async with http.post(links, headers=tokens, json={"scopes": ["read_events"]}) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"]
        async with http.get(f"{base}/oauth2/callback?state=x") as resp:
            assert resp.status == 404
