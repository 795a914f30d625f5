"""Replay guard for signed messages: the same message id is accepted once per TTL.

A signature proves who sent a request and that it is recent (±tolerance), not that it is the first copy. A
captured request can be sent again inside the tolerance window, so ids are remembered for ``ttl_s``, which
must be at least twice the signature tolerance (a timestamp may be ``tolerance`` in the future *and* arrive
``tolerance`` later). This is the fast in-memory gate; durable dedup by ``event_id`` stays in PostgreSQL.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["ReplayGuard"]


class ReplayGuard:
    """Remembers keys (e.g. ``(tenant, device, msg_id)``) for ``ttl_s`` in at most ``max_entries`` entries.

    When full, the oldest entry is forgotten early (``evicted_early`` counts them; export it as a metric):
    refusing new messages instead would let a flood of valid traffic lock devices out.
    """

    def __init__(self, ttl_s: float = 600.0, max_entries: int = 1_000_000) -> None:
        if not ttl_s > 0:
            raise ValueError("ttl_s must be positive")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.evicted_early = 0
        #: key -> expiry; in insertion order, which is expiry order while ``now`` does not go backwards.
        self._expiry: OrderedDict[tuple[str, ...], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def _purge(self, now: float) -> None:
        while self._expiry:
            key, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                return
            del self._expiry[key]

    def first_sighting(self, key: tuple[str, ...], now: float) -> bool:
        """True (and remembered) the first time ``key`` is seen within ``ttl_s``; False for a replay."""
        self._purge(now)
        expiry = self._expiry.get(key)
        if expiry is not None and expiry > now:
            return False
        if expiry is not None:
            del self._expiry[key]
        self._expiry[key] = now + self.ttl_s
        if len(self._expiry) > self.max_entries:
            self._expiry.popitem(last=False)
            self.evicted_early += 1
        return True
