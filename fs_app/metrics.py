"""Prometheus metrics of the ESL layer (one registry per process, created once).

Label values are small closed sets (command verb, result, event name); children
are cached so the per-call path does one dictionary lookup and one lock per update.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from iim.core.metrics import REGISTRY

CALLS = Counter("iim_esl_calls", "Outbound-socket calls handled, by result", ["result"], registry=REGISTRY)
CALLS_ACTIVE = Gauge("iim_esl_calls_active", "Outbound-socket calls in progress", registry=REGISTRY)
ERRORS = Counter("iim_esl_errors", "ESL errors, by kind", ["kind"], registry=REGISTRY)
QUEUE_OVERFLOW = Counter(
    "iim_esl_queue_overflow", "Events dropped because a per-call or per-client queue was full", registry=REGISTRY
)
INBOUND_RECONNECTS = Counter(
    "iim_esl_inbound_reconnects", "Inbound ESL connection attempts after a loss, by node", ["node"], registry=REGISTRY
)

CALLS_ROUTED = Counter("iim_calls_routed", "Calls routed, by how the route was chosen", ["route"], registry=REGISTRY)

class FastHistogram:
    """A histogram without a lock: the call path runs on one event loop thread."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class _TallyCollector(Collector):
    """Counters and histograms kept in plain Python objects and read at scrape time.

    Several events and replies arrive per call; a ``prometheus_client`` metric takes a lock
    per update, these do not (the event loop is single-threaded).
    """

    _COMMAND_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
    _SETUP_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

    def __init__(self) -> None:
        self.events: Tally[str] = Tally()
        self.commands: Tally[tuple[str, str]] = Tally()
        self.command_seconds: dict[str, FastHistogram] = {}
        self.call_setup = FastHistogram(self._SETUP_BOUNDS)

    def command_histogram(self, verb: str) -> FastHistogram:
        found = self.command_seconds.get(verb)
        if found is None:
            found = self.command_seconds[verb] = FastHistogram(self._COMMAND_BOUNDS)
        return found

    @staticmethod
    def _histogram(family: HistogramMetricFamily, labels: list[str], h: FastHistogram) -> None:
        running = 0
        buckets = []
        for bound, count in zip((*h.bounds, float("inf")), h.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        family.add_metric(labels, buckets, h.total)

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        events = CounterMetricFamily("iim_esl_events", "Events received, by Event-Name", labels=["event"])
        for name, value in list(self.events.items()):
            events.add_metric([name], value)
        yield events
        commands = CounterMetricFamily("iim_esl_commands", "ESL commands answered, by verb and result",
                                       labels=["command", "result"])
        for (verb, result), value in list(self.commands.items()):
            commands.add_metric([verb, result], value)
        yield commands
        seconds = HistogramMetricFamily("iim_esl_command_seconds", "Command written to reply received",
                                        labels=["command"])
        for verb, histogram in list(self.command_seconds.items()):
            self._histogram(seconds, [verb], histogram)
        yield seconds
        setup = HistogramMetricFamily(
            "iim_esl_call_setup_seconds", "Accept of FreeSWITCH's connection to the first call-control sendmsg written")
        self._histogram(setup, [], self.call_setup)
        yield setup


TALLIES = _TallyCollector()
REGISTRY.register(TALLIES)
_MAX_EVENT_NAMES = 256  # bound the label set against a misbehaving peer


def count_event(name: str) -> None:
    events = TALLIES.events
    if name in events or len(events) < _MAX_EVENT_NAMES:
        events[name] += 1
    else:
        events["OTHER"] += 1


def count_reply(verb: str, ok: bool, seconds: float) -> None:
    """One command answered: counted by verb and result, its round trip observed."""
    TALLIES.commands[(verb, "ok" if ok else "err")] += 1
    TALLIES.command_histogram(verb).observe(seconds)


def count_command(verb: str, result: str) -> None:
    TALLIES.commands[(verb, result)] += 1
