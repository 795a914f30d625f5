"""The registry resources the admin API and CLI expose, as data: models, filters and repository calls.

One :class:`Resource` per tenant-scoped collection (``/v1/tenants/{tenant_id}/<plural>``). The
models are the repository's own (:mod:`policy_cache.models`); the calls are thin adapters onto
:mod:`policy_cache.repository`, which writes the audit row of every change in the same transaction.
Tenants themselves are not a :class:`Resource` (they have their own routes and rules).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

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
from policy_cache import repository as repo
from policy_cache.db import Connection
from policy_cache.errors import NotFound

Correlation = dict[str, str]
Creator = Callable[[Connection, Any, str, Correlation], Awaitable[BaseModel]]
Getter = Callable[[Connection, UUID], Awaitable[BaseModel]]
Lister = Callable[[Connection, Any], Awaitable[Sequence[BaseModel]]]
Updater = Callable[[Connection, UUID, Any, Any, str, Correlation], Awaitable[BaseModel]]
Deleter = Callable[[Connection, UUID, str, Correlation], Awaitable[None]]
Revoker = Callable[[Connection, UUID, str, Correlation], Awaitable[BaseModel]]

DEFAULT_PAGE = 100
MAX_PAGE = 1000


class ListQuery(BaseModel):
    """Keyset pagination: ``after`` is the ``next_after`` of the previous page."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: int = Field(default=DEFAULT_PAGE, ge=1, le=MAX_PAGE, description="page size")
    after: UUID | None = Field(default=None, description="return rows with an id greater than this one")


class DeviceQuery(ListQuery):
    household_id: UUID | None = Field(default=None, description="only devices of this household")


class SubscriberQuery(ListQuery):
    msisdn: m.Msisdn | None = Field(default=None, description="only the subscriber with this E.164 number")


class BindingQuery(ListQuery):
    subscriber_id: UUID | None = Field(default=None, description="only bindings of this subscriber")
    household_id: UUID | None = Field(default=None, description="only bindings to this household")


class ConsentQuery(ListQuery):
    subscriber_id: UUID | None = Field(default=None, description="only consents of this subscriber")
    purpose: m.ConsentPurpose | None = Field(default=None, description="only consents for this purpose")


class PolicyUpdateQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    expected_version: int | None = Field(
        default=None, ge=1, description="apply only if the policy is still at this version (else 409)"
    )


class ScenarioQuery(ListQuery):
    household_id: UUID | None = Field(default=None, description="only scenarios of this household")
    subscriber_id: UUID | None = Field(default=None, description="only scenarios of this subscriber")
    name: str | None = Field(default=None, min_length=1, max_length=200, description="only the scenario so named")
    enabled: bool | None = Field(default=None, description="only enabled (true) or disabled (false) scenarios")


class ScenarioUpdateQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    expected_version: int | None = Field(
        default=None, ge=1, description="apply only if the scenario is still at this version (else 409)"
    )


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
    """The body's fields as the repository stores them: ids as UUIDs, the definition as JSON values."""
    out: dict[str, Any] = {}
    for name in fields:
        value = getattr(body, name)
        if name in ("trigger", "conditions", "steps", "on_acknowledge") and value is not None:
            value = body.model_dump(mode="json", include={name})[name]
        out[name] = value
    return out


class NoQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class Resource:
    """One tenant-scoped collection and the operations it supports."""

    name: str  # singular, as in the audit log's ``entity`` and the CLI command: "household"
    plural: str  # path segment and OpenAPI tag: "households"
    read_model: type[BaseModel]
    create_model: type[BaseModel]
    list_query: type[ListQuery]
    create: Creator
    get: Getter
    list: Lister
    update_model: type[BaseModel] | None = None
    update_query: type[BaseModel] = NoQuery
    update: Updater | None = None
    delete: Deleter | None = None
    revoke: Revoker | None = None
    create_verb: str = "create"  # "grant" for consents (CLI sub-command and OpenAPI summary)
    columns: tuple[str, ...] = ("id",)  # the CLI's table view
    description: str = ""

    @property
    def page_model(self) -> type[BaseModel]:
        return page_model(self.read_model)


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


RESOURCES: tuple[Resource, ...] = (
    Resource(
        name="brand", plural="brands", read_model=m.Brand, create_model=m.BrandCreate, list_query=ListQuery,
        create=lambda c, d, a, k: repo.create_brand(c, d, actor=a, correlation=k),
        get=lambda c, i: _get_by_list(repo.list_brands, c, i, "brand"),
        list=lambda c, q: repo.list_brands(c, limit=q.limit, after=q.after),
        delete=lambda c, i, a, k: repo.delete_brand(c, i, actor=a, correlation=k),
        columns=("id", "name"),
        description="Brands of the tenant (operator -> brand/region -> household).",
    ),
    Resource(
        name="region", plural="regions", read_model=m.Region, create_model=m.RegionCreate,
        list_query=ListQuery,
        create=lambda c, d, a, k: repo.create_region(c, d, actor=a, correlation=k),
        get=lambda c, i: _get_by_list(repo.list_regions, c, i, "region"),
        list=lambda c, q: repo.list_regions(c, limit=q.limit, after=q.after),
        delete=lambda c, i, a, k: repo.delete_region(c, i, actor=a, correlation=k),
        columns=("id", "name"),
        description="Regions of the tenant.",
    ),
    Resource(
        name="household", plural="households", read_model=m.Household, create_model=m.HouseholdCreate,
        list_query=ListQuery,
        create=lambda c, d, a, k: repo.create_household(c, d, actor=a, correlation=k),
        get=repo.get_household,
        list=lambda c, q: repo.list_households(c, limit=q.limit, after=q.after),
        update_model=m.HouseholdUpdate,
        update=lambda c, i, d, q, a, k: repo.update_household(c, i, d, actor=a, correlation=k),
        delete=lambda c, i, a, k: repo.delete_household(c, i, actor=a, correlation=k),
        columns=("id", "name", "time_zone", "presence", "external_id"),
        description="Households (homes/locations); deleting one deletes its devices, bindings and policy.",
    ),
    Resource(
        name="subscriber", plural="subscribers", read_model=m.Subscriber, create_model=m.SubscriberCreate,
        list_query=SubscriberQuery,
        create=lambda c, d, a, k: repo.create_subscriber(c, d, actor=a, correlation=k),
        get=repo.get_subscriber,
        list=lambda c, q: _list_subscribers(c, q),
        update_model=m.SubscriberUpdate,
        update=lambda c, i, d, q, a, k: repo.update_subscriber(c, i, d, actor=a, correlation=k),
        delete=lambda c, i, a, k: repo.delete_subscriber(c, i, actor=a, correlation=k),
        columns=("id", "msisdn", "sip_aor", "display_name", "external_id"),
        description="Subscribers (MSISDN unique per tenant); deleting one deletes its bindings, consents, policy.",
    ),
    Resource(
        name="device", plural="devices", read_model=m.Device, create_model=m.DeviceCreate,
        list_query=DeviceQuery,
        create=lambda c, d, a, k: repo.create_device(c, d, actor=a, correlation=k),
        get=repo.get_device,
        list=lambda c, q: repo.list_devices(c, household_id=q.household_id, limit=q.limit, after=q.after),
        update_model=m.DeviceUpdate,
        update=lambda c, i, d, q, a, k: repo.update_device(c, i, d, actor=a, correlation=k),
        delete=lambda c, i, a, k: repo.delete_device(c, i, actor=a, correlation=k),
        columns=("id", "household_id", "name", "type", "status", "enabled"),
        description="Devices of a household (speakers, hubs, sensors, wearables, doorphones).",
    ),
    Resource(
        name="binding", plural="bindings", read_model=m.Binding, create_model=m.BindingCreate,
        list_query=BindingQuery,
        create=lambda c, d, a, k: repo.create_binding(c, d, actor=a, correlation=k),
        get=repo.get_binding,
        list=lambda c, q: repo.list_bindings(
            c, subscriber_id=q.subscriber_id, household_id=q.household_id, limit=q.limit, after=q.after
        ),
        update_model=m.BindingUpdate,
        update=lambda c, i, d, q, a, k: repo.update_binding(c, i, d, actor=a, correlation=k),
        delete=lambda c, i, a, k: repo.delete_binding(c, i, actor=a, correlation=k),
        columns=("id", "subscriber_id", "household_id", "device_id", "role", "priority"),
        description="Subscriber <-> household (<-> device) bindings.",
    ),
    Resource(
        name="consent", plural="consents", read_model=m.Consent, create_model=m.ConsentCreate,
        list_query=ConsentQuery,
        create=lambda c, d, a, k: repo.grant_consent(c, d, actor=a, correlation=k),
        get=repo.get_consent,
        list=lambda c, q: repo.list_consents(
            c, subscriber_id=q.subscriber_id, purpose=q.purpose, limit=q.limit, after=q.after
        ),
        revoke=lambda c, i, a, k: repo.revoke_consent(c, i, actor=a, correlation=k),
        create_verb="grant",
        columns=("id", "subscriber_id", "purpose", "granted_at", "expires_at", "revoked_at"),
        description="Consents are granted and revoked (revoked_at is set), never edited or deleted.",
    ),
    Resource(
        name="policy", plural="policies", read_model=m.Policy, create_model=m.PolicyCreate,
        list_query=ListQuery,
        create=lambda c, d, a, k: repo.create_policy(c, d, actor=a, correlation=k),
        get=repo.get_policy,
        list=lambda c, q: repo.list_policies(c, limit=q.limit, after=q.after),
        update_model=m.PolicyUpdate,
        update_query=PolicyUpdateQuery,
        update=lambda c, i, d, q, a, k: repo.update_policy(
            c, i, d, actor=a, expected_version=q.expected_version, correlation=k
        ),
        delete=lambda c, i, a, k: repo.delete_policy(c, i, actor=a, correlation=k),
        columns=("id", "subscriber_id", "household_id", "ring_mode", "dnd", "version"),
        description="Routing policies of a subscriber (override) or a household (default for its members).",
    ),
    Resource(
        name="scenario", plural="scenarios", read_model=m.ScenarioRecord, create_model=ScenarioCreateBody,
        list_query=ScenarioQuery,
        create=lambda c, d, a, k: scenario_registry.create_scenario(c, d.to_create(), actor=a, correlation=k),
        get=scenario_registry.get_scenario,
        list=lambda c, q: scenario_registry.list_scenarios(
            c, household_id=q.household_id, subscriber_id=q.subscriber_id, name=q.name, enabled=q.enabled,
            limit=q.limit, after=q.after
        ),
        update_model=ScenarioUpdateBody,
        update_query=ScenarioUpdateQuery,
        update=lambda c, i, d, q, a, k: scenario_registry.update_scenario(
            c, i, d.to_update(), actor=a, expected_version=q.expected_version, correlation=k
        ),
        delete=lambda c, i, a, k: scenario_registry.delete_scenario(c, i, actor=a, correlation=k),
        columns=("id", "name", "household_id", "subscriber_id", "enabled", "version"),
        description="Escalation scenarios for device incidents: trigger, conditions, steps (see iim.scenarios.model); "
                    "also: iim scenario simulate | templates.",
    ),
    Resource(
        name="credential_ref", plural="credential-refs", read_model=m.CredentialRef,
        create_model=m.CredentialRefCreate, list_query=ListQuery,
        create=lambda c, d, a, k: repo.create_credential_ref(c, d, actor=a, correlation=k),
        get=repo.get_credential_ref,
        list=lambda c, q: repo.list_credential_refs(c, limit=q.limit, after=q.after),
        update_model=m.CredentialRefUpdate,
        update=lambda c, i, d, q, a, k: repo.update_credential_ref(c, i, d, actor=a, correlation=k),
        delete=lambda c, i, a, k: repo.delete_credential_ref(c, i, actor=a, correlation=k),
        columns=("id", "name", "kind", "ref", "rotated_at"),
        description="References into the secret store (env:, file:, vault:, kms:); never the secret itself.",
    ),
)

BY_NAME: dict[str, Resource] = {r.name: r for r in RESOURCES}


async def _list_subscribers(conn: Connection, query: SubscriberQuery) -> Sequence[BaseModel]:
    if query.msisdn is None:
        return await repo.list_subscribers(conn, limit=query.limit, after=query.after)
    try:
        found = await repo.get_subscriber_by_msisdn(conn, query.msisdn)
    except NotFound:
        return []
    return [found] if query.after is None or found.id > query.after else []


async def _get_by_list(
    lister: Callable[..., Awaitable[Sequence[Any]]], conn: Connection, row_id: UUID, entity: str
) -> BaseModel:
    """Brands and regions have no ``get_*`` in the repository: the row after ``row_id - 1`` is the row."""
    rows = await lister(conn, limit=1, after=_predecessor(row_id))
    if rows and rows[0].id == row_id:
        found: BaseModel = rows[0]
        return found
    raise NotFound(f"{entity} {row_id} not found", entity=entity)


def _predecessor(value: UUID) -> UUID | None:
    n = value.int
    return None if n == 0 else UUID(int=n - 1)
