"""A server span per HTTP request, joined to the caller's trace by its W3C ``traceparent`` header.

Named after the route's template (``POST /v1/events``, ``GET /v1/tenants/{tenant_id}``), never the raw path:
a path holds ids, and span names must stay few. Outermost middleware: the answer's status is the one sent,
after the app's own error mapping.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from opentelemetry.trace import StatusCode

from iim.core import tracing

__all__ = ["traced_requests"]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def traced_requests(prefix: str = "") -> Middleware:
    """The middleware; ``prefix`` is prepended to the route (a sub-app's mount point)."""

    @web.middleware
    async def middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
        route = prefix + _route(request)
        with tracing.span(f"{request.method} {route}", parent=request.headers.get(tracing.HEADER),
                          kind=tracing.SpanKind.SERVER,
                          attributes={"http.request.method": request.method, "http.route": route}) as current:
            response = await handler(request)
            if current.is_recording():
                current.set_attribute("http.response.status_code", response.status)
                current.set_attributes(tracing.attrs(tenant=request.match_info.get("tenant_id"),
                                                     request_id=response.headers.get("X-Request-ID")))
                if response.status >= 500:
                    current.set_status(StatusCode.ERROR)
            return response

    return middleware
