"""``benchmarks.realfs_calls``: how a run is summed up and judged fit, and a bounded run on the real switch.

The figures themselves are the benchmark's business (BENCHMARKS.md); these tests only pin that a run which
failed calls, or compared paths that placed different numbers of calls, says so and exits non-zero.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import realfs_calls
from benchmarks.realfs_calls import Phase, summarise
from tests.real_switch import require_freeswitch, require_sipp


def _round(iim_p99: float = 60.0, *, failed: int = 0, warmup_failed: int = 0, calls: int = 100) -> list[Phase]:
    return [Phase("static", 28.0, 32.0, 0, calls, 0.0, 14.0),
            Phase("reference", 48.0, 56.0, 0, calls, 0.8, 15.0),
            Phase("iim", 48.0, iim_p99, failed, calls, 1.1, 15.2, warmup_failed)]


def test_a_clean_run_reports_each_path_against_the_static_path_of_the_same_rounds() -> None:
    result = summarise(_round(60.0) + _round(70.0), 50.0, 10)
    assert "error" not in result
    assert result["calls"] == 200
    assert result["added_p99_ms"] == 33.0  # mean(60, 70) - mean(32, 32)
    assert result["added_p99_ms_rounds"] == [28.0, 38.0]
    assert result["ref_added_p99_ms"] == 24.0
    assert (result["app_cpu_ms_per_call"], result["ref_app_cpu_ms_per_call"]) == (1.1, 0.8)
    assert (result["fs_cpu_ms_per_call"], result["ref_fs_cpu_ms_per_call"]) == (15.2, 15.0)


@pytest.mark.parametrize("phases", [_round(failed=1) + _round(), _round() + _round(warmup_failed=2)],
                         ids=["measured", "warm-up"])
def test_a_run_where_a_path_failed_calls_is_marked_unfit(phases: list[Phase]) -> None:
    result = summarise(phases, 50.0, 10)
    assert "calls failed" in str(result["error"])


def test_paths_that_placed_different_numbers_of_calls_are_not_compared() -> None:
    phases = _round()
    phases[1] = Phase("reference", 48.0, 56.0, 0, 90, 0.8, 15.0)
    assert "different numbers of calls" in str(summarise(phases, 50.0, 10)["error"])


def test_a_path_that_never_ran_is_marked_unfit() -> None:
    assert "never ran" in str(summarise(_round()[:2], 50.0, 10)["error"])


@pytest.mark.real_switch
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_short_run_through_the_real_switch_places_every_call_on_every_path(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Smoke: SIPp -> the real switch -> static bridge, reference app and ``iim serve``; no timing asserted."""
    require_freeswitch()
    require_sipp()
    code = realfs_calls.main(["--rate", "5", "--calls", "10", "--rounds", "1", "--warmup", "2",
                              "--nice", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert code == 0, result
    assert "error" not in result
    assert (result["failed"], result["ref_failed"], result["static_failed"], result["calls"]) == (0, 0, 0, 10)
    phases = [json.loads(line) for line in lines[:-1]]
    assert sorted(p["path"] for p in phases) == ["iim", "reference", "static"]
    assert all(p["app_cpu_ms_per_call"] > 0 for p in phases if p["path"] != "static")
