"""The test phone's sans-I/O parts (tests/rtp.py, the SDP of tests/sip_phone.py): what it decides a party said,
without a socket or a switch. The real-switch doorphone test trusts these to tell the visitor from the owner."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import rtp
from tests.sip_phone import SdpError, answer_sdp, media_offer

# What FreeSWITCH 1.10 offers a device on the internal profile (speaker_codec_prefs OPUS,PCMA,PCMU).
OFFER = ("v=0\r\no=FreeSWITCH 1 2 IN IP4 127.0.0.1\r\ns=FreeSWITCH\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
         "m=audio 24566 RTP/AVP 0 102 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:102 opus/48000/2\r\n"
         "a=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\n")


def _frames(hz: float, count: int) -> list[bytes]:
    return list(itertools.islice(rtp.tone(hz), count))


def test_a_tone_is_recognised_and_not_taken_for_another() -> None:
    for frame in _frames(1000, 5):
        assert rtp.is_tone(frame, 1000)
        assert not rtp.is_tone(frame, 400)
    assert not rtp.is_tone(bytes([0xFF]) * rtp.FRAME_SAMPLES, 1000)  # silence
    mix = [rtp.ulaw_decode(a) + rtp.ulaw_decode(b) for a, b in zip(*_frames(1000, 1), *_frames(400, 1), strict=True)]
    assert not rtp.is_tone(bytes(rtp.ulaw_encode(s) for s in mix), 1000)  # both parties at once: not the door alone


def test_mu_law_round_trips_every_code_but_negative_zero() -> None:
    assert all(rtp.ulaw_encode(rtp.ulaw_decode(code)) == code for code in range(256) if code != 0x7F)


def test_a_packet_round_trips_and_header_extras_are_skipped() -> None:
    packet = rtp.RtpPacket(0, 65535, 2**32 - 1, 7, b"\x01\x02", marker=True)
    assert rtp.parse(packet.encode()) == packet
    header = bytearray(packet.encode()[:12])
    header[0] |= 0x10 | 0x20 | 1  # one CSRC, an extension, padding
    data = bytes(header) + b"CSRC" + b"\xbe\xde\x00\x01" + b"EXT!" + b"\x01\x02" + b"\x00\x02"
    assert rtp.parse(data).payload == b"\x01\x02"


@pytest.mark.parametrize("data", [b"", b"\x80" * 11, b"\x40" + b"\x00" * 11, b"\xa0\x00" + b"\x00" * 10,
                                  b"\x8f" + b"\x00" * 11])
def test_a_malformed_packet_is_a_clear_error(data: bytes) -> None:
    with pytest.raises(rtp.MalformedRtp):
        rtp.parse(data)


@given(st.binary(max_size=200))
def test_any_bytes_are_a_packet_or_malformed_rtp(data: bytes) -> None:
    try:
        packet = rtp.parse(data)
    except rtp.MalformedRtp:
        return
    assert len(packet.payload) <= len(data) - 12


@given(st.binary(max_size=8))
def test_any_event_payload_is_a_key_or_malformed_rtp(data: bytes) -> None:
    try:
        event = rtp.parse_event(data)
    except rtp.MalformedRtp:
        return
    assert event.key in rtp.KEYS


def test_a_key_press_is_one_key_however_many_packets_carry_it() -> None:
    five = rtp.key_packets("5", payload_type=101, sequence=10, timestamp=1000, ssrc=9)
    hash_ = rtp.key_packets("#", payload_type=101, sequence=30, timestamp=4000, ssrc=9)
    audio = rtp.RtpPacket(0, 50, 6000, 9, _frames(400, 1)[0])
    assert rtp.keys_in([rtp.parse(p.encode()) for p in [*five, *hash_, audio]], 101) == "5#"
    assert rtp.keys_in(five, 96) == ""  # not the agreed event type: no keys
    assert [p.marker for p in five] == [True] + [False] * (len(five) - 1)  # the start of the event only
    assert [rtp.parse_event(p.payload).end for p in five[-3:]] == [True] * 3


def test_the_offer_is_answered_with_pcmu_and_its_own_event_type() -> None:
    offer = media_offer(OFFER)
    assert (offer.host, offer.port, offer.payload_types, offer.event_type) == ("127.0.0.1", 24566,
                                                                               [0, 102, 8, 101], 101)
    answer = answer_sdp(offer, "127.0.0.1", 40000)
    assert "m=audio 40000 RTP/AVP 0 101\r\n" in answer
    assert "a=rtpmap:101 telephone-event/8000\r\n" in answer


def test_an_offer_without_pcmu_or_audio_is_refused() -> None:
    with pytest.raises(SdpError):
        answer_sdp(media_offer(OFFER.replace("RTP/AVP 0 102 8 101", "RTP/AVP 102 8 101")), "127.0.0.1", 1)
    with pytest.raises(SdpError):
        media_offer("v=0\r\nc=IN IP4 127.0.0.1\r\n")
