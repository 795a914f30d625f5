"""Calls through a real FreeSWITCH 1.10.12 into ``iim serve``, beside a static bridge and a minimal app.

    python -m benchmarks.realfs_calls [--rate 50] [--calls 1500] [--rounds 2] [--warmup 100]

One switch runs the repository's ``freeswitch-conf/`` and ``dialplan/`` (``benchmarks._realfs``) with the
session limits raised for load (``IIM_FS_MAX_SESSIONS``, ``IIM_FS_SESSIONS_PER_SECOND``). SIPp plays the
caller (``sip-tests/scenarios/caller.xml``, 300 ms of talk) and the IMS core (built-in ``uas``, answers at
once). Three ways to route the same calls, measured on the same switch in the same run, in rounds whose
order alternates (static, reference, IIM, then the reverse) so drift hits all three alike:

- **static**: a benchmark-only dialplan extension bridges ``static<number>`` to the core itself (no Event
  Socket): the switch's own floor;
- **reference**: the subscriber dialplan hands the call to ``benchmarks._thin_outbound_app`` (stdlib, one
  bridge to the dial string IIM builds for the same callee) on IIM's socket address;
- **IIM**: the same dialplan hands it to ``iim serve`` (embedded PostgreSQL, demo data; numbers without a
  policy, so IIM looks the callee up in its cache, decides and bridges through the core).

Every call of a phase dials a number of its own (``79101000000`` + n, no policy in the demo data): the
dialplan's per-subscriber flood cap (``limit ... iim_max_calls_per_subscriber``) would otherwise answer
486 to most calls of every socket path and none of the static one. Each phase is preceded by ``--warmup``
calls on the same path, not measured (a fresh ``iim serve`` imports and warms up on its first calls), and
every path places the same number of calls.

Setup latency is SIPp's INVITE -> 200 OK per call. "added" is a path's percentile minus the static
path's in the same round. CPU per call is from ``/proc/<pid>/stat`` (user + system) over the phase: the
switch's, and the app's (for IIM including its PostgreSQL: the postmaster and every backend). The last line
is one JSON object; rounds are averaged and each round's added p99 is listed. The run and everything it
starts run at ``--nice`` (-10 by default, when permitted): FreeSWITCH itself runs realtime, and a shared
machine's other work would otherwise set the socket paths' tail. A run where any path failed
a call (warm-up included) or lost a setup time says so in ``"error"`` and exits 1: its figures compare
unlike things.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks._bench_db import machine
from benchmarks._realfs import ROOT, RealSwitch, free_media_port, free_port, freeswitch_home

SCENARIO = ROOT / "sip-tests" / "scenarios" / "caller.xml"
FIRST_NUMBER = 79101000000  # in the subscriber plan, no policy in the demo data; one number per call
# The dial string IIM's passthrough builds for a callee without a policy (fs_app.passthrough.dial_string with
# the default IIM_PASSTHROUGH_ENDPOINT): the reference app bridges to exactly the same endpoint.
REFERENCE_DIAL = "{ignore_early_media=true}sofia/gateway/ims/{destination}"

STATIC_EXTENSION = """<include>
  <!-- benchmarks.realfs_calls only: the static path, no Event Socket. -->
  <extension name="bench_static">
    <condition field="destination_number" expression="^static([0-9]+)$">
      <action application="set" data="hangup_after_bridge=true"/>
      <action application="bridge" data="sofia/gateway/ims/$1"/>
    </condition>
  </extension>
</include>
"""


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (PostgreSQL backends come and go, so read this at each sample)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _tree_cpu(root: int) -> float:
    return sum(_cpu_seconds(pid) for pid in _descendants(root))


def _postmasters(data_dir: Path) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(b"postgres") and str(data_dir).encode() in b" ".join(cmdline):
                found.append(int(entry))
    return found


@dataclass
class Phase:
    path: str
    p50_ms: float
    p99_ms: float
    failed: int
    calls: int
    app_cpu_ms_per_call: float
    fs_cpu_ms_per_call: float
    warmup_failed: int = 0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _scenario(work: Path) -> Path:
    """``caller.xml`` dialling ``[field0]`` of an injection file instead of the one ``-s`` number."""
    path = work / "caller-many.xml"
    if not path.exists():
        path.write_text(SCENARIO.read_text().replace("[service]", "[field0]"))
    return path


@dataclass
class Calls:
    setups_ms: list[float]
    failed: int


def _run_calls(work: Path, switch: RealSwitch, prefix: str, rate: float, calls: int) -> Calls:
    """SIPp places ``calls`` calls at ``rate``, each to its own number; their setup times and how many failed."""
    run_dir = Path(tempfile.mkdtemp(dir=work))
    numbers = run_dir / "numbers.csv"
    numbers.write_text("SEQUENTIAL\n" + "".join(f"{prefix}{FIRST_NUMBER + n};\n" for n in range(calls)))
    argv = ["sipp", "-sf", str(_scenario(work)), "-inf", str(numbers), "-i", "127.0.0.1", "-p", str(free_port()),
            "-mi", "127.0.0.1", "-mp", str(free_media_port()), "-m", str(calls), "-r", str(rate), "-l",
            str(int(rate * 10)), "-d", "300", "-key", "caller", "79160000000", "-key", "extra", "X-Bench: 1",
            "-trace_rtt", "-rtt_freq", "1", "-trace_logs", "-log_file", str(run_dir / "final.log"), "-nostdin",
            "-timeout", f"{int(calls / rate) + 60}s", f"127.0.0.1:{switch.external_sip_port}"]
    subprocess.run(argv, cwd=run_dir, capture_output=True, check=False)
    setups: list[float] = []
    for rtt in run_dir.glob("*_rtt.csv"):
        with rtt.open() as fh:
            for row in csv.reader(fh, delimiter=";"):
                if len(row) >= 3 and row[2].strip() == "setup":
                    setups.append(float(row[1]))
    finals = (run_dir / "final.log").read_text() if (run_dir / "final.log").exists() else ""
    answered = finals.count("FINAL 200 ")
    # A call whose setup time SIPp did not record counts as failed too: the percentiles would miss it.
    return Calls(setups, calls - min(answered, len(setups)))


def _phase(path: str, work: Path, switch: RealSwitch, prefix: str, rate: float, calls: int, warmup: int,
           app_pids: list[int]) -> Phase:
    assert switch.process is not None
    warm = _run_calls(work, switch, prefix, rate, warmup) if warmup else Calls([], 0)
    time.sleep(1.0)  # the warm-up's last calls end outside the measured phase
    fs_before = _cpu_seconds(switch.process.pid)
    app_before = sum(_tree_cpu(pid) for pid in app_pids)
    measured = _run_calls(work, switch, prefix, rate, calls)
    time.sleep(1.0)  # let the last hangups settle into the CPU figures
    fs_cpu = _cpu_seconds(switch.process.pid) - fs_before
    app_cpu = sum(_tree_cpu(pid) for pid in app_pids) - app_before
    setups = measured.setups_ms
    return Phase(path, _percentile(setups, 0.5) if setups else float("nan"),
                 _percentile(setups, 0.99) if setups else float("nan"), measured.failed, calls,
                 app_cpu * 1000 / calls, fs_cpu * 1000 / calls, warm.failed)


def _wait_line(process: subprocess.Popen[bytes], log: Path, needle: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{needle!r} never appeared:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


PATHS = ("static", "reference", "iim")


def summarise(phases: list[Phase], rate: float, warmup: int) -> dict[str, object]:
    """The run's JSON line: rounds averaged, "added" against the static path; ``"error"`` when the run is unfit.

    Unfit: a path failed a call (its warm-up included), lost a setup time (counted as failed), or placed a
    different number of calls than another path.
    """
    by_path: dict[str, list[Phase]] = {path: [p for p in phases if p.path == path] for path in PATHS}
    if not all(by_path.values()):
        return {"rate": rate, "error": f"a path never ran: {[path for path, runs in by_path.items() if not runs]}"}

    def mean(path: str, attr: str) -> float:
        return round(statistics.fmean(float(getattr(p, attr)) for p in by_path[path]), 2)

    def added_p99(path: str) -> list[float]:
        return [round(p.p99_ms - s.p99_ms, 1) for p, s in zip(by_path[path], by_path["static"], strict=True)]

    calls = {path: sum(p.calls for p in runs) for path, runs in by_path.items()}
    result: dict[str, object] = {
        "rate": rate, "calls": calls["iim"], "failed": sum(p.failed for p in by_path["iim"]),
        "ref_failed": sum(p.failed for p in by_path["reference"]),
        "static_failed": sum(p.failed for p in by_path["static"]),
        "added_p50_ms": round(mean("iim", "p50_ms") - mean("static", "p50_ms"), 2),
        "added_p99_ms": round(mean("iim", "p99_ms") - mean("static", "p99_ms"), 2),
        "ref_added_p50_ms": round(mean("reference", "p50_ms") - mean("static", "p50_ms"), 2),
        "ref_added_p99_ms": round(mean("reference", "p99_ms") - mean("static", "p99_ms"), 2),
        "app_cpu_ms_per_call": mean("iim", "app_cpu_ms_per_call"),
        "ref_app_cpu_ms_per_call": mean("reference", "app_cpu_ms_per_call"),
        "fs_cpu_ms_per_call": mean("iim", "fs_cpu_ms_per_call"),
        "ref_fs_cpu_ms_per_call": mean("reference", "fs_cpu_ms_per_call"),
        "static_fs_cpu_ms_per_call": mean("static", "fs_cpu_ms_per_call"),
        "added_p99_ms_rounds": added_p99("iim"), "ref_added_p99_ms_rounds": added_p99("reference"),
        "warmup": warmup, "machine": machine(),
    }
    failures = {path: sum(p.failed + p.warmup_failed for p in runs) for path, runs in by_path.items()}
    if any(failures.values()):
        result["error"] = f"calls failed (warm-up included): {failures}; the figures compare unlike runs"
    elif len(set(calls.values())) != 1:
        result["error"] = f"the paths placed different numbers of calls: {calls}"
    return result


def _renice(nice: int) -> None:
    """FreeSWITCH runs its threads realtime (SCHED_FIFO): on a shared machine the apps and SIPp, at nice 0,
    would wait behind unrelated work and the socket paths' tail would measure the neighbours, not the apps."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except PermissionError:
        print(f"realfs_calls: cannot set niceness {nice} (not root): measuring at the inherited one",
              file=sys.stderr)


def _terminated(_signum: int, _frame: object) -> None:
    raise SystemExit(143)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=100, help="calls before each measured phase, not measured")
    parser.add_argument("--nice", type=int, default=-10,
                        help="niceness of this run and what it starts (SIPp, the apps, PostgreSQL); 0 keeps it")
    args = parser.parse_args(argv)
    if args.nice:
        _renice(args.nice)
    home = freeswitch_home()
    if home is None or shutil.which("sipp") is None:
        print(json.dumps({"error": "needs FreeSWITCH (../shared/freeswitch/install) and sipp (sip-tester)"}))
        return 2
    work = Path(tempfile.mkdtemp(prefix="realfs-calls-"))
    core_port, app_port = free_port(), free_port()
    switch = RealSwitch(home=home, base=work / "fs")
    switch.render({"IIM_FS_IMS_PROXY": f"127.0.0.1:{core_port}", "IIM_FS_SOCKET_PRIMARY": f"127.0.0.1:{app_port}",
                   "IIM_FS_SOCKET_SECONDARY": f"127.0.0.1:{free_port()}", "IIM_FS_MAX_SESSIONS": "20000",
                   "IIM_FS_SESSIONS_PER_SECOND": "1000"})
    (switch.base / "conf" / "dialplan" / "public" / "40_bench_static.xml").write_text(STATIC_EXTENSION)
    core = subprocess.Popen(["sipp", "-sn", "uas", "-aa", "-i", "127.0.0.1", "-p", str(core_port), "-mi",
                             "127.0.0.1", "-mp", str(free_media_port()), "-nostdin"], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    iim_env = os.environ | {
        "IIM_ESL_PORT": str(app_port), "IIM_HTTP_PORT": "0", "IIM_BRIDGE_ENABLED": "false",
        "IIM_DATA_DIR": str(work / "pg"), "IIM_FS_PASSWORD": switch.password,
        "IIM_FS_NODES": json.dumps([{"host": "127.0.0.1", "port": 0}]), "IIM_LOG_LEVEL": "INFO",
    }
    phases: list[Phase] = []
    try:
        switch.start()
        iim_env["IIM_FS_NODES"] = json.dumps([{"host": "127.0.0.1", "port": switch.esl_port}])
        for round_no in range(args.rounds):
            order = ["static", "reference", "iim"]
            for path in order if round_no % 2 == 0 else order[::-1]:
                if path == "static":
                    phases.append(_phase(path, work, switch, "static", args.rate, args.calls, args.warmup, []))
                elif path == "reference":
                    log = work / f"thin-{round_no}.log"
                    with log.open("wb") as out:
                        thin = subprocess.Popen([sys.executable, "-m", "benchmarks._thin_outbound_app", "--port",
                                                 str(app_port), "--destination", REFERENCE_DIAL], cwd=ROOT,
                                                stdout=out, stderr=subprocess.STDOUT)
                    try:
                        _wait_line(thin, log, "READY")
                        phases.append(_phase(path, work, switch, "", args.rate, args.calls, args.warmup,
                                                  [thin.pid]))
                    finally:
                        _stop(thin)
                else:
                    iim_log = work / f"iim-{round_no}.log"
                    with iim_log.open("wb") as out:
                        iim = subprocess.Popen([sys.executable, "-m", "iim", "serve"], cwd=work, env=iim_env,
                                               stdout=out, stderr=subprocess.STDOUT)
                    try:
                        _wait_line(iim, iim_log, "IIM serving")
                        pids = [iim.pid, *_postmasters(work / "pg")]
                        phases.append(_phase(path, work, switch, "", args.rate, args.calls, args.warmup, pids))
                    finally:
                        _stop(iim)
                print(json.dumps(phases[-1].__dict__), flush=True)
    finally:
        switch.stop()
        core.terminate()
        core.wait()
    result = summarise(phases, args.rate, args.warmup)
    print(json.dumps(result))
    if "error" in result:
        print(f"realfs_calls: {result['error']}; switch and app logs kept in {work}", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    # SIGTERM (a run stopped from outside) unwinds like an error: the switch, SIPp and the apps are stopped.
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(main())
