"""Atheris (libFuzzer) target for the sans-I/O SIA DC-09 codec and its extended data.

    .venv/bin/python fuzz/sia_codec_fuzz.py fuzz-corpus/sia -atheris_runs=200000 -max_len=1024

Input layout: the first byte picks the chunking (as fuzz/esl_codec_fuzz.py), the second whether the frame
around the rest is made valid (1: the rest is put, as extended data, into a well-framed plain frame with a good
CRC, data and timestamp, so the extended-data parser is reached on every run; otherwise the raw bytes are the
stream). A finding: any exception but :class:`FrameError` from the codec, any exception at all from
:func:`read_extended`, a kept value that breaks its promise (tests/iot_bridge/test_sia_xdata.py's oracle), or
a valid frame whose extended data costs it its alarm.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["iot_bridge.sia"]):
    from iot_bridge.sia import codec
    from iot_bridge.sia.xdata import read_extended

from tests.iot_bridge.test_sia_xdata import _holds_its_promises
from tests.sia_sender import wrap

_KEY = bytes(range(16))
_NOW = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)


def _framed(xdata: bytes) -> bytes:
    text = xdata.decode("latin-1").translate({0x0A: None, 0x0D: None})
    text = "".join(c if 0x20 <= ord(c) <= 0x7E else "?" for c in text)[:3000]
    return wrap(f'"SIA-DCS"0001L1#1234[#1234|NFA01]{text}]{codec.format_timestamp(_NOW)}')


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, valid, rest = data[0], data[1] == 1, data[2:]
    stream = _framed(rest) if valid else rest
    reader = codec.FrameReader()
    step = 1 + mode % 64 if mode else len(stream) or 1
    for start in range(0, len(stream), step):
        reader.receive_data(stream[start:start + step])
        while not isinstance(item := reader.next_frame(), codec.NeedData):
            if isinstance(item, codec.FrameError):
                assert not valid, item.reason
                continue
            for key in (None, _KEY):
                try:
                    content = codec.open_content(item, key)
                except codec.FrameError:
                    assert not (valid and key is None)
                    continue
                if valid:
                    assert (content.data, content.timestamp) == ("NFA01", _NOW)
                _holds_its_promises(read_extended(content.extended, content.malformed))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
