"""Where a request's household lies (its brand and region), for grants scoped to a brand or a region.

A scoped grant reaches only the households of its brand/region, never the tenant as a whole. A route it may
call says how to find the one household the request is about (:attr:`~iim.admin.routing.Route.scope`): the
path's ``{id}``, a ``household_id`` filter, or ``brand_id``/``region_id`` filters that pin every row of a list
to one brand/region. A request that names no single household (no filter, a repeated or malformed one, an
unknown household) resolves to no scope: every scoped grant gets the same refusal, so it learns nothing about
rows outside its scope.
"""

from __future__ import annotations

from uuid import UUID

from aiohttp import web

from iim.admin.views import SERVICE, path_uuid

__all__ = ["brand_region_in_query", "household_in_path", "household_in_query"]

Scope = tuple[UUID | None, UUID | None]


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


async def household_in_path(request: web.Request, tenant_id: UUID) -> Scope | None:
    """``/households/{id}``: that household's brand and region (an unknown one is in no scope)."""
    return await request.config_dict[SERVICE].household_scope(tenant_id, path_uuid(request, "id"))


async def household_in_query(request: web.Request, tenant_id: UUID) -> Scope | None:
    """A list filtered by ``?household_id=``: every row is that household's."""
    usable, household = _query_uuid(request, "household_id")
    if not usable or household is None:
        return None
    return await request.config_dict[SERVICE].household_scope(tenant_id, household)


async def brand_region_in_query(request: web.Request, tenant_id: UUID) -> Scope | None:
    """A household list filtered by ``?brand_id=`` and/or ``?region_id=``: every row is of that brand/region."""
    brand_ok, brand = _query_uuid(request, "brand_id")
    region_ok, region = _query_uuid(request, "region_id")
    if not (brand_ok and region_ok) or (brand is None and region is None):
        return None
    return brand, region
