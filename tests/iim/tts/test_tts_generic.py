"""The generic alert prompt (``iim.tts.generic``) and speech health: shipped recordings that need no engine,
and ``health()`` saying ``degraded`` while libespeak-ng really fails (a library that is not there, a voice
that does not exist)."""

from __future__ import annotations

import time
import wave
from array import array
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from iim.http import create_app
from iim.tts import espeak, generic
from iim.tts.engine import EspeakTts, TtsUnavailable, resample_pcm16
from tests.iim.tts.test_tts_engine import _assert_speech, _envelope_correlation

CONFIRM = {"1": "acknowledge", "2": "false_alarm"}
MISSING = "/nonexistent/libespeak-ng.so"


def test_the_generic_prompt_says_each_digits_instruction_in_both_languages() -> None:
    assert generic.generic_segments(CONFIRM) == [
        "intro-ru", "press-1-ru", "meaning-acknowledge-ru", "press-2-ru", "meaning-false_alarm-ru",
        "intro-en", "press-1-en", "meaning-acknowledge-en", "press-2-en", "meaning-false_alarm-en"]
    assert generic.generic_segments({"#": "escalate", "9": "something_new"}) == [
        "intro-ru", "press-pound-ru", "meaning-escalate-ru", "press-9-ru",
        "intro-en", "press-pound-en", "meaning-escalate-en", "press-9-en"]
    assert generic.generic_segments({}, record=True) == ["intro-ru", "record-ru", "intro-en", "record-en"]


@pytest.mark.parametrize("stem", sorted(generic.PHRASES))
def test_every_shipped_phrase_is_the_speech_of_its_text(stem: str) -> None:
    voice, text = generic.PHRASES[stem]
    shipped = generic.load_segments([stem])
    fresh = espeak.synthesize(text, voice, deadline=time.monotonic() + 30, words_per_minute=150)
    again = generic._trim(resample_pcm16(fresh.samples, fresh.rate, generic.SEGMENT_RATE))
    assert abs(len(shipped) - len(again)) < generic.SEGMENT_RATE // 10
    assert _envelope_correlation(shipped, again, generic.SEGMENT_RATE) > 0.8  # rebuilt after a text change?


async def test_the_generic_prompt_needs_no_speech_engine(tmp_path: Path) -> None:
    tts = EspeakTts(tmp_path, library=MISSING)
    with pytest.raises(TtsUnavailable):
        await tts.render("Smoke in Flat 12")
    made = await tts.generic(CONFIRM)
    assert (made.voice, made.cached, made.path.parent) == ("generic", False, tts.cache_dir)
    _assert_speech(made.path, 16000, 10.0)
    assert (await tts.generic(CONFIRM)).cached
    assert tts.path_for(made.key) == made.path  # servable like any rendered prompt
    with wave.open(str(made.path), "rb") as wav:
        written = array("h", wav.readframes(wav.getnframes()))
    expected = resample_pcm16(generic.load_segments(generic.generic_segments(CONFIRM)), 8000, 16000)
    assert written == expected
    assert (await tts.generic({}, record=True)).key != made.key


async def test_health_is_degraded_while_speech_fails_and_ok_once_it_works(tmp_path: Path) -> None:
    tts = EspeakTts(tmp_path, library=MISSING)
    assert tts.health()["status"] == "ok"  # nothing known yet
    assert not await tts.check()
    report = tts.health()
    assert report["status"] == "degraded"
    assert "cannot be loaded" in str(report["tts"])
    root = create_app([tts.health])
    async with TestClient(TestServer(root)) as client:
        resp = await client.get("/health")
        assert resp.status == 200
        assert (await resp.json())["status"] == "degraded"
    working = EspeakTts(tmp_path / "ok")
    assert await working.check()
    assert working.health()["status"] == "ok"


async def test_a_voice_that_does_not_exist_fails_its_texts_and_degrades_health(tmp_path: Path) -> None:
    tts = EspeakTts(tmp_path, voices={"en-us": "no-such-voice"})
    with pytest.raises(TtsUnavailable, match="voice"):
        await tts.render("Smoke in the kitchen")
    assert tts.health()["status"] == "degraded"
    await tts.render("Дым на кухне")  # the Russian voice still speaks: health recovers with it
    assert tts.health()["status"] == "ok"


async def test_the_switchs_prompts_are_served_over_http_without_a_speech_engine(tmp_path: Path) -> None:
    """The confirmation and voicemail prompts the switch plays come from IIM (no FreeSWITCH sound package)."""
    from aiohttp import web

    from iim.tts.urls import prompt_routes, prompt_url

    tts = EspeakTts(tmp_path, library=MISSING)
    app = web.Application()
    app.add_routes(prompt_routes(tts))
    async with TestClient(TestServer(app)) as client:
        for name in generic.SYSTEM_PROMPTS:
            resp = await client.get(f"/v1/prompts/{name}.wav")
            assert resp.status == 200
            assert resp.content_type == "audio/wav"
            assert "public" in resp.headers["Cache-Control"]
            assert (await resp.read())[:4] == b"RIFF"
        assert (await client.get("/v1/prompts/no-such-prompt.wav")).status == 404
        assert (await client.get("/v1/prompts/..%2Fetc.wav")).status == 404
    assert prompt_url("http://10.0.0.5:8088/", "confirm-call") == (
        "http_cache://http://10.0.0.5:8088/v1/prompts/confirm-call.wav")
    leave = await tts.system("leave-message")
    _assert_speech(leave.path, 16000, 8.0)
