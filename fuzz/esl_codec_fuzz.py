"""Atheris (libFuzzer) target for the sans-I/O ESL decoders.

    .venv/bin/python fuzz/make_corpus.py                  # seeds from the recordings
    .venv/bin/python fuzz/esl_codec_fuzz.py fuzz-corpus/esl -atheris_runs=500000 \
        -max_len=4096 -timeout=10 -rss_limit_mb=4096      # one per core, same corpus dir

``-max_len=16384`` keeps whole recorded CHANNEL_* frames (4-12 KB) intact but runs about
a third as fast. First campaign (2026-11-25): 2 x 500,000 inputs at 4096 plus 193,881 at
16384: no crash, hang or chunking divergence.

Input layout: the first byte picks the chunking (0 = whole; otherwise the rest is fed in
pieces of 1..N bytes, sizes derived from that byte), the rest is the byte stream. Each
input goes through both decoders (FS->app EslCodec, app->FS CommandDecoder), whole and
chunked, with every part of every message read. Any exception other than
RemoteProtocolError, or output that depends on the chunking, is a finding
(tests/esl_fuzzing.py has the oracle); libFuzzer's -timeout catches hangs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["fs_app.esl"]):
    import fs_app.esl  # noqa: F401 - instrumented for coverage feedback

from tests.esl_fuzzing import check


def chunk_sizes(mode: int) -> list[int]:
    if mode == 0:
        return []
    if mode == 1:
        return [1]
    return [1 + (mode * k) % (mode + 7) for k in range(1, 6)]  # a few mixed sizes


def test_one_input(data: bytes) -> None:
    if not data:
        return
    check(data[1:], chunk_sizes(data[0]))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
