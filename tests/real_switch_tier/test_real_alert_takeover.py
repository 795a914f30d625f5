"""A take-over on the real switch: the switch's own note of an alert call it created (``api_on_originate`` ->
mod_hash) outlives the call, so a worker taking over a call whose placer died asks it and never dials a call
the switch once took (before, a call that had rung and ended unseen was dialled again)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fs_app.dialstring import DialSettings
from fs_app.inbound import InboundClient, InboundSettings
from fs_app.outreach.calls import AlertCall, AlertCallPlacer, CallOutcomeKind, originate_command
from fs_app.outreach.ivr import IvrRegistry
from tests import sipp
from tests.real_switch import RealSwitch
from tests.real_switch_tier.conftest import Ports

MOBILE = "+79101119001"


@pytest.fixture
async def placer(real_switch: RealSwitch) -> AsyncIterator[AlertCallPlacer]:
    client = InboundClient(InboundSettings(host="127.0.0.1", port=real_switch.esl_port,
                                           password=real_switch.password, events=("BACKGROUND_JOB",)))
    await client.start()
    try:
        await client.wait_connected(10)
        yield AlertCallPlacer(client, IvrRegistry(), socket_address="127.0.0.1:9", api_timeout_s=5.0)
    finally:
        await client.aclose()


def _alert() -> AlertCall:
    return AlertCall(call_uuid=str(uuid.uuid4()), destination=MOBILE, caller_id_number="74950000000",
                     caller_id_name="IIM Alarm", ring_s=10, prompt=None, digits="1", tries=1, digit_timeout_s=3,
                     variables={"iim_incident_id": "inc-1", "iim_action_key": "call-1"})


def _legs(switch: RealSwitch, call_uuid: str) -> int:
    return sum(1 for line in switch.log_text().splitlines() if "New Channel" in line and call_uuid in line)


async def test_a_call_the_real_switch_took_and_ended_is_not_dialled_again_by_a_take_over(
        real_switch: RealSwitch, ports: Ports, placer: AlertCallPlacer, tmp_path: Path) -> None:
    call = _alert()
    with sipp.core(tmp_path, ports.core, "core_busy.xml"):
        # The dead placer's originate, straight on the switch: the callee is busy, nobody hears the result.
        command = originate_command(call, gateway_dial=DialSettings(), socket_address="127.0.0.1:9")
        reply = real_switch.api(command, timeout=20)
        assert reply.startswith("-ERR USER_BUSY"), reply
        assert real_switch.api(f"hash select/iim_originated/{call.call_uuid}") == "1"
        assert real_switch.api(f"uuid_exists {call.call_uuid}").strip() == "false"
        outcome = await placer.place_or_adopt(call)
    assert outcome.kind is CallOutcomeKind.FAILED, outcome
    assert "ended while its placer was gone" in outcome.detail
    assert _legs(real_switch, call.call_uuid) == 1, real_switch.log_text()[-3000:]
    await placer.forget(call.call_uuid)
    assert real_switch.api(f"hash select/iim_originated/{call.call_uuid}") == "-ERR no reply\n"


async def test_a_claimed_call_the_real_switch_never_saw_is_placed_by_the_take_over(
        real_switch: RealSwitch, ports: Ports, placer: AlertCallPlacer, tmp_path: Path) -> None:
    call = _alert()
    with sipp.core(tmp_path, ports.core, "core_busy.xml"):
        outcome = await placer.place_or_adopt(call)
    assert outcome.kind is CallOutcomeKind.BUSY, outcome
    assert _legs(real_switch, call.call_uuid) == 1
