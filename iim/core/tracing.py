"""OpenTelemetry spans through the API alone: with no SDK installed (or none configured) every span is a no-op.

Why the API only: call control must not pay for tracing nobody collects. Nothing is recorded (nor carried) until
:func:`enable` is called, which ``iim.telemetry`` does once it installed the SDK's provider; until then
:func:`span` hands back one shared no-op span (a global read, no context switch, no allocation). On the call
path, where even the SDK's context switch counts, :func:`start` makes a span that is not made current.

Trace context crosses our boundaries as a W3C ``traceparent`` string: an HTTP header in (device bridge,
admin API), a FreeSWITCH channel variable out on originate and back on the call's socket (:data:`CHANNEL_VARIABLE`),
a stored action's spec (so a call taken over after a restart joins its trace). A malformed ``traceparent`` is
ignored (W3C Trace Context: the receiver starts a new trace), never an error.

Attributes are correlation ids only (tenant, call_id, sms_id, event_id, incident_id) and outcomes: never a
phone number, a name or a message text.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

__all__ = ["AttributeValue", "CHANNEL_VARIABLE", "HEADER", "Span", "SpanKind", "attrs", "context_from",
           "current_traceparent", "enable", "new_traceparent", "recording", "span", "start", "traceparent_of"]

#: The instrumentation scope of every IIM span.
SCOPE: Final = "iim"
#: The W3C header (lower case, as the propagator reads it).
HEADER: Final = "traceparent"
#: The channel variable that carries an alert call's trace context through FreeSWITCH and back.
CHANNEL_VARIABLE: Final = "iim_traceparent"

# version 00 only, lower-case hex, as W3C Trace Context level 1 writes it; anything else starts a new trace.
_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_PROPAGATOR: Final = TraceContextTextMapPropagator()
# A proxy: it delegates to whichever provider is installed later, so it may be made at import time.
_TRACER: Final = trace.get_tracer(SCOPE)
_NOOP: Final[AbstractContextManager[Span]] = nullcontext(trace.INVALID_SPAN)
_enabled = False


def enable(on: bool = True) -> None:
    """Record spans from now on (a provider is installed), or stop (``on=False``)."""
    global _enabled  # one switch read on every span: a module global is the cheapest read there is
    _enabled = on


def recording() -> bool:
    """Are spans recorded? (Callers skip building attributes when not.)"""
    return _enabled


def context_from(traceparent: str | None) -> Context | None:
    """The remote parent a ``traceparent`` names; None when it is absent, malformed or all zeros."""
    if not traceparent or len(traceparent) != 55 or _TRACEPARENT.fullmatch(traceparent) is None:
        return None
    ctx = _PROPAGATOR.extract({HEADER: traceparent})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def traceparent_of(target: Span) -> str | None:
    """``target``'s context as a ``traceparent`` (None for a no-op span: nothing to join)."""
    sc = target.get_span_context()
    if not sc.is_valid:
        return None
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def current_traceparent() -> str | None:
    """The current span's ``traceparent``, or None when no span records here."""
    return traceparent_of(trace.get_current_span())


def new_traceparent() -> str:
    """A fresh, sampled ``traceparent`` (new trace id, new parent id): what a caller that records no span of its
    own (the ``iim`` CLI without the SDK) sends, so the service's spans still share one trace per command."""
    trace_id = secrets.randbits(128) or 1  # all zeros is invalid
    span_id = secrets.randbits(64) or 1
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def attrs(**values: AttributeValue | None) -> dict[str, AttributeValue]:
    """Span attributes without the unknown ones (OpenTelemetry refuses None), named ``iim.<name>``."""
    return {f"iim.{name}": value for name, value in values.items() if value is not None}


def span(name: str, *, parent: str | Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
         attributes: Mapping[str, AttributeValue] | None = None) -> AbstractContextManager[Span]:
    """A span, current inside the ``with`` block; a child of ``parent`` (a ``traceparent`` or a context) when one
    is given and valid, else of the current span. An exception leaving the block is recorded on it."""
    if not _enabled:
        return _NOOP
    ctx = context_from(parent) if isinstance(parent, str) else parent
    return _TRACER.start_as_current_span(name, context=ctx, kind=kind, attributes=attributes)


def start(name: str, *, parent: Span | None = None, kind: SpanKind = SpanKind.INTERNAL,
          attributes: Mapping[str, AttributeValue] | None = None) -> Span:
    """A span that is not made current (no context switch: the call path's way); the caller ends it.
    A child of ``parent``, else of the current span."""
    if not _enabled:
        return trace.INVALID_SPAN
    ctx = trace.set_span_in_context(parent) if parent is not None else None
    return _TRACER.start_span(name, context=ctx, kind=kind, attributes=attributes)
