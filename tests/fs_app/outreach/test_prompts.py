"""Any user text renders to a prompt an AlertCall accepts (or to None, for the generic prompt)."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fs_app.outreach.calls import AlertCall
from fs_app.outreach.prompts import MAX_PROMPT_CHARS, speakable


def _call(prompt: str) -> AlertCall:
    return AlertCall(call_uuid=str(uuid.uuid4()), destination="+79001234567", caller_id_number="70000000000",
                     caller_id_name="IIM", ring_s=30, prompt="say:" + prompt, digits="12")


@pytest.mark.parametrize(("text", "spoken"), [
    ("Flat ${x} it's", "Flat x it's"),
    ("Дым: квартира 7, кухня", "Дым: квартира 7, кухня"),
    ("kitchen\r\nsmoke\x00now", "kitchen smoke now"),
    ("$${sound_prefix}/evil.wav", "sound prefix /evil.wav"),
    ("a|b&c{d}[e]<f>\\g", "a b c d e f g"),
])
def test_names_are_rendered_to_speakable_text(text: str, spoken: str) -> None:
    assert speakable(text) == spoken


@pytest.mark.parametrize("text", [None, "", "${}", "\x00\x01", "   ", "{}[]|"])
def test_nothing_speakable_gives_none_for_the_generic_prompt(text: str | None) -> None:
    assert speakable(text) is None


def test_long_text_is_cut_at_a_word() -> None:
    spoken = speakable("smoke " * 200)
    assert spoken is not None
    assert len(spoken) <= MAX_PROMPT_CHARS
    assert spoken.endswith("smoke")


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=600))
def test_any_text_renders_to_a_prompt_the_alert_call_accepts(text: str) -> None:
    spoken = speakable(text)
    if spoken is not None:
        _call(spoken)  # raises ValueError if the switch could be handed something unsafe
