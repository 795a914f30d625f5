"""Calls from the IMS core through the real switch's dialplan into ``iim serve`` and back out to the core."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests import sipp
from tests.real_switch import RealSwitch
from tests.real_switch_tier.conftest import Iim, Ports

UNKNOWN_SUBSCRIBER = "79100000005"  # matches the subscriber plan, has no policy: IIM passes it through


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
