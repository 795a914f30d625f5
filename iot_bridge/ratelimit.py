"""Token-bucket rate limits per device, per source address and per tenant, in bounded memory.

Time is passed in (``now``, monotonic seconds), so the limiter is deterministic under test and never reads a
clock. Memory is bounded by ``max_keys`` per limiter with least-recently-used eviction (a refused request
counts as a use, so a key that is being throttled is the last to go): an evicted key comes back with a full
bucket, which at worst grants that key one extra burst.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

__all__ = ["RateLimitSettings", "RateLimited", "RateLimits", "Scope", "TokenBucketLimiter"]

Scope = Literal["device", "source", "tenant"]


class TokenBucketLimiter:
    """``burst`` tokens per key, refilled at ``rate`` tokens per second; one request costs one token."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000) -> None:
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError("rate must be a positive number of tokens per second")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        #: key -> (tokens at ``stamp``, stamp); most recently used last.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> tuple[float, float]:
        """Tokens available at ``now`` and the stamp they refer to (a clock going backwards refills nothing)."""
        state = self._buckets.get(key)
        if state is None:
            return float(self.burst), now
        tokens, stamp = state
        if now <= stamp:
            return tokens, stamp
        return min(float(self.burst), tokens + (now - stamp) * self.rate), now

    def wait(self, key: str, now: float) -> float | None:
        """Like :meth:`take` without taking: ``None`` if a token is available, else seconds until one is."""
        tokens, _ = self._tokens(key, now)
        if tokens >= 1.0:
            return None
        self._buckets.move_to_end(key)  # a key being refused stays remembered, or churn would refill it
        return (1.0 - tokens) / self.rate

    def take(self, key: str, now: float) -> float | None:
        """Take a token: ``None`` when allowed, else the seconds until a token is available (nothing is taken)."""
        wait = self.wait(key, now)
        if wait is not None:
            return wait
        tokens, stamp = self._tokens(key, now)
        self._buckets[key] = (tokens - 1.0, stamp)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return None


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """Requests per second and burst size for each scope (defaults suit a household device fleet)."""

    device_rate: float = 1.0
    device_burst: int = 10
    source_rate: float = 50.0
    source_burst: int = 200
    tenant_rate: float = 500.0
    tenant_burst: int = 2000


@dataclass(frozen=True, slots=True)
class RateLimited:
    """Refused: which scope ran dry, and the ``Retry-After`` to send (whole seconds, at least 1)."""

    scope: Scope
    retry_after_s: int


class RateLimits:
    """The three limits together. A request is counted against all three or none: a request refused for its
    tenant does not drain its device's bucket (nor the other way round)."""

    def __init__(self, settings: RateLimitSettings | None = None, *, max_keys: int = 100_000) -> None:
        self.settings = settings = settings or RateLimitSettings()
        self._limiters: dict[Scope, TokenBucketLimiter] = {
            "device": TokenBucketLimiter(settings.device_rate, settings.device_burst, max_keys=max_keys),
            "source": TokenBucketLimiter(settings.source_rate, settings.source_burst, max_keys=max_keys),
            "tenant": TokenBucketLimiter(settings.tenant_rate, settings.tenant_burst, max_keys=max_keys),
        }

    def check(self, *, tenant: str, device: str, source: str, now: float) -> RateLimited | None:
        """``None`` (and one token taken in each scope) when allowed; else the scope with the longest wait."""
        return self._charge({"device": f"{tenant}\x00{device}", "source": source, "tenant": tenant}, now)

    def check_source(self, source: str, now: float) -> RateLimited | None:
        """Before authentication: only the sender's own address pays, so nobody can drain another's bucket."""
        return self._charge({"source": source}, now)

    def check_sender(self, *, tenant: str, device: str, hazard: str, now: float) -> RateLimited | None:
        """After the signature verified: the device's bucket for this hazard (a smoke burst never delays a CO
        alarm of the same device) and the tenant's."""
        return self._charge({"device": f"{tenant}\x00{device}\x00{hazard}", "tenant": tenant}, now)

    def _charge(self, keys: dict[Scope, str], now: float) -> RateLimited | None:
        worst: tuple[float, Scope] | None = None
        for scope, key in keys.items():
            wait = self._limiters[scope].wait(key, now)
            if wait is not None and (worst is None or wait > worst[0]):
                worst = (wait, scope)
        if worst is not None:
            return RateLimited(scope=worst[1], retry_after_s=max(1, math.ceil(worst[0])))
        for scope, key in keys.items():
            self._limiters[scope].take(key, now)
        return None
