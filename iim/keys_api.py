"""Per-tenant data keys in the admin API (admin only): their status, and a tenant's data-key rotation.

``GET /v1/keys`` shows each tenant's data keys (ids and master-key fingerprints, never a key) with how many
sealed fields each opens, and its rotation job. ``POST /v1/tenants/{t}/keys/rotate`` starts the rotation
``iim keys rotate --tenant`` runs (a new data key, then the rows re-sealed in batches): it can outlast any request
deadline, so it runs as a job (202), kept in the database (``iim.key_rotation_job``): a service that stops or
dies mid-way leaves it running, and the next one to start resumes it. ``GET /v1/tenants/{t}/keys/rotation``
shows it, from any instance, across restarts. One job per tenant at a time: a start while one runs answers
that one (``Idempotent-Replayed: true``). Audited with the caller as actor: ``keys.rotation_requested``, the
rotation's own lines (``keys.data_key_rotated``, ``keys.rows_resealed``), ``keys.rotation_resumed`` for each
resumption and ``keys.rotation_done`` (or ``_failed``) at the end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Literal, cast
from uuid import UUID

import asyncpg
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from iim.admin.bodies import parse_body, parse_query
from iim.admin.problems import (
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
from policy_cache.db import Connection, Pool, tenant_tx

__all__ = ["KeyRotations", "KeyStatusPage", "RotateBody", "RotationJob", "key_routes"]

log = logging.getLogger(__name__)


class RotateBody(BaseModel):
    """What ``iim keys rotate --tenant T [--finish] [--batch N]`` takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    finish: bool = Field(default=False, description="no new data key: only re-seal rows still on older ones")
    batch: int = Field(default=500, ge=1, le=5000, description="rows re-sealed per transaction")


class RotationJob(BaseModel):
    """A tenant's data-key rotation, running or ended (kept in the database: it survives restarts)."""

    model_config = ConfigDict(extra="forbid")

    id: UUID
    tenant_id: UUID
    state: Literal["running", "done", "failed"]
    actor: str
    finish: bool
    batch: int
    started_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    from_key_id: int | None = Field(default=None, description="the active data key when the job started")
    key_id: int | None = Field(default=None, description="the data key rows are re-sealed with")
    resealed: dict[str, int] = Field(default_factory=dict, description="rows re-sealed so far, by table "
                                                                       "(written after each batch)")
    unreadable: int = Field(default=0, ge=0, description="rows that did not open (logged, left as they were)")
    runs: int = Field(default=0, ge=0, description="times a service took the job up (more than 1: resumed "
                                                   "after a restart or a database outage)")
    error: str | None = Field(default=None, description="why a failed job stopped (run again with finish)")

    @classmethod
    def of(cls, row: asyncpg.Record) -> RotationJob:
        return cls.model_validate({name: row[name] for name in cls.model_fields})


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
    rotation: RotationJob | None = Field(default=None, description="the rotation job running, else the last one")

    @classmethod
    def of(cls, found: TenantKeys, master_key_id: str, rotation: RotationJob | None = None) -> TenantKeyStatus:
        return cls(tenant_id=found.tenant_id, active_key_id=found.active_key_id, clear_rows=found.clear_rows,
                   legacy_rows=found.legacy_rows, rotation=rotation,
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


class JobElsewhere(RuntimeError):
    """Another service holds the job's lock (this one tries again after the backoff)."""


class KeyRotations(AsyncResource):
    """Data-key rotation jobs, kept in ``iim.key_rotation_job``: at most one running per tenant (a second start
    answers it), each run by a supervised task of this process (a database outage: taken up again after a
    backoff), and every job still running when a service stopped or died resumed at :meth:`start` (with
    ``directory``, the cache role's pool, which lists them across tenants).

    A resumed job never makes a second key: it re-seals with the one it made (``key_id``, or the active key when
    that is newer than the one it started from), and only rows not yet sealed with it. Progress is written after
    each batch; a batch done just before a crash is re-sealed by nobody twice, only counted once less.
    """

    def __init__(self, pool: Callable[[], Pool], keyring: Callable[[], Keyring],
                 legacy: Callable[[], Sealer | None] = lambda: None, directory: Callable[[], Pool] | None = None,
                 *, deadline_s: float = 10.0, backoff_initial_s: float = 0.5, backoff_ceiling_s: float = 30.0,
                 ) -> None:
        self._pool = pool
        self._keyring = keyring
        self._legacy = legacy  # the old link token key, while given: old-format link secrets converted too
        self._directory = directory
        self._deadline_s = deadline_s
        self._backoff = (backoff_initial_s, backoff_ceiling_s)
        self._running: set[UUID] = set()  # ids of the jobs this process runs
        self._resumed = False
        self._tasks = TaskSupervisor()

    async def start(self) -> None:
        if self._directory is not None:
            self._tasks.supervise(self._resume_all, name="key-rotation-resume", initial=self._backoff[0],
                                  ceiling=self._backoff[1], until=lambda: self._resumed)

    async def aclose(self) -> None:
        await self._tasks.aclose()  # a job cut here stays 'running': the next start resumes it

    def running(self, job_id: UUID) -> bool:
        return job_id in self._running

    async def job(self, tenant_id: UUID) -> RotationJob | None:
        """The tenant's running job, else its latest one (None: no rotation job ever ran)."""
        async with asyncio.timeout(self._deadline_s), tenant_tx(self._pool(), tenant_id, readonly=True) as conn:
            row = await key_store.last_job(conn)
        return None if row is None else RotationJob.of(row)

    async def open(self, conn: Connection, tenant_id: UUID, body: RotateBody, *, actor: str,
                   correlation: Mapping[str, Any] | None = None) -> tuple[RotationJob, bool]:
        """In the caller's tenant transaction: a new job (audited, ``keys.rotation_requested``) and True, or the
        one running and False. :meth:`launch` it once that transaction has committed."""
        row, created = await key_store.insert_job(conn, actor, body.finish, body.batch)
        if created:
            await audit.append(conn, tenant_id, actor=actor, action="keys.rotation_requested",
                               entity="tenant_data_key", entity_id=str(tenant_id),
                               detail={"job_id": str(row["id"]), **body.model_dump(mode="json")},
                               correlation=None if correlation is None else dict(correlation))
        return RotationJob.of(row), created

    def launch(self, tenant_id: UUID, job_id: UUID) -> None:
        """Run the (committed) job in a supervised task of this process, unless it runs here already."""
        if job_id in self._running:
            return
        self._running.add(job_id)
        self._tasks.supervise(lambda: self._run(tenant_id, job_id), name=f"key-rotation-{tenant_id}",
                              initial=self._backoff[0], ceiling=self._backoff[1],
                              until=lambda: job_id not in self._running)

    async def begin(self, tenant_id: UUID, body: RotateBody, *, actor: str) -> tuple[RotationJob, bool]:
        """:meth:`open` in a transaction of its own, then :meth:`launch`."""
        async with asyncio.timeout(self._deadline_s), tenant_tx(self._pool(), tenant_id) as conn:
            job, created = await self.open(conn, tenant_id, body, actor=actor)
        self.launch(tenant_id, job.id)
        return job, created

    async def _resume_all(self) -> None:
        assert self._directory is not None
        async with asyncio.timeout(self._deadline_s):
            found = await key_store.running_jobs(self._directory())
        for tenant_id, job_id in found:
            log.warning("resuming the data-key rotation of tenant %s (job %s)", tenant_id, job_id)
            self.launch(tenant_id, job_id)
        self._resumed = True

    async def run_once(self, tenant_id: UUID, job_id: UUID) -> None:
        """Run a committed job here and now, to its end (``iim keys rotate``: the command line's rotation is a job
        like the API's, so a service and the command line never rotate one tenant at once).

        Raises:
            JobElsewhere: a service holds the job's lock.
        """
        self._running.add(job_id)
        try:
            await self._run(tenant_id, job_id)
        finally:
            self._running.discard(job_id)

    async def _run(self, tenant_id: UUID, job_id: UUID) -> None:
        """One run of a job, under its advisory lock (one service at a time runs it: another one waits, polling
        with the backoff, and takes it up if the first dies)."""
        pool = self._pool()
        async with pool.acquire(timeout=self._deadline_s) as proxy:
            lock = cast(Connection, proxy)
            async with asyncio.timeout(self._deadline_s):
                mine = await key_store.job_lock(lock, job_id)
            if not mine:
                raise JobElsewhere(f"job {job_id} runs in another service")
            try:
                await self._locked_run(pool, tenant_id, job_id)
            finally:
                async with asyncio.timeout(self._deadline_s):
                    await key_store.job_unlock(lock, job_id)

    async def _locked_run(self, pool: Pool, tenant_id: UUID, job_id: UUID) -> None:
        """A store outage escapes to the supervisor (taken up again after a backoff); any other error ends the
        job as failed."""
        keyring = self._keyring()
        async with asyncio.timeout(self._deadline_s), tenant_tx(pool, tenant_id) as conn:
            row = await key_store.take_job(conn, job_id)
            active = await key_store.active_key(conn)
            if row is not None and row["runs"] > 1:
                await audit.append(conn, tenant_id, actor=row["actor"], action="keys.rotation_resumed",
                                   entity="tenant_data_key", entity_id=str(tenant_id),
                                   detail={"job_id": str(job_id), "run": row["runs"], "key_id": row["key_id"]})
        if row is None:  # ended meanwhile (another instance finished it)
            self._running.discard(job_id)
            return
        # Its key made already (recorded, or newer than the one it started from): re-seal only, no second key.
        made = row["key_id"] is not None or (active is not None and (
            row["from_key_id"] is None or active["key_id"] > row["from_key_id"]))

        async def started(key_id: int) -> None:
            async with asyncio.timeout(self._deadline_s), tenant_tx(pool, tenant_id) as conn:
                await key_store.job_progress(conn, job_id, key_id, None, 0)

        async def progress(table: str, rows: int) -> None:
            async with asyncio.timeout(self._deadline_s), tenant_tx(pool, tenant_id) as conn:
                await key_store.job_progress(conn, job_id, None, table, rows)

        try:
            done = await rotate_data_key(pool, keyring, tenant_id, actor=row["actor"], batch=row["batch"],
                                         new_key=not (row["finish"] or made), started=started, progress=progress,
                                         legacy=self._legacy())
        except STORE_UNAVAILABLE:
            raise
        except Exception as exc:  # the job's outcome, shown by GET; the operator runs it again with finish
            log.exception("key rotation of tenant %s failed", tenant_id)
            await self._end(tenant_id, job_id, row["actor"], "failed", error=type(exc).__name__)
        else:
            await self._end(tenant_id, job_id, row["actor"], "done", key_id=done.key_id, unreadable=done.unreadable)

    async def _end(self, tenant_id: UUID, job_id: UUID, actor: str, state: str, *, key_id: int | None = None,
                   unreadable: int = 0, error: str | None = None) -> None:
        async with asyncio.timeout(self._deadline_s), tenant_tx(self._pool(), tenant_id) as conn:
            row = await key_store.finish_job(conn, job_id, state, key_id=key_id, unreadable=unreadable, error=error)
            if row is not None:
                await audit.append(conn, tenant_id, actor=actor, action=f"keys.rotation_{state}",
                                   entity="tenant_data_key", entity_id=str(tenant_id),
                                   detail={"job_id": str(job_id), "key_id": row["key_id"], "resealed": row["resealed"],
                                           "unreadable": row["unreadable"], "runs": row["runs"], "error": error})
        self._running.discard(job_id)


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
                items = [TenantKeyStatus.of(await tenant_keys(pool(), t), master, await rotations.job(t))
                         for t in tenants]
        return json_response(KeyStatusPage(master_key_id=master, items=items))

    async def rotate(request: web.Request) -> web.Response:
        parse_query(request, NoQuery)
        body = await parse_body(request, RotateBody, request.config_dict[SETTINGS].max_body_bytes)
        tenant_id, actor = path_uuid(request, "tenant_id"), request[PRINCIPAL].actor
        with _store_errors():
            async with request.config_dict[SERVICE].in_tenant(tenant_id, write=True) as conn:  # 404: no tenant
                job, created = await rotations.open(
                    conn, tenant_id, body, actor=actor,
                    correlation={"channel": "admin-api", "request_id": request[REQUEST_ID]})
        rotations.launch(tenant_id, job.id)  # a running job another instance left: taken up here too
        return json_response(job, status=202, headers=None if created else {"Idempotent-Replayed": "true"})

    async def progress(request: web.Request) -> web.Response:
        parse_query(request, NoQuery)
        tenant_id = path_uuid(request, "tenant_id")
        with _store_errors():
            async with asyncio.timeout(request.config_dict[SETTINGS].store_deadline_s):
                job = await rotations.job(tenant_id)
        if job is None:
            raise NotFound("no key rotation of this tenant has run")
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
              errors=(NotFound, StoreUnavailable, MalformedRequest, PayloadTooLarge, UnsupportedMediaType,
                      ValidationFailed, InvalidParameter)),
        Route("GET", "/tenants/{tenant_id}/keys/rotation", progress, "getDataKeyRotation",
              "The tenant's data-key rotation running or last run in this process, with its progress", "keys",
              Access.ADMIN, path_params=(tenant,), query_model=NoQuery, response_model=RotationJob,
              errors=(NotFound, InvalidParameter)),
    ]
