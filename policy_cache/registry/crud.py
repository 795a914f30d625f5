"""Generic CRUD over a :class:`~policy_cache.registry.tables.TableSpec`: SQL, audit rows, typed errors.

Every function takes a connection inside :func:`policy_cache.db.tenant_tx` (``iim_app``): row-level
security scopes reads and writes to that tenant, and new rows take their ``tenant_id`` from it. Every
change writes exactly one audit row (``iim.audit_append``) in the same transaction, with the actor, the
action and a before/after summary that never contains secrets (the spec's ``digest`` columns are reduced
to a digest, secret-looking keys are redacted). Database errors are mapped to :mod:`policy_cache.errors`
by SQLSTATE (:func:`store_errors`, also for a module's own statements on a registry table).

SQL identifiers come from the specs and the models' field names, never from callers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
from pydantic import BaseModel

from policy_cache.db import Connection
from policy_cache.errors import (
    Conflict,
    InvalidData,
    InvalidReference,
    NotFound,
    TenantIsolationError,
    VersionConflict,
)
from policy_cache.registry.tables import TableSpec

__all__ = ["Correlation", "create", "delete", "get", "list_rows", "revoke", "row_values", "store_errors", "update"]

Correlation = Mapping[str, str] | None
R = TypeVar("R", bound=BaseModel)
C = TypeVar("C", bound=BaseModel)
U = TypeVar("U", bound=BaseModel | None)
AnySpec = TableSpec[Any, Any, Any]

_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
_SECRET_KEY = re.compile(r"(pass(word|wd)?|secret|token|api[_-]?key|private[_-]?key|credential|authorization)$",
                         re.IGNORECASE)
_AUDIT_SKIP = frozenset({"tenant_id", "created_at", "updated_at"})


# -- error mapping --------------------------------------------------------------------------------------

@contextmanager
def store_errors(spec: AnySpec) -> Iterator[None]:
    """Map SQLSTATE-typed asyncpg errors on ``spec``'s table to the registry's errors (chained)."""
    entity = spec.name
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"{entity} already exists ({exc.constraint_name})", entity=entity,
                       constraint=exc.constraint_name) from exc
    except asyncpg.ForeignKeyViolationError as exc:
        raise InvalidReference(f"{entity}: {exc.detail or exc.message}", entity=entity,
                               constraint=exc.constraint_name) from exc
    except asyncpg.NotNullViolationError as exc:
        if exc.column_name in ("tenant_id", spec.tenant_column):
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


def _summary(spec: AnySpec, model: BaseModel) -> dict[str, Any]:
    data = model.model_dump(mode="json")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in _AUDIT_SKIP:
            continue
        out[key] = _digest(value) if key in spec.digest else _redact(value)
    return out


async def _audit(
    conn: Connection, spec: AnySpec, row: asyncpg.Record, actor: str, action: str, detail: dict[str, Any],
    correlation: Correlation,
) -> None:
    await conn.execute(
        "SELECT iim.audit_append($1, $2, $3, $4, $5, $6, $7)",
        row[spec.tenant_column], actor, action, spec.name, str(row["id"]), detail, dict(correlation or {}),
    )


# -- statement parts ------------------------------------------------------------------------------------

def _column(name: str) -> str:
    if not _IDENT.match(name):  # pragma: no cover - model field names are identifiers
        raise ValueError(f"bad column name {name!r}")
    return name


def _db_value(value: Any) -> Any:
    if isinstance(value, frozenset | set):
        return sorted(value)
    return value


def row_values(data: BaseModel, *, only_set: bool) -> dict[str, Any]:
    """The columns ``data`` writes: every field (create), or only those explicitly set (update)."""
    names = data.model_fields_set if only_set else type(data).model_fields.keys()
    return {_column(n): _db_value(getattr(data, n)) for n in names}


async def _fetch_one(conn: Connection, spec: AnySpec, row_id: UUID, *, lock: bool) -> asyncpg.Record:
    sql = f"SELECT * FROM {spec.table} WHERE id = $1" + (" FOR UPDATE" if lock else "")  # noqa: S608
    with store_errors(spec):
        row = await conn.fetchrow(sql, row_id)
    if row is None:
        raise NotFound(f"{spec.name} {row_id} not found", entity=spec.name)
    return row


async def _update_row(
    conn: Connection, spec: AnySpec, row_id: UUID, values: dict[str, Any], *, actor: str,
    correlation: Correlation, action: str | None, expected_version: int | None,
) -> asyncpg.Record:
    before_row = await _fetch_one(conn, spec, row_id, lock=True)
    if expected_version is not None and before_row["version"] != expected_version:
        raise VersionConflict(f"{spec.name} {row_id} is at version {before_row['version']}, "
                              f"not {expected_version}", entity=spec.name)
    if not values:
        return before_row
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(values, start=2))
    sql = f"UPDATE {spec.table} SET {sets} WHERE id = $1 RETURNING *"  # noqa: S608 - identifiers are ours
    with store_errors(spec):
        row = await conn.fetchrow(sql, row_id, *values.values())
        if row is None:  # pragma: no cover - the row is locked above
            raise NotFound(f"{spec.name} {row_id} not found", entity=spec.name)
        before = _summary(spec, spec.record.model_validate(dict(before_row)))
        after = _summary(spec, spec.record.model_validate(dict(row)))
        changed = {k: {"from": before.get(k), "to": v} for k, v in after.items() if before.get(k) != v}
        changed.pop("version", None)
        if changed:
            await _audit(conn, spec, row, actor, action or f"{spec.name}.update", {"changed": changed}, correlation)
    return row


# -- operations -----------------------------------------------------------------------------------------

async def create(conn: Connection, spec: TableSpec[R, C, Any], data: C, *, actor: str,
                 correlation: Correlation = None) -> R:
    """Insert a row (audit action ``<name>.create``). A new tenant's id is the transaction's tenant:
    ``async with tenant_tx(pool, new_id) as conn: await create(conn, TENANT, ...)``."""
    values = row_values(data, only_set=False)
    cols = list(values)
    sql = (f"INSERT INTO {spec.table} ({', '.join(cols)}) "  # noqa: S608 - identifiers are ours
           f"VALUES ({', '.join(f'${i}' for i in range(1, len(cols) + 1))}) RETURNING *")
    with store_errors(spec):
        row = await conn.fetchrow(sql, *values.values())
        assert row is not None
        record = spec.record.model_validate(dict(row))
        await _audit(conn, spec, row, actor, f"{spec.name}.create", {"after": _summary(spec, record)}, correlation)
    return record


async def get(conn: Connection, spec: TableSpec[R, Any, Any], row_id: UUID, *, lock: bool = False) -> R:
    """The row (``lock``: ``FOR UPDATE``, to the end of the transaction); :class:`NotFound` if invisible."""
    return spec.record.model_validate(dict(await _fetch_one(conn, spec, row_id, lock=lock)))


async def list_rows(conn: Connection, spec: TableSpec[R, Any, Any], *, limit: int = 100, after: UUID | None = None,
                    **where: object) -> list[R]:
    """Rows whose columns equal ``where`` (a ``None`` value does not filter), keyset-paginated by id:
    pass the last id of a page as ``after`` for the next one."""
    conds: list[str] = []
    args: list[Any] = []
    for col, value in where.items():
        if col not in spec.record.model_fields:
            raise ValueError(f"{spec.name} has no column {col!r}")
        if value is None:
            continue
        args.append(value)
        conds.append(f"{_column(col)} = ${len(args)}")
    if after is not None:
        args.append(after)
        conds.append(f"id > ${len(args)}")
    args.append(limit)
    sql = (f"SELECT * FROM {spec.table}"  # noqa: S608 - identifiers are ours
           + (" WHERE " + " AND ".join(conds) if conds else "")
           + f" ORDER BY id LIMIT ${len(args)}")
    with store_errors(spec):
        rows = await conn.fetch(sql, *args)
    return [spec.record.model_validate(dict(r)) for r in rows]


async def update(conn: Connection, spec: TableSpec[R, Any, U], row_id: UUID, data: U, *, actor: str,
                 correlation: Correlation = None, expected_version: int | None = None,
                 action: str | None = None) -> R:
    """Partial update: only the fields set in ``data`` are written (``None`` clears a nullable column).

    One audit row (``action``, default ``<name>.update``) listing what changed; none when nothing did.
    ``expected_version`` (versioned tables) makes it conditional (:class:`VersionConflict`); the database
    bumps ``version`` on every effective change.
    """
    if data is None or spec.update is None:
        raise TypeError(f"{spec.name} rows are not updated")
    if expected_version is not None and not spec.versioned:
        raise TypeError(f"{spec.name} rows have no version")
    row = await _update_row(conn, spec, row_id, row_values(data, only_set=True), actor=actor,
                            correlation=correlation, action=action, expected_version=expected_version)
    return spec.record.model_validate(dict(row))


async def revoke(conn: Connection, spec: TableSpec[R, Any, Any], row_id: UUID, *, actor: str,
                 correlation: Correlation = None) -> R:
    """Set the spec's ``revoked_at`` to now (audit ``<name>.revoke``). Idempotent: a revoked row is
    returned unchanged, without a new audit row."""
    if spec.revoked_at is None:
        raise TypeError(f"{spec.name} rows are not revoked")
    current = await _fetch_one(conn, spec, row_id, lock=True)
    if current[spec.revoked_at] is not None:
        return spec.record.model_validate(dict(current))
    now = await conn.fetchval("SELECT now()")
    row = await _update_row(conn, spec, row_id, {_column(spec.revoked_at): now}, actor=actor,
                            correlation=correlation, action=f"{spec.name}.revoke", expected_version=None)
    return spec.record.model_validate(dict(row))


async def delete(conn: Connection, spec: AnySpec, row_id: UUID, *, actor: str, correlation: Correlation = None) -> None:
    """Delete a row (the database cascades to its dependants; audit ``<name>.delete`` with its last state).

    :class:`InvalidReference` while another row still refers to it (a device to its credential_ref ...).
    """
    if not spec.deletable:
        raise TypeError(f"{spec.name} rows are not deleted")
    sql = f"DELETE FROM {spec.table} WHERE id = $1 RETURNING *"  # noqa: S608 - identifiers are ours
    with store_errors(spec):
        row = await conn.fetchrow(sql, row_id)
        if row is None:
            raise NotFound(f"{spec.name} {row_id} not found", entity=spec.name)
        before = spec.record.model_validate(dict(row))
        await _audit(conn, spec, row, actor, f"{spec.name}.delete", {"before": _summary(spec, before)}, correlation)
