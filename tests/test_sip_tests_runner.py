"""``sip-tests/run``: what it offers and how it reports, without a switch (the suites themselves run in
``tests/real_switch_tier/test_sip_suites.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.sip_suites import SUITES, Check, Outcome, main, select, table

RUN = Path(__file__).resolve().parents[1] / "sip-tests" / "run"


def test_the_runner_lists_every_suite_of_the_table() -> None:
    done = subprocess.run([sys.executable, str(RUN), "--list"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == [suite.name for suite in SUITES]


def test_the_suites_cover_every_ring_mode_outcome_failover_and_load() -> None:
    names = {suite.name for suite in SUITES}
    for needed in ("simultaneous_speaker_answers", "simultaneous_mobile_confirms", "phone_then_home_speaker_answers",
                   "home_then_phone_mobile_answers", "speakers_only_speaker_answers", "mobile_only_answers",
                   "mobile_only_busy", "no_answer_voicemail", "no_answer_record_message",
                   "no_answer_missed_call_sms", "caller_cancel", "unknown_callee",
                   "iim_down_secondary_then_safe_bridge", "load"):
        assert needed in names


def test_an_unknown_suite_name_is_refused_with_exit_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--suite", "caller_cancel,no_such_suite"]) == 2
    assert "no_such_suite" in capsys.readouterr().err


def test_suites_are_selected_by_name_in_the_tables_order() -> None:
    assert [s.name for s in select(["load", "caller_cancel"])] == ["caller_cancel", "load"]
    assert select(None) == SUITES


def test_a_suite_with_one_failed_check_fails_and_the_table_says_which_side() -> None:
    good = Outcome("good", [Check("SIP", "200", True), Check("rows", "audit", True)])
    bad = Outcome("bad", [Check("SIP", "200", True), Check("rows", "audit", False, "none")])
    crashed = Outcome("crashed", [], error="Traceback ...")
    assert (good.passed, bad.passed, crashed.passed) == (True, False, False)
    lines = {line.split()[0]: line.split()[1:] for line in table([good, bad, crashed]).splitlines()[2:]}
    assert lines == {"good": ["ok", "ok", "pass", "0.0"], "bad": ["ok", "FAIL", "FAIL", "0.0"],
                     "crashed": ["-", "-", "FAIL", "0.0"]}
