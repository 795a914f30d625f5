"""SIA DC-09 extended data: the codec reads the blocks of frames from a panel written from the standard
(tests/sia_sender.py) and never refuses a frame for one; :mod:`iot_bridge.sia.xdata` keeps what validates
(location in range, https verification URL, time of occurrence, MAC, alarm text) and drops the rest with a
reason. Fuzzed: any blocks give an :class:`Extended` whose kept values hold their promises, never an exception."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iot_bridge.sia import codec
from iot_bridge.sia.xdata import MAX_TEXT, MAX_URL, Extended, read_extended
from tests.sia_sender import Panel, wrap

FUZZ = settings(max_examples=400, deadline=None, derandomize=True)
NOW = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
KEY = bytes(range(32))
URL = "https://cam.example.net/v/" + "a" * 180  # longer than the codec's old 128-character block


def _content(raw: bytes, key: bytes | None = None) -> codec.Content:
    return codec.open_content(codec.parse_datagram(raw), key)


@pytest.mark.parametrize("key", [None, KEY])
def test_blocks_between_the_data_and_the_timestamp_are_read_plain_and_encrypted(key: bytes | None) -> None:
    blocks = ["XE37.6176", "YN55.7558", f"V{URL}", "H_11:59:50,12-06-2026", "MA0:B1:C2:D3:E4:F5", "IKitchen smoke"]
    content = _content(Panel("1234", key=key).frame("NFA01", at=NOW, extended=blocks), key)
    assert (content.data, content.extended, content.timestamp, content.malformed) == ("NFA01", tuple(blocks), NOW, 0)


@pytest.mark.parametrize("junk", ["[" + "I" * 300 + "]", "[]", "[[X1]", "loose text]", "[Xbad\x01]"])
def test_a_block_that_cannot_be_read_is_skipped_and_counted_never_nak(junk: str) -> None:
    body = f'"SIA-DCS"0001L1#1234[#1234|NFA01][YN55.7558]{junk}[XE37.6176]{codec.format_timestamp(NOW)}'
    content = _content(wrap(body))
    assert content.data == "NFA01"
    assert content.timestamp == NOW
    assert content.extended[0] == "YN55.7558"
    assert content.extended[-1] == "XE37.6176"
    assert content.malformed == 1


def test_a_timestamp_that_does_not_read_is_still_nak_with_extended_data() -> None:
    with pytest.raises(codec.FrameError) as err:
        _content(wrap('"SIA-DCS"0001L1#1234[#1234|NFA01][XE37.6]_99:99'))
    assert err.value.reply is codec.Reply.NAK


def test_everything_kept_reads_as_the_event_wants_it() -> None:
    kept = read_extended(["XE37.6176", "YN55.7558", f"V{URL}", "H_11:59:50,12-06-2026", "Ma0b1c2d3e4f5",
                          "I  Smoke   in kitchen ", "KDEADBEEF", "P123", "LHall"])
    assert kept == Extended(latitude=55.7558, longitude=37.6176, verification_url=URL,
                            occurred_at=datetime(2026, 12, 6, 11, 59, 50, tzinfo=UTC), mac="A0B1C2D3E4F5",
                            text="Smoke in kitchen", dropped=())
    assert kept.payload() == {"location": {"lat": 55.7558, "lon": 37.6176}, "verification_url": URL,
                              "panel_mac": "A0B1C2D3E4F5", "alarm_text": "Smoke in kitchen"}


@pytest.mark.parametrize(("x", "y", "expected"), [
    ("-73.9857", "40.7484", (40.7484, -73.9857)), ("73.9857W", "40.7484N", (40.7484, -73.9857)),
    ("W 73.9857", "S 33.8688", (-33.8688, -73.9857)), ("180", "-90", (-90.0, 180.0)), ("0", "0", (0.0, 0.0)),
])
def test_coordinates_read_with_a_sign_or_a_hemisphere(x: str, y: str, expected: tuple[float, float]) -> None:
    kept = read_extended([f"X{x}", f"Y{y}"])
    assert ((kept.latitude, kept.longitude), kept.dropped) == (expected, ())


@pytest.mark.parametrize(("blocks", "dropped"), [
    (["XE181", "YN10"], {("X", "location-out-of-range"), ("Y", "location-incomplete")}),
    (["XE10", "YN90.5"], {("Y", "location-out-of-range"), ("X", "location-incomplete")}),
    (["XN10", "YE10"], {("X", "location-unreadable"), ("Y", "location-unreadable")}),
    (["X-E10", "Y10"], {("X", "location-unreadable"), ("Y", "location-incomplete")}),
    (["Xnan", "Yinf"], {("X", "location-unreadable"), ("Y", "location-unreadable")}),
    (["X10"], {("X", "location-incomplete")}),
    (["X10", "Y10", "X11"], {("X", "repeated")}),
])
def test_coordinates_out_of_range_unreadable_or_alone_are_dropped(blocks: list[str],
                                                                  dropped: set[tuple[str, str]]) -> None:
    kept = read_extended(blocks)
    assert set(kept.dropped) == dropped
    if ("X", "repeated") not in dropped:
        assert (kept.latitude, kept.longitude) == (None, None)
        assert "location" not in kept.payload()


@pytest.mark.parametrize(("url", "reason"), [
    ("http://cam.example.net/v/1", "verification-not-https"),
    ("javascript:alert(1)", "verification-not-https"),
    ("https://user:pw@cam.example.net/v", "verification-not-https"),
    ("https://10.0.0.1/v", "verification-not-https"),
    ("https:///nohost", "verification-not-https"),
    ("https://cam.example.net/a b", "verification-not-https"),
    ("https://cam.example.net:99999/v", "verification-not-https"),
    ("tel:+79990001122", "verification-not-https"),
    ("https://cam.example.net/" + "v" * MAX_URL, "verification-too-long"),
])
def test_a_verification_that_is_not_a_short_https_link_is_dropped(url: str, reason: str) -> None:
    kept = read_extended([f"V{url}"])
    assert (kept.verification_url, kept.dropped) == (None, (("V", reason),))


@pytest.mark.parametrize(("block", "reason"), [("H12:00", "time-unreadable"), ("H_25:00:00,12-06-2026",
                                                                                 "time-unreadable"),
                                               ("MZZ:ZZ", "mac-unreadable"), ("I   ", "text-empty")])
def test_other_blocks_that_do_not_read_are_dropped(block: str, reason: str) -> None:
    assert read_extended([block]).dropped == ((block[0], reason),)


def test_malformed_pieces_from_the_codec_are_reported_as_dropped() -> None:
    assert read_extended([], 2).dropped == (("?", "malformed"), ("?", "malformed"))


# -- fuzz --------------------------------------------------------------------------------------------------

_PRINTABLE_BUT_BRACKETS = st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters="[]")
_BLOCK = st.one_of(
    st.tuples(st.sampled_from("XYVHMIKPZ"), st.text(_PRINTABLE_BUT_BRACKETS, max_size=300)).map("".join),
    st.from_regex(r"[XY][NSEW ]{0,2}[+-]?[0-9]{1,4}(\.[0-9]{0,12})?[NSEW]?", fullmatch=True),
    st.from_regex(r"Vhttps?://[a-z0-9.@:-]{0,30}(/[ -~]{0,40})?", fullmatch=True).filter(
        lambda b: "[" not in b and "]" not in b),
)


def _holds_its_promises(kept: Extended) -> None:
    assert (kept.latitude is None) == (kept.longitude is None)
    if kept.latitude is not None and kept.longitude is not None:
        assert -90 <= kept.latitude <= 90
        assert -180 <= kept.longitude <= 180
    if kept.verification_url is not None:
        parts = urlsplit(kept.verification_url)
        assert parts.scheme == "https"
        assert parts.hostname
        assert "@" not in parts.netloc
        assert len(kept.verification_url) <= MAX_URL
    if kept.text is not None:
        assert 0 < len(kept.text) <= MAX_TEXT
    if kept.mac is not None:
        assert len(kept.mac) == 12
    for block, reason in kept.dropped:
        assert block in "XYVHMI?"
        assert reason


@FUZZ
@given(st.lists(_BLOCK, max_size=8), st.integers(0, 3))
def test_any_blocks_give_kept_values_that_hold_their_promises(blocks: list[str], malformed: int) -> None:
    _holds_its_promises(read_extended(blocks, malformed))


@FUZZ
@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=400), st.sampled_from([None, KEY]))
def test_any_text_between_the_data_and_the_timestamp_never_costs_the_alarm(xdata: str, key: bytes | None) -> None:
    """Whatever a panel puts in the extended data (brackets, junk, overlong blocks), a frame whose data and
    timestamp are good opens: the alarm is taken, the junk skipped."""
    panel = Panel("1234", key=key)
    raw = panel.frame("NFA01", at=NOW, extended=[xdata] if xdata else ())
    content = _content(raw, key)
    assert (content.data, content.timestamp) == ("NFA01", NOW)
    _holds_its_promises(read_extended(content.extended, content.malformed))
