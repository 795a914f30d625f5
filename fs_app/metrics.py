"""Prometheus metrics of the ESL layer (one registry per process, created once).

Label values are small closed sets (command verb, result, event name); children
are cached so the per-call path does one dictionary lookup and one lock per update.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)

CALLS = Counter("iim_esl_calls", "Outbound-socket calls handled, by result", ["result"], registry=REGISTRY)
CALLS_ACTIVE = Gauge("iim_esl_calls_active", "Outbound-socket calls in progress", registry=REGISTRY)
CALL_SETUP = Histogram(
    "iim_esl_call_setup_seconds",
    "Accept of FreeSWITCH's connection to the first call-control sendmsg written",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
COMMAND_SECONDS = Histogram(
    "iim_esl_command_seconds",
    "Command written to reply received",
    ["command"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
    registry=REGISTRY,
)
ERRORS = Counter("iim_esl_errors", "ESL errors, by kind", ["kind"], registry=REGISTRY)
QUEUE_OVERFLOW = Counter(
    "iim_esl_queue_overflow", "Events dropped because a per-call or per-client queue was full", registry=REGISTRY
)
INBOUND_CONNECTED = Gauge(
    "iim_esl_inbound_connected", "Inbound ESL connections up (1) or down (0), by node", ["node"], registry=REGISTRY
)
INBOUND_RECONNECTS = Counter(
    "iim_esl_inbound_reconnects", "Inbound ESL connection attempts after a loss, by node", ["node"], registry=REGISTRY
)

CALLS_ROUTED = Counter("iim_calls_routed", "Calls routed, by how the route was chosen", ["route"], registry=REGISTRY)

class _TallyCollector(Collector):
    """Counters kept in plain dicts and read at scrape time.

    Several events and replies arrive per call; a ``prometheus_client`` counter takes a lock
    per increment, a dict increment does not (the event loop is single-threaded).
    """

    def __init__(self) -> None:
        self.events: Tally[str] = Tally()
        self.commands: Tally[tuple[str, str]] = Tally()

    def collect(self) -> Iterator[CounterMetricFamily]:
        events = CounterMetricFamily("iim_esl_events", "Events received, by Event-Name", labels=["event"])
        for name, value in list(self.events.items()):
            events.add_metric([name], value)
        yield events
        commands = CounterMetricFamily("iim_esl_commands", "ESL commands answered, by verb and result",
                                       labels=["command", "result"])
        for (verb, result), value in list(self.commands.items()):
            commands.add_metric([verb, result], value)
        yield commands


TALLIES = _TallyCollector()
REGISTRY.register(TALLIES)
_MAX_EVENT_NAMES = 256  # bound the label set against a misbehaving peer
_command_seconds: dict[str, Histogram] = {}


def count_event(name: str) -> None:
    events = TALLIES.events
    if name in events or len(events) < _MAX_EVENT_NAMES:
        events[name] += 1
    else:
        events["OTHER"] += 1


def count_reply(verb: str, ok: bool, seconds: float) -> None:
    """One command answered: counted by verb and result, its round trip observed."""
    TALLIES.commands[(verb, "ok" if ok else "err")] += 1
    child = _command_seconds.get(verb)
    if child is None:
        child = _command_seconds[verb] = COMMAND_SECONDS.labels(verb)
    child.observe(seconds)


def count_command(verb: str, result: str) -> None:
    TALLIES.commands[(verb, result)] += 1
