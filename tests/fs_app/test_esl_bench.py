"""Smoke test for benchmarks/esl_parse.py: the workload is what it claims (no peers, tiny)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import esl_parse


def test_benchmark_runs_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    result = esl_parse.main(["--no-peers", "--events", "400", "--repeats", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == result
    assert result["events_per_s"] > 0
    assert result["events_per_s_all_headers"] > 0
    assert 2300 <= result["event_bytes"] <= 2600  # ~2.5 KB frames
    assert len(result["workload"]["event_types"]) >= 10  # a realistic mix of CHANNEL_* events
    frames = esl_parse.build_frames()
    assert all(f.startswith(b"Content-Length: ") and b"\nUnique-ID: " in f for f in frames)
    assert max(len(f) for f in frames) <= 2600
