"""The generic alert prompt: no name, no private detail, but the IVR's instructions ("press 1 to confirm").

An alert call's own prompt names the household and the device. It is rendered while the phone rings; until
it is (and whenever it cannot be: speech down, a text the engine refuses, too late) the callee hears this
generic prompt instead, never FreeSWITCH's ``say:`` of the private text. It is put together from short
recorded phrases shipped in this package (``prompts/*.ul``: raw G.711 mu-law at 8 kHz, what the call carries
anyway, half the size of 16-bit PCM; rendered once with espeak-ng by ``python -m iim.tts.generic --build``),
so it needs no working speech engine at all, in both languages::

    Внимание, тревога в вашем доме. Нажмите один, чтобы подтвердить тревогу. Нажмите два, если тревога
    ложная. Alarm at your home. Press 1 to confirm the alarm. Press 2 if it is a false alarm.

Each digit of the call's IVR gets its phrase from its meaning (``acknowledge``, ``false_alarm``,
``escalate``, ``resolved``); a meaning without a phrase still says "press N". A call that records a
message says "please leave a message after the tone" instead.
"""

from __future__ import annotations

import argparse
import sys
from array import array
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy

__all__ = ["PHRASES", "SEGMENT_RATE", "SYSTEM_PROMPTS", "generic_segments", "load_segments", "system_segments"]

#: The rate the shipped phrases are recorded at (telephony narrowband).
SEGMENT_RATE = 8000
#: Silence between phrases, in samples at SEGMENT_RATE.
_GAP = SEGMENT_RATE * 3 // 20  # 150 ms
_BIAS, _CLIP = 0x84, 32635

_KEY_NAMES = {"*": "star", "#": "pound"}
_RU_KEYS = {"0": "ноль", "1": "один", "2": "два", "3": "три", "4": "четыре", "5": "пять", "6": "шесть",
            "7": "семь", "8": "восемь", "9": "девять", "*": "звёздочку", "#": "решётку", "A": "а", "B": "бэ",  # noqa: RUF001 - Cyrillic for the Russian voice
            "C": "цэ", "D": "дэ"}
_EN_KEYS = {"*": "star", "#": "pound"}

#: Every shipped phrase: file stem -> (espeak voice, text).
PHRASES: dict[str, tuple[str, str]] = {
    "intro-ru": ("ru", "Внимание, тревога в вашем доме."),
    "intro-en": ("en-us", "Alarm at your home."),
    "record-ru": ("ru", "Пожалуйста, оставьте сообщение после сигнала."),
    "record-en": ("en-us", "Please leave a message after the tone."),
    "meaning-acknowledge-ru": ("ru", "чтобы подтвердить тревогу."),
    "meaning-acknowledge-en": ("en-us", "to confirm the alarm."),
    "meaning-false_alarm-ru": ("ru", "если тревога ложная."),
    "meaning-false_alarm-en": ("en-us", "if it is a false alarm."),
    "meaning-escalate-ru": ("ru", "если нужна помощь."),
    "meaning-escalate-en": ("en-us", "if you need help."),
    "meaning-resolved-ru": ("ru", "если всё в порядке."),
    "meaning-resolved-en": ("en-us", "if everything is fine."),
    # The switch's own prompts (:data:`SYSTEM_PROMPTS`): a forked call's confirmation, the voicemail greeting.
    "call-ru": ("ru", "Вам звонят. Нажмите один, чтобы ответить."),
    "call-en": ("en-us", "You have a call. Press 1 to answer."),
    "unavailable-ru": ("ru", "Абонент не может ответить."),
    "unavailable-en": ("en-us", "The person you are calling cannot answer."),
    **{f"press-{_KEY_NAMES.get(k, k)}-ru": ("ru", f"Нажмите {name},") for k, name in _RU_KEYS.items()},
    **{f"press-{_KEY_NAMES.get(k, k)}-en": ("en-us", f"Press {_EN_KEYS.get(k, k)}") for k in _RU_KEYS},
}


def generic_segments(meanings: Mapping[str, str], *, record: bool = False) -> list[str]:
    """The phrases (file stems) of the generic prompt for an IVR whose digits mean ``meanings``, in order."""
    parts: list[str] = []
    for lang in ("ru", "en"):
        parts.append(f"intro-{lang}")
        if record:
            parts.append(f"record-{lang}")
            continue
        for digit in sorted(meanings):
            press = f"press-{_KEY_NAMES.get(digit, digit)}-{lang}"
            if press not in PHRASES:
                continue  # not a DTMF key: AlertCall refuses it anyway
            parts.append(press)
            meaning = f"meaning-{meanings[digit]}-{lang}"
            if meaning in PHRASES:
                parts.append(meaning)
    return parts


#: A beep after "leave a message after the tone": (frequency Hz, duration in samples at SEGMENT_RATE).
_TONE = (1000, SEGMENT_RATE * 2 // 5)

#: Prompts the switch plays on IIM's behalf, by name (served at ``/v1/prompts/{name}.wav``): no private
#: text, the same for every call, so FreeSWITCH may cache them (mod_http_cache). ``tone`` is the beep.
SYSTEM_PROMPTS: dict[str, tuple[str, ...]] = {
    # A forked call answered on the mobile: the callee presses 1 before the leg is bridged (group_confirm).
    "confirm-call": ("call-ru", "call-en"),
    # Nobody answered: the caller may leave a message (recorded by the switch after the tone).
    "leave-message": ("unavailable-ru", "record-ru", "unavailable-en", "record-en", "tone"),
}


def system_segments(name: str) -> array[int]:
    """A system prompt's samples at SEGMENT_RATE; KeyError for a name that is not one."""
    out = array("h")
    for stem in SYSTEM_PROMPTS[name]:
        if out:
            out.extend(array("h", bytes(2 * _GAP)))
        out.extend(_tone() if stem == "tone" else _read(stem))
    return out


def _tone() -> array[int]:
    frequency, length = _TONE
    t = numpy.arange(length) / SEGMENT_RATE
    return array("h", (numpy.sin(2 * numpy.pi * frequency * t) * 8000).astype(numpy.int16).tobytes())


def _mulaw_decode(data: bytes) -> array[int]:
    """G.711 mu-law bytes -> 16-bit linear samples."""
    u = ~numpy.frombuffer(data, dtype=numpy.uint8).astype(numpy.int32) & 0xFF
    exponent, mantissa = (u >> 4) & 0x07, u & 0x0F
    linear = (((mantissa << 3) + _BIAS) << exponent) - _BIAS
    return array("h", numpy.where(u & 0x80, -linear, linear).astype(numpy.int16).tobytes())


def _mulaw_encode(samples: array[int]) -> bytes:
    """16-bit linear samples -> G.711 mu-law bytes."""
    x = numpy.frombuffer(samples, dtype=numpy.int16).astype(numpy.int32)
    sign = (x < 0).astype(numpy.int32) << 7
    magnitude = numpy.minimum(numpy.abs(x), _CLIP) + _BIAS
    exponent = numpy.floor(numpy.log2(magnitude)).astype(numpy.int32) - 7
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    encoded: bytes = (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(numpy.uint8).tobytes()
    return encoded


def _read(stem: str) -> array[int]:
    return _mulaw_decode(resources.files("iim.tts").joinpath("prompts", f"{stem}.ul").read_bytes())


def load_segments(stems: Sequence[str]) -> array[int]:
    """The phrases joined with short pauses: mono 16-bit samples at SEGMENT_RATE (native byte order)."""
    out = array("h")
    for stem in stems:
        if out:
            out.extend(array("h", bytes(2 * _GAP)))
        out.extend(_read(stem))
    return out


# -- build time: render the phrases once with espeak-ng ----------------------------------------------------

def _trim(samples: array[int], threshold: int = 200) -> array[int]:
    """Leading and trailing near-silence cut (espeak pads both ends), 40 ms kept either side."""
    loud = [i for i, s in enumerate(samples) if abs(s) > threshold]
    if not loud:
        return samples
    pad = SEGMENT_RATE // 25
    return samples[max(0, loud[0] - pad):loud[-1] + pad]


def build(directory: Path, stems: Sequence[str] = ()) -> None:
    """Render every phrase (or only ``stems``) with the in-process espeak-ng at 8 kHz into ``directory`` (run at
    dev time)."""
    import time

    from iim.tts import espeak
    from iim.tts.engine import resample_pcm16

    directory.mkdir(parents=True, exist_ok=True)
    for stem, (voice, text) in PHRASES.items():
        if stems and stem not in stems:
            continue
        speech = espeak.synthesize(text, voice, deadline=time.monotonic() + 30, words_per_minute=150)
        samples = _trim(resample_pcm16(speech.samples, speech.rate, SEGMENT_RATE))
        if sys.byteorder == "big":
            samples.byteswap()
        (directory / f"{stem}.ul").write_bytes(_mulaw_encode(samples))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iim.tts.generic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", help="render the shipped phrases again with espeak-ng")
    parser.add_argument("stems", nargs="*", help="only these phrases (default: all)")
    args = parser.parse_args(argv)
    if args.build:
        build(Path(__file__).with_name("prompts"), args.stems)
    return 0


if __name__ == "__main__":
    sys.exit(main())
