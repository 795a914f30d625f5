"""Request handlers: validate the input, call :class:`~iim.admin.service.RegistryService`, shape the response.

Authentication and the role/tenant check happen before a handler runs (``iim.admin.api``); errors are
raised as :class:`~iim.admin.problems.ApiError` and rendered as problem+json by the middleware.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID, uuid4

from aiohttp import web
from pydantic import BaseModel

from iim.admin.auth import Principal
from iim.admin.bodies import parse_body, parse_query
from iim.admin.problems import MalformedRequest, NotFound
from iim.admin.resources import ListQuery, NoQuery, Resource, page_model
from iim.admin.routing import Handler
from iim.admin.service import AuditQuery, HeadsToVerify, RegistryService
from iim.admin.settings import AdminSettings
from policy_cache.models import Tenant, TenantCreate, TenantUpdate

SERVICE = web.AppKey("admin_registry_service", RegistryService)
SETTINGS = web.AppKey("admin_settings", AdminSettings)
OPENAPI = web.AppKey("admin_openapi_json", bytes)
PRINCIPAL = web.RequestKey("admin_principal", Principal)
REQUEST_ID = web.RequestKey("admin_request_id", str)

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")


def request_id(request: web.Request) -> str:
    """The caller's ``X-Request-ID`` when it is sane, else a fresh one (echoed on the response)."""
    given = request.headers.get("X-Request-ID", "")
    return given if _REQUEST_ID_RE.match(given) else uuid4().hex


def _correlation(request: web.Request) -> dict[str, str]:
    return {"channel": "admin-api", "request_id": request[REQUEST_ID]}


def path_uuid(request: web.Request, name: str) -> UUID:
    """A path id; a malformed one names no row, so it is a 404 like any unknown id."""
    raw = request.match_info[name]
    try:
        return UUID(raw)
    except ValueError as exc:
        raise NotFound(f"{name} {raw[:80]!r} is not a UUID: no such row") from exc


def json_response(value: BaseModel | dict[str, Any], *, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    return web.Response(
        body=json.dumps(data, ensure_ascii=False).encode(), status=status, content_type="application/json",
        headers=headers,
    )


def _page(items: Sequence[BaseModel], query: ListQuery, item: type[BaseModel]) -> BaseModel:
    rows = list(items)
    next_after = getattr(rows[-1], "id", None) if len(rows) >= query.limit else None
    return page_model(item).model_validate({"items": rows, "next_after": next_after}, from_attributes=False)


def _limit(settings: AdminSettings, query: ListQuery) -> ListQuery:
    if query.limit > settings.max_page_size:
        return query.model_copy(update={"limit": settings.max_page_size})
    return query


# -- OpenAPI ----------------------------------------------------------------------------------------------

async def openapi_view(request: web.Request) -> web.Response:
    return web.Response(body=request.config_dict[OPENAPI], content_type="application/json")


# -- tenants ----------------------------------------------------------------------------------------------

async def list_tenants(request: web.Request) -> web.Response:
    service, settings = request.config_dict[SERVICE], request.config_dict[SETTINGS]
    principal = request[PRINCIPAL]
    visible = principal.visible_tenants()
    query = _limit(settings, parse_query(request, ListQuery))
    if visible is None:
        rows = await service.list_all_tenants(query)
    else:  # the tenants it may read as a whole, in id order (a caller holds at most a few dozen grants)
        rows = []
        for tenant_id in sorted(t for t in visible if principal.can_read(t)):
            if len(rows) >= query.limit:
                break
            rows.extend(await service.list_own_tenant(tenant_id, query))
    return json_response(_page(rows, query, Tenant))


async def create_tenant(request: web.Request) -> web.Response:
    service, settings = request.config_dict[SERVICE], request.config_dict[SETTINGS]
    data = await parse_body(request, TenantCreate, settings.max_body_bytes)
    row = await service.create_tenant(data, request[PRINCIPAL].actor, _correlation(request))
    return json_response(row, status=201, headers={"Location": f"{settings.prefix}/tenants/{row.id}"})


async def get_tenant(request: web.Request) -> web.Response:
    service = request.config_dict[SERVICE]
    parse_query(request, NoQuery)
    return json_response(await service.get_tenant(path_uuid(request, "tenant_id")))


async def update_tenant(request: web.Request) -> web.Response:
    service, settings = request.config_dict[SERVICE], request.config_dict[SETTINGS]
    tenant_id = path_uuid(request, "tenant_id")
    data = await parse_body(request, TenantUpdate, settings.max_body_bytes)
    row = await service.update_tenant(tenant_id, data, request[PRINCIPAL].actor, _correlation(request))
    return json_response(row)


async def delete_tenant(request: web.Request) -> web.Response:
    service = request.config_dict[SERVICE]
    await service.delete_tenant(path_uuid(request, "tenant_id"), request[PRINCIPAL].actor, _correlation(request))
    return web.Response(status=204)


# -- audit ------------------------------------------------------------------------------------------------

async def list_audit(request: web.Request) -> web.Response:
    service = request.config_dict[SERVICE]
    query = parse_query(request, AuditQuery)
    return json_response(await service.audit_entries(path_uuid(request, "tenant_id"), query))


async def verify_audit(request: web.Request) -> web.Response:
    service = request.config_dict[SERVICE]
    parse_query(request, NoQuery)
    return json_response(await service.verify_audit(path_uuid(request, "tenant_id")))


async def verify_audit_heads(request: web.Request) -> web.Response:
    """The chain recomputed, and each head published earlier checked to be still on it."""
    service, settings = request.config_dict[SERVICE], request.config_dict[SETTINGS]
    body = await parse_body(request, HeadsToVerify, settings.max_body_bytes)
    return json_response(await service.verify_audit(path_uuid(request, "tenant_id"), body.heads))


def audit_heads_view(latest: Callable[[UUID | None], list[dict[str, Any]]]) -> Handler:
    """``GET /v1/audit/head``: the signed chain heads this process published last (a tenant-bound token sees
    its tenant's only). A bare handler: the service mounts it when it signs heads."""

    async def handler(request: web.Request) -> web.Response:
        principal = request[PRINCIPAL]
        visible = principal.visible_tenants()
        if visible is None:
            return json_response({"heads": latest(None)})
        heads = [h for t in sorted(visible) if principal.can_read(t) for h in latest(t)]
        return json_response({"heads": heads})

    return handler


# -- privacy ----------------------------------------------------------------------------------------------

async def erase_subscriber(request: web.Request) -> web.Response:
    """Right to erasure: the subscriber's personal content removed, the audit chain still verifiable."""
    service = request.config_dict[SERVICE]
    parse_query(request, NoQuery)
    if (request.content_length or 0) > 0 or request.headers.get("Transfer-Encoding"):
        raise MalformedRequest("erase takes no request body")
    report = await service.erase_subscriber(path_uuid(request, "tenant_id"), path_uuid(request, "id"),
                                            request[PRINCIPAL].actor, _correlation(request))
    return json_response(report)


# -- tenant-scoped resources ------------------------------------------------------------------------------

def list_view(res: Resource) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        service, settings = request.config_dict[SERVICE], request.config_dict[SETTINGS]
        query = _limit(settings, parse_query(request, res.list_query))
        rows = await service.list(res, path_uuid(request, "tenant_id"), query, request[PRINCIPAL].actor,
                                  _correlation(request))
        return json_response(_page(rows, query, res.read_model))

    return handler


def create_view(res: Resource) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        service, settings = request.config_dict[SERVICE], request.config_dict[SETTINGS]
        tenant_id = path_uuid(request, "tenant_id")
        data = await parse_body(request, res.create_model, settings.max_body_bytes)
        row = await service.create(res, tenant_id, data, request[PRINCIPAL].actor, _correlation(request))
        location = f"{settings.prefix}/tenants/{tenant_id}/{res.plural}/{getattr(row, 'id', '')}"
        return json_response(row, status=201, headers={"Location": location})

    return handler


def get_view(res: Resource) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        service = request.config_dict[SERVICE]
        parse_query(request, NoQuery)
        row = await service.get(res, path_uuid(request, "tenant_id"), path_uuid(request, "id"),
                                request[PRINCIPAL].actor, _correlation(request))
        return json_response(row)

    return handler


def update_view(res: Resource) -> Handler:
    assert res.update_model is not None
    update_model = res.update_model

    async def handler(request: web.Request) -> web.Response:
        service, settings = request.config_dict[SERVICE], request.config_dict[SETTINGS]
        tenant_id, row_id = path_uuid(request, "tenant_id"), path_uuid(request, "id")
        query = parse_query(request, res.update_query)
        data = await parse_body(request, update_model, settings.max_body_bytes)
        row = await service.update(res, tenant_id, row_id, data, query, request[PRINCIPAL].actor,
                                   _correlation(request))
        return json_response(row)

    return handler


def delete_view(res: Resource) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        service = request.config_dict[SERVICE]
        parse_query(request, NoQuery)
        await service.delete(res, path_uuid(request, "tenant_id"), path_uuid(request, "id"),
                             request[PRINCIPAL].actor, _correlation(request))
        return web.Response(status=204)

    return handler


def revoke_view(res: Resource) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        service = request.config_dict[SERVICE]
        parse_query(request, NoQuery)
        if (request.content_length or 0) > 0 or request.headers.get("Transfer-Encoding"):
            raise MalformedRequest("revoke takes no request body")
        row = await service.revoke(res, path_uuid(request, "tenant_id"), path_uuid(request, "id"),
                                   request[PRINCIPAL].actor, _correlation(request))
        return json_response(row)

    return handler
