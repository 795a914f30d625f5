"""The admin API's route table (paths relative to the ``/v1`` prefix), built from ``resources`` (the registry's
table specs)."""

from __future__ import annotations

from dataclasses import dataclass

from iim.admin import views
from iim.admin.presence import presence_routes
from iim.admin.problems import (
    ApiError,
    Conflict,
    InvalidParameter,
    InvalidReference,
    MalformedRequest,
    NotFound,
    PayloadTooLarge,
    StillReferenced,
    UnsupportedMediaType,
    ValidationFailed,
    VersionConflict,
)
from iim.admin.resources import RESOURCES, AnySpec, ListQuery, NoQuery, Resource, page_model
from iim.admin.routing import Access, PathParam, Route, ScopeResolver
from iim.admin.scopes import (
    body_rows,
    brand_region_in_body,
    brand_region_in_query,
    household_change,
    household_in_path,
    household_in_query,
    row_in_path,
    rows_in_query,
)
from iim.admin.service import AuditPage, AuditQuery, ChainStatus, HeadsToVerify
from iim.privacy.erasure import ErasureReport
from policy_cache.registry import BINDING, DEVICE, HOUSEHOLD, POLICY, SCENARIO, SIA_ACCOUNT, TENANT

TENANT_ID = PathParam("tenant_id", "the tenant's id")

_BODY_ERRORS: tuple[type[ApiError], ...] = (
    MalformedRequest, PayloadTooLarge, UnsupportedMediaType, ValidationFailed, InvalidParameter,
)


def _camel(*words: str) -> str:
    parts = [p for w in words for p in w.replace("-", "_").split("_") if p]
    return parts[0] + "".join(p.title() for p in parts[1:])


def _tenant_routes() -> list[Route]:
    return [
        Route("GET", "/tenants", views.list_tenants, "listTenants", "List tenants (all, or the token's own)",
              "tenants", Access.READ, query_model=ListQuery, response_model=page_model(TENANT.record),
              errors=(InvalidParameter,)),
        Route("POST", "/tenants", views.create_tenant, "createTenant", "Create a tenant (admin)", "tenants",
              Access.ADMIN, request_model=TENANT.create, response_model=TENANT.record, response_status=201,
              response_description="Created", errors=_BODY_ERRORS),
        Route("GET", "/tenants/{tenant_id}", views.get_tenant, "getTenant", "Show a tenant", "tenants",
              Access.READ, path_params=(TENANT_ID,), query_model=NoQuery, response_model=TENANT.record,
              errors=(NotFound, InvalidParameter)),
        Route("PATCH", "/tenants/{tenant_id}", views.update_tenant, "updateTenant", "Change a tenant (admin)",
              "tenants", Access.ADMIN, path_params=(TENANT_ID,), request_model=TENANT.update,
              response_model=TENANT.record, errors=(NotFound, *_BODY_ERRORS)),
        Route("DELETE", "/tenants/{tenant_id}", views.delete_tenant, "deleteTenant",
              "Delete a tenant and its whole registry (admin; the audit log is kept)", "tenants", Access.ADMIN,
              path_params=(TENANT_ID,), response_status=204, response_description="Deleted",
              errors=(NotFound, StillReferenced)),
        Route("GET", "/tenants/{tenant_id}/audit", views.list_audit, "listAudit",
              "The tenant's audit log, newest first", "audit", Access.READ, path_params=(TENANT_ID,),
              query_model=AuditQuery, response_model=AuditPage, errors=(NotFound, InvalidParameter)),
        Route("GET", "/tenants/{tenant_id}/audit/verify", views.verify_audit, "verifyAudit",
              "Recompute the tenant's audit hash chain", "audit", Access.READ, path_params=(TENANT_ID,),
              query_model=NoQuery, response_model=ChainStatus, errors=(InvalidParameter,)),
        Route("POST", "/tenants/{tenant_id}/audit/verify", views.verify_audit_heads, "verifyAuditHeads",
              "Recompute the tenant's audit hash chain and check heads published earlier are still on it",
              "audit", Access.READ, path_params=(TENANT_ID,), request_model=HeadsToVerify,
              response_model=ChainStatus, errors=_BODY_ERRORS),
    ]


@dataclass(frozen=True, slots=True)
class _Scopes:
    """How a brand/region-scoped grant's request on a collection finds its household (None: it never does)."""

    listing: ScopeResolver | None = None
    create: ScopeResolver | None = None
    one: ScopeResolver | None = None
    update: ScopeResolver | None = None


_IN_HOUSEHOLD = {"household_id": HOUSEHOLD}
_ON_DEVICE = {"device_id": DEVICE}


def _household_rows(spec: AnySpec, listing: ScopeResolver | None) -> _Scopes:
    """A collection of rows that each belong to one household (``household_id``), not moved by a change."""
    return _Scopes(listing, body_rows(_IN_HOUSEHOLD), row_in_path(spec), row_in_path(spec))


#: Collections of household-bound rows (iim.admin.scopes); the others (subscribers, consents, brands, plans,
#: credentials...) are tenant-wide: a scoped grant is refused there.
_SCOPES: dict[str, _Scopes] = {
    HOUSEHOLD.name: _Scopes(brand_region_in_query, brand_region_in_body, household_in_path, household_change),
    DEVICE.name: _household_rows(DEVICE, household_in_query),
    POLICY.name: _household_rows(POLICY, None),
    BINDING.name: _Scopes(household_in_query, body_rows({**_IN_HOUSEHOLD, **_ON_DEVICE}, optional=frozenset({
        "device_id"})), row_in_path(BINDING), row_in_path(BINDING)),
    SCENARIO.name: _Scopes(household_in_query, body_rows(_IN_HOUSEHOLD), row_in_path(SCENARIO),
                           row_in_path(SCENARIO, _IN_HOUSEHOLD)),
    SIA_ACCOUNT.name: _Scopes(rows_in_query("device_id", DEVICE), body_rows(_ON_DEVICE), row_in_path(SIA_ACCOUNT),
                              row_in_path(SIA_ACCOUNT, _ON_DEVICE)),
}


def _resource_routes(res: Resource) -> list[Route]:
    one = PathParam("id", f"the {res.table.label}'s id")
    base = f"/tenants/{{tenant_id}}/{res.plural}"
    label = res.table.label
    scopes = _SCOPES.get(res.name, _Scopes())
    routes = [
        Route("GET", base, views.list_view(res), _camel("list", res.plural), f"List {res.plural}", res.plural,
              Access.READ, path_params=(TENANT_ID,), query_model=res.list_query, response_model=res.page_model,
              errors=(NotFound, InvalidParameter), scope=scopes.listing),
        Route("POST", base, views.create_view(res), _camel(res.create_verb, res.name),
              f"{res.create_verb.title()} a {label}", res.plural, Access.WRITE, path_params=(TENANT_ID,),
              request_model=res.create_model, response_model=res.read_model, response_status=201,
              response_description="Created", errors=(NotFound, Conflict, InvalidReference, *_BODY_ERRORS),
              scope=scopes.create),
        Route("GET", base + "/{id}", views.get_view(res), _camel("get", res.name), f"Show a {label}",
              res.plural, Access.READ, path_params=(TENANT_ID, one), query_model=NoQuery,
              response_model=res.read_model, errors=(NotFound, InvalidParameter), scope=scopes.one),
    ]
    if res.update_model is not None:
        errors: tuple[type[ApiError], ...] = (NotFound, Conflict, InvalidReference, *_BODY_ERRORS)
        if res.update_query is not NoQuery:
            errors = (*errors, VersionConflict)
        routes.append(Route(
            "PATCH", base + "/{id}", views.update_view(res), _camel("update", res.name),
            f"Change a {label} (only the fields sent; null clears a nullable field)", res.plural, Access.WRITE,
            path_params=(TENANT_ID, one), query_model=res.update_query, request_model=res.update_model,
            response_model=res.read_model, errors=errors, scope=scopes.update,
        ))
    if res.deletable:
        routes.append(Route(
            "DELETE", base + "/{id}", views.delete_view(res), _camel("delete", res.name), f"Delete a {label}",
            res.plural, Access.WRITE, path_params=(TENANT_ID, one), query_model=NoQuery, response_status=204,
            response_description="Deleted", errors=(NotFound, StillReferenced, InvalidParameter),
            scope=scopes.one,
        ))
    if res.revocable:
        routes.append(Route(
            "POST", base + "/{id}/revoke", views.revoke_view(res), _camel("revoke", res.name),
            f"Revoke a {label} (sets revoked_at; the row is kept; idempotent)", res.plural, Access.WRITE,
            path_params=(TENANT_ID, one), query_model=NoQuery, response_model=res.read_model,
            errors=(NotFound, MalformedRequest, InvalidParameter),
        ))
    return routes


def _privacy_routes() -> list[Route]:
    return [
        Route("POST", "/tenants/{tenant_id}/subscribers/{id}/erase", views.erase_subscriber, "eraseSubscriber",
              "Erase a subscriber (admin): their incoming SMS, their devices' event payloads and the audit details "
              "about them are removed (audit rows become tombstones: the chain still verifies), then the "
              "subscriber", "subscribers", Access.ADMIN,
              path_params=(TENANT_ID, PathParam("id", "the subscriber's id")), query_model=NoQuery,
              response_model=ErasureReport, errors=(NotFound, MalformedRequest, InvalidParameter)),
    ]


def openapi_route(path: str, operation_id: str) -> Route:
    return Route("GET", path, views.openapi_view, operation_id, "This OpenAPI 3.1 document", "meta",
                 Access.PUBLIC, response_description="OpenAPI 3.1 document (JSON)")


def build_routes() -> tuple[Route, ...]:
    """Every route under the prefix: tenants, audit, then each resource, then the OpenAPI document."""
    routes = _tenant_routes()
    for res in RESOURCES:
        routes.extend(_resource_routes(res))
    routes.extend(_privacy_routes())
    routes.extend(presence_routes(TENANT_ID))
    routes.append(openapi_route("/openapi.json", "getOpenApi"))
    return tuple(routes)
