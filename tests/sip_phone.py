"""A SIP phone for the real-switch tier that really talks: a UDP user agent that answers one call with plain RTP
(G.711 mu-law and RFC 4733 keys), sends its own tone for as long as the call lasts, keeps every packet it
receives, presses keys and hangs up.

SIPp can play audio, but a test cannot ask it what it heard; this phone can (:meth:`SipPhone.heard`,
:meth:`SipPhone.keys`). SIP messages are :mod:`tests.sip_client`'s and media :mod:`tests.rtp`'s (both without
I/O); SDP is read and written here (:func:`media_offer`, :func:`answer_sdp`). This module only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from tests import rtp, sip_client

_RTPMAP = re.compile(r"^a=rtpmap:(\d+) ([^/\s]+)/(\d+)", re.MULTILINE)


class SdpError(ValueError):
    """An offer this phone cannot answer (no audio, no PCMU)."""


@dataclass(frozen=True)
class MediaOffer:
    host: str
    port: int
    payload_types: list[int]
    event_type: int | None  # telephone-event/8000, when offered


def media_offer(sdp: str) -> MediaOffer:
    """Where to send audio and which payload types were offered (the first ``m=audio`` line)."""
    connection = re.search(r"^c=IN IP4 (\S+)", sdp, re.MULTILINE)
    audio = re.search(r"^m=audio (\d+) RTP/AVP((?: \d+)+)", sdp, re.MULTILINE)
    if connection is None or audio is None:
        raise SdpError(f"no IPv4 audio stream in the offer:\n{sdp[:500]}")
    events = [int(pt) for pt, name, rate in _RTPMAP.findall(sdp)
              if name.lower() == "telephone-event" and rate == "8000"]
    return MediaOffer(connection.group(1), int(audio.group(1)), [int(pt) for pt in audio.group(2).split()],
                      events[0] if events else None)


def answer_sdp(offer: MediaOffer, host: str, port: int) -> str:
    """PCMU (and telephone events, if offered) on ``host:port``; SdpError when PCMU was not offered."""
    if rtp.PCMU not in offer.payload_types:
        raise SdpError(f"PCMU not offered: {offer.payload_types}")
    session = secrets.randbelow(10**9)
    formats = [rtp.PCMU, *([offer.event_type] if offer.event_type is not None else [])]
    lines = ["v=0", f"o=- {session} {session} IN IP4 {host}", "s=-", f"c=IN IP4 {host}", "t=0 0",
             f"m=audio {port} RTP/AVP {' '.join(map(str, formats))}", "a=rtpmap:0 PCMU/8000"]
    if offer.event_type is not None:
        lines += [f"a=rtpmap:{offer.event_type} telephone-event/8000", f"a=fmtp:{offer.event_type} 0-16"]
    lines += ["a=ptime:20", "a=sendrecv"]
    return "\r\n".join(lines) + "\r\n"


def _address(uri: str) -> tuple[str, int]:
    """host and port of a SIP URI (``<sip:user@host:port;params>``)."""
    found = re.search(r"sips?:(?:[^@>;]*@)?([^:;>]+)(?::(\d+))?", uri)
    if found is None:
        raise ValueError(f"not a SIP URI: {uri!r:.80}")
    return found.group(1), int(found.group(2) or 5060)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_datagram(data, addr)


@dataclass
class _Dialog:
    invite: sip_client.IncomingRequest
    local_tag: str
    target: str  # the peer's Contact URI
    peer: tuple[str, int]  # where the INVITE came from (in-dialog requests go back there)
    media: tuple[str, int]
    event_type: int | None


class SipPhone:
    """Answers the first INVITE on ``host:port`` after ``answer_ms`` (180, then 200 with SDP), then sends its
    tone at ``tone_hz`` every 20 ms until the call ends; ``async with`` it."""

    def __init__(self, host: str, port: int, *, tone_hz: float, answer_ms: int = 200,
                 user: str = "phone") -> None:
        self.host, self.port, self.tone_hz, self.answer_ms, self.user = host, port, tone_hz, answer_ms, user
        self.received: list[rtp.RtpPacket] = []
        self.malformed = 0
        self.invites = 0
        self._arrival = asyncio.Event()
        self._tones: dict[float, tuple[int, int]] = {}  # hz -> (packets scanned, frames of that tone)
        self._dialog: _Dialog | None = None
        self._answered = asyncio.Event()
        self._ended = asyncio.Event()
        self._responses: asyncio.Queue[sip_client.Response] = asyncio.Queue()
        self._keys: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sip: asyncio.DatagramTransport | None = None
        self._rtp: asyncio.DatagramTransport | None = None
        self._last_response: bytes | None = None
        self._cseq = itertools.count(1)

    @property
    def rtp_port(self) -> int:
        assert self._rtp is not None
        return int(self._rtp.get_extra_info("sockname")[1])

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._sip, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self._on_sip),
                                                           local_addr=(self.host, self.port))
        self._rtp, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self._on_rtp),
                                                           local_addr=(self.host, 0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for transport in (self._sip, self._rtp):
            if transport is not None:
                transport.close()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------------------ SIP

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self._sip is not None
        self._sip.sendto(data, addr)

    def _on_sip(self, data: bytes, addr: tuple[str, int]) -> None:
        message = sip_client.parse_message(data)
        if isinstance(message, sip_client.Response):
            self._responses.put_nowait(message)
            return
        if message.method == "INVITE":
            if self._dialog is not None and message.header("Call-ID") == self._dialog.invite.header("Call-ID"):
                if self._last_response is not None:  # a retransmission: the same answer again
                    self._send(self._last_response, addr)
                return
            if self._dialog is not None:
                self._send(sip_client.reply(message, 486, "Busy Here"), addr)
                return
            self.invites += 1
            self._spawn(self._answer(message, addr))
        elif message.method == "ACK":
            if self._dialog is not None:
                self._answered.set()
        elif message.method in ("BYE", "CANCEL"):
            self._send(sip_client.reply(message, 200, "OK"), addr)
            self._ended.set()
        else:  # OPTIONS, INFO, re-INVITE-free updates: accepted, ignored
            self._send(sip_client.reply(message, 200, "OK"), addr)

    async def _answer(self, invite: sip_client.IncomingRequest, addr: tuple[str, int]) -> None:
        tag = secrets.token_hex(4)
        contact = f"sip:{self.user}@{self.host}:{self.port}"
        try:
            offer = media_offer(invite.body)
            body = answer_sdp(offer, self.host, self.rtp_port)
        except SdpError:
            self._send(sip_client.reply(invite, 488, "Not Acceptable Here", to_tag=tag), addr)
            raise
        self._dialog = _Dialog(invite, tag, invite.header("Contact") or f"sip:{addr[0]}:{addr[1]}", addr,
                               (offer.host, offer.port), offer.event_type)
        self._send(sip_client.reply(invite, 180, "Ringing", to_tag=tag, contact=contact), addr)
        await asyncio.sleep(self.answer_ms / 1000)
        self._last_response = sip_client.reply(invite, 200, "OK", to_tag=tag, contact=contact, body=body)
        self._send(self._last_response, addr)
        self._spawn(self._talk())

    async def answered(self, timeout: float) -> None:
        """Until a call is up (our 200 acknowledged)."""
        await asyncio.wait_for(self._answered.wait(), timeout)

    async def ended(self, timeout: float) -> None:
        """Until the other side hung up (BYE, or CANCEL before the answer)."""
        await asyncio.wait_for(self._ended.wait(), timeout)

    async def hang_up(self, timeout: float = 5.0) -> int:
        """BYE; the final response's code."""
        dialog = self._dialog
        assert dialog is not None, "no call to hang up"
        invite = dialog.invite
        request = sip_client.Request("BYE", dialog.target.strip("<>"), [
            ("Max-Forwards", "70"), ("From", f"{invite.header('To')};tag={dialog.local_tag}"),
            ("To", invite.header("From") or ""), ("Call-ID", invite.header("Call-ID") or ""),
            ("CSeq", f"{next(self._cseq)} BYE")])
        self._send(request.encode("UDP", f"{self.host}:{self.port}"), dialog.peer)
        self._ended.set()
        deadline = time.monotonic() + timeout
        while True:
            response = await asyncio.wait_for(self._responses.get(), max(deadline - time.monotonic(), 0.01))
            if response.code >= 200 and (response.header("CSeq") or "").endswith("BYE"):
                return response.code

    # ------------------------------------------------------------------------------------------ media

    def _on_rtp(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.received.append(rtp.parse(data))
        except rtp.MalformedRtp:
            self.malformed += 1
        self._arrival.set()

    async def _talk(self) -> None:
        """The tone, one frame every 20 ms (on a schedule, not a sleep after each send), keys in between."""
        dialog = self._dialog
        assert dialog is not None
        assert self._rtp is not None
        loop = asyncio.get_running_loop()
        ssrc, sequence, timestamp = secrets.randbits(32), secrets.randbits(16), secrets.randbits(32)
        frames = rtp.tone(self.tone_hz)
        due = loop.time()
        first = True
        while not self._ended.is_set():
            if not self._keys.empty() and dialog.event_type is not None:
                packets = rtp.key_packets(self._keys.get_nowait(), payload_type=dialog.event_type,
                                          sequence=sequence, timestamp=timestamp, ssrc=ssrc)
                for packet in packets:
                    self._rtp.sendto(packet.encode(), dialog.media)
                    due += 0.02 if not packet.payload[1] & 0x80 else 0.0
                    await asyncio.sleep(max(due - loop.time(), 0))
                sequence += len(packets)
                timestamp += rtp.FRAME_SAMPLES * (len(packets) - 3)
                continue
            packet = rtp.RtpPacket(rtp.PCMU, sequence, timestamp, ssrc, next(frames), marker=first)
            self._rtp.sendto(packet.encode(), dialog.media)
            first = False
            sequence, timestamp = sequence + 1, timestamp + rtp.FRAME_SAMPLES
            due += 0.02
            await asyncio.sleep(max(due - loop.time(), 0))

    async def press(self, key: str) -> None:
        """Send ``key`` as RFC 4733 events (the audio pauses meanwhile, as phones do)."""
        assert self._dialog is not None, "no call"
        assert self._dialog.event_type is not None, "telephone events not agreed"
        self._keys.put_nowait(key)

    def heard(self, hz: float) -> int:
        """How many audio frames received were the tone at ``hz``."""
        scanned, count = self._tones.get(hz, (0, 0))
        fresh = self.received[scanned:]  # each frame is judged once
        count += sum(1 for p in fresh if p.payload_type == rtp.PCMU and rtp.is_tone(p.payload, hz))
        self._tones[hz] = (scanned + len(fresh), count)
        return count

    def keys(self) -> str:
        """The keys received as telephone events (the payload type this phone agreed to)."""
        dialog = self._dialog
        if dialog is None or dialog.event_type is None:
            return ""
        return rtp.keys_in(self.received, dialog.event_type)

    async def until_heard(self, hz: float, frames: int, timeout: float) -> int:
        """Until ``frames`` frames of ``hz`` arrived; the count, whatever it is then."""
        deadline = time.monotonic() + timeout
        while (count := self.heard(hz)) < frames and (left := deadline - time.monotonic()) > 0:
            self._arrival.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), left)
        return count
