"""IIM refuses to start without the Event Socket password or with FreeSWITCH's well-known default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iim.core.errors import ConfigError
from iim.settings import FreeSwitchNode


def test_an_unset_password_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IIM_FS_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="env:IIM_FS_PASSWORD is not set"):
        FreeSwitchNode(name="fs1").password()


@pytest.mark.parametrize("value", ["ClueCon", ""])
def test_the_default_or_an_empty_password_refuses_to_start(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("IIM_FS_PASSWORD", value)
    with pytest.raises(ConfigError, match="empty or FreeSWITCH's default") as err:
        FreeSwitchNode(name="fs1").password()
    assert "ClueCon" not in str(err.value)


def test_a_set_password_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IIM_FS_PASSWORD", "s3cret-from-the-vault")
    assert FreeSwitchNode().password() == "s3cret-from-the-vault"


def test_iim_serve_exits_2_naming_the_setting_before_starting_anything(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "IIM_FS_PASSWORD"} | {
        "IIM_FS_NODES": json.dumps([{"host": "127.0.0.1", "port": 8021, "name": "fs1"}]),
        "IIM_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "iim", "serve"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2
    assert "configuration refused: FreeSWITCH node fs1: env:IIM_FS_PASSWORD is not set" in done.stderr
