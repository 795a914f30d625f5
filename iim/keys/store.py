"""Every statement on ``iim.tenant_data_key`` (a tenant's data keys, each stored wrapped by a master key) and on
``iim.key_rotation_job`` (a tenant's data-key rotation, kept so that it survives a restart: migration 0042)."""

from __future__ import annotations

from uuid import UUID

import asyncpg

from policy_cache.db import Connection, Pool

__all__ = ["active_key", "credential_ref_schemes", "data_key_masters", "finish_job", "insert_key", "insert_job",
           "job_lock", "job_progress", "job_unlock", "key_by_id", "keys", "last_job", "rewrap", "running_jobs", "take_job", "tenant_ids"]

_COLUMNS = "key_id, wrapped, master_key_id, created_at, rewrapped_at"


async def active_key(conn: Connection) -> asyncpg.Record | None:
    """The caller's tenant's newest data key (the one new fields are sealed with), or None."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM iim.tenant_data_key ORDER BY key_id DESC LIMIT 1")  # noqa: S608 -- constants
    return row


async def key_by_id(conn: Connection, key_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM iim.tenant_data_key WHERE key_id = $1", key_id)  # noqa: S608 -- constants
    return row


async def keys(conn: Connection) -> list[asyncpg.Record]:
    """Every data key of the caller's tenant, oldest first."""
    rows: list[asyncpg.Record] = await conn.fetch(
        f"SELECT {_COLUMNS} FROM iim.tenant_data_key ORDER BY key_id")  # noqa: S608 -- constants
    return rows


async def insert_key(conn: Connection, key_id: int, wrapped: bytes, master_key_id: str) -> bool:
    """Store a new wrapped data key for the caller's tenant; False when ``key_id`` exists already (someone
    else created it first: theirs wins)."""
    done = await conn.fetchval(
        "INSERT INTO iim.tenant_data_key (key_id, wrapped, master_key_id) VALUES ($1, $2, $3) "
        "ON CONFLICT (tenant_id, key_id) DO NOTHING RETURNING key_id", key_id, wrapped, master_key_id)
    return done is not None


async def rewrap(conn: Connection, key_id: int, old_master_key_id: str, wrapped: bytes, master_key_id: str) -> bool:
    """Replace a data key's wrapping (master-key rotation), only if it is still wrapped by the old master."""
    done = await conn.fetchval(
        "UPDATE iim.tenant_data_key SET wrapped = $3, master_key_id = $4, rewrapped_at = now() "
        "WHERE key_id = $1 AND master_key_id = $2 RETURNING key_id", key_id, old_master_key_id, wrapped,
        master_key_id)
    return done is not None


async def tenant_ids(pool: Pool) -> list[UUID]:
    """Every tenant (a pool that may see them all: the cache role's)."""
    return [r["id"] for r in await pool.fetch("SELECT id FROM iim.tenant ORDER BY id")]


async def credential_ref_schemes(pool: Pool) -> dict[str, int]:
    """How many registry credential references each scheme has, every tenant (``iim.credential_ref_schemes``:
    the schemes only, never a reference)."""
    return {r["scheme"]: int(r["refs"]) for r in await pool.fetch("SELECT * FROM iim.credential_ref_schemes()")}


async def data_key_masters(pool: Pool) -> dict[str, int]:
    """How many data keys (every tenant) each master key fingerprint wraps (``iim.data_key_masters``)."""
    return {r["master_key_id"]: int(r["keys"]) for r in await pool.fetch("SELECT * FROM iim.data_key_masters()")}


# -- rotation jobs ------------------------------------------------------------------------------------------

_JOB = """id, tenant_id, state, actor, finish, batch, from_key_id, key_id, resealed, unreadable, runs, error,
          started_at, updated_at, finished_at"""


async def insert_job(conn: Connection, actor: str, finish: bool, batch: int) -> tuple[asyncpg.Record, bool]:
    """Start a rotation job for the caller's tenant: (the job, True); or, while one runs, (that one, False).
    ``from_key_id``: the tenant's active data key now, the one the job rotates from."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""INSERT INTO iim.key_rotation_job (actor, finish, batch, from_key_id)
            VALUES ($1, $2, $3, (SELECT max(key_id) FROM iim.tenant_data_key))
            ON CONFLICT (tenant_id) WHERE state = 'running' DO NOTHING RETURNING {_JOB}""",  # noqa: S608
        actor, finish, batch)
    if row is not None:
        return row, True
    running: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT {_JOB} FROM iim.key_rotation_job WHERE state = 'running'")  # noqa: S608 -- constants
    if running is None:  # ended between the two statements: start afresh
        return await insert_job(conn, actor, finish, batch)
    return running, False


async def last_job(conn: Connection) -> asyncpg.Record | None:
    """The caller's tenant's running job, else its latest one."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""SELECT {_JOB} FROM iim.key_rotation_job
             ORDER BY state = 'running' DESC, started_at DESC, id LIMIT 1""")  # noqa: S608 -- constants
    return row


async def take_job(conn: Connection, job_id: UUID) -> asyncpg.Record | None:
    """Take up a running job (first run, or again after a restart or a retry: counted in ``runs``); None if it
    has ended."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""UPDATE iim.key_rotation_job SET runs = runs + 1, updated_at = now()
             WHERE id = $1 AND state = 'running' RETURNING {_JOB}""", job_id)  # noqa: S608 -- constants
    return row


async def job_progress(conn: Connection, job_id: UUID, key_id: int | None, table: str | None, rows: int) -> None:
    """Record the job's key and ``rows`` more re-sealed in ``table`` (after a batch)."""
    await conn.execute(
        """UPDATE iim.key_rotation_job
              SET key_id = coalesce($2, key_id), updated_at = now(),
                  resealed = CASE WHEN $3::text IS NULL THEN resealed
                                  ELSE jsonb_set(resealed, ARRAY[$3::text],
                                                 to_jsonb(coalesce((resealed->>$3::text)::bigint, 0) + $4)) END
            WHERE id = $1 AND state = 'running'""", job_id, key_id, table, rows)


async def finish_job(conn: Connection, job_id: UUID, state: str, *, key_id: int | None = None,
                     unreadable: int = 0, error: str | None = None) -> asyncpg.Record | None:
    """End a running job (done or failed). ``unreadable``: the last run's count (rows that do not open stay on
    their old key, so every run meets them all again). None if the job had ended already."""
    row: asyncpg.Record | None = await conn.fetchrow(
        f"""UPDATE iim.key_rotation_job
               SET state = $2, key_id = coalesce($3, key_id), unreadable = $4, error = $5, updated_at = now(),
                   finished_at = now()
             WHERE id = $1 AND state = 'running' RETURNING {_JOB}""",  # noqa: S608 -- constants
        job_id, state, key_id, unreadable, error)
    return row


async def running_jobs(pool: Pool) -> list[tuple[UUID, UUID]]:
    """(tenant, job) of every running job, every tenant (the cache role's pool: it sees ids and state only)."""
    rows = await pool.fetch("SELECT tenant_id, id FROM iim.key_rotation_job WHERE state = 'running' "
                            "ORDER BY tenant_id")
    return [(r["tenant_id"], r["id"]) for r in rows]


async def job_lock(conn: Connection, job_id: UUID) -> bool:
    """Take the job's session-level advisory lock on ``conn`` (False: another service runs the job). Held until
    released or the connection ends: a service that dies lets the job go with its connection."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock(hashtext('iim.key_rotation_job'), hashtext($1))",
                                    str(job_id)))


async def job_unlock(conn: Connection, job_id: UUID) -> None:
    await conn.fetchval("SELECT pg_advisory_unlock(hashtext('iim.key_rotation_job'), hashtext($1))", str(job_id))
