"""The real-switch tier: one FreeSWITCH per module with the project's configuration on free ports, the IMS
core played by SIPp on a port reserved for the module, and ``iim serve`` as a real process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pg import TEST_MASTER_KEY_ENV, PgDatabase
from tests.real_switch import RealSwitch, free_port, require_freeswitch, running_switch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.real_switch)


@dataclass(frozen=True)
class Ports:
    core: int
    iim_primary: int
    iim_secondary: int


@pytest.fixture(scope="module")
def ports() -> Ports:
    return Ports(core=free_port(), iim_primary=free_port(), iim_secondary=free_port())


@pytest.fixture(scope="module")
def real_switch(tmp_path_factory: pytest.TempPathFactory, ports: Ports) -> Iterator[RealSwitch]:
    require_freeswitch()
    with running_switch(tmp_path_factory.mktemp("freeswitch"),
                        IIM_FS_IMS_PROXY=f"127.0.0.1:{ports.core}",
                        IIM_FS_SOCKET_PRIMARY=f"127.0.0.1:{ports.iim_primary}",
                        IIM_FS_SOCKET_SECONDARY=f"127.0.0.1:{ports.iim_secondary}") as switch:
        yield switch


@dataclass
class Iim:
    process: subprocess.Popen[bytes]
    log: Path
    http_port: int = 0
    #: IIM's speech cache (rendered prompts); private to IIM when started with ``own_filesystem``
    tts_cache: Path | None = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def can_hide_directories() -> bool:
    """Can this machine start a process in a mount namespace of its own (root, or unprivileged namespaces)?"""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True,
                           check=False) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


def start_iim(switch: RealSwitch, db: PgDatabase, esl_port: int, workdir: Path, *,
              env: Mapping[str, str] | None = None, own_filesystem: bool = False,
              audio_over_http: bool = False) -> Iim:
    """``iim serve`` against the real switch: its outbound server where the dialplan's socket points, its
    inbound client on the switch's Event Socket, the module's database with the demo tenant; ``env`` adds or
    overrides settings.

    ``own_filesystem``: IIM's speech cache is a tmpfs in a mount namespace of IIM's own, which the switch
    cannot see (as if IIM ran on another host); it needs :func:`can_hide_directories`. ``audio_over_http``:
    ``IIM_SWITCH_AUDIO_BASE_URL`` is IIM's HTTP site (the switch fetches every prompt from it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"iim-{esl_port}.log"
    # The log is appended to: an IIM restarted on the same port must announce itself again.
    served_before = log.read_text(errors="replace").count("IIM serving") if log.exists() else 0
    http_port = free_port()
    data_dir = workdir / "unused-pg"
    env = os.environ | {
        "IIM_DATABASE_URL": db.admin_url, "IIM_FS_PASSWORD": switch.password,
        "IIM_FS_NODES": f'[{{"host": "127.0.0.1", "port": {switch.esl_port}}}]',
        "IIM_ESL_PORT": str(esl_port), "IIM_HTTP_PORT": str(http_port), "IIM_BRIDGE_ENABLED": "false",
        "IIM_ALERT_SOCKET_ADDRESS": f"127.0.0.1:{esl_port}", "IIM_DATA_DIR": str(data_dir),
        "IIM_LOG_LEVEL": "INFO", "IIM_DRAIN_TIMEOUT": "1", **TEST_MASTER_KEY_ENV,
        **({"IIM_SWITCH_AUDIO_BASE_URL": f"http://127.0.0.1:{http_port}"} if audio_over_http else {}),
    } | dict(env or {})
    tts_cache = data_dir.parent / "tts-cache"  # where the service keeps it (next to its data dir)
    argv = [sys.executable, "-m", "iim", "serve"]
    if own_filesystem:
        tts_cache.mkdir(parents=True, exist_ok=True)
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount -t tmpfs -o size=64m iim-tts "$0" && exec "$@"', str(tts_cache), *argv]
    with log.open("ab") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    iim = Iim(process, log, http_port, tts_cache)
    deadline = time.monotonic() + 60
    while iim.log_text().count("IIM serving") <= served_before:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"iim serve did not start:\n{iim.log_text()[-4000:]}")
        time.sleep(0.1)
    return iim


def stop_iim(iim: Iim) -> None:
    iim.process.terminate()
    try:
        iim.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        iim.process.kill()
        iim.process.wait(timeout=5)


@pytest.fixture(scope="module")
def households(pg_db: PgDatabase) -> None:
    """Registry rows a module needs before IIM loads its cache (a module overrides this fixture)."""


@pytest.fixture(scope="module")
def iim(real_switch: RealSwitch, pg_db: PgDatabase, ports: Ports, households: None,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Iim]:
    served = start_iim(real_switch, pg_db, ports.iim_primary, tmp_path_factory.mktemp("iim"))
    yield served
    stop_iim(served)
