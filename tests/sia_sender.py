"""An alarm panel's side of SIA DC-09, written from the standard (not from iot_bridge.sia): frames, CRC,
AES-CBC with the standard's pad, TCP and UDP transmission, and reading the receiver's reply."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def _reflect(value: int, bits: int) -> int:
    return int(f"{value:0{bits}b}"[::-1], 2)


def _crc_table() -> list[int]:
    """CRC-16 with polynomial 0x8005, reflected in and out (the standard's CRC, a.k.a. CRC-16/ARC)."""
    table = []
    for byte in range(256):
        crc = _reflect(byte, 8) << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
        table.append(_reflect(crc, 16))
    return table


_TABLE = _crc_table()


def crc(data: bytes) -> int:
    value = 0
    for byte in data:
        value = (value >> 8) ^ _TABLE[(value ^ byte) & 0xFF]
    return value


def stamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("_%H:%M:%S,%m-%d-%Y")


def wrap(message: str, *, bad_crc: bool = False, length: int | None = None) -> bytes:
    raw = message.encode("ascii")
    value = crc(raw) ^ (0x0101 if bad_crc else 0)
    return b"\n" + f"{value:04X}0{len(raw) if length is None else length:03X}".encode() + raw + b"\r"


def _aes(key: bytes) -> Cipher[modes.CBC]:
    return Cipher(algorithms.AES(key), modes.CBC(bytes(16)))


@dataclass
class Reply:
    kind: str  # ACK, NAK, DUH (a leading * for an encrypted one)
    sequence: str
    account: str | None
    timestamp: datetime | None
    raw: bytes


@dataclass
class Panel:
    """One account at the receiver: ``key`` set sends encrypted frames (``"*SIA-DCS"``)."""

    account: str
    line: str = "1"
    receiver: str | None = "1"
    key: bytes | None = None
    sequence: int = 0

    def frame(self, data: str, *, message_id: str = "SIA-DCS", at: datetime | None = None, timestamp: bool = True,
              sequence: int | None = None, bad_crc: bool = False, key: bytes | None = None,
              extended: Sequence[str] = ()) -> bytes:
        """``data`` is the part inside the brackets after ``#acct|`` (``Nri1/FA01``, ``1110 01 015``);
        ``extended`` the extended data, each block's text inside its brackets (``XE37.6176``, ``Vhttps://..``),
        sent between the data block and the timestamp (DC-09 5.5.1.9), encrypted with the rest."""
        if sequence is None:
            self.sequence = self.sequence % 9999 + 1
            sequence = self.sequence
        key = key or self.key
        at = at or datetime.now(UTC)
        when = stamp(at) if timestamp or key else ""
        route = f"{sequence:04d}" + (f"R{self.receiver}" if self.receiver else "") + f"L{self.line}#{self.account}"
        xdata = "".join(f"[{block}]" for block in extended)
        if key is None:
            body = f'"{message_id}"{route}[#{self.account}|{data}]{xdata}{when}'
        else:
            text = f"{data}]{xdata}{when}"
            pad = "".join(secrets.choice("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for _ in range(-(len(text) + 1) % 16))
            encryptor = _aes(key).encryptor()
            hexed = (encryptor.update(f"{pad}|{text}".encode()) + encryptor.finalize()).hex().upper()
            body = f'"*{message_id}"{route}[{hexed}'
        return wrap(body, bad_crc=bad_crc)

    def read(self, raw: bytes) -> Reply:
        """Check the reply's framing and CRC, decrypt an encrypted one, read its timestamp."""
        assert raw[:1] == b"\n", raw
        assert raw[-1:] == b"\r", raw
        head, text = raw[1:9], raw[9:-1]
        assert int(head[:4], 16) == crc(text), "reply CRC"
        assert int(head[4:], 16) == len(text), "reply length"
        match = re.fullmatch(rb'"(\*?[A-Z]+)"(\d{4})(?:R[0-9A-F]+)?L[0-9A-F]+(?:#([0-9A-F]+)|A0)?\[(.*)', text)
        assert match is not None, text
        kind, seq, account, rest = match[1].decode(), match[2].decode(), match[3], match[4].decode()
        if kind.startswith("*"):
            assert self.key is not None
            decryptor = _aes(self.key).decryptor()
            plain = (decryptor.update(bytes.fromhex(rest)) + decryptor.finalize()).decode("ascii")
            rest = plain.partition("|")[2]
        when = re.search(r"_(\d{2}:\d{2}:\d{2},\d{2}-\d{2}-\d{4})$", rest)
        timestamp = datetime.strptime(when[1], "%H:%M:%S,%m-%d-%Y").replace(tzinfo=UTC) if when else None
        return Reply(kind, seq, account.decode() if account else None, timestamp, raw)


async def send_tcp(host: str, port: int, frames: list[bytes], *, timeout: float = 10.0) -> list[bytes]:
    """Send each frame on one connection and wait for its reply (as a panel does)."""
    reader, writer = await asyncio.open_connection(host, port)
    replies = []
    try:
        for frame in frames:
            writer.write(frame)
            await writer.drain()
            async with asyncio.timeout(timeout):
                await reader.readuntil(b"\n")
                replies.append(b"\n" + await reader.readuntil(b"\r"))
    finally:
        writer.close()
    return replies


class _Udp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.replies.put_nowait(data)


async def send_udp(host: str, port: int, frame: bytes, *, timeout: float = 10.0) -> bytes:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Udp, remote_addr=(host, port))
    try:
        transport.sendto(frame)
        async with asyncio.timeout(timeout):
            return await protocol.replies.get()
    finally:
        transport.close()
