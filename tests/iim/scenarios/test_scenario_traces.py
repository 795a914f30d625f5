"""The alarm's span tree: bridge request -> intake -> decision -> originate -> the call's events (answer, key, hang-up).

Real PostgreSQL, the device bridge over HTTP, the FreeSWITCH emulator over real sockets (inbound ESL for the
originate, our outbound server for the IVR it dials back); spans recorded by the SDK's in-memory exporter.
The trace context reaches the switch as the ``iim_traceparent`` channel variable and comes back on the call's
socket; it is stored with the call, so a call placed by another worker (a take-over) joins the same trace.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import pytest_asyncio
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from fs_app.testing import TargetBehaviour
from iim.core.tracing import CHANNEL_VARIABLE
from iim.scenarios.worker import IncidentWorker, WorkerSettings
from iot_bridge.app import BridgeConfig, create_bridge_app
from iot_bridge.ratelimit import RateLimitSettings
from policy_cache.db import Pool, tenant_tx
from tests.conftest import eventually
from tests.iim.scenarios.test_scenario_worker import Alarms, alarms_rig
from tests.tracing_rig import Spans, is_child

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest_asyncio.fixture
async def alarms(app_pool: Pool, pg_db: Any, tmp_path: Path) -> AsyncIterator[Alarms]:
    async with alarms_rig(app_pool, pg_db, tmp_path) as rig:
        yield rig


async def _post_event(alarms: Alarms, body: bytes, headers: dict[str, str], *, opener: Any) -> dict[str, Any]:
    """``POST /v1/events`` on a bridge whose opener starts incidents (the worker's ``begin_in``)."""
    config = BridgeConfig(rate_limits=RateLimitSettings(device_rate=100, device_burst=100))
    runner = web.AppRunner(create_bridge_app(alarms.pool, config, opener=opener), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session, \
                session.post(f"http://127.0.0.1:{port}/v1/events", data=body, headers=headers) as resp:
            answer: dict[str, Any] = await resp.json(content_type=None)
            assert resp.status == 202, answer
            return answer
    finally:
        await runner.cleanup()


def _attr(span: ReadableSpan, name: str) -> object:
    return (span.attributes or {}).get(f"iim.{name}")


def _no_numbers(spans: Spans, *numbers: str) -> None:
    for span in spans.all():
        for value in (span.attributes or {}).values():
            for number in numbers:
                assert number.lstrip("+") not in str(value), f"{span.name} carries a phone number"


async def test_bridge_intake_decision_originate_and_call_events_form_one_tree_under_the_callers_trace(
        alarms: Alarms, spans: Spans) -> None:
    rig = alarms.rig
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=200, dtmf="2"))
    body = rig.event("smoke")
    event_id = json.loads(body)["event_id"]
    answer = await _post_event(alarms, body, rig.signed_headers(body) | {"traceparent": CALLER},
                               opener=alarms.worker.begin_in)
    incident = UUID(answer["incident_id"])
    assert await alarms.settled(incident) == "false_alarm"
    await eventually(lambda: len(spans.named("alert_call.originate")) == 1, timeout=10)

    request = spans.one("POST /v1/events")
    assert request.kind is SpanKind.SERVER
    assert f"{request.context.trace_id:032x}" == TRACE_ID  # joined the caller's trace
    assert request.parent is not None
    assert f"{request.parent.span_id:016x}" == CALLER[36:52]
    assert (request.attributes or {})["http.response.status_code"] == 202

    intake = spans.one("bridge.intake")
    assert is_child(intake, request)
    assert _attr(intake, "event_id") == event_id
    assert _attr(intake, "tenant") == str(rig.tenant_id)
    assert _attr(intake, "outcome") == "accepted"
    assert _attr(intake, "incident_id") == str(incident)

    decide = spans.one("scenario.decide", state="notifying")
    assert is_child(decide, intake)
    assert _attr(decide, "incident_id") == str(incident)
    assert _attr(decide, "event_id") == event_id

    originate = spans.one("alert_call.originate")
    assert is_child(originate, decide)
    assert originate.kind is SpanKind.CLIENT
    assert _attr(originate, "outcome") == "answered"
    assert _attr(originate, "digit") == "2"
    assert _attr(originate, "destination_kind") == "e164"
    call_id = _attr(originate, "call_id")

    # The switch was handed the originate span's context, and the call's events came back under it.
    (sent,) = alarms.emu.originates_to(rig.owner)
    assert sent.variables[CHANNEL_VARIABLE] == f"00-{TRACE_ID}-{originate.context.span_id:016x}-01"
    for name in ("alert_call.answered", "alert_call.dtmf", "alert_call.hangup"):
        event = spans.one(name)
        assert is_child(event, originate), name
        assert _attr(event, "call_id") == call_id
        assert _attr(event, "incident_id") == str(incident)
    assert _attr(spans.one("alert_call.dtmf"), "digit") == "2"
    assert _attr(spans.one("alert_call.answered"), "adopted") is False

    # The next decision (false alarm) follows from the call's outcome: a child of the originate.
    assert is_child(spans.one("scenario.decide", state="false_alarm"), originate)
    assert {s.context.trace_id for s in spans.all()} == {int(TRACE_ID, 16)}
    _no_numbers(spans, rig.owner, rig.backup, rig.security)


async def test_a_call_taken_over_by_another_worker_joins_the_trace_of_the_decision_stored_with_it(
        alarms: Alarms, pg_db: Any, spans: Spans) -> None:
    rig = alarms.rig
    async with tenant_tx(alarms.pool, rig.tenant_id) as conn:  # far below the caps: claimed with the decision
        await conn.execute("INSERT INTO iim.originate_limit (max_concurrent, max_per_hour) VALUES (10000, 1000000)")
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=200, dtmf="1"))

    async def claim_and_die(conn: Any, tenant: UUID, incident: UUID) -> None:
        await alarms.worker.begin_in(conn, tenant, incident)  # the call is claimed; this "process" dies here

    second = IncidentWorker(alarms.pool, pg_db.app_url, alarms.worker.placer, WorkerSettings(
        unsent_grace_s=0.3, unsent_interval_s=0.1), keyring=alarms.worker.keyring)
    async with second:
        incident = await alarms.raise_alarm("smoke", opener=claim_and_die)
        assert await alarms.settled(incident) == "acknowledged"
        await eventually(lambda: len(spans.named("alert_call.originate")) == 1, timeout=10)

    decide = spans.one("scenario.decide", state="notifying")
    stored = await alarms.rows("SELECT spec->>'traceparent' AS traceparent FROM iim.incident_action "
                               "WHERE incident_id = $1 AND kind = 'call'", incident)
    flags = int(decide.context.trace_flags)
    assert stored == [{"traceparent": f"00-{decide.context.trace_id:032x}-{decide.context.span_id:016x}-{flags:02x}"}]
    originate = spans.one("alert_call.originate")
    assert is_child(originate, decide)  # placed by the other worker, from the stored context
    assert _attr(originate, "adopted") is True
    for name in ("alert_call.answered", "alert_call.dtmf", "alert_call.hangup"):
        assert is_child(spans.one(name), originate), name


async def test_with_tracing_off_nothing_is_recorded_nor_sent_to_the_switch(alarms: Alarms) -> None:
    rig = alarms.rig
    alarms.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="2"))
    incident = await alarms.raise_alarm("smoke", opener=alarms.worker.begin_in)
    assert await alarms.settled(incident) == "false_alarm"
    (sent,) = alarms.emu.originates_to(rig.owner)
    assert CHANNEL_VARIABLE not in sent.variables
    stored = await alarms.rows("SELECT spec ? 'traceparent' AS traced FROM iim.incident_action "
                               "WHERE incident_id = $1 AND kind = 'call'", incident)
    assert stored == [{"traced": False}]
