"""Calls from the IMS core through the real switch's dialplan into ``iim serve`` and back out to the core."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from uuid import uuid4

import asyncpg
import pytest

from policy_cache import registry
from policy_cache.db import DbRole, connect_pool, tenant_tx
from policy_cache.models import PolicyCreate, SubscriberCreate, TenantCreate
from tests import sipp
from tests.pg import PgDatabase, run_sync
from tests.real_switch import RealSwitch
from tests.real_switch_tier.conftest import Iim, Ports

UNKNOWN_SUBSCRIBER = "79100000005"  # matches the subscriber plan, has no policy: IIM passes it through
#: a subscriber whose policy blocks the SIPp caller (79160000000, sent without +): IIM rejects its calls
GUARDED = "+79101110003"


@pytest.fixture(scope="module")
def households(pg_db: PgDatabase) -> None:
    async def create() -> None:
        pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=1)
        try:
            async with tenant_tx(pool, uuid4()) as tx:
                await registry.create(tx, registry.TENANT, TenantCreate(name="guarded"), actor="test")
                sub = await registry.create(tx, registry.SUBSCRIBER, SubscriberCreate(msisdn=GUARDED), actor="test")
                await registry.create(tx, registry.POLICY, PolicyCreate(
                    subscriber_id=sub.id, blocked_callers=["+79160000000"]), actor="test")
        finally:
            await pool.close()

    run_sync(create())


def _call_ended(iim: Iim, at_least: int = 0, timeout: float = 5.0) -> list[dict[str, object]]:
    """IIM's "call ended" log lines, once there are ``at_least`` of them (IIM logs after the socket closes)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in iim.log_text().splitlines() if line.startswith("{")]
        ended = [line for line in lines if line.get("msg") == "call ended"]
        if len(ended) >= at_least or time.monotonic() > deadline:
            return ended
        time.sleep(0.05)


def test_a_number_without_a_policy_is_routed_by_iim_to_the_core_and_answered(
        real_switch: RealSwitch, iim: Iim, ports: Ports, tmp_path: Path) -> None:
    before = len(_call_ended(iim))
    with sipp.core(tmp_path, ports.core, "core_answer.xml"):
        result = sipp.call(tmp_path, real_switch.external_sip_port, UNKNOWN_SUBSCRIBER)
    assert result.finals == [200], result.output
    ended = _call_ended(iim, before + 1)[before:]
    assert [(line["result"], line["hangup_cause"]) for line in ended] == [("ok", "NORMAL_CLEARING")]


def test_a_call_that_already_went_through_iim_is_refused_as_a_loop(
        real_switch: RealSwitch, iim: Iim, tmp_path: Path) -> None:
    result = sipp.call(tmp_path, real_switch.external_sip_port, UNKNOWN_SUBSCRIBER, extra="X-IIM-Served: 1")
    assert result.finals == [482], result.output


def test_a_number_outside_the_subscriber_plan_is_refused_without_reaching_iim(
        real_switch: RealSwitch, iim: Iim, tmp_path: Path) -> None:
    before = len(_call_ended(iim))
    result = sipp.call(tmp_path, real_switch.external_sip_port, "12345")
    assert result.finals == [404], result.output
    assert len(_call_ended(iim)) == before


def test_a_busy_callee_gives_the_caller_486_and_iim_logs_the_cause(
        real_switch: RealSwitch, iim: Iim, ports: Ports, tmp_path: Path) -> None:
    before = len(_call_ended(iim))
    with sipp.core(tmp_path, ports.core, "core_busy.xml"):
        result = sipp.call(tmp_path, real_switch.external_sip_port, UNKNOWN_SUBSCRIBER)
    assert result.finals == [486], result.output
    assert [line["hangup_cause"] for line in _call_ended(iim, before + 1)[before:]] == ["USER_BUSY"]


async def _routed(pg_db: PgDatabase, msisdn: str, at_least: int, timeout: float = 10.0) -> list[dict[str, object]]:
    """The subscriber's ``call.routed`` audit rows (IIM writes them off the call path), once there are enough."""
    conn = await asyncpg.connect(pg_db.admin_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows = await conn.fetch(
                "SELECT a.detail FROM iim.audit_log a JOIN iim.subscriber s ON s.tenant_id = a.tenant_id "
                "AND a.entity_id = s.id::text WHERE s.msisdn = $1 AND a.action = 'call.routed' ORDER BY a.id",
                msisdn)
            if len(rows) >= at_least or time.monotonic() > deadline:
                return [json.loads(r[0]) if isinstance(r[0], str) else dict(r[0]) for r in rows]
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


@pytest.mark.parametrize(("dialled", "caller"), [
    (GUARDED, "+79160000000"),  # as before: E.164 both ways
    ("8" + GUARDED[2:], "+79160000000"),  # the national form: passed through unrouted before
    ("810" + GUARDED[1:], "+79160000000"),  # the international prefix
    (GUARDED[1:], "79160000000"),  # the caller without +: missed the E.164 caller list before
    (GUARDED, "89160000000"),  # the caller in national form
])
async def test_a_subscribers_national_and_international_forms_reach_its_policy_on_the_real_switch(
        real_switch: RealSwitch, iim: Iim, ports: Ports, pg_db: PgDatabase, tmp_path: Path, dialled: str,
        caller: str) -> None:
    """Issue 15 item 4: the dialplan took 8XXXXXXXXXX to IIM, whose cache only stripped +, so the call went to
    the core unrouted (200 from the core here) instead of meeting the policy (the blocked caller: 603); and a
    caller sent without + or in national form never matched the policy's E.164 caller list."""
    before = len(await _routed(pg_db, GUARDED, 0, timeout=0))
    with sipp.core(tmp_path, ports.core, "core_answer.xml"):
        result = await asyncio.to_thread(sipp.call, tmp_path, real_switch.external_sip_port, dialled,
                                         caller=caller)
    assert result.finals == [603], result.output + iim.log_text()[-3000:]
    rows = (await _routed(pg_db, GUARDED, before + 1))[before:]
    assert [(r["route"], r["action"], r["rules"][-1]) for r in rows] == [
        ("reject", "reject", "caller +79160000000 is blocked: reject")]
