"""The static token table, read again without a restart: when its file changes, or on :meth:`reload`.

Why: static tokens stay for bootstrap (and as the way in while the OIDC issuer is away), so revoking one
must not need a restart. The file's identity (mtime, size, inode) is looked at no more than once per
``check_interval_s`` (a ``stat``, not a read, per request at most). A new table that does not parse is
refused as a whole: the old one stays in force, the refusal is logged and counted
(``iim_admin_token_reloads_total{outcome="refused"}``), and the same file is not retried until it changes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from prometheus_client import Counter

from iim.admin.auth import TokenConfigError, TokenTable
from iim.core.metrics import REGISTRY

__all__ = ["TokenSource"]

log = logging.getLogger("iim.admin.auth")

TOKEN_RELOADS = Counter("iim_admin_token_reloads", "Re-reads of the static admin token table, by outcome "
                        "(loaded, refused: the old table stays)", ["outcome"], registry=REGISTRY)

Signature = tuple[int, int, int] | None


def _signature(path: str) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


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

    @classmethod
    def fixed(cls, table: TokenTable) -> TokenSource:
        """A source that always answers ``table`` (tests, embedders that manage tokens themselves)."""
        source = cls(None)
        source._table = table
        return source

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

    def reload(self) -> bool:
        """Read the table again (SIGHUP, or the file changed); ``False``: refused, the old table stays."""
        if self._ref is None:
            return True
        try:
            table = TokenTable.load(self._ref)
        except TokenConfigError as exc:
            TOKEN_RELOADS.labels("refused").inc()
            log.error("admin token table not reloaded, the previous one (%d tokens) stays: %s", len(self._table), exc)
            return False
        TOKEN_RELOADS.labels("loaded").inc()
        log.info("admin token table reloaded: %d tokens (was %d)", len(table), len(self._table))
        self._table = table
        return True
