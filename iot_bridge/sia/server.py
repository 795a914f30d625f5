"""Thin asyncio drivers for the SIA receiver: TCP (a stream of frames, one reply each, in order) and UDP (one
frame per datagram, the reply to its sender).

Both listen on one address (loopback unless configured) and are owned by :class:`SiaServer`: ``async with``
binds them (a port in use fails the start), ``aclose`` stops them and every frame being handled. The listeners
run supervised: one that dies is bound again on the same port after a backoff. Every wait has a deadline: a
TCP connection idle for ``idle_timeout_s`` is closed, a reply not written within ``write_timeout_s`` drops the
connection, and the intake behind each frame has the bridge's store deadline. Connections and datagrams in
flight are bounded; past the bound a connection is closed at once and a datagram dropped (the panel repeats).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from prometheus_client import Counter

from iim.core.lifecycle import AsyncResource, TaskSupervisor
from iim.core.metrics import REGISTRY
from iot_bridge.sia import codec
from iot_bridge.sia.receiver import SiaReceiver

__all__ = ["SiaServer", "SiaServerConfig"]

log = logging.getLogger(__name__)

SHED = Counter("iim_sia_shed", "SIA connections closed or datagrams dropped over the in-flight bound",
               ["transport"], registry=REGISTRY)


@dataclass(frozen=True, slots=True)
class SiaServerConfig:
    host: str = "127.0.0.1"
    #: TCP and UDP port (0: any free one, for tests)
    port: int = 12000
    tcp: bool = True
    udp: bool = True
    idle_timeout_s: float = 120.0
    write_timeout_s: float = 10.0
    max_connections: int = 256
    max_datagrams_in_flight: int = 64
    restart_initial_s: float = 0.5
    restart_ceiling_s: float = 10.0


class SiaServer(AsyncResource):
    def __init__(self, receiver: SiaReceiver, config: SiaServerConfig) -> None:
        self.receiver = receiver
        self.config = config
        self.tcp_port: int | None = None
        self.udp_port: int | None = None
        self._tasks = TaskSupervisor()
        self._handlers = TaskSupervisor()
        self._closing = False
        self._connections = 0
        self._datagrams = 0
        self._tcp: asyncio.Server | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_lost: asyncio.Future[None] | None = None

    async def start(self) -> None:
        c = self.config
        if c.tcp:
            await self._bind_tcp(c.port)
            self._tasks.supervise(self._run_tcp, name="sia-tcp", initial=c.restart_initial_s,
                                  ceiling=c.restart_ceiling_s, until=lambda: self._closing)
        if c.udp:
            # One port number for both, as panels are configured: UDP takes the port TCP got.
            await self._bind_udp(self.tcp_port if self.tcp_port is not None else c.port)
            self._tasks.supervise(self._run_udp, name="sia-udp", initial=c.restart_initial_s,
                                  ceiling=c.restart_ceiling_s, until=lambda: self._closing)
        log.info("SIA DC-09 receiver listening", extra={"host": c.host, "tcp_port": self.tcp_port,
                                                        "udp_port": self.udp_port})

    async def aclose(self) -> None:
        self._closing = True
        if self._tcp is not None:
            self._tcp.close()
        if self._udp is not None:
            self._udp.close()
        await self._tasks.aclose()
        await self._handlers.aclose()
        if self._tcp is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._tcp.wait_closed()

    # ------------------------------------------------------------------ TCP
    async def _bind_tcp(self, port: int) -> None:
        self._tcp = await asyncio.start_server(self._accept, self.config.host, port)
        self.tcp_port = self._tcp.sockets[0].getsockname()[1]

    async def _run_tcp(self) -> None:
        if self._tcp is None or not self._tcp.is_serving():
            await self._bind_tcp(self.tcp_port or self.config.port)
        assert self._tcp is not None
        await self._tcp.serve_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing or self._connections >= self.config.max_connections:
            SHED.labels("tcp").inc()
            writer.transport.abort()
            return
        self._connections += 1
        # Owned by the server (cancelled by aclose), not by asyncio's connection callback.
        task = self._handlers.spawn(self._connection(reader, writer), name="sia-connection")
        try:
            await asyncio.shield(task)
        finally:
            self._connections -= 1

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = peer[0] if isinstance(peer, tuple) else ""
        frames = codec.FrameReader()
        try:
            while True:
                async with asyncio.timeout(self.config.idle_timeout_s):
                    data = await reader.read(4096)
                if not data:
                    return
                frames.receive_data(data)
                while (item := frames.next_frame()) is not codec.NEED_DATA:
                    assert isinstance(item, codec.Frame | codec.FrameError)
                    reply = await self.receiver.answer(item, source)
                    if reply is None:
                        return  # nothing acknowledged: the panel repeats, on a new connection
                    writer.write(reply)
                    async with asyncio.timeout(self.config.write_timeout_s):
                        await writer.drain()
        except (OSError, TimeoutError) as exc:
            log.info("SIA connection from %s ended: %s", source, type(exc).__name__)
        finally:
            writer.close()

    # ------------------------------------------------------------------ UDP
    async def _bind_udp(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._udp_lost = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self), local_addr=(self.config.host,
                                                                                                    port))
        self._udp = transport
        self.udp_port = transport.get_extra_info("sockname")[1]

    async def _run_udp(self) -> None:
        if self._udp is None or self._udp.is_closing():
            await self._bind_udp(self.udp_port or self.config.port)
        assert self._udp_lost is not None
        await self._udp_lost  # until the socket is lost: then bound again

    def _datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._closing or self._datagrams >= self.config.max_datagrams_in_flight:
            SHED.labels("udp").inc()
            return
        self._datagrams += 1
        self._handlers.spawn(self._answer_datagram(data, addr), name="sia-datagram")

    async def _answer_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            try:
                item: codec.Frame | codec.FrameError = codec.parse_datagram(data)
            except codec.FrameError as exc:
                item = exc
            reply = await self.receiver.answer(item, addr[0])
            if reply is not None and self._udp is not None and not self._udp.is_closing():
                self._udp.sendto(reply, addr)
        finally:
            self._datagrams -= 1

    def _udp_closed(self, exc: Exception | None) -> None:
        if self._udp_lost is not None and not self._udp_lost.done():
            self._udp_lost.set_result(None)
        if exc is not None and not self._closing:
            log.warning("SIA UDP socket lost: %s", exc)


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, server: SiaServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server._datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("SIA UDP send error: %s", exc)  # an ICMP unreachable for a reply: the panel went away

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._udp_closed(exc)
