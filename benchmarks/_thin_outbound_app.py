"""The reference for ``benchmarks.realfs_calls``: the thinnest outbound-socket app that routes a call.

Stdlib only, nothing of IIM's. Per call: ``connect``, ``myevents``, ``linger`` and one
``sendmsg execute bridge`` (event-lock, Event-UUID) in one write, then wait for that bridge's
CHANNEL_EXECUTE_COMPLETE and close (the dialplan's ``hangup_after_bridge`` ends the call). The frames are
parsed just enough to find that one event, so its CPU per call is the floor any app pays to FreeSWITCH.

    python -m benchmarks._thin_outbound_app --port 8084 --destination sofia/gateway/ims/{destination}

Prints ``READY <port>`` and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
from urllib.parse import unquote

_counter = itertools.count()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, template: str) -> None:
    uid = f"00000000-0000-4000-8000-{next(_counter) % 10**12:012d}"
    try:
        writer.write(b"connect\n\n")
        channel = await _frame(reader)
        destination = unquote(_header(channel, "Caller-Destination-Number"))
        target = template.replace("{destination}", destination)
        writer.write((f"myevents\n\nlinger\n\nsendmsg\ncall-command: execute\nexecute-app-name: bridge\n"
                      f"execute-app-arg: {target}\nevent-lock: true\nEvent-UUID: {uid}\n\n").encode())
        marker = f"Application-UUID: {uid}\n".encode()
        while True:
            frame = await _frame(reader)
            if b"Event-Name: CHANNEL_EXECUTE_COMPLETE\n" in frame and marker in frame:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\n\n")
    length = _header(head, "Content-Length")
    return head + (await reader.readexactly(int(length)) if length else b"")


def _header(block: bytes, name: str) -> str:
    start = block.find(f"\n{name}: ".encode())
    if start < 0:
        start = block.find(f"{name}: ".encode())
        if start != 0:
            return ""
    else:
        start += 1
    end = block.find(b"\n", start)
    return block[start + len(name) + 2:end].decode()


async def _main(port: int, template: str) -> None:
    server = await asyncio.start_server(lambda r, w: _handle(r, w, template), "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"READY {port}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--destination", default="sofia/gateway/ims/{destination}")
    args = parser.parse_args()
    asyncio.run(_main(args.port, args.destination))
    sys.exit(0)
