"""A FreeSWITCH-side load generator that replays one emulated call, byte for byte, many times.

``capture`` places one call from the FreeSWITCH emulator to the app through a recording
proxy and keeps, for every command the app sent, the frames the emulator answered with.
``dial`` then plays that script for thousands of calls: each call gets its own Unique-ID,
the app's own Event-UUIDs are put where the recorded ones were, and the dialled number is
varied, all same-length substitutions, so every frame stays valid. The app sees the bytes
the emulator produces (and so FreeSWITCH's framing) at a cost low enough for one core to
drive thousands of calls per second, like SIPp replaying a scenario.

    python -m benchmarks._script_dialer --script FILE --port P (--rate R | --concurrency C) --count N
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
import time
from dataclasses import dataclass, field

import uvloop

from fs_app.esl import Command, CommandDecoder, Execute, Exit, HangupCmd


def kind(cmd: Command) -> str:
    if isinstance(cmd, Execute):
        return f"execute:{cmd.app}"
    if isinstance(cmd, HangupCmd):
        return "hangup"
    return type(cmd).__name__


_KEEP_VARIABLES = (b"variable_originate_disposition", b"variable_bridge_hangup_cause",
                   b"variable_last_bridge_hangup_cause", b"variable_DIALSTATUS", b"variable_hangup_cause")


def _frames(stream: bytes) -> list[bytes]:
    """Cut a FreeSWITCH -> app stream into whole frames."""
    out = []
    pos = 0
    while pos < len(stream):
        end = stream.index(b"\n\n", pos) + 2
        head = stream[pos:end]
        length = 0
        if not head.startswith(b"Event-Name: "):
            for line in head.split(b"\n"):
                if line.startswith(b"Content-Length: "):
                    length = int(line[16:])
        out.append(stream[pos:end + length])
        pos = end + length
    return out


def lean(frames: bytes, limit: int = 2560) -> bytes:
    """Drop channel variables from plain events (as FreeSWITCH does with verbose_events off) until each
    event fits ``limit`` bytes; the headers call control reads are kept."""
    out = []
    for frame in _frames(frames):
        if not frame.startswith(b"Content-Length: ") or b"text/event-plain" not in frame[:64]:
            out.append(frame)
            continue
        _, _, body = frame.partition(b"\n\n")
        lines = body.rstrip(b"\n").split(b"\n")
        while len(b"\n".join(lines)) + 2 > limit:
            drop = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith(b"variable_")
                         and not lines[i].startswith(_KEEP_VARIABLES)), None)
            if drop is None:
                break
            del lines[drop]
        new_body = b"\n".join(lines) + b"\n\n"
        out.append(b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(new_body) + new_body)
    return b"".join(out)


@dataclass
class Script:
    uuid: str
    destination: str
    steps: list[tuple[str, bytes]] = field(default_factory=list)  # (command kind, frames answered)
    event_uuids: list[str] = field(default_factory=list)  # recorded Event-UUIDs, in command order

    def leaned(self, limit: int = 2560) -> Script:
        return Script(self.uuid, self.destination, [(k, lean(b, limit)) for k, b in self.steps], self.event_uuids)

    def template(self) -> list[tuple[str, bytes, list[tuple[int, int]]]]:
        """Per step: kind, frames, and where each substituted value sits (offset, slot).

        Slots: 0 = call uuid, 1 = destination, 2.. = the recorded Event-UUIDs in order. Every
        substitution has the recorded value's length, so offsets and Content-Lengths hold.
        """
        values = [self.uuid.encode(), self.destination.encode(), *(u.encode() for u in self.event_uuids)]
        out = []
        for kind_, frames in self.steps:
            spots = []
            for slot, value in enumerate(values):
                at = frames.find(value)
                while at >= 0:
                    spots.append((at, slot))
                    at = frames.find(value, at + len(value))
            out.append((kind_, frames, sorted(spots)))
        return out

    def to_json(self) -> str:
        return json.dumps({"uuid": self.uuid, "destination": self.destination, "event_uuids": self.event_uuids,
                           "steps": [[k, base64.b64encode(b).decode()] for k, b in self.steps]})

    @classmethod
    def from_json(cls, text: str) -> Script:
        data = json.loads(text)
        return cls(data["uuid"], data["destination"], [(k, base64.b64decode(b)) for k, b in data["steps"]],
                   data["event_uuids"])


async def capture(app_port: int, destination: str) -> Script:
    """Place one emulated call through a recording proxy and cut it into per-command steps."""
    from fs_app.testing import CallSpec, FreeSwitchEmulator, TargetBehaviour

    chunks: list[tuple[str, bytes]] = []

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
        while data := await src.read(65536):
            chunks.append((direction, data))
            dst.write(data)
        dst.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", app_port)
        await asyncio.gather(pump(reader, up_writer, "fs>app"), pump(up_reader, writer, "app>fs"),
                             return_exceptions=True)

    proxy = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.answer(after_ms=0, hangup_after_ms=0), seed=7)
    result = await emu.place_call("127.0.0.1", port, CallSpec(destination=destination,
                                                              caller_id_number="79160000000"))
    await asyncio.sleep(0.1)
    proxy.close()
    await emu.close()
    if result.error or result.bridged_to is None:
        raise RuntimeError(f"capture call failed: {result.error or 'not bridged'} ({result.disconnect})")
    script = Script(result.uuid, destination)
    decoder = CommandDecoder()
    pending = b""
    for direction, data in chunks:
        if direction == "app>fs":
            if script.steps:
                k, frames = script.steps[-1]
                script.steps[-1] = (k, frames + pending)
            pending = b""
            for cmd in decoder.feed(data):
                script.steps.append((kind(cmd), b""))
                if isinstance(cmd, Execute):
                    script.event_uuids.append(cmd.event_uuid)
        else:
            pending += data
    if script.steps:
        k, frames = script.steps[-1]
        script.steps[-1] = (k, frames + pending)
    return script


@dataclass
class Stats:
    latencies_ms: list[float] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1


class _ReplayCall(asyncio.Protocol):
    def __init__(self, template: list[tuple[str, bytes, list[tuple[int, int]]]], uuid: str, destination: str,
                 stats: Stats, done: asyncio.Future[None]) -> None:
        self._steps = list(template)
        self._values: list[bytes] = [uuid.encode(), destination.encode()]
        self._decoder = CommandDecoder()
        self._stats = stats
        self._done = done
        self._t0 = 0.0
        self._transport: asyncio.Transport | None = None
        self._bridged = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._t0 = time.perf_counter()
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        out = bytearray()
        values = self._values
        for cmd in self._decoder.feed(data):
            if isinstance(cmd, Execute):
                values.append(cmd.event_uuid.encode())
                if cmd.app == "bridge" and not self._bridged:
                    self._bridged = True
                    self._stats.latencies_ms.append((time.perf_counter() - self._t0) * 1000)
            want = kind(cmd)
            while self._steps and self._steps[0][0] != want:
                self._steps.pop(0)
            if not self._steps:
                self._finish("script out of step")
                return
            _, frames, spots = self._steps.pop(0)
            start = len(out)
            out += frames
            for offset, slot in spots:
                if slot < len(values):
                    value = values[slot]
                    out[start + offset:start + offset + len(value)] = value
            if isinstance(cmd, Exit):
                assert self._transport is not None
                self._transport.write(out)
                self._transport.close()
                self._finish(None)
                return
        if out and self._transport is not None:
            self._transport.write(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish("closed by the app before exit")

    def _finish(self, error: str | None) -> None:
        if self._done.done():
            return
        if error is None and self._bridged:
            self._stats.completed += 1
        else:
            self._stats.fail(error or "no bridge")
            if self._transport is not None:
                self._transport.abort()
        self._done.set_result(None)


async def _one_call(host: str, port: int, script: Script, template: list[tuple[str, bytes, list[tuple[int, int]]]],
                    n: int, stats: Stats, rng: random.Random) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    uuid = f"{n:08x}-0000-4000-8000-{rng.getrandbits(48):012x}"
    destination = str(int(script.destination) + rng.randrange(100_000))  # same length: a valid substitution
    try:
        await loop.create_connection(lambda: _ReplayCall(template, uuid, destination, stats, done), host, port)
        await asyncio.wait_for(done, 10)
    except (OSError, TimeoutError) as exc:
        if not done.done():
            stats.fail(type(exc).__name__)


async def dial(host: str, port: int, script: Script, count: int, *, rate: float | None,
               concurrency: int) -> tuple[Stats, float]:
    """Open-loop at ``rate`` calls/s (``concurrency`` bounds calls in flight), or closed-loop when rate is None."""
    stats = Stats()
    rng = random.Random(11)
    template = script.template()
    loop = asyncio.get_running_loop()
    started = loop.time()
    if rate is None:
        counter = iter(range(count))

        async def worker() -> None:
            for n in counter:
                await _one_call(host, port, script, template, n, stats, rng)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    else:
        in_flight: set[asyncio.Task[None]] = set()
        for n in range(count):
            delay = started + n / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(in_flight) >= concurrency:
                stats.fail("concurrency limit")
                continue
            task = loop.create_task(_one_call(host, port, script, template, n, stats, rng))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight)
    return stats, loop.time() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--script", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args()
    with open(args.script) as fh:
        script = Script.from_json(fh.read())
    stats, elapsed = uvloop.run(dial(args.host, args.port, script, args.count, rate=args.rate,
                                     concurrency=args.concurrency))
    lat = sorted(stats.latencies_ms)

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

    print(json.dumps({"calls": args.count, "completed": stats.completed, "failed": stats.failed,
                      "errors": stats.errors, "elapsed_s": round(elapsed, 3),
                      "calls_per_s": round(stats.completed / elapsed, 1) if elapsed else None,
                      "p50_ms": pct(0.5), "p99_ms": pct(0.99), "p999_ms": pct(0.999),
                      "max_ms": round(lat[-1], 3) if lat else None}))
    sys.exit(0)


if __name__ == "__main__":
    main()
