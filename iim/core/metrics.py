"""The process's one Prometheus registry: every room registers its metrics here, ``/metrics`` serves it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, ProcessCollector

__all__ = ["REGISTRY"]

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
