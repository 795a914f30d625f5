"""The operator's incident and test endpoints under ``/v1``, served by an
:class:`~iim.scenarios.operator.desk.OperatorDesk` (``iim serve`` adds them with ``extra_routes``)::

    GET  /tenants/{tenant_id}/incidents                    list (household, state, since/until; paginated)
    GET  /tenants/{tenant_id}/incidents/{id}               the incident and its whole timeline
    POST /tenants/{tenant_id}/incidents/{id}/acknowledge   stop the escalation as a DTMF "1" does
    POST /tenants/{tenant_id}/incidents/{id}/close         false alarm (a reason is required), as a DTMF "2"
    POST /tenants/{tenant_id}/incidents/{id}/reopen        live again; calls resume only when asked
    POST /tenants/{tenant_id}/test-calls                   ring a household contact through the alert path
    POST /tenants/{tenant_id}/test-notifications           notify a device through its connector

A grant scoped to a brand or region reaches the incidents of its households (the list filtered by
``household_id``) and tests them (a test call names its household; a test notification its device, whose
household counts). A token that may not read the tenant gets 404 for an incident, as for an id of another tenant under its own
(row-level security); every write, and every read of incidents (``incident.read``: a timeline names the
household's contacts and their numbers), is audited with the token's actor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar
from uuid import UUID

from aiohttp import web
from pydantic import BaseModel

from iim.admin.bodies import parse_body, parse_query
from iim.admin.problems import (
    Conflict,
    Forbidden,
    InvalidParameter,
    InvalidReference,
    MalformedRequest,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from iim.admin.resources import NoQuery
from iim.admin.routing import Access, Handler, PathParam, Route, Scope
from iim.admin.scopes import body_rows, household_in_query, uuid_in_path
from iim.admin.service import map_store_errors
from iim.admin.views import PRINCIPAL, REQUEST_ID, SETTINGS, json_response, path_uuid
from iim.scenarios.model import IvrOutcome
from iim.scenarios.operator.desk import DeskUnavailable, OperatorDesk
from iim.scenarios.operator.models import (
    AcknowledgeBody,
    CloseBody,
    IncidentPage,
    IncidentQuery,
    IncidentSummary,
    IncidentTimeline,
    ReopenBody,
    TestCallBody,
    TestCallResult,
    TestNotifyBody,
    TestNotifyResult,
    encode_cursor,
)
from policy_cache.registry import DEVICE, HOUSEHOLD

__all__ = ["operator_routes"]

T = TypeVar("T", bound=BaseModel)

_TENANT = PathParam("tenant_id", "the tenant's id")
_INCIDENT = PathParam("id", "the incident's id")
_BODY = (MalformedRequest, PayloadTooLarge, UnsupportedMediaType, ValidationFailed)


@contextmanager
def _mapped() -> Iterator[None]:
    with map_store_errors():
        try:
            yield
        except DeskUnavailable as exc:
            raise ServiceUnavailable(str(exc)) from exc


def _correlation(request: web.Request) -> dict[str, str]:
    return {"channel": "admin-api", "request_id": request[REQUEST_ID]}


def operator_routes(desk: OperatorDesk) -> tuple[Route, ...]:
    """The routes (relative to the API prefix) of incidents and tests, served by ``desk``."""

    async def list_incidents(request: web.Request) -> web.Response:
        settings = request.config_dict[SETTINGS]
        query = parse_query(request, IncidentQuery)
        limit = min(query.limit, settings.max_page_size)
        with _mapped():
            items = await desk.incidents(path_uuid(request, "tenant_id"), query, limit,
                                         actor=request[PRINCIPAL].actor, correlation=_correlation(request))
        last = items[-1] if len(items) >= limit else None
        return json_response(IncidentPage(items=items, next_after=encode_cursor(last.opened_at, last.id)
                                          if last is not None else None))

    async def show_incident(request: web.Request) -> web.Response:
        parse_query(request, NoQuery)
        with _mapped():
            return json_response(await desk.timeline(path_uuid(request, "tenant_id"), path_uuid(request, "id"),
                                                     actor=request[PRINCIPAL].actor,
                                                     correlation=_correlation(request)))

    def decision(model: type[AcknowledgeBody | CloseBody], outcome: IvrOutcome) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            body = await parse_body(request, model, request.config_dict[SETTINGS].max_body_bytes)
            note = body.note if isinstance(body, AcknowledgeBody) else body.reason
            with _mapped():
                row = await desk.decide(path_uuid(request, "tenant_id"), path_uuid(request, "id"), outcome,
                                        actor=request[PRINCIPAL].actor, note=note,
                                        correlation=_correlation(request))
            return json_response(row)

        return handler

    async def reopen(request: web.Request) -> web.Response:
        body = await parse_body(request, ReopenBody, request.config_dict[SETTINGS].max_body_bytes)
        with _mapped():
            row = await desk.reopen(path_uuid(request, "tenant_id"), path_uuid(request, "id"),
                                    actor=request[PRINCIPAL].actor, note=body.reason,
                                    resume_calls=body.resume_calls, correlation=_correlation(request))
        return json_response(row)

    def test(model: type[T], run: Callable[[web.Request, T], Awaitable[web.Response]]) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            body = await parse_body(request, model, request.config_dict[SETTINGS].max_body_bytes)
            with _mapped():
                return await run(request, body)

        return handler

    async def test_call(request: web.Request, body: TestCallBody) -> web.Response:
        return json_response(await desk.test_call(path_uuid(request, "tenant_id"), body,
                                                  actor=request[PRINCIPAL].actor, correlation=_correlation(request)))

    async def test_notify(request: web.Request, body: TestNotifyBody) -> web.Response:
        return json_response(await desk.test_notify(path_uuid(request, "tenant_id"), body,
                                                    actor=request[PRINCIPAL].actor, correlation=_correlation(request)))

    async def incident_in_path(request: web.Request, tenant_id: UUID) -> list[Scope] | None:
        incident = uuid_in_path(request, "id")
        if incident is None:
            return None
        with _mapped():
            found = await desk.incident_scope(tenant_id, incident)
        return None if found is None else [found]

    base = "/tenants/{tenant_id}/incidents"
    one = base + "/{id}"
    writes = (NotFound, Conflict, Forbidden, ServiceUnavailable, *_BODY)
    return (
        Route("GET", base, list_incidents, "listIncidents", "List the tenant's incidents, newest first", "incidents",
              Access.READ, path_params=(_TENANT,), query_model=IncidentQuery, response_model=IncidentPage,
              errors=(NotFound, InvalidParameter), foreign_tenant_not_found=True, scope=household_in_query),
        Route("GET", one, show_incident, "getIncident",
              "An incident with its timeline: device events, decisions, calls and SMS with outcomes, audit lines",
              "incidents", Access.READ, path_params=(_TENANT, _INCIDENT), query_model=NoQuery,
              response_model=IncidentTimeline, errors=(NotFound, InvalidParameter), foreign_tenant_not_found=True,
              scope=incident_in_path),
        Route("POST", one + "/acknowledge", decision(AcknowledgeBody, IvrOutcome.ACKNOWLEDGE), "acknowledgeIncident",
              "Acknowledge a live incident: the escalation stops as on a DTMF 1 (on_acknowledge messages go out)",
              "incidents", Access.WRITE, path_params=(_TENANT, _INCIDENT), request_model=AcknowledgeBody,
              response_model=IncidentSummary, errors=writes, foreign_tenant_not_found=True, scope=incident_in_path),
        Route("POST", one + "/close", decision(CloseBody, IvrOutcome.FALSE_ALARM), "closeIncident",
              "Close a live incident as a false alarm: the escalation stops as on a DTMF 2", "incidents",
              Access.WRITE, path_params=(_TENANT, _INCIDENT), request_model=CloseBody,
              response_model=IncidentSummary, errors=writes, foreign_tenant_not_found=True, scope=incident_in_path),
        Route("POST", one + "/reopen", reopen, "reopenIncident",
              "Reopen an ended incident: held (nobody called) unless resume_calls is true", "incidents",
              Access.WRITE, path_params=(_TENANT, _INCIDENT), request_model=ReopenBody,
              response_model=IncidentSummary, errors=writes, foreign_tenant_not_found=True, scope=incident_in_path),
        Route("POST", "/tenants/{tenant_id}/test-calls", test(TestCallBody, test_call), "placeTestCall",
              "Ring a household's contact through the alert call's guard, originate and IVR (no incident; waits "
              "for the outcome)", "tests", Access.WRITE, path_params=(_TENANT,), request_model=TestCallBody,
              response_model=TestCallResult, errors=(InvalidReference, Forbidden, ServiceUnavailable, *_BODY),
              scope=body_rows({"household_id": HOUSEHOLD})),
        Route("POST", "/tenants/{tenant_id}/test-notifications", test(TestNotifyBody, test_notify),
              "sendTestNotification", "Send a test notification to a device through its connector; the vendor's "
              "answer", "tests", Access.WRITE, path_params=(_TENANT,), request_model=TestNotifyBody,
              response_model=TestNotifyResult, errors=(InvalidReference, Forbidden, *_BODY),
              scope=body_rows({"device_id": DEVICE})),
    )
