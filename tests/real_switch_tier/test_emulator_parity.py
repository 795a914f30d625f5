"""The real switch, with the project's configuration, answers the parity script as recorded in
``tests/data/emulator-parity.json`` (which the emulator must match: tests/fs_app/testing/test_emulator_parity.py),
and has exactly the applications the emulator knows (``fs_app.testing.modules``)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fs_app.testing import FreeSwitchEmulator, TargetBehaviour
from fs_app.testing.media import write_silent_wav
from fs_app.testing.modules import APPLICATIONS
from tests import sipp
from tests.esl_parity import RECORDED, Endpoints, confirm_outcome, endpoints, observe
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


@pytest.fixture
def confirming(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The call's far end, and a fork leg that answers after a second and presses 1 (RFC 2833) 1.5 s later."""
    ports = [free_port(), free_port()]
    with contextlib.ExitStack() as stack:
        stack.enter_context(sipp.core(tmp_path / "a", ports[0], "core_answer.xml", answer_ms=100))
        stack.enter_context(sipp.core(tmp_path / "d", ports[1], "core_answer_press_1.xml", answer_ms=1000))
        yield f"sofia/external/callee@127.0.0.1:{ports[0]}", f"sofia/external/mobile@127.0.0.1:{ports[1]}"


@pytest.mark.parametrize(("confirm", "outcome"), [
    # A per-leg group_confirm_cancel_timeout is not read: the leg_timeout (from the start) ends the leg first.
    ("group_confirm_cancel_timeout=1", "ALLOTTED_TIMEOUT ALLOTTED_TIMEOUT"),
    # A per-leg group_confirm_timeout gives the callee that long from the answer: the key comes in time.
    ("group_confirm_timeout=6", "bridged"),
])
async def test_a_late_confirming_leg_is_bridged_only_with_a_group_confirm_timeout_as_the_emulator_models(
        switch: RealSwitch, confirming: tuple[str, str], tmp_path: Path, confirm: str, outcome: str) -> None:
    callee, mobile = confirming
    prompt = write_silent_wav(tmp_path / "confirm.wav", 300)
    fork = f"{{ignore_early_media=true}}[leg_timeout=1,group_confirm_key=1,group_confirm_file={prompt},{confirm}]{mobile}"
    assert await confirm_outcome(switch.esl_port, switch.password, callee, fork) == outcome, switch.log_text()[-3000:]
    emu = FreeSwitchEmulator(time_scale=0.1, playback_ms=None, targets={
        callee: TargetBehaviour.answer(after_ms=100), mobile: TargetBehaviour.answer(after_ms=1000, dtmf="1")})
    server = await emu.start_inbound()
    try:
        assert await confirm_outcome(server.port, emu.password, callee, fork) == outcome
    finally:
        await emu.close()
