"""An operator's test call on the real switch: ``POST /v1/tenants/T/test-calls`` rings the owner through
FreeSWITCH (the IMS core is SIPp), the owner answers and presses 1 (RFC 2833), and the API answers with the
outcome: answered, key 1, confirmed. The switch fetches the call's prompts from IIM over HTTP, as for an alarm."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from iim.admin.auth import hash_token
from tests import sipp
from tests.alarm_rig import AlarmRig
from tests.pg import PgDatabase, run_sync
from tests.real_switch import RealSwitch
from tests.real_switch_tier import alert_rig
from tests.real_switch_tier.conftest import Iim, Ports, start_iim, stop_iim

NUMBERS = ("+79002230001", "+79002230002", "+79002230003")
TOKEN = "operator-test-call-token"


@pytest.fixture(scope="module")
def rig(pg_db: PgDatabase, tmp_path_factory: pytest.TempPathFactory) -> AlarmRig:
    return run_sync(alert_rig.household(pg_db, tmp_path_factory.mktemp("test-call-rig"), *NUMBERS))


@pytest.fixture(scope="module")
def iim(real_switch: RealSwitch, pg_db: PgDatabase, ports: Ports, rig: AlarmRig,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Iim]:
    tokens = {hash_token(TOKEN): {"actor": "noc@test", "role": "operator", "tenant": str(rig.tenant_id)}}
    served = start_iim(real_switch, pg_db, ports.iim_primary, tmp_path_factory.mktemp("iim"), audio_over_http=True,
                       env={"IIM_ADMIN_TOKENS_REF": "env:IIM_TEST_CALL_TOKENS",
                            "IIM_TEST_CALL_TOKENS": json.dumps(tokens)})
    yield served
    stop_iim(served)


async def test_an_operators_test_call_is_answered_and_confirmed_with_1_on_the_real_switch(
        real_switch: RealSwitch, iim: Iim, ports: Ports, rig: AlarmRig, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{iim.http_port}/v1/tenants/{rig.tenant_id}/test-calls"
    # Answers 2 s after ringing, presses 1 while the prompt plays.
    with sipp.core(tmp_path, ports.core, "core_answer_press_1.xml", answer_ms=2000):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session, session.post(
                url, json={"household_id": str(rig.household_id), "contact": rig.owner},
                headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            status, body = resp.status, await resp.json()
    context = f"{body}\n{iim.log_text()[-3000:]}\n{real_switch.log_text()[-3000:]}"
    assert status == 200, context
    assert (body["outcome"], body["digit"], body["confirmed"]) == ("answered", "1", True), context
    assert body["destination"] == rig.owner
