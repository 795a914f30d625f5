"""Operator HTTP surface of the service: ``/metrics`` (Prometheus), ``/health``, ``/readyz``, ``/livez``; serving an
aiohttp app."""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from iim.core import metrics
from iim.core.health import DependencyState, Readiness, overall
from iim.core.lifecycle import AsyncResource

log = logging.getLogger(__name__)

HealthProbe = Callable[[], dict[str, object]]
HEALTH_PROBES = web.AppKey("health_probes", list[HealthProbe])


class HealthSource(Protocol):
    """What ``/health``, ``/readyz`` and ``/livez`` read (:class:`iim.health.HealthMonitor`)."""

    def dependencies(self) -> list[DependencyState]: ...

    def readiness(self) -> Readiness: ...

    def liveness(self) -> str | None: ...


HEALTH_SOURCE = web.AppKey("health_source", HealthSource)
#: How long a load balancer should wait before asking ``/readyz`` again after a 503.
READY_RETRY_AFTER_S = 5


async def metrics_view(_request: web.Request) -> web.Response:
    body = generate_latest(metrics.REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def health_view(request: web.Request) -> web.Response:
    """``ok``, ``degraded`` (still serving, e.g. from cache) -> 200; ``down`` -> 503. ``dependencies``: each
    dependency's ``ok|degraded|down`` with ``since`` (when it entered that state) and why."""
    rank = {"ok": 0, "degraded": 1, "down": 2}
    status = "ok"
    report: dict[str, object] = {}
    for probe in request.app[HEALTH_PROBES]:
        part = probe()
        part_status = str(part.get("status", "ok"))
        if rank.get(part_status, 2) > rank[status]:
            status = part_status if part_status in rank else "down"
        report.update({k: v for k, v in part.items() if k != "status"})
    source = request.app.get(HEALTH_SOURCE)
    if source is not None:
        states = source.dependencies()
        deps_status = overall(dep.observation.status for dep in states)
        if rank[deps_status] > rank[status]:
            status = deps_status
        report["dependencies"] = {dep.observation.name: dep.as_json() for dep in states}
    return web.json_response({"status": status, **report}, status=503 if status == "down" else 200,
                             headers={"Cache-Control": "no-store"})


async def readyz_view(request: web.Request) -> web.Response:
    """200 when IIM should get traffic, else 503 with the reasons and ``Retry-After``."""
    source = request.app.get(HEALTH_SOURCE)
    verdict = source.readiness() if source is not None else Readiness(True, ())
    if verdict.ready:
        return web.json_response({"status": "ready"}, headers={"Cache-Control": "no-store"})
    return web.json_response({"status": "not_ready", "reasons": list(verdict.reasons)}, status=503,
                             headers={"Cache-Control": "no-store", "Retry-After": str(READY_RETRY_AFTER_S)})


async def livez_view(request: web.Request) -> web.Response:
    """200 while the process runs and its event loop keeps time; 503 (restart me) when the loop stalled."""
    source = request.app.get(HEALTH_SOURCE)
    stalled = source.liveness() if source is not None else None
    if stalled is None:
        return web.json_response({"status": "alive"}, headers={"Cache-Control": "no-store"})
    return web.json_response({"status": "stalled", "reason": stalled}, status=503,
                             headers={"Cache-Control": "no-store"})


def create_app(probes: list[HealthProbe], *, health: HealthSource | None = None) -> web.Application:
    app = web.Application()
    app[HEALTH_PROBES] = probes
    if health is not None:
        app[HEALTH_SOURCE] = health
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/health", health_view)
    app.router.add_get("/readyz", readyz_view)
    app.router.add_get("/livez", livez_view)
    return app


class _ProblemRequestHandler(RequestHandler):
    """aiohttp answers what never reaches an app (a request it cannot parse: a line or header over 8 KiB, a bad
    header token, a bad method) in text/plain, quoting the offending input, and logs a traceback for each.
    Here those answers are problem+json like every other error of ours, with aiohttp's status and without a
    byte of the input (which may be a secret, markup, or just large), logged in one line."""

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        log.info("request from %s refused before routing: %d %s", request.remote, status,
                 type(exc).__name__ if exc is not None else "")
        if request.writer.output_size > 0:  # some of a response is out already: the connection is broken
            raise ConnectionError("response already started; cannot send the error")
        status = status if 400 <= status <= 599 else 500
        error_id = "malformed-request" if status < 500 else "internal-error"
        detail = ("the request could not be parsed (request line or header too long or malformed)" if status < 500
                  else "internal error")
        body = {"type": f"urn:iim:problem:{error_id}", "title": HTTPStatus(status).phrase, "status": status,
                "detail": detail, "error_id": error_id}
        response = web.Response(status=status, body=json.dumps(body).encode(),
                                content_type="application/problem+json")
        response.force_close()
        return response


class _ProblemServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class ProblemAppRunner(web.AppRunner):
    """An ``AppRunner`` whose connections answer their parse errors with :class:`_ProblemRequestHandler`.

    aiohttp offers no hook for those answers (they bypass the app and its middlewares), so the server the
    runner makes is given one method more (``__call__``, which makes each connection's handler)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _ProblemServer
        return server


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
        self._runner: ProblemAppRunner | None = None

    async def start(self) -> None:
        self._runner = ProblemAppRunner(self.app, access_log=None)
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
