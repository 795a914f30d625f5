"""Replays and identity refusals reach the tenant's audit log, and a flood of them is a couple of lines."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio

from iot_bridge.app import BRIDGE_KEY, Bridge, BridgeConfig, create_bridge_app
from iot_bridge.ratelimit import RateLimitSettings
from policy_cache import audit
from policy_cache.db import Pool, tenant_tx
from tests.alarm_rig import AlarmRig
from tests.iot_bridge.test_bridge_http import BridgeClient, _client_ssl, _serve, rig, tls_files

__all__ = ["rig", "tls_files"]


@pytest_asyncio.fixture
async def audited(app_pool: Pool, tls_files: tuple[Path, Path]) -> AsyncIterator[tuple[BridgeClient, Bridge]]:
    app = create_bridge_app(app_pool, BridgeConfig(rate_limits=RateLimitSettings(device_rate=1000,
                                                                                 device_burst=1000)))
    runner, port = await _serve(app, tls_files)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_client_ssl())) as session:
        yield BridgeClient(session, f"https://127.0.0.1:{port}"), app[BRIDGE_KEY]
    await runner.cleanup()


async def _lines(pool: Pool, rig: AlarmRig, action: str, count: int) -> list[dict[str, Any]]:
    """The tenant's chained audit lines of ``action`` once there are ``count`` of them (written off the
    request path, then chained by the flusher)."""
    deadline = time.monotonic() + 5
    while True:
        await audit.flush_pending(pool)
        async with tenant_tx(pool, rig.tenant_id) as conn:
            rows = [dict(r) for r in await conn.fetch(
                "SELECT actor, detail, correlation FROM iim.audit_log WHERE action = $1 ORDER BY id", action)]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.05)


async def test_a_replayed_event_is_audited_with_its_sender(
        audited: tuple[BridgeClient, Bridge], rig: AlarmRig, app_pool: Pool) -> None:
    client, _ = audited
    body = rig.event("smoke", event_id="ev-captured")
    for _ in range(2):
        assert (await client.post("/v1/events", body, rig.signed_headers(body)))[0] == 202
    [line] = await _lines(app_pool, rig, "event.replayed", 1)
    assert line["actor"] == f"device:{rig.sensor}"
    assert line["detail"]["source"] == "127.0.0.1"
    assert line["correlation"] == {"event_id": "ev-captured"}


async def test_identity_mismatches_are_audited(audited: tuple[BridgeClient, Bridge], rig: AlarmRig,
                                               app_pool: Pool) -> None:
    client, _ = audited
    body = rig.event("smoke", device=rig.doorphone)
    status, _, problem = await client.post("/v1/events", body, rig.signed_headers(body, device=rig.sensor))
    assert (status, problem["error_id"]) == (403, "identity-mismatch")
    [line] = await _lines(app_pool, rig, "event.identity-mismatch", 1)
    assert line["actor"] == f"device:{rig.sensor}"
    assert line["detail"]["status"] == 403
    assert "another device" in line["detail"]["reason"]


async def test_a_flood_of_replays_is_one_line_and_then_one_count_per_window(
        audited: tuple[BridgeClient, Bridge], rig: AlarmRig, app_pool: Pool) -> None:
    client, bridge = audited
    body = rig.event("smoke", event_id="ev-flooded")
    answers = await asyncio.gather(*(client.post("/v1/events", body, rig.signed_headers(body)) for _ in range(40)))
    assert {a[0] for a in answers} == {202}
    assert len(await _lines(app_pool, rig, "event.replayed", 2)) == 1
    bridge.refusals.close_windows(time.monotonic() + 3600)  # the window closes: its count goes out
    first, summary = await _lines(app_pool, rig, "event.replayed", 2)
    assert "repeats" not in first["detail"]
    assert summary["detail"]["repeats"] == 38  # 40 posts: one accepted, one replay written, 38 counted
    assert summary["detail"]["source"] == "127.0.0.1"
    assert json.dumps(summary["correlation"]) == json.dumps({"event_id": "ev-flooded"})


def test_an_actor_from_the_senders_text_is_made_to_fit_the_chain() -> None:
    from iot_bridge.refusals import _actor

    assert _actor("device:smoke-1") == "device:smoke-1"
    assert _actor(" device:\x00evil\n ") == "device:?evil?"
    assert _actor("\t") == "?"
    assert _actor("   ") == "unknown"
    assert len(_actor("x" * 500)) == 200
