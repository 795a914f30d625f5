"""The registry collections the admin API and CLI expose, generated from the registry's table specs.

One :class:`Resource` per tenant-scoped table of :data:`policy_cache.registry.TABLES`
(``/v1/tenants/{tenant_id}/<plural>``): its models are the spec's (:mod:`policy_cache.models`), its list
query is made from the spec's filters, its operations are the generic CRUD of :mod:`policy_cache.registry`
(which writes the audit row of every change in the same transaction). Scenarios differ in one way: their
bodies are typed by :mod:`iim.scenarios.model` and written through :mod:`iim.scenarios.registry`.
Tenants themselves are not a :class:`Resource` (they have their own routes and rules).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_type_hints
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from fs_app.outreach.guard import OriginateLimits, limits_from, number_refusal
from iim.admin.problems import FieldError, InvalidParameter, ValidationFailed
from iim.core.numbering import NotANumber, NumberingPlan, to_e164
from iim.scenarios import registry as scenario_registry
from iim.scenarios.model import (
    MAX_STEPS,
    AckStep,
    CallStep,
    Condition,
    NotifyStep,
    RecordStep,
    SmsStep,
    Step,
    Trigger,
    WaitStep,
    check_acknowledge,
    check_steps,
)
from policy_cache import models as m
from policy_cache import registry
from policy_cache.db import Connection
from policy_cache.registry import TableSpec

Correlation = dict[str, str]
AnySpec = TableSpec[Any, Any, Any]

DEFAULT_PAGE = 100
MAX_PAGE = 1000


class ListQuery(BaseModel):
    """Keyset pagination: ``after`` is the ``next_after`` of the previous page."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: int = Field(default=DEFAULT_PAGE, ge=1, le=MAX_PAGE, description="page size")
    after: UUID | None = Field(default=None, description="return rows with an id greater than this one")


class NoQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _camel(name: str) -> str:
    return "".join(p.title() for p in name.split("_"))


def list_query(spec: AnySpec) -> type[ListQuery]:
    """Pagination plus one optional query parameter per filter of the spec (``DeviceQuery``), each typed
    like the create model's field of that name."""
    if not spec.filters:
        return ListQuery
    hints = get_type_hints(spec.create, include_extras=True)
    fields: dict[str, Any] = {
        f.column: (hints[f.column] | None, Field(default=None, description=f.description)) for f in spec.filters
    }
    model: type[ListQuery] = create_model(f"{_camel(spec.name)}Query", __base__=ListQuery, **fields)
    return model


def update_query(spec: AnySpec) -> type[BaseModel]:
    """``?expected_version=`` for a versioned table (``PolicyUpdateQuery``); none otherwise."""
    if not spec.versioned:
        return NoQuery
    model: type[BaseModel] = create_model(
        f"{_camel(spec.name)}UpdateQuery",
        __config__=ConfigDict(extra="forbid", frozen=True),
        expected_version=(int | None, Field(
            default=None, ge=1, description=f"apply only if the {spec.label} is still at this version (else 409)")),
    )
    return model


AnyStep = CallStep | SmsStep | NotifyStep | RecordStep | WaitStep


class ScenarioCreateBody(BaseModel):
    """A scenario as the API takes it: the definition typed by :mod:`iim.scenarios.model`, so a bad one is a
    422 with the location of each error. Both ``household_id`` and ``subscriber_id`` empty: tenant-wide.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: m.Name
    household_id: UUID | None = None
    subscriber_id: UUID | None = None
    trigger: Trigger
    conditions: list[Condition] = Field(default_factory=list, max_length=20)
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS)
    on_acknowledge: list[AckStep] = Field(default_factory=list, max_length=10)
    enabled: bool = Field(default=False, description="a new scenario is inert until enabled")

    @field_validator("steps")
    @classmethod
    def _grouping(cls, steps: list[AnyStep]) -> list[AnyStep]:
        check_steps(steps)
        return steps

    @field_validator("on_acknowledge")
    @classmethod
    def _ack(cls, steps: list[NotifyStep | SmsStep]) -> list[NotifyStep | SmsStep]:
        check_acknowledge(steps)
        return steps

    def to_create(self) -> m.ScenarioCreate:
        return m.ScenarioCreate(**_stored(self, set(type(self).model_fields)))


class ScenarioUpdateBody(BaseModel):
    """Only the fields sent change; a list (conditions, steps, on_acknowledge) is replaced whole."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: m.Name | None = None
    household_id: UUID | None = None
    subscriber_id: UUID | None = None
    trigger: Trigger | None = None
    conditions: list[Condition] | None = Field(default=None, max_length=20)
    steps: list[Step] | None = Field(default=None, min_length=1, max_length=MAX_STEPS)
    on_acknowledge: list[AckStep] | None = Field(default=None, max_length=10)
    enabled: bool | None = None

    @field_validator("steps")
    @classmethod
    def _grouping(cls, steps: list[AnyStep] | None) -> list[AnyStep] | None:
        if steps is not None:
            check_steps(steps)
        return steps

    @field_validator("on_acknowledge")
    @classmethod
    def _ack(cls, steps: list[NotifyStep | SmsStep] | None) -> list[NotifyStep | SmsStep] | None:
        if steps is not None:
            check_acknowledge(steps)
        return steps

    def to_update(self) -> m.ScenarioUpdate:
        return m.ScenarioUpdate(**_stored(self, self.model_fields_set))


def _stored(body: BaseModel, fields: set[str]) -> dict[str, Any]:
    """The body's fields as the registry stores them: ids as UUIDs, the definition as JSON values."""
    out: dict[str, Any] = {}
    for name in fields:
        value = getattr(body, name)
        if name in ("trigger", "conditions", "steps", "on_acknowledge") and value is not None:
            value = body.model_dump(mode="json", include={name})[name]
        out[name] = value
    return out


@dataclass(frozen=True)
class Resource:
    """One tenant-scoped collection and the operations it supports, as its table spec says."""

    table: AnySpec
    list_query: type[ListQuery]
    update_query: type[BaseModel]
    create_model: type[BaseModel]  # the request body of create (and the CLI's create options)
    update_model: type[BaseModel] | None  # the request body of update; None: rows are not edited

    @classmethod
    def of(cls, spec: AnySpec) -> Resource:
        return cls(spec, list_query(spec), update_query(spec), spec.create, spec.update)

    @property
    def name(self) -> str:
        """Singular, as in the audit log's ``entity``: ``credential_ref``."""
        return self.table.name

    @property
    def plural(self) -> str:
        """Path segment and OpenAPI tag: ``credential-refs``."""
        return self.table.plural

    @property
    def read_model(self) -> type[BaseModel]:
        return self.table.record

    @property
    def page_model(self) -> type[BaseModel]:
        return page_model(self.read_model)

    @property
    def create_verb(self) -> str:
        return self.table.create_verb

    @property
    def columns(self) -> tuple[str, ...]:
        return self.table.columns

    @property
    def description(self) -> str:
        return self.table.description

    @property
    def updatable(self) -> bool:
        return self.update_model is not None

    @property
    def deletable(self) -> bool:
        return self.table.deletable

    @property
    def revocable(self) -> bool:
        return self.table.revoked_at is not None

    async def create(self, conn: Connection, data: BaseModel, actor: str, correlation: Correlation) -> BaseModel:
        return await registry.create(conn, self.table, data, actor=actor, correlation=correlation)

    async def get(self, conn: Connection, row_id: UUID) -> BaseModel:
        return await registry.get(conn, self.table, row_id)

    async def list(self, conn: Connection, query: ListQuery) -> Sequence[BaseModel]:
        filters = {f.column: getattr(query, f.column) for f in self.table.filters}
        return await registry.list_rows(conn, self.table, limit=query.limit, after=query.after, **filters)

    async def update(self, conn: Connection, row_id: UUID, data: BaseModel, query: BaseModel, actor: str,
                     correlation: Correlation) -> BaseModel:
        return await registry.update(conn, self.table, row_id, data, actor=actor, correlation=correlation,
                                     expected_version=getattr(query, "expected_version", None))

    async def delete(self, conn: Connection, row_id: UUID, actor: str, correlation: Correlation) -> None:
        await registry.delete(conn, self.table, row_id, actor=actor, correlation=correlation)

    async def revoke(self, conn: Connection, row_id: UUID, actor: str, correlation: Correlation) -> BaseModel:
        return await registry.revoke(conn, self.table, row_id, actor=actor, correlation=correlation)


class ScenarioResource(Resource):
    """Scenario bodies are typed by :mod:`iim.scenarios.model` (a bad definition is a 422 with the location
    of each error) and stored through :mod:`iim.scenarios.registry`, which validates what results."""

    async def create(self, conn: Connection, data: BaseModel, actor: str, correlation: Correlation) -> BaseModel:
        assert isinstance(data, ScenarioCreateBody)
        return await scenario_registry.create_scenario(conn, data.to_create(), actor=actor, correlation=correlation)

    async def update(self, conn: Connection, row_id: UUID, data: BaseModel, query: BaseModel, actor: str,
                     correlation: Correlation) -> BaseModel:
        assert isinstance(data, ScenarioUpdateBody)
        return await scenario_registry.update_scenario(
            conn, row_id, data.to_update(), actor=actor, correlation=correlation,
            expected_version=getattr(query, "expected_version", None))


class SubscriberCreateBody(m.SubscriberCreate):
    msisdn: m.PhoneNumber = Field(
        description="E.164, or a national or international form under the tenant's numbering plan "
                    "(8 900 123-45-67, 00 7 900 ...); stored as E.164")


class SubscriberUpdateBody(m.SubscriberUpdate):
    msisdn: m.PhoneNumber | None = Field(
        default=None, description="as on create: any form the tenant's numbering plan reads; stored as E.164")


class SubscriberQuery(ListQuery):
    msisdn: m.PhoneNumber | None = Field(
        default=None, description="only the subscriber with this number (any form the tenant's plan reads)")


class SubscriberResource(Resource):
    """A subscriber's number is typed by people: it is read under the tenant's numbering plan and stored in
    E.164 (a number the plan cannot read is a 422). It is also a contact alert calls may dial: one the
    tenant's originate plan refuses (another country, a premium or satellite range) is a 422 here rather
    than a call refused at 3 a.m."""

    async def create(self, conn: Connection, data: BaseModel, actor: str, correlation: Correlation) -> BaseModel:
        assert isinstance(data, m.SubscriberCreate)
        stored = m.SubscriberCreate(**(data.model_dump() | {"msisdn": await _stored_number(conn, data.msisdn)}))
        return await super().create(conn, stored, actor, correlation)

    async def update(self, conn: Connection, row_id: UUID, data: BaseModel, query: BaseModel, actor: str,
                     correlation: Correlation) -> BaseModel:
        assert isinstance(data, m.SubscriberUpdate)
        fields = {name: getattr(data, name) for name in data.model_fields_set}
        if data.msisdn is not None:
            fields["msisdn"] = await _stored_number(conn, data.msisdn)
        return await super().update(conn, row_id, m.SubscriberUpdate(**fields), query, actor, correlation)

    async def list(self, conn: Connection, query: ListQuery) -> Sequence[BaseModel]:
        number = getattr(query, "msisdn", None)
        if number is None:
            return await super().list(conn, query)
        e164 = to_e164_or_422(number, await registry.get_numbering_plan(conn), ["query", "msisdn"])
        return await registry.list_rows(conn, self.table, limit=query.limit, after=query.after, msisdn=e164)


_CALLERS = ("allowed_callers", "blocked_callers")


class PolicyCreateBody(m.PolicyCreate):
    allowed_callers: list[m.PhoneNumber] = Field(
        default_factory=list,
        description="callers DND and quiet hours do not stop: any form the tenant's numbering plan reads; "
                    "stored as E.164")
    blocked_callers: list[m.PhoneNumber] = Field(
        default_factory=list, description="callers refused: as allowed_callers")


class PolicyUpdateBody(m.PolicyUpdate):
    allowed_callers: list[m.PhoneNumber] | None = None
    blocked_callers: list[m.PhoneNumber] | None = None


class PolicyResource(Resource):
    """A policy's caller lists are numbers people type: read under the tenant's numbering plan and stored in
    E.164, which is how IIM compares the caller of a call (read under the same plan)."""

    async def create(self, conn: Connection, data: BaseModel, actor: str, correlation: Correlation) -> BaseModel:
        assert isinstance(data, m.PolicyCreate)
        fields = data.model_dump() | await _callers_in_e164(conn, data)
        return await super().create(conn, m.PolicyCreate(**fields), actor, correlation)

    async def update(self, conn: Connection, row_id: UUID, data: BaseModel, query: BaseModel, actor: str,
                     correlation: Correlation) -> BaseModel:
        assert isinstance(data, m.PolicyUpdate)
        fields = {name: getattr(data, name) for name in data.model_fields_set} | await _callers_in_e164(conn, data)
        return await super().update(conn, row_id, m.PolicyUpdate(**fields), query, actor, correlation)


async def _callers_in_e164(conn: Connection, data: BaseModel) -> dict[str, list[str]]:
    lists = {name: getattr(data, name) for name in _CALLERS if getattr(data, name) is not None}
    if not any(lists.values()):
        return lists
    plan = await registry.get_numbering_plan(conn)
    return {name: list(dict.fromkeys(to_e164_or_422(n, plan, ["body", name, i]) for i, n in enumerate(numbers)))
            for name, numbers in lists.items()}


def to_e164_or_422(number: str, plan: NumberingPlan, loc: list[str | int]) -> str:
    """``number`` in E.164 under ``plan``; when the plan cannot read it, a 422 naming the body field (a 400
    for a query parameter)."""
    try:
        return to_e164(number, plan)
    except NotANumber as exc:
        problem = InvalidParameter if loc[0] == "query" else ValidationFailed
        raise problem(f"{loc[-1]}: {exc.reason}",
                      errors=[FieldError(loc=loc, msg=exc.reason, type="not_a_number")]) from exc


async def _stored_number(conn: Connection, number: str) -> str:
    """The number as stored: E.164 under the tenant's numbering plan, admitted by its originate plan."""
    e164 = to_e164_or_422(number, await registry.get_numbering_plan(conn), ["body", "msisdn"])
    row, allowed = await registry.get_originate_plan(conn, e164)
    stored = (None, None, None, allowed) if row is None else (
        row.max_concurrent, row.max_per_hour, row.country_codes, allowed)
    refusal = number_refusal(e164, limits_from(stored, OriginateLimits()))
    if refusal is not None:
        raise ValidationFailed(
            f"msisdn: {refusal.detail} (see originate-limits and originate-allows)",
            errors=[FieldError(loc=["body", "msisdn"], msg=refusal.detail, type=refusal.reason)])
    return e164


_PAGES: dict[type[BaseModel], type[BaseModel]] = {}


def page_model(item: type[BaseModel]) -> type[BaseModel]:
    """``{"items": [<item>...], "next_after": uuid | null}`` (one class per item model, cached)."""
    found = _PAGES.get(item)
    if found is None:
        found = create_model(
            f"{item.__name__}Page",
            __config__=ConfigDict(extra="forbid"),
            items=(list[item], ...),  # type: ignore[valid-type]
            next_after=(UUID | None, Field(default=None, description="pass as ?after= for the next page")),
        )
        _PAGES[item] = found
    return found


def _resource(spec: AnySpec) -> Resource:
    if spec is registry.SCENARIO:
        return ScenarioResource(spec, list_query(spec), update_query(spec), ScenarioCreateBody, ScenarioUpdateBody)
    if spec is registry.POLICY:
        return PolicyResource(spec, list_query(spec), update_query(spec), PolicyCreateBody, PolicyUpdateBody)
    if spec is registry.SUBSCRIBER:
        return SubscriberResource(spec, SubscriberQuery, update_query(spec), SubscriberCreateBody,
                                  SubscriberUpdateBody)
    return Resource.of(spec)


RESOURCES: tuple[Resource, ...] = tuple(_resource(spec) for spec in registry.TABLES if spec is not registry.TENANT)

BY_NAME: dict[str, Resource] = {r.name: r for r in RESOURCES}
