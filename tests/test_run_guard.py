"""A killed test run leaves nothing running: ``tests/run_guard.py`` stops its PostgreSQL and peers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that does not reap is as good as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="the run guard reads /proc (Linux)")
@pytest.mark.timeout(180)
def test_a_sigkilled_run_leaves_no_postgresql_or_peer_running(tmp_path: Path) -> None:
    probe = tmp_path / "held.json"
    env = {**os.environ, "IIM_RUN_GUARD_PROBE": str(probe)}
    env.pop("IIM_TEST_DATABASE_URL", None)  # the victim must start an embedded server of its own
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/run_guard_probe.py"],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not probe.exists():
            assert run.poll() is None, "the victim run ended before holding its PostgreSQL"
            assert time.monotonic() < deadline, "the victim run did not start its PostgreSQL in time"
            time.sleep(0.1)
        held = json.loads(probe.read_text())
        postmaster, peer, data_dir = held["postmaster"], held["peer"], Path(held["data_dir"])
        assert _alive(postmaster)
        assert _alive(peer)
        assert data_dir.is_dir()

        run.kill()  # SIGKILL: no teardown, no atexit, no finally in the victim
        run.wait()
        deadline = time.monotonic() + 10
        while (_alive(postmaster) or _alive(peer) or data_dir.exists()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(postmaster), "the killed run's PostgreSQL is still running"
        assert not _alive(peer), "the killed run's SMSC simulator is still running"
        assert not data_dir.exists(), "the killed run's PostgreSQL data directory was left behind"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
