"""User text made safe to speak: whatever a household names its flat or a device, an alarm still goes out.

Names reach prompts ("Smoke in Flat 7, kitchen"). FreeSWITCH expands ``${...}`` in application arguments,
splits them on blanks and separators, and our own :class:`~fs_app.outreach.calls.AlertCall` refuses such
text, which once made a name like ``Flat ${x} it's`` stop the whole alarm. Rendering keeps what a voice can
say (letters and digits of any script, blanks, plain punctuation) and turns everything else into a blank.
"""

from __future__ import annotations

import unicodedata

__all__ = ["GENERIC_ALARM_PROMPT", "MAX_PROMPT_CHARS", "speakable"]

#: Longer text is cut (at a word when one ends near the limit): a prompt is a sentence, not a letter.
MAX_PROMPT_CHARS = 400

#: Said when an alarm's own prompt cannot be played: no name, no private detail, both languages.
GENERIC_ALARM_PROMPT = "Внимание, тревога в вашем доме. Alarm at your home."

_PUNCTUATION = frozenset(".,!?-:;()'\"%+/№«»\u2014\u2013")  # em and en dashes too


def speakable(text: str | None, *, limit: int = MAX_PROMPT_CHARS) -> str | None:
    """``text`` with only speakable characters, blanks collapsed, at most ``limit`` characters; ``None`` when
    nothing speakable is left (the caller then uses its generic prompt)."""
    if not text:
        return None
    kept = [ch if ch in _PUNCTUATION or unicodedata.category(ch)[0] in "LNM" else " "
            for ch in unicodedata.normalize("NFKC", text)]
    words = "".join(kept).split()
    rendered = " ".join(words)
    if len(rendered) > limit:
        cut = rendered[:limit]
        rendered = cut.rsplit(" ", 1)[0] if " " in cut[limit // 2:] else cut
    rendered = rendered.strip(" -")
    return rendered or None
