"""Push a recorded-style ESL byte stream through the peers' own parsers.

Runs inside the benchmark's separate virtualenv (``.bench-venv``), never in the
project's: genesis and greenswitch pin versions that conflict with ours. It is a
plain script (no imports from this repository) and prints one JSON object.

Usage: ``peer_parse.py STREAM_FILE CHUNK_SIZE REPEATS``

How each peer is driven, without a network:

* **genesis** (asyncio): its reader is ``Protocol.handler()`` (genesis/protocol/base.py),
  which frames with ``StreamReader.readline()``/``readexactly()`` and parses with
  ``ESLReaderFSM``/``parse_headers`` (genesis/protocol/reader_fsm.py, parser.py).
  We give a real ``Protocol`` an ``asyncio.StreamReader`` that we feed the stream
  one chunk at a time (``feed_data`` + one loop turn, so the handler drains each
  chunk as it would a socket read). No socket is involved; that is the same object
  ``asyncio.open_connection`` would hand it.
* **greenswitch** (gevent): its reader is ``ESLProtocol.receive_events()``
  (greenswitch/esl.py), which calls ``sock_file.readline()``/``read(n)`` on
  ``sock.makefile('rb')`` and parses with ``ESLEvent.parse_data``. We set
  ``sock_file`` to an ``io.BufferedReader`` over a raw reader that returns the
  stream in the given chunk size (what a socket returning those reads would do).

In both, the library's event queue is replaced by a sink that reads Event-Name and
Unique-ID from each event (what a call-control application needs) and counts it,
so the peers are not charged for queueing; that only flatters them.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import importlib.metadata
import io
import json
import sys
import time
from collections.abc import Iterator
from typing import Any


class _Digest:
    """Counts events and hashes (Event-Name, Unique-ID) to prove equal parsing."""

    def __init__(self) -> None:
        self.count = 0
        self.hash = hashlib.blake2b(digest_size=16)

    def add(self, name: Any, uuid: Any) -> None:
        self.count += 1
        self.hash.update(f"{name}\x00{uuid}\x01".encode())


def _whole_frames(data: bytes, count: int) -> bytes:
    """The first ``count`` frames (``Content-Length: N`` first, as in the workload).

    A warm-up must end on a frame boundary: greenswitch's ``_read_socket`` loops forever
    on a body cut short by EOF (its "FIXME(italo): if not data raise error").
    """
    pos = 0
    for _ in range(count):
        end = data.find(b"\n\n", pos)
        if end < 0 or not data.startswith(b"Content-Length: ", pos):
            break
        length = int(data[pos + 16 : data.index(b"\n", pos)])
        pos = end + 2 + length
    return data[:pos]


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# ---------------------------------------------------------------- genesis


def run_genesis(chunks: list[bytes], digest: _Digest) -> None:
    import logging

    logging.disable(logging.CRITICAL)
    from genesis.protocol.base import Protocol  # type: ignore[import-not-found]

    class Sink:
        async def put(self, event: Any) -> None:
            if event is None:  # end-of-stream marker genesis queues
                return
            name = event.get("Event-Name")
            if name is not None:
                digest.add(name, event.get("Unique-ID"))

    async def main() -> None:
        proto = Protocol()
        reader = asyncio.StreamReader(limit=2**16)  # asyncio.open_connection's default
        proto.reader = reader
        proto.is_connected = True
        proto.events = Sink()
        task = asyncio.ensure_future(proto.handler())
        for chunk in chunks:
            reader.feed_data(chunk)
            await asyncio.sleep(0)  # let the handler drain this read
        reader.feed_eof()
        await task

    asyncio.run(main())


# ------------------------------------------------------------ greenswitch


class _ChunkedRaw(io.RawIOBase):
    """A raw stream that returns at most one recorded-size read per call."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._cur = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if not self._cur:
            self._cur = memoryview(next(self._chunks, b""))
        n = min(len(buf), len(self._cur))
        buf[:n] = self._cur[:n]
        self._cur = self._cur[n:]
        return n


def run_greenswitch(chunks: list[bytes], digest: _Digest) -> None:
    from greenswitch.esl import ESLProtocol  # type: ignore[import-not-found]

    class Sink:
        def put(self, event: Any) -> None:
            headers = event.headers
            name = headers.get("Event-Name")
            if name is not None:
                digest.add(name, headers.get("Unique-ID"))

    class _NoSock:
        def close(self) -> None:
            pass

    proto = ESLProtocol()
    proto.sock = _NoSock()
    proto.sock_file = io.BufferedReader(_ChunkedRaw(chunks), buffer_size=max(len(c) for c in chunks))
    proto._esl_event_queue = Sink()
    proto.receive_events()  # returns at EOF


PEERS = {"genesis": run_genesis, "greenswitch": run_greenswitch}


def main(argv: list[str]) -> None:
    """``STREAM_FILE CHUNK_SIZE REPEATS [peer,peer]``: best-of-REPEATS thread CPU time per peer."""
    path, chunk_size, repeats = argv[0], int(argv[1]), int(argv[2])
    only = argv[3].split(",") if len(argv) > 3 else list(PEERS)
    with open(path, "rb") as f:
        data = f.read()
    chunks = _chunks(data, chunk_size)
    out: dict[str, Any] = {"python": sys.version, "executable": sys.executable, "versions": {}}
    warm_up = _chunks(_whole_frames(data, 50), chunk_size)
    for name in only:
        PEERS[name](warm_up, _Digest())  # imports (genesis pulls in OpenTelemetry), caches
        best = float("inf")
        digest = _Digest()
        for _ in range(repeats):
            digest = _Digest()
            gc.collect()
            start = time.thread_time()  # CPU time of this thread: robust to other load on the box
            PEERS[name](chunks, digest)
            best = min(best, time.thread_time() - start)
        out["versions"][name] = importlib.metadata.version(name)
        out[name] = {
            "events": digest.count,
            "seconds": best,
            "events_per_s": digest.count / best,
            "digest": digest.hash.hexdigest(),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
