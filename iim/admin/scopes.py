"""Where a request's household lies (its brand and region), for grants scoped to a brand or a region.

A scoped grant reaches only the households of its brand/region, never the tenant as a whole. A route it may
call says how to find the household(s) the request is about (:attr:`~iim.admin.routing.Route.scope`): the
path's ``{id}`` (a household, or a row that belongs to one: device, binding, policy, scenario, SIA account),
a ``household_id``/``device_id`` filter or body field, or ``brand_id``/``region_id`` filters that pin every row
of a list to one brand/region. A request that names no household (no filter, a repeated or malformed one, a
body that is not a JSON object, an unknown row, a tenant-wide scenario) resolves to no scope: every scoped grant
gets the same refusal, so it learns nothing about rows outside its scope.
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from aiohttp import web

from iim.admin.bodies import JSON_TYPES, loads_strict, read_body
from iim.admin.problems import ApiError
from iim.admin.resources import AnySpec
from iim.admin.routing import Scope, ScopeResolver
from iim.admin.views import SERVICE, SETTINGS
from policy_cache import registry

__all__ = ["body_rows", "brand_region_in_body", "brand_region_in_query", "household_change", "household_in_path", "household_in_query", "row_in_path",
           "rows_in_query", "uuid_in_path"]


def _query_uuid(request: web.Request, name: str) -> tuple[bool, UUID | None]:
    """(usable, value): absent is usable (None); repeated or malformed is not."""
    values = request.query.getall(name, [])
    if not values:
        return True, None
    if len(values) > 1:
        return False, None
    try:
        return True, UUID(values[0])
    except ValueError:
        return False, None


def uuid_in_path(request: web.Request, name: str) -> UUID | None:
    """A path id, or None when malformed (a scoped grant then gets its refusal, not a 404 of its own)."""
    try:
        return UUID(request.match_info[name])
    except ValueError:
        return None


async def _scopes(request: web.Request, tenant_id: UUID,
                  rows: Sequence[tuple[AnySpec, UUID]] | None) -> list[Scope] | None:
    if not rows:
        return None
    return await request.config_dict[SERVICE].rows_scope(tenant_id, rows)


async def household_in_path(request: web.Request, tenant_id: UUID) -> list[Scope] | None:
    """``/households/{id}``: that household's brand and region (an unknown one is in no scope)."""
    found = uuid_in_path(request, "id")
    return await _scopes(request, tenant_id, None if found is None else [(registry.HOUSEHOLD, found)])


async def household_in_query(request: web.Request, tenant_id: UUID) -> list[Scope] | None:
    """A list filtered by ``?household_id=``: every row is that household's."""
    usable, household = _query_uuid(request, "household_id")
    if not usable or household is None:
        return None
    return await _scopes(request, tenant_id, [(registry.HOUSEHOLD, household)])


def rows_in_query(name: str, spec: AnySpec) -> ScopeResolver:
    """A list filtered by ``?<name>=`` naming a row of ``spec`` (``?device_id=``): every row is its household's."""

    async def resolve(request: web.Request, tenant_id: UUID) -> list[Scope] | None:
        usable, found = _query_uuid(request, name)
        if not usable or found is None:
            return None
        return await _scopes(request, tenant_id, [(spec, found)])

    return resolve


async def brand_region_in_query(request: web.Request, tenant_id: UUID) -> list[Scope] | None:
    """A household list filtered by ``?brand_id=`` and/or ``?region_id=``: every row is of that brand/region."""
    brand_ok, brand = _query_uuid(request, "brand_id")
    region_ok, region = _query_uuid(request, "region_id")
    if not (brand_ok and region_ok) or (brand is None and region is None):
        return None
    return [(brand, region)]


async def _body(request: web.Request) -> dict[str, object] | None:
    """The JSON object of the body, read here before the handler and kept on the request for it
    (:func:`~iim.admin.bodies.read_body`); None when it is not a JSON object of the size allowed."""
    if request.content_type not in JSON_TYPES:
        return None
    try:
        payload = loads_strict(await read_body(request, request.config_dict[SETTINGS].max_body_bytes))
    except ApiError:
        return None
    return payload if isinstance(payload, dict) else None


async def _body_refs(request: web.Request, fields: dict[str, AnySpec],
                     optional: frozenset[str] = frozenset()) -> list[tuple[AnySpec, UUID]] | None:
    """The rows the JSON body names in ``fields`` (present ones; ``[]``: none); None when the body is not a JSON
    object, or one of those fields is present but not a UUID (null: a tenant-wide row, unless ``optional``)."""
    payload = await _body(request)
    if payload is None:
        return None
    refs: list[tuple[AnySpec, UUID]] = []
    for field, spec in fields.items():
        value = payload.get(field)
        if field not in payload or (value is None and field in optional):
            continue
        if not isinstance(value, str):
            return None
        try:
            refs.append((spec, UUID(value)))
        except ValueError:
            return None
    return refs


def body_rows(fields: dict[str, AnySpec], *, optional: frozenset[str] = frozenset()) -> ScopeResolver:
    """A create or a test naming its household in the body (``household_id``, or a ``device_id`` whose household
    it is; ``optional`` fields may be null or absent). A body naming none is in no scope."""

    async def resolve(request: web.Request, tenant_id: UUID) -> list[Scope] | None:
        refs = await _body_refs(request, fields, optional)
        if not refs:
            return None
        return await _scopes(request, tenant_id, refs)

    return resolve


async def brand_region_in_body(request: web.Request, tenant_id: UUID) -> list[Scope] | None:
    """A new household: the brand and region its body gives it (neither: a household of no brand, no scope)."""
    payload = await _body(request)
    if payload is None:
        return None
    found: list[UUID | None] = []
    for field in ("brand_id", "region_id"):
        value = payload.get(field)
        if value is None:
            found.append(None)
            continue
        if not isinstance(value, str):
            return None
        try:
            found.append(UUID(value))
        except ValueError:
            return None
    brand, region = found
    return None if brand is None and region is None else [(brand, region)]


async def household_change(request: web.Request, tenant_id: UUID) -> list[Scope] | None:
    """``PATCH /households/{id}``: the household's brand/region now and, when the body changes them, after."""
    now = await household_in_path(request, tenant_id)
    payload = await _body(request)
    if now is None or payload is None:
        return None
    after: list[UUID | None] = list(now[0])
    for i, field in enumerate(("brand_id", "region_id")):
        if field not in payload:
            continue
        value = payload[field]
        if value is not None and not isinstance(value, str):
            return None
        try:
            after[i] = None if value is None else UUID(value)
        except ValueError:
            return None
    return [now[0], (after[0], after[1])]


def row_in_path(spec: AnySpec, moves: dict[str, AnySpec] | None = None) -> ScopeResolver:
    """``/<rows>/{id}``: the household the row belongs to; with ``moves`` (a change that may name another
    household or device in its body), that one's too: a scoped grant moves rows only within its scope."""

    async def resolve(request: web.Request, tenant_id: UUID) -> list[Scope] | None:
        found = uuid_in_path(request, "id")
        if found is None:
            return None
        refs: list[tuple[AnySpec, UUID]] = [(spec, found)]
        if moves:
            more = await _body_refs(request, moves)
            if more is None:
                return None
            refs.extend(more)
        return await _scopes(request, tenant_id, refs)

    return resolve
