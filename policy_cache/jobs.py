"""The durable job queue (pgqueuer) in its own schema, ``iim_jobs``.

pgqueuer owns its DDL (it changes with the library version), so it is installed or upgraded here after the
SQL migrations rather than copied into one. Jobs carry only ids (tenant, incident); everything a job needs
is read from tenant-scoped tables, so the queue itself holds no tenant data and needs no row security.
"""

from __future__ import annotations

import logging
from functools import cache

from pgqueuer.adapters.drivers.asyncpg import AsyncpgDriver
from pgqueuer.adapters.persistence.qb import (
    QueryBuilderEnvironment,
    QueryQueueBuilder,
    QuerySchedulerBuilder,
)
from pgqueuer.domain.settings import DBSettings
from pgqueuer.queries import Queries

from policy_cache.db import Connection

__all__ = ["JOB_SCHEMA", "install", "job_settings", "queries_for"]

log = logging.getLogger(__name__)

JOB_SCHEMA = "iim_jobs"


@cache
def job_settings() -> DBSettings:
    return DBSettings(db_schema=JOB_SCHEMA)


def queries_for(conn: Connection) -> Queries:
    """pgqueuer queries over one connection: enqueueing inside the caller's transaction."""
    settings = job_settings()
    return Queries(AsyncpgDriver(conn), qbe=QueryBuilderEnvironment(settings), qbq=QueryQueueBuilder(settings),
                   qbs=QuerySchedulerBuilder(settings))


async def install(conn: Connection) -> bool:
    """Create (or upgrade) the queue schema owned by iim_owner and let the app role use it.

    Returns True when it was created now. Runs as a superuser connection (the migration one).
    """
    queries = queries_for(conn)
    created = False
    async with conn.transaction():
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {JOB_SCHEMA} AUTHORIZATION iim_owner")
        await conn.execute("SET LOCAL ROLE iim_owner")
        if not await queries.schema_is_installed():
            await queries.install(create_schema=False)
            created = True
        await conn.execute(f"GRANT USAGE ON SCHEMA {JOB_SCHEMA} TO iim_app")
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {JOB_SCHEMA} TO iim_app")
        await conn.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {JOB_SCHEMA} TO iim_app")
        await conn.execute(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {JOB_SCHEMA} TO iim_app")
    if not created:
        await queries.upgrade()
    if created:
        log.info("installed the job queue schema %s", JOB_SCHEMA)
    return created
