"""A deliberately trivial outbound-socket application, to measure the emulator against.

Per call: ``connect``, ``linger``, ``myevents``, one ``bridge`` (event-lock, Event-UUID),
wait for the bridge's CHANNEL_EXECUTE_COMPLETE, ``hangup``, wait for the linger notice,
``exit``. It pipelines the first four commands and scans only the newly received bytes
for two markers instead of parsing the stream, so that almost all CPU of a load run is
the emulator's.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import cast

_LINGER = b"Content-Disposition: linger\n"
_HANGUP = b"sendmsg\ncall-command: hangup\nhangup-cause: NORMAL_CLEARING\n\n"
_counter = itertools.count()


class TrivialApp(asyncio.Protocol):
    """One call's application side."""

    __slots__ = ("_opening", "buf", "done_marker", "stage", "transport")

    def __init__(self, destination: str) -> None:
        uid = f"00000000-0000-4000-8000-{next(_counter) % 10**12:012d}"
        # Only the bridge's CHANNEL_EXECUTE_COMPLETE has Application-Response before our Application-UUID.
        self.done_marker = f"Application-Response: _none_\nApplication-UUID: {uid}\n".encode()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.stage = 0
        self._opening = (
            "connect\n\nlinger\n\nmyevents\n\n"
            "sendmsg\ncall-command: execute\nexecute-app-name: bridge\n"
            f"execute-app-arg: {{ignore_early_media=true}}{destination}\nevent-lock: true\nEvent-UUID: {uid}\n\n"
        ).encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._opening)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.stage == 2:
            return
        # Keep a short tail so a marker split across reads is still found.
        window = self.buf + data
        self.buf = window[-160:]
        if self.stage == 0 and window.find(self.done_marker) >= 0:
            self.stage = 1
            transport.write(_HANGUP)
        if self.stage == 1 and window.find(_LINGER) >= 0:
            self.stage = 2
            transport.write(b"exit\n\n")

    def eof_received(self) -> bool | None:
        return None


async def serve(host: str = "127.0.0.1", port: int = 8084, destination: str = "sofia/gateway/ims/79001234567",
                ) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: TrivialApp(destination), host, port, backlog=4096,
                                    reuse_address=True)
