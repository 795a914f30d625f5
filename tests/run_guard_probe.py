"""The victim of ``tests/test_run_guard.py``: a pytest run of its own that starts the embedded PostgreSQL and
the SMSC simulator, says where they are, and waits to be SIGKILLed. Not collected by the suite (the file
name does not start with ``test_``) and skipped unless the outer test names the probe file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from iim.sms.smsc_sim import SmscProcess
from tests.pg import PgCluster

PROBE = os.environ.get("IIM_RUN_GUARD_PROBE")


@pytest.mark.skipif(PROBE is None, reason="run by tests/test_run_guard.py only")
def test_holds_postgresql_and_a_peer_until_killed(pg_cluster: PgCluster, tmp_path: Path) -> None:
    assert PROBE is not None
    assert pg_cluster.embedded is not None
    smsc = SmscProcess(tmp_path / "smsc.log")
    smsc.start_sync()
    assert smsc.proc is not None
    held = {"postmaster": pg_cluster.embedded.server.get_pid(), "data_dir": str(pg_cluster.embedded.data_dir),
            "peer": smsc.proc.pid}
    partial = Path(PROBE + ".tmp")
    partial.write_text(json.dumps(held))
    partial.replace(PROBE)
    time.sleep(100)  # SIGKILLed long before this ends
