"""Plain RTP for the tests' own phones, without I/O: packets (RFC 3550), G.711 mu-law audio, telephone events
(RFC 4733) and a tone detector, so a test can say *what* a phone heard, not only that packets arrived.

A tone is how a test recognises a party: each phone sends its own frequency, and a frame "is" that party when
nearly all of its energy sits in that one frequency (speech, silence and the other party's tone do not).
Frequencies on a 50 Hz grid fall on one bin of a 20 ms frame (160 samples at 8 kHz).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

RATE = 8000
FRAME_SAMPLES = 160  # 20 ms
PCMU = 0
#: RFC 4733 event codes of the keys (0-9, *, #, A-D)
KEYS = "0123456789*#ABCD"
_HEADER = struct.Struct("!BBHII")
_EVENT = struct.Struct("!BBH")


class MalformedRtp(ValueError):
    """Bytes that are not an RTP packet (or an event payload that is not RFC 4733)."""


@dataclass(frozen=True, slots=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False

    def encode(self) -> bytes:
        return _HEADER.pack(0x80, (0x80 if self.marker else 0) | self.payload_type, self.sequence & 0xFFFF,
                            self.timestamp & 0xFFFFFFFF, self.ssrc) + self.payload


def parse(data: bytes) -> RtpPacket:
    """One RTP packet (version 2; CSRCs, a header extension and padding are skipped); MalformedRtp otherwise."""
    if len(data) < _HEADER.size:
        raise MalformedRtp(f"{len(data)} bytes: shorter than an RTP header")
    first, second, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
    if first >> 6 != 2:
        raise MalformedRtp(f"RTP version {first >> 6}, not 2")
    offset = _HEADER.size + 4 * (first & 0x0F)
    if first & 0x10:  # header extension: 16-bit profile, 16-bit length in 32-bit words
        if len(data) < offset + 4:
            raise MalformedRtp("header extension cut short")
        offset += 4 + 4 * struct.unpack_from("!H", data, offset + 2)[0]
    end = len(data)
    if first & 0x20:
        if end == 0 or data[-1] == 0:
            raise MalformedRtp("padding flag without a padding count")
        end -= data[-1]
    if offset > end:
        raise MalformedRtp("header, extension and padding are longer than the packet")
    return RtpPacket(second & 0x7F, sequence, timestamp, ssrc, bytes(data[offset:end]), bool(second & 0x80))


# ---------------------------------------------------------------------------------------------- G.711 mu-law

_BIAS, _CLIP = 0x84, 32635


def ulaw_encode(sample: int) -> int:
    """One 16-bit linear sample as a mu-law byte (ITU-T G.711)."""
    sign = 0x80 if sample < 0 else 0
    magnitude = min(abs(sample), _CLIP) + _BIAS
    exponent = max(magnitude.bit_length() - 8, 0)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return ~(sign | exponent << 4 | mantissa) & 0xFF


def ulaw_decode(byte: int) -> int:
    byte = ~byte & 0xFF
    magnitude = (((byte & 0x0F) << 3) + _BIAS) << ((byte >> 4) & 0x07)
    return _BIAS - magnitude if byte & 0x80 else magnitude - _BIAS


def tone(hz: float, *, amplitude: int = 8000) -> Iterator[bytes]:
    """Endless 20 ms mu-law frames of a sine at ``hz``, phase continuous from frame to frame."""
    n = 0
    while True:
        yield bytes(ulaw_encode(round(amplitude * math.sin(2 * math.pi * hz * (n + i) / RATE)))
                    for i in range(FRAME_SAMPLES))
        n += FRAME_SAMPLES


def tone_share(samples: Sequence[int], hz: float) -> float:
    """The share (0..1) of the frame's energy at ``hz`` (Goertzel); near 1 for a pure tone on a bin."""
    energy = sum(s * s for s in samples)
    if energy == 0:
        return 0.0
    coeff = 2 * math.cos(2 * math.pi * hz / RATE)
    prev = prev2 = 0.0
    for s in samples:
        prev, prev2 = s + coeff * prev - prev2, prev
    power = prev * prev + prev2 * prev2 - coeff * prev * prev2
    return min(power / (len(samples) / 2 * energy), 1.0)


def is_tone(payload: bytes, hz: float, *, share: float = 0.8) -> bool:
    """Is this mu-law frame (mostly) a tone at ``hz``?"""
    return len(payload) >= FRAME_SAMPLES // 2 and tone_share([ulaw_decode(b) for b in payload], hz) >= share


# ---------------------------------------------------------------------------------------------- RFC 4733


@dataclass(frozen=True, slots=True)
class KeyEvent:
    key: str
    end: bool
    volume: int
    duration: int

    def encode(self) -> bytes:
        return _EVENT.pack(KEYS.index(self.key), (0x80 if self.end else 0) | (self.volume & 0x3F),
                           self.duration & 0xFFFF)


def parse_event(payload: bytes) -> KeyEvent:
    """A telephone-event payload; MalformedRtp when it is not one of the 16 keys."""
    if len(payload) < _EVENT.size:
        raise MalformedRtp(f"{len(payload)} bytes: shorter than a telephone event")
    code, flags, duration = _EVENT.unpack_from(payload)
    if code >= len(KEYS):
        raise MalformedRtp(f"event {code} is not a key")
    return KeyEvent(KEYS[code], bool(flags & 0x80), flags & 0x3F, duration)


def key_packets(key: str, *, payload_type: int, sequence: int, timestamp: int, ssrc: int,
                frames: int = 10) -> list[RtpPacket]:
    """A key press as a sender sends it (RFC 4733 2.5): ``frames`` updates of a growing duration, the first
    marked, then the end packet three times; all share the timestamp of the key's start."""
    packets = [RtpPacket(payload_type, sequence + i, timestamp, ssrc,
                         KeyEvent(key, False, 10, FRAME_SAMPLES * (i + 1)).encode(), marker=i == 0)
               for i in range(frames)]
    end = KeyEvent(key, True, 10, FRAME_SAMPLES * frames).encode()
    packets += [RtpPacket(payload_type, sequence + frames + i, timestamp, ssrc, end) for i in range(3)]
    return packets


def keys_in(packets: Sequence[RtpPacket], payload_type: int) -> str:
    """The keys a stream of telephone events carried: one per event (start timestamp), once it ended."""
    seen: dict[tuple[int, int], str] = {}
    for packet in packets:
        if packet.payload_type != payload_type:
            continue
        event = parse_event(packet.payload)
        if event.end:
            seen.setdefault((packet.ssrc, packet.timestamp), event.key)
    return "".join(seen.values())
