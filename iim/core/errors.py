"""What "PostgreSQL is away" means, once for every room.

Only connection-level failures count: the server unreachable, the connection lost or refused, the server
shutting down or out of connection slots, a deadline passed. A SQL mistake (``UndefinedColumnError``, a
constraint violation, ...) is a bug or bad data, not an outage: it must never be retried as one or turned
into a 503 that hides it.
"""

from __future__ import annotations

import asyncpg

__all__ = ["STORE_UNAVAILABLE", "ConfigError"]

#: Catch these for "retry later / answer 503"; let every other ``PostgresError`` surface.
STORE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # ConnectionError and socket errors included
    TimeoutError,  # asyncio's and asyncpg's command/acquire deadlines
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.InterfaceError,  # connection closed or in a bad state under us
    asyncpg.exceptions.OperatorInterventionError,  # admin/crash shutdown, cannot connect now (57P0x)
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby after failover
)


class ConfigError(ValueError):
    """A setting the service refuses to start with; the message names the setting, never a secret's value."""
