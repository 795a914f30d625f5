"""Errors of the policy store. Callers catch these, never asyncpg's catch-all ``PostgresError``.

Hierarchy::

    PolicyStoreError
     +-- MigrationError
     |    +-- SchemaTooNewError        the database is ahead of this code: refuse to run
     |    +-- MigrationChecksumError   an applied migration file was edited afterwards
     +-- DatabaseRoleError             a DSN logs in as the wrong role (superuser/BYPASSRLS for the app ...)
     +-- TenantScopeError              tenant_tx misuse (nested transaction, not a UUID ...)
     +-- ChangeLogTruncatedError       the cache's watermark is older than the retained change log
     +-- RepositoryError               one registry call failed; .entity names the entity
          +-- NotFound                 no such row in this tenant (another tenant's row is "not found" too)
          +-- Conflict                 unique key taken (asyncpg.UniqueViolationError)
          |    +-- VersionConflict     optimistic-concurrency check failed (policy.version)
          +-- InvalidReference         a referenced row does not exist in this tenant (ForeignKeyViolationError)
          +-- InvalidData              a CHECK/NOT NULL constraint refused the values
          +-- TenantIsolationError     RLS refused the row (it belongs to another tenant, or no tenant is set)
"""

from __future__ import annotations


class PolicyStoreError(Exception):
    """Base class of every error raised by ``policy_cache``."""


class MigrationError(PolicyStoreError):
    """A migration could not be applied (the failing migration's transaction was rolled back)."""


class SchemaTooNewError(MigrationError):
    """The database has a schema version this code does not know: it was migrated by newer code."""

    def __init__(self, database_version: int, code_version: int) -> None:
        super().__init__(
            f"database schema version {database_version} is newer than this code's {code_version}; "
            "refusing to run (deploy the newer code, or restore the database)"
        )
        self.database_version = database_version
        self.code_version = code_version


class MigrationChecksumError(MigrationError):
    """An already-applied migration file differs from what was applied."""


class DatabaseRoleError(PolicyStoreError):
    """The login role of a connection does not have the properties its use requires."""


class TenantScopeError(PolicyStoreError):
    """``tenant_tx`` was misused (e.g. opened inside another transaction, where SET LOCAL would leak)."""


class ChangeLogTruncatedError(PolicyStoreError):
    """The change log no longer holds every change after the caller's watermark: reload fully."""

    def __init__(self, since_seq: int, pruned_through: int) -> None:
        super().__init__(f"change log pruned through seq {pruned_through}, caller asked for > {since_seq}")
        self.since_seq = since_seq
        self.pruned_through = pruned_through


class RepositoryError(PolicyStoreError):
    """A registry call failed for a reason the caller can act on."""

    def __init__(self, message: str, *, entity: str, constraint: str | None = None) -> None:
        super().__init__(message)
        self.entity = entity
        self.constraint = constraint


class NotFound(RepositoryError):
    """No such row in the transaction's tenant."""


class Conflict(RepositoryError):
    """A unique key is already taken in this tenant."""


class VersionConflict(Conflict):
    """The row changed since the caller read it (``expected_version`` did not match)."""


class InvalidReference(RepositoryError):
    """A referenced row does not exist in this tenant (or is still referenced, on delete)."""


class InvalidData(RepositoryError):
    """A database CHECK / NOT NULL constraint refused the values."""


class TenantIsolationError(RepositoryError):
    """Row-level security refused the row: no tenant set, or the row belongs to another tenant."""
