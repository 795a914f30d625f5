"""Connections, pools and tenant-scoped transactions.

Three roles (created by the migrations):

* ``iim_app`` - the service. Tenant-scoped by RLS: every statement runs inside :func:`tenant_tx`, which
  opens a transaction and sets ``app.tenant`` with ``set_config(..., true)`` (transaction-local, so a
  pooled connection - or a PgBouncer transaction-pooled one - never carries a tenant into the next use).
* ``iim_cache`` - the policy cache's loader: SELECT on the routing tables of all tenants, nothing else.
* ``iim_owner`` - owns the objects; migrations and maintenance only (superuser URL).

:func:`connect_pool` and :func:`connect` check the login role of every new connection and refuse a DSN
that would silently defeat isolation (a superuser or BYPASSRLS login used as the app, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast
from uuid import UUID

import asyncpg
from asyncpg.pool import PoolAcquireContext, PoolConnectionProxy

from policy_cache.errors import DatabaseRoleError, TenantScopeError

__all__ = ["Connection", "DbRole", "Pool", "PoolProxy", "connect", "connect_pool", "init_connection", "savepoint",
           "tenant_tx"]

if TYPE_CHECKING:
    # asyncpg's classes are generic only in the stubs.
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record]
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]
    PoolProxy: TypeAlias = PoolConnectionProxy[asyncpg.Record]
else:
    Connection = asyncpg.Connection
    Pool = asyncpg.Pool
    PoolProxy = PoolConnectionProxy
IsolationLevel = Literal["read_committed", "repeatable_read", "serializable"]


class DbRole(StrEnum):
    APP = "app"
    CACHE = "cache"
    OWNER = "owner"


ROLE_NAMES: dict[DbRole, str] = {DbRole.APP: "iim_app", DbRole.CACHE: "iim_cache", DbRole.OWNER: "iim_owner"}


def _json_encode(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _jsonb_encode(value: object) -> bytes:
    return b"\x01" + _json_encode(value)  # jsonb binary format: version 1, then the JSON text


def _json_decode(data: bytes) -> object:
    return json.loads(data.decode())


def _jsonb_decode(data: bytes) -> object:
    return json.loads(data[1:].decode())


async def init_connection(conn: Connection) -> None:
    """Per-connection setup: json/jsonb as Python objects.

    Binary-format codecs, so they also work inside composite types (the cache's routing rows).
    """
    await conn.set_type_codec("json", encoder=_json_encode, decoder=_json_decode, schema="pg_catalog",
                              format="binary")
    await conn.set_type_codec("jsonb", encoder=_jsonb_encode, decoder=_jsonb_decode, schema="pg_catalog",
                              format="binary")


async def check_role(conn: Connection, role: DbRole) -> None:
    """Refuse a connection whose login role does not fit ``role``.

    ``app`` and ``cache`` logins must not be superuser, must not have BYPASSRLS, must have the privileges
    of ``iim_app``/``iim_cache`` and must not be able to act as ``iim_owner``.
    """
    if role is DbRole.OWNER:
        return
    wanted = ROLE_NAMES[role]
    row = await conn.fetchrow(
        """SELECT current_user AS login, r.rolsuper, r.rolbypassrls,
                  pg_has_role(current_user, $1, 'USAGE') AS is_role,
                  pg_has_role(current_user, 'iim_owner', 'MEMBER') AS is_owner
           FROM pg_roles r WHERE r.rolname = current_user""",
        wanted,
    )
    if row is None:  # pragma: no cover - current_user always has a pg_roles row
        raise DatabaseRoleError("cannot inspect the login role")
    if row["rolsuper"] or row["rolbypassrls"] or row["is_owner"] or not row["is_role"]:
        raise DatabaseRoleError(
            f"login role {row['login']!r} cannot be used as {wanted}: it must have {wanted}'s privileges "
            "and be neither superuser, BYPASSRLS nor a member of iim_owner (row-level security would not apply)"
        )


class _RoleInit:
    """Pool ``init`` callback: role check, then codecs (runs once per new connection)."""

    def __init__(self, role: DbRole) -> None:
        self.role = role

    async def __call__(self, conn: Connection, /) -> None:
        await check_role(conn, self.role)
        await init_connection(conn)


def _server_settings(role: DbRole, extra: dict[str, str] | None) -> dict[str, str]:
    return {"application_name": f"iim-{role.value}", **(extra or {})}


async def connect(
    dsn: str,
    *,
    role: DbRole = DbRole.APP,
    timeout: float = 10.0,
    command_timeout: float | None = None,
    server_settings: dict[str, str] | None = None,
) -> Connection:
    """One dedicated connection (e.g. the cache's LISTEN connection), checked like a pool's."""
    conn: Connection = await asyncpg.connect(
        dsn, timeout=timeout, command_timeout=command_timeout,
        server_settings=_server_settings(role, server_settings))
    try:
        await _RoleInit(role)(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


#: Defaults of :func:`connect_pool` (``IIM_DB_COMMAND_TIMEOUT_S``, ``IIM_DB_ACQUIRE_TIMEOUT_S``): generous for
#: the slowest legitimate statement, yet finite, so a stalled server turns into errors, not hung tasks.
COMMAND_TIMEOUT_S = 30.0
ACQUIRE_TIMEOUT_S = 10.0

_DEADLINE_PASSED = (asyncio.CancelledError, TimeoutError)


def _drop(conn: Any) -> None:
    """Terminate ``conn`` on the way out of a deadline or a cancel, never raising: an InterfaceError here (a
    proxy already released, a connection already closed) would replace the CancelledError, and a task told to
    stop would take it for an outage and go on (a stop that hangs)."""
    with contextlib.suppress(asyncpg.InterfaceError, OSError):
        conn.terminate()


class _AcquireContext(PoolAcquireContext):
    """``pool.acquire()`` whose connection is dropped, not returned, when a deadline ends the block.

    After a cancelled or timed-out statement asyncpg's release first waits for its cancel request to be
    answered: on a stalled server (SIGSTOP, a hung disk, a partition) that is as long as the stall. A
    terminated connection is released at once (the server rolls back whatever it had) and the pool opens a
    new one when it is next needed.
    """

    __slots__ = ()

    async def __aexit__(self, *exc: object) -> None:
        if isinstance(exc[1], _DEADLINE_PASSED) and self.connection is not None:
            _drop(self.connection)
        await super().__aexit__(*exc)


class _BoundedPool(asyncpg.Pool):
    """asyncpg's pool with a default acquire deadline (asyncpg's is none: a caller could wait for ever for a
    connection that a stalled server holds) and :class:`_AcquireContext`."""

    __slots__ = ("_acquire_timeout",)

    def __init__(self, *args: Any, acquire_timeout: float | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acquire_timeout = acquire_timeout

    def acquire(self, *, timeout: float | None = None) -> PoolAcquireContext:
        return _AcquireContext(self, self._acquire_timeout if timeout is None else timeout)


async def connect_pool(
    dsn: str,
    *,
    role: DbRole = DbRole.APP,
    min_size: int = 1,
    max_size: int = 10,
    timeout: float = 10.0,
    command_timeout: float | None = COMMAND_TIMEOUT_S,
    acquire_timeout: float | None = ACQUIRE_TIMEOUT_S,
    server_settings: dict[str, str] | None = None,
) -> Pool:
    """A pool whose every connection is role-checked and has the json codecs.

    Every wait has a deadline: ``timeout`` to open a connection, ``command_timeout`` per statement (asyncpg
    raises ``TimeoutError``, one of ``STORE_UNAVAILABLE``), ``acquire_timeout`` for a free connection; a
    connection whose block ended by a deadline is dropped (:class:`_AcquireContext`). The pool is an async
    context manager (``async with await connect_pool(...) as pool``): closed on exit.

    Released connections are not reset (see :func:`_keep_session`): tenant state is transaction-local
    anyway (:func:`tenant_tx`), so nothing tenant-specific survives a release.
    """
    pool: Pool = await _BoundedPool(
        dsn, min_size=min_size, max_size=max_size, max_queries=50000, max_inactive_connection_lifetime=300.0,
        timeout=timeout, command_timeout=command_timeout, acquire_timeout=acquire_timeout, init=_RoleInit(role),
        server_settings=_server_settings(role, server_settings), reset=_keep_session,
        connection_class=asyncpg.Connection, record_class=asyncpg.Record, loop=None)
    return pool


async def _keep_session(_conn: Connection) -> None:
    """Pool release without asyncpg's reset query (``RESET ALL``, ``UNLISTEN *`` ...): one round trip per
    transaction saved. Safe because pooled connections hold no session state: the tenant is set with
    ``set_config(..., true)`` (transaction-local), LISTEN and session locks use dedicated connections, and
    asyncpg still rolls back an open transaction before this runs."""


@asynccontextmanager
async def tenant_tx(
    pool_or_conn: Pool | Connection | PoolProxy,
    tenant_id: UUID,
    *,
    readonly: bool = False,
    isolation: IsolationLevel = "read_committed",
) -> AsyncIterator[Connection]:
    """A transaction scoped to one tenant: ``set_config('app.tenant', tenant, true)`` then yield.

    With a pool, a connection is acquired for the block. Committed on normal exit, rolled back on error.

    Raises:
        TenantScopeError: ``tenant_id`` is not a UUID, or the connection is already in a transaction
            (the tenant would outlive this block, up to the end of the outer transaction).
    """
    if not isinstance(tenant_id, UUID):
        raise TenantScopeError(f"tenant_id must be a uuid.UUID, got {type(tenant_id).__name__}")
    if isinstance(pool_or_conn, asyncpg.Pool):
        async with (
            pool_or_conn.acquire() as proxy,
            _scoped(cast(Connection, proxy), tenant_id, readonly, isolation) as conn,
        ):
            yield conn
    else:
        async with _scoped(cast(Connection, pool_or_conn), tenant_id, readonly, isolation) as conn:
            yield conn


_BEGIN: dict[IsolationLevel, str] = {
    "read_committed": "BEGIN ISOLATION LEVEL READ COMMITTED",
    "repeatable_read": "BEGIN ISOLATION LEVEL REPEATABLE READ",
    "serializable": "BEGIN ISOLATION LEVEL SERIALIZABLE",
}


@asynccontextmanager
async def _scoped(
    conn: Connection, tenant_id: UUID, readonly: bool, isolation: IsolationLevel
) -> AsyncIterator[Connection]:
    """BEGIN and the tenant in one round trip (a simple query of two statements), COMMIT or ROLLBACK.

    Every alarm, call and SMS runs several of these, so asyncpg's ``Connection.transaction()`` (BEGIN, then
    our ``set_config``: two round trips) is not used at this level; savepoints inside use :func:`savepoint`.
    The tenant is interpolated as the canonical text of a ``uuid.UUID`` (checked by the caller): hex digits
    and dashes, nothing to escape.
    """
    if conn.is_in_transaction():
        raise TenantScopeError("tenant_tx cannot be nested in an open transaction")
    begin = _BEGIN[isolation] + (" READ ONLY" if readonly else "")
    async with _block(conn, f"{begin}; SELECT set_config('app.tenant', '{tenant_id}', true)", "ROLLBACK", "COMMIT"):
        yield conn


@asynccontextmanager
async def savepoint(conn: Connection) -> AsyncIterator[Connection]:
    """A savepoint inside :func:`tenant_tx`: an error in the block undoes only the block (then re-raises)."""
    async with _block(conn, "SAVEPOINT iim_block", "ROLLBACK TO SAVEPOINT iim_block; RELEASE SAVEPOINT iim_block",
                      "RELEASE SAVEPOINT iim_block"):
        yield conn


@asynccontextmanager
async def _block(conn: Connection, begin: str, undo: str, done: str) -> AsyncIterator[None]:
    """Run ``begin``; on leaving, ``done``, or ``undo`` when the block raised (then re-raise)."""
    await conn.execute(begin)
    try:
        yield
    except _DEADLINE_PASSED:
        # A deadline passed (or the task was cancelled) mid-block: the connection may still be waiting for a
        # stalled server, so it is dropped rather than rolled back; the server rolls back the transaction.
        _drop(conn)
        raise
    except BaseException:
        if not conn.is_closed() and conn.is_in_transaction():
            await conn.execute(undo)
        raise
    await conn.execute(done)
