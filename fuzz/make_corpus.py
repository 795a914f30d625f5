"""Build the atheris seed corpus for fuzz/esl_codec_fuzz.py from the recorded sessions.

Usage: ``python fuzz/make_corpus.py [OUT_DIR]`` (default ``fuzz-corpus/esl``, gitignored).

Each seed is one chunking byte (see esl_codec_fuzz.py) followed by a stream: every distinct
recorded frame, pairs of consecutive frames, the synthetic frames, and every recorded
app->FS command. Seeds are capped at MAX_SEED bytes so that libFuzzer's default-sized
inputs stay fast; the biggest connect replies (~11 KB) still fit.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.esl_fixtures import all_fs_streams, chunks, split_frames, streams
from tests.esl_fuzzing import SYNTHETIC_FRAMES

MAX_SEED = 16 * 1024


def seeds() -> list[bytes]:
    out: dict[bytes, None] = {}
    for data in all_fs_streams():
        frames = split_frames(data)
        for i, frame in enumerate(frames):
            out[frame] = None
            if i + 1 < len(frames):
                out[frame + frames[i + 1]] = None
    for frame in SYNTHETIC_FRAMES:
        out[frame] = None
    for name, conn, direction in streams():
        if direction == "app>fs":
            for write in chunks(name, conn, direction):
                out[write] = None
    return [s for s in out if len(s) < MAX_SEED]


def main(argv: list[str]) -> int:
    target = Path(argv[0]) if argv else ROOT / "fuzz-corpus" / "esl"
    target.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, seed in enumerate(seeds()):
        for mode in (0, 1 + i % 254):  # whole, and one chunking
            data = bytes([mode]) + seed
            (target / hashlib.sha1(data, usedforsecurity=False).hexdigest()).write_bytes(data)
            written += 1
    print(f"{written} seeds in {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
