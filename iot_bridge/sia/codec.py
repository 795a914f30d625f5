"""Sans-I/O SIA DC-09 codec (ANSI/SIA DC-09-2013/2021): bytes in, frames out; replies in, bytes out.

A frame on the wire::

    <LF><crc><0LLL>"<id>"<seq>[R<rcvr>]L<pref>[#<acct>][<data>][<x-data>]...[_HH:MM:SS,MM-DD-YYYY]<CR>

``crc`` is CRC-16/ARC (polynomial 0x8005 reflected, initial value 0) of everything from the first ``"`` to the
end of the timestamp, as four hex digits; ``0LLL`` is that span's length in three hex digits. A ``*`` before
the id (``"*SIA-DCS"``) means the part after ``[`` is encrypted: AES-128/192/256-CBC with a zero IV over
``<pad>|<data>]<x-data><timestamp>`` (random pad characters, never ``|``, ``[`` or ``]``, making the plaintext
a multiple of 16 bytes), sent as hex. An encrypted message must carry a timestamp.

What a frame that cannot be taken is answered with (the standard's replies):

- ``NAK`` (with the receiver's time, so the panel can set its clock): a CRC or length error, a frame that does
  not decrypt with the account's key, a timestamp that cannot be read or is outside the window
  (:data:`AHEAD_S` ahead, :data:`BEHIND_S` behind the receiver's clock); never an extended data block: one
  that cannot be read is skipped and counted (:attr:`Content.malformed`), its meaning is
  :mod:`iot_bridge.sia.xdata`'s;
- ``DUH`` ("not understood"): a well-formed frame whose id, account, data or encryption the receiver does not
  take (unknown account, an encrypted message for a plain account or the reverse, data that is not SIA-DCS /
  ADM-CID).

Nothing here raises anything but :class:`FrameError`, whatever the bytes; the fuzz tests hold it to that.
"""

from __future__ import annotations

import enum
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = [
    "AHEAD_S", "BEHIND_S", "MAX_FRAME", "NEED_DATA", "Content", "Frame", "FrameError", "FrameReader", "MessageId",
    "NeedData", "Reply", "ack", "crc16", "decrypt", "duh", "encode", "encrypt", "format_timestamp", "nak",
    "open_content", "parse_datagram", "parse_frame", "within_window",
]

#: How far a message's timestamp may be ahead of, or behind, the receiver's clock (DC-09: +20 s / -40 s).
AHEAD_S: Final = 20
BEHIND_S: Final = 40
#: The longest frame taken, between LF and CR (the length field's own limit is 0xFFF plus 8).
MAX_FRAME: Final = 0xFFF + 8

_LF, _CR = 0x0A, 0x0D
_IV: Final = bytes(16)
_HEX = re.compile(r"[0-9A-Fa-f]+")
_HEADER = re.compile(
    r'"(?P<star>\*?)(?P<id>[A-Z0-9-]{1,16})"(?P<seq>[0-9]{4})(?:R(?P<rcvr>[0-9A-Fa-f]{1,6}))?'
    r"L(?P<line>[0-9A-Fa-f]{1,6})(?:#(?P<acct>[0-9A-Fa-f]{3,16}))?\[")
_TIMESTAMP = re.compile(r"_(\d{2}):(\d{2}):(\d{2}),(\d{2})-(\d{2})-(\d{4})")
#: An extended data block's content: its identifier letter and up to 256 printable ASCII characters but [ and ]
#: (DC-09's longest blocks, alarm text and verification, hold 256).
_XBLOCK = re.compile(r"[\x20-\x5a\x5c\x5e-\x7e]{1,257}")
_PAD_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


class MessageId(enum.StrEnum):
    """The message ids a receiver takes (DC-09 5.5.1.3); ``NULL`` is a link test."""

    SIA_DCS = "SIA-DCS"
    ADM_CID = "ADM-CID"
    NULL = "NULL"


class Reply(enum.StrEnum):
    ACK = "ACK"
    NAK = "NAK"
    DUH = "DUH"


class FrameError(Exception):
    """The frame cannot be taken; ``reply`` is what the standard answers (``frame`` when the header was read)."""

    def __init__(self, reply: Reply, reason: str, frame: Frame | None = None) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason
        self.frame = frame


class NeedData:
    """Sentinel: feed more bytes."""


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame whose CRC and length are right and whose header was read; ``body`` is everything after the
    data's ``[`` (plain text, or the hex of the encrypted part)."""

    message_id: MessageId
    encrypted: bool
    sequence: str
    receiver: str | None
    line: str
    account: str | None
    body: str


@dataclass(frozen=True, slots=True)
class Content:
    """A frame's data (without the ``#acct|`` prefix), its extended data blocks (each without its brackets) and
    its timestamp; ``malformed``: how many pieces between the data and the timestamp were not a readable block
    (dropped: bad extended data never costs the alarm its ACK)."""

    data: str
    extended: tuple[str, ...]
    timestamp: datetime | None
    malformed: int = 0


def crc16(data: bytes) -> int:
    """CRC-16/ARC: polynomial 0x8005 reflected (0xA001), initial value 0, no final XOR."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def encode(text: str) -> bytes:
    """``text`` (from the id's first ``"`` to the end) as a frame: LF, CRC, length, text, CR."""
    raw = text.encode("ascii")
    if len(raw) > 0xFFF:
        raise ValueError("a DC-09 message is at most 4095 characters")
    return b"\n" + f"{crc16(raw):04X}0{len(raw):03X}".encode() + raw + b"\r"


def parse_frame(raw: bytes) -> Frame:
    """Read one frame (the bytes between LF and CR).

    Raises:
        FrameError: NAK for a CRC or length error, DUH for a header the receiver does not understand.
    """
    if len(raw) < 8 or len(raw) > MAX_FRAME:
        raise FrameError(Reply.NAK, "frame too short or too long")
    head, text = raw[:8], raw[8:]
    if not _HEX.fullmatch(head.decode("latin-1")) or head[4:5] != b"0":
        raise FrameError(Reply.NAK, "CRC or length field is not hex")
    if int(head[4:8], 16) != len(text):
        raise FrameError(Reply.NAK, "length field does not match")
    if int(head[:4], 16) != crc16(text):
        raise FrameError(Reply.NAK, "CRC mismatch")
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError:
        raise FrameError(Reply.DUH, "not ASCII") from None
    match = _HEADER.match(decoded)
    if match is None:
        raise FrameError(Reply.DUH, "header not understood")
    try:
        message_id = MessageId(match["id"])
    except ValueError:
        raise FrameError(Reply.DUH, "message id not supported") from None
    frame = Frame(message_id, bool(match["star"]), match["seq"], _upper(match["rcvr"]), match["line"].upper(),
                  _upper(match["acct"]), decoded[match.end():])
    if frame.encrypted and message_id is MessageId.NULL:
        raise FrameError(Reply.DUH, "a NULL message is not encrypted", frame)
    return frame


def parse_datagram(datagram: bytes) -> Frame:
    """One UDP datagram: exactly one frame, LF to CR."""
    if len(datagram) < 2 or datagram[0] != _LF or datagram[-1] != _CR:
        raise FrameError(Reply.NAK, "a datagram is not one LF ... CR frame")
    return parse_frame(datagram[1:-1])


def _upper(value: str | None) -> str | None:
    return value.upper() if value is not None else None


class FrameReader:
    """A TCP stream's frames: bytes before an LF are skipped; an LF starts a frame and a CR ends it. A frame
    longer than :data:`MAX_FRAME` is an error (NAK) and the reader looks for the next LF."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max = max_frame

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> Frame | FrameError | NeedData:
        """The next frame, or the error it is (answered, then reading goes on), or NEED_DATA."""
        buf = self._buffer
        start = buf.find(_LF)
        if start < 0:
            buf.clear()  # nothing before an LF can belong to a frame
            return NEED_DATA
        del buf[:start]
        end = buf.find(_CR, 1, self._max + 2)
        if end < 0:
            if len(buf) > self._max + 1:
                del buf[:1]  # skip this LF: the next one may start a good frame
                return FrameError(Reply.NAK, "frame too long")
            return NEED_DATA
        raw = bytes(buf[1:end])
        del buf[:end + 1]
        restart = raw.rfind(_LF)
        if restart >= 0:
            raw = raw[restart + 1:]  # a frame cut short and a new one begun: take the new one
        try:
            return parse_frame(raw)
        except FrameError as exc:
            return exc


# -- content ----------------------------------------------------------------------------------------------

def _cipher(key: bytes) -> Cipher[modes.CBC]:
    if len(key) not in (16, 24, 32):
        raise ValueError("an AES key is 16, 24 or 32 bytes")
    return Cipher(algorithms.AES(key), modes.CBC(_IV))


def decrypt(hex_text: str, key: bytes) -> str:
    """The plaintext of an encrypted part (hex of AES-CBC, zero IV).

    Raises:
        FrameError: NAK when it is not hex, not whole blocks, or not printable ASCII once decrypted.
    """
    if not hex_text or len(hex_text) % 32 or not _HEX.fullmatch(hex_text):
        raise FrameError(Reply.NAK, "encrypted part is not whole AES blocks in hex")
    decryptor = _cipher(key).decryptor()
    plain = decryptor.update(bytes.fromhex(hex_text)) + decryptor.finalize()
    if any(byte < 0x20 or byte > 0x7E for byte in plain):
        raise FrameError(Reply.NAK, "does not decrypt with the account's key")
    return plain.decode("ascii")


def encrypt(text: str, key: bytes, *, pad: str | None = None) -> str:
    """``<pad>|text`` encrypted as hex; the pad (random unless given) makes whole 16-byte blocks."""
    if pad is None:
        pad = "".join(secrets.choice(_PAD_ALPHABET) for _ in range(-(len(text) + 1) % 16))
    plain = f"{pad}|{text}".encode("ascii")
    if len(plain) % 16:
        raise ValueError("the pad does not make whole blocks")
    encryptor = _cipher(key).encryptor()
    return (encryptor.update(plain) + encryptor.finalize()).hex().upper()


def open_content(frame: Frame, key: bytes | None) -> Content:
    """The frame's data, extended data and timestamp; decrypted with ``key`` when the frame is encrypted.

    Raises:
        FrameError: DUH when encryption and the account disagree or the content is not understood; NAK
            when it does not decrypt or its timestamp cannot be read.
    """
    if frame.encrypted != (key is not None):
        raise FrameError(Reply.DUH, "encrypted message for a plain account" if frame.encrypted
                         else "plain message for an account that requires encryption", frame)
    text = frame.body
    if key is not None:
        plain = decrypt(text, key)
        pad, bar, text = plain.partition("|")
        if not bar or any(c in "[]" for c in pad):
            raise FrameError(Reply.NAK, "does not decrypt with the account's key", frame)
    data, bracket, rest = text.partition("]")
    if not bracket or "[" in data:
        raise FrameError(Reply.DUH, "data block not closed", frame)
    if data.startswith("#"):
        account, bar, data = data[1:].partition("|")
        if not bar or account.upper() != frame.account:
            raise FrameError(Reply.DUH, "the data names another account", frame)
    # The timestamp is what follows the last "]"; between the data and it, the extended data blocks.
    blocks, last, stamp_text = rest.rpartition("]")
    extended, malformed = _blocks(blocks + last)
    timestamp = None
    if stamp_text:
        stamp = _TIMESTAMP.fullmatch(stamp_text)
        if stamp is None:
            raise FrameError(Reply.NAK, "timestamp not readable", frame)
        hh, mi, ss, mo, dd, yyyy = (int(part) for part in stamp.groups())
        try:
            timestamp = datetime(yyyy, mo, dd, hh, mi, ss, tzinfo=UTC)
        except ValueError:
            raise FrameError(Reply.NAK, "timestamp not a time", frame) from None
    if frame.encrypted and timestamp is None:
        raise FrameError(Reply.NAK, "an encrypted message carries no timestamp", frame)
    return Content(data, extended, timestamp, malformed)


def _blocks(text: str) -> tuple[tuple[str, ...], int]:
    """``[..][..]`` read as blocks; a piece that is not one (too long, a stray ``[``, text outside brackets) is
    counted and skipped, the blocks after it still read."""
    blocks: list[str] = []
    malformed = 0
    for piece in text.split("]")[:-1]:
        if piece.startswith("[") and _XBLOCK.fullmatch(piece[1:]):
            blocks.append(piece[1:])
        else:
            malformed += 1
    return tuple(blocks), malformed


def within_window(timestamp: datetime | None, now: datetime) -> bool:
    """No timestamp (a plain message may omit it), or one :data:`AHEAD_S` ahead to :data:`BEHIND_S` behind."""
    if timestamp is None:
        return True
    delta = (timestamp - now).total_seconds()
    return -BEHIND_S <= delta <= AHEAD_S


# -- replies ----------------------------------------------------------------------------------------------

def format_timestamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("_%H:%M:%S,%m-%d-%Y")


def _route(frame: Frame) -> str:
    receiver = f"R{frame.receiver}" if frame.receiver is not None else ""
    account = f"#{frame.account}" if frame.account is not None else ""
    return f"{frame.sequence}{receiver}L{frame.line}{account}"


def ack(frame: Frame, key: bytes | None, now: datetime) -> bytes:
    """ACK: echoes the sequence, receiver, line and account; encrypted (with a timestamp) when the frame was."""
    if frame.encrypted and key is not None:
        return encode(f'"*ACK"{_route(frame)}[{encrypt("]" + format_timestamp(now), key)}')
    return encode(f'"ACK"{_route(frame)}[]')


def nak(now: datetime) -> bytes:
    """NAK: never encrypted, with the receiver's time (the panel may set its clock from it)."""
    return encode(f'"NAK"0000R0L0A0[]{format_timestamp(now)}')


def duh(frame: Frame | None) -> bytes:
    """DUH: echoes what was read of the header (nothing: sequence 0000, R0 L0)."""
    if frame is None:
        return encode('"DUH"0000R0L0A0[]')
    return encode(f'"DUH"{_route(frame)}[]')
