"""A TCP fault proxy: cut connections and hold the path down, and act on an ``originate`` in the stream.

Between each IIM instance and the switch (inbound ESL), the SMSC and the vendor cloud. The client->server
direction is scanned for ``originate`` commands: every one is reported (which instance sent which call),
and a one-shot trigger can act on the next one, either before it is forwarded (the call is claimed and
marked dispatched, but the switch never sees it) or right after.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

_ORIGINATE_UUID = re.compile(rb"originate \{[^}\n]*?origination_uuid=([0-9a-f-]{36})")
Upstream = tuple[str, int]


@dataclass
class Trigger:
    """Act on the next originate: ``before`` (it is not forwarded) or ``after`` it was written."""

    when: Literal["before", "after"]
    action: Callable[[str], None]
    fired: asyncio.Future[str]


class FaultProxy:
    """Listens on 127.0.0.1; each connection goes to the first upstream that accepts (failover order)."""

    def __init__(self, name: str, upstreams: Sequence[Upstream], *, watch_originates: bool = False,
                 connect_timeout_s: float = 2.0) -> None:
        self.name = name
        self.upstreams = list(upstreams)
        self.watch = watch_originates
        self.connect_timeout_s = connect_timeout_s
        self.port = 0
        self.down = False
        self.originates: list[tuple[float, str]] = []
        self.on_originate: list[Callable[[str], None]] = []
        self._triggers: list[Trigger] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        """Reset every connection now and refuse new ones until :meth:`restore`."""
        self.down = True
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.down = False

    async def hold_down(self, seconds: float) -> None:
        self.cut()
        try:
            await asyncio.sleep(seconds)
        finally:
            self.restore()

    def arm(self, when: Literal["before", "after"], action: Callable[[str], None]) -> asyncio.Future[str]:
        """Run ``action(call uuid)`` at the next originate no earlier trigger takes; the future resolves with
        that uuid."""
        fired: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._triggers.append(Trigger(when, action, fired))
        return fired

    def disarm(self, fired: asyncio.Future[str] | None = None) -> None:
        """Forget the trigger of ``fired`` (every trigger when None)."""
        keep = [t for t in self._triggers if fired is not None and t.fired is not fired]
        for trigger in self._triggers:
            if trigger not in keep and not trigger.fired.done():
                trigger.fired.cancel()
        self._triggers = keep

    async def close(self) -> None:
        self.disarm()
        self.cut()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        upstream = None
        for host, port in self.upstreams:
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection(host, port), self.connect_timeout_s)
                break
            except (OSError, TimeoutError):
                continue
        if upstream is None:
            writer.transport.abort()
            return
        up_reader, up_writer = upstream
        if self._cut_meanwhile():
            up_writer.transport.abort()
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        for src, dst, scan in ((reader, up_writer, self.watch), (up_reader, writer, False)):
            task = asyncio.get_running_loop().create_task(self._pump(src, dst, scan))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _cut_meanwhile(self) -> bool:
        """Whether the path was cut while the upstream connection was being made."""
        return self.down

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, scan: bool) -> None:
        tail = b""
        try:
            while data := await src.read(65536):
                uuids: list[str] = []
                if scan and b"originate" in tail + data:
                    window = tail + data
                    uuids = [m.group(1).decode() for m in _ORIGINATE_UUID.finditer(window)
                             if m.end() > len(tail)]
                if uuids:
                    if not await self._originates(uuids, dst, data):
                        return
                else:
                    # Every other chunk goes through, also one that merely mentions "originate" (a command
                    # after an originate, ``hash select/iim_originated/...``): dropping it would shift the
                    # switch's replies against the commands, a fault no real network makes.
                    dst.write(data)
                    await dst.drain()
                tail = data[-512:]
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(dst)
            dst.transport.abort()

    async def _originates(self, uuids: list[str], dst: asyncio.StreamWriter, data: bytes) -> bool:
        """Forward ``data`` (holding originates) unless a ``before`` trigger eats it; False: stop pumping."""
        loop = asyncio.get_running_loop()
        for uuid in uuids:
            self.originates.append((loop.time(), uuid))
            for listener in self.on_originate:
                listener(uuid)
        trigger = self._triggers.pop(0) if self._triggers else None
        if trigger is not None and trigger.when == "before":
            _fire(trigger, uuids[0])
            return False
        dst.write(data)
        await dst.drain()
        if trigger is not None:
            _fire(trigger, uuids[0])
        return True


def _fire(trigger: Trigger, uuid: str) -> None:
    try:
        trigger.action(uuid)
    finally:
        if not trigger.fired.done():
            trigger.fired.set_result(uuid)
