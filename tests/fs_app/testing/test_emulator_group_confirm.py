"""``group_confirm_*`` on forked bridge legs, as switch_ivr_originate 1.10.12 runs them (measured on the real switch:
a missing confirm file hangs the answering leg up at once with DESTINATION_OUT_OF_ORDER, an answered leg that
never presses is hung up at its ``leg_timeout`` with ALLOTTED_TIMEOUT even with a per-leg
``group_confirm_cancel_timeout``, and the other legs keep ringing meanwhile)."""

from __future__ import annotations

from pathlib import Path

from fs_app.esl import Event, Execute, HangupCmd
from fs_app.testing import FreeSwitchEmulator, TargetBehaviour
from fs_app.testing.media import write_silent_wav
from fs_app.testing.peers import EslPeer
from tests.fs_app.testing.test_emulator_outbound import finish, run_call, start

MOBILE, SPEAKER = "sofia/gateway/ims/79001234567", "sofia/internal/speaker@127.0.0.1:5099"


def _causes(done: Event) -> list[str]:
    value = done.variable("originate_causes") or ""
    return [item.partition(";")[2] for item in value.removeprefix("ARRAY::").split("|:")]


async def _bridge(emu: FreeSwitchEmulator, arg: str) -> Event:
    done: list[Event] = []

    async def app(peer: EslPeer) -> None:
        await start(peer)
        peer.send(Execute(app="set", arg="continue_on_fail=true", event_uuid="s"))
        peer.send(Execute(app="bridge", arg=arg, event_uuid="b"))
        done.append(await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="bridge", timeout=10))
        peer.send(HangupCmd())
        await finish(peer)

    await run_call(app, emu=emu)
    return done[0]


def _fork(confirm: str, *, mobile_timeout: int = 3, speaker_timeout: int = 2) -> str:
    return (f"{{ignore_early_media=true}}[leg_timeout={mobile_timeout},group_confirm_key=1,{confirm}]{MOBILE},"
            f"[leg_timeout={speaker_timeout}]{SPEAKER}")


async def test_a_leg_whose_confirm_file_is_missing_is_hung_up_as_it_answers_and_the_others_ring_on(
        tmp_path: Path) -> None:
    emu = FreeSwitchEmulator(time_scale=0.05, targets={
        MOBILE: TargetBehaviour.answer(after_ms=1000, dtmf="1"), SPEAKER: TargetBehaviour.no_answer()})
    done = await _bridge(emu, _fork(f"group_confirm_file={tmp_path / 'missing.wav'}"))
    assert done.variable("originate_disposition") == "DESTINATION_OUT_OF_ORDER"
    assert done.variable("DIALSTATUS") == "INVALIDARGS"
    assert _causes(done) == ["DESTINATION_OUT_OF_ORDER", "ALLOTTED_TIMEOUT"]


async def test_the_callee_who_presses_the_key_after_the_prompt_wins_the_fork(tmp_path: Path) -> None:
    prompt = write_silent_wav(tmp_path / "confirm.wav", 1500)
    emu = FreeSwitchEmulator(time_scale=0.05, playback_ms=None, targets={
        MOBILE: TargetBehaviour.answer(after_ms=1000, hangup_after_ms=100, dtmf="1"),
        SPEAKER: TargetBehaviour.no_answer()})
    done = await _bridge(emu, _fork(f"group_confirm_file={prompt}", mobile_timeout=20, speaker_timeout=20))
    assert done.variable("originate_disposition") == "SUCCESS"
    assert _causes(done) == ["NONE", "LOSE_RACE"]


async def test_a_wrong_key_is_asked_again_and_the_right_one_then_wins(tmp_path: Path) -> None:
    prompt = write_silent_wav(tmp_path / "confirm.wav", 500)
    emu = FreeSwitchEmulator(time_scale=0.05, playback_ms=None, targets={
        MOBILE: TargetBehaviour.answer(after_ms=500, hangup_after_ms=100, dtmf="21"),
        SPEAKER: TargetBehaviour.no_answer()})
    done = await _bridge(emu, _fork(f"group_confirm_file={prompt}", mobile_timeout=20, speaker_timeout=20))
    assert done.variable("originate_disposition") == "SUCCESS"


async def test_a_silent_callee_is_hung_up_at_its_leg_timeout_despite_a_per_leg_cancel_timeout(
        tmp_path: Path) -> None:
    # Carrier voicemail "answers" and never presses: it must not win, and the speaker keeps ringing meanwhile.
    prompt = write_silent_wav(tmp_path / "confirm.wav", 500)
    emu = FreeSwitchEmulator(time_scale=0.05, playback_ms=None, targets={
        MOBILE: TargetBehaviour.answer(after_ms=500), SPEAKER: TargetBehaviour.answer(after_ms=2500,
                                                                                  hangup_after_ms=100)})
    done = await _bridge(emu, _fork(f"group_confirm_file={prompt},group_confirm_cancel_timeout=1",
                                    mobile_timeout=2, speaker_timeout=5))
    assert done.variable("originate_disposition") == "SUCCESS"
    assert _causes(done) == ["ALLOTTED_TIMEOUT", "NONE"]


async def test_a_per_leg_group_confirm_timeout_gives_the_callee_that_long_from_the_answer(tmp_path: Path) -> None:
    prompt = write_silent_wav(tmp_path / "confirm.wav", 1500)
    late = {MOBILE: TargetBehaviour.answer(after_ms=2500, hangup_after_ms=100, dtmf="1"),
            SPEAKER: TargetBehaviour.no_answer()}
    # Answered 0.5 s before its leg_timeout and pressing after the 1.5 s prompt, it wins with 10 s to confirm;
    # without them the leg_timeout ends it first.
    done = await _bridge(FreeSwitchEmulator(time_scale=0.05, playback_ms=None, targets=late),
                         _fork(f"group_confirm_file={prompt},group_confirm_timeout=10", speaker_timeout=20))
    assert done.variable("originate_disposition") == "SUCCESS"
    done = await _bridge(FreeSwitchEmulator(time_scale=0.05, playback_ms=None, targets=late),
                         _fork(f"group_confirm_file={prompt}", speaker_timeout=5))
    assert _causes(done) == ["ALLOTTED_TIMEOUT", "ALLOTTED_TIMEOUT"]
