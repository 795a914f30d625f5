"""Commands to a tenant's local hubs in the admin API, sent over MQTT (:mod:`iot_bridge.mqtt.commands`).

``POST /v1/tenants/{t}/hubs/{hub}/commands`` ``{"id": "c-1", "name": "arm", "arguments": {"mode": "away"}}``
publishes the command (QoS 1, once the broker took it: 202) and audits it (``hub_command.send``, the caller as
actor); the same ``id`` again answers the first command as it stands now (``Idempotent-Replayed: true``) and
publishes nothing. ``GET .../commands/{id}`` shows it with the hub's answer (``state``); ``GET .../commands``
lists the hub's commands newest first (``?state=``, ``?limit=``, ``?after=`` the previous page's cursor). ``{hub}`` is the hub's
device id (its ``external_id``, the one in its certificate and topics). An unknown hub, and another tenant's,
is the same 404 (for a grant scoped to a brand or region, so is a hub of a household outside its scope); the broker not connected is a 503 ``broker-unavailable`` with ``Retry-After``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from uuid import UUID

from aiohttp import web

from iim.admin.bodies import parse_body, parse_query
from iim.admin.problems import (
    BrokerUnavailable,
    Conflict,
    InvalidParameter,
    MalformedRequest,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from iim.admin.resources import NoQuery
from iim.admin.routing import Access, PathParam, Route, Scope
from iim.admin.views import PRINCIPAL, REQUEST_ID, SERVICE, SETTINGS, json_response, path_uuid
from iot_bridge.mqtt.commands import (
    CommandConflict,
    CommandPublisher,
    HubCommandBody,
    HubCommandPage,
    HubCommandQuery,
    HubCommandRecord,
    HubDisabled,
    MqttUnavailable,
    UnknownCommand,
    UnknownHub,
    get_command,
    list_commands,
    send_command,
)
from iot_bridge.mqtt.store import find_hub

__all__ = ["hub_command_routes"]

#: Seconds a client should wait before retrying a command the broker did not take.
RETRY_AFTER_S = 5


@asynccontextmanager
async def _mapped() -> AsyncIterator[None]:
    try:
        yield
    except (UnknownHub, UnknownCommand) as exc:
        raise NotFound("no such row") from exc  # what the guard answers for another tenant's hub, word for word
    except HubDisabled as exc:
        raise Conflict("the hub is disabled in the registry: it gets no commands") from exc
    except CommandConflict as exc:
        raise Conflict(str(exc)) from exc
    except MqttUnavailable as exc:
        raise BrokerUnavailable(f"{exc}; nothing was sent, retry with the same id",
                                retry_after_s=RETRY_AFTER_S) from exc


async def hub_in_path(request: web.Request, tenant_id: UUID) -> list[Scope] | None:
    """The household of the hub ``{hub}`` (a device of type hub), for grants scoped to a brand or region."""
    service = request.config_dict[SERVICE]
    async with service.in_tenant(tenant_id, write=False) as conn:
        device = await find_hub(conn, request.match_info["hub"])
    if device is None:
        return None
    found = await service.household_scope(tenant_id, device["household_id"])
    return None if found is None else [found]


def hub_command_routes(publisher: Callable[[], CommandPublisher | None]) -> list[Route]:
    """The routes; ``publisher()`` is the running MQTT ingress (None: MQTT off or not started, a 503)."""

    async def send(request: web.Request) -> web.Response:
        parse_query(request, NoQuery)
        body = await parse_body(request, HubCommandBody, request.config_dict[SETTINGS].max_body_bytes)
        tenant_id, hub = path_uuid(request, "tenant_id"), request.match_info["hub"]
        correlation = {"channel": "admin-api", "request_id": request[REQUEST_ID]}
        async with _mapped(), request.config_dict[SERVICE].in_tenant(tenant_id, write=True) as conn:
            record, replayed = await send_command(conn, publisher(), tenant_id, hub, body,
                                                  actor=request[PRINCIPAL].actor, correlation=correlation)
        return json_response(record, status=202, headers={"Idempotent-Replayed": "true"} if replayed else None)

    async def show(request: web.Request) -> web.Response:
        parse_query(request, NoQuery)
        tenant_id, hub = path_uuid(request, "tenant_id"), request.match_info["hub"]
        async with _mapped(), request.config_dict[SERVICE].in_tenant(tenant_id, write=False) as conn:
            record = await get_command(conn, hub, request.match_info["command_id"])
        return json_response(record)

    async def list_(request: web.Request) -> web.Response:
        query = parse_query(request, HubCommandQuery)
        limit = min(query.limit, request.config_dict[SETTINGS].max_page_size)
        tenant_id, hub = path_uuid(request, "tenant_id"), request.match_info["hub"]
        async with _mapped(), request.config_dict[SERVICE].in_tenant(tenant_id, write=False) as conn:
            page = await list_commands(conn, hub, query, limit)
        return json_response(page)

    tenant = PathParam("tenant_id", "the tenant's id")
    hub = PathParam("hub", "the hub's device id (its external_id)", format="device-id")
    command = PathParam("command_id", "the client's id for the command", format="command-id")
    base = "/tenants/{tenant_id}/hubs/{hub}/commands"
    return [
        Route("POST", base, send, "sendHubCommand",
              "Send a command to a local hub over MQTT (QoS 1; idempotent by id; audited)", "hubs", Access.WRITE,
              path_params=(tenant, hub), query_model=NoQuery, request_model=HubCommandBody,
              response_model=HubCommandRecord, response_status=202,
              response_description="Published (the broker took it), or the first command of this id",
              errors=(NotFound, Conflict, BrokerUnavailable, StoreUnavailable, MalformedRequest, PayloadTooLarge,
                      UnsupportedMediaType, ValidationFailed, InvalidParameter),
              foreign_tenant_not_found=True, scope=hub_in_path),
        Route("GET", base, list_, "listHubCommands",
              "The commands sent to a hub, newest first, with the hub's answers (paginated; by state)", "hubs",
              Access.READ, path_params=(tenant, hub), query_model=HubCommandQuery, response_model=HubCommandPage,
              errors=(NotFound, StoreUnavailable, InvalidParameter), foreign_tenant_not_found=True,
              scope=hub_in_path),
        Route("GET", base + "/{command_id}", show, "getHubCommand",
              "A command sent to a hub and the hub's answer", "hubs", Access.READ, path_params=(tenant, hub, command),
              query_model=NoQuery, response_model=HubCommandRecord,
              errors=(NotFound, StoreUnavailable, InvalidParameter), foreign_tenant_not_found=True, scope=hub_in_path),
    ]
