"""The real switch, with the project's configuration, answers the parity script as recorded in
``tests/data/emulator-parity.json`` (which the emulator must match: tests/fs_app/testing/test_emulator_parity.py),
and has exactly the applications the emulator knows (``fs_app.testing.modules``)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fs_app.testing.modules import APPLICATIONS
from tests import sipp
from tests.esl_parity import RECORDED, Endpoints, endpoints, observe
from tests.real_switch import RealSwitch, free_port, running_switch


@pytest.fixture(scope="module")
def switch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealSwitch]:
    with running_switch(tmp_path_factory.mktemp("freeswitch")) as real:
        yield real


@pytest.fixture
def callees(tmp_path: Path) -> Iterator[Endpoints]:
    """SIPp callees: the call's far end answers at once, one fork leg answers after a second, one rings."""
    ports = [free_port() for _ in range(3)]
    with contextlib.ExitStack() as stack:
        stack.enter_context(sipp.core(tmp_path / "a", ports[0], "core_answer.xml", answer_ms=100))
        stack.enter_context(sipp.core(tmp_path / "b", ports[1], "core_answer.xml", answer_ms=1000))
        stack.enter_context(sipp.core(tmp_path / "c", ports[2], "core_ring.xml"))
        yield endpoints(ports, free_port())


async def test_the_real_switch_answers_the_parity_script_as_recorded(
        switch: RealSwitch, callees: Endpoints, tmp_path: Path) -> None:
    seen = await observe(switch.esl_port, switch.password, callees, tmp_path / "files")
    assert seen == json.loads(RECORDED.read_text()), switch.log_text()[-3000:]
    log = switch.log_text()
    assert "Invalid Application voicemail" in log
    assert "Error Opening File" in log


def test_the_emulator_knows_exactly_the_applications_of_the_configured_modules(switch: RealSwitch) -> None:
    rows = json.loads(switch.api("show application as json"))["rows"]
    assert {row["name"] for row in rows} == APPLICATIONS
