"""A WebRTC speaker for the real-switch tier: SIP over a secure WebSocket (RFC 7118, subprotocol ``sip``) to the
Kamailio edge, media by aiortc (ICE, DTLS-SRTP, as a browser would).

The SIP side is :mod:`tests.sip_client` (sans-I/O: messages built and parsed without the socket); this module
only moves them over aiohttp's WebSocket client and hands the SDP to aiortc. It registers with digest auth,
answers one INVITE (180, then 200 with aiortc's answer), waits for the ACK and answers the BYE.

aiortc is an optional test dependency (the ``test`` extra): :func:`require_aiortc` skips (or fails under
``IIM_REQUIRE_REAL_SWITCH=1``) where it cannot be installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import ssl
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import aiohttp
from cryptography.utils import CryptographyDeprecationWarning

from tests import sip_client
from tests.real_switch import skip_or_fail

# A 440 Hz tone at 8 kHz, 20 ms frames: what the speaker says, recognisable when it comes back.
_RATE, _SAMPLES, _TONE_HZ, _AMPLITUDE = 8000, 160, 440.0, 8000


def require_aiortc() -> ModuleType:
    try:
        import aiortc
    except ImportError:
        skip_or_fail("aiortc is not installed (pip install -e '.[test]'): no WebRTC media peer")
    return aiortc


# What a browser offers in its DTLS ClientHello, ECDSA and RSA alike. aiortc offers ECDHE-ECDSA suites only, and
# FreeSWITCH's DTLS certificate (certs_dir/dtls-srtp.pem, made at its first start) is RSA: no common suite.
_BROWSER_DTLS_CIPHERS = (b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
                         b"ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
                         b"ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA")


@contextlib.contextmanager
def browser_like_aiortc() -> Iterator[None]:
    """aiortc made to behave like a browser where it differs, for as long as the speaker is connected.

    * Host candidates: aioice leaves 127.0.0.1 out; the test speaker lives on loopback beside the switch (whose
      candidate ACL is the test's speakers network, 127.0.0.0/8), so it offers exactly that address.
    * DTLS: the ClientHello offers RSA suites too (see ``_BROWSER_DTLS_CIPHERS``).
    * FreeSWITCH's self-made DTLS certificate has serial number 0, which cryptography loads with a deprecation
      warning (an error under this suite's warning filters, which left aiortc's handshake task dead and the
      connection "connecting" for ever) when aiortc checks the fingerprint.
    * Audio packets carry no marker bit: aiortc sets it on every packet, and FreeSWITCH flushes each one."""
    import aioice.ice
    from aiortc import rtcrtpsender
    from aiortc.rtcdtlstransport import RTCCertificate

    original_hosts = aioice.ice.get_host_addresses
    original_context = RTCCertificate._create_ssl_context
    original_packet = rtcrtpsender.RtpPacket

    class AudioRtpPacket(original_packet):  # type: ignore[misc,valid-type]
        def serialize(self, *args: Any, **kwargs: Any) -> bytes:
            self.marker = 0
            return bytes(super().serialize(*args, **kwargs))

    def context(self: Any, srtp_profiles: Any) -> Any:
        ctx = original_context(self, srtp_profiles)
        ctx.set_cipher_list(_BROWSER_DTLS_CIPHERS)
        return ctx

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
    RTCCertificate._create_ssl_context = context  # type: ignore[method-assign]
    rtcrtpsender.RtpPacket = AudioRtpPacket
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Parsed a serial number which wasn't positive",
                                    category=CryptographyDeprecationWarning)
            yield
    finally:
        aioice.ice.get_host_addresses = original_hosts
        RTCCertificate._create_ssl_context = original_context  # type: ignore[method-assign]
        rtcrtpsender.RtpPacket = original_packet


def _tone_track() -> Any:
    from aiortc.mediastreams import AudioStreamTrack

    class ToneTrack(AudioStreamTrack):  # type: ignore[misc]
        """aiortc's paced silence, filled with a tone."""

        async def recv(self) -> Any:
            frame = await super().recv()
            start = int(frame.pts)
            pcm = b"".join(int(_AMPLITUDE * math.sin(2 * math.pi * _TONE_HZ * (start + n) / _RATE))
                           .to_bytes(2, "little", signed=True) for n in range(_SAMPLES))
            frame.planes[0].update(pcm)
            return frame

    return ToneTrack()


_DIRECTIONS = ("a=sendrecv", "a=sendonly", "a=recvonly", "a=inactive")


def with_explicit_direction(sdp: str) -> str:
    """The offer with ``a=sendrecv`` on every media section that states no direction (RFC 4566's default, which
    FreeSWITCH leaves implicit and aiortc requires spelled out)."""
    sections = sdp.replace("\r\n", "\n").strip("\n").split("\nm=")
    out = [sections[0]]
    for section in sections[1:]:
        lines = section.split("\n")
        if not any(line.strip() in _DIRECTIONS for line in lines):
            lines.append("a=sendrecv")
        out.append("\n".join(lines))
    return "\r\n".join("\nm=".join(out).split("\n")) + "\r\n"


def with_one_fingerprint(sdp: str) -> str:
    """aiortc's answer with only its sha-256 fingerprint, as a browser sends it. aiortc lists sha-256, sha-384 and
    sha-512; FreeSWITCH 1.10.12 keeps the last ``a=fingerprint`` it reads and the DTLS handshake then fails."""
    return "".join(line for line in sdp.splitlines(keepends=True)
                   if not line.startswith("a=fingerprint:") or line.startswith("a=fingerprint:sha-256 "))


def _peak(frame: Any) -> int:
    data = bytes(frame.planes[0])
    return max((abs(int.from_bytes(data[i:i + 2], "little", signed=True)) for i in range(0, len(data) - 1, 2)),
               default=0)


@dataclass
class Media:
    """What came out of the call's DTLS-SRTP session, decrypted and decoded by aiortc."""

    frames: int = 0
    loud_frames: int = 0  # frames carrying sound (the tone coming back), not silence
    heard: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class AnsweredCall:
    invite: sip_client.IncomingRequest
    offer: str
    answer: str
    media: Media
    peer: Any  # aiortc.RTCPeerConnection

    def describe(self) -> str:
        """The peer's states and what was received, for a failing assertion."""
        return (f"ice={self.peer.iceConnectionState} connection={self.peer.connectionState} "
                f"frames={self.media.frames} loud={self.media.loud_frames}")

    async def stats(self) -> dict[str, Any]:
        report = await self.peer.getStats()
        return {stat.type: stat for stat in report.values()}


class WebRtcSpeaker:
    """One WebSocket connection to ``wss://host:port/`` as ``user@domain``."""

    def __init__(self, host: str, port: int, user: str, password: str, domain: str) -> None:
        self.url, self.user, self.password, self.domain = f"wss://{host}:{port}/", user, password, domain
        self.instance = secrets.token_hex(6)
        self.contact = f"sip:{user}@{self.instance}.invalid;transport=ws"
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._peers: list[Any] = []
        self._listeners: list[asyncio.Task[None]] = []

    @contextlib.asynccontextmanager
    async def connected(self) -> AsyncIterator[WebRtcSpeaker]:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the test's self-signed certificate
        with browser_like_aiortc():
            async with self._websocket(context) as ws:
                self._ws = ws
                try:
                    yield self
                finally:
                    for peer in self._peers:
                        await peer.close()
                    for listener in self._listeners:
                        listener.cancel()
                    self._ws = None

    @contextlib.asynccontextmanager
    async def _websocket(self, context: ssl.SSLContext) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
        async with aiohttp.ClientSession() as session, session.ws_connect(
                self.url, protocols=("sip",), ssl=context, heartbeat=None,
                timeout=aiohttp.ClientWSTimeout(ws_close=5)) as ws:
            assert ws.protocol == "sip", ws.protocol
            yield ws

    async def _send(self, data: bytes) -> None:
        assert self._ws is not None
        await self._ws.send_str(data.decode())

    async def receive(self, timeout: float) -> sip_client.Response | sip_client.IncomingRequest:
        assert self._ws is not None
        message = await asyncio.wait_for(self._ws.receive(), timeout)
        if message.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"the edge closed the WebSocket: {message.type} {message.data!r}")
        return sip_client.parse_message(message.data.encode())

    async def _response(self, timeout: float) -> sip_client.Response:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            message = await self.receive(max(0.01, deadline - loop.time()))
            if isinstance(message, sip_client.Response) and message.code >= 200:
                return message

    async def register(self, timeout: float = 5.0) -> list[sip_client.Response]:
        """REGISTER, answering the digest challenge: every final answer, in order."""
        request = sip_client.register(self.user, self.domain, self.contact)
        answers: list[sip_client.Response] = []
        for _ in range(2):
            await self._send(request.encode("WSS", f"{self.instance}.invalid"))
            answers.append(await self._response(timeout))
            if answers[-1].code != 401:
                break
            request = sip_client.authorize(request, answers[-1], self.user, self.password)
        return answers

    async def _next_request(self, method: str, timeout: float) -> sip_client.IncomingRequest:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            message = await self.receive(max(0.01, deadline - loop.time()))
            if isinstance(message, sip_client.IncomingRequest) and message.method == method:
                return message

    async def answer_call(self, timeout: float) -> AnsweredCall:
        """Take the next INVITE: 180, aiortc's answer in a 200, then the ACK. Media starts flowing."""
        from aiortc import RTCPeerConnection, RTCSessionDescription

        invite = await self._next_request("INVITE", timeout)
        tag = secrets.token_hex(4)
        await self._send(sip_client.reply(invite, 180, "Ringing", to_tag=tag, contact=self.contact))
        media = Media()
        peer = RTCPeerConnection()
        self._peers.append(peer)
        peer.addTrack(_tone_track())

        async def listen(track: Any) -> None:
            from aiortc.mediastreams import MediaStreamError

            with contextlib.suppress(MediaStreamError):
                while True:
                    frame = await track.recv()
                    media.frames += 1
                    if _peak(frame) > _AMPLITUDE // 4:
                        media.loud_frames += 1
                        if media.loud_frames >= 10:
                            media.heard.set()

        @peer.on("track")  # type: ignore[misc]
        def on_track(track: Any) -> None:
            if track.kind == "audio":
                self._listeners.append(asyncio.create_task(listen(track)))

        await peer.setRemoteDescription(RTCSessionDescription(sdp=with_explicit_direction(invite.body), type="offer"))
        await peer.setLocalDescription(await peer.createAnswer())
        answer = with_one_fingerprint(peer.localDescription.sdp)
        await self._send(sip_client.reply(invite, 200, "OK", to_tag=tag, contact=self.contact, body=answer))
        await self._next_request("ACK", timeout)
        return AnsweredCall(invite, invite.body, answer, media, peer)

    async def answer_bye(self, timeout: float) -> sip_client.IncomingRequest:
        bye = await self._next_request("BYE", timeout)
        await self._send(sip_client.reply(bye, 200, "OK"))
        return bye
