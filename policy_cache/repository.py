"""The registry's repository: SQL only, typed, one function per operation.

Every function takes a connection inside :func:`policy_cache.db.tenant_tx` (``iim_app``): row-level
security scopes reads and writes to that tenant, and new rows take their ``tenant_id`` from it. Every
change writes exactly one audit row (``iim.audit_append``) in the same transaction, with the actor, the
action and a before/after summary that never contains secrets (consent evidence is reduced to a digest,
secret-looking keys are redacted). Database errors are mapped to :mod:`policy_cache.errors` by SQLSTATE.

The cache side (role ``iim_cache``, all tenants, read-only):

* :func:`change_watermark` - barrier: the highest committed change seq (waits for in-flight writers);
* :func:`changes_since` - subscribers affected by changes after a seq, and the new seq;
* :func:`load_routing_rows` - set-based, cursor-streamed rows to compile routing snapshots from.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, time
from time import perf_counter, process_time
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, TypeVar
from uuid import UUID

import asyncpg
from pydantic import BaseModel

from policy_cache.db import Connection
from policy_cache.errors import (
    ChangeLogTruncatedError,
    Conflict,
    InvalidData,
    InvalidReference,
    NotFound,
    TenantIsolationError,
    TenantScopeError,
    VersionConflict,
)
from policy_cache.models import (
    Binding,
    BindingCreate,
    BindingRole,
    BindingUpdate,
    Brand,
    BrandCreate,
    Consent,
    ConsentCreate,
    ConsentPurpose,
    CredentialRef,
    CredentialRefCreate,
    CredentialRefUpdate,
    Device,
    DeviceCapability,
    DeviceCreate,
    DeviceStatus,
    DeviceType,
    DeviceUpdate,
    FallbackAction,
    Household,
    HouseholdCreate,
    HouseholdUpdate,
    Policy,
    PolicyCreate,
    PolicyUpdate,
    PresenceState,
    Region,
    RegionCreate,
    RingMode,
    Subscriber,
    SubscriberCreate,
    SubscriberUpdate,
    Tenant,
    TenantCreate,
    TenantUpdate,
)

__all__ = [
    # tenants, brands, regions
    "create_tenant", "get_tenant", "list_tenants", "update_tenant", "delete_tenant",
    "create_brand", "list_brands", "delete_brand", "create_region", "list_regions", "delete_region",
    # households
    "create_household", "get_household", "list_households", "update_household", "set_presence",
    "delete_household",
    # subscribers
    "create_subscriber", "get_subscriber", "get_subscriber_by_msisdn", "list_subscribers",
    "update_subscriber", "delete_subscriber",
    # devices
    "create_device", "get_device", "list_devices", "update_device", "set_device_status", "delete_device",
    # bindings
    "create_binding", "get_binding", "list_bindings", "update_binding", "delete_binding",
    # consents
    "grant_consent", "get_consent", "list_consents", "revoke_consent",
    # policies
    "create_policy", "get_policy", "get_policy_for", "list_policies", "update_policy", "delete_policy",
    # credential references
    "create_credential_ref", "get_credential_ref", "list_credential_refs", "update_credential_ref",
    "delete_credential_ref",
    # cache side
    "RoutingBinding", "RoutingConsent", "RoutingDevice", "RoutingHousehold", "RoutingPolicy", "RoutingRow",
    "RoutingStream",
    "change_watermark", "changes_since", "load_routing_rows",
]

log = logging.getLogger(__name__)

Correlation = Mapping[str, str] | None
_M = TypeVar("_M", bound=BaseModel)
_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
_LOCK_NS = 1229540685  # advisory lock namespace shared with the migrations (key 1: the change sequence)
_CHANGE_KEY = 1
_SECRET_KEY = re.compile(r"(pass(word|wd)?|secret|token|api[_-]?key|private[_-]?key|credential|authorization)$",
                         re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    model: type[BaseModel]
    #: columns summarised as a sha256 digest in audit details (personal data the audit need not repeat)
    digest: frozenset[str] = field(default_factory=frozenset)
    versioned: bool = False


_TENANT = _Table("tenant", Tenant)
_BRAND = _Table("brand", Brand)
_REGION = _Table("region", Region)
_HOUSEHOLD = _Table("household", Household)
_SUBSCRIBER = _Table("subscriber", Subscriber)
_DEVICE = _Table("device", Device)
_BINDING = _Table("binding", Binding)
_CONSENT = _Table("consent", Consent, digest=frozenset({"evidence"}))
_POLICY = _Table("policy", Policy, versioned=True)
_CREDENTIAL_REF = _Table("credential_ref", CredentialRef)

_AUDIT_SKIP = frozenset({"tenant_id", "created_at", "updated_at"})


# -- error mapping --------------------------------------------------------------------------------------

@contextmanager
def _errors(entity: str) -> Iterator[None]:
    """Map SQLSTATE-typed asyncpg errors to the repository's errors (chained)."""
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"{entity} already exists ({exc.constraint_name})", entity=entity,
                       constraint=exc.constraint_name) from exc
    except asyncpg.ForeignKeyViolationError as exc:
        raise InvalidReference(f"{entity}: {exc.detail or exc.message}", entity=entity,
                               constraint=exc.constraint_name) from exc
    except asyncpg.NotNullViolationError as exc:
        if exc.column_name == "tenant_id" or (entity == "tenant" and exc.column_name == "id"):
            raise TenantIsolationError(f"{entity}: no tenant set for this transaction (use tenant_tx)",
                                       entity=entity) from exc
        raise InvalidData(f"{entity}: {exc.column_name} is required", entity=entity) from exc
    except asyncpg.CheckViolationError as exc:
        raise InvalidData(f"{entity}: constraint {exc.constraint_name} refused the values", entity=entity,
                          constraint=exc.constraint_name) from exc
    except asyncpg.InsufficientPrivilegeError as exc:
        raise TenantIsolationError(f"{entity}: {exc.message}", entity=entity) from exc


# -- audit summaries ------------------------------------------------------------------------------------

def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "[redacted]" if _SECRET_KEY.search(k) else _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def _digest(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def _summary(table: _Table, model: BaseModel) -> dict[str, Any]:
    data = model.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in _AUDIT_SKIP:
            continue
        out[key] = _digest(value) if key in table.digest else _redact(value)
    return out


async def _audit(
    conn: Connection, tenant_id: UUID, actor: str, action: str, entity: str, entity_id: UUID,
    detail: dict[str, Any], correlation: Correlation,
) -> None:
    await conn.execute(
        "SELECT iim.audit_append($1, $2, $3, $4, $5, $6, $7)",
        tenant_id, actor, action, entity, str(entity_id), detail, dict(correlation or {}),
    )


def _tenant_of(table: _Table, row: asyncpg.Record) -> UUID:
    value: UUID = row["id"] if table is _TENANT else row["tenant_id"]
    return value


# -- generic statements (identifiers come from model field names, never from callers) -------------------

def _column(name: str) -> str:
    if not _IDENT.match(name):  # pragma: no cover - model field names are identifiers
        raise ValueError(f"bad column name {name!r}")
    return name


def _db_value(value: Any) -> Any:
    if isinstance(value, frozenset | set):
        return sorted(value)
    return value


def _values(model: BaseModel, *, only_set: bool) -> dict[str, Any]:
    names = model.model_fields_set if only_set else type(model).model_fields.keys()
    return {_column(n): _db_value(getattr(model, n)) for n in names}


def _read(table: _Table, model_type: type[_M], row: asyncpg.Record) -> _M:
    return model_type.model_validate(dict(row))


async def _insert(
    conn: Connection, table: _Table, values: dict[str, Any], *, actor: str, correlation: Correlation,
) -> asyncpg.Record:
    cols = list(values)
    sql = (f"INSERT INTO iim.{table.name} ({', '.join(cols)}) "  # noqa: S608 - identifiers are ours
           f"VALUES ({', '.join(f'${i}' for i in range(1, len(cols) + 1))}) RETURNING *")
    with _errors(table.name):
        row = await conn.fetchrow(sql, *values.values())
        assert row is not None
        after = _read(table, table.model, row)
        await _audit(conn, _tenant_of(table, row), actor, f"{table.name}.create", table.name, row["id"],
                     {"after": _summary(table, after)}, correlation)
    return row


async def _get(conn: Connection, table: _Table, row_id: UUID, *, lock: bool = False) -> asyncpg.Record:
    sql = f"SELECT * FROM iim.{table.name} WHERE id = $1" + (" FOR UPDATE" if lock else "")  # noqa: S608
    with _errors(table.name):
        row = await conn.fetchrow(sql, row_id)
    if row is None:
        raise NotFound(f"{table.name} {row_id} not found", entity=table.name)
    return row


async def _update(
    conn: Connection, table: _Table, row_id: UUID, values: dict[str, Any], *, actor: str,
    correlation: Correlation, action: str | None = None, expected_version: int | None = None,
) -> asyncpg.Record:
    before_row = await _get(conn, table, row_id, lock=True)
    if expected_version is not None and before_row["version"] != expected_version:
        raise VersionConflict(f"{table.name} {row_id} is at version {before_row['version']}, "
                              f"not {expected_version}", entity=table.name)
    if not values:
        return before_row
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(values, start=2))
    sql = f"UPDATE iim.{table.name} SET {sets} WHERE id = $1 RETURNING *"  # noqa: S608 - identifiers are ours
    with _errors(table.name):
        row = await conn.fetchrow(sql, row_id, *values.values())
        if row is None:  # pragma: no cover - the row is locked by _get
            raise NotFound(f"{table.name} {row_id} not found", entity=table.name)
        before = _summary(table, _read(table, table.model, before_row))
        after = _summary(table, _read(table, table.model, row))
        changed = {k: {"from": before.get(k), "to": v} for k, v in after.items() if before.get(k) != v}
        changed.pop("version", None)
        if changed:
            await _audit(conn, _tenant_of(table, row), actor, action or f"{table.name}.update", table.name,
                         row_id, {"changed": changed}, correlation)
    return row


async def _delete(
    conn: Connection, table: _Table, row_id: UUID, *, actor: str, correlation: Correlation,
) -> None:
    sql = f"DELETE FROM iim.{table.name} WHERE id = $1 RETURNING *"  # noqa: S608 - identifiers are ours
    with _errors(table.name):
        row = await conn.fetchrow(sql, row_id)
        if row is None:
            raise NotFound(f"{table.name} {row_id} not found", entity=table.name)
        before = _read(table, table.model, row)
        await _audit(conn, _tenant_of(table, row), actor, f"{table.name}.delete", table.name, row_id,
                     {"before": _summary(table, before)}, correlation)


async def _list(
    conn: Connection, table: _Table, where: Mapping[str, Any], *, limit: int, after: UUID | None,
) -> list[asyncpg.Record]:
    """Keyset-paginated by id: pass the last id of a page as ``after`` for the next one."""
    conds: list[str] = []
    args: list[Any] = []
    for col, value in where.items():
        if value is None:
            continue
        args.append(value)
        conds.append(f"{_column(col)} = ${len(args)}")
    if after is not None:
        args.append(after)
        conds.append(f"id > ${len(args)}")
    args.append(limit)
    sql = (f"SELECT * FROM iim.{table.name}"  # noqa: S608 - identifiers are ours
           + (" WHERE " + " AND ".join(conds) if conds else "")
           + f" ORDER BY id LIMIT ${len(args)}")
    with _errors(table.name):
        return await conn.fetch(sql, *args)


# -- tenants, brands, regions ---------------------------------------------------------------------------

async def create_tenant(conn: Connection, data: TenantCreate, *, actor: str,
                        correlation: Correlation = None) -> Tenant:
    """Create the transaction's tenant: ``async with tenant_tx(pool, new_id) as conn: create_tenant(...)``."""
    return Tenant.model_validate(dict(await _insert(conn, _TENANT, _values(data, only_set=False), actor=actor,
                                                    correlation=correlation)))


async def get_tenant(conn: Connection, tenant_id: UUID) -> Tenant:
    return Tenant.model_validate(dict(await _get(conn, _TENANT, tenant_id)))


async def list_tenants(conn: Connection, *, limit: int = 100, after: UUID | None = None) -> list[Tenant]:
    """Tenants visible to the connection: the transaction's own under RLS (all of them for the owner)."""
    return [Tenant.model_validate(dict(r)) for r in await _list(conn, _TENANT, {}, limit=limit, after=after)]


async def update_tenant(conn: Connection, tenant_id: UUID, data: TenantUpdate, *, actor: str,
                        correlation: Correlation = None) -> Tenant:
    row = await _update(conn, _TENANT, tenant_id, _values(data, only_set=True), actor=actor,
                        correlation=correlation)
    return Tenant.model_validate(dict(row))


async def delete_tenant(conn: Connection, tenant_id: UUID, *, actor: str, correlation: Correlation = None) -> None:
    """Delete a tenant and (cascading) all its registry rows. Its audit log is kept."""
    await _delete(conn, _TENANT, tenant_id, actor=actor, correlation=correlation)


async def create_brand(conn: Connection, data: BrandCreate, *, actor: str, correlation: Correlation = None) -> Brand:
    row = await _insert(conn, _BRAND, _values(data, only_set=False), actor=actor, correlation=correlation)
    return Brand.model_validate(dict(row))


async def list_brands(conn: Connection, *, limit: int = 100, after: UUID | None = None) -> list[Brand]:
    return [Brand.model_validate(dict(r)) for r in await _list(conn, _BRAND, {}, limit=limit, after=after)]


async def delete_brand(conn: Connection, brand_id: UUID, *, actor: str, correlation: Correlation = None) -> None:
    await _delete(conn, _BRAND, brand_id, actor=actor, correlation=correlation)


async def create_region(conn: Connection, data: RegionCreate, *, actor: str,
                        correlation: Correlation = None) -> Region:
    row = await _insert(conn, _REGION, _values(data, only_set=False), actor=actor, correlation=correlation)
    return Region.model_validate(dict(row))


async def list_regions(conn: Connection, *, limit: int = 100, after: UUID | None = None) -> list[Region]:
    return [Region.model_validate(dict(r)) for r in await _list(conn, _REGION, {}, limit=limit, after=after)]


async def delete_region(conn: Connection, region_id: UUID, *, actor: str, correlation: Correlation = None) -> None:
    await _delete(conn, _REGION, region_id, actor=actor, correlation=correlation)


# -- households -----------------------------------------------------------------------------------------

async def create_household(conn: Connection, data: HouseholdCreate, *, actor: str,
                           correlation: Correlation = None) -> Household:
    row = await _insert(conn, _HOUSEHOLD, _values(data, only_set=False), actor=actor, correlation=correlation)
    return Household.model_validate(dict(row))


async def get_household(conn: Connection, household_id: UUID) -> Household:
    return Household.model_validate(dict(await _get(conn, _HOUSEHOLD, household_id)))


async def list_households(conn: Connection, *, limit: int = 100, after: UUID | None = None) -> list[Household]:
    return [Household.model_validate(dict(r)) for r in await _list(conn, _HOUSEHOLD, {}, limit=limit, after=after)]


async def update_household(conn: Connection, household_id: UUID, data: HouseholdUpdate, *, actor: str,
                           correlation: Correlation = None) -> Household:
    row = await _update(conn, _HOUSEHOLD, household_id, _values(data, only_set=True), actor=actor,
                        correlation=correlation)
    return Household.model_validate(dict(row))


async def set_presence(conn: Connection, household_id: UUID, presence: PresenceState, *, actor: str,
                       correlation: Correlation = None) -> Household:
    """Presence change (``presence_changed_at`` is set by the database when the state changes)."""
    row = await _update(conn, _HOUSEHOLD, household_id, {"presence": PresenceState(presence)}, actor=actor,
                        correlation=correlation, action="household.presence")
    return Household.model_validate(dict(row))


async def delete_household(conn: Connection, household_id: UUID, *, actor: str,
                           correlation: Correlation = None) -> None:
    """Delete a household with its devices, bindings and policy."""
    await _delete(conn, _HOUSEHOLD, household_id, actor=actor, correlation=correlation)


# -- subscribers ----------------------------------------------------------------------------------------

async def create_subscriber(conn: Connection, data: SubscriberCreate, *, actor: str,
                            correlation: Correlation = None) -> Subscriber:
    row = await _insert(conn, _SUBSCRIBER, _values(data, only_set=False), actor=actor, correlation=correlation)
    return Subscriber.model_validate(dict(row))


async def get_subscriber(conn: Connection, subscriber_id: UUID) -> Subscriber:
    return Subscriber.model_validate(dict(await _get(conn, _SUBSCRIBER, subscriber_id)))


async def get_subscriber_by_msisdn(conn: Connection, msisdn: str) -> Subscriber:
    rows = await _list(conn, _SUBSCRIBER, {"msisdn": msisdn}, limit=1, after=None)
    if not rows:
        raise NotFound(f"subscriber {msisdn} not found", entity="subscriber")
    return Subscriber.model_validate(dict(rows[0]))


async def list_subscribers(conn: Connection, *, limit: int = 100, after: UUID | None = None) -> list[Subscriber]:
    return [Subscriber.model_validate(dict(r)) for r in await _list(conn, _SUBSCRIBER, {}, limit=limit, after=after)]


async def update_subscriber(conn: Connection, subscriber_id: UUID, data: SubscriberUpdate, *, actor: str,
                            correlation: Correlation = None) -> Subscriber:
    row = await _update(conn, _SUBSCRIBER, subscriber_id, _values(data, only_set=True), actor=actor,
                        correlation=correlation)
    return Subscriber.model_validate(dict(row))


async def delete_subscriber(conn: Connection, subscriber_id: UUID, *, actor: str,
                            correlation: Correlation = None) -> None:
    """Delete a subscriber with its bindings, consents and policy."""
    await _delete(conn, _SUBSCRIBER, subscriber_id, actor=actor, correlation=correlation)


# -- devices --------------------------------------------------------------------------------------------

async def create_device(conn: Connection, data: DeviceCreate, *, actor: str,
                        correlation: Correlation = None) -> Device:
    row = await _insert(conn, _DEVICE, _values(data, only_set=False), actor=actor, correlation=correlation)
    return Device.model_validate(dict(row))


async def get_device(conn: Connection, device_id: UUID) -> Device:
    return Device.model_validate(dict(await _get(conn, _DEVICE, device_id)))


async def list_devices(conn: Connection, *, household_id: UUID | None = None, limit: int = 100,
                       after: UUID | None = None) -> list[Device]:
    rows = await _list(conn, _DEVICE, {"household_id": household_id}, limit=limit, after=after)
    return [Device.model_validate(dict(r)) for r in rows]


async def update_device(conn: Connection, device_id: UUID, data: DeviceUpdate, *, actor: str,
                        correlation: Correlation = None) -> Device:
    row = await _update(conn, _DEVICE, device_id, _values(data, only_set=True), actor=actor,
                        correlation=correlation)
    return Device.model_validate(dict(row))


async def set_device_status(conn: Connection, device_id: UUID, status: DeviceStatus, *, actor: str,
                            correlation: Correlation = None) -> Device:
    """Status change (``status_changed_at`` is set by the database when the status changes)."""
    row = await _update(conn, _DEVICE, device_id, {"status": DeviceStatus(status)}, actor=actor,
                        correlation=correlation, action="device.status")
    return Device.model_validate(dict(row))


async def delete_device(conn: Connection, device_id: UUID, *, actor: str, correlation: Correlation = None) -> None:
    await _delete(conn, _DEVICE, device_id, actor=actor, correlation=correlation)


# -- bindings -------------------------------------------------------------------------------------------

async def create_binding(conn: Connection, data: BindingCreate, *, actor: str,
                         correlation: Correlation = None) -> Binding:
    row = await _insert(conn, _BINDING, _values(data, only_set=False), actor=actor, correlation=correlation)
    return Binding.model_validate(dict(row))


async def get_binding(conn: Connection, binding_id: UUID) -> Binding:
    return Binding.model_validate(dict(await _get(conn, _BINDING, binding_id)))


async def list_bindings(conn: Connection, *, subscriber_id: UUID | None = None, household_id: UUID | None = None,
                        limit: int = 100, after: UUID | None = None) -> list[Binding]:
    rows = await _list(conn, _BINDING, {"subscriber_id": subscriber_id, "household_id": household_id},
                       limit=limit, after=after)
    return [Binding.model_validate(dict(r)) for r in rows]


async def update_binding(conn: Connection, binding_id: UUID, data: BindingUpdate, *, actor: str,
                         correlation: Correlation = None) -> Binding:
    row = await _update(conn, _BINDING, binding_id, _values(data, only_set=True), actor=actor,
                        correlation=correlation)
    return Binding.model_validate(dict(row))


async def delete_binding(conn: Connection, binding_id: UUID, *, actor: str, correlation: Correlation = None) -> None:
    await _delete(conn, _BINDING, binding_id, actor=actor, correlation=correlation)


# -- consents -------------------------------------------------------------------------------------------

async def grant_consent(conn: Connection, data: ConsentCreate, *, actor: str,
                        correlation: Correlation = None) -> Consent:
    """Record a consent granted now. :class:`Conflict` if an unrevoked one exists for the purpose."""
    row = await _insert(conn, _CONSENT, _values(data, only_set=False), actor=actor, correlation=correlation)
    return Consent.model_validate(dict(row))


async def get_consent(conn: Connection, consent_id: UUID) -> Consent:
    return Consent.model_validate(dict(await _get(conn, _CONSENT, consent_id)))


async def list_consents(conn: Connection, *, subscriber_id: UUID | None = None,
                        purpose: ConsentPurpose | None = None, limit: int = 100,
                        after: UUID | None = None) -> list[Consent]:
    rows = await _list(conn, _CONSENT, {"subscriber_id": subscriber_id, "purpose": purpose},
                       limit=limit, after=after)
    return [Consent.model_validate(dict(r)) for r in rows]


async def revoke_consent(conn: Connection, consent_id: UUID, *, actor: str,
                         correlation: Correlation = None) -> Consent:
    """Revoke (idempotent: an already revoked consent is returned unchanged, without a new audit row)."""
    current = await _get(conn, _CONSENT, consent_id, lock=True)
    if current["revoked_at"] is not None:
        return Consent.model_validate(dict(current))
    now = await conn.fetchval("SELECT now()")
    row = await _update(conn, _CONSENT, consent_id, {"revoked_at": now}, actor=actor, correlation=correlation,
                        action="consent.revoke")
    return Consent.model_validate(dict(row))


# -- policies -------------------------------------------------------------------------------------------

async def create_policy(conn: Connection, data: PolicyCreate, *, actor: str,
                        correlation: Correlation = None) -> Policy:
    row = await _insert(conn, _POLICY, _values(data, only_set=False), actor=actor, correlation=correlation)
    return Policy.model_validate(dict(row))


async def get_policy(conn: Connection, policy_id: UUID) -> Policy:
    return Policy.model_validate(dict(await _get(conn, _POLICY, policy_id)))


async def get_policy_for(conn: Connection, *, subscriber_id: UUID | None = None,
                         household_id: UUID | None = None) -> Policy | None:
    """The policy attached to exactly this subscriber or household (no inheritance applied)."""
    if (subscriber_id is None) == (household_id is None):
        raise ValueError("pass exactly one of subscriber_id / household_id")
    rows = await _list(conn, _POLICY, {"subscriber_id": subscriber_id, "household_id": household_id},
                       limit=1, after=None)
    return Policy.model_validate(dict(rows[0])) if rows else None


async def list_policies(conn: Connection, *, limit: int = 100, after: UUID | None = None) -> list[Policy]:
    return [Policy.model_validate(dict(r)) for r in await _list(conn, _POLICY, {}, limit=limit, after=after)]


async def update_policy(conn: Connection, policy_id: UUID, data: PolicyUpdate, *, actor: str,
                        expected_version: int | None = None, correlation: Correlation = None) -> Policy:
    """Partial update; ``expected_version`` makes it conditional (:class:`VersionConflict` otherwise).

    The database bumps ``version`` on every effective change.
    """
    row = await _update(conn, _POLICY, policy_id, _values(data, only_set=True), actor=actor,
                        correlation=correlation, expected_version=expected_version)
    return Policy.model_validate(dict(row))


async def delete_policy(conn: Connection, policy_id: UUID, *, actor: str, correlation: Correlation = None) -> None:
    await _delete(conn, _POLICY, policy_id, actor=actor, correlation=correlation)


# -- credential references ------------------------------------------------------------------------------

async def create_credential_ref(conn: Connection, data: CredentialRefCreate, *, actor: str,
                                correlation: Correlation = None) -> CredentialRef:
    row = await _insert(conn, _CREDENTIAL_REF, _values(data, only_set=False), actor=actor,
                        correlation=correlation)
    return CredentialRef.model_validate(dict(row))


async def get_credential_ref(conn: Connection, credential_ref_id: UUID) -> CredentialRef:
    return CredentialRef.model_validate(dict(await _get(conn, _CREDENTIAL_REF, credential_ref_id)))


async def list_credential_refs(conn: Connection, *, limit: int = 100,
                               after: UUID | None = None) -> list[CredentialRef]:
    rows = await _list(conn, _CREDENTIAL_REF, {}, limit=limit, after=after)
    return [CredentialRef.model_validate(dict(r)) for r in rows]


async def update_credential_ref(conn: Connection, credential_ref_id: UUID, data: CredentialRefUpdate, *,
                                actor: str, correlation: Correlation = None) -> CredentialRef:
    row = await _update(conn, _CREDENTIAL_REF, credential_ref_id, _values(data, only_set=True), actor=actor,
                        correlation=correlation)
    return CredentialRef.model_validate(dict(row))


async def delete_credential_ref(conn: Connection, credential_ref_id: UUID, *, actor: str,
                                correlation: Correlation = None) -> None:
    """:class:`InvalidReference` while a device still uses it."""
    await _delete(conn, _CREDENTIAL_REF, credential_ref_id, actor=actor, correlation=correlation)


# -- cache side: change sequence ------------------------------------------------------------------------

def _require_autocommit(conn: Connection, what: str) -> None:
    if conn.is_in_transaction():
        # The barrier's exclusive lock would be held to the end of the caller's transaction, blocking writers.
        raise TenantScopeError(f"{what} must not run inside an open transaction")


async def change_watermark(conn: Connection) -> int:
    """Barrier: wait for in-flight policy writers, return the highest committed change seq.

    A snapshot taken after this returns contains every change up to that seq.
    """
    _require_autocommit(conn, "change_watermark")
    return int(await conn.fetchval("SELECT iim.change_barrier()"))


async def changes_since(conn: Connection, seq: int) -> tuple[list[UUID], int]:
    """Subscribers affected by changes committed after ``seq``, and the new watermark.

    Returns ``([], seq)`` when nothing changed. Never misses a change whose seq is below the returned
    watermark (see migration 0005 for the commit-order barrier).

    Raises:
        ChangeLogTruncatedError: changes after ``seq`` were pruned; reload everything.
    """
    _require_autocommit(conn, "changes_since")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _LOCK_NS, _CHANGE_KEY)
        pruned = int(await conn.fetchval("SELECT pruned_through FROM iim.change_log_state"))
        if seq < pruned:
            raise ChangeLogTruncatedError(seq, pruned)
        row = await conn.fetchrow(
            """SELECT max(seq) AS max_seq,
                      array(SELECT DISTINCT u FROM iim.change_log c, unnest(c.subscriber_ids) AS u
                            WHERE c.seq > $1) AS ids
               FROM iim.change_log WHERE seq > $1""",
            seq,
        )
    assert row is not None
    if row["max_seq"] is None:
        return [], seq
    return list(row["ids"]), int(row["max_seq"])


# -- cache side: routing rows ---------------------------------------------------------------------------
#
# Performance notes (1M subscribers must load in seconds on a 2-core machine): decoding dominates, so the
# scans are flat and narrow - one query per tenant (no tenant column), timestamps as epoch seconds
# (float8 decodes ~15x cheaper than timestamptz), capability sets as a text key, bindings and the personal
# policy merged into one subscriber scan ordered by the indexes (merge joins, no sort) - and fetched in
# batches; Python's cyclic GC is paused while millions of tuples are created.

class RoutingDevice(NamedTuple):
    id: UUID
    type: DeviceType
    vendor: str | None
    capabilities: frozenset[DeviceCapability]
    sip_uri: str | None
    connector: str | None
    connector_ref: str | None
    status: DeviceStatus
    status_since: float  # status_changed_at, epoch seconds


class RoutingPolicy(NamedTuple):
    """A policy; a household's policy object is shared by the rows of all its members."""

    id: UUID
    scope: Literal["subscriber", "household"]
    ring_mode: RingMode
    phone_timeout_s: int
    home_timeout_s: int
    quiet_start: time | None
    quiet_end: time | None
    dnd: bool
    allowed_callers: tuple[str, ...]
    blocked_callers: tuple[str, ...]
    home_only_when_present: bool
    fallback: FallbackAction
    version: int


class RoutingHousehold(NamedTuple):
    """A household, its enabled devices (by id) and its policy; one object shared by all its members."""

    id: UUID
    time_zone: str
    presence: PresenceState
    presence_since: float  # presence_changed_at, epoch seconds
    devices: tuple[RoutingDevice, ...]
    policy: RoutingPolicy | None


class RoutingBinding(NamedTuple):
    """One owner/member binding of the subscriber. ``device_id=None``: all household devices ring."""

    household: RoutingHousehold
    role: BindingRole
    priority: int
    device_id: UUID | None

    @property
    def devices(self) -> tuple[RoutingDevice, ...]:
        if self.device_id is None:
            return self.household.devices
        return tuple(d for d in self.household.devices if d.id == self.device_id)


class RoutingConsent(NamedTuple):
    """An unrevoked consent, unexpired at load time; ``expires_at`` must still be checked at use time."""

    purpose: ConsentPurpose
    scope: Mapping[str, Any]  # read-only (equal scopes are one shared object)
    expires_at: datetime | None


class RoutingRow(NamedTuple):
    """Everything needed to route calls to one subscriber.

    * ``bindings``: owner/member bindings, primary first (owner before member, then priority, then
      household id). backup_contact/security_service bindings are not here: they make the subscriber an
      escalation contact of a household, not a place where the subscriber's own calls ring.
    * ``policy``: the effective one - the subscriber's own, else the primary household's (``scope`` says
      which). Quiet hours are local times of the primary household's zone.
    * ``consents``: unrevoked and unexpired at load time (re-check ``expires_at`` when using one).
    """

    tenant_id: UUID
    subscriber_id: UUID
    msisdn: str
    sip_aor: str | None
    policy: RoutingPolicy | None
    bindings: tuple[RoutingBinding, ...]
    consents: tuple[RoutingConsent, ...]

    @property
    def primary(self) -> RoutingBinding | None:
        return self.bindings[0] if self.bindings else None

    def consent(self, purpose: ConsentPurpose, now: datetime) -> RoutingConsent | None:
        for c in self.consents:
            if c.purpose is purpose and (c.expires_at is None or c.expires_at > now):
                return c
        return None


# $1 = tenant; {f}: empty for a full load, else a restriction to the subscribers in $2 (and their households).
# Policy columns come as cheap scalars: quiet hours in seconds of the day, empty caller lists as NULL.
_Q_DEVICES = """
SELECT d.household_id, d.id, d.type, d.vendor, array_to_string(d.capabilities, ','), d.sip_uri, d.connector,
       d.connector_ref, d.status, date_part('epoch', d.status_changed_at)
FROM iim.device d
WHERE d.tenant_id = $1 AND d.enabled {f}
ORDER BY d.household_id, d.id
"""
_Q_HOUSEHOLDS = """
SELECT h.id, h.time_zone, h.presence, date_part('epoch', h.presence_changed_at),
       ph.id, ph.ring_mode, ph.phone_timeout_s, ph.home_timeout_s, extract(epoch FROM ph.quiet_start)::int4,
       extract(epoch FROM ph.quiet_end)::int4, ph.dnd, NULLIF(ph.allowed_callers, ARRAY[]::text[]),
       NULLIF(ph.blocked_callers, ARRAY[]::text[]), ph.home_only_when_present, ph.fallback, ph.version
FROM iim.household h
LEFT JOIN iim.policy ph ON ph.tenant_id = h.tenant_id AND ph.household_id = h.id
WHERE h.tenant_id = $1 {f}
"""
_Q_CONSENTS = """
SELECT c.subscriber_id, c.purpose, c.scope::text, c.expires_at
FROM iim.consent c
WHERE c.tenant_id = $1 AND c.revoked_at IS NULL AND (c.expires_at IS NULL OR c.expires_at > now()) {f}
"""
# One row per (subscriber, owner/member binding), ordered by subscriber: the planner merge-joins the three
# indexes in key order, so there is no sort.
_Q_SUBSCRIBERS = """
SELECT s.id, s.msisdn, s.sip_aor, b.household_id, b.role, b.priority, b.device_id,
       ps.id, ps.ring_mode, ps.phone_timeout_s, ps.home_timeout_s, extract(epoch FROM ps.quiet_start)::int4,
       extract(epoch FROM ps.quiet_end)::int4, ps.dnd, NULLIF(ps.allowed_callers, ARRAY[]::text[]),
       NULLIF(ps.blocked_callers, ARRAY[]::text[]), ps.home_only_when_present, ps.fallback, ps.version
FROM iim.subscriber s
LEFT JOIN iim.binding b ON b.tenant_id = s.tenant_id AND b.subscriber_id = s.id AND b.role IN ('owner', 'member')
LEFT JOIN iim.policy ps ON ps.tenant_id = s.tenant_id AND ps.subscriber_id = s.id
WHERE s.tenant_id = $1 {f}
ORDER BY s.id
"""
_SOME_HOUSEHOLDS = "(SELECT household_id FROM iim.binding WHERE tenant_id = $1 AND subscriber_id = ANY($2::uuid[]))"
_FILTER_SOME = {
    "d": f"AND d.household_id IN {_SOME_HOUSEHOLDS}",
    "h": f"AND h.id IN {_SOME_HOUSEHOLDS}",
    "c": "AND c.subscriber_id = ANY($2::uuid[])",
    "s": "AND s.id = ANY($2::uuid[])",
}
_FILTER_ALL = dict.fromkeys(_FILTER_SOME, "")

_DEVICE_TYPES = {m.value: m for m in DeviceType}
_DEVICE_STATUS = {m.value: m for m in DeviceStatus}
_PRESENCE = {m.value: m for m in PresenceState}
_ROLES = {m.value: m for m in BindingRole}
_ROLE_RANK = {BindingRole.OWNER: 0, BindingRole.MEMBER: 1}
_RING = {m.value: m for m in RingMode}
_FALLBACK = {m.value: m for m in FallbackAction}
_PURPOSE = {m.value: m for m in ConsentPurpose}
_new = tuple.__new__  # builds the NamedTuples without their Python-level __new__ (hot loops below)


class _Interner:
    """Shares equal immutable values (capability sets, caller lists, times, scopes, short texts) between rows."""

    def __init__(self) -> None:
        self.caps: dict[str, frozenset[DeviceCapability]] = {}
        self.strs: dict[tuple[str, ...], tuple[str, ...]] = {(): ()}
        self.times: dict[int, time] = {}
        self.texts: dict[str | None, str | None] = {}
        self.scopes: dict[str, Mapping[str, Any]] = {}

    def make_caps(self, text: str) -> frozenset[DeviceCapability]:
        found = self.caps[text] = frozenset(DeviceCapability(v) for v in text.split(",") if v)
        return found

    def tuple_of(self, values: Sequence[str] | None) -> tuple[str, ...]:
        if values is None:
            return ()
        key = tuple(values)
        return self.strs.setdefault(key, key)

    def time_of(self, seconds: int | None) -> time | None:
        if seconds is None:
            return None
        found = self.times.get(seconds)
        if found is None:
            found = self.times[seconds] = time(seconds // 3600, seconds // 60 % 60, seconds % 60)
        return found

    def scope(self, text: str) -> Mapping[str, Any]:
        found = self.scopes.get(text)
        if found is None:
            found = self.scopes[text] = MappingProxyType(json.loads(text))
        return found

    def policy(self, r: asyncpg.Record, i: int, scope: Literal["subscriber", "household"]) -> RoutingPolicy | None:
        """The policy in columns r[i:i+12] (id .. version), None when the outer join found none."""
        if r[i] is None:
            return None
        result: RoutingPolicy = _new(RoutingPolicy, (
            r[i], scope, _RING[r[i + 1]], r[i + 2], r[i + 3], self.time_of(r[i + 4]), self.time_of(r[i + 5]),
            r[i + 6], self.tuple_of(r[i + 7]), self.tuple_of(r[i + 8]), r[i + 9], _FALLBACK[r[i + 10]], r[i + 11]))
        return result


class RoutingStream:
    """Async iterator over :class:`RoutingRow` (or lists of them: :meth:`batches`); see :func:`load_routing_rows`.

    Attributes (set once iteration has started):
        watermark: the change seq the rows are complete up to; continue with ``changes_since(watermark)``.
        affected: for an incremental load, the subscriber ids that changed: those with no row were deleted
            and must be dropped from the cache. ``None`` for a full load.
    """

    def __init__(self, conn: Connection, since_seq: int | None, subscriber_ids: Sequence[UUID] | None,
                 batch: int) -> None:
        self._conn = conn
        self._since = since_seq
        self._ids = None if subscriber_ids is None else list(subscriber_ids)
        self._batch = batch
        self.watermark: int | None = None
        self.affected: frozenset[UUID] | None = None

    def __aiter__(self) -> AsyncIterator[RoutingRow]:
        return self._flatten()

    def batches(self) -> AsyncIterator[list[RoutingRow]]:
        """The rows in lists of up to ``batch`` (cheaper than one ``async for`` step per row)."""
        return self._batches()

    async def _flatten(self) -> AsyncIterator[RoutingRow]:
        async for batch in self._batches():
            for row in batch:
                yield row

    async def _batches(self) -> AsyncIterator[list[RoutingRow]]:
        conn = self._conn
        ids = self._ids
        if self._since is not None:
            changed, self.watermark = await changes_since(conn, self._since)
            ids = changed if ids is None else sorted(set(changed) | set(ids))
        else:
            self.watermark = await change_watermark(conn)
        if ids is not None:
            self.affected = frozenset(ids)
            if not ids:
                return
        gc_was_enabled = gc.isenabled()
        gc.disable()  # millions of new tuples would trigger repeated full collections (3x slower)
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                await conn.execute("SET LOCAL cursor_tuple_fraction = 1.0")  # plan for all rows, not the first
                if ids is None:
                    tenants = [r[0] for r in await conn.fetch("SELECT id FROM iim.tenant ORDER BY id")]
                else:
                    tenants = [r[0] for r in await conn.fetch(
                        "SELECT DISTINCT tenant_id FROM iim.subscriber WHERE id = ANY($1::uuid[])", ids)]
                intern = _Interner()
                for tenant_id in tenants:
                    async for batch in self._tenant_batches(tenant_id, ids, intern):
                        yield batch
        finally:
            if gc_was_enabled:
                gc.enable()

    async def _scan(self, sql: str, tenant_id: UUID, ids: list[UUID] | None) -> AsyncIterator[list[asyncpg.Record]]:
        """Batches from a cursor (``async for`` over a cursor costs several microseconds per row)."""
        args: tuple[Any, ...] = (tenant_id,) if ids is None else (tenant_id, ids)
        cursor = await self._conn.cursor(sql, *args)
        while batch := await cursor.fetch(self._batch):
            yield batch

    async def _tenant_batches(self, tenant_id: UUID, ids: list[UUID] | None,
                              intern: _Interner) -> AsyncIterator[list[RoutingRow]]:
        # The loops below are the hot path of a full load: locals instead of globals/attributes, no calls
        # for the common case.
        f = _FILTER_ALL if ids is None else _FILTER_SOME
        new = _new
        started, cpu_started = perf_counter(), process_time()

        device_types, device_status, caps, make_caps = _DEVICE_TYPES, _DEVICE_STATUS, intern.caps, intern.make_caps
        same = intern.texts.setdefault  # one object per distinct vendor / connector / time zone
        by_household: dict[UUID, tuple[RoutingDevice, ...]] = {}
        current: UUID | None = None
        group: list[RoutingDevice] = []
        async for batch in self._scan(_Q_DEVICES.format(f=f["d"]), tenant_id, ids):
            for r in batch:
                if r[0] != current:
                    if current is not None:
                        by_household[current] = tuple(group)
                    current, group = r[0], []
                device_caps = caps.get(r[4])
                if device_caps is None:
                    device_caps = make_caps(r[4])
                group.append(new(RoutingDevice, (r[1], device_types[r[2]], same(r[3], r[3]), device_caps, r[5],
                                                 same(r[6], r[6]), r[7], device_status[r[8]], r[9])))
        if current is not None:
            by_household[current] = tuple(group)
        del group
        t_devices, c_devices = perf_counter(), process_time()

        presence, policy_of, pop_devices = _PRESENCE, intern.policy, by_household.pop
        ring, fallback, time_of, tuple_of = _RING, _FALLBACK, intern.time_of, intern.tuple_of
        households: dict[UUID, RoutingHousehold] = {}
        no_devices: tuple[RoutingDevice, ...] = ()
        async for batch in self._scan(_Q_HOUSEHOLDS.format(f=f["h"]), tenant_id, ids):
            for r in batch:
                if r[4] is None:
                    policy = None
                else:  # intern.policy(r, 4, "household"), inlined
                    policy = new(RoutingPolicy, (
                        r[4], "household", ring[r[5]], r[6], r[7], None if r[8] is None else time_of(r[8]),
                        None if r[9] is None else time_of(r[9]), r[10], () if r[11] is None else tuple_of(r[11]),
                        () if r[12] is None else tuple_of(r[12]), r[13], fallback[r[14]], r[15]))
                households[r[0]] = new(RoutingHousehold, (r[0], same(r[1], r[1]), presence[r[2]], r[3],
                                                          pop_devices(r[0], no_devices), policy))
        del by_household
        t_households, c_households = perf_counter(), process_time()

        purposes, scope_of = _PURPOSE, intern.scope
        consents: dict[UUID, list[RoutingConsent]] = {}
        async for batch in self._scan(_Q_CONSENTS.format(f=f["c"]), tenant_id, ids):
            for r in batch:
                consent: RoutingConsent = new(RoutingConsent, (purposes[r[1]], scope_of(r[2]), r[3]))
                found = consents.get(r[0])
                if found is None:
                    consents[r[0]] = [consent]
                else:
                    found.append(consent)
        t_consents, c_consents = perf_counter(), process_time()

        # Subscriber rows arrive ordered by id, one per owner/member binding. A subscriber is emitted when
        # the next one starts. `one` holds the first binding, `more` the rest (rare).
        roles, get_household, pop_consents = _ROLES, households.get, consents.pop
        count = 0
        pending: asyncpg.Record | None = None
        pending_id: UUID | None = None
        one: RoutingBinding | None = None
        more: list[RoutingBinding] | None = None
        out: list[RoutingRow] = []

        def emit(r: asyncpg.Record, one: RoutingBinding | None, more: list[RoutingBinding] | None) -> RoutingRow:
            bindings: tuple[RoutingBinding, ...]
            if more is None:
                bindings = () if one is None else (one,)
            else:
                assert one is not None
                bindings = tuple(sorted([one, *more], key=_binding_order))
            policy = policy_of(r, 7, "subscriber")
            if policy is None and bindings:
                policy = bindings[0].household.policy
            found = pop_consents(r[0], None)
            row: RoutingRow = new(RoutingRow, (tenant_id, r[0], r[1], r[2], policy, bindings,
                                               tuple(found) if found else ()))
            return row

        async for batch in self._scan(_Q_SUBSCRIBERS.format(f=f["s"]), tenant_id, ids):
            for r in batch:
                sid = r[0]
                if sid == pending_id:  # another binding of the same subscriber
                    household = get_household(r[3])
                    if household is not None:
                        extra = new(RoutingBinding, (household, roles[r[4]], r[5], r[6]))
                        if one is None:
                            one = extra
                        elif more is None:
                            more = [extra]
                        else:
                            more.append(extra)
                    continue
                if pending is not None:
                    if more is None and pending[7] is None and one is not None:
                        # The common case, inlined: one binding, no personal policy.
                        found = pop_consents(pending[0], None)
                        out.append(new(RoutingRow, (tenant_id, pending_id, pending[1], pending[2],
                                                    one.household.policy, (one,), tuple(found) if found else ())))
                    else:
                        out.append(emit(pending, one, more))
                pending, pending_id, more = r, sid, None
                household = None if r[3] is None else get_household(r[3])
                one = None if household is None else new(RoutingBinding, (household, roles[r[4]], r[5], r[6]))
            if out:
                count += len(out)
                yield out
                out = []
        if pending is not None:
            count += 1
            yield [emit(pending, one, more)]
        t_end, c_end = perf_counter(), process_time()
        log.debug("routing load of tenant %s: %d subscribers in %.2f s (cpu %.2f s): devices %.2f s (cpu %.2f), "
                  "households %.2f s (cpu %.2f, %d), consents %.2f s (cpu %.2f), subscribers %.2f s (cpu %.2f)",
                  tenant_id, count, t_end - started, c_end - cpu_started, t_devices - started,
                  c_devices - cpu_started, t_households - t_devices, c_households - c_devices, len(households),
                  t_consents - t_households, c_consents - c_households, t_end - t_consents, c_end - c_consents)


def _binding_order(b: RoutingBinding) -> tuple[int, int, UUID]:
    return (_ROLE_RANK.get(b.role, 2), b.priority, b.household.id)


def load_routing_rows(
    conn: Connection, since_seq: int | None = None, *, subscriber_ids: Sequence[UUID] | None = None,
    batch: int = 20_000,
) -> RoutingStream:
    """Stream the routing rows of every subscriber of every tenant (or of those changed / listed).

    Per tenant, four flat set-based scans (devices, households with their policy, active consents, then
    subscribers merge-joined with their bindings and own policy) in one REPEATABLE READ READ ONLY
    snapshot, each read through a server-side cursor in batches of ``batch`` rows and joined here by id;
    household and policy objects are shared between the rows of a household's members. Rows are yielded
    while the subscriber scan streams. Use a connection of the ``iim_cache`` role, outside a transaction.
    Python's cyclic GC is paused while the stream runs (restored afterwards).

    * ``since_seq=None, subscriber_ids=None``: full load; ``stream.watermark`` is taken (barrier) before the
      snapshot, so the rows include every change up to it.
    * ``since_seq=N``: only subscribers affected by changes after ``N`` (``stream.affected``), watermark =
      the newest of those changes.
    * ``subscriber_ids=[...]``: exactly those subscribers.

    Usage::

        stream = load_routing_rows(conn)
        async for batch in stream.batches():     # or: async for row in stream
            ...
        last_seen = stream.watermark

    Stop early only through ``contextlib.aclosing(...)`` so the transaction closes promptly.
    """
    return RoutingStream(conn, since_seq, subscriber_ids, batch)
