"""Prometheus metrics of the smart-home connectors, in the process registry (``iim.core.metrics.REGISTRY``).

``iim_connector_requests`` counts HTTP attempts as they happen. ``iim_connector_breaker_state`` is read from
the loaded connectors at scrape time, so an open circuit turning half-open after its cool-down shows without
any request having to pass; it is an enum as labels (Prometheus's convention): one sample per state, 1 for
the current one. Whether a connector is up is ``/health``'s business (``iim_dependency_up``, checked by probes).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from iim.connectors.breaker import BreakerState
from iim.core.metrics import REGISTRY

__all__ = ["REQUESTS", "watch"]

REQUESTS = Counter(
    "iim_connector_requests",
    "Connector HTTP attempts, by connector, capability and result (ok, refused, unauthorized, rate_limited, "
    "server_error, timeout, connection_error, circuit_open)",
    ["connector", "capability", "result"], registry=REGISTRY,
)


class _Gauges(Protocol):
    def gauge_samples(self) -> Iterable[tuple[str, str, str | None]]:
        """(connector name, health state, breaker state or None) for every configured connector."""
        ...


class _ConnectorCollector(Collector):
    """Reads every live :class:`~iim.connectors.registry.ConnectorRegistry` at scrape time."""

    def __init__(self) -> None:
        self._sources: weakref.WeakSet[_Gauges] = weakref.WeakSet()

    def add(self, source: _Gauges) -> None:
        self._sources.add(source)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        breaker = self._family()
        seen: set[str] = set()
        for source in list(self._sources):
            for name, _health, breaker_state in source.gauge_samples():
                if name in seen:  # one registry per process in production; tests may hold several
                    continue
                seen.add(name)
                if breaker_state is not None:
                    for state in BreakerState:
                        breaker.add_metric([name, state.value], 1.0 if state.value == breaker_state else 0.0)
        yield breaker

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("iim_connector_breaker_state",
                                 "Connector circuit breaker: 1 for its current state (closed, half_open, open)",
                                 labels=["connector", "state"])


_COLLECTOR = _ConnectorCollector()
REGISTRY.register(_COLLECTOR)


def watch(source: _Gauges) -> None:
    """Export ``source``'s connectors until it is garbage-collected."""
    _COLLECTOR.add(source)
