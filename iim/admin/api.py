"""The registry admin API: an aiohttp application factory, mounted under ``/v1``.

Wiring (what ``iim serve`` does)::

    registry = create_registry_app(lambda: app_pool, AdminSettings(), directory_pool=lambda: cache_pool)
    mount_registry(root_app, registry)      # /v1/... and /openapi.json on the same port as /metrics

The sub-application has its own middleware (problem+json errors, request ids, no-store headers),
so nothing here touches ``/metrics`` or ``/health``. Every route is described once in
``iim.admin.routes``; the same table registers the handlers and generates ``/openapi.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from aiohttp import web

from iim.admin.auth import TokenTable
from iim.admin.authn import Authenticator
from iim.admin.oidc import OidcVerifier
from iim.admin.openapi import build_openapi
from iim.admin.problems import (
    ApiError,
    InternalError,
    MalformedRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    problem_response,
)
from iim.admin.routes import build_routes, openapi_route
from iim.admin.routing import Access, Handler, Route
from iim.admin.scopes import household_in_path
from iim.admin.service import PoolProvider, RegistryService, UnlinkOnErase
from iim.admin.settings import AdminSettings, OidcSettings
from iim.admin.token_source import ReloadAuditor, TokenSource
from iim.admin.views import OPENAPI, PRINCIPAL, REQUEST_ID, SERVICE, SETTINGS, path_uuid, request_id
from iim.core.traced_http import traced_requests
from policy_cache.db import DbRole, Pool, connect_pool

__all__ = ["AUTH", "OwnedPools", "create_registry_app", "mount_registry"]

log = logging.getLogger("iim.admin")

AUTH = web.AppKey("admin_auth", Authenticator)
ROUTES = web.AppKey("admin_routes", tuple[Route, ...])

_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


def _guard(route: Route) -> Handler:
    """Authenticate the bearer token and check role and tenant before the handler runs."""
    if route.access is Access.PUBLIC:
        return route.handler
    handler = route.handler

    async def guarded(request: web.Request) -> web.StreamResponse:
        principal = await request.app[AUTH].principal(request.headers.get("Authorization"))
        request[PRINCIPAL] = principal
        if route.access is Access.ADMIN:
            principal.require_admin()
        elif "tenant_id" in request.match_info:
            tenant_id = path_uuid(request, "tenant_id")
            write = route.access is Access.WRITE
            tenant_wide = principal.can_write(tenant_id) if write else principal.can_read(tenant_id)
            resolver = route.scope or (household_in_path if route.household_scoped else None)
            scoped = resolver is not None and not tenant_wide and principal.can_reach_households(tenant_id)
            if route.foreign_tenant_not_found and not principal.can_read(tenant_id) and not scoped:
                raise NotFound("no such row")
            if scoped:
                # A brand/region-scoped grant: allowed when the request's household is in its scope (a household
                # that does not exist, or a request naming none, is in no scope: the same answer, no oracle).
                assert resolver is not None
                scopes = await resolver(request, tenant_id) or [(None, None)]
                if route.foreign_tenant_not_found and not all(
                        principal.can_household(tenant_id, brand, region, write=False) for brand, region in scopes):
                    raise NotFound("no such row")
                for brand, region in scopes:  # a move: the row's household and the one it goes to
                    principal.require_household(tenant_id, brand, region, write=write)
            elif write:
                principal.require_write(tenant_id)
            else:
                principal.require_read(tenant_id)
        return await handler(request)

    return guarded


@web.middleware
async def problem_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves as problem+json with an ``error_id``; every response gets the request id."""
    rid = request_id(request)
    request[REQUEST_ID] = rid
    try:
        response = await handler(request)
    except ApiError as err:
        response = problem_response(err, request.path)
    except web.HTTPException as exc:
        response = problem_response(_from_http_exception(exc), request.path)
    except Exception:
        log.exception("admin API: unexpected error on %s %s (request %s)", request.method, request.path, rid)
        response = problem_response(InternalError(f"unexpected error; quote request id {rid}"), request.path)
    response.headers["X-Request-ID"] = rid
    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _from_http_exception(exc: web.HTTPException) -> ApiError:
    """aiohttp's own answers (no such route, wrong method, too large) as our problems."""
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowed(f"{exc.method} is not allowed here (allowed: {allowed})", headers={"Allow": allowed})
    if isinstance(exc, web.HTTPNotFound):
        return NotFound("no such resource")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(exc.text or "request body too large")
    if 400 <= exc.status < 500:
        return MalformedRequest(exc.reason)
    return InternalError(exc.reason)


def create_registry_app(
    pool_provider: PoolProvider,
    settings: AdminSettings | None = None,
    *,
    directory_pool: PoolProvider | None = None,
    tokens: TokenTable | None = None,
    extra_routes: Sequence[Route] = (),
    oidc: OidcSettings | None = None,
    recordings_dir: Path | None = None,
    unlink_on_erase: UnlinkOnErase | None = None,
) -> web.Application:
    """The registry admin API as an aiohttp sub-application (routes relative to ``settings.prefix``).

    Args:
        pool_provider: returns the ``iim_app`` asyncpg pool (may raise ``LookupError`` while the
            database is not connected: answered 503 ``store-unavailable``).
        settings: ``AdminSettings()`` (``IIM_ADMIN_*``) by default.
        directory_pool: returns an ``iim_cache`` pool, used only to list every tenant for admin and
            unscoped viewer tokens.
        tokens: a fixed token table; by default ``settings.tokens_ref``, read again when its file changes (each
            reload, applied or refused, audited in the service's chain through ``pool_provider``).
        extra_routes: routes of other rooms served under the same prefix and tokens (``/connectors``).
        oidc: the OIDC issuer whose bearer JWTs are accepted too; by default ``OidcSettings()``
            (``IIM_OIDC_*``; no issuer: static tokens only).
        recordings_dir: IIM's recordings directory, where erasure deletes the subscriber's recorded messages.
        unlink_on_erase: revokes at the vendors the account links of an erased subscriber's own homes.

    Raises:
        iim.admin.auth.TokenConfigError: the token table reference does not resolve or is invalid.
    """
    settings = settings or AdminSettings()
    source = TokenSource.fixed(tokens) if tokens is not None else TokenSource(
        settings.tokens_ref, check_interval_s=settings.tokens_check_interval_s)
    oidc = oidc or OidcSettings()
    verifier = OidcVerifier(oidc) if oidc.issuer is not None else None
    if len(source.current()) == 0 and verifier is None:
        log.warning("admin API: no tokens configured (IIM_ADMIN_TOKENS_REF, IIM_OIDC_ISSUER); every request "
                    "will be refused")
    # Reloads of the token file (applied or refused) are audited in the service's own chain.
    auth = Authenticator(source, verifier, auditor=ReloadAuditor(source, pool_provider,
                                                                 deadline_s=settings.store_deadline_s))
    routes = (*build_routes(), *extra_routes)
    # Outermost: a span per request (joined to the caller's W3C traceparent), with the status actually sent.
    app = web.Application(middlewares=[traced_requests(), problem_middleware])
    app[SERVICE] = RegistryService(pool_provider, directory_pool, deadline_s=settings.store_deadline_s,
                                     recordings_dir=recordings_dir, unlink_on_erase=unlink_on_erase)
    app[SETTINGS] = settings
    app[AUTH] = auth
    app[ROUTES] = routes
    root_openapi = openapi_route("/openapi.json", "getOpenApiAtRoot")
    document = build_openapi(
        routes, prefix=settings.prefix, root_routes=(root_openapi,),
        description="Registry of tenants, households, subscribers, devices, bindings, consents and policies. "
                    "Errors are RFC 9457 problem details with a stable error_id.",
    )
    app[OPENAPI] = json.dumps(document).encode()

    async def auth_ctx(_app: web.Application) -> AsyncIterator[None]:
        async with auth:
            yield

    app.cleanup_ctx.append(auth_ctx)
    for route in routes:
        app.router.add_route(route.method, route.path, _guard(route), name=route.operation_id)
    return app


def mount_registry(root: web.Application, registry: web.Application) -> None:
    """Serve ``registry`` under its prefix on ``root`` and its OpenAPI document at ``/openapi.json`` too.

    Call before ``root`` starts (aiohttp freezes the router on startup).
    """
    prefix = registry[SETTINGS].prefix
    root.add_subapp(prefix, registry)
    document = registry[OPENAPI]

    async def root_openapi(_request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json",
                            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    root.router.add_get("/openapi.json", root_openapi, name="getOpenApiAtRoot")


class OwnedPools:
    """Optional: let the registry app own its pools (when the service does not already have them).

    ``pools = OwnedPools(app_dsn, cache_dsn)``; pass ``pools.app`` / ``pools.directory`` as providers and
    append ``pools.ctx`` to the (root or registry) app's ``cleanup_ctx``. Before start-up and after
    clean-up the providers raise ``LookupError`` (answered 503).
    """

    def __init__(self, app_dsn: str, directory_dsn: str | None = None, *, max_size: int = 5) -> None:
        self._app_dsn = app_dsn
        self._directory_dsn = directory_dsn
        self._max_size = max_size
        self._app: Pool | None = None
        self._directory: Pool | None = None

    def app(self) -> Pool:
        if self._app is None:
            raise LookupError("registry pool not started")
        return self._app

    def directory(self) -> Pool:
        if self._directory is None:
            raise LookupError("directory pool not started")
        return self._directory

    async def ctx(self, _app: web.Application) -> AsyncIterator[None]:
        self._app = await connect_pool(self._app_dsn, role=DbRole.APP, max_size=self._max_size)
        try:
            if self._directory_dsn is not None:
                self._directory = await connect_pool(self._directory_dsn, role=DbRole.CACHE, max_size=2)
            yield
        finally:
            pools = [p for p in (self._app, self._directory) if p is not None]
            self._app = self._directory = None
            for pool in pools:
                await pool.close()
