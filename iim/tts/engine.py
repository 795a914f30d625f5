"""Speech from text with libespeak-ng, as WAV files FreeSWITCH and vendor clouds can play.

Why this library: it has Russian and English voices, renders a sentence in milliseconds, and comes from
PyPI (``espeakng-loader`` ships the library and its voice data; :mod:`iim.tts.espeak` binds it), so speech
works, and is tested, on a machine without apt packages. A render runs in a worker thread (never on the
event loop) and is aborted at ``timeout_s``; the text is passed as text, never parsed as options or markup.

Output format: espeak speaks at 22050 Hz mono 16-bit PCM. FreeSWITCH can play that (``playback`` resamples
to the channel's rate), but resampling once here, when the file is cached, is cheaper than on every call,
so by default files are written at 16 kHz (8 kHz for narrowband-only setups; 22050 keeps espeak's native
rate). ``soxr`` (libsoxr, the resampler of sox) does the conversion.

Rendered files are cached by the SHA-256 of (voice, sample rate, text) in ``cache_dir`` with a size bound
and least-recently-used eviction (file mtimes carry the order across restarts). Concurrent renders of the
same text share one synthesis. Any failure to produce audio (library missing, timeout, refused voice or
text, no samples) raises :class:`TtsUnavailable`: callers then fall back to text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import sys
import threading
import time
import unicodedata
import wave
from array import array
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from uuid import uuid4

import numpy
import soxr

from iim.core.lifecycle import AsyncResource
from iim.tts import espeak, generic

__all__ = [
    "ESPEAK_RATE", "VOICES", "AudioStore", "EspeakTts", "RenderedAudio", "TtsStatistics", "TtsUnavailable",
    "detect_voice", "resample_pcm16",
]

log = logging.getLogger(__name__)

#: The rate espeak-ng speaks at.
ESPEAK_RATE = 22050
#: How long past ``timeout_s`` a render may take to notice its deadline before its caller stops waiting.
_ABORT_GRACE_S = 2.0
#: Voices offered, by our name -> espeak-ng voice name.
VOICES = {"ru": "ru", "en-us": "en-us"}
_ALIASES = {"ru-ru": "ru", "russian": "ru", "en": "en-us", "en_us": "en-us", "english": "en-us"}
_KEY = re.compile(r"[0-9a-f]{64}")
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")
_LATIN = re.compile(r"[A-Za-z]")
_SPACES = re.compile(r"\s+")
_PHONEME_OPEN = re.compile(r"\[(?=\[)")


class TtsUnavailable(Exception):
    """No audio could be produced (libespeak-ng missing, too slow, failed): say it with text instead."""


@dataclass(frozen=True, slots=True)
class RenderedAudio:
    """A cached WAV. ``key`` names it in signed URLs; ``cached`` is True when this call rendered nothing."""

    path: Path
    key: str
    voice: str
    duration_s: float
    cached: bool


@dataclass(frozen=True, slots=True)
class TtsStatistics:
    renders: int
    hits: int
    shared: int
    evictions: int
    entries: int
    bytes: int


class AudioStore(Protocol):
    """Where :func:`iim.tts.urls.audio_routes` finds a key's file."""

    def path_for(self, key: str) -> Path | None: ...


@dataclass(slots=True)
class _Entry:
    size: int
    duration_s: float


def detect_voice(text: str) -> str:
    """``ru`` when the text is mostly Cyrillic letters, ``en-us`` otherwise."""
    cyrillic = len(_CYRILLIC.findall(text))
    return "ru" if cyrillic and cyrillic >= len(_LATIN.findall(text)) else "en-us"


def _voice(voice: str | None, text: str) -> str:
    if voice is None:
        return detect_voice(text)
    name = voice.strip().lower()
    name = _ALIASES.get(name, name)
    if name not in VOICES:
        raise ValueError(f"unknown voice {voice!r} (available: {', '.join(VOICES)})")
    return name


def _clean(text: str) -> str:
    """One line of printable text: control/format characters dropped, whitespace collapsed, and espeak's
    ``[[phoneme]]`` input syntax defused so that a message is read, never interpreted."""
    kept = "".join(" " if ch.isspace() else ch for ch in text if ch.isspace()
                   or unicodedata.category(ch)[0] != "C")
    return _PHONEME_OPEN.sub("[ ", _SPACES.sub(" ", kept)).strip()


# --- resampling ---------------------------------------------------------------------------------------------

def resample_pcm16(samples: Sequence[int], src_rate: int, dst_rate: int) -> array[int]:
    """Mono 16-bit samples from ``src_rate`` to ``dst_rate`` with libsoxr (band-limited: no aliasing)."""
    if src_rate <= 0 or dst_rate <= 0:
        raise ValueError("sample rates must be positive")
    if src_rate == dst_rate or not samples:
        return array("h", samples)
    source = numpy.frombuffer(array("h", samples), dtype=numpy.int16)
    out = soxr.resample(source, src_rate, dst_rate, quality="HQ")
    return array("h", numpy.asarray(out, dtype=numpy.int16).tobytes())


def _write_pcm16(path: Path, samples: array[int], rate: int) -> None:
    data = array("h", samples)
    if sys.byteorder == "big":
        data.byteswap()
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(data.tobytes())


def _wav_duration(path: Path, rate: int) -> float:
    """Checks the file is what FreeSWITCH is promised (mono, 16-bit PCM, ``rate``, not empty)."""
    try:
        with wave.open(str(path), "rb") as wav:
            ok = (wav.getnchannels() == 1 and wav.getsampwidth() == 2 and wav.getframerate() == rate
                  and wav.getcomptype() == "NONE")
            frames = wav.getnframes()
    except (OSError, EOFError, wave.Error) as exc:
        raise TtsUnavailable(f"unreadable WAV: {exc}") from None
    if not ok:
        raise TtsUnavailable("the WAV is not mono 16-bit PCM at the configured rate")
    if frames == 0:
        raise TtsUnavailable("espeak-ng produced no audio")
    return frames / rate


class EspeakTts(AsyncResource):
    """Renders text to cached WAV files with libespeak-ng; also the :class:`AudioStore` behind audio URLs.

    Args:
        cache_dir: where WAVs are kept (created if needed), e.g. ``<data_dir>/tts-cache``.
        sample_rate: 8000, 16000 (default) or 22050 (espeak's own rate, no resampling).
        max_cache_bytes: least recently used files are removed above this total.
        timeout_s: a render (waiting for the library included) is aborted after this long.
        library: a libespeak-ng other than the ``espeakng-loader`` wheel's (``None``: the wheel's).
        max_text_chars: longer texts are refused (``ValueError``): an SMS, not a book.
        words_per_minute: espeak's speed; its default (175) when ``None``.
        voices: the espeak-ng voice of each of our languages (``{"en-us": "en-gb"}``); VOICES otherwise.

    ``health()`` says ``degraded`` while speech fails (the last synthesis, or the last :meth:`check`, failed):
    alert calls then play the generic prompt (:meth:`generic`, from shipped recordings) instead.
    """

    def __init__(self, cache_dir: Path, *, sample_rate: int = 16000, max_cache_bytes: int = 64 << 20,
                 timeout_s: float = 10.0, library: str | None = None, max_text_chars: int = 2000,
                 words_per_minute: int | None = None, voices: Mapping[str, str] | None = None) -> None:
        if sample_rate not in (8000, 16000, ESPEAK_RATE):
            raise ValueError(f"sample_rate must be 8000, 16000 or {ESPEAK_RATE}")
        if words_per_minute is not None and not 80 <= words_per_minute <= 450:
            raise ValueError("words_per_minute must be within 80..450")
        self.cache_dir = Path(cache_dir).resolve()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.sample_rate = sample_rate
        self.max_cache_bytes = max_cache_bytes
        self.timeout_s = timeout_s
        self.library = library
        self.max_text_chars = max_text_chars
        self.words_per_minute = words_per_minute
        self.voices = {**VOICES, **(voices or {})}
        #: why the last synthesis failed, and since when (monotonic); None while speech works
        self._failure: tuple[str, float] | None = None
        self._index: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[float]] = {}
        self._renders = self._hits = self._shared = self._evictions = 0
        self._scan()

    def __repr__(self) -> str:
        return f"EspeakTts(cache_dir={str(self.cache_dir)!r}, sample_rate={self.sample_rate})"

    # --- public API ----------------------------------------------------------------------------------------

    def key_for(self, text: str, voice: str | None = None) -> str:
        """The cache key (and URL name) of ``text`` in ``voice``: SHA-256 over voice, rate and cleaned text."""
        cleaned = _clean(text)
        material = f"{_voice(voice, cleaned)}\x00{self.sample_rate}\x00{cleaned}"
        return hashlib.sha256(material.encode()).hexdigest()

    async def render(self, text: str, *, voice: str | None = None) -> RenderedAudio:
        """The WAV for ``text``: from the cache, from a render already running, or rendered now.

        Args:
            text: what to say; control characters are dropped.
            voice: ``ru`` or ``en-us`` (aliases ``en``, ``ru-RU``...); detected from the text when ``None``.

        Raises:
            TtsUnavailable: no audio (fall back to text).
            ValueError: empty or over-long text, unknown voice.
        """
        cleaned = _clean(text)
        if not cleaned:
            raise ValueError("nothing to say")
        if len(cleaned) > self.max_text_chars:
            raise ValueError(f"text longer than {self.max_text_chars} characters")
        name = _voice(voice, cleaned)
        key = self.key_for(cleaned, name)
        entry = self._lookup(key)
        if entry is not None:
            self._hits += 1
            return RenderedAudio(self._path(key), key, name, entry.duration_s, cached=True)
        task = self._inflight.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.create_task(self._render(key, cleaned, name), name=f"tts-render-{key[:12]}")
            self._inflight[key] = task
            task.add_done_callback(self._render_done(key))
        else:
            self._shared += 1
        # Shielded: one caller giving up (its call hung up) must not cancel the render others wait for.
        duration = await asyncio.shield(task)
        return RenderedAudio(self._path(key), key, name, duration, cached=joined)

    async def generic(self, meanings: Mapping[str, str], *, record: bool = False) -> RenderedAudio:
        """The generic alert prompt for an IVR whose digits mean ``meanings`` (or a recording's), as a cached WAV
        at the configured rate: put together from the shipped recordings (:mod:`iim.tts.generic`), so it works
        with libespeak-ng gone. Raises OSError only if the cache directory cannot be written."""
        stems = generic.generic_segments(meanings, record=record)
        key = hashlib.sha256(f"generic\x00{self.sample_rate}\x00{','.join(stems)}".encode()).hexdigest()
        return await self._shipped(key, lambda: generic.load_segments(stems))

    async def system(self, name: str) -> RenderedAudio:
        """A prompt the switch plays for IIM (:data:`iim.tts.generic.SYSTEM_PROMPTS`: a forked call's confirmation,
        the voicemail greeting) as a cached WAV, from the shipped recordings; KeyError for an unknown name."""
        stems = generic.SYSTEM_PROMPTS[name]
        key = hashlib.sha256(f"system\x00{self.sample_rate}\x00{name}\x00{','.join(stems)}".encode()).hexdigest()
        return await self._shipped(key, lambda: generic.system_segments(name))

    async def _shipped(self, key: str, segments: Callable[[], array[int]]) -> RenderedAudio:
        entry = self._lookup(key)
        if entry is not None:
            return RenderedAudio(self._path(key), key, "generic", entry.duration_s, cached=True)
        out = self.cache_dir / f".tmp-{key}-{uuid4().hex[:8]}.wav"
        try:
            await asyncio.to_thread(self._write_shipped, segments, out)
            duration = self._commit(key, out)
        except TtsUnavailable as exc:  # pragma: no cover - the shipped phrases are checked by the tests
            raise OSError(f"shipped prompt: {exc}") from None
        finally:
            out.unlink(missing_ok=True)
        return RenderedAudio(self._path(key), key, "generic", duration, cached=False)

    def _write_shipped(self, segments: Callable[[], array[int]], out: Path) -> None:
        samples = resample_pcm16(segments(), generic.SEGMENT_RATE, self.sample_rate)
        _write_pcm16(out, samples, self.sample_rate)

    async def check(self) -> bool:
        """Synthesise a short probe (not cached) to learn whether speech works now; ``health()`` follows."""
        stop = threading.Event()
        try:
            await asyncio.wait_for(asyncio.to_thread(self._probe, stop), self.timeout_s + _ABORT_GRACE_S)
        except TimeoutError:
            stop.set()
            self._failed("espeak-ng did not finish the probe in time")
        except TtsUnavailable as exc:
            self._failed(str(exc))
        else:
            self._failure = None
        return self._failure is None

    def _probe(self, stop: threading.Event) -> None:
        try:
            espeak.synthesize("ok", self.voices["en-us"], deadline=time.monotonic() + self.timeout_s, stop=stop,
                              library=self.library)
        except espeak.EspeakError as exc:
            raise TtsUnavailable(str(exc)) from None

    def health(self) -> dict[str, object]:
        """For ``/health``: ``degraded`` while speech fails (alert calls fall back to the generic prompt)."""
        if self._failure is None:
            return {"status": "ok", "tts": {"status": "ok"}}
        reason, since = self._failure
        return {"status": "degraded", "tts": {"status": "degraded", "error": reason,
                                              "failing_for_s": round(time.monotonic() - since, 1)}}

    def _failed(self, reason: str) -> None:
        if self._failure is None:
            log.warning("speech failing: %s", reason)
            self._failure = (reason, time.monotonic())
        else:
            self._failure = (reason, self._failure[1])

    def path_for(self, key: str) -> Path | None:
        """The cached file of ``key`` (hex only: nothing else ever becomes a path), or ``None``."""
        if not _KEY.fullmatch(key):
            return None
        return self._path(key) if self._lookup(key) is not None else None

    def statistics(self) -> TtsStatistics:
        return TtsStatistics(self._renders, self._hits, self._shared, self._evictions, len(self._index),
                             sum(e.size for e in self._index.values()))

    async def aclose(self) -> None:
        """Cancel renders still running (their temporary files are removed)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, TtsUnavailable):
                await task

    # --- rendering -----------------------------------------------------------------------------------------

    def _render_done(self, key: str) -> _DoneCallback:
        def done(task: asyncio.Task[float]) -> None:
            if self._inflight.get(key) is task:
                del self._inflight[key]
            if not task.cancelled():
                task.exception()  # retrieved even if every waiter gave up
        return done

    async def _render(self, key: str, text: str, voice: str) -> float:
        self._renders += 1
        out = self.cache_dir / f".tmp-{key}-{uuid4().hex[:8]}.wav"
        stop = threading.Event()
        job = asyncio.ensure_future(asyncio.to_thread(self._render_file, text, voice, out, stop))
        try:
            # The thread stops itself at timeout_s (the synthesis is aborted from its callback); the grace
            # only bounds this wait should the library hang where it cannot notice.
            await asyncio.wait_for(asyncio.shield(job), self.timeout_s + _ABORT_GRACE_S)
            duration = self._commit(key, out)
        except TimeoutError:
            stop.set()
            self._failed(f"espeak-ng did not finish within {self.timeout_s:g} s")
            raise TtsUnavailable(f"espeak-ng did not finish within {self.timeout_s:g} s") from None
        except TtsUnavailable as exc:
            self._failed(str(exc))
            raise
        except asyncio.CancelledError:
            stop.set()
            with contextlib.suppress(TtsUnavailable, OSError):
                await job  # stops at its next block of audio; then its temporary file can go
            raise
        finally:
            out.unlink(missing_ok=True)
        self._failure = None
        return duration

    def _render_file(self, text: str, voice: str, out: Path, stop: threading.Event) -> None:
        """In a worker thread: synthesise, resample to the configured rate, write the WAV to ``out``."""
        deadline = time.monotonic() + self.timeout_s
        try:
            speech = espeak.synthesize(text, self.voices[voice], deadline=deadline, stop=stop, library=self.library,
                                       words_per_minute=self.words_per_minute)
        except espeak.EspeakTimeout:
            raise TtsUnavailable(f"espeak-ng did not finish within {self.timeout_s:g} s") from None
        except espeak.EspeakError as exc:
            raise TtsUnavailable(str(exc)) from None
        samples = resample_pcm16(speech.samples, speech.rate, self.sample_rate)
        if stop.is_set():
            raise TtsUnavailable("the render was called off")
        _write_pcm16(out, samples, self.sample_rate)

    # --- the cache -----------------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.wav"

    def _lookup(self, key: str) -> _Entry | None:
        entry = self._index.get(key)
        if entry is None:
            return None
        path = self._path(key)
        try:
            os.utime(path)  # the LRU order survives restarts through mtimes
        except FileNotFoundError:
            del self._index[key]  # removed behind our back
            return None
        self._index.move_to_end(key)
        return entry

    def _commit(self, key: str, out: Path) -> float:
        duration = _wav_duration(out, self.sample_rate)
        final = self._path(key)
        out.replace(final)
        self._index[key] = _Entry(final.stat().st_size, duration)
        self._index.move_to_end(key)
        self._evict()
        return duration

    def _evict(self) -> None:
        total = sum(entry.size for entry in self._index.values())
        while total > self.max_cache_bytes and len(self._index) > 1:  # never the file just made
            key, entry = self._index.popitem(last=False)
            self._path(key).unlink(missing_ok=True)
            total -= entry.size
            self._evictions += 1

    def _scan(self) -> None:
        """Rebuild the index from disk (oldest first); drop leftovers of interrupted renders and bad files."""
        found: list[tuple[float, str, _Entry]] = []
        for path in self.cache_dir.iterdir():
            if path.name.startswith(".tmp-"):
                path.unlink(missing_ok=True)
                continue
            if path.suffix != ".wav" or not _KEY.fullmatch(path.stem):
                continue
            try:
                duration = _wav_duration(path, self.sample_rate)
                stat = path.stat()
            except (TtsUnavailable, OSError):
                path.unlink(missing_ok=True)
                continue
            found.append((stat.st_mtime, path.stem, _Entry(stat.st_size, duration)))
        for _, key, entry in sorted(found):
            self._index[key] = entry
        self._evict()


class _DoneCallback(Protocol):
    def __call__(self, task: asyncio.Task[float], /) -> None: ...
