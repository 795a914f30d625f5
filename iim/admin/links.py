"""Account linking in the admin API: start a household's linking to a cloud connector, see it, unlink it.

``POST /v1/tenants/{t}/households/{id}/connectors/{name}/links`` ``{"scopes": [...]}`` answers the vendor's
authorization URL (state and PKCE challenge in it) to send the household to; the vendor sends them back to
``GET /oauth2/callback`` on IIM's HTTP site (:mod:`iim.linking.http`). ``GET`` shows the link (status, granted
scopes, expiry; never a token), ``DELETE`` unlinks it (revoked at the vendor, RFC 7009). Scopes are IIM's three
and nothing wider. Each action is audited with the caller as actor (``account_link.*``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from uuid import UUID

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from iim.admin.bodies import parse_body, parse_query
from iim.admin.problems import (
    InvalidParameter,
    MalformedRequest,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    StoreUnavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from iim.admin.resources import NoQuery
from iim.admin.routing import Access, PathParam, Route
from iim.admin.views import PRINCIPAL, REQUEST_ID, SERVICE, SETTINGS, json_response, path_uuid
from iim.connectors.contract import LinkScope
from iim.linking.service import LinkingService, LinkingUnavailable, LinkView, NoSuchLink, NotLinkable

__all__ = ["LinkRecord", "LinkStart", "LinkStarted", "link_routes"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class LinkStart(BaseModel):
    """What the household is asked to allow: some of IIM's three scopes, nothing wider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scopes: list[LinkScope] = Field(min_length=1, max_length=3,
                                    description="read_events, send_notifications, voice_interaction")


class LinkStarted(BaseModel):
    model_config = ConfigDict(extra="forbid")

    authorization_url: str = Field(description="send the household's browser here (single use, expiring)")
    expires_at: datetime
    scopes: list[LinkScope]


class LinkRecord(BaseModel):
    """A household's link to one connector (no token is ever shown)."""

    model_config = ConfigDict(extra="forbid")

    household_id: UUID
    connector: str
    status: str = Field(description="active, broken (the vendor ended the grant) or revoked (unlinked)")
    scopes: list[LinkScope]
    access_expires_at: datetime | None
    linked_at: datetime
    refreshed_at: datetime | None
    changed_at: datetime
    actor: str
    reason: str | None
    vendor_revoked: bool | None = Field(default=None, description="on unlink: the vendor confirmed revocation")

    @classmethod
    def of(cls, view: LinkView) -> LinkRecord:
        return cls(household_id=view.household_id, connector=view.connector, status=view.status,
                   scopes=sorted(view.scopes), access_expires_at=view.access_expires_at, linked_at=view.linked_at,
                   refreshed_at=view.refreshed_at, changed_at=view.changed_at, actor=view.actor, reason=view.reason,
                   vendor_revoked=view.vendor_revoked)


def _connector(request: web.Request) -> str:
    name = request.match_info["name"]
    if not _NAME.fullmatch(name):
        raise NotFound("no connector of that name takes account links")
    return name


@asynccontextmanager
async def _mapped() -> AsyncIterator[None]:
    try:
        yield
    except NotLinkable as exc:
        raise NotFound("no connector of that name takes account links") from exc
    except NoSuchLink as exc:
        raise NotFound(str(exc)) from exc
    except LinkingUnavailable as exc:
        raise StoreUnavailable("account links cannot be reached now; retry later") from exc


def link_routes(linking: Callable[[], LinkingService | None]) -> list[Route]:
    """The routes, served by ``linking()`` (``None``: linking is not running in this process yet, a 503)."""

    def service() -> LinkingService:
        found = linking()
        if found is None:
            raise ServiceUnavailable("account linking is not running in this process")
        return found

    async def tenant_household(request: web.Request) -> tuple[UUID, UUID]:
        tenant_id, household_id = path_uuid(request, "tenant_id"), path_uuid(request, "id")
        async with request.config_dict[SERVICE].in_tenant(tenant_id, write=False):
            pass  # 404 for a tenant that does not exist
        return tenant_id, household_id

    async def start(request: web.Request) -> web.Response:
        parse_query(request, NoQuery)
        body = await parse_body(request, LinkStart, request.config_dict[SETTINGS].max_body_bytes)
        tenant_id, household_id = await tenant_household(request)
        async with _mapped():
            started = await service().start(
                tenant_id, household_id, _connector(request), body.scopes, actor=request[PRINCIPAL].actor,
                correlation={"channel": "admin-api", "request_id": request[REQUEST_ID]})
        return json_response(LinkStarted(authorization_url=started.authorization_url, expires_at=started.expires_at,
                                         scopes=sorted(started.scopes)), status=201)

    async def show(request: web.Request) -> web.Response:
        parse_query(request, NoQuery)
        tenant_id, household_id = await tenant_household(request)
        async with _mapped():
            view = await service().status(tenant_id, household_id, _connector(request))
        return json_response(LinkRecord.of(view))

    async def revoke(request: web.Request) -> web.Response:
        parse_query(request, NoQuery)
        tenant_id, household_id = await tenant_household(request)
        async with _mapped():
            view = await service().revoke(tenant_id, household_id, _connector(request),
                                          actor=request[PRINCIPAL].actor,
                                          correlation={"channel": "admin-api", "request_id": request[REQUEST_ID]})
        return json_response(LinkRecord.of(view))

    tenant = PathParam("tenant_id", "the tenant's id")
    one = PathParam("id", "the household's id")
    name = PathParam("name", "the connector's configured name", format="connector-name")
    path = "/tenants/{tenant_id}/households/{id}/connectors/{name}/links"
    params = (tenant, one, name)
    return [
        Route("POST", path, start, "startAccountLink",
              "Start linking the household's vendor account (OAuth2 authorization code + PKCE): the URL to send "
              "the household to", "account-links", Access.WRITE, path_params=params, query_model=NoQuery,
              request_model=LinkStart, response_model=LinkStarted, response_status=201,
              response_description="Started",
              errors=(NotFound, ServiceUnavailable, StoreUnavailable, MalformedRequest, PayloadTooLarge,
                      UnsupportedMediaType, ValidationFailed, InvalidParameter), household_scoped=True),
        Route("GET", path, show, "getAccountLink", "The household's link to this connector (no tokens)",
              "account-links", Access.READ, path_params=params, query_model=NoQuery, response_model=LinkRecord,
              errors=(NotFound, ServiceUnavailable, StoreUnavailable, InvalidParameter), household_scoped=True),
        Route("DELETE", path, revoke, "revokeAccountLink",
              "Unlink: the tokens are revoked at the vendor (RFC 7009) and forgotten", "account-links",
              Access.WRITE, path_params=params, query_model=NoQuery, response_model=LinkRecord,
              errors=(NotFound, ServiceUnavailable, StoreUnavailable, InvalidParameter), household_scoped=True),
    ]
