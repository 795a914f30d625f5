"""When IIM is not there, subscriber calls still connect: the secondary IIM, then the dialplan's safe bridge."""

from __future__ import annotations

import re
from pathlib import Path

from tests import sipp
from tests.pg import PgDatabase
from tests.real_switch import RealSwitch
from tests.real_switch_tier.conftest import Ports, start_iim, stop_iim

SUBSCRIBER_NUMBER = "79100000007"


def test_with_no_iim_listening_the_dialplan_bridges_the_call_itself(
        real_switch: RealSwitch, ports: Ports, tmp_path: Path) -> None:
    with sipp.core(tmp_path, ports.core, "core_answer.xml"):
        result = sipp.call(tmp_path, real_switch.external_sip_port, SUBSCRIBER_NUMBER)
    assert result.finals == [200], result.output
    assert f"no controller took [{SUBSCRIBER_NUMBER}]" in real_switch.log_text()


def test_the_secondary_iim_takes_the_call_when_the_primary_is_down(
        real_switch: RealSwitch, ports: Ports, pg_db: PgDatabase, tmp_path: Path) -> None:
    secondary = start_iim(real_switch, pg_db, ports.iim_secondary, tmp_path / "iim")
    try:
        with sipp.core(tmp_path, ports.core, "core_answer.xml"):
            result = sipp.call(tmp_path, real_switch.external_sip_port, "79100000008")
    finally:
        stop_iim(secondary)
    assert result.finals == [200], result.output
    assert '"msg": "call ended"' in secondary.log_text()
    assert "no controller took [79100000008]" not in real_switch.log_text()


def test_the_safe_bridge_gateway_does_not_depend_on_the_core_answering_options(real_switch: RealSwitch) -> None:
    status = real_switch.api("sofia status gateway ims")
    fields = dict(re.findall(r"^(\w+)\s+(.*)$", status, flags=re.MULTILINE))
    assert fields.get("PingFreq") == "0", status
    assert fields.get("Status") == "UP", status

