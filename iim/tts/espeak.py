"""libespeak-ng through ctypes, library and voices from the ``espeakng-loader`` wheel: speech from PyPI alone.

Why in-process and not the ``espeak-ng`` program: the program is a Debian package, the wheel is a
dependency like any other, so a fresh machine (and CI) renders real speech without apt. The price: the
library keeps global state (one voice, one callback, one output mode per process) and is not thread-safe,
so every call runs under one process-wide lock, from worker threads only (a render never runs on the event
loop). Synthesis is synchronous (``AUDIO_OUTPUT_SYNCHRONOUS``) into a callback that collects the 16-bit
samples and aborts the synthesis once its deadline has passed or its caller gave up, so no render holds the
lock much past its timeout. The ``espeak_ng_*`` calls are used where they exist because they return a
status; the legacy ``espeak_Initialize`` prints and calls ``exit(1)`` on bad voice data.
"""

from __future__ import annotations

import ctypes
import threading
import time
from array import array
from dataclasses import dataclass

import espeakng_loader

__all__ = ["EspeakError", "EspeakTimeout", "Speech", "synthesize"]

_SYNCHRONOUS = 0x0001  # ENOUTPUT_MODE_SYNCHRONOUS: espeak_Synth returns when the callback has had everything
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE = 1  # espeakRATE, words per minute
_DEFAULT_WPM = 175  # espeak-ng's own default speed
_OK = 0
_SPEECH_STOPPED = 0x100010FF  # the callback asked to stop
_STATUS_TEXT = 256

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)  # short *wav
_LOCK = threading.Lock()


class EspeakError(Exception):
    """libespeak-ng could not be loaded or did not speak."""


class EspeakTimeout(EspeakError):
    """The synthesis passed its deadline (or was called off) and was aborted."""


@dataclass(frozen=True, slots=True)
class Speech:
    """Mono signed 16-bit samples (native byte order) at ``rate`` Hz."""

    samples: array[int]
    rate: int


class _Library:
    """One loaded and initialised libespeak-ng; only used under ``_LOCK``."""

    def __init__(self, path: str) -> None:
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            raise EspeakError(f"espeak-ng cannot be loaded: {exc}") from None
        lib.espeak_ng_InitializePath.argtypes = [ctypes.c_char_p]
        lib.espeak_ng_InitializePath.restype = None
        lib.espeak_ng_Initialize.argtypes = [ctypes.c_void_p]
        lib.espeak_ng_InitializeOutput.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p]
        lib.espeak_ng_GetSampleRate.argtypes = []
        lib.espeak_ng_GetStatusCodeMessage.argtypes = [ctypes.c_uint, ctypes.c_char_p, ctypes.c_size_t]
        lib.espeak_ng_GetStatusCodeMessage.restype = None
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_ng_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_ng_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_Synthesize.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                             ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        for fn in (lib.espeak_ng_Initialize, lib.espeak_ng_InitializeOutput, lib.espeak_ng_SetVoiceByName,
                   lib.espeak_ng_SetParameter, lib.espeak_ng_Synthesize):
            fn.restype = ctypes.c_uint
        self._lib = lib
        lib.espeak_ng_InitializePath(espeakng_loader.get_data_path().encode())
        self._check(lib.espeak_ng_Initialize(None), "initialise")
        self._check(lib.espeak_ng_InitializeOutput(_SYNCHRONOUS, 0, None), "set up its output")
        self.rate: int = lib.espeak_ng_GetSampleRate()
        self._callback = _CALLBACK(self._collect)  # kept referenced: the library calls it
        lib.espeak_SetSynthCallback(self._callback)
        self._voice = ""
        self._samples = array("h")
        self._deadline = 0.0
        self._stop: threading.Event | None = None

    def _check(self, status: int, what: str) -> None:
        if status != _OK:
            text = ctypes.create_string_buffer(_STATUS_TEXT)
            self._lib.espeak_ng_GetStatusCodeMessage(status, text, _STATUS_TEXT)
            raise EspeakError(f"espeak-ng could not {what}: {text.value.decode(errors='replace')} ({status:#x})")

    def _collect(self, wav: int | None, count: int, _events: int | None) -> int:
        if wav is not None and count > 0:
            self._samples.frombytes(ctypes.string_at(wav, count * 2))
        stop = self._stop is not None and self._stop.is_set()
        return 1 if stop or time.monotonic() > self._deadline else 0

    def speak(self, text: str, voice: str, words_per_minute: int | None, deadline: float,
              stop: threading.Event | None) -> Speech:
        if voice != self._voice:
            self._check(self._lib.espeak_ng_SetVoiceByName(voice.encode()), f"load the voice {voice!r}")
            self._voice = voice
        self._check(self._lib.espeak_ng_SetParameter(_RATE, words_per_minute or _DEFAULT_WPM, 0), "set the speed")
        data = text.encode() + b"\0"
        self._samples, self._deadline, self._stop = array("h"), deadline, stop
        try:
            status = self._lib.espeak_ng_Synthesize(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if status == _SPEECH_STOPPED or time.monotonic() > deadline or (stop is not None and stop.is_set()):
                raise EspeakTimeout("the synthesis was stopped at its deadline")
            self._check(status, "speak")
            return Speech(self._samples, self.rate)
        finally:
            self._samples, self._stop = array("h"), None


_loaded: dict[str, _Library] = {}


def synthesize(text: str, voice: str, *, deadline: float, words_per_minute: int | None = None,
               stop: threading.Event | None = None, library: str | None = None) -> Speech:
    """Speak ``text`` with the espeak-ng ``voice``. Blocking: call it from a worker thread.

    Args:
        deadline: ``time.monotonic()`` value after which the synthesis (or the wait for the library) stops.
        stop: set it to abort a synthesis whose caller gave up.
        library: another libespeak-ng than the wheel's (its voice data is always the wheel's).

    Raises:
        EspeakTimeout: past the deadline or stopped.
        EspeakError: the library cannot be loaded or initialised, or refused the voice or the text.
    """
    if not _LOCK.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise EspeakTimeout("espeak-ng stayed busy with other renders until the deadline")
    try:
        path = library or espeakng_loader.get_library_path()
        lib = _loaded.get(path)
        if lib is None:
            lib = _loaded[path] = _Library(path)
        return lib.speak(text, voice, words_per_minute, deadline, stop)
    finally:
        _LOCK.release()
