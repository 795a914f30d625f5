"""The health decisions: since-when per dependency, the service's status, readiness and a stalled loop."""

from __future__ import annotations

from iim.core.health import LagWindow, Observation, StateTracker, overall, readiness


def test_since_is_when_a_dependency_entered_its_state_not_when_it_was_last_seen() -> None:
    tracker = StateTracker()
    states, transitions = tracker.observe([Observation("smsc", "smsc", "ok")], now=100.0)
    assert states[0].since == 100.0
    assert [(o.name, prev) for o, prev in transitions] == [("smsc", None)]
    states, transitions = tracker.observe([Observation("smsc", "smsc", "ok")], now=105.0)
    assert (states[0].since, transitions) == (100.0, [])
    states, transitions = tracker.observe([Observation("smsc", "smsc", "down", "not bound")], now=110.0)
    assert states[0].since == 110.0
    assert [(o.status, prev) for o, prev in transitions] == [("down", "ok")]
    assert states[0].as_json() == {"kind": "smsc", "status": "down", "since": "1970-01-01T00:01:50+00:00",
                                   "reason": "not bound"}


def test_a_dependency_that_disappears_is_forgotten() -> None:
    tracker = StateTracker()
    tracker.observe([Observation("connector/a", "connector", "down")], now=1.0)
    tracker.observe([], now=2.0)
    states, _ = tracker.observe([Observation("connector/a", "connector", "down")], now=3.0)
    assert states[0].since == 3.0


def test_the_service_is_degraded_when_any_dependency_is_not_ok() -> None:
    assert overall(["ok", "ok"]) == "ok"
    assert overall([]) == "ok"
    assert overall(["ok", "degraded"]) == "degraded"
    assert overall(["down", "ok"]) == "degraded"  # still serving: calls go to the dialled number


def test_ready_needs_the_database_the_cache_and_a_switch_when_alert_calls_are_configured() -> None:
    assert readiness(database_answering=True, cache_loaded=True, alert_calls=True, nodes_connected=1).ready
    assert readiness(database_answering=None, cache_loaded=None, alert_calls=False, nodes_connected=0).ready
    assert readiness(database_answering=True, cache_loaded=True, alert_calls=False, nodes_connected=0).ready
    verdict = readiness(database_answering=False, cache_loaded=False, alert_calls=True, nodes_connected=0)
    assert not verdict.ready
    assert verdict.reasons == ("database not answering within its deadline", "policy cache not loaded",
                               "no FreeSWITCH node connected (alert calls are configured)")


def test_the_loop_is_stalled_after_a_late_timer_within_the_window_or_when_nothing_was_measured() -> None:
    lag = LagWindow(window=10.0)
    assert lag.stalled(now=0.0, limit=1.0) is None  # nothing measured yet: just started
    lag.record(1.0, 0.01)
    assert lag.stalled(now=1.5, limit=1.0) is None
    lag.record(2.0, 3.0)
    assert lag.stalled(now=2.1, limit=1.0) == "event loop lag 3.00 s in the last 10 s (limit 1 s)"
    for t in range(3, 14):
        lag.record(float(t), 0.01)
    assert lag.stalled(now=13.0, limit=1.0) is None  # the late timer left the window
    assert lag.stalled(now=20.0, limit=1.0) == "event loop not measured for 7.0 s"
