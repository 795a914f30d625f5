"""The SIA DC-09 codec against frames from a panel written from the standard (tests/sia_sender.py): CRC, length,
header, encryption, timestamps, the replies, the event-code map; and fuzzed: any bytes give a frame or a
:class:`FrameError` (NAK or DUH), never another exception."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iot_bridge.event_types import EventType
from iot_bridge.sia import codec
from iot_bridge.sia.codes import read_reports
from tests.sia_sender import Panel, crc, wrap

FUZZ = settings(max_examples=300, deadline=None, derandomize=True)
NOW = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
KEY = bytes.fromhex("000102030405060708090A0B0C0D0E0F")


def _outcome(frame: codec.Frame, key: bytes | None) -> codec.Reply:
    """ACK when the content and its reports read; else the reply the error asks for."""
    try:
        read_reports(frame.message_id, codec.open_content(frame, key).data)
    except codec.FrameError as exc:
        return exc.reply
    return codec.Reply.ACK


def _one(raw: bytes) -> codec.Frame:
    reader = codec.FrameReader()
    reader.receive_data(raw)
    item = reader.next_frame()
    assert isinstance(item, codec.Frame), item
    return item


def test_crc_is_crc16_arc_as_the_standard_and_the_sender_compute_it() -> None:
    assert codec.crc16(b"123456789") == 0xBB3D == crc(b"123456789")


def test_plain_frame_is_read_with_its_route_and_content() -> None:
    panel = Panel("1234AB", line="2", receiver="3F")
    frame = _one(panel.frame("Nri1/FA01", at=NOW))
    assert (frame.message_id, frame.encrypted, frame.sequence, frame.receiver, frame.line, frame.account) == (
        codec.MessageId.SIA_DCS, False, "0001", "3F", "2", "1234AB")
    content = codec.open_content(frame, None)
    assert content.data == "Nri1/FA01"
    assert content.timestamp == NOW


def test_encrypted_frame_decrypts_with_the_accounts_key_for_each_key_size() -> None:
    for size in (16, 24, 32):
        key = bytes(range(size))
        frame = _one(Panel("777", key=key).frame("NFA01", at=NOW))
        assert frame.encrypted
        content = codec.open_content(frame, key)
        assert (content.data, content.timestamp) == ("NFA01", NOW)


def test_bad_crc_and_wrong_length_are_nak() -> None:
    panel = Panel("1234")
    with pytest.raises(codec.FrameError) as bad:
        codec.parse_datagram(panel.frame("NFA01", bad_crc=True))
    assert bad.value.reply is codec.Reply.NAK
    with pytest.raises(codec.FrameError) as short:
        codec.parse_datagram(wrap('"SIA-DCS"0001L1#1234[#1234|NFA01]', length=5))
    assert short.value.reply is codec.Reply.NAK


def test_unknown_message_id_and_unreadable_header_are_duh() -> None:
    for message in ('"FOO-BAR"0001L1#1234[]', '"SIA-DCS"01L1#1234[]', '"SIA-DCS"0001#1234[]'):
        with pytest.raises(codec.FrameError) as err:
            codec.parse_datagram(wrap(message))
        assert err.value.reply is codec.Reply.DUH, message


def test_encryption_must_match_the_account() -> None:
    plain = _one(Panel("1234").frame("NFA01"))
    with pytest.raises(codec.FrameError) as err:
        codec.open_content(plain, KEY)
    assert err.value.reply is codec.Reply.DUH
    encrypted = _one(Panel("1234", key=KEY).frame("NFA01"))
    with pytest.raises(codec.FrameError) as err:
        codec.open_content(encrypted, None)
    assert err.value.reply is codec.Reply.DUH
    with pytest.raises(codec.FrameError) as wrong:
        codec.open_content(encrypted, bytes(16))
    assert wrong.value.reply is codec.Reply.NAK


def test_data_naming_another_account_is_duh() -> None:
    frame = _one(wrap('"SIA-DCS"0001L1#1234[#9999|NFA01]'))
    with pytest.raises(codec.FrameError) as err:
        codec.open_content(frame, None)
    assert err.value.reply is codec.Reply.DUH


def test_timestamp_window_is_20_s_ahead_and_40_s_behind() -> None:
    assert codec.within_window(NOW + timedelta(seconds=20), NOW)
    assert not codec.within_window(NOW + timedelta(seconds=21), NOW)
    assert codec.within_window(NOW - timedelta(seconds=40), NOW)
    assert not codec.within_window(NOW - timedelta(seconds=41), NOW)
    assert codec.within_window(None, NOW)


def test_an_encrypted_frame_without_a_timestamp_is_nak() -> None:
    text = "NFA01]"
    hexed = codec.encrypt(text, KEY)
    frame = _one(wrap(f'"*SIA-DCS"0001L1#1234[{hexed}'))
    with pytest.raises(codec.FrameError) as err:
        codec.open_content(frame, KEY)
    assert err.value.reply is codec.Reply.NAK


def test_replies_are_read_by_the_panel() -> None:
    panel = Panel("1234", key=KEY)
    frame = _one(panel.frame("NFA01", sequence=42))
    ack = panel.read(codec.ack(frame, KEY, NOW))
    assert (ack.kind, ack.sequence, ack.account, ack.timestamp) == ("*ACK", "0042", "1234", NOW)
    plain = Panel("1234")
    plain_ack = plain.read(codec.ack(_one(plain.frame("NFA01", sequence=7)), None, NOW))
    assert (plain_ack.kind, plain_ack.sequence, plain_ack.account) == ("ACK", "0007", "1234")
    nak = plain.read(codec.nak(NOW))
    assert (nak.kind, nak.sequence, nak.timestamp) == ("NAK", "0000", NOW)
    duh = plain.read(codec.duh(_one(plain.frame("NFA01", sequence=9))))
    assert (duh.kind, duh.sequence) == ("DUH", "0009")
    assert plain.read(codec.duh(None)).kind == "DUH"


def test_stream_skips_noise_and_reads_back_to_back_frames() -> None:
    panel = Panel("1234")
    reader = codec.FrameReader()
    reader.receive_data(b"garbage" + panel.frame("NFA01") + b"\r\r" + panel.frame("NBA02"))
    first, second = reader.next_frame(), reader.next_frame()
    assert isinstance(first, codec.Frame)
    assert isinstance(second, codec.Frame)
    assert (first.sequence, second.sequence) == ("0001", "0002")
    assert reader.next_frame() is codec.NEED_DATA


def test_an_overlong_frame_is_nak_and_the_next_frame_is_still_read() -> None:
    reader = codec.FrameReader(max_frame=64)
    reader.receive_data(b"\n" + b"A" * 100)
    assert isinstance(err := reader.next_frame(), codec.FrameError)
    assert err.reply is codec.Reply.NAK
    reader.receive_data(Panel("1234").frame("NFA01"))
    while isinstance(item := reader.next_frame(), codec.FrameError):
        pass
    assert isinstance(item, codec.Frame)


@pytest.mark.parametrize(("message_id", "data", "expected"), [
    ("SIA-DCS", "Nri1/FA01", [("FA", EventType.SMOKE)]),
    ("SIA-DCS", "NFR01", [("FR", EventType.CLEARED)]),
    ("SIA-DCS", "NGA05", [("GA", EventType.CO)]),
    ("SIA-DCS", "NMA", [("MA", EventType.PANIC)]),
    ("SIA-DCS", "Nri2/PA003/BA004", [("PA", EventType.PANIC), ("BA", EventType.INTRUSION)]),
    ("SIA-DCS", "Nti10:00/OP001", [("OP", None)]),
    ("ADM-CID", "1110 01 015", [("CID:1110", EventType.SMOKE)]),
    ("ADM-CID", "3110 01 015", [("CID:3110", EventType.CLEARED)]),
    ("ADM-CID", "1162 01 003", [("CID:1162", EventType.CO)]),
    ("ADM-CID", "1101 00 001", [("CID:1101", EventType.PANIC)]),
    ("ADM-CID", "1401 01 005", [("CID:1401", None)]),
])
def test_event_codes_map_to_the_device_event_model(message_id: str, data: str,
                                                   expected: list[tuple[str, EventType | None]]) -> None:
    reports = read_reports(codec.MessageId(message_id), data)
    assert [(r.code, r.event_type) for r in reports] == expected


@pytest.mark.parametrize(("message_id", "data"), [("SIA-DCS", "XFA01"), ("SIA-DCS", "N"), ("SIA-DCS", "Nfa01"),
                                                  ("ADM-CID", "1110 1 015"), ("ADM-CID", "9110 01 015")])
def test_data_that_is_not_sia_or_contact_id_is_duh(message_id: str, data: str) -> None:
    with pytest.raises(codec.FrameError) as err:
        read_reports(codec.MessageId(message_id), data)
    assert err.value.reply is codec.Reply.DUH


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(1, 64), max_size=12))
def test_any_bytes_in_any_chunks_give_frames_or_frame_errors(data: bytes, cuts: list[int]) -> None:
    reader = codec.FrameReader(max_frame=256)
    chunks, rest = [], data
    for cut in cuts:
        chunks.append(rest[:cut])
        rest = rest[cut:]
    chunks.append(rest)
    for chunk in chunks:
        reader.receive_data(chunk)
        while not isinstance(item := reader.next_frame(), codec.NeedData):
            assert isinstance(item, codec.Frame | codec.FrameError)
            if isinstance(item, codec.Frame):
                for key in (None, KEY):
                    assert _outcome(item, key) in (codec.Reply.ACK, codec.Reply.NAK, codec.Reply.DUH)


@FUZZ
@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200))
def test_any_well_framed_text_gives_a_frame_or_a_frame_error(text: str) -> None:
    try:
        frame = codec.parse_datagram(wrap(text))
    except codec.FrameError as exc:
        reply = exc.reply
    else:
        reply = _outcome(frame, KEY if frame.encrypted else None)
    assert reply in (codec.Reply.ACK, codec.Reply.NAK, codec.Reply.DUH)


@FUZZ
@given(st.from_regex(r"N(ri[0-9]{1,3}/)?[A-Z]{2}[0-9]{0,4}", fullmatch=True), st.integers(1, 9999),
       st.sampled_from([None, KEY]), st.integers(0, 7))
def test_a_frame_split_anywhere_reads_as_sent(data: str, sequence: int, key: bytes | None, split: int) -> None:
    raw = Panel("ABC123", key=key).frame(data, sequence=sequence, at=NOW)
    reader = codec.FrameReader()
    cut = len(raw) * split // 8
    reader.receive_data(raw[:cut])
    assert reader.next_frame() is codec.NEED_DATA or cut == len(raw)
    reader.receive_data(raw[cut:])
    frame = reader.next_frame()
    assert isinstance(frame, codec.Frame)
    assert frame.sequence == f"{sequence:04d}"
    assert codec.open_content(frame, key).data == data


@FUZZ
@given(st.binary(min_size=1, max_size=96))
def test_any_encrypted_part_gives_content_or_a_frame_error(plain: bytes) -> None:
    """Whatever a key decrypts to (garbage, a missing pad bar, brackets in the pad) is NAK or DUH."""
    padded = plain + bytes(-len(plain) % 16)
    encryptor = codec._cipher(KEY).encryptor()
    hexed = (encryptor.update(padded) + encryptor.finalize()).hex()
    frame = codec.parse_datagram(wrap(f'"*ADM-CID"0001L1#1234[{hexed}'))
    assert _outcome(frame, KEY) in (codec.Reply.ACK, codec.Reply.NAK, codec.Reply.DUH)
