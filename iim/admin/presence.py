"""Live presence in the admin API: the operator's app says who is home (a geofence enter or leave), with expiry.

``PUT /v1/tenants/{t}/households/{id}/presence`` sets one subject's word (``source=app``) for ``ttl_s`` seconds;
``DELETE ...?subject=`` withdraws it; ``GET`` shows what the household's calls see now: the resolved presence,
what decided it, the registry baseline and every claim (registrations, connectors, the app), expired ones marked.
Each change is audited on the tenant's chain with the caller as actor (``household.presence_claim`` /
``household.presence_release``).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Literal
from uuid import UUID

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from iim.admin.bodies import parse_body, parse_query
from iim.admin.problems import (
    InvalidParameter,
    MalformedRequest,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from iim.admin.resources import NoQuery
from iim.admin.routing import Access, PathParam, Route
from iim.admin.views import PRINCIPAL, REQUEST_ID, SERVICE, SETTINGS, json_response, path_uuid
from policy_cache import presence_store
from policy_cache.db import Connection
from policy_cache.models import PresenceState
from policy_cache.presence import resolve_presence

__all__ = ["HouseholdPresence", "PresenceClaimBody", "PresenceClaimRecord", "SubjectQuery", "presence_routes"]

Subject = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]


class PresenceClaimBody(BaseModel):
    """The app's word about one subject (a person, say the subscriber id): ``enter`` is home, ``leave`` away."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    subject: Subject = Field(description="who the word is about (a person of the household, as the app knows them)")
    state: Literal["home", "away"]
    ttl_s: int = Field(ge=60, le=presence_store.MAX_TTL_S,
                       description="how long the word counts unless the app speaks again (seconds)")


class SubjectQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    subject: Subject


class PresenceClaimRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Literal["registration", "connector", "app"]
    subject: str
    state: Literal["home", "away"]
    observed_at: datetime
    expires_at: datetime
    actor: str
    live: bool
    basis: str | None = Field(default=None, description="why the source says so (a registration: from which network)")


class HouseholdPresence(BaseModel):
    """What calls to the household see now, and why."""

    model_config = ConfigDict(extra="forbid")

    household_id: UUID
    presence: PresenceState = Field(description="resolved: live claims over the registry baseline")
    source: Literal["registration", "connector", "app", "registry"] = Field(description="what decided it")
    subject: str | None
    until: datetime | None = Field(description="the next expiry of a live claim (the answer may change then)")
    baseline: PresenceState = Field(description="the registry's presence (PATCH .../households/{id})")
    explanation: str
    claims: list[PresenceClaimRecord]


async def _view(conn: Connection, household_id: UUID) -> HouseholdPresence:
    baseline, stored = await presence_store.list_claims(conn, household_id)
    now = time.time()
    resolved = resolve_presence(baseline.value, [c.claim() for c in stored], now)
    return HouseholdPresence(
        household_id=household_id, presence=PresenceState(resolved.state), source=resolved.source,
        subject=resolved.subject, until=None if resolved.until is None else datetime.fromtimestamp(resolved.until, UTC),
        baseline=baseline, explanation=resolved.describe(),
        claims=[PresenceClaimRecord(source=c.source, subject=c.subject, state=c.state, observed_at=c.observed_at,
                                    expires_at=c.expires_at, actor=c.actor, live=c.expires_at.timestamp() > now,
                                    basis=c.basis)
                for c in stored])


async def get_presence(request: web.Request) -> web.Response:
    parse_query(request, NoQuery)
    tenant_id, household_id = path_uuid(request, "tenant_id"), path_uuid(request, "id")
    async with request.config_dict[SERVICE].in_tenant(tenant_id, write=False) as conn:
        return json_response(await _view(conn, household_id))


async def put_presence(request: web.Request) -> web.Response:
    parse_query(request, NoQuery)
    tenant_id, household_id = path_uuid(request, "tenant_id"), path_uuid(request, "id")
    body = await parse_body(request, PresenceClaimBody, request.config_dict[SETTINGS].max_body_bytes)
    correlation = {"channel": "admin-api", "request_id": request[REQUEST_ID]}
    async with request.config_dict[SERVICE].in_tenant(tenant_id, write=True) as conn:
        await presence_store.put_claim(conn, household_id, source="app", subject=body.subject, state=body.state,
                                       ttl_s=body.ttl_s, actor=request[PRINCIPAL].actor, correlation=correlation,
                                       chain_tenant=tenant_id)
        return json_response(await _view(conn, household_id))


async def delete_presence(request: web.Request) -> web.Response:
    query = parse_query(request, SubjectQuery)
    tenant_id, household_id = path_uuid(request, "tenant_id"), path_uuid(request, "id")
    correlation = {"channel": "admin-api", "request_id": request[REQUEST_ID]}
    async with request.config_dict[SERVICE].in_tenant(tenant_id, write=True) as conn:
        view = await _view(conn, household_id)  # 404 for a household the tenant does not have
        written = await presence_store.release_claim(conn, household_id, source="app", subject=query.subject,
                                                     actor=request[PRINCIPAL].actor, correlation=correlation,
                                                     chain_tenant=tenant_id)
        if written.stored is not None:
            view = await _view(conn, household_id)
    return json_response(view)


def presence_routes(tenant: PathParam) -> list[Route]:
    one = PathParam("id", "the household's id")
    path = "/tenants/{tenant_id}/households/{id}/presence"
    body_errors = (MalformedRequest, PayloadTooLarge, UnsupportedMediaType, ValidationFailed, InvalidParameter)
    return [
        Route("GET", path, get_presence, "getHouseholdPresence",
              "The household's presence now: live claims (registrations, connectors, the app) over the registry",
              "households", Access.READ, path_params=(tenant, one), query_model=NoQuery,
              response_model=HouseholdPresence, errors=(NotFound, InvalidParameter), household_scoped=True),
        Route("PUT", path, put_presence, "putHouseholdPresence",
              "The operator app's word about one subject (geofence enter: home, leave: away), with expiry",
              "households", Access.WRITE, path_params=(tenant, one), query_model=NoQuery,
              request_model=PresenceClaimBody, response_model=HouseholdPresence,
              errors=(NotFound, *body_errors), household_scoped=True),
        Route("DELETE", path, delete_presence, "deleteHouseholdPresence",
              "Withdraw the operator app's word about one subject", "households", Access.WRITE,
              path_params=(tenant, one), query_model=SubjectQuery, response_model=HouseholdPresence,
              errors=(NotFound, InvalidParameter), household_scoped=True),
    ]
