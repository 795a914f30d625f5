"""The sans-I/O MQTT 3.1.1 client: its bytes, its events, and a fuzz of everything a broker might send."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iot_bridge.mqtt.protocol import (
    NEED_DATA,
    ConnAck,
    Event,
    LocalProtocolError,
    MqttClient,
    NeedData,
    PingResp,
    PubAck,
    Publish,
    RemoteProtocolError,
    State,
    SubAck,
)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True)
CONNACK_OK = b"\x20\x02\x00\x00"


def connected(**kwargs: int) -> MqttClient:
    client = MqttClient(**kwargs)
    client.connect("iim", keepalive_s=30, clean_session=False)
    client.receive_data(CONNACK_OK)
    assert client.next_event() == ConnAck(False, 0)
    return client


def events(client: MqttClient) -> list[Event]:
    found: list[Event] = []
    while not isinstance(event := client.next_event(), NeedData):
        found.append(event)
    return found


def test_connect_is_mqtt_311_without_clean_session_for_a_persistent_session() -> None:
    packet = MqttClient().connect("iim", keepalive_s=30, clean_session=False)
    assert packet == b"\x10\x0f\x00\x04MQTT\x04\x00\x00\x1e\x00\x03iim"


def test_connack_refusal_closes_the_conversation() -> None:
    client = MqttClient()
    client.connect("iim", keepalive_s=30, clean_session=True)
    client.receive_data(b"\x20\x02\x00\x05")
    assert client.next_event() == ConnAck(False, 5)
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.subscribe([("iim/+/+/events", 1)])


def test_first_packet_must_be_connack() -> None:
    client = MqttClient()
    client.connect("iim", keepalive_s=30, clean_session=True)
    client.receive_data(b"\xd0\x00")
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_subscribe_and_its_suback_share_the_packet_id() -> None:
    client = connected()
    packet_id, packet = client.subscribe([("iim/+/+/events", 1)])
    assert packet == b"\x82\x13" + packet_id.to_bytes(2, "big") + b"\x00\x0eiim/+/+/events\x01"
    client.receive_data(b"\x90\x03" + packet_id.to_bytes(2, "big") + b"\x01")
    assert client.next_event() == SubAck(packet_id, (1,))


def test_publish_arrives_whole_from_bytes_fed_one_at_a_time() -> None:
    sender, receiver = connected(), connected()
    packet_id, packet = sender.publish("iim/t/h/ack", b'{"code":202}', qos=1)
    for byte in packet:
        assert receiver.next_event() is NEED_DATA
        receiver.receive_data(bytes([byte]))
    assert receiver.next_event() == Publish("iim/t/h/ack", b'{"code":202}', 1, packet_id)


def test_puback_is_sent_only_when_asked_for() -> None:
    """Receiving a QoS 1 PUBLISH produces no bytes: the driver decides when to acknowledge it."""
    client = connected()
    client.receive_data(b"\x32\x0a\x00\x04a/b/\x00\x07hi")
    assert events(client) == [Publish("a/b/", b"hi", 1, 7)]
    assert client.puback(7) == b"\x40\x02\x00\x07"


def test_puback_frees_our_packet_id_and_an_unknown_one_is_a_protocol_error() -> None:
    client = connected()
    packet_id, _ = client.publish("iim/t/h/cmd", b"x", qos=1)
    assert client.in_flight == 1
    client.receive_data(b"\x40\x02" + packet_id.to_bytes(2, "big"))
    assert client.next_event() == PubAck(packet_id)
    assert client.in_flight == 0
    client.receive_data(b"\x40\x02" + packet_id.to_bytes(2, "big"))
    with pytest.raises(RemoteProtocolError):
        client.next_event()


@pytest.mark.parametrize(("raw", "why"), [
    (b"\x34\x05\x00\x01a\x00\x01", "QoS 2"),
    (b"\x36\x05\x00\x01a\x00\x01", "QoS 3"),
    (b"\x38\x03\x00\x01a", "DUP at QoS 0"),
    (b"\x30\x03\x00\x01+", "wildcard in a topic name"),
    (b"\x32\x05\x00\x01a\x00\x00", "packet id 0"),
    (b"\x30\x03\x00\x05a", "topic longer than the packet"),
    (b"\x30\x03\x00\x01\xff", "topic not UTF-8"),
    (b"\x30\xff\xff\xff\xff\x01", "five-byte length"),
    (b"\xc0\x00", "PINGREQ from a broker"),
    (b"\x20\x02\x00\x00", "a second CONNACK"),
    (b"\xd1\x00", "reserved flags"),
    (b"\x90\x03\x00\x01\x05", "SUBACK code 5"),
])
def test_malformed_packets_are_remote_protocol_errors(raw: bytes, why: str) -> None:
    client = connected()
    client.receive_data(raw)
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    assert client.state is State.CLOSED, why


def test_a_packet_over_the_limit_is_refused_from_its_length() -> None:
    client = connected(max_packet=1024)
    client.receive_data(b"\x30\x81\x08")  # 1025 bytes announced; none of them sent
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_pingresp() -> None:
    client = connected()
    assert client.pingreq() == b"\xc0\x00"
    client.receive_data(b"\xd0\x00")
    assert client.next_event() == PingResp()


def test_commands_before_the_connection_is_accepted_are_local_errors() -> None:
    client = MqttClient()
    for command in (lambda: client.publish("a", b""), lambda: client.puback(1), client.pingreq):
        with pytest.raises(LocalProtocolError):
            command()
    client = connected()
    with pytest.raises(LocalProtocolError):
        client.publish("a/+", b"")


@FUZZ
@given(st.binary(max_size=512), st.lists(st.integers(1, 64), max_size=16))
def test_any_bytes_give_events_or_a_remote_protocol_error(data: bytes, cuts: list[int]) -> None:
    client = connected(max_packet=256)
    chunks, rest = [], data
    for cut in cuts:
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    try:
        for chunk in chunks:
            client.receive_data(chunk)
            events(client)
    except RemoteProtocolError:
        assert client.state is State.CLOSED


@FUZZ
@given(st.text(st.characters(blacklist_characters="+#\x00", blacklist_categories=("Cs",)), min_size=1,
               max_size=100), st.binary(max_size=2000), st.sampled_from([0, 1]))
def test_publish_round_trips(topic: str, payload: bytes, qos: int) -> None:
    sender, receiver = connected(), connected()
    packet_id, packet = sender.publish(topic, payload, qos=qos)
    receiver.receive_data(packet)
    assert events(receiver) == [Publish(topic, payload, qos, packet_id)]
