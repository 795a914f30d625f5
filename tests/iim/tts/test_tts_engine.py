"""libespeak-ng rendering for real (from the espeakng-loader wheel, no apt): Russian and English WAVs, the
cache, shared and concurrent renders, deadlines, failures."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
import wave
from array import array
from pathlib import Path

import pytest

from iim.tts.engine import ESPEAK_RATE, EspeakTts, TtsUnavailable, detect_voice, resample_pcm16

RU = "Входящий звонок от мамы. Ответить?"
EN = "Smoke detected in the kitchen."
LONG = ("Smoke detected in the kitchen, the hall and the bedroom. " * 32)[:1900]  # about 2 minutes of speech


def _samples(path: Path) -> tuple[int, int, int, array[int]]:
    with wave.open(str(path), "rb") as wav:
        frames = array("h", wav.readframes(wav.getnframes()))
        return wav.getframerate(), wav.getnchannels(), wav.getsampwidth(), frames


def _envelope_correlation(a: array[int], b: array[int], rate: int) -> float:
    """How alike two recordings' loudness contours are (20 ms frames): ~1 for the same words."""
    step = rate // 50
    n = min(len(a), len(b)) // step

    def envelope(x: array[int]) -> list[float]:
        return [math.sqrt(sum(v * v for v in x[i * step:(i + 1) * step]) / step) for i in range(n)]

    ea, eb = envelope(a), envelope(b)
    ma, mb = sum(ea) / n, sum(eb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ea, eb, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ea) * sum((y - mb) ** 2 for y in eb))


def _assert_speech(path: Path, rate: int, min_seconds: float) -> None:
    got_rate, channels, width, frames = _samples(path)
    assert (got_rate, channels, width) == (rate, 1, 2)
    assert len(frames) / rate >= min_seconds
    rms = math.sqrt(sum(s * s for s in frames) / len(frames))
    assert max(abs(s) for s in frames) > 3000
    assert rms > 300  # speech, not silence or a click


async def test_russian_renders_to_16k_mono_pcm(tmp_path: Path) -> None:
    tts = EspeakTts(tmp_path / "cache")
    audio = await tts.render(RU)
    assert audio.voice == "ru"
    assert audio.path == tmp_path / "cache" / f"{audio.key}.wav"
    assert not audio.cached
    _assert_speech(audio.path, 16000, 1.0)
    assert audio.duration_s == pytest.approx(len(_samples(audio.path)[3]) / 16000)


async def test_english_renders_with_the_named_voice(tmp_path: Path) -> None:
    tts = EspeakTts(tmp_path, sample_rate=8000)
    audio = await tts.render(EN, voice="en")
    assert audio.voice == "en-us"
    _assert_speech(audio.path, 8000, 1.0)


async def test_espeaks_native_rate_is_kept_when_asked(tmp_path: Path) -> None:
    audio = await EspeakTts(tmp_path, sample_rate=ESPEAK_RATE).render(EN)
    _assert_speech(audio.path, ESPEAK_RATE, 1.0)


async def test_the_second_render_is_a_cache_hit(tmp_path: Path) -> None:
    tts = EspeakTts(tmp_path)
    first = await tts.render(RU)
    os.utime(first.path, (1, 1))
    second = await tts.render("  Входящий звонок от мамы. \n Ответить?  ")  # same words, other whitespace
    assert second.cached
    assert (second.key, second.path, second.duration_s) == (first.key, first.path, first.duration_s)
    assert second.path.stat().st_mtime > 1  # touched: most recently used
    stats = tts.statistics()
    assert (stats.renders, stats.hits, stats.entries) == (1, 1, 1)
    other = await tts.render(RU, voice="en-us")
    assert other.key != first.key


async def test_concurrent_renders_of_one_text_synthesise_once(tmp_path: Path) -> None:
    tts = EspeakTts(tmp_path / "cache")
    results = await asyncio.gather(*(tts.render(EN) for _ in range(5)))
    assert len({r.path for r in results}) == 1
    assert sorted(r.cached for r in results) == [False, True, True, True, True]
    assert tts.statistics().renders == 1
    assert tts.statistics().shared == 4


async def test_concurrent_renders_in_two_voices_come_out_as_when_rendered_alone(tmp_path: Path) -> None:
    """libespeak-ng has one voice and one sample buffer per process: renders must take turns.

    (Its wave generator's flutter runs on from render to render, so two renders of a text differ by a few
    samples: compared are durations and waveforms, not bytes.)"""
    alone = [_samples((await EspeakTts(tmp_path / f"alone-{i}").render(text)).path)[3]
             for i, text in enumerate((RU, EN))]
    caches = [EspeakTts(tmp_path / f"together-{i}") for i in range(3)]
    together = await asyncio.gather(*(tts.render(text) for tts, text in zip(caches, (RU, EN, LONG), strict=True)))
    for solo, audio in zip(alone, together, strict=False):
        mixed = _samples(audio.path)[3]
        assert abs(len(mixed) - len(solo)) < 0.01 * len(solo)
        assert _envelope_correlation(solo, mixed, 16000) > 0.9


async def test_a_long_render_leaves_the_event_loop_running(tmp_path: Path) -> None:
    render = asyncio.create_task(EspeakTts(tmp_path).render(LONG))
    longest_gap, last = 0.0, time.monotonic()
    while not render.done():
        await asyncio.sleep(0.005)
        now = time.monotonic()
        longest_gap, last = max(longest_gap, now - last), now
    audio = await render
    assert audio.duration_s > 60  # the render took long enough to have blocked the loop, had it run there
    assert longest_gap < 0.1


async def test_a_waiter_giving_up_does_not_cancel_the_shared_render(tmp_path: Path) -> None:
    tts = EspeakTts(tmp_path)
    impatient = asyncio.create_task(tts.render(EN))
    await asyncio.sleep(0)
    patient = asyncio.create_task(tts.render(EN))
    await asyncio.sleep(0)
    impatient.cancel()
    audio = await patient
    assert audio.path.is_file()
    assert impatient.cancelled()


async def test_least_recently_used_files_are_evicted_over_the_bound(tmp_path: Path) -> None:
    texts = ["One two three.", "Four five six.", "Seven eight nine.", "Ten eleven twelve."]
    probe = EspeakTts(tmp_path / "probe")
    sizes = [(await probe.render(t)).path.stat().st_size for t in texts]
    # Room for three of them (the first, third and fourth), not four: a render's size varies by a few samples.
    tts = EspeakTts(tmp_path / "cache", max_cache_bytes=sizes[0] + sizes[2] + sizes[3] + min(sizes) // 2)
    first, second, third = [await tts.render(t) for t in texts[:3]]
    await tts.render(texts[0])  # used again: now the most recent
    fourth = await tts.render(texts[3])
    assert first.path.exists()
    assert not second.path.exists()  # the least recently used went
    assert third.path.exists()
    assert fourth.path.exists()
    assert tts.path_for(second.key) is None
    stats = tts.statistics()
    assert stats.evictions >= 1
    assert stats.bytes <= tts.max_cache_bytes


async def test_the_cache_survives_a_restart_and_cleans_leftovers(tmp_path: Path) -> None:
    audio = await EspeakTts(tmp_path).render(EN)
    (tmp_path / f".tmp-{audio.key}-dead.wav").write_bytes(b"half a render")
    (tmp_path / "notes.txt").write_text("not ours")
    (tmp_path / ("0" * 64 + ".wav")).write_bytes(b"corrupt")
    again = EspeakTts(tmp_path, library="/nonexistent/libespeak-ng.so")  # a render would fail
    hit = await again.render(EN)
    assert hit.cached
    assert hit.duration_s == pytest.approx(audio.duration_s)
    assert sorted(os.listdir(tmp_path)) == sorted([f"{audio.key}.wav", "notes.txt"])


async def test_a_missing_library_is_tts_unavailable(tmp_path: Path) -> None:
    tts = EspeakTts(tmp_path, library=str(tmp_path / "no-libespeak-ng-here.so"))
    with pytest.raises(TtsUnavailable, match="espeak-ng cannot be loaded"):
        await tts.render(EN)
    assert os.listdir(tmp_path) == []


async def test_a_render_past_its_timeout_is_aborted_and_the_library_stays_usable(tmp_path: Path) -> None:
    tts = EspeakTts(tmp_path / "cache", timeout_s=0.01)
    started = time.monotonic()
    with pytest.raises(TtsUnavailable, match=r"did not finish within 0\.01 s"):
        await tts.render(LONG)
    assert time.monotonic() - started < 1.0  # aborted, not rendered to the end (about 2 minutes of audio)
    assert list((tmp_path / "cache").iterdir()) == []
    audio = await EspeakTts(tmp_path / "after").render(EN)
    _assert_speech(audio.path, 16000, 1.0)


async def test_closing_calls_off_a_render_in_progress(tmp_path: Path) -> None:
    tts = EspeakTts(tmp_path)
    render = asyncio.create_task(tts.render(LONG))
    await asyncio.sleep(0.02)
    started = time.monotonic()
    await tts.aclose()
    with pytest.raises(asyncio.CancelledError):
        await render
    assert time.monotonic() - started < 1.0
    assert os.listdir(tmp_path) == []  # no temporary file left


async def test_bad_requests_are_value_errors(tmp_path: Path) -> None:
    tts = EspeakTts(tmp_path, max_text_chars=10)
    with pytest.raises(ValueError, match="nothing to say"):
        await tts.render(" \x00\n ")
    with pytest.raises(ValueError, match="longer than 10"):
        await tts.render("x" * 11)
    with pytest.raises(ValueError, match="unknown voice 'klingon'"):
        await tts.render("hi", voice="klingon")
    with pytest.raises(ValueError, match="sample_rate"):
        EspeakTts(tmp_path, sample_rate=44100)
    assert tts.path_for("../../etc/passwd") is None
    assert tts.path_for("A" * 64) is None


@pytest.mark.parametrize(("text", "voice"), [
    ("Привет", "ru"), ("Hello", "en-us"), ("Звонок от John", "ru"), ("Call from Иван Petrov", "en-us"),
    ("12345", "en-us"),
])
def test_voice_is_detected_from_the_script(text: str, voice: str) -> None:
    assert detect_voice(text) == voice


def test_the_resampler_keeps_pitch_and_length() -> None:
    src_rate, freq = ESPEAK_RATE, 440.0
    tone = array("h", (int(12000 * math.sin(2 * math.pi * freq * n / src_rate)) for n in range(src_rate)))
    for dst_rate in (16000, 8000):
        out = resample_pcm16(tone, src_rate, dst_rate)
        assert len(out) == dst_rate
        crossings = sum(1 for a, b in itertools.pairwise(out) if (a < 0) != (b < 0))
        assert abs(crossings - 2 * freq) <= 4
        assert 10000 < max(out) <= 12100
    assert resample_pcm16(tone, src_rate, src_rate) == tone


def test_the_resampler_filters_what_the_lower_rate_cannot_hold() -> None:
    src_rate = ESPEAK_RATE
    high = array("h", (int(12000 * math.sin(2 * math.pi * 6000 * n / src_rate)) for n in range(src_rate // 4)))
    out = resample_pcm16(high, src_rate, 8000)  # 6 kHz is above the 4 kHz Nyquist limit of 8 kHz audio
    rms = math.sqrt(sum(s * s for s in out[50:-50]) / len(out[50:-50]))
    assert rms < 12000 / math.sqrt(2) / 4  # attenuated, not aliased through at full strength
