"""Operator HTTP surface of the service: ``/metrics`` (Prometheus) and ``/health``; serving an aiohttp app."""

from __future__ import annotations

import ssl
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from iim.core import metrics
from iim.core.lifecycle import AsyncResource

HealthProbe = Callable[[], dict[str, object]]
HEALTH_PROBES = web.AppKey("health_probes", list[HealthProbe])


async def metrics_view(_request: web.Request) -> web.Response:
    body = generate_latest(metrics.REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def health_view(request: web.Request) -> web.Response:
    """``ok``, ``degraded`` (still serving, e.g. from cache) -> 200; ``down`` -> 503."""
    rank = {"ok": 0, "degraded": 1, "down": 2}
    status = "ok"
    report: dict[str, object] = {}
    for probe in request.app[HEALTH_PROBES]:
        part = probe()
        part_status = str(part.get("status", "ok"))
        if rank.get(part_status, 2) > rank[status]:
            status = part_status if part_status in rank else "down"
        report.update({k: v for k, v in part.items() if k != "status"})
    return web.json_response({"status": status, **report}, status=503 if status == "down" else 200)


def create_app(probes: list[HealthProbe]) -> web.Application:
    app = web.Application()
    app[HEALTH_PROBES] = probes
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/health", health_view)
    return app


class HttpSite(AsyncResource):
    """One aiohttp app served on ``host:port`` from ``start`` to ``aclose`` (the HTTP surface, the device bridge).

    ``port`` is the bound port once started (``0`` asks the kernel for a free one). A start that fails
    (port taken, bad TLS context) leaves no runner or socket behind.
    """

    def __init__(self, app: web.Application, host: str, port: int, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._ssl_context = ssl_context
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._ssl_context)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
