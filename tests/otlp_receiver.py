"""A small OTLP/HTTP traces receiver for the tracing tests: a real aiohttp server, as a collector would be.

It takes ``POST /v1/traces`` with a protobuf ``ExportTraceServiceRequest`` (optionally gzip), decodes it with
``opentelemetry-proto`` (which comes with the OTLP exporter) and keeps every span with its resource's
attributes. It can also misbehave on command: ``hang`` (reads the request, never answers) or be stopped (the
port refuses), which is what a collector that is down looks like.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

try:
    import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401 - what IIM exports with
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as proto
except ImportError:  # pragma: no cover - the test extra installs both
    proto = None
    #: Why the OTLP tests skip (only then): the exporter and its opentelemetry-proto are not installed.
    MISSING: str | None = ("the OTLP/HTTP exporter of the `otel` extra (with opentelemetry-proto) is not installed: "
                           "pip install -e '.[test]'")
else:
    MISSING = None


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in any_value.kvlist_value.values}
    return None if kind is None else getattr(any_value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived: ids as lower-case hex (the ``traceparent`` spelling)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    scope: str


@dataclass
class Receiver:
    url: str = ""
    mode: str = "ok"
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    content_types: set[str] = field(default_factory=set)

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> ReceivedSpan:
        found = self.named(name)
        assert len(found) == 1, f"{len(found)} spans named {name}: {sorted({s.name for s in self.spans})}"
        return found[0]

    def in_trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        if self.mode == "hang":
            await asyncio.sleep(3600)
        encoding = request.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        self.content_types.add(request.content_type)
        export = proto.ExportTraceServiceRequest()
        export.ParseFromString(body)
        for resource_spans in export.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(ReceivedSpan(
                        name=span.name, trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(), kind=span.kind,
                        attributes=_attributes(span.attributes), resource=resource, scope=scope_spans.scope.name))
        answer = proto.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")


@asynccontextmanager
async def otlp_receiver(mode: str = "ok") -> AsyncIterator[Receiver]:
    """A receiver on 127.0.0.1 (a free port); ``url`` is its traces endpoint (``.../v1/traces``). Skips the
    test, saying why, when the exporter is not installed."""
    if MISSING is not None:
        pytest.skip(MISSING)
    receiver = Receiver(mode=mode)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", receiver.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    receiver.url = f"http://127.0.0.1:{port}/v1/traces"
    try:
        yield receiver
    finally:
        await runner.cleanup()
