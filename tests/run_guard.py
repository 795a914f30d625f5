"""A watchdog for one test run: when pytest is gone (finished, crashed or SIGKILLed), it stops what the run
started and left running - the embedded PostgreSQL above all, and subprocess peers (SMSC simulator,
``iim serve``, emulators).

Why a separate process: a SIGKILLed pytest runs no fixture teardown, no ``atexit`` and no ``finally``, and
``pg_ctl`` detaches the server from it, so nothing inside the run can clean up after it.

How it finds the leftovers: :func:`start` puts ``IIM_TEST_RUN=<token>`` into the run's environment, which
every process the run starts inherits (``pg_ctl`` and ``postgres`` included), so the guard reads
``/proc/<pid>/environ`` and needs no pid files that could go stale. The run holds the write end of a pipe;
its end of file wakes the guard (no polling, no pid reuse). A postmaster first gets SIGQUIT, the signal of
``pg_ctl stop -m immediate`` (it takes its backends and shared memory down); what is still left then gets
SIGKILL. Directories the run registers through the pipe (the server's data directory) are removed last.

Linux only (``/proc``); elsewhere :func:`start` does nothing. This file runs as a script: stdlib only.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

MARKER = "IIM_TEST_RUN"
_PROC = Path("/proc")
_POSTMASTER_GRACE_S = 5.0


class _State:
    writer: int | None = None
    guard: subprocess.Popen[bytes] | None = None


def start() -> None:
    """Start the guard of this pytest process (once); children started from now on carry the marker."""
    if _State.writer is not None or not (_PROC / "self" / "environ").exists():
        return
    os.environ[MARKER] = secrets.token_hex(8)
    read_fd, write_fd = os.pipe()
    try:
        # Its own session: a signal to the run's process group (Ctrl-C, a CI job's kill) must not take the
        # guard down before it has cleaned up.
        _State.guard = subprocess.Popen(
            [sys.executable, __file__, str(read_fd)], pass_fds=(read_fd,), start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finally:
        os.close(read_fd)
    _State.writer = write_fd


def remove_on_exit(path: Path) -> None:
    """Have the guard delete ``path`` once the run is gone (a no-op without a guard)."""
    if _State.writer is not None:
        os.write(_State.writer, b"rmtree " + os.fsencode(path) + b"\n")


def marked_processes(token: str) -> dict[int, list[str]]:
    """pid -> argv of every live process started with ``IIM_TEST_RUN=token`` (this one excepted)."""
    needle = f"{MARKER}={token}".encode()
    found: dict[int, list[str]] = {}
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (_PROC / entry.name / "environ").read_bytes()  # empty for zombies
            argv = (_PROC / entry.name / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if needle in environ.split(b"\0"):
            found[int(entry.name)] = [os.fsdecode(a) for a in argv.split(b"\0") if a]
    return found


def _is_postmaster(argv: list[str]) -> bool:
    # Backends rewrite their argv ("postgres: checkpointer"); the postmaster keeps ".../postgres -D dir ...".
    return bool(argv) and Path(argv[0]).name == "postgres" and "-D" in argv


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_leftovers(token: str) -> None:
    """SIGQUIT the run's postmasters, give them a moment, then SIGKILL whatever of the run is still alive."""
    postmasters = [pid for pid, argv in marked_processes(token).items() if _is_postmaster(argv)]
    for pid in postmasters:
        _signal(pid, signal.SIGQUIT)
    deadline = time.monotonic() + _POSTMASTER_GRACE_S
    while time.monotonic() < deadline and set(postmasters) & set(marked_processes(token)):
        time.sleep(0.05)
    for _ in range(5):  # a dying parent may still start a child: look again
        left = marked_processes(token)
        if not left:
            return
        for pid in left:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.1)


def _guard(read_fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the run, which then cleans up itself
    token = os.environ[MARKER]
    directories: list[str] = []
    pending = b""
    while chunk := os.read(read_fd, 4096):  # end of file: the run has exited or was killed
        pending += chunk
        *lines, pending = pending.split(b"\n")
        directories += [os.fsdecode(line[7:]) for line in lines if line.startswith(b"rmtree ")]
    stop_leftovers(token)
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    _guard(int(sys.argv[1]))
