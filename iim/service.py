"""The running IIM process: outbound ESL server, inbound FreeSWITCH clients, HTTP surface."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from fs_app.inbound import InboundClient, InboundSettings
from fs_app.outbound import OutboundServer, OutboundSettings
from fs_app.passthrough import make_passthrough_handler
from iim.http import HealthProbe, create_app
from iim.settings import Settings

log = logging.getLogger("iim.service")


class Service:
    """Owns every long-lived resource; ``start`` brings them up, ``stop`` drains them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        handler = make_passthrough_handler(settings.passthrough_endpoint)
        self.outbound = OutboundServer(
            handler,
            OutboundSettings(host=settings.esl_host, port=settings.esl_port, linger=settings.esl_linger),
            fallback=handler,
        )
        self.inbound = [
            InboundClient(InboundSettings(host=n.host, port=n.port, password=n.password(), name=n.name))
            for n in settings.fs_nodes
        ]
        self._runner: web.AppRunner | None = None
        self.http_port: int | None = None

    def _esl_health(self) -> dict[str, object]:
        nodes = {c.settings.node: c.connected for c in self.inbound}
        status = "ok" if all(nodes.values()) else "degraded"
        return {"status": status, "active_calls": self.outbound.active_calls, "freeswitch_nodes": nodes}

    async def start(self) -> None:
        await self.outbound.start()
        for client in self.inbound:
            await client.start()
        probes: list[HealthProbe] = [self._esl_health]
        self._runner = web.AppRunner(create_app(probes), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.http_host, self.settings.http_port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.http_port = sockets[0].getsockname()[1] if sockets else self.settings.http_port
        log.info(
            "IIM serving",
            extra={"esl": f"{self.settings.esl_host}:{self.outbound.port}",
                   "http": f"{self.settings.http_host}:{self.http_port}"},
        )

    async def stop(self) -> None:
        await self.outbound.close(self.settings.drain_timeout)
        for client in self.inbound:
            await client.close()
        if self._runner is not None:
            await self._runner.cleanup()


async def run(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM, then drain calls and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    service = Service(settings)
    await service.start()
    await stop.wait()
    log.info("stopping: draining calls")
    await service.stop()
