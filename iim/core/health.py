"""Health as decisions: each dependency's state and since when, readiness, liveness (pure; no I/O).

Why pure: the states come from many places (a database probe, ESL links, the SMSC bind, connector probes,
speech), but *when* a state began, what readiness means and when the loop counts as stalled are rules, and
rules are tested with inputs and a clock, not with a running service.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

__all__ = ["STATUSES", "DependencyState", "LagWindow", "Observation", "Readiness", "StateTracker", "Status",
           "overall", "readiness"]

Status = Literal["ok", "degraded", "down"]
STATUSES: tuple[Status, ...] = ("ok", "degraded", "down")
_RANK = {"ok": 0, "degraded": 1, "down": 2}


@dataclass(frozen=True, slots=True)
class Observation:
    """One dependency as seen now: ``name`` (``postgresql``, ``freeswitch/fs1``, ``connector/acme``...), its
    ``kind`` (``postgresql``, ``freeswitch``, ``smsc``, ``mqtt``, ``connector``, ``tts``), status, why, and details."""

    name: str
    kind: str
    status: Status
    reason: str | None = None
    detail: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DependencyState:
    """An observation with the wall-clock time its current status began."""

    observation: Observation
    since: float  # unix seconds

    def as_json(self) -> dict[str, object]:
        o = self.observation
        doc: dict[str, object] = {"kind": o.kind, "status": o.status,
                                  "since": datetime.fromtimestamp(self.since, UTC).isoformat()}
        if o.reason:
            doc["reason"] = o.reason
        doc.update(o.detail)
        return doc


class StateTracker:
    """Remembers since when each dependency has been in its current status.

    A status seen for the first time began "now" (the tracker cannot know better); a dependency that
    disappears (a connector unloaded) is forgotten. ``observe`` returns the transitions it saw, for logs.
    """

    __slots__ = ("_since",)

    def __init__(self) -> None:
        self._since: dict[str, tuple[Status, float]] = {}

    def observe(self, observations: Iterable[Observation], now: float) -> tuple[
            list[DependencyState], list[tuple[Observation, Status | None]]]:
        """``(states, transitions)``; a transition is ``(observation, previous status or None)``."""
        states: list[DependencyState] = []
        transitions: list[tuple[Observation, Status | None]] = []
        seen: dict[str, tuple[Status, float]] = {}
        for obs in observations:
            previous = self._since.get(obs.name)
            if previous is not None and previous[0] == obs.status:
                since = previous[1]
            else:
                since = now
                transitions.append((obs, previous[0] if previous else None))
            seen[obs.name] = (obs.status, since)
            states.append(DependencyState(obs, since))
        self._since = seen
        return states, transitions


def overall(states: Iterable[Status]) -> Literal["ok", "degraded"]:
    """The service's own status: ``ok`` when every dependency is, else ``degraded``: IIM keeps serving with
    a dependency down (calls to the dialled number, SMS queued, fallbacks); ``/readyz`` is the gate."""
    return "ok" if all(_RANK[s] == 0 for s in states) else "degraded"


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...]


def readiness(*, database_answering: bool | None, cache_loaded: bool | None, alert_calls: bool,
              nodes_connected: int) -> Readiness:
    """Ready to take traffic: PostgreSQL answered within its deadline, the policy cache is loaded, and, when
    alert calls are configured, at least one FreeSWITCH node is connected. ``None``: not part of this
    process (no policy routing), so not required."""
    reasons: list[str] = []
    if database_answering is False:
        reasons.append("database not answering within its deadline")
    if cache_loaded is False:
        reasons.append("policy cache not loaded")
    if alert_calls and nodes_connected == 0:
        reasons.append("no FreeSWITCH node connected (alert calls are configured)")
    return Readiness(not reasons, tuple(reasons))


class LagWindow:
    """The event loop's recent lag, for ``/livez``: the worst lag measured within ``window`` seconds, and
    how long since the last measurement (a watcher that stopped ticking is a loop that stopped running)."""

    __slots__ = ("_samples", "window")

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, float]] = deque()

    def record(self, now: float, lag: float) -> None:
        self._samples.append((now, lag))
        while self._samples and self._samples[0][0] < now - self.window:
            self._samples.popleft()

    def stalled(self, now: float, limit: float) -> str | None:
        """Why the loop counts as stalled (``None``: responsive): a lag over ``limit`` within the window, or no
        measurement for longer than ``limit`` (plus the watcher's own period, which callers fold in)."""
        if not self._samples:
            return None  # not measured yet: the process has only just started
        last_at = self._samples[-1][0]
        if now - last_at > limit:
            return f"event loop not measured for {now - last_at:.1f} s"
        worst = max((lag for at, lag in self._samples if at >= now - self.window), default=0.0)
        if worst > limit:
            return f"event loop lag {worst:.2f} s in the last {self.window:g} s (limit {limit:g} s)"
        return None
