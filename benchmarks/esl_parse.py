"""ESL event parsing throughput: our sans-I/O codec against genesis and greenswitch.

    python -m benchmarks.esl_parse [--events N] [--repeats R] [--no-peers]

Workload: ~2.5 KB ``text/event-plain`` CHANNEL_* frames made from the real FreeSWITCH
1.10.12 recordings (tests/data/esl-transcripts): every distinct recorded CHANNEL_* event,
cut after its last whole header line that fits in 2.5 KB (so Event-Name, the standard
headers, Channel-*, Unique-ID, Caller-* and the first variables survive), reframed with a
correct Content-Length and repeated in recorded order to N events. The byte stream is fed
in 64 KiB reads, and for every event the consumer reads Event-Name and Unique-ID, which is
what call control needs. ``events_per_s_all_headers`` also materialises and URL-decodes
every header of every event.

Peers run in a separate virtualenv that this script creates (``.bench-venv``, gitignored;
their pins conflict with ours) from the interpreter running the benchmark, so everything
is measured on the same Python. benchmarks/_peers/peer_parse.py pushes the same bytes
through each peer's own reader (see its docstring for how each is driven without a
network) and prints events/s. A digest over every (Event-Name, Unique-ID) pair proves
that all three parsed the same events.

Timing is the best of R runs of thread CPU time (``time.thread_time``), which other load
on a shared box disturbs much less than wall time; wall-clock figures are reported too.
The last line printed is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from base64 import b64decode
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fs_app.esl import EslCodec, Event

ROOT = Path(__file__).resolve().parents[1]
TRANSCRIPTS = ROOT / "tests" / "data" / "esl-transcripts"
PEER_SCRIPT = Path(__file__).resolve().parent / "_peers" / "peer_parse.py"
PEER_PACKAGES = ("genesis==2026.10.18", "greenswitch==0.0.19")
CHUNK = 64 * 1024
TARGET_EVENT_BYTES = 2500
TARGET_EVENTS_PER_S = 100_000
TARGET_VS_BEST_PEER = 3.0


# ---------------------------------------------------------------- workload


def _recorded_fs_streams(directory: Path) -> list[bytes]:
    streams: list[bytes] = []
    for path in sorted(directory.glob("*.jsonl")):
        per_conn: dict[str, bytearray] = {}
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["dir"] == "fs>app":
                per_conn.setdefault(rec["conn"], bytearray()).extend(b64decode(rec["b64"]))
        streams.extend(bytes(data) for data in per_conn.values())
    return streams


def _event_plain_bodies(stream: bytes) -> list[bytes]:
    """The bodies of the stream's text/event-plain frames (a plain framer, not our codec)."""
    bodies: list[bytes] = []
    pos = 0
    while pos < len(stream):
        end = stream.index(b"\n\n", pos)
        block = stream[pos:end]
        length = 0
        if not block.startswith(b"Event-Name: "):  # the connect reply has no body
            for line in block.split(b"\n"):
                if line.startswith(b"Content-Length: "):
                    length = int(line[16:])
        body = stream[end + 2 : end + 2 + length]
        if b"Content-Type: text/event-plain" in block:
            bodies.append(body)
        pos = end + 2 + length
    return bodies


def _trim(body: bytes, limit: int) -> bytes:
    """Whole header lines from the top while the event stays within ``limit`` bytes."""
    lines = body.split(b"\n\n", 1)[0].split(b"\n")
    kept: list[bytes] = []
    size = 1  # the blank line that ends the event
    for line in lines:
        if kept and size + len(line) + 1 > limit:
            break
        kept.append(line)
        size += len(line) + 1
    return b"\n".join(kept) + b"\n\n"


def build_frames(directory: Path = TRANSCRIPTS, limit: int = TARGET_EVENT_BYTES) -> list[bytes]:
    """Distinct recorded CHANNEL_* events, trimmed to ``limit`` bytes and reframed."""
    if not directory.is_dir():
        raise SystemExit(f"recorded sessions not found at {directory}")
    frames: dict[bytes, None] = {}
    for stream in _recorded_fs_streams(directory):
        for body in _event_plain_bodies(stream):
            if not body.startswith(b"Event-Name: CHANNEL_") or b"\nUnique-ID: " not in body:
                continue
            event = _trim(body, limit)
            if b"\nUnique-ID: " not in event:
                continue
            frames[b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(event) + event] = None
    return list(frames)


def build_stream(frames: list[bytes], events: int) -> bytes:
    return b"".join(frames[i % len(frames)] for i in range(events))


def chunked(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# ---------------------------------------------------------------- our codec


class Digest:
    """Event count and a hash over (Event-Name, Unique-ID) (same as the peer script's)."""

    def __init__(self) -> None:
        self.count = 0
        self.hash = hashlib.blake2b(digest_size=16)

    def add(self, name: str, uuid: str | None) -> None:
        self.count += 1
        self.hash.update(f"{name}\x00{uuid}\x01".encode())


def ours_call_control(chunks: list[bytes]) -> int:
    """What a call-control consumer does: Event-Name and Unique-ID of every event."""
    codec = EslCodec()
    feed = codec.feed
    n = 0
    for chunk in chunks:
        for msg in feed(chunk):
            if isinstance(msg, Event):
                _ = msg.name
                _ = msg.unique_id
                n += 1
    return n


def ours_all_headers(chunks: list[bytes]) -> int:
    """Every header of every event split out and URL-decoded."""
    codec = EslCodec()
    n = 0
    for chunk in chunks:
        for msg in codec.feed(chunk):
            if isinstance(msg, Event):
                for _name, _value in msg.headers.items():
                    pass
                n += 1
    return n


def ours_digest(chunks: list[bytes]) -> Digest:
    digest = Digest()
    codec = EslCodec()
    for chunk in chunks:
        for msg in codec.feed(chunk):
            if isinstance(msg, Event):
                digest.add(msg.name, msg.unique_id)
    return digest


def best_of(run: Callable[[list[bytes]], int], chunks: list[bytes], repeats: int) -> dict[str, float]:
    cpu = wall = float("inf")
    count = 0
    for _ in range(repeats):
        gc.collect()
        w0, c0 = time.perf_counter(), time.thread_time()
        count = run(chunks)
        c1, w1 = time.thread_time(), time.perf_counter()
        cpu, wall = min(cpu, c1 - c0), min(wall, w1 - w0)
    return {"events": count, "events_per_s": count / cpu, "wall_events_per_s": count / wall, "seconds": cpu}


# ---------------------------------------------------------------- peers


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _peer_venv_ok(venv: Path) -> bool:
    python = _venv_python(venv)
    marker = venv / ".iim-bench"
    if not python.exists() or not marker.exists():
        return False
    if marker.read_text() != "\n".join(PEER_PACKAGES):
        return False
    probe = subprocess.run(
        [str(python), "-c", "import sys; print(sys.version)"], capture_output=True, text=True, check=False
    )
    return probe.returncode == 0 and probe.stdout.strip() == sys.version


def ensure_peer_venv(venv: Path) -> Path:
    """Create (or recreate, if built by another interpreter) the peers' virtualenv."""
    if _peer_venv_ok(venv):
        return _venv_python(venv)
    print(f"creating {venv} with {' '.join(PEER_PACKAGES)} for {sys.executable} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    python = _venv_python(venv)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PEER_PACKAGES],
        check=True,
    )
    (venv / ".iim-bench").write_text("\n".join(PEER_PACKAGES))
    return python


def run_peers(python: Path, stream: bytes, repeats: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(prefix="esl-bench-", suffix=".bin") as f:
        f.write(stream)
        f.flush()
        proc = subprocess.run(
            [str(python), str(PEER_SCRIPT), f.name, str(CHUNK), str(repeats)],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "GENESIS_LOG_LEVEL": "INFO", "PYTHONWARNINGS": "ignore"},
        )
    if proc.returncode != 0:
        raise SystemExit(f"peer benchmark failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=20_000, help="events in the stream (default 20000)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement; the best counts")
    parser.add_argument("--no-peers", action="store_true", help="measure only our codec")
    parser.add_argument("--venv", type=Path, default=ROOT / ".bench-venv", help="the peers' virtualenv")
    parser.add_argument("--transcripts", type=Path, default=TRANSCRIPTS)
    args = parser.parse_args(argv)

    frames = build_frames(args.transcripts)
    stream = build_stream(frames, args.events)
    chunks = chunked(stream)
    names = sorted({f.split(b"Event-Name: ", 1)[1].split(b"\n", 1)[0].decode() for f in frames})

    digest = ours_digest(chunks)
    assert digest.count == args.events, (digest.count, args.events)
    lazy = best_of(ours_call_control, chunks, args.repeats)
    full = best_of(ours_all_headers, chunks, max(1, args.repeats // 2))

    result: dict[str, Any] = {
        "benchmark": "esl_parse",
        "workload": {
            "events": args.events,
            "distinct_frames": len(frames),
            "event_types": names,
            "stream_bytes": len(stream),
            "read_bytes": CHUNK,
        },
        "event_bytes": round(len(stream) / args.events),
        "events_per_s": round(lazy["events_per_s"]),
        "events_per_s_all_headers": round(full["events_per_s"]),
        "wall_events_per_s": round(lazy["wall_events_per_s"]),
        "mb_per_s": round(len(stream) / lazy["seconds"] / 1e6, 1),
        "timer": f"time.thread_time, best of {args.repeats}",
        "python": sys.version,
        "executable": sys.executable,
        "base_executable": os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
        "implementation": platform.python_implementation(),
        "digest": digest.hash.hexdigest(),
    }
    print(
        f"ours: {result['events_per_s']:,} events/s (Event-Name + Unique-ID), "
        f"{result['events_per_s_all_headers']:,} events/s with every header decoded; "
        f"{result['event_bytes']} B/event, {len(frames)} distinct frames",
        file=sys.stderr,
    )

    if not args.no_peers:
        peers = run_peers(ensure_peer_venv(args.venv), stream, args.repeats)
        result["peers"] = {name: round(peers[name]["events_per_s"]) for name in ("genesis", "greenswitch")}
        result["peer_versions"] = peers["versions"]
        result["peer_python"] = peers["python"]
        result["peer_executable"] = peers["executable"]
        result["same_interpreter"] = peers["python"] == sys.version
        result["digests_match"] = all(
            peers[name]["digest"] == result["digest"] and peers[name]["events"] == args.events
            for name in ("genesis", "greenswitch")
        )
        for name, rate in result["peers"].items():
            result[f"vs_{name}"] = round(lazy["events_per_s"] / rate, 1)
            result[f"vs_{name}_all_headers"] = round(full["events_per_s"] / rate, 2)
        best_peer = max(result["peers"].values())
        result["vs_best_peer"] = round(lazy["events_per_s"] / best_peer, 1)
        result["meets_target"] = (
            lazy["events_per_s"] >= TARGET_EVENTS_PER_S
            and lazy["events_per_s"] >= TARGET_VS_BEST_PEER * best_peer
        )
        print(
            "peers: "
            + ", ".join(f"{k} {v:,} events/s (x{result[f'vs_{k}']})" for k, v in result["peers"].items()),
            file=sys.stderr,
        )
    result["target"] = {"events_per_s": TARGET_EVENTS_PER_S, "vs_best_peer": TARGET_VS_BEST_PEER}
    sys.stderr.flush()
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
