"""The README opens with the two commands, and CI runs the test one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text(), re.DOTALL)


def test_readme_opens_with_a_run_command_and_a_test_command() -> None:
    run, test = _commands()[:2]
    assert run.endswith("iim serve")
    assert "pytest" in test


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test = _commands()[1]
    assert test in (ROOT / ".ci" / "run").read_text()
