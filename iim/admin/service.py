"""The registry service behind the admin API: tenant-scoped transactions and error mapping.

Handlers never touch SQL or asyncpg: they call :class:`RegistryService`, which opens a
:func:`policy_cache.db.tenant_tx` (read-only for reads), checks that the tenant exists, calls
the registry's CRUD (which audits every change in the same transaction, with the actor passed here)
and maps the store's errors to API problems at this one boundary::

    policy_cache.errors.NotFound            -> NotFound            404 not-found
    policy_cache.errors.VersionConflict     -> VersionConflict     409 version-conflict
    policy_cache.errors.Conflict            -> Conflict            409 conflict
    policy_cache.errors.InvalidReference    -> InvalidReference    422 invalid-reference
                                               (StillReferenced   409 still-referenced, on delete)
    policy_cache.errors.InvalidData         -> ValidationFailed    422 validation-failed
    policy_cache.errors.TenantIsolationError-> Forbidden           403 forbidden
    connection loss, pool timeout           -> StoreUnavailable    503 store-unavailable
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, cast
from uuid import UUID, uuid4

from pydantic import BaseModel, ConfigDict, Field

from iim.admin import problems
from iim.admin.problems import FieldError
from iim.admin.resources import AnySpec, Correlation, ListQuery, Resource
from iim.core.errors import STORE_UNAVAILABLE
from iim.privacy.erasure import ErasureReport, erase_subscriber
from policy_cache import audit, audit_heads, registry
from policy_cache import errors as store
from policy_cache.db import Connection, Pool, tenant_tx
from policy_cache.models import Tenant, TenantCreate, TenantUpdate

log = logging.getLogger("iim.admin")

PoolProvider = Callable[[], Pool]
#: Revoke, at the vendors, the account links of the subscriber's own homes: ``(tenant, subscriber, actor)`` -> how
#: many (the running service's account linking, which holds the vendors' configuration).
UnlinkOnErase = Callable[[UUID, UUID, str], Awaitable[int]]


class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    entity: str | None = Field(default=None, max_length=100, description="only rows about this entity kind")
    entity_id: str | None = Field(default=None, max_length=200, description="only rows about this row id")
    limit: int = Field(default=100, ge=1, le=1000)


class AuditRecord(BaseModel):
    """One audit row as the API shows it (hashes as hex)."""

    model_config = ConfigDict(extra="forbid")

    tenant_id: UUID
    id: int
    at: str
    actor: str
    action: str
    entity: str
    entity_id: str | None
    detail: dict[str, Any]
    correlation: dict[str, Any]
    prev_hash: str
    row_hash: str


class AuditPage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[AuditRecord] = Field(description="newest first")


class PublishedHead(BaseModel):
    """A chain head published earlier (``iim audit verify --heads``): its row id and hash then."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=1, description="the head row's id")
    hash: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="its row_hash (hex) when it was published")


class HeadsToVerify(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    heads: list[PublishedHead] = Field(default_factory=list, max_length=1000)


class ChainStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    intact: bool
    first_broken_id: int | None = None
    head_id: int | None = None
    head_hash: str | None = None
    heads_checked: int = Field(default=0, description="published heads checked against the chain")
    heads_off_chain: list[int] = Field(
        default_factory=list, description="seqs of published heads no longer on the chain (re-hashed or truncated)")




def _constraint_field(exc: store.RepositoryError) -> list[FieldError] | None:
    """``subscriber_tenant_id_msisdn_key`` -> the body field ``msisdn`` (for Conflict's ``errors``)."""
    name = exc.constraint or ""
    prefix = f"{exc.entity}_tenant_id_"
    if not name.startswith(prefix) or not name.endswith("_key"):
        return None
    column = name[len(prefix):-len("_key")]
    if not column or "_id_" in column:
        return None
    return [FieldError(loc=["body", column], msg="already taken in this tenant", type="unique")]


@contextmanager
def map_store_errors(*, deleting: bool = False) -> Iterator[None]:
    """Translate the store's typed errors into API problems (chained, so logs keep the cause)."""
    try:
        yield
    except store.NotFound as exc:
        raise problems.NotFound(str(exc)) from exc
    except store.VersionConflict as exc:
        raise problems.VersionConflict(str(exc)) from exc
    except store.Conflict as exc:
        raise problems.Conflict(str(exc), errors=_constraint_field(exc)) from exc
    except store.InvalidReference as exc:
        if deleting:
            raise problems.StillReferenced(f"cannot delete: {exc}") from exc
        raise problems.InvalidReference(str(exc)) from exc
    except store.InvalidData as exc:
        raise problems.ValidationFailed(str(exc)) from exc
    except store.TenantIsolationError as exc:
        raise problems.Forbidden(str(exc)) from exc
    except STORE_UNAVAILABLE as exc:
        log.warning("registry store unavailable: %s", type(exc).__name__)
        raise problems.StoreUnavailable("the registry database cannot be reached; retry later") from exc


#: Resources whose rows are personal data (numbers, names, a household's contacts, consents): every admin
#: read of them is audited with the actor (``<entity>.read``), in the reading transaction.
SENSITIVE_READS = frozenset({"subscriber", "binding", "consent"})


async def _audit_read(conn: Connection, actor: str, entity: str, row_id: UUID | None,
                      correlation: Correlation | None, detail: dict[str, Any]) -> None:
    await audit.stage(conn, actor=actor or "unknown", action=f"{entity}.read", entity=entity, entity_id=row_id,
                      detail=detail, correlation=correlation)


async def _household_scope(conn: Connection, household_id: UUID) -> tuple[UUID | None, UUID | None] | None:
    try:
        row = await registry.get(conn, registry.HOUSEHOLD, household_id)
    except store.NotFound:
        return None
    return row.brand_id, row.region_id


async def _row_household(conn: Connection, spec: AnySpec, row_id: UUID) -> UUID | None:
    """The household ``row_id`` of ``spec`` belongs to (None: no such row, or none)."""
    if spec is registry.HOUSEHOLD:
        return row_id
    try:
        row = await registry.get(conn, spec, row_id)
    except store.NotFound:
        return None
    if spec is registry.SIA_ACCOUNT:
        return await _row_household(conn, registry.DEVICE, getattr(row, "device_id"))  # noqa: B009
    household = getattr(row, "household_id", None)
    return household if isinstance(household, UUID) else None


class RegistryService:
    """Registry operations for the API, each in one tenant-scoped transaction.

    Args:
        app_pool: returns the ``iim_app`` pool (tenant-scoped by row-level security).
        directory_pool: returns an ``iim_cache`` pool, which may read the tenant list across tenants;
            without it, only principals bound to one tenant can list tenants.
    """

    def __init__(self, app_pool: PoolProvider, directory_pool: PoolProvider | None = None, *,
                 deadline_s: float = 5.0, recordings_dir: Path | None = None,
                 unlink_on_erase: UnlinkOnErase | None = None) -> None:
        self._app_pool = app_pool
        self._recordings_dir = recordings_dir
        self._unlink_on_erase = unlink_on_erase
        self._directory_pool = directory_pool
        self._deadline_s = deadline_s

    def _pool(self, provider: PoolProvider) -> Pool:
        try:
            return provider()
        except LookupError as exc:
            raise problems.StoreUnavailable("the registry database is not connected yet") from exc

    @asynccontextmanager
    async def _tx(self, tenant_id: UUID, *, write: bool, deleting: bool = False) -> AsyncIterator[Connection]:
        # One deadline for the whole transaction: a stalled database is a 503 (``TimeoutError`` is one of
        # STORE_UNAVAILABLE), not a request that hangs as long as the stall.
        with map_store_errors(deleting=deleting):
            async with asyncio.timeout(self._deadline_s), tenant_tx(self._pool(self._app_pool), tenant_id,
                                                                    readonly=not write) as conn:
                yield conn

    async def _require_tenant(self, conn: Connection, tenant_id: UUID) -> Tenant:
        try:
            return await registry.get(conn, registry.TENANT, tenant_id)
        except store.NotFound as exc:
            raise problems.NotFound(f"tenant {tenant_id} not found") from exc

    # -- tenants ------------------------------------------------------------------------------------

    async def list_all_tenants(self, query: ListQuery) -> list[Tenant]:
        if self._directory_pool is None:
            raise problems.StoreUnavailable("listing every tenant needs the directory (iim_cache) pool")
        with map_store_errors():
            async with self._pool(self._directory_pool).acquire() as proxy:
                conn = cast(Connection, proxy)
                return await registry.list_rows(conn, registry.TENANT, limit=query.limit, after=query.after)

    async def list_own_tenant(self, tenant_id: UUID, query: ListQuery) -> list[Tenant]:
        if query.after is not None and tenant_id <= query.after:
            return []
        async with self._tx(tenant_id, write=False) as conn:
            return await registry.list_rows(conn, registry.TENANT, limit=1)

    async def create_tenant(self, data: TenantCreate, actor: str, correlation: Correlation) -> Tenant:
        new_id = uuid4()
        async with self._tx(new_id, write=True) as conn:
            return await registry.create(conn, registry.TENANT, data, actor=actor, correlation=correlation)

    async def get_tenant(self, tenant_id: UUID) -> Tenant:
        async with self._tx(tenant_id, write=False) as conn:
            return await self._require_tenant(conn, tenant_id)

    async def update_tenant(self, tenant_id: UUID, data: TenantUpdate, actor: str, correlation: Correlation) -> Tenant:
        async with self._tx(tenant_id, write=True) as conn:
            await self._require_tenant(conn, tenant_id)
            return await registry.update(conn, registry.TENANT, tenant_id, data, actor=actor, correlation=correlation)

    async def delete_tenant(self, tenant_id: UUID, actor: str, correlation: Correlation) -> None:
        async with self._tx(tenant_id, write=True, deleting=True) as conn:
            await self._require_tenant(conn, tenant_id)
            await registry.delete(conn, registry.TENANT, tenant_id, actor=actor, correlation=correlation)

    async def household_scope(self, tenant_id: UUID, household_id: UUID) -> tuple[UUID | None, UUID | None] | None:
        """The household's brand and region, for a grant scoped to one; ``None`` when there is no such household."""
        async with self._tx(tenant_id, write=False) as conn:
            return await _household_scope(conn, household_id)

    async def rows_scope(self, tenant_id: UUID, rows: Sequence[tuple[AnySpec, UUID]],
                         ) -> list[tuple[UUID | None, UUID | None]] | None:
        """The brand and region of the household each row belongs to (a household is its own; a device, binding,
        policy or scenario names one; a SIA account through its device), for grants scoped to a brand or region.

        ``None`` when any row does not exist or belongs to no household (a tenant-wide scenario): such a request
        is in no scope, and a scoped grant gets the same refusal as for another brand's row.
        """
        found: list[tuple[UUID | None, UUID | None]] = []
        async with self._tx(tenant_id, write=False) as conn:
            for spec, row_id in rows:
                household = await _row_household(conn, spec, row_id)
                scope = None if household is None else await _household_scope(conn, household)
                if scope is None:
                    return None
                found.append(scope)
        return found

    @asynccontextmanager
    async def in_tenant(self, tenant_id: UUID, *, write: bool) -> AsyncIterator[Connection]:
        """A transaction of an existing tenant, under the service's deadline and error mapping, for operations
        kept in their own modules (``iim.admin.presence``)."""
        async with self._tx(tenant_id, write=write) as conn:
            await self._require_tenant(conn, tenant_id)
            yield conn

    # -- tenant-scoped resources --------------------------------------------------------------------

    async def create(
        self, res: Resource, tenant_id: UUID, data: BaseModel, actor: str, correlation: Correlation
    ) -> BaseModel:
        async with self._tx(tenant_id, write=True) as conn:
            await self._require_tenant(conn, tenant_id)
            return await res.create(conn, data, actor, correlation)

    async def list(self, res: Resource, tenant_id: UUID, query: ListQuery, actor: str = "",
                   correlation: Correlation | None = None) -> Sequence[BaseModel]:
        sensitive = res.name in SENSITIVE_READS
        async with self._tx(tenant_id, write=sensitive) as conn:
            await self._require_tenant(conn, tenant_id)
            rows = await res.list(conn, query)
            if sensitive:
                await _audit_read(conn, actor, res.name, None, correlation, {
                    "listed": len(rows), "query": query.model_dump(mode="json", exclude_none=True)})
            return rows

    async def get(self, res: Resource, tenant_id: UUID, row_id: UUID, actor: str = "",
                  correlation: Correlation | None = None) -> BaseModel:
        sensitive = res.name in SENSITIVE_READS
        async with self._tx(tenant_id, write=sensitive) as conn:
            await self._require_tenant(conn, tenant_id)
            row = await res.get(conn, row_id)
            if sensitive:
                await _audit_read(conn, actor, res.name, row_id, correlation, {})
            return row

    async def update(
        self, res: Resource, tenant_id: UUID, row_id: UUID, data: BaseModel, query: BaseModel, actor: str,
        correlation: Correlation,
    ) -> BaseModel:
        assert res.updatable
        async with self._tx(tenant_id, write=True) as conn:
            await self._require_tenant(conn, tenant_id)
            return await res.update(conn, row_id, data, query, actor, correlation)

    async def delete(
        self, res: Resource, tenant_id: UUID, row_id: UUID, actor: str, correlation: Correlation
    ) -> None:
        assert res.deletable
        async with self._tx(tenant_id, write=True, deleting=True) as conn:
            await self._require_tenant(conn, tenant_id)
            await res.delete(conn, row_id, actor, correlation)

    async def revoke(
        self, res: Resource, tenant_id: UUID, row_id: UUID, actor: str, correlation: Correlation
    ) -> BaseModel:
        assert res.revocable
        async with self._tx(tenant_id, write=True) as conn:
            await self._require_tenant(conn, tenant_id)
            return await res.revoke(conn, row_id, actor, correlation)

    # -- privacy ------------------------------------------------------------------------------------

    async def erase_subscriber(self, tenant_id: UUID, subscriber_id: UUID, actor: str,
                               correlation: Correlation) -> ErasureReport:
        """Right to erasure (:mod:`iim.privacy.erasure`), in one transaction; before it, the vendor-account links
        of the subscriber's own homes are revoked at the vendors (``unlink_on_erase``), which the transaction alone
        cannot do (it only drops the tokens)."""
        unlinked = 0
        if self._unlink_on_erase is not None:
            unlinked = await self._unlink_on_erase(tenant_id, subscriber_id, actor)
        async with self._tx(tenant_id, write=True) as conn:
            await self._require_tenant(conn, tenant_id)
            report = await erase_subscriber(conn, tenant_id, subscriber_id, actor=actor, correlation=correlation,
                                            recordings_dir=self._recordings_dir)
        return report.model_copy(update={"account_links_revoked": report.account_links_revoked + unlinked})

    # -- audit --------------------------------------------------------------------------------------

    async def audit_entries(self, tenant_id: UUID, query: AuditQuery) -> AuditPage:
        async with self._tx(tenant_id, write=False) as conn:
            rows = await audit.entries(conn, entity=query.entity, entity_id=query.entity_id, limit=query.limit)
        return AuditPage(items=[
            AuditRecord(
                tenant_id=r.tenant_id, id=r.id, at=r.at.isoformat(), actor=r.actor, action=r.action,
                entity=r.entity, entity_id=r.entity_id, detail=r.detail, correlation=r.correlation,
                prev_hash=r.prev_hash.hex(), row_hash=r.row_hash.hex(),
            )
            for r in rows
        ])

    async def verify_audit(self, tenant_id: UUID, heads: Sequence[PublishedHead] = ()) -> ChainStatus:
        """Recompute the chain and, given heads published earlier, check that each is still on it: an intact
        chain that lost a published head was re-hashed (or cut) at or before it."""
        async with self._tx(tenant_id, write=False) as conn:
            broken = await audit.verify_chain(conn, tenant_id)
            head = await audit.chain_head(conn, tenant_id)
            off_chain = await audit_heads.check_heads(conn, tenant_id, [(h.seq, h.hash) for h in heads])
        return ChainStatus(
            intact=broken is None and not off_chain,
            first_broken_id=broken,
            head_id=None if head is None else head[0],
            head_hash=None if head is None else head[1].hex(),
            heads_checked=len(heads),
            heads_off_chain=off_chain,
        )
