"""The circuit breaker as pure bookkeeping: a hand-driven clock, no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iim.connectors.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breaker(threshold: int = 3, reset: float = 10.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(failure_threshold=threshold, reset_timeout_s=reset, clock=clock), clock


def test_opens_after_the_threshold_of_consecutive_failures() -> None:
    breaker, _ = _breaker()
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_in() == 10.0


def test_a_success_resets_the_count() -> None:
    breaker, _ = _breaker()
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 2


def test_half_open_after_the_cool_down_lets_exactly_one_probe_through() -> None:
    breaker, clock = _breaker(threshold=1)
    breaker.record_failure()
    clock.now += 9.9
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.retry_in() == 0.0
    assert breaker.allow()
    assert not breaker.allow()  # the probe is out: everyone else waits for its verdict
    assert breaker.state is BreakerState.HALF_OPEN


def test_a_successful_probe_closes() -> None:
    breaker, clock = _breaker(threshold=1)
    breaker.record_failure()
    clock.now += 10
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    assert breaker.allow()


def test_a_failed_probe_reopens_for_a_full_cool_down() -> None:
    breaker, clock = _breaker(threshold=2)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 10
    assert breaker.allow()
    breaker.record_failure()  # one failure is enough in half-open
    assert breaker.state is BreakerState.OPEN
    clock.now += 9
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


def test_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError, match="reset_timeout_s"):
        CircuitBreaker(reset_timeout_s=-1)


@given(st.lists(st.sampled_from(["ok", "fail", "wait"]), max_size=60), st.integers(1, 5))
def test_never_more_than_one_probe_and_open_means_refused(ops: list[str], threshold: int) -> None:
    breaker, clock = _breaker(threshold=threshold, reset=5.0)
    probes_out = 0
    for op in ops:
        if op == "wait":
            clock.now += 3
            continue
        state = breaker.state
        allowed = breaker.allow()
        if state is BreakerState.OPEN:
            assert not allowed
        if state is BreakerState.CLOSED:
            assert allowed
        if state is BreakerState.HALF_OPEN and allowed:
            probes_out += 1
            assert probes_out == 1
        if allowed:
            (breaker.record_success if op == "ok" else breaker.record_failure)()
            probes_out = 0
        assert breaker.consecutive_failures < threshold or breaker.state is not BreakerState.CLOSED
