"""GSM 03.38 / UCS-2 detection and concatenation: parts fit, characters are never cut, reassembly is exact."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iim.sms.segments import (
    GSM_MULTI,
    GSM_SINGLE,
    UCS2_MULTI,
    UCS2_SINGLE,
    Alphabet,
    decode_part,
    encode_sms,
    fits_gsm,
    gsm_septets,
    reassemble,
    segment_count,
)

GSM_BASIC = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCXYZÄÖÑÜ§¿abcxyzäöñüà"
GSM_EXT = "^{}\\[~]|€\f"
RUSSIAN = "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ .,!?"
EMOJI = "😀🔥🚒✅🏠"  # the last two are BMP, the others need surrogate pairs

gsm_text = st.text(alphabet=GSM_BASIC + GSM_EXT, min_size=1, max_size=700)
any_text = st.text(alphabet=GSM_BASIC + GSM_EXT + RUSSIAN + EMOJI, min_size=1, max_size=500)


def _round_trip(text: str, *, flash: bool = False) -> str:
    enc = encode_sms(text, flash=flash, reference=42)
    return reassemble([(enc.data_coding, part) for part in enc.parts], udhi=enc.udhi)


def _payloads(text: str) -> list[bytes]:
    enc = encode_sms(text, reference=9)
    return [p[6:] if enc.udhi else p for p in enc.parts]


def test_plain_latin_text_is_gsm_in_one_part() -> None:
    enc = encode_sms("Smoke alarm at Flat 12. Press 1 to acknowledge.")
    assert enc.alphabet is Alphabet.GSM7
    assert enc.data_coding == 0x00
    assert enc.esm_class == 0x00
    assert len(enc.parts) == 1


def test_one_cyrillic_letter_switches_the_whole_text_to_ucs2() -> None:
    enc = encode_sms("Alarm: дым")
    assert enc.alphabet is Alphabet.UCS2
    assert enc.data_coding == 0x08
    assert enc.parts[0] == "Alarm: дым".encode("utf-16-be")


def test_single_part_limits_are_160_septets_and_70_ucs2_characters() -> None:
    assert len(encode_sms("a" * GSM_SINGLE).parts) == 1
    assert len(encode_sms("a" * (GSM_SINGLE + 1)).parts) == 2
    assert len(encode_sms("я" * UCS2_SINGLE).parts) == 1
    assert len(encode_sms("я" * (UCS2_SINGLE + 1)).parts) == 2


def test_extension_characters_cost_two_septets() -> None:
    assert gsm_septets("€[]") == 6
    assert len(encode_sms("€" * 80).parts) == 1
    assert len(encode_sms("€" * 81).parts) == 2


def test_long_russian_text_takes_three_parts_with_a_shared_udh_reference() -> None:
    text = "Внимание! Сработал датчик дыма на кухне, квартира 12. " * 3 + "Позвоните 112."
    assert 2 * UCS2_MULTI < len(text) <= 3 * UCS2_MULTI
    enc = encode_sms(text, reference=200)
    assert enc.udhi
    assert enc.esm_class == 0x40
    assert len(enc.parts) == 3
    for seq, part in enumerate(enc.parts, start=1):
        assert part[:6] == bytes((5, 0x00, 3, 200, 3, seq))
        assert len(part) <= 6 + 2 * UCS2_MULTI
    assert _round_trip(text) == text


def test_flash_sets_message_class_zero_for_both_alphabets() -> None:
    assert encode_sms("Fire!", flash=True).data_coding == 0x10
    assert encode_sms("Пожар!", flash=True).data_coding == 0x18
    assert _round_trip("Пожар!", flash=True) == "Пожар!"


def test_reference_must_be_8_bit() -> None:
    with pytest.raises(ValueError):
        encode_sms("x", reference=256)


def test_decode_part_reads_the_concatenation_header() -> None:
    enc = encode_sms("z" * 200, reference=77)
    concat, text = decode_part(enc.parts[1], enc.data_coding, udhi=True)
    assert concat == (77, 2, 2)
    assert text == "z" * (200 - GSM_MULTI)


@settings(max_examples=300, deadline=None)
@given(gsm_text)
def test_gsm_text_reassembles_exactly_and_parts_fit(text: str) -> None:
    enc = encode_sms(text, reference=1)
    assert enc.alphabet is Alphabet.GSM7
    assert _round_trip(text) == text
    limit = GSM_SINGLE if len(enc.parts) == 1 else GSM_MULTI
    for payload in _payloads(text):
        assert len(payload) <= limit
        assert payload[-1:] != b"\x1b"  # an escape is never separated from its extension character


@settings(max_examples=300, deadline=None)
@given(any_text)
def test_any_text_reassembles_exactly_and_no_part_splits_a_surrogate_pair(text: str) -> None:
    enc = encode_sms(text, reference=3)
    assert _round_trip(text) == text
    assert enc.alphabet is (Alphabet.GSM7 if fits_gsm(text) else Alphabet.UCS2)
    if enc.alphabet is Alphabet.UCS2:
        limit = UCS2_SINGLE if len(enc.parts) == 1 else UCS2_MULTI
        for payload in _payloads(text):
            assert len(payload) <= 2 * limit
            payload.decode("utf-16-be")  # every part decodes on its own: no half surrogate pair
    assert segment_count(text) == len(enc.parts)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=3 * GSM_MULTI), st.sampled_from(list(GSM_EXT)))
def test_extension_character_at_every_boundary_stays_whole(prefix: int, ext: str) -> None:
    text = "a" * prefix + ext + "b" * 20
    assert _round_trip(text) == text
    for payload in _payloads(text):
        assert payload[-1:] != b"\x1b"


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=3 * UCS2_MULTI), st.sampled_from(["😀", "🔥", "🚒"]))
def test_emoji_at_every_boundary_stays_whole(prefix: int, emoji: str) -> None:
    text = "я" * prefix + emoji + "ю" * 10
    assert _round_trip(text) == text
    for payload in _payloads(text):
        payload.decode("utf-16-be")


def test_parts_use_the_space_they_have() -> None:
    """Greedy packing: every part but the last is full unless the next character would not fit."""
    text = "€" * 200  # 400 septets, two per character
    payloads = _payloads(text)
    assert [len(p) for p in payloads[:-1]] == [152] * (len(payloads) - 1)  # 153 would split a character
    assert sum(len(p) for p in payloads) == 400
