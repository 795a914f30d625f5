"""Prometheus metrics of the ESL layer (one registry per process, created once).

Label values are small closed sets (command verb, result, event name); children
are cached so the per-call path does one dictionary lookup and one lock per update.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

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
COMMANDS = Counter("iim_esl_commands", "ESL commands sent, by verb and result", ["command", "result"], registry=REGISTRY)
COMMAND_SECONDS = Histogram(
    "iim_esl_command_seconds",
    "Command written to reply received",
    ["command"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
    registry=REGISTRY,
)
EVENTS = Counter("iim_esl_events", "Events received, by Event-Name", ["event"], registry=REGISTRY)
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

_event_children: dict[str, Counter] = {}
_command_children: dict[tuple[str, bool], tuple[Counter, Histogram]] = {}


def count_reply(verb: str, ok: bool, seconds: float) -> None:
    """One command answered: counted by verb and result, its round trip observed."""
    children = _command_children.get((verb, ok))
    if children is None:
        children = _command_children[(verb, ok)] = (
            COMMANDS.labels(verb, "ok" if ok else "err"), COMMAND_SECONDS.labels(verb),
        )
    children[0].inc()
    children[1].observe(seconds)


def count_event(name: str) -> None:
    child = _event_children.get(name)
    if child is None:
        if len(_event_children) >= 256:  # bound the label set against a misbehaving peer
            name = "OTHER"
        child = _event_children[name] = EVENTS.labels(name)
    child.inc()
