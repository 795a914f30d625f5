"""Where spans go: the OpenTelemetry SDK and an exporter, installed at start when tracing is configured.

The SDK and the OTLP exporter are optional (``pip install 'iim[otel]'``): without them, or with no exporter
configured, the API's no-op tracer stays in place and a span costs next to nothing. The exporter is chosen by
``IIM_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``), else by the standard ``OTEL_TRACES_EXPORTER``, else
``otlp`` as soon as an ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` is set; ``OTEL_SDK_DISABLED=true`` turns it all
off. Everything else is the SDK's own standard environment: ``OTEL_EXPORTER_OTLP_*`` (endpoint, headers,
certificate, timeout), ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``.
Spans leave in batches from the SDK's own thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Literal

from opentelemetry import trace

from iim.core import tracing
from iim.core.lifecycle import AsyncResource

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["Exporter", "Tracing", "chosen_exporter", "command_tracing", "resource_defaults", "stop_within"]

log = logging.getLogger("iim.telemetry")

Exporter = Literal["otlp", "console", "none"]
_EXPORTERS: tuple[Exporter, ...] = ("otlp", "console", "none")


def chosen_exporter(setting: Exporter | None, env: Mapping[str, str]) -> Exporter:
    """Which exporter the settings and the standard environment ask for (pure: see the module docstring)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "none"
    if setting is not None:
        return setting
    standard = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if standard:
        first = standard.split(",")[0].strip()
        for known in _EXPORTERS:
            if first == known:
                return known
        return "none"
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return "otlp"
    return "none"


def _given_resource_keys(env: Mapping[str, str]) -> set[str]:
    """The resource attributes the standard environment sets (``OTEL_RESOURCE_ATTRIBUTES``: ``k=v,k=v``)."""
    keys = {part.partition("=")[0].strip() for part in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
            if "=" in part}
    if env.get("OTEL_SERVICE_NAME", "").strip():
        keys.add("service.name")
    return keys


def resource_defaults(env: Mapping[str, str], *, service: str = "iim") -> dict[str, str]:
    """IIM's own resource attributes, each only where the standard environment does not set it (pure).

    Why not simply pass them: the SDK lets explicit attributes override ``OTEL_RESOURCE_ATTRIBUTES``, so an
    operator's ``service.name=iim-eu1`` would silently become ``iim``.
    """
    try:
        iim_version = version("iim")
    except PackageNotFoundError:
        iim_version = "unknown"
    given = _given_resource_keys(env)
    return {k: v for k, v in {"service.name": service, "service.version": iim_version}.items() if k not in given}


async def stop_within(stop: Callable[[], object], timeout_s: float, *, what: str) -> bool:
    """Run the blocking ``stop`` (the SDK's flush and shutdown: HTTP to the receiver) on a daemon thread and
    wait for it at most ``timeout_s``; False when it did not finish in time (it is left to end on its own).

    Why not ``asyncio.to_thread``: the loop's executor threads are joined at interpreter exit, so a receiver
    that hangs would hold ``iim serve``'s exit for as long as the SDK keeps trying.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            stop()
        except Exception:
            log.exception("tracing: %s failed", what)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(finished)

    threading.Thread(target=run, name=f"iim-tracing-{what}", daemon=True).start()
    try:
        async with asyncio.timeout(timeout_s):
            await done
    except TimeoutError:
        return False
    return True


@contextmanager
def command_tracing(env: Mapping[str, str] | None = None, *, flush_timeout_s: float = 2.0) -> Iterator[None]:
    """Spans of one ``iim`` CLI command exported over OTLP, when the environment asks for it as for ``iim serve``
    (``IIM_TRACES_EXPORTER``, ``IIM_OTLP_TRACES_ENDPOINT``, the standard ``OTEL_*``); else nothing is installed
    and the command only sends a ``traceparent`` (:mod:`iim.admin.cli`). Resource ``service.name=iim-cli``.

    Only OTLP: the console exporter would write into the command's output. At the end the spans are flushed on a
    daemon thread for at most ``flush_timeout_s``: a receiver that is away never holds the operator's prompt.
    """
    env = os.environ if env is None else env
    setting = env.get("IIM_TRACES_EXPORTER", "").strip().lower() or None
    chosen = chosen_exporter(setting if setting in _EXPORTERS else None, env)
    if chosen != "otlp" or not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        yield
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        yield
        return
    endpoint = env.get("IIM_OTLP_TRACES_ENDPOINT") or None
    exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    provider = TracerProvider(resource=Resource.create(resource_defaults(env, service="iim-cli")),
                              shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    tracing.enable()
    try:
        yield
    finally:
        tracing.enable(False)

        def flush_and_shut_down() -> None:
            provider.force_flush(int(flush_timeout_s * 1000))
            provider.shutdown()

        stopper = threading.Thread(target=flush_and_shut_down, name="iim-tracing-flush", daemon=True)
        stopper.start()
        stopper.join(flush_timeout_s)


class Tracing(AsyncResource):
    """Installs the SDK's tracer provider with the chosen exporter on start; flushes and stops it on close.

    A provider installed before (an embedding application, a test) is left in place and used as it is.
    """

    def __init__(self, exporter: Exporter | None = None, *, endpoint: str | None = None,
                 env: Mapping[str, str] | None = None, flush_timeout_s: float = 5.0) -> None:
        self._env = os.environ if env is None else env
        self.exporter = chosen_exporter(exporter, self._env)
        self._endpoint = endpoint
        self._flush_timeout_s = flush_timeout_s
        self._provider: TracerProvider | None = None
        self._borrowed = False

    @property
    def active(self) -> bool:
        """Are IIM's spans recorded (by the provider installed here, or one installed before)?"""
        return self._provider is not None or self._borrowed

    async def start(self) -> None:
        if self.exporter == "none":
            return
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            log.warning("tracing asked for (%s) but the OpenTelemetry SDK is not installed: spans are not "
                        "recorded (pip install 'iim[otel]')", self.exporter)
            return
        if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            log.info("a tracer provider is installed already: IIM's spans go to it")
            tracing.enable()
            self._borrowed = True
            return
        exporter = self._exporter()
        if exporter is None:
            return
        resource = Resource.create(resource_defaults(self._env))
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        self._provider = provider
        tracing.enable()
        log.info("tracing: spans exported by %s", self.exporter)

    def _exporter(self) -> SpanExporter | None:
        if self.exporter == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            return ConsoleSpanExporter()
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("tracing asked for OTLP but opentelemetry-exporter-otlp-proto-http is not installed: "
                        "spans are not recorded (pip install 'iim[otel]')")
            return None
        exporter: SpanExporter = OTLPSpanExporter(endpoint=self._endpoint) if self._endpoint else OTLPSpanExporter()
        return exporter

    async def aclose(self) -> None:
        provider, self._provider = self._provider, None
        if provider is not None or self._borrowed:
            tracing.enable(False)
        self._borrowed = False
        if provider is None:
            return
        # The SDK blocks while it flushes (its exporter does HTTP, retried while the receiver is away): off the
        # loop, and bounded, so a stop never waits on a receiver for longer than the flush timeout.
        timeout_ms = int(self._flush_timeout_s * 1000)

        def flush_and_shut_down() -> None:
            provider.force_flush(timeout_ms)
            provider.shutdown()

        if not await stop_within(flush_and_shut_down, self._flush_timeout_s, what="flush"):
            log.warning("tracing: spans not delivered within %.1f s at stop (is the receiver away?); the rest "
                        "are dropped", self._flush_timeout_s)
