"""``iim keys``: rotation from the command line against a real (embedded) PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _iim(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "IIM_DATA_DIR": str(tmp_path / "pg"), **env}
    full.pop("IIM_DATABASE_URL", None)
    return subprocess.run([sys.executable, "-m", "iim", "keys", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=120, check=False)


def test_keys_rotate_then_rewrap_under_a_new_master_then_status(tmp_path: Path) -> None:
    rotated = _iim(tmp_path, "rotate", "--all-tenants", "--actor", "cli:test")
    assert rotated.returncode == 0, rotated.stderr
    [line] = [json.loads(x) for x in rotated.stdout.splitlines()]  # the demo tenant
    assert (line["key_id"], line["unreadable"]) == (1, 0)
    tenant = line["tenant_id"]
    generated = tmp_path / "master.key"  # no IIM_MASTER_KEY_REF: generated beside the data directory
    assert generated.exists()

    new_master = "ab" * 32
    env = {"IIM_TEST_NEW_MASTER": new_master, "IIM_MASTER_KEY_REF": "env:IIM_TEST_NEW_MASTER"}
    before = _iim(tmp_path, "status", **env)  # the old master is not given: nothing unwraps...
    assert before.returncode == 0  # ...and status needs not: it lists fingerprints only
    assert json.loads(before.stdout.splitlines()[0])["keys"][0]["current_master"] is False
    rewrapped = _iim(tmp_path, "rotate", "--master", **env,
                     IIM_MASTER_KEY_PREVIOUS_REFS=json.dumps([f"file:{generated}"]))
    assert rewrapped.returncode == 0, rewrapped.stderr
    assert json.loads(rewrapped.stdout.splitlines()[0]) == {"tenant_id": tenant, "rewrapped": 1, "unchanged": 0}
    status = _iim(tmp_path, "status", "--tenant", tenant, **env)
    assert status.returncode == 0, status.stderr
    [key] = json.loads(status.stdout)["keys"]
    assert (key["key_id"], key["current_master"]) == (1, True)
    again = _iim(tmp_path, "rotate", "--tenant", tenant, **env)  # the new master alone now reads every key
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["key_id"] == 2


def test_keys_rotate_without_a_target_is_refused(tmp_path: Path) -> None:
    result = _iim(tmp_path, "rotate")
    assert result.returncode == 2
    assert "say what to rotate" in result.stderr


def test_keys_rotate_with_a_malformed_old_link_token_key_is_refused_before_touching_the_database(
        tmp_path: Path) -> None:
    result = _iim(tmp_path, "rotate", "--all-tenants", IIM_TEST_OLD_LINK_KEY="not-a-key",
                  IIM_LINK_TOKEN_KEY_REF="env:IIM_TEST_OLD_LINK_KEY")
    assert result.returncode == 2
    assert "IIM_LINK_TOKEN_KEY_REF" in result.stderr
    assert not (tmp_path / "pg").exists()
