"""Spans recorded in memory (the SDK's InMemorySpanExporter), and a tree view to assert on.

The SDK's provider is installed once per process (OpenTelemetry allows one global provider); recording is
switched on only for the tests that ask for ``spans``, so every other test runs with tracing off, as
``iim serve`` does by default.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from iim.core import tracing

_EXPORTER = InMemorySpanExporter()


def _install() -> None:
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(provider)


@dataclass
class Spans:
    exporter: InMemorySpanExporter

    def all(self) -> Sequence[ReadableSpan]:
        return self.exporter.get_finished_spans()

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.all() if s.name == name]

    def one(self, name: str, **attributes: object) -> ReadableSpan:
        found = [s for s in self.named(name)
                 if all((s.attributes or {}).get(f"iim.{k}") == v for k, v in attributes.items())]
        assert len(found) == 1, f"{len(found)} spans {name} with {attributes}: {[s.attributes for s in found]}"
        return found[0]

    def parent_of(self, child: ReadableSpan) -> ReadableSpan | None:
        if child.parent is None:
            return None
        return next((s for s in self.all() if s.context is not None
                     and s.context.span_id == child.parent.span_id), None)

    def trace_of(self, root: ReadableSpan) -> list[ReadableSpan]:
        assert root.context is not None
        return [s for s in self.all() if s.context is not None and s.context.trace_id == root.context.trace_id]


def is_child(child: ReadableSpan, parent: ReadableSpan) -> bool:
    return (child.parent is not None and parent.context is not None
            and child.parent.span_id == parent.context.span_id and child.parent.trace_id == parent.context.trace_id)


@pytest.fixture
def spans() -> Iterator[Spans]:
    _install()
    _EXPORTER.clear()
    tracing.enable()
    try:
        yield Spans(_EXPORTER)
    finally:
        tracing.enable(False)
        _EXPORTER.clear()
