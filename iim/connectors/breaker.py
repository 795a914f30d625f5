"""A circuit breaker: stop calling a cloud that keeps failing, probe it again after a cool-down.

Pure bookkeeping (no I/O, no timers, no asyncio): the caller asks :meth:`CircuitBreaker.allow` before each
attempt and reports the outcome with :meth:`record_success` / :meth:`record_failure`. Time comes from an
injected monotonic clock, so tests drive the cool-down without sleeping.

States::

    CLOSED --(failure_threshold consecutive failures)--> OPEN
    OPEN --(reset_timeout_s elapsed; the next allow() is the one probe)--> HALF_OPEN
    HALF_OPEN --(probe succeeds)--> CLOSED
    HALF_OPEN --(probe fails)--> OPEN (cool-down starts again)

While HALF_OPEN, only the probe goes through: a second caller is refused until the probe reports, so a
recovering cloud is not hit by everything that queued up while it was down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


class CircuitBreaker:
    """Consecutive-failure breaker with a single half-open probe.

    Args:
        failure_threshold: consecutive failures (while closed) that open the circuit.
        reset_timeout_s: how long the circuit stays open before one probe is let through.
        clock: monotonic seconds; ``time.monotonic`` unless a test injects its own.
    """

    __slots__ = ("_clock", "_failures", "_opened_at", "_probe_in_flight", "_state",
                 "failure_threshold", "reset_timeout_s")

    def __init__(self, *, failure_threshold: int = 5, reset_timeout_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_timeout_s < 0:
            raise ValueError("reset_timeout_s must not be negative")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    def __repr__(self) -> str:
        return f"CircuitBreaker(state={self.state.value}, consecutive_failures={self._failures})"

    @property
    def state(self) -> BreakerState:
        """The state now: an open circuit whose cool-down has passed reads as half-open (probe allowed)."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.reset_timeout_s:
            return BreakerState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when not open)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.reset_timeout_s - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        """May an attempt go out now? In half-open, ``True`` exactly once until the probe reports."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        # Half-open: the first caller becomes the probe; everyone else waits for its verdict.
        if self._probe_in_flight:
            return False
        self._state = BreakerState.HALF_OPEN
        self._probe_in_flight = True
        return True

    def record_success(self) -> None:
        """The cloud answered: close the circuit and forget past failures."""
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probe_in_flight = False

    def record_failure(self) -> None:
        """A timeout, connection error or 5xx: count it; open at the threshold, or re-open a failed probe."""
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
        self._probe_in_flight = False
