"""Bounded fuzzing of both ESL decoders (runs in CI; the long run is fuzz/esl_codec_fuzz.py).

Streams are built from recorded frames and mutated (bit flips, truncation, junk, odd
numbers in Content-Length and other header values, cut/duplicated ranges, CR/LF), then
fed whole and in random chunks. The oracle (tests/esl_fuzzing.py): messages or
RemoteProtocolError and nothing else, even when every part of every message is read;
the same output however the bytes are chunked; bounded work per byte.
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fs_app.esl import Execute, serialise
from tests.esl_fixtures import recorded_frames, split_frames, stream, streams
from tests.esl_fuzzing import SYNTHETIC_FRAMES, check, cut, decode_commands, decode_messages

pytestmark = pytest.mark.slow

# IIM_ESL_FUZZ_SCALE=N runs N times the examples (a longer local run; CI uses 1).
SCALE = max(1, int(os.environ.get("IIM_ESL_FUZZ_SCALE", "1")))
FUZZ = settings(max_examples=800 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))


@functools.cache
def _seeds() -> tuple[bytes, ...]:
    return tuple(recorded_frames()) + tuple(SYNTHETIC_FRAMES)


@functools.cache
def _command_seeds() -> tuple[bytes, ...]:
    seeds: dict[bytes, None] = {}
    for name, conn, direction in streams():
        if direction == "app>fs":
            seeds[stream(name, conn, direction)] = None
    seeds[serialise(Execute("playback", "x" * 1500 + "\n", event_uuid="e"))] = None
    seeds[b"sendevent X\r\nContent-Length: 3\r\n\r\nabc\n\r\nlinger 5\n\nexit\n\n"] = None
    return tuple(seeds)


_CL = re.compile(rb"Content-Length: [^\n]*")
_VALUE = re.compile(rb"(?:: |^[a-z_]+ )[^\n]*", re.MULTILINE)  # a header value or a command's argument
_NUMBERS = [
    b"0", b"1", b"-1", b"--5", b"+5", b" 7", b"1_0", b"\xd9\xa3", b"\xc2\xb2", b"%C2%B2", b"9" * 30,
    b"9" * 5000, b"99999999999", b"", b"x", b"1e3", b"0x10", b"\xff",
]  # fmt: skip
_JUNK = [b"\n", b"\n\n", b"\r\n\r\n", b"\n\r\n", b": ", b"%", b"%ZZ", b"%ED%A0%BD", b"\xff", b"\xc3"]


@st.composite
def _mutated(draw: st.DrawFn, seeds: Callable[[], tuple[bytes, ...]]) -> bytes:
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(seeds()), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(
            st.sampled_from(["flip", "truncate", "junk", "length", "value", "cut", "dup", "crlf", "byte"])
        )
        n = len(data)
        if op == "flip" and n:
            data[draw(st.integers(0, n - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate" and n:
            del data[draw(st.integers(0, n - 1)) :]
        elif op == "junk":
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.one_of(st.binary(max_size=40), st.sampled_from(_JUNK)))
        elif op in ("length", "value"):
            spans = [m.span() for m in (_CL if op == "length" else _VALUE).finditer(data)]
            if spans:
                a, b = draw(st.sampled_from(spans))
                number = st.integers(0, 10**7).map(lambda v: str(v).encode())
                value = draw(st.one_of(st.sampled_from(_NUMBERS), number, st.binary(max_size=12)))
                head = b"Content-Length: " if op == "length" else data[a : data.index(b" ", a) + 1]
                data[a:b] = head + value
        elif op == "cut" and n:
            i = draw(st.integers(0, n - 1))
            del data[i : i + draw(st.integers(1, 200))]
        elif op == "dup" and n:
            i = draw(st.integers(0, n - 1))
            data[i:i] = data[i : i + draw(st.integers(1, 300))]
        elif op == "crlf":
            data[:] = data.replace(b"\n", b"\r\n", draw(st.integers(1, 5)))
        elif op == "byte" and n:
            data[draw(st.integers(0, n - 1))] = draw(st.integers(0, 255))
    return bytes(data)


_SIZES = st.lists(st.one_of(st.integers(1, 16), st.integers(1, 5000)), min_size=1, max_size=10)


def _bounded(data: bytes, sizes: list[int]) -> None:
    start = time.thread_time()
    check(data, sizes)
    elapsed = time.thread_time() - start
    # Generous: linear work is a few us per byte here; a quadratic rescan would be far beyond.
    assert elapsed < 1.0 + 100e-6 * len(data), (len(data), elapsed)


@FUZZ
@given(_mutated(_seeds), _SIZES)
def test_fuzz_codec_mutated_streams(data: bytes, sizes: list[int]) -> None:
    _bounded(data, sizes)


@settings(FUZZ, max_examples=400 * SCALE)
@given(_mutated(_command_seeds), _SIZES)
def test_fuzz_command_decoder_mutated_streams(data: bytes, sizes: list[int]) -> None:
    _bounded(data, sizes)


@settings(FUZZ, max_examples=300 * SCALE)
@given(st.binary(max_size=600), _SIZES)
def test_fuzz_random_bytes(data: bytes, sizes: list[int]) -> None:
    _bounded(data, sizes)


# ---------------------------------------------------------------- regressions


@pytest.mark.parametrize(
    "data",
    [
        # int() of 5000 digits raised ValueError (CPython's 4300-digit limit), not RemoteProtocolError
        b"Content-Type: text/disconnect-notice\nContent-Length: " + b"9" * 5000 + b"\n\n",
        b"Content-Length: 5030\nContent-Type: text/event-plain\n\nEvent-Name: X\nContent-Length: "
        + b"9" * 5000
        + b"\n\nab",
        # int() of a Unicode digit or '--5'
        "Content-Type: log/data\nContent-Length: 0\nLog-Level: \u00b2\n\n".encode(),
        b"Content-Type: text/disconnect-notice\nLinger-Time: --5\n\n",
        b"linger --5\n\nsendmsg\ncall-command: execute\nloops: \xc2\xb2\n\n",
        b"sendevent X\nContent-Length: " + b"1" * 5000 + b"\n\n",
    ],
)
def test_regressions(data: bytes) -> None:
    check(data, [1])
    check(data, [7, 3])


# ---------------------------------------------------------------- linear time


def _codec(pieces: list[bytes]) -> Any:
    return decode_messages(pieces)


def _decoder(pieces: list[bytes]) -> Any:
    return decode_commands(pieces)


def _cost(data: bytes, run: Callable[[list[bytes]], Any]) -> float:
    pieces = cut(data, [1])
    best = float("inf")
    for _ in range(3):
        start = time.thread_time()
        run(pieces)
        best = min(best, time.thread_time() - start)
    return best


PATHOLOGICAL: dict[str, Callable[[int], bytes]] = {
    "open header block": lambda n: b"Content-Type: command/reply\n" + b"X: y\n" * (n // 5),
    "blank lines": lambda n: b"\n" * n,
    "carriage returns": lambda n: b"\n" + b"\r" * n,
    "pending body": lambda n: b"Content-Type: api/response\nContent-Length: 99999999\n\n" + b"a" * n,
    "event-plain prefixes": lambda n: (
        b"Content-Length: 5\nContent-Type: text/event-plain\n\nEvent" * (n // 55)
    ),
    "connect reply": lambda n: b"Event-Name: CHANNEL_DATA\n" + b"variable_x: %41%42\n" * (n // 19),
    "command lines": lambda n: b"api status\n\n" * (n // 12),
    "command body": lambda n: b"sendevent X\nContent-Length: 99999999\n\n" + b"a" * n,
}


@pytest.mark.parametrize("kind", list(PATHOLOGICAL))
@pytest.mark.parametrize("run", [_codec, _decoder], ids=["codec", "decoder"])
def test_byte_at_a_time_is_linear(kind: str, run: Callable[[list[bytes]], Any]) -> None:
    small = _cost(PATHOLOGICAL[kind](5_000), run)
    large = _cost(PATHOLOGICAL[kind](40_000), run)
    # 8x the bytes: linear is ~8x the time, quadratic ~64x.
    assert large < 20 * small + 0.05, (kind, small, large)


def test_recorded_frames_are_seeds() -> None:
    frames = recorded_frames()
    assert len(frames) > 300
    assert all(split_frames(f) == [f] for f in frames)
