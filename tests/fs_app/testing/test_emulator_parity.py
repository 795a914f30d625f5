"""The emulator refuses what FreeSWITCH 1.10.12 refuses, with its replies: the script of ``tests/esl_parity.py``
run against the emulator gives what the real switch gave (``tests/data/emulator-parity.json``; the real-switch
tier runs the same script against the switch itself)."""

from __future__ import annotations

import json
from pathlib import Path

from fs_app.testing import FreeSwitchEmulator, TargetBehaviour
from tests.esl_parity import RECORDED, endpoints, observe
from tests.real_switch import free_port


async def test_the_emulator_answers_the_parity_script_as_the_real_switch_did(tmp_path: Path) -> None:
    ep = endpoints([free_port(), free_port(), free_port()], free_port())
    emu = FreeSwitchEmulator(time_scale=0.05, playback_ms=None, targets={
        ep.callee: TargetBehaviour.answer(after_ms=100), ep.answers: TargetBehaviour.answer(after_ms=1000),
        ep.rings: TargetBehaviour.no_answer()})
    server = await emu.start_inbound()
    try:
        seen = await observe(server.port, emu.password, ep, tmp_path)
    finally:
        await emu.close()
    assert seen == json.loads(RECORDED.read_text())
    assert [app for _, app in emu.invalid_applications] == ["voicemail"]
