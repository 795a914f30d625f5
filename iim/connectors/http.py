"""HTTP surface of the connectors: the health listing (admin API) and the vendors' answer callbacks.

Two separate pieces because they sit behind different authentication: ``GET /v1/connectors`` is for
operators (a route of the admin API, at ``/connectors`` under its ``/v1`` prefix, behind its bearer
tokens), while the callback route is called by vendor clouds and authenticated by their Standard Webhooks
signature (mount the sub-app outside the admin API's auth middleware)::

    Route("GET", "/connectors", connector_list_view(registry), ...)   # one of the admin API's routes
    public_app.add_subapp(CALLBACK_PREFIX, connector_callback_app(registry))
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from iim.connectors.contract import (
    ActionCallbackReceiver,
    CallbackRejected,
    ConnectorUnavailable,
    PresenceReceiver,
    PresenceReport,
    PresenceUnavailable,
)
from iim.connectors.registry import ConnectorRegistry

__all__ = ["CALLBACK_PREFIX", "PRESENCE_KEY", "REGISTRY_KEY", "PresenceSink", "connector_callback_app",
           "connector_list_view"]

log = logging.getLogger(__name__)

#: Where :func:`connector_callback_app` is mounted: callbacks are ``POST {prefix}/{name}/actions/{request_id}``.
CALLBACK_PREFIX = "/v1/connectors"
REGISTRY_KEY = web.AppKey("connector_registry", ConnectorRegistry)
#: Where a connector's presence report goes: ``sink(connector name, report)`` -> True when it was applied, False
#: when its target names no household; raises :class:`PresenceUnavailable` when it cannot be taken now.
PresenceSink = Callable[[str, PresenceReport], Awaitable[bool]]
PRESENCE_KEY: web.AppKey[PresenceSink] = web.AppKey("connector_presence_sink")
_PROBLEM = "application/problem+json"
_MAX_CALLBACK_BODY = 64 * 1024


def _problem(request: web.Request, status: int, error_id: str, detail: str) -> web.Response:
    body: dict[str, Any] = {"type": f"urn:iim:problem:{error_id}", "title": error_id.replace("-", " "),
                            "status": status, "detail": detail, "instance": request.path, "error_id": error_id}
    return web.Response(text=json.dumps(body), status=status, content_type=_PROBLEM)


def connector_list_view(registry: ConnectorRegistry) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of ``GET /v1/connectors``: every configured connector with its capabilities and health.

    A bare handler, not a route: where it is mounted decides its path and who may call it (the admin API).
    """

    async def list_connectors(request: web.Request) -> web.Response:
        statuses = [status.as_json() for status in registry.statuses()]
        return web.json_response({"connectors": statuses}, headers={"Cache-Control": "no-store"})

    return list_connectors


async def _action_callback(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    name = request.match_info["name"]
    request_id = request.match_info["request_id"]
    try:
        connector = registry.get(name)
    except KeyError:
        return _problem(request, 404, "no-such-connector", "no connector of that name")
    except ConnectorUnavailable:
        return _problem(request, 503, "connector-unavailable", "the connector is not loaded")
    if not isinstance(connector, ActionCallbackReceiver):
        return _problem(request, 404, "no-callbacks", "this connector takes no action callbacks")
    if request.content_length is not None and request.content_length > _MAX_CALLBACK_BODY:
        return _problem(request, 413, "body-too-large", "the callback body is over the size limit")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _problem(request, 413, "body-too-large", "the callback body is over the size limit")
    try:
        connector.accept_action_callback(request_id, request.headers, body)
    except CallbackRejected as exc:
        log.warning("action callback refused: %s", exc.reason,
                    extra={"connector": name, "error_id": exc.error_id, "source": request.remote})
        return _problem(request, exc.status, exc.error_id, exc.reason)
    return web.Response(status=204)


def connector_callback_app(registry: ConnectorRegistry, presence: PresenceSink | None = None) -> web.Application:
    """Sub-app taking vendors' answers: ``POST /{name}/actions/{request_id}``, mounted at :data:`CALLBACK_PREFIX`;
    with ``presence``, also their home/away reports: ``POST /{name}/presence``.

    The vendor signs with Standard Webhooks (``webhook-id``/``-timestamp``/``-signature``), using the
    connector's signing secret: 204 applied, 401 bad signature, 404 unknown or expired request, 409 already
    answered, 422 not one of the offered options.
    """
    app = web.Application(client_max_size=_MAX_CALLBACK_BODY)
    app[REGISTRY_KEY] = registry
    app.router.add_post("/{name}/actions/{request_id}", _action_callback)
    if presence is not None:
        app[PRESENCE_KEY] = presence
        app.router.add_post("/{name}/presence", _presence_report)
    return app


async def _presence_report(request: web.Request) -> web.Response:
    """A vendor's home/away (``POST {prefix}/{name}/presence``): 204 taken, 401 bad signature, 404 no such
    connector, presence reports off for it or a target no household has, 422 bad body, 503 try again later."""
    name = request.match_info["name"]
    try:
        connector = request.app[REGISTRY_KEY].get(name)
    except KeyError:
        return _problem(request, 404, "no-such-connector", "no connector of that name")
    except ConnectorUnavailable:
        return _problem(request, 503, "connector-unavailable", "the connector is not loaded")
    if not isinstance(connector, PresenceReceiver):
        return _problem(request, 404, "presence-disabled", "this connector takes no presence reports")
    if request.content_length is not None and request.content_length > _MAX_CALLBACK_BODY:
        return _problem(request, 413, "body-too-large", "the report body is over the size limit")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _problem(request, 413, "body-too-large", "the report body is over the size limit")
    try:
        report = connector.accept_presence_callback(request.headers, body)
    except CallbackRejected as exc:
        log.warning("presence report refused: %s", exc.reason,
                    extra={"connector": name, "error_id": exc.error_id, "source": request.remote})
        return _problem(request, exc.status, exc.error_id, exc.reason)
    try:
        applied = await request.app[PRESENCE_KEY](name, report)
    except PresenceUnavailable:
        response = _problem(request, 503, "presence-unavailable", "presence cannot be stored now; retry later")
        response.headers["Retry-After"] = "5"
        return response
    if not applied:
        return _problem(request, 404, "no-such-target", "no household has a device with that target at this connector")
    return web.Response(status=204)
