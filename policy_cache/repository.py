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

import hashlib
import json
import re
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, time
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

class RoutingDevice(NamedTuple):
    id: UUID
    type: DeviceType
    vendor: str | None
    capabilities: frozenset[DeviceCapability]
    sip_uri: str | None
    connector: str | None
    connector_ref: str | None
    status: DeviceStatus
    status_changed_at: datetime


class RoutingHousehold(NamedTuple):
    """A household with its enabled devices; one object shared by the rows of all its members."""

    id: UUID
    time_zone: str
    presence: PresenceState
    presence_changed_at: datetime
    devices: tuple[RoutingDevice, ...]


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


class RoutingPolicy(NamedTuple):
    """A policy; a household's policy object is shared by the rows of its members."""

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
    * ``policy``: the effective one - the subscriber's own, else the primary household's (``scope``).
      Quiet hours are local times of the primary household's zone.
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


# Flat, index-free scans; each is streamed through a cursor. {f} is empty for a full load, or restricts
# the scan to the subscribers in $1 (and to their households).
_Q_BINDINGS = """
SELECT b.tenant_id, b.subscriber_id, b.household_id, b.role::text, b.priority, b.device_id
FROM iim.binding b WHERE b.role IN ('owner', 'member') {f}
"""
_Q_HOUSEHOLDS = """
SELECT h.tenant_id, h.id, h.time_zone, h.presence::text, h.presence_changed_at FROM iim.household h {f}
"""
_Q_DEVICES = """
SELECT d.tenant_id, d.household_id, d.id, d.type::text, d.vendor, d.capabilities::text[], d.sip_uri,
       d.connector, d.connector_ref, d.status::text, d.status_changed_at
FROM iim.device d WHERE d.enabled {f}
"""
_Q_POLICIES = """
SELECT p.tenant_id, p.subscriber_id, p.household_id, p.id, p.ring_mode::text, p.phone_timeout_s,
       p.home_timeout_s, p.quiet_start, p.quiet_end, p.dnd, p.allowed_callers, p.blocked_callers,
       p.home_only_when_present, p.fallback::text, p.version
FROM iim.policy p {f}
"""
_Q_CONSENTS = """
SELECT c.tenant_id, c.subscriber_id, c.purpose::text, c.scope::text, c.expires_at
FROM iim.consent c WHERE c.revoked_at IS NULL AND (c.expires_at IS NULL OR c.expires_at > now()) {f}
"""
_Q_SUBSCRIBERS = "SELECT s.tenant_id, s.id, s.msisdn, s.sip_aor FROM iim.subscriber s {f}"

_SOME_HH = "(SELECT DISTINCT tenant_id, household_id FROM iim.binding WHERE subscriber_id = ANY($1::uuid[]))"
_FILTERS_ALL = {"b": "", "h": "", "d": "", "p": "", "c": "", "s": ""}
_FILTERS_SOME = {
    "b": "AND b.subscriber_id = ANY($1::uuid[])",
    "h": f"WHERE (h.tenant_id, h.id) IN {_SOME_HH}",
    "d": f"AND (d.tenant_id, d.household_id) IN {_SOME_HH}",
    "p": f"WHERE p.subscriber_id = ANY($1::uuid[]) OR (p.tenant_id, p.household_id) IN {_SOME_HH}",
    "c": "AND c.subscriber_id = ANY($1::uuid[])",
    "s": "WHERE s.id = ANY($1::uuid[])",
}

_DEVICE_TYPES = {m.value: m for m in DeviceType}
_DEVICE_STATUS = {m.value: m for m in DeviceStatus}
_PRESENCE = {m.value: m for m in PresenceState}
_ROLES = {m.value: m for m in BindingRole}
_ROLE_RANK = {BindingRole.OWNER: 0, BindingRole.MEMBER: 1}
_RING = {m.value: m for m in RingMode}
_FALLBACK = {m.value: m for m in FallbackAction}
_PURPOSE = {m.value: m for m in ConsentPurpose}

_Key = tuple[UUID, UUID]  # (tenant_id, id): ids are unique per tenant only


class _Interner:
    """Shares equal immutable values (capability sets, caller lists) between rows."""

    def __init__(self) -> None:
        self._caps: dict[tuple[str, ...], frozenset[DeviceCapability]] = {}
        self._strs: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._json: dict[str, Mapping[str, Any]] = {}

    def caps(self, values: Sequence[str]) -> frozenset[DeviceCapability]:
        key = tuple(values)
        found = self._caps.get(key)
        if found is None:
            found = self._caps[key] = frozenset(DeviceCapability(v) for v in key)
        return found

    def strs(self, values: Sequence[str]) -> tuple[str, ...]:
        key = tuple(values)
        return self._strs.setdefault(key, key)

    def json(self, text: str) -> Mapping[str, Any]:
        found = self._json.get(text)
        if found is None:
            found = self._json[text] = MappingProxyType(json.loads(text))
        return found


class RoutingStream:
    """Async iterator over :class:`RoutingRow`; see :func:`load_routing_rows`.

    Attributes (set once iteration has started):
        watermark: the change seq the rows are complete up to; continue with ``changes_since(watermark)``.
        affected: for an incremental load, the subscriber ids that changed: those with no row were deleted
            and must be dropped from the cache. ``None`` for a full load.
    """

    def __init__(self, conn: Connection, since_seq: int | None, subscriber_ids: Sequence[UUID] | None,
                 prefetch: int) -> None:
        self._conn = conn
        self._since = since_seq
        self._ids = None if subscriber_ids is None else list(subscriber_ids)
        self._prefetch = prefetch
        self.watermark: int | None = None
        self.affected: frozenset[UUID] | None = None

    def __aiter__(self) -> AsyncIterator[RoutingRow]:
        return self._rows()

    async def _rows(self) -> AsyncIterator[RoutingRow]:
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
        filters = _FILTERS_ALL if ids is None else _FILTERS_SOME
        args: tuple[Any, ...] = () if ids is None else (ids,)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.execute("SET LOCAL cursor_tuple_fraction = 1.0")

            async def scan(sql: str, key: str) -> AsyncIterator[list[asyncpg.Record]]:
                # Batches, not `async for` over the cursor: that costs several microseconds per row.
                cursor = await conn.cursor(sql.format(f=filters[key]), *args)
                while batch := await cursor.fetch(self._prefetch):
                    yield batch

            intern = _Interner()
            devices: dict[_Key, list[RoutingDevice]] = {}
            async for batch in scan(_Q_DEVICES, "d"):
                for r in batch:
                    devices.setdefault((r[0], r[1]), []).append(RoutingDevice(
                        r[2], _DEVICE_TYPES[r[3]], r[4], intern.caps(r[5]), r[6], r[7], r[8], _DEVICE_STATUS[r[9]],
                        r[10]))
            households: dict[_Key, RoutingHousehold] = {}
            async for batch in scan(_Q_HOUSEHOLDS, "h"):
                for r in batch:
                    key = (r[0], r[1])
                    found = devices.pop(key, None)
                    households[key] = RoutingHousehold(r[1], r[2], _PRESENCE[r[3]], r[4],
                                                       tuple(sorted(found, key=_by_id)) if found else ())
            del devices
            bindings: dict[_Key, list[RoutingBinding]] = {}
            async for batch in scan(_Q_BINDINGS, "b"):
                for r in batch:
                    hh = households.get((r[0], r[2]))
                    if hh is not None:
                        bindings.setdefault((r[0], r[1]), []).append(
                            RoutingBinding(hh, _ROLES[r[3]], r[4], r[5]))
            sub_policy: dict[_Key, RoutingPolicy] = {}
            hh_policy: dict[_Key, RoutingPolicy] = {}
            async for batch in scan(_Q_POLICIES, "p"):
                for r in batch:
                    personal = r[1] is not None
                    policy = RoutingPolicy(
                        r[3], "subscriber" if personal else "household", _RING[r[4]], r[5], r[6], r[7], r[8],
                        r[9], intern.strs(r[10]), intern.strs(r[11]), r[12], _FALLBACK[r[13]], r[14])
                    if personal:
                        sub_policy[(r[0], r[1])] = policy
                    else:
                        hh_policy[(r[0], r[2])] = policy
            consents: dict[_Key, list[RoutingConsent]] = {}
            async for batch in scan(_Q_CONSENTS, "c"):
                for r in batch:
                    consents.setdefault((r[0], r[1]), []).append(
                        RoutingConsent(_PURPOSE[r[2]], intern.json(r[3]), r[4]))

            no_bindings: tuple[RoutingBinding, ...] = ()
            no_consents: tuple[RoutingConsent, ...] = ()
            async for batch in scan(_Q_SUBSCRIBERS, "s"):
                for r in batch:
                    key = (r[0], r[1])
                    found_bindings = bindings.pop(key, None)
                    if found_bindings is None:
                        subscriber_bindings = no_bindings
                    else:
                        if len(found_bindings) > 1:
                            found_bindings.sort(key=_binding_order)
                        subscriber_bindings = tuple(found_bindings)
                    effective = sub_policy.get(key)
                    if effective is None and subscriber_bindings:
                        effective = hh_policy.get((r[0], subscriber_bindings[0].household.id))
                    found_consents = consents.pop(key, None)
                    yield RoutingRow(r[0], r[1], r[2], r[3], effective, subscriber_bindings,
                                     tuple(found_consents) if found_consents else no_consents)


def _by_id(device: RoutingDevice) -> UUID:
    return device.id


def _binding_order(b: RoutingBinding) -> tuple[int, int, UUID]:
    return (_ROLE_RANK.get(b.role, 2), b.priority, b.household.id)


def load_routing_rows(
    conn: Connection, since_seq: int | None = None, *, subscriber_ids: Sequence[UUID] | None = None,
    prefetch: int = 50_000,
) -> RoutingStream:
    """Stream the routing rows of every subscriber of every tenant (or of those changed / listed).

    A few flat set-based scans (devices, households, bindings, policies, consents, then subscribers) in one
    REPEATABLE READ READ ONLY snapshot, each streamed through a server-side cursor (``prefetch`` rows per
    round trip) and joined here in dictionaries; household and policy objects are shared between the rows
    of a household's members. Use a connection of the ``iim_cache`` role, outside a transaction.

    * ``since_seq=None, subscriber_ids=None``: full load; ``stream.watermark`` is taken (barrier) before the
      snapshot, so the rows include every change up to it.
    * ``since_seq=N``: only subscribers affected by changes after ``N`` (``stream.affected``), watermark =
      the newest of those changes.
    * ``subscriber_ids=[...]``: exactly those subscribers.

    Usage::

        stream = load_routing_rows(conn)
        async for row in stream:
            ...
        last_seen = stream.watermark

    Stop early only through ``contextlib.aclosing(aiter(stream))`` so the transaction closes promptly.
    """
    return RoutingStream(conn, since_seq, subscriber_ids, prefetch)
