"""Operator HTTP surface of the service: ``/metrics`` (Prometheus) and ``/health``."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from iim.core import metrics

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
