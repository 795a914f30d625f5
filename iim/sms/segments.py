"""SMS encoding and segmentation (pure; no I/O).

* The GSM 03.38 default alphabet (7-bit, with the extension table reached through ESC) is used whenever
  the whole text fits it: 160 septets in one SMS instead of 70 UCS-2 characters. One character outside
  it (Cyrillic, an emoji) switches the whole message to UCS-2 (UTF-16BE), as handsets do.
* Septets travel unpacked, one per octet (SMPP ``data_coding`` 0 is the SMSC default alphabet; the SMSC
  packs them for the air interface).
* A long text is split into parts carrying a concatenation UDH with an 8-bit reference
  (``05 00 03 ref total seq``): 153 septets or 67 UCS-2 code units per part. An extension character
  (two septets) and a surrogate pair (two code units) are never split across parts: a handset would
  show garbage for half a character.
* Flash SMS ("class 0": shown at once, not stored) is ``data_coding`` 0x10 (GSM) or 0x18 (UCS-2).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "Alphabet", "EncodedSms", "GSM_MULTI", "GSM_SINGLE", "UCS2_MULTI", "UCS2_SINGLE", "UDH_CONCAT_IEI",
    "decode_part", "encode_sms", "fits_gsm", "gsm_septets", "reassemble", "segment_count",
]

GSM_SINGLE = 160
GSM_MULTI = 153
UCS2_SINGLE = 70
UCS2_MULTI = 67
UDH_CONCAT_IEI = 0x00  # concatenated short messages, 8-bit reference
_ESC = 0x1B

# GSM 03.38 basic character set, by septet value; "\x1b" stands for the escape to the extension table.
_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
assert len(_BASIC) == 128
# The extension table (each costs two septets: ESC + code).
_EXTENSION = {"\f": 0x0A, "^": 0x14, "{": 0x28, "}": 0x29, "\\": 0x2F, "[": 0x3C, "~": 0x3D, "]": 0x3E,
              "|": 0x40, "€": 0x65}
_TO_BASIC = {ch: code for code, ch in enumerate(_BASIC) if code != _ESC}
_FROM_EXTENSION = {code: ch for ch, code in _EXTENSION.items()}


class Alphabet(StrEnum):
    GSM7 = "gsm7"
    UCS2 = "ucs2"


@dataclass(frozen=True, slots=True)
class EncodedSms:
    """What goes into ``submit_sm``: one ``short_message`` per part (UDH included when concatenated)."""

    alphabet: Alphabet
    data_coding: int
    parts: tuple[bytes, ...]
    #: set the UDHI bit (0x40) of ``esm_class``: the parts start with a user data header
    udhi: bool
    reference: int

    @property
    def esm_class(self) -> int:
        return 0x40 if self.udhi else 0x00


def fits_gsm(text: str) -> bool:
    """Every character is in the GSM default alphabet or its extension table."""
    return all(ch in _TO_BASIC or ch in _EXTENSION for ch in text)


def gsm_septets(text: str) -> int:
    """Septets the text takes in the GSM alphabet (extension characters count two)."""
    return sum(2 if ch in _EXTENSION else 1 for ch in text)


def _gsm_units(text: str) -> list[bytes]:
    """One entry per character: its septets (1 or 2), so parts are cut between characters only."""
    return [bytes((_ESC, _EXTENSION[ch])) if ch in _EXTENSION else bytes((_TO_BASIC[ch],)) for ch in text]


def _ucs2_units(text: str) -> list[bytes]:
    """One entry per code point: its UTF-16BE bytes (a surrogate pair stays one entry of 4 bytes)."""
    return [ch.encode("utf-16-be") for ch in text]


def _pack(units: list[bytes], limit: int, unit_size: int) -> list[bytes]:
    """Greedy: fill each part with whole characters up to ``limit`` units of ``unit_size`` bytes."""
    parts: list[bytes] = []
    current = bytearray()
    budget = limit * unit_size
    for unit in units:
        if len(current) + len(unit) > budget:
            parts.append(bytes(current))
            current = bytearray()
        current += unit
    if current or not parts:
        parts.append(bytes(current))
    return parts


def encode_sms(text: str, *, flash: bool = False, reference: int = 0) -> EncodedSms:
    """Encode ``text`` for SMPP: alphabet, ``data_coding`` and the parts (with UDH when there are several).

    ``reference`` (0..255) is the concatenation reference; keep it stable for one message (derive it from
    the message id) so that parts resent after a failure still join the parts already delivered.
    """
    if not 0 <= reference <= 255:
        raise ValueError("the concatenation reference is 8-bit (0..255)")
    if fits_gsm(text):
        alphabet, units, unit_size = Alphabet.GSM7, _gsm_units(text), 1
        single, multi, coding = GSM_SINGLE, GSM_MULTI, 0x00
    else:
        alphabet, units, unit_size = Alphabet.UCS2, _ucs2_units(text), 2
        single, multi, coding = UCS2_SINGLE, UCS2_MULTI, 0x08
    if flash:
        coding |= 0x10  # general data coding with a message class; class bits 00 = class 0 (flash)
    total = sum(len(u) for u in units)
    if total <= single * unit_size:
        return EncodedSms(alphabet, coding, (b"".join(units),), udhi=False, reference=reference)
    payloads = _pack(units, multi, unit_size)
    if len(payloads) > 255:
        raise ValueError("text needs more than 255 parts")
    count = len(payloads)
    parts = tuple(bytes((5, UDH_CONCAT_IEI, 3, reference, count, seq)) + payload
                  for seq, payload in enumerate(payloads, start=1))
    return EncodedSms(alphabet, coding, parts, udhi=True, reference=reference)


def segment_count(text: str) -> int:
    """How many SMS the text takes (what the subscriber is billed for)."""
    return len(encode_sms(text).parts)


def _alphabet_of(data_coding: int) -> Alphabet:
    if data_coding in (0x08, 0x18):
        return Alphabet.UCS2
    if data_coding in (0x00, 0x10, 0xF0):
        return Alphabet.GSM7
    raise ValueError(f"unsupported data_coding 0x{data_coding:02x}")


def decode_part(short_message: bytes, data_coding: int, *, udhi: bool) -> tuple[tuple[int, int, int] | None, str]:
    """Decode one ``short_message``: ((reference, total, seq) or None, text). For tests and MO parsing."""
    concat: tuple[int, int, int] | None = None
    payload = short_message
    if udhi:
        if not short_message:
            raise ValueError("UDHI set but the message is empty")
        udh_len = short_message[0]
        udh = short_message[1:1 + udh_len]
        if len(udh) != udh_len:
            raise ValueError("truncated UDH")
        i = 0
        while i + 2 <= len(udh):
            iei, length = udh[i], udh[i + 1]
            data = udh[i + 2:i + 2 + length]
            if iei == 0x00 and length == 3 and len(data) == 3:
                concat = (data[0], data[1], data[2])
            elif iei == 0x08 and length == 4 and len(data) == 4:
                concat = ((data[0] << 8) | data[1], data[2], data[3])
            i += 2 + length
        payload = short_message[1 + udh_len:]
    if _alphabet_of(data_coding) is Alphabet.UCS2:
        return concat, payload.decode("utf-16-be")
    out: list[str] = []
    escaped = False
    for septet in payload:
        if escaped:
            out.append(_FROM_EXTENSION.get(septet, " "))
            escaped = False
        elif septet == _ESC:
            escaped = True
        elif septet < 128:
            out.append(_BASIC[septet])
        else:
            raise ValueError(f"octet 0x{septet:02x} is not a GSM septet")
    return concat, "".join(out)


def reassemble(parts: list[tuple[int, bytes]] | tuple[tuple[int, bytes], ...], *, udhi: bool) -> str:
    """Join ``(data_coding, short_message)`` parts in their UDH order (or as given when not concatenated).

    UCS-2 parts are joined as bytes before decoding, so a peer that does split a surrogate pair still
    decodes.
    """
    decoded: list[tuple[int, int, bytes]] = []
    for index, (coding, sm) in enumerate(parts):
        concat, _ = decode_part(sm, coding, udhi=udhi)
        payload = sm[1 + sm[0]:] if udhi else sm
        decoded.append((concat[2] if concat else index, coding, payload))
    decoded.sort(key=lambda item: item[0])
    if not decoded:
        return ""
    coding = decoded[0][1]
    joined = b"".join(payload for _, _, payload in decoded)
    return decode_part(joined, coding, udhi=False)[1]
