"""Sans-I/O MQTT 3.1.1 client: bytes in, events out; commands in, bytes out (OASIS MQTT 3.1.1).

Why our own: an event may be acknowledged to the broker (PUBACK) only once it is committed in PostgreSQL, so a
crash before the commit makes the broker deliver it again. The asyncio clients on PyPI acknowledge on receipt
(aiomqtt) or tie the acknowledgement to a thread loop (paho); here :meth:`MqttClient.puback` is a plain call the
driver makes when it decides. Only what IIM uses: CONNECT/CONNACK, SUBSCRIBE/SUBACK, PUBLISH at QoS 0 and 1
both ways, PUBACK, PINGREQ/PINGRESP, DISCONNECT. IIM subscribes at QoS 1 at most, so a QoS 2 PUBLISH from the
broker is a protocol error, like every other packet a broker may not send a client.

Every malformed input is a :class:`RemoteProtocolError` (the broker misbehaved: drop the connection); misuse of
the API is a :class:`LocalProtocolError`. Nothing else is raised by :meth:`MqttClient.next_event`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "NEED_DATA", "ConnAck", "Event", "LocalProtocolError", "MqttClient", "MqttProtocolError", "NeedData", "PingResp",
    "PubAck", "Publish", "RemoteProtocolError", "State", "SubAck",
]

_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 1, 2, 3, 4
_SUBSCRIBE, _SUBACK = 8, 9
_PINGREQ, _PINGRESP, _DISCONNECT = 12, 13, 14
_MAX_REMAINING: Final = 268_435_455  # four bytes of variable length: the protocol's own limit


class MqttProtocolError(Exception):
    """Abstract: the conversation cannot go on."""


class RemoteProtocolError(MqttProtocolError):
    """The broker sent something MQTT 3.1.1 does not allow a server to send (or more than we accept)."""


class LocalProtocolError(MqttProtocolError):
    """This side misused the API (a command in the wrong state, a topic that cannot be encoded)."""


class State(enum.Enum):
    """Where the conversation is: CONNECT sent and CONNACK awaited, connected, or over."""

    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"


class NeedData:
    """Sentinel: feed more bytes."""


NEED_DATA: Final = NeedData()


@dataclass(frozen=True, slots=True)
class ConnAck:
    session_present: bool
    return_code: int  # 0 accepted; 1..5 refused (version, identifier, unavailable, credentials, not authorised)


@dataclass(frozen=True, slots=True)
class SubAck:
    packet_id: int
    granted: tuple[int, ...]  # per filter: the QoS granted, or 0x80 refused


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    packet_id: int | None
    dup: bool = False
    retain: bool = False


@dataclass(frozen=True, slots=True)
class PubAck:
    packet_id: int


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


Event = ConnAck | SubAck | Publish | PubAck | PingResp


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    if len(body) > _MAX_REMAINING:
        raise LocalProtocolError("packet too large")
    return bytes([first]) + _varint(len(body)) + body


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise LocalProtocolError("string longer than 65535 bytes")
    return len(data).to_bytes(2, "big") + data


def _check_topic(topic: str, *, wildcards: bool) -> None:
    if not topic or "\x00" in topic:
        raise LocalProtocolError("a topic must be non-empty and must not contain U+0000")
    if not wildcards and ("+" in topic or "#" in topic):
        raise LocalProtocolError("a topic name must not contain wildcards")


class MqttClient:
    """One client connection's protocol state. ``max_packet``: the largest packet accepted from the broker (a
    bigger one is refused as soon as its length is read, before it is buffered)."""

    def __init__(self, *, max_packet: int = 1 << 20) -> None:
        self.state = State.IDLE
        self.max_packet = max_packet
        self._buffer = bytearray()
        self._next_id = 1
        self._pending_publish: set[int] = set()
        self._pending_subscribe: set[int] = set()

    # ------------------------------------------------------------------ commands -> bytes
    def connect(self, client_id: str, *, keepalive_s: int, clean_session: bool) -> bytes:
        """CONNECT (no will, no user name or password: the broker knows us by our certificate)."""
        if self.state is not State.IDLE:
            raise LocalProtocolError(f"connect in state {self.state.value}")
        if not 0 <= keepalive_s <= 0xFFFF:
            raise LocalProtocolError("keepalive must be 0..65535 s")
        flags = 0x02 if clean_session else 0x00
        body = _string("MQTT") + bytes([4, flags]) + keepalive_s.to_bytes(2, "big") + _string(client_id)
        self.state = State.CONNECTING
        return _packet(_CONNECT << 4, body)

    def subscribe(self, filters: list[tuple[str, int]]) -> tuple[int, bytes]:
        """SUBSCRIBE: (packet id, bytes); its :class:`SubAck` carries the same id."""
        self._require_connected("subscribe")
        if not filters:
            raise LocalProtocolError("subscribe needs at least one filter")
        body = bytearray()
        for topic_filter, qos in filters:
            _check_topic(topic_filter, wildcards=True)
            if qos not in (0, 1):
                raise LocalProtocolError("only QoS 0 and 1 are supported")
            body += _string(topic_filter) + bytes([qos])
        packet_id = self._allocate(self._pending_subscribe)
        return packet_id, _packet((_SUBSCRIBE << 4) | 0x02, packet_id.to_bytes(2, "big") + bytes(body))

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> tuple[int | None, bytes]:
        """PUBLISH: (packet id or None at QoS 0, bytes); at QoS 1 its :class:`PubAck` carries the id."""
        self._require_connected("publish")
        _check_topic(topic, wildcards=False)
        if qos not in (0, 1):
            raise LocalProtocolError("only QoS 0 and 1 are supported")
        packet_id = self._allocate(self._pending_publish) if qos else None
        head = _string(topic) + (packet_id.to_bytes(2, "big") if packet_id else b"")
        return packet_id, _packet((_PUBLISH << 4) | (qos << 1) | int(retain), head + payload)

    def puback(self, packet_id: int) -> bytes:
        """PUBACK for a received QoS 1 PUBLISH: the broker forgets the message (send it only when it is safe)."""
        self._require_connected("puback")
        if not 0 < packet_id <= 0xFFFF:
            raise LocalProtocolError("packet id must be 1..65535")
        return _packet(_PUBACK << 4, packet_id.to_bytes(2, "big"))

    def pingreq(self) -> bytes:
        self._require_connected("pingreq")
        return _packet(_PINGREQ << 4, b"")

    def disconnect(self) -> bytes:
        """DISCONNECT: a clean end (the broker discards our will; it keeps a persistent session)."""
        self.state = State.CLOSED
        return _packet(_DISCONNECT << 4, b"")

    @property
    def in_flight(self) -> int:
        """Our QoS 1 publishes not yet acknowledged by the broker."""
        return len(self._pending_publish)

    # ------------------------------------------------------------------ bytes -> events
    def receive_data(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        self._buffer += data

    def next_event(self) -> Event | NeedData:
        """The next complete packet as an event, or :data:`NEED_DATA`.

        Raises:
            RemoteProtocolError: the bytes are not a packet a broker may send now; the connection must close.
        """
        if self.state in (State.IDLE, State.CLOSED):
            return NEED_DATA
        parsed = self._frame()
        if parsed is None:
            return NEED_DATA
        first, body = parsed
        try:
            return self._decode(first >> 4, first & 0x0F, body)
        except RemoteProtocolError:
            self.state = State.CLOSED
            raise

    def _frame(self) -> tuple[int, bytes] | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        length, multiplier, index = 0, 1, 1
        while True:
            if index >= len(buf):
                return None
            byte = buf[index]
            length += (byte & 0x7F) * multiplier
            index += 1
            if not byte & 0x80:
                break
            multiplier *= 128
            if index > 4:
                self.state = State.CLOSED
                raise RemoteProtocolError("remaining length longer than four bytes")
        if length > self.max_packet:
            self.state = State.CLOSED
            raise RemoteProtocolError(f"packet of {length} bytes is over the {self.max_packet}-byte limit")
        if len(buf) < index + length:
            return None
        first, body = buf[0], bytes(buf[index:index + length])
        del buf[:index + length]
        return first, body

    def _decode(self, kind: int, flags: int, body: bytes) -> Event:
        if self.state is State.CONNECTING and kind != _CONNACK:
            raise RemoteProtocolError("the first packet from the broker must be CONNACK")
        if kind == _PUBLISH:
            return self._decode_publish(flags, body)
        if flags:
            raise RemoteProtocolError(f"packet type {kind} with reserved flags {flags:#x}")
        if kind == _CONNACK:
            if self.state is not State.CONNECTING:
                raise RemoteProtocolError("CONNACK after the connection was accepted")
            if len(body) != 2 or body[0] & 0xFE or body[1] > 5:
                raise RemoteProtocolError("malformed CONNACK")
            if body[1] == 0:
                self.state = State.CONNECTED
            else:
                self.state = State.CLOSED
                if body[0]:
                    raise RemoteProtocolError("a refused CONNACK with session present")
            return ConnAck(bool(body[0]), body[1])
        if kind == _PUBACK:
            packet_id = self._packet_id(body, exact=True)
            self._release(self._pending_publish, packet_id, "PUBACK")
            return PubAck(packet_id)
        if kind == _SUBACK:
            packet_id = self._packet_id(body, exact=False)
            codes = tuple(body[2:])
            if not codes or any(code not in (0, 1, 2, 0x80) for code in codes):
                raise RemoteProtocolError("malformed SUBACK return codes")
            self._release(self._pending_subscribe, packet_id, "SUBACK")
            return SubAck(packet_id, codes)
        if kind == _PINGRESP:
            if body:
                raise RemoteProtocolError("PINGRESP with a body")
            return PingResp()
        raise RemoteProtocolError(f"packet type {kind} is not one a broker sends to a client")

    def _decode_publish(self, flags: int, body: bytes) -> Publish:
        dup, qos, retain = bool(flags & 0x08), (flags >> 1) & 0x03, bool(flags & 0x01)
        if qos == 3:
            raise RemoteProtocolError("PUBLISH with QoS 3")
        if qos == 2:
            raise RemoteProtocolError("PUBLISH with QoS 2 (we subscribe at QoS 1 at most)")
        if dup and qos == 0:
            raise RemoteProtocolError("PUBLISH with DUP at QoS 0")
        if len(body) < 2:
            raise RemoteProtocolError("PUBLISH without a topic")
        size = int.from_bytes(body[:2], "big")
        if len(body) < 2 + size:
            raise RemoteProtocolError("PUBLISH topic longer than the packet")
        try:
            topic = body[2:2 + size].decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError("PUBLISH topic is not UTF-8") from None
        if not topic or "\x00" in topic or "+" in topic or "#" in topic:
            raise RemoteProtocolError("PUBLISH topic is empty or holds U+0000 or a wildcard")
        rest = body[2 + size:]
        packet_id = None
        if qos:
            if len(rest) < 2:
                raise RemoteProtocolError("QoS 1 PUBLISH without a packet id")
            packet_id = int.from_bytes(rest[:2], "big")
            if packet_id == 0:
                raise RemoteProtocolError("packet id 0")
            rest = rest[2:]
        return Publish(topic, rest, qos, packet_id, dup, retain)

    @staticmethod
    def _packet_id(body: bytes, *, exact: bool) -> int:
        if len(body) < 2 or (exact and len(body) != 2):
            raise RemoteProtocolError("malformed packet id")
        packet_id = int.from_bytes(body[:2], "big")
        if packet_id == 0:
            raise RemoteProtocolError("packet id 0")
        return packet_id

    @staticmethod
    def _release(pending: set[int], packet_id: int, what: str) -> None:
        if packet_id not in pending:
            raise RemoteProtocolError(f"{what} for packet id {packet_id}, which is not in flight")
        pending.discard(packet_id)

    def _allocate(self, pending: set[int]) -> int:
        in_use = self._pending_publish | self._pending_subscribe
        if len(in_use) >= 0xFFFF:
            raise LocalProtocolError("no free packet id: 65535 packets in flight")
        while self._next_id in in_use:
            self._next_id = self._next_id % 0xFFFF + 1
        packet_id = self._next_id
        self._next_id = self._next_id % 0xFFFF + 1
        pending.add(packet_id)
        return packet_id

    def _require_connected(self, what: str) -> None:
        if self.state is not State.CONNECTED:
            raise LocalProtocolError(f"{what} in state {self.state.value}")
