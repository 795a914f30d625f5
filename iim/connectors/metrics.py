"""Prometheus metrics of the smart-home connectors, in the process registry (``iim.core.metrics.REGISTRY``).

``iim_connector_requests`` counts HTTP attempts as they happen. ``iim_connector_up`` and
``iim_connector_breaker_state`` are read from the loaded connectors at scrape time, so an open circuit
turning half-open after its cool-down shows without any request having to pass.
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

__all__ = ["REQUESTS", "UP_VALUE", "watch"]

REQUESTS = Counter(
    "iim_connector_requests",
    "Connector HTTP attempts, by connector, capability and result (ok, refused, unauthorized, rate_limited, "
    "server_error, timeout, connection_error, circuit_open)",
    ["connector", "capability", "result"], registry=REGISTRY,
)

#: ``iim_connector_up`` values by health state.
UP_VALUE = {"up": 1.0, "degraded": 0.5, "down": 0.0}


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
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up, breaker = self._families()
        seen: set[str] = set()
        for source in list(self._sources):
            for name, health, breaker_state in source.gauge_samples():
                if name in seen:  # one registry per process in production; tests may hold several
                    continue
                seen.add(name)
                up.add_metric([name], UP_VALUE[health])
                if breaker_state is not None:
                    breaker.add_metric([name], BreakerState(breaker_state).gauge_value)
        yield up
        yield breaker

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("iim_connector_up", "Connector health: 1 up, 0.5 degraded, 0 down",
                              labels=["connector"]),
            GaugeMetricFamily("iim_connector_breaker_state",
                              "Connector circuit breaker: 0 closed, 1 half-open, 2 open", labels=["connector"]),
        )


_COLLECTOR = _ConnectorCollector()
REGISTRY.register(_COLLECTOR)


def watch(source: _Gauges) -> None:
    """Export ``source``'s connectors until it is garbage-collected."""
    _COLLECTOR.add(source)
