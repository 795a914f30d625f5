"""Token buckets per device/source/tenant: deterministic (time is passed in), bounded."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iot_bridge.ratelimit import RateLimited, RateLimits, RateLimitSettings, TokenBucketLimiter

# --- TokenBucketLimiter -------------------------------------------------------------------------------------


def test_burst_is_allowed_then_refused_with_time_until_next_token() -> None:
    limiter = TokenBucketLimiter(rate=2.0, burst=3)
    assert [limiter.take("d", 100.0) for _ in range(3)] == [None, None, None]
    assert limiter.take("d", 100.0) == pytest.approx(0.5)
    assert limiter.take("d", 100.25) == pytest.approx(0.25)
    assert limiter.take("d", 100.5) is None


def test_refused_take_consumes_nothing() -> None:
    limiter = TokenBucketLimiter(rate=1.0, burst=1)
    assert limiter.take("d", 0.0) is None
    for _ in range(10):
        assert limiter.take("d", 0.5) == pytest.approx(0.5)
    assert limiter.take("d", 1.0) is None


def test_bucket_refills_to_burst_and_no_further() -> None:
    limiter = TokenBucketLimiter(rate=10.0, burst=2)
    limiter.take("d", 0.0)
    limiter.take("d", 0.0)
    allowed = sum(limiter.take("d", 3600.0) is None for _ in range(5))
    assert allowed == 2


def test_keys_are_independent() -> None:
    limiter = TokenBucketLimiter(rate=1.0, burst=1)
    assert limiter.take("a", 0.0) is None
    assert limiter.take("a", 0.0) is not None
    assert limiter.take("b", 0.0) is None


def test_clock_going_backwards_grants_nothing() -> None:
    limiter = TokenBucketLimiter(rate=1.0, burst=1)
    assert limiter.take("d", 100.0) is None
    assert limiter.take("d", 50.0) is not None
    assert limiter.take("d", 100.5) is not None
    assert limiter.take("d", 101.0) is None


def test_memory_is_bounded_by_evicting_the_least_recently_used_key() -> None:
    limiter = TokenBucketLimiter(rate=0.001, burst=1, max_keys=3)
    for key in ("a", "b", "c"):
        limiter.take(key, 0.0)
    assert limiter.take("a", 0.0) is not None  # refused, which counts as a use: "b" is now the oldest
    assert limiter.take("d", 0.0) is None
    assert len(limiter) == 3
    assert limiter.take("a", 0.0) is not None  # the throttled key is still remembered: still empty
    assert limiter.take("b", 0.0) is None  # evicted: back with a full bucket
    for i in range(1000):
        limiter.take(f"k{i}", 1.0)
    assert len(limiter) == 3


def test_wait_reports_without_taking() -> None:
    limiter = TokenBucketLimiter(rate=1.0, burst=1)
    assert limiter.wait("d", 0.0) is None
    assert limiter.wait("d", 0.0) is None
    limiter.take("d", 0.0)
    assert limiter.wait("d", 0.0) == pytest.approx(1.0)


@pytest.mark.parametrize(("rate", "burst", "max_keys"), [(0.0, 1, 1), (-1.0, 1, 1), (math.inf, 1, 1), (math.nan, 1, 1),
                                                          (1.0, 0, 1), (1.0, 1, 0)])
def test_nonsensical_settings_are_a_value_error(rate: float, burst: int, max_keys: int) -> None:
    with pytest.raises(ValueError):
        TokenBucketLimiter(rate, burst, max_keys=max_keys)


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(0.1, 100), burst=st.integers(1, 20),
       gaps=st.lists(st.floats(0, 2, allow_nan=False), min_size=1, max_size=60))
def test_never_more_than_burst_plus_rate_times_elapsed_is_allowed(rate: float, burst: int, gaps: list[float]) -> None:
    limiter = TokenBucketLimiter(rate, burst)
    now = allowed = 0.0
    for gap in gaps:
        now += gap
        wait = limiter.take("d", now)
        if wait is None:
            allowed += 1
        else:
            assert 0 < wait <= 1 / rate + 1e-9
    assert allowed <= burst + rate * now + 1e-6


# --- RateLimits ---------------------------------------------------------------------------------------------

SMALL = RateLimitSettings(device_rate=1.0, device_burst=2, source_rate=1.0, source_burst=3, tenant_rate=1.0,
                          tenant_burst=4)


def test_default_settings_match_the_documented_values() -> None:
    assert RateLimitSettings() == RateLimitSettings(1.0, 10, 50.0, 200, 500.0, 2000)


def test_device_burst_is_refused_with_device_scope_and_whole_second_retry_after() -> None:
    limits = RateLimits(SMALL)
    assert limits.check(tenant="t", device="d", source="1.2.3.4", now=0.0) is None
    assert limits.check(tenant="t", device="d", source="1.2.3.4", now=0.0) is None
    refused = limits.check(tenant="t", device="d", source="1.2.3.4", now=0.0)
    assert refused == RateLimited(scope="device", retry_after_s=1)


def test_retry_after_is_at_least_one_second_even_when_the_wait_is_shorter() -> None:
    limits = RateLimits(RateLimitSettings(device_rate=100.0, device_burst=1))
    limits.check(tenant="t", device="d", source="s", now=0.0)
    assert limits.check(tenant="t", device="d", source="s", now=0.0) == RateLimited("device", 1)


def test_retry_after_rounds_up() -> None:
    limits = RateLimits(RateLimitSettings(device_rate=0.4, device_burst=1))
    limits.check(tenant="t", device="d", source="s", now=0.0)
    assert limits.check(tenant="t", device="d", source="s", now=0.0) == RateLimited("device", 3)


def test_source_scope_limits_many_devices_behind_one_address() -> None:
    limits = RateLimits(SMALL)
    results = [limits.check(tenant="t", device=f"d{i}", source="10.0.0.1", now=0.0) for i in range(4)]
    assert results[:3] == [None, None, None]
    assert results[3] == RateLimited("source", 1)


def test_tenant_scope_limits_the_whole_tenant() -> None:
    limits = RateLimits(SMALL)
    results = [limits.check(tenant="t", device=f"d{i}", source=f"10.0.0.{i}", now=0.0) for i in range(5)]
    assert results[4] == RateLimited("tenant", 1)
    assert limits.check(tenant="other", device="d0", source="10.0.1.1", now=0.0) is None


def test_same_device_id_in_two_tenants_has_two_buckets() -> None:
    limits = RateLimits(SMALL)
    for _ in range(2):
        assert limits.check(tenant="a", device="d", source="s1", now=0.0) is None
    assert limits.check(tenant="b", device="d", source="s2", now=0.0) is None


def test_a_refused_request_does_not_drain_the_other_scopes() -> None:
    limits = RateLimits(SMALL)
    limits.check(tenant="t", device="noisy", source="s1", now=0.0)
    limits.check(tenant="t", device="noisy", source="s1", now=0.0)
    for _ in range(50):
        assert limits.check(tenant="t", device="noisy", source="s1", now=0.0) == RateLimited("device", 1)
    # The tenant (4) and source (3) buckets lost only the two accepted requests.
    assert limits.check(tenant="t", device="quiet", source="s1", now=0.0) is None
    assert limits.check(tenant="t", device="quiet2", source="s2", now=0.0) is None
    assert limits.check(tenant="t", device="quiet3", source="s3", now=0.0) == RateLimited("tenant", 1)


def test_when_several_scopes_are_dry_the_longest_wait_is_reported() -> None:
    limits = RateLimits(RateLimitSettings(device_rate=1.0, device_burst=1, source_rate=0.1, source_burst=1))
    limits.check(tenant="t", device="d", source="s", now=0.0)
    assert limits.check(tenant="t", device="d", source="s", now=0.0) == RateLimited("source", 10)
