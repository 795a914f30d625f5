"""The route description shared by the app factory (which registers it) and the OpenAPI generator.

One :class:`Route` says everything about an operation: method and path, handler, who may call it,
the models of its query, body and response, and the problems it can answer. The app and the
OpenAPI document are both built from the same tuple of routes, so they cannot drift apart.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from uuid import UUID

from aiohttp import web
from pydantic import BaseModel

from iim.admin.problems import ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Where a household lies: its ``(brand, region)``.
Scope = tuple[UUID | None, UUID | None]
#: Where the household(s) a request is about lie, for a grant scoped to a brand or region (``iim.admin.scopes``;
#: a change moving a row to another household names both); ``None`` or empty: the request names no household it
#: may be judged by (unknown, none, malformed): no scoped grant may make it.
ScopeResolver = Callable[[web.Request, UUID], Awaitable[list[Scope] | None]]


class Access(enum.Enum):
    """Who may call a route (checked by the handler against the path's tenant)."""

    PUBLIC = "public"  # no token: the OpenAPI document
    READ = "read"  # any valid token that can read the path's tenant
    WRITE = "write"  # admin, or the operator of the path's tenant
    ADMIN = "admin"  # admin only (tenant lifecycle)


@dataclass(frozen=True, slots=True)
class PathParam:
    name: str
    description: str
    format: str = "uuid"


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # relative to the API prefix, e.g. "/tenants/{tenant_id}/households"
    handler: Handler
    operation_id: str
    summary: str
    tag: str
    access: Access
    path_params: tuple[PathParam, ...] = ()
    query_model: type[BaseModel] | None = None
    request_model: type[BaseModel] | None = None
    response_model: type[BaseModel] | None = None
    response_status: int = 200
    response_description: str = "OK"
    errors: tuple[type[ApiError], ...] = field(default_factory=tuple)
    #: The path's ``{id}`` is a household: a grant scoped to a brand/region may call it for its households.
    household_scoped: bool = False
    #: Another way to find the request's household (a query filter, an incident's household): a grant scoped to
    #: a brand/region may call the route when that household is in its scope.
    scope: ScopeResolver | None = None
    #: a token that may not read the path's tenant gets 404 (no such row), not 403: for rows named by id
    foreign_tenant_not_found: bool = False
