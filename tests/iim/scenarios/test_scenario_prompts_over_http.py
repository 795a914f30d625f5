"""Alert prompts handed to the switch as URLs on IIM's HTTP site (``IIM_SWITCH_AUDIO_BASE_URL``), through the
emulator, which fetches ``http_cache://`` prompts over HTTP as mod_http_cache does: the callee hears the
prompt rendered while the phone rang, and a URL the site does not serve fails the IVR as on the real switch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from fs_app.testing import TargetBehaviour
from iim.tts.engine import EspeakTts
from iim.tts.switch_audio import SwitchAudio, switch_audio_routes
from policy_cache.db import Pool
from tests.iim.scenarios.test_scenario_worker import _played, alarms_rig
from tests.real_switch import free_port

SECRET = b"p" * 32


async def _site(audio: SwitchAudio, tts: EspeakTts, port: int) -> web.AppRunner:
    app = web.Application()
    app.add_routes(switch_audio_routes(audio, tts))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def test_the_prompt_rendered_while_ringing_is_fetched_by_the_switch_and_the_callee_confirms(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    tts = EspeakTts(tmp_path / "tts")
    url = f"http://127.0.0.1:{free_port()}"
    audio = SwitchAudio(SECRET, url)
    runner = await _site(audio, tts, int(url.rsplit(":", 1)[1]))
    try:
        async with alarms_rig(app_pool, pg_db, tmp_path, speech=tts, time_scale=0.1,
                              prompt_location=audio.playable) as alarms:
            alarms.emu.keep_results = True
            rig = alarms.rig
            alarms.script(rig.owner, TargetBehaviour.answer(after_ms=15_000, dtmf="1"))  # x0.1: rings 1.5 s
            incident = await alarms.raise_alarm("smoke")
            assert await alarms.settled(incident) == "acknowledged"
            [prompt] = _played(alarms)
            notes = await alarms.rows("SELECT 1 FROM iim.audit_log WHERE entity_id = $1 AND action = "
                                      "'incident.degraded'", str(incident))
            fetched = alarms.emu.http_cache.fetched
    finally:
        await runner.cleanup()
        await tts.aclose()
    assert prompt.startswith(f"http_cache://{url}/v1/audio/")
    assert fetched == [prompt.removeprefix("http_cache://")]
    assert notes == []  # its own prompt, rendered in time: not the generic one
    assert str(tmp_path) not in prompt


async def test_a_prompt_url_the_site_refuses_fails_the_ivr_and_the_key_pressed_is_not_heard(
        app_pool: Pool, pg_db: Any, tmp_path: Path) -> None:
    tts = EspeakTts(tmp_path / "tts")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    audio = SwitchAudio(SECRET, url)
    runner = await _site(SwitchAudio(b"q" * 32, url), tts, port)  # another IIM's site (a mis-set base URL)
    try:
        async with alarms_rig(app_pool, pg_db, tmp_path, speech=tts, time_scale=0.1,
                              prompt_location=audio.playable) as alarms:
            rig = alarms.rig
            alarms.script(rig.owner, TargetBehaviour.answer(after_ms=5_000, dtmf="1"))
            incident = await alarms.raise_alarm("smoke")
            assert await alarms.settled(incident, timeout=30) != "acknowledged"
            owner = await alarms.rows("SELECT outcome FROM iim.incident_action WHERE incident_id = $1 "
                                      "AND destination = $2 AND kind = 'call'", incident, rig.owner)
            failed = list(alarms.emu.http_cache.failed)
    finally:
        await runner.cleanup()
        await tts.aclose()
    assert owner == [{"outcome": "no_input"}]
    assert failed
    assert all(f.startswith(f"{url}/v1/audio/") for f in failed)
