"""The static token table, read again without a restart: when its file changes, or on :meth:`reload`.

Why: static tokens stay for bootstrap (and as the way in while the OIDC issuer is away), so revoking one
must not need a restart. The file's identity (mtime, size, inode) is looked at no more than once per
``check_interval_s`` (a ``stat``, not a read, per request at most). A new table that does not parse is
refused as a whole: the old one stays in force, the refusal is logged and counted
(``iim_admin_token_reloads_total{outcome="refused"}``), and the same file is not retried until it changes.

Every reload, applied or refused, is also kept as a :class:`TokenReload` in :attr:`TokenSource.reloads` for the
audit log (:class:`ReloadAuditor` writes them to the service's own chain): which tokens were added, removed or
changed, by actor, role, tenant and an 8-digit key id (the start of the token's SHA-256, as the table's own
error messages name entries), never a token or its whole hash.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
from prometheus_client import Counter

from iim.admin.auth import TokenConfigError, TokenEntry, TokenTable
from iim.core.lifecycle import AsyncResource, TaskSupervisor
from iim.core.metrics import REGISTRY
from policy_cache import audit
from policy_cache.db import Pool

__all__ = ["ReloadAuditor", "TokenReload", "TokenSource", "table_changes"]

log = logging.getLogger("iim.admin.auth")

TOKEN_RELOADS = Counter("iim_admin_token_reloads", "Re-reads of the static admin token table, by outcome "
                        "(loaded, refused: the old table stays)", ["outcome"], registry=REGISTRY)

Signature = tuple[int, int, int] | None

#: The audit actor of a reload: the file was changed by someone IIM cannot name; the service applied it.
RELOAD_ACTOR: Final = "admin-token-reload"
#: Reloads kept for the auditor while the database is away (the oldest dropped past this, logged).
MAX_PENDING: Final = 256


def _signature(path: str) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _described(digest: str, entry: TokenEntry) -> dict[str, Any]:
    return {"key_id": digest[:8], "actor": entry.actor, "role": entry.role.value,
            "tenant": None if entry.tenant is None else str(entry.tenant)}


def table_changes(old: TokenTable, new: TokenTable) -> dict[str, list[dict[str, Any]]]:
    """``added``, ``removed`` and ``changed`` (``before``/``after``) entries, each sorted by key id (pure)."""
    before, after = old.entries(), new.entries()
    return {
        "added": [_described(d, after[d]) for d in sorted(after.keys() - before.keys())],
        "removed": [_described(d, before[d]) for d in sorted(before.keys() - after.keys())],
        "changed": [{"key_id": d[:8], "before": _described(d, before[d]), "after": _described(d, after[d])}
                    for d in sorted(before.keys() & after.keys()) if before[d] != after[d]],
    }


@dataclass(frozen=True, slots=True)
class TokenReload:
    """One re-read of the table: applied (``changes`` says what) or refused (``error``; the old table stays)."""

    source: str
    applied: bool
    tokens: int
    previous: int
    changes: dict[str, list[dict[str, Any]]]
    error: str | None = None

    @property
    def action(self) -> str:
        return "admin_tokens.reloaded" if self.applied else "admin_tokens.reload_refused"

    def detail(self) -> dict[str, Any]:
        if not self.applied:
            return {"error": self.error, "tokens_in_force": self.previous}
        return {"tokens": self.tokens, "previous": self.previous, **self.changes}


class TokenSource:
    """The table in force for ``ref`` (``env:VAR`` / ``file:/path`` / unset).

    Raises :class:`~iim.admin.auth.TokenConfigError` at construction when the first table is invalid
    (the service refuses to start); afterwards an invalid table never replaces a valid one.
    """

    def __init__(self, ref: str | None, *, check_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ref = ref
        self._path = ref.partition(":")[2] if ref and ref.startswith("file:") else None
        self._interval = check_interval_s
        self._clock = clock
        self._seen: Signature = _signature(self._path) if self._path else None
        self._table = TokenTable.load(ref)
        self._next_check = clock() + check_interval_s
        #: Reloads not yet audited (:class:`ReloadAuditor` takes them), oldest first.
        self.reloads: deque[TokenReload] = deque()

    @classmethod
    def fixed(cls, table: TokenTable) -> TokenSource:
        """A source that always answers ``table`` (tests, embedders that manage tokens themselves)."""
        source = cls(None)
        source._table = table
        return source

    @property
    def watched(self) -> bool:
        """Is there a file to watch (and reloads to audit)?"""
        return self._path is not None

    @property
    def check_interval_s(self) -> float:
        return self._interval

    def current(self) -> TokenTable:
        """The table in force, after a re-read if the file changed since the last look."""
        if self._path is not None:
            now = self._clock()
            if now >= self._next_check:
                self._next_check = now + self._interval
                signature = _signature(self._path)
                if signature != self._seen:
                    self._seen = signature
                    self.reload()
        return self._table

    def _keep(self, reload: TokenReload) -> None:
        if len(self.reloads) >= MAX_PENDING:
            dropped = self.reloads.popleft()
            log.error("admin token reloads not audited yet exceed %d: the oldest (%s) is dropped unaudited",
                      MAX_PENDING, dropped.action)
        self.reloads.append(reload)

    def reload(self) -> bool:
        """Read the table again (the file changed, or asked to); ``False``: refused, the old table stays."""
        if self._ref is None:
            return True
        try:
            table = TokenTable.load(self._ref)
        except TokenConfigError as exc:
            TOKEN_RELOADS.labels("refused").inc()
            log.error("admin token table not reloaded, the previous one (%d tokens) stays: %s", len(self._table), exc)
            self._keep(TokenReload(self._ref, applied=False, tokens=len(self._table), previous=len(self._table),
                                   changes={}, error=str(exc)))
            return False
        TOKEN_RELOADS.labels("loaded").inc()
        log.info("admin token table reloaded: %d tokens (was %d)", len(table), len(self._table))
        self._keep(TokenReload(self._ref, applied=True, tokens=len(table), previous=len(self._table),
                               changes=table_changes(self._table, table)))
        self._table = table
        return True


_DB_ERRORS = (OSError, TimeoutError, LookupError, asyncpg.PostgresError, asyncpg.InterfaceError)


class ReloadAuditor(AsyncResource):
    """Writes every reload of ``source`` to the service's audit chain (:data:`policy_cache.audit.SYSTEM_CHAIN`).

    It also looks at the file every check interval, so a change is applied (and audited) within that interval
    even when no request comes. A reload stays queued until its row is committed: while PostgreSQL is away the
    rows are retried with backoff (each write bounded by ``deadline_s``) and written in order once it is back.
    """

    def __init__(self, source: TokenSource, pool: Callable[[], Pool], *, deadline_s: float = 5.0) -> None:
        self._source = source
        self._pool = pool
        self._deadline_s = deadline_s
        self._tasks = TaskSupervisor()
        self._process = f"{socket.gethostname()}:{os.getpid()}"

    async def start(self) -> None:
        if self._source.watched:
            self._tasks.supervise(self._run, name="admin-token-reloads", initial=1.0, ceiling=30.0)

    async def _run(self) -> None:
        # A zero interval (stat on every request) is looked at every second here: never a busy loop.
        interval = self._source.check_interval_s or 1.0
        loop = asyncio.get_running_loop()
        backoff, retry_at = interval, 0.0
        while True:
            self._source.current()  # the file is looked at on time even while the database is away
            if self._source.reloads and loop.time() >= retry_at:
                try:
                    await self.write_pending()
                except _DB_ERRORS:
                    backoff = min(max(backoff, 0.5) * 2, 30.0)  # the reloads stay queued, in order
                    retry_at = loop.time() + backoff
                else:
                    backoff = interval
            await asyncio.sleep(interval)

    async def write_pending(self) -> None:
        """Audit the reloads not yet audited, oldest first (raises while the database is away: retried)."""
        pending = self._source.reloads
        while pending:
            reload = pending[0]
            try:
                async with asyncio.timeout(self._deadline_s):
                    await audit.append_system(
                        self._pool(), actor=RELOAD_ACTOR, action=reload.action, entity="admin_token_table",
                        entity_id=reload.source, detail=reload.detail(), correlation={"process": self._process})
            except _DB_ERRORS as exc:
                log.warning("admin token reload not audited yet (%s); retrying", type(exc).__name__)
                raise
            pending.popleft()

    async def aclose(self) -> None:
        await self._tasks.aclose()
        if self._source.reloads:
            try:
                await self.write_pending()
            except _DB_ERRORS:
                log.error("%d admin token reloads left unaudited at stop", len(self._source.reloads))
