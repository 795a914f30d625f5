"""Per-tenant data keys in the admin API (admin only): their status, and a tenant's data-key rotation.

``GET /v1/keys`` shows each tenant's data keys (ids and master-key fingerprints, never a key) with how many
sealed fields each opens. ``POST /v1/tenants/{t}/keys/rotate`` starts the rotation ``iim keys rotate --tenant``
runs (a new data key, then the rows re-sealed in batches): it can outlast any request deadline, so it runs as a
background job of this process and the answer is 202; ``GET /v1/tenants/{t}/keys/rotation`` shows its
progress. One job per tenant at a time (409 otherwise). The request is audited with the caller as actor
(``keys.rotation_requested``), and the rotation itself as the CLI's is (``keys.data_key_rotated``,
``keys.rows_resealed``). A job's state lives in this process only: after a restart, ``{"finish": true}``
re-seals what an interrupted job left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Literal
from uuid import UUID

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from iim.admin.bodies import parse_body, parse_query
from iim.admin.problems import (
    Conflict,
    InvalidParameter,
    MalformedRequest,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from iim.admin.resources import NoQuery
from iim.admin.routing import Access, PathParam, Route
from iim.admin.views import PRINCIPAL, REQUEST_ID, SERVICE, SETTINGS, json_response, path_uuid
from iim.core.errors import STORE_UNAVAILABLE
from iim.core.lifecycle import AsyncResource, TaskSupervisor
from iim.key_rotation import TenantKeys, rotate_data_key, tenant_keys
from iim.keys import store as key_store
from iim.keys.keyring import Keyring
from iim.linking.sealing import Sealer
from policy_cache import audit
from policy_cache.db import Pool

__all__ = ["KeyRotations", "KeyStatusPage", "RotateBody", "RotationJob", "key_routes"]

log = logging.getLogger(__name__)


class RotateBody(BaseModel):
    """What ``iim keys rotate --tenant T [--finish] [--batch N]`` takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    finish: bool = Field(default=False, description="no new data key: only re-seal rows still on older ones")
    batch: int = Field(default=500, ge=1, le=5000, description="rows re-sealed per transaction")


class KeyRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key_id: int
    master_key_id: str = Field(description="fingerprint of the master key wrapping it")
    current_master: bool = Field(description="wrapped by this instance's current master key")
    created_at: datetime
    rows: int = Field(ge=0, description="sealed fields this key opens")


class TenantKeyStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant_id: UUID
    active_key_id: int | None = Field(description="the key new fields are sealed with (null: none yet)")
    keys: list[KeyRow]
    clear_rows: int = Field(ge=0, description="sensitive fields still in clear (from before sealing)")
    legacy_rows: int = Field(default=0, ge=0, description="account-link secrets still sealed with the old link "
                                                          "token key (IIM_LINK_TOKEN_KEY_REF): re-sealed at start")

    @classmethod
    def of(cls, found: TenantKeys, master_key_id: str) -> TenantKeyStatus:
        return cls(tenant_id=found.tenant_id, active_key_id=found.active_key_id, clear_rows=found.clear_rows,
                   legacy_rows=found.legacy_rows,
                   keys=[KeyRow(key_id=k.key_id, master_key_id=k.master_key_id,
                                current_master=k.master_key_id == master_key_id, created_at=k.created_at,
                                rows=k.rows) for k in found.keys])


class KeyStatusPage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    master_key_id: str = Field(description="fingerprint of this instance's current master key")
    items: list[TenantKeyStatus]


class KeyStatusQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: UUID | None = Field(default=None, description="only this tenant")


class RotationJob(BaseModel):
    """A tenant's data-key rotation running (or last run) in this process."""

    model_config = ConfigDict(extra="forbid")

    tenant_id: UUID
    state: Literal["running", "done", "failed"]
    actor: str
    finish: bool
    started_at: datetime
    finished_at: datetime | None = None
    key_id: int | None = Field(default=None, description="the data key rows are re-sealed with")
    resealed: dict[str, int] = Field(default_factory=dict, description="rows re-sealed so far, by table")
    unreadable: int = Field(default=0, ge=0, description="rows that did not open (logged, left as they were)")
    error: str | None = Field(default=None, description="why a failed job stopped (run again with finish)")


class KeyRotations(AsyncResource):
    """The rotation jobs of this process: one per tenant at a time, owned (cancelled on close) by a
    :class:`TaskSupervisor`."""

    def __init__(self, pool: Callable[[], Pool], keyring: Callable[[], Keyring],
                 legacy: Callable[[], Sealer | None] = lambda: None) -> None:
        self._pool = pool
        self._keyring = keyring
        self._legacy = legacy  # the old link token key, while given: old-format link secrets converted too
        self._jobs: dict[UUID, RotationJob] = {}
        self._tasks = TaskSupervisor()

    async def aclose(self) -> None:
        await self._tasks.aclose()

    def job(self, tenant_id: UUID) -> RotationJob | None:
        return self._jobs.get(tenant_id)

    def begin(self, tenant_id: UUID, body: RotateBody, *, actor: str) -> RotationJob:
        """Start a job (:class:`Conflict` while one runs for the tenant)."""
        running = self._jobs.get(tenant_id)
        if running is not None and running.state == "running":
            raise Conflict(f"a key rotation of tenant {tenant_id} is running (GET .../keys/rotation)")
        job = RotationJob(tenant_id=tenant_id, state="running", actor=actor, finish=body.finish,
                          started_at=datetime.now(UTC))
        self._jobs[tenant_id] = job
        self._tasks.spawn(self._run(job, body), name=f"key-rotation-{tenant_id}")
        return job

    async def _run(self, job: RotationJob, body: RotateBody) -> None:
        def started(key_id: int) -> None:
            job.key_id = key_id

        def progress(table: str, rows: int) -> None:
            job.resealed[table] = job.resealed.get(table, 0) + rows

        try:
            done = await rotate_data_key(self._pool(), self._keyring(), job.tenant_id, actor=job.actor,
                                         batch=body.batch, new_key=not body.finish, started=started,
                                         progress=progress, legacy=self._legacy())
        except Exception as exc:  # the job's outcome, shown by GET; the operator runs it again with finish
            job.state, job.error = "failed", type(exc).__name__
            log.exception("key rotation of tenant %s failed", job.tenant_id)
        else:
            job.state, job.resealed, job.unreadable = "done", dict(done.resealed), done.unreadable
        job.finished_at = datetime.now(UTC)


@contextmanager
def _store_errors() -> Iterator[None]:
    try:
        yield
    except STORE_UNAVAILABLE as exc:
        raise StoreUnavailable("the key store cannot be reached now; retry later") from exc


def key_routes(rotations: KeyRotations, pool: Callable[[], Pool], directory_pool: Callable[[], Pool],
               keyring: Callable[[], Keyring]) -> list[Route]:
    """The routes (relative to the API prefix); ``directory_pool`` lists the tenants (the cache role's)."""

    async def status(request: web.Request) -> web.Response:
        query = parse_query(request, KeyStatusQuery)
        master = keyring().master.key_id
        with _store_errors():
            async with asyncio.timeout(request.config_dict[SETTINGS].store_deadline_s):
                every = await key_store.tenant_ids(directory_pool())
                tenants = [t for t in every if query.tenant_id in (None, t)]
                if query.tenant_id is not None and not tenants:
                    raise NotFound(f"tenant {query.tenant_id} not found")
                items = [TenantKeyStatus.of(await tenant_keys(pool(), t), master) for t in tenants]
        return json_response(KeyStatusPage(master_key_id=master, items=items))

    async def rotate(request: web.Request) -> web.Response:
        parse_query(request, NoQuery)
        body = await parse_body(request, RotateBody, request.config_dict[SETTINGS].max_body_bytes)
        tenant_id, actor = path_uuid(request, "tenant_id"), request[PRINCIPAL].actor
        running = rotations.job(tenant_id)
        if running is not None and running.state == "running":
            raise Conflict(f"a key rotation of tenant {tenant_id} is running (GET .../keys/rotation)")
        async with request.config_dict[SERVICE].in_tenant(tenant_id, write=True) as conn:  # 404: no such tenant
            await audit.append(conn, tenant_id, actor=actor, action="keys.rotation_requested",
                               entity="tenant_data_key", entity_id=str(tenant_id),
                               detail=body.model_dump(mode="json"),
                               correlation={"channel": "admin-api", "request_id": request[REQUEST_ID]})
        job = rotations.begin(tenant_id, body, actor=actor)
        return json_response(job, status=202)

    async def progress(request: web.Request) -> web.Response:
        parse_query(request, NoQuery)
        job = rotations.job(path_uuid(request, "tenant_id"))
        if job is None:
            raise NotFound("no key rotation of this tenant has run in this process")
        return json_response(job)

    tenant = PathParam("tenant_id", "the tenant's id")
    return [
        Route("GET", "/keys", status, "listDataKeys",
              "Each tenant's data keys (ids and master-key fingerprints, never a key) and the rows each seals",
              "keys", Access.ADMIN, query_model=KeyStatusQuery, response_model=KeyStatusPage,
              errors=(NotFound, StoreUnavailable, InvalidParameter)),
        Route("POST", "/tenants/{tenant_id}/keys/rotate", rotate, "rotateDataKey",
              "Rotate the tenant's data key: a new key, then its rows re-sealed in batches, as a background job "
              "(progress: GET .../keys/rotation)", "keys", Access.ADMIN, path_params=(tenant,),
              query_model=NoQuery, request_model=RotateBody, response_model=RotationJob, response_status=202,
              response_description="Started",
              errors=(NotFound, Conflict, StoreUnavailable, MalformedRequest, PayloadTooLarge, UnsupportedMediaType,
                      ValidationFailed, InvalidParameter)),
        Route("GET", "/tenants/{tenant_id}/keys/rotation", progress, "getDataKeyRotation",
              "The tenant's data-key rotation running or last run in this process, with its progress", "keys",
              Access.ADMIN, path_params=(tenant,), query_model=NoQuery, response_model=RotationJob,
              errors=(NotFound, InvalidParameter)),
    ]
