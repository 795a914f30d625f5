"""What a file argument of ``playback``/``play_and_get_digits``/``read``/``group_confirm_file`` plays, and for
how long, or that it does not exist.

FreeSWITCH 1.10.12 with ``freeswitch-conf/`` (measured, see ``tests/real_switch_tier/test_emulator_parity.py``):
a file that cannot be opened makes ``playback`` complete at once with ``FILE NOT FOUND`` (``mod_sndfile Error
Opening File``); an ``http_cache://`` URL that cannot be fetched is the same (``mod_http_cache ... curl error
7``); ``say:`` needs a TTS module and none is loaded. A relative path is looked up under the switch's sounds
directory, which holds nothing: no sound package is installed. A file that opens plays for its length.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import wave
from pathlib import Path
from urllib.parse import urlsplit

_TONE_SEGMENT = re.compile(r"%\(([0-9]+),([0-9]+)")
_LOOPS = re.compile(r"loops=(-?[0-9]+)")
_SILENCE = re.compile(r"silence_stream://(-?[0-9]+)")
#: a file the emulator cannot measure (not a WAV) plays for this long
UNKNOWN_LENGTH_MS = 1000.0
#: the longest a measured file or tone plays in the emulator (a bounded model: tests stay fast)
MAX_MEDIA_MS = 60_000.0
#: how long a ``say:`` text plays per character, when the switch has the channel's TTS engine
SPEECH_MS_PER_CHAR = 60.0
#: how long the emulator tries to reach an ``http_cache://`` URL's server: mod_http_cache's ``connect-timeout``
#: in ``freeswitch-conf/autoload_configs/http_cache.conf.xml`` (real seconds, not scaled: it is network time)
URL_CONNECT_TIMEOUT_S = 2.0


def stream_ms(path: str) -> float | None:
    """The length of a ``tone_stream://`` or ``silence_stream://`` (they always exist); None for anything else."""
    if path.startswith("tone_stream://"):
        segment = sum(int(on) + int(off) for on, off in _TONE_SEGMENT.findall(path)) or 1000
        loops = _LOOPS.search(path)
        count = int(loops.group(1)) if loops else 1
        return min(MAX_MEDIA_MS, float(segment * (count if count > 0 else 1)))
    if path.startswith("silence_stream://"):
        silence = _SILENCE.search(path)
        ms = int(silence.group(1)) if silence else 0
        return min(MAX_MEDIA_MS, float(ms)) if ms >= 0 else MAX_MEDIA_MS
    return None


def file_ms(path: Path, *, measure: bool = True) -> float | None:
    """A local file's length: a WAV's from its header (``measure``), others a nominal second; None when it cannot
    be opened."""
    if not os.access(path, os.R_OK) or not path.is_file():
        return None
    if not measure or path.suffix.lower() != ".wav":
        return UNKNOWN_LENGTH_MS
    try:
        with wave.open(str(path), "rb") as wav:
            rate = wav.getframerate() or 8000
            return min(MAX_MEDIA_MS, wav.getnframes() * 1000.0 / rate)
    except (wave.Error, EOFError, OSError):
        return None


async def url_reachable(url: str) -> bool:
    """Whether the server of an ``http://``/``https://`` URL accepts a connection (the fetch itself is not
    modelled here: a reachable URL plays as a file of unknown length)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, port), URL_CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def media_ms(path: str, *, sounds_dir: Path | None, tts_engine: str | None = None,
                   tts_engines: frozenset[str] = frozenset(), measure: bool = True) -> float | None:
    """How long ``path`` plays on the switch, or None when FreeSWITCH cannot open it (FILE NOT FOUND).

    ``say:<text>`` speaks with the channel's ``tts_engine``, which must be a loaded module (``tts_engines``;
    the shipped configuration loads none: ``Invalid speech module``)."""
    streamed = stream_ms(path)
    if streamed is not None:
        return streamed
    if path.startswith("say:"):
        if tts_engine is None or tts_engine not in tts_engines:
            return None
        return min(MAX_MEDIA_MS, max(1, len(path) - 4) * SPEECH_MS_PER_CHAR)
    if path.startswith("http_cache://"):
        return UNKNOWN_LENGTH_MS if await url_reachable(path[len("http_cache://"):]) else None
    if "://" in path:
        return None  # a format module modules.conf.xml does not load
    local = Path(path)
    if not local.is_absolute():
        if sounds_dir is None:
            return None
        local = sounds_dir / local
    return file_ms(local, measure=measure)


async def played_ms(path: str, *, sounds_dir: Path | None, playback_ms: float | None, tts_engine: str | None = None,
                    tts_engines: frozenset[str] = frozenset()) -> float | None:
    """:func:`media_ms` with the emulator's ``playback_ms`` (when set) as the length of media that exists."""
    length = await media_ms(path, sounds_dir=sounds_dir, tts_engine=tts_engine, tts_engines=tts_engines,
                            measure=playback_ms is None)
    if length is None or playback_ms is None:
        return length
    return playback_ms


async def lengths(paths: set[str], *, sounds_dir: Path | None, playback_ms: float | None) -> dict[str, float | None]:
    """:func:`played_ms` of each path."""
    return {path: await played_ms(path, sounds_dir=sounds_dir, playback_ms=playback_ms) for path in paths}


def write_silent_wav(path: Path, ms: int = 500) -> Path:
    """A prompt that exists: ``ms`` of 8 kHz 16-bit silence at ``path`` (tests give the emulator, or the real
    switch, files to play)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\0\0" * (8 * ms))
    return path
