"""What ``/health``, ``/readyz`` and ``/livez`` report: every dependency's state since when, readiness, liveness.

Each dependency is read from the part that knows it (the database probe, the ESL links, the SMPP bind, the
connector registry and its probes, speech); :class:`HealthMonitor` turns those readings into states with the
time each began (:class:`iim.core.health.StateTracker`), logs every transition, and exports them as
``iim_dependency_up`` (0/1) and ``iim_dependency_state`` (an enum as labels). A supervised task re-reads
everything every second, so ``since`` is right to a second even when nobody asks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Protocol

from prometheus_client import Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fs_app.inbound import InboundClient
from iim.connectors.registry import ConnectorRegistry
from iim.core.health import (
    STATUSES,
    DependencyState,
    LagWindow,
    Observation,
    Readiness,
    StateTracker,
    Status,
)
from iim.core.metrics import REGISTRY
from iim.tts.engine import EspeakTts
from policy_cache.health import DatabaseProbe

__all__ = ["BUILD_INFO", "HealthMonitor", "Source", "build_info", "connectors", "database", "freeswitch",
           "mqtt", "smsc", "tts"]

log = logging.getLogger("iim.health")

Source = Callable[[], Iterable[Observation]]


class _Bindable(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def ready(self) -> bool: ...


# --- readings: one function per kind of dependency ----------------------------------------------------------


def database(probe: DatabaseProbe) -> Source:
    """PostgreSQL: ``ok`` while ``SELECT 1`` answers within its deadline, ``down`` otherwise."""

    def read() -> Iterable[Observation]:
        report = probe.health()["database"]
        assert isinstance(report, dict)
        ok = bool(report.get("answering"))
        yield Observation("postgresql", "postgresql", "ok" if ok else "down",
                          None if ok else str(report.get("error") or "not answering"),
                          {"last_answer_s_ago": report.get("last_answer_s_ago")})

    return read


def freeswitch(clients: Sequence[InboundClient]) -> Source:
    """Each FreeSWITCH node's inbound ESL link: ``ok`` connected, ``down`` not."""

    def read() -> Iterable[Observation]:
        for client in clients:
            node = client.settings.node
            why = f"inbound ESL not connected ({client.last_error})" if client.last_error else \
                "inbound ESL not connected"
            yield Observation(f"freeswitch/{node}", "freeswitch", "ok" if client.connected else "down",
                              None if client.connected else why)

    return read


def smsc(transport: _Bindable) -> Source:
    """The SMSC: ``ok`` while the SMPP transceiver is bound, ``down`` otherwise (SMS wait in the outbox)."""

    def read() -> Iterable[Observation]:
        yield Observation("smsc", "smsc", "ok" if transport.ready else "down",
                          None if transport.ready else "not bound", {"smsc": transport.name})

    return read


class _Broker(Protocol):
    @property
    def connected(self) -> bool: ...

    @property
    def last_error(self) -> str | None: ...


def mqtt(ingress: Callable[[], _Broker | None], broker: str) -> Source:
    """The hubs' MQTT broker: ``ok`` while IIM is connected and subscribed, ``down`` otherwise (hubs' events
    wait at the broker, commands are refused with 503). ``ingress()`` is None until the ingress has started."""

    def read() -> Iterable[Observation]:
        found = ingress()
        up = found is not None and found.connected
        why = None if up else (found.last_error if found is not None else None) or "not connected"
        yield Observation("mqtt", "mqtt", "ok" if up else "down", why, {"broker": broker})

    return read


_CONNECTOR_STATUS: dict[str, Status] = {"up": "ok", "degraded": "degraded", "down": "down"}


def connectors(registry: ConnectorRegistry) -> Source:
    """Each configured connector, as its probes and requests found it (``up`` -> ``ok``)."""

    def read() -> Iterable[Observation]:
        for status in registry.statuses():
            health = status.health
            detail: dict[str, object] = {"plugin": status.plugin, "breaker": status.breaker,
                                         "checked_at": health.checked_at.isoformat() if health.checked_at else None}
            reason = health.last_error if health.state != "up" else None
            yield Observation(f"connector/{status.name}", "connector", _CONNECTOR_STATUS[health.state], reason,
                              detail)

    return read


def tts(engine: EspeakTts) -> Source:
    """Speech: ``down`` while synthesis fails (alert calls play the generic prompt, SMS are shown as text)."""

    def read() -> Iterable[Observation]:
        report = engine.health()["tts"]
        assert isinstance(report, dict)
        ok = report.get("status") == "ok"
        yield Observation("tts", "tts", "ok" if ok else "down", None if ok else str(report.get("error")))

    return read


# --- the monitor -----------------------------------------------------------------------------------------


class HealthMonitor:
    """Reads every source, keeps since-when, decides readiness and liveness (``iim.http`` serves them).

    Args:
        sources: the dependencies' readings.
        ready_inputs: ``() -> Readiness`` for ``/readyz`` (decided by :func:`iim.core.health.readiness`).
        loop_lag: where the service's loop-lag watcher records what it measures.
        max_loop_lag_s: ``/livez`` fails while the loop ran a timer this late within the last 10 s, or the
            loop-lag watcher has not ticked for this long.
    """

    def __init__(self, sources: Sequence[Source], ready_inputs: Callable[[], Readiness], *,
                 loop_lag: LagWindow | None = None, max_loop_lag_s: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._sources = list(sources)
        self._ready_inputs = ready_inputs
        self._clock = clock
        self._tracker = StateTracker()
        self.max_loop_lag_s = max_loop_lag_s
        self.loop_lag = loop_lag if loop_lag is not None else LagWindow()
        _COLLECTOR.add(self)

    def dependencies(self) -> list[DependencyState]:
        """Every dependency now, with since when it has been in that state; transitions are logged."""
        observations: list[Observation] = []
        for source in self._sources:
            observations.extend(source())
        states, transitions = self._tracker.observe(observations, self._clock())
        for obs, previous in transitions:
            if previous is None and obs.status == "ok":
                continue
            level = logging.INFO if obs.status == "ok" else logging.WARNING
            log.log(level, "dependency %s: %s -> %s%s", obs.name, previous or "unknown", obs.status,
                    f" ({obs.reason})" if obs.reason else "", extra={"dependency": obs.name, "status": obs.status})
        return states

    def readiness(self) -> Readiness:
        return self._ready_inputs()

    def liveness(self) -> str | None:
        """Why the process is not live (its event loop stalled), or ``None``."""
        return self.loop_lag.stalled(time.monotonic(), self.max_loop_lag_s)

    async def run(self, interval: float = 1.0) -> None:
        """Re-read every ``interval`` s, so transitions are logged and dated when they happen."""
        while True:
            self.dependencies()
            await asyncio.sleep(interval)


class _DependencyCollector(Collector):
    """``iim_dependency_up`` and ``iim_dependency_state`` of every live monitor, read at scrape time."""

    def __init__(self) -> None:
        self._monitors: weakref.WeakSet[HealthMonitor] = weakref.WeakSet()

    def add(self, monitor: HealthMonitor) -> None:
        self._monitors.add(monitor)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up, state = self._families()
        seen: set[str] = set()
        for monitor in list(self._monitors):
            for dep in monitor.dependencies():
                obs = dep.observation
                if obs.name in seen:  # one monitor per process in production; tests may hold several
                    continue
                seen.add(obs.name)
                up.add_metric([obs.name, obs.kind], 0.0 if obs.status == "down" else 1.0)
                for value in STATUSES:
                    state.add_metric([obs.name, obs.kind, value], 1.0 if obs.status == value else 0.0)
        yield up
        yield state

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily("iim_dependency_up", "1 while a dependency is usable (ok or degraded), 0 down",
                                  labels=["dependency", "kind"]),
                GaugeMetricFamily("iim_dependency_state", "1 for a dependency's current state (ok, degraded, down)",
                                  labels=["dependency", "kind", "state"]))


_COLLECTOR = _DependencyCollector()
REGISTRY.register(_COLLECTOR)


# --- build info ------------------------------------------------------------------------------------------

BUILD_INFO = Info("iim_build", "The running build: IIM's version, Python's, and the git commit when known",
                  registry=REGISTRY)


def _git_commit(start: Path) -> str | None:
    """The commit of a source checkout IIM runs from (an editable install), read from ``.git`` without git."""
    for folder in (start, *start.parents):
        git = folder / ".git"
        if git.is_file():  # a worktree: "gitdir: /path"
            text = git.read_text(encoding="utf-8").strip()
            git = Path(text.removeprefix("gitdir: ")) if text.startswith("gitdir: ") else git
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text(encoding="utf-8").strip()
            if not head.startswith("ref: "):
                return head or None
            ref = head.removeprefix("ref: ")
            common = git
            if (git / "commondir").is_file():
                common = (git / (git / "commondir").read_text(encoding="utf-8").strip()).resolve()
            for base in (git, common):
                if (base / ref).is_file():
                    return (base / ref).read_text(encoding="utf-8").strip() or None
            packed = common / "packed-refs"
            if packed.is_file():
                for line in packed.read_text(encoding="utf-8").splitlines():
                    if line.endswith(" " + ref):
                        return line.split(" ", 1)[0]
        except OSError:
            return None
        return None
    return None


def build_info() -> dict[str, str]:
    """``version``, ``python`` and ``commit`` (``IIM_GIT_COMMIT`` when set, else the checkout's, else empty)."""
    try:
        iim_version = version("iim")
    except PackageNotFoundError:
        iim_version = "unknown"
    commit = os.environ.get("IIM_GIT_COMMIT") or _git_commit(Path(__file__).resolve().parent) or ""
    return {"version": iim_version, "python": platform.python_version(), "commit": commit}


BUILD_INFO.info(build_info())
