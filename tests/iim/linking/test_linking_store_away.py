"""PostgreSQL away (the path to it cut by a TCP proxy): the callback page says "try again" (503 with
``Retry-After``), starting a linking is :class:`LinkingUnavailable`, and a connector asking for a household's
token gets :class:`ConnectorUnavailable` (its fallback) -- each within the store's deadline, none hangs."""

from __future__ import annotations

import time

import aiohttp
import pytest
from aiohttp import web

from iim.connectors.contract import ConnectorUnavailable, LinkScope
from iim.connectors.registry import ConnectorRegistry, default_context
from iim.keys.keyring import Keyring
from iim.linking.flow import new_state
from iim.linking.http import callback_routes
from iim.linking.service import LinkingService, LinkingUnavailable
from policy_cache.db import DbRole, connect_pool
from tests.connector_peer import serve
from tests.pg import TEST_MASTER_KEY, PgDatabase
from tests.tcp_proxy import TcpFaultProxy


async def test_with_postgresql_cut_off_linking_answers_try_again_within_its_deadline(
        pg_db: PgDatabase) -> None:
    app_proxy, cache_proxy = TcpFaultProxy(pg_db.app_url), TcpFaultProxy(pg_db.cache_url)
    await app_proxy.start()
    await cache_proxy.start()
    pool = await connect_pool(app_proxy.dsn(), role=DbRole.APP, min_size=1, max_size=2, command_timeout=2.0,
                              acquire_timeout=2.0)
    directory = await connect_pool(cache_proxy.dsn(), role=DbRole.CACHE, min_size=1, max_size=2,
                                   command_timeout=2.0, acquire_timeout=2.0)
    registry = ConnectorRegistry(default_context(), factories={})
    linking = LinkingService(lambda: pool, lambda: directory, lambda: registry, Keyring(pool, TEST_MASTER_KEY),
                             deadline_s=2.0)
    app = web.Application()
    callback_routes(app, linking)
    runner, url = await serve(app)
    try:
        async with linking, aiohttp.ClientSession() as http:
            app_proxy.cut()
            cache_proxy.cut()
            began = time.monotonic()
            async with http.get(f"{url}/oauth2/callback", params={"state": new_state(), "code": "c"}) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "30"
            with pytest.raises(ConnectorUnavailable):
                await linking.access_token("webhook", "kitchen-speaker-1", LinkScope.SEND_NOTIFICATIONS)
            with pytest.raises(LinkingUnavailable):
                await linking.refresh_due(within_s=300)
            assert time.monotonic() - began < 3 * 2.0 + 5.0
            app_proxy.restore()
            async with http.get(f"{url}/oauth2/callback", params={"state": new_state(), "code": "c"}) as resp:
                assert resp.status == 400  # the store answers again: an unknown state, the usual page
    finally:
        await runner.cleanup()
        await pool.close()
        await directory.close()
        await app_proxy.close()
        await cache_proxy.close()
