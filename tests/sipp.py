"""SIPp as a real SIP peer for the real-switch tier: the caller and the IMS core of ``sip-tests/scenarios``.

Each run is one ``sipp`` process on free loopback ports (signalling and media). The caller scenario logs one
``FINAL <code> <call-id>`` line per call (``-trace_logs``); :func:`call` returns those codes, so a test
asserts the SIP outcome the caller saw, not SIPp's pass/fail (a 486 can be the expected outcome).
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.real_switch import free_media_port, free_port, require_sipp

SCENARIOS = Path(__file__).resolve().parents[1] / "sip-tests" / "scenarios"
_FINAL = re.compile(r"FINAL (\d{3}) (\S+)")


@dataclass(frozen=True)
class CallResult:
    finals: list[int]
    returncode: int
    output: str


def _keys(keys: Mapping[str, str]) -> list[str]:
    argv: list[str] = []
    for name, value in keys.items():
        argv += ["-key", name, value]
    return argv


def call(workdir: Path, target_port: int, number: str, *, caller: str = "79160000000", extra: str = "X-Test: 1",
         hold_ms: int = 300, calls: int = 1, rate: float = 1.0, timeout_s: int = 60,
         scenario: str = "caller.xml", source: str = "127.0.0.1", domain: str | None = None,
         auth: tuple[str, str] | None = None, rtp_echo: bool = False) -> CallResult:
    """Place ``calls`` calls to ``number`` on 127.0.0.1:``target_port`` from ``source``; the caller's final codes.

    ``caller_auth.xml`` takes ``domain`` (the From domain, the digest realm) and ``auth`` (user, password).
    ``rtp_echo``: the caller sends back every RTP packet it gets (the callee hears itself)."""
    sipp = require_sipp()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"caller-{free_port()}.log"
    keys = {"caller": caller, "extra": extra} | ({"domain": domain} if domain else {})
    credentials = ["-au", auth[0], "-ap", auth[1]] if auth else []
    argv = [sipp, "-sf", str(SCENARIOS / scenario), "-i", source, "-p", str(free_port()),
            "-mi", source, "-mp", str(free_media_port()), "-s", number, "-m", str(calls), "-r", str(rate),
            "-timeout", f"{timeout_s}s", "-timeout_error", "-trace_logs", "-log_file", str(log), "-nostdin",
            "-d", str(hold_ms), *_keys(keys), *credentials, *(["-rtp_echo"] if rtp_echo else []),
            f"127.0.0.1:{target_port}"]
    done = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=timeout_s + 15, check=False)
    text = log.read_text(errors="replace") if log.exists() else ""
    return CallResult([int(code) for code, _ in _FINAL.findall(text)], done.returncode,
                      done.stdout[-3000:] + done.stderr[-3000:])


def _wait_bound(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Until SIPp holds its UDP port: a call placed before would meet ICMP unreachable (a 503 at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sipp exited with {process.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return
        time.sleep(0.02)
    raise RuntimeError(f"sipp did not listen on {port} within {timeout} s")


@contextlib.contextmanager
def core(workdir: Path, port: int, scenario: str = "core_answer.xml", *, answer_ms: int = 200) -> Iterator[int]:
    """The IMS core (where the switch's ``ims`` gateway points) as a SIPp callee on ``port``; yields it."""
    sipp = require_sipp()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [sipp, "-sf", str(SCENARIOS / scenario), "-i", "127.0.0.1", "-p", str(port), "-mi", "127.0.0.1",
            "-mp", str(free_media_port()), "-aa", "-nostdin", "-trace_err", "-error_file", str(workdir / "core-errors.log"),
            "-d", str(answer_ms)]
    with (workdir / f"core-{port}.out").open("wb") as out:
        process = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        _wait_bound(port, process)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
