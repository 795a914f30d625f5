"""The connector loader: find plugins by entry point, validate their config, set them up and unload them in pairs.

Plugins are found in the ``iim.connectors`` entry-point group; each entry point yields a factory
``(config: dict, context: ConnectorContext) -> Connector`` (see :class:`iim.connectors.contract.ConnectorFactory`).
Each configured connector is an instance of a plugin under its own name (two aggregator clouds can both
use the ``webhook`` plugin)::

    registry = ConnectorRegistry(default_context(callback_base_url="https://iim.example.net"))
    await registry.load([{"name": "acme", "plugin": "webhook", "config": {...}}])
    ...
    await registry.aclose()

Like Home Assistant's ``async_setup_entry`` / ``async_unload_entry``, only a connector whose ``setup()``
succeeded is unloaded, in the reverse order of setup. One plugin failing (unknown plugin, import error,
config refused, ``setup()`` raising or hanging) never stops the others: it is kept as a failed entry whose
health is ``down`` with the reason in ``last_error``, so ``GET /v1/connectors`` and ``/health`` say why it
is missing. Calls go on without it (callers fall back to phone/SMS).

:meth:`ConnectorRegistry.run_probes` (a supervised task of the service) calls every ready connector's
``probe()`` on an interval, each under a deadline: a probe that hangs or raises makes the connector ``down``,
and one never probed is at best ``degraded`` ("not checked yet"), whatever the plugin's ``health()`` says.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib.metadata import entry_points
from typing import Any, cast

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from iim.connectors import metrics
from iim.connectors.contract import (
    Capability,
    Connector,
    ConnectorContext,
    ConnectorFactory,
    ConnectorHealth,
    ConnectorManifest,
    ConnectorUnavailable,
    HasBreakerState,
    LinkedTokens,
)
from iim.core.lifecycle import AsyncResource
from iim.core.secrets import resolve_secret

__all__ = [
    "ENTRY_POINT_GROUP", "ConnectorConfigError", "ConnectorContext", "ConnectorEntry", "ConnectorRegistry",
    "ConnectorStatus", "SystemClock", "default_context", "discover_factories", "describe_validation_error",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "iim.connectors"


class ConnectorConfigError(ValueError):
    """A connector's configuration is refused. The message names fields and problems, never values."""


class ConnectorEntry(BaseModel):
    """One configured connector: its instance ``name`` (metrics label, callback path), ``plugin`` and config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    plugin: str = Field(min_length=1, max_length=100)
    config: dict[str, Any] = Field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class ConnectorStatus:
    """What ``GET /v1/connectors`` shows for one configured connector."""

    name: str
    plugin: str
    version: str | None
    capabilities: tuple[str, ...]
    health: ConnectorHealth
    breaker: str | None = None

    def as_json(self) -> dict[str, Any]:
        checked = self.health.checked_at.isoformat() if self.health.checked_at else None
        return {"name": self.name, "plugin": self.plugin, "version": self.version,
                "capabilities": list(self.capabilities), "breaker": self.breaker,
                "health": {"state": self.health.state, "last_error": self.health.last_error,
                           "checked_at": checked}}


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(delay)


def _new_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(headers={"User-Agent": "iim-connectors"}, raise_for_status=False)


def default_context(*, callback_base_url: str | None = None,
                    linked_tokens: LinkedTokens | None = None) -> ConnectorContext:
    """The production context: ``iim.settings.resolve_secret``, fresh aiohttp sessions, the system clock."""
    return ConnectorContext(resolve_secret=resolve_secret, http_session=_new_session, clock=SystemClock(),
                            callback_base_url=callback_base_url, linked_tokens=linked_tokens)


def discover_factories(group: str = ENTRY_POINT_GROUP) -> tuple[dict[str, ConnectorFactory], dict[str, str]]:
    """Load every entry point of ``group``: ``(factories by plugin name, import errors by plugin name)``.

    A plugin that fails to import is reported, not raised: it only fails the connectors configured with it.
    """
    factories: dict[str, ConnectorFactory] = {}
    errors: dict[str, str] = {}
    for ep in entry_points(group=group):
        try:
            factory = ep.load()
        except Exception as exc:  # noqa: BLE001 -- third-party import code can raise anything; isolate it
            errors[ep.name] = f"plugin {ep.name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}"
            log.error("connector plugin %s failed to import: %s", ep.name, errors[ep.name])
            continue
        if not callable(factory):
            errors[ep.name] = f"plugin {ep.name!r} ({ep.value}) is not a factory"
            continue
        if ep.name in factories:
            log.warning("connector plugin %s is registered twice; keeping the first", ep.name)
            continue
        factories[ep.name] = cast(ConnectorFactory, factory)
    return factories, errors


def describe_validation_error(exc: ValidationError) -> str:
    """``field.path: problem; ...`` -- pydantic's own message would echo the input values."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in err["loc"]) or "(config)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


@dataclass(slots=True)
class _Slot:
    entry: ConnectorEntry
    manifest: ConnectorManifest | None = None
    connector: Connector | None = None
    set_up: bool = False
    error: str | None = None
    failed_at: datetime | None = field(default=None)
    probed: bool = False
    probe_error: str | None = None
    probed_at: datetime | None = None


class ConnectorRegistry(AsyncResource):
    """Loads, holds and unloads the configured connectors.

    Args:
        context: what plugins get (:func:`default_context` in production).
        factories: plugins by name; discovered from the ``iim.connectors`` entry points when ``None``.
        setup_timeout_s: a ``setup()`` still running after this long is cancelled and counted as failed.
        unload_timeout_s: the same bound for each ``unload()``.
    """

    def __init__(self, context: ConnectorContext, *, factories: Mapping[str, ConnectorFactory] | None = None,
                 setup_timeout_s: float = 30.0, unload_timeout_s: float = 10.0) -> None:
        self.context = context
        if factories is None:
            found, self._import_errors = discover_factories()
            self._factories: dict[str, ConnectorFactory] = found
        else:
            self._factories, self._import_errors = dict(factories), {}
        self.setup_timeout_s = setup_timeout_s
        self.unload_timeout_s = unload_timeout_s
        self._slots: dict[str, _Slot] = {}
        self._setup_order: list[str] = []
        self._loaded = False
        metrics.watch(self)

    def __repr__(self) -> str:
        return f"ConnectorRegistry(plugins={sorted(self._factories)}, connectors={list(self._slots)})"

    @property
    def plugins(self) -> frozenset[str]:
        """Plugin names available (discovered or given)."""
        return frozenset(self._factories)

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def load(self, configs: Iterable[Mapping[str, Any] | ConnectorEntry]) -> None:
        """Validate and set up every configured connector, in order; failures are recorded, not raised.

        Raises:
            ConnectorConfigError: the list itself is malformed (an entry without ``name``/``plugin``,
                a bad or duplicate name): that is IIM's own configuration, not one plugin's.
            RuntimeError: already loaded (call :meth:`aclose` first).
        """
        if self._loaded:
            raise RuntimeError("connectors are already loaded; aclose() first")
        entries = self._parse_entries(configs)
        self._loaded = True
        for entry in entries:
            slot = _Slot(entry)
            self._slots[entry.name] = slot
            await self._set_up(slot)
        ready = [name for name in self._slots if self._slots[name].set_up]
        log.info("connectors loaded: %d ready, %d failed", len(ready), len(self._slots) - len(ready),
                 extra={"ready": ready})

    async def aclose(self) -> None:
        """Unload every connector that was set up, last set up first; one failing unload does not stop the rest."""
        for name in reversed(self._setup_order):
            slot = self._slots[name]
            connector = slot.connector
            if connector is None or not slot.set_up:
                continue
            slot.set_up = False
            try:
                await asyncio.wait_for(connector.unload(), self.unload_timeout_s)
            except TimeoutError:
                log.error("connector %s did not unload within %.1f s", name, self.unload_timeout_s)
            except Exception as exc:  # noqa: BLE001 -- a plugin's unload bug must not leak the others
                log.error("connector %s failed to unload: %s: %s", name, type(exc).__name__, exc)
        self._setup_order.clear()
        self._slots.clear()
        self._loaded = False

    @contextlib.asynccontextmanager
    async def loaded(self, configs: Iterable[Mapping[str, Any] | ConnectorEntry]) -> AsyncIterator[
            ConnectorRegistry]:
        """``load`` on entry, ``aclose`` on exit (for an aiohttp ``cleanup_ctx`` or a service's ``async with``)."""
        await self.load(configs)
        try:
            yield self
        finally:
            await self.aclose()

    def _parse_entries(self, configs: Iterable[Mapping[str, Any] | ConnectorEntry]) -> list[ConnectorEntry]:
        entries: list[ConnectorEntry] = []
        problems: list[str] = []
        for index, raw in enumerate(configs):
            if isinstance(raw, ConnectorEntry):
                entries.append(raw)
                continue
            try:
                entries.append(ConnectorEntry.model_validate(raw))
            except ValidationError as exc:
                problems.append(f"connectors[{index}]: {describe_validation_error(exc)}")
        names = [entry.name for entry in entries]
        problems.extend(f"connector name {name!r} is used more than once"
                        for name in sorted({n for n in names if names.count(n) > 1}))
        if problems:
            raise ConnectorConfigError("connector configuration refused: " + "; ".join(problems))
        return entries

    async def _set_up(self, slot: _Slot) -> None:
        entry = slot.entry
        factory = self._factories.get(entry.plugin)
        if factory is None:
            reason = self._import_errors.get(entry.plugin) or (
                f"no connector plugin {entry.plugin!r} (installed: {', '.join(sorted(self._factories)) or 'none'})")
            self._fail(slot, reason)
            return
        # Validate before constructing when the factory declares its manifest (a connector class does).
        declared = getattr(factory, "manifest", None)
        if isinstance(declared, ConnectorManifest) and not self._config_valid(slot, declared):
            return
        try:
            connector = factory(dict(entry.config), replace(self.context, connector_name=entry.name))
        except ValidationError as exc:
            self._fail(slot, f"invalid config: {describe_validation_error(exc)}")
            return
        except Exception as exc:  # noqa: BLE001 -- isolate one plugin's constructor from the others
            self._fail(slot, f"could not create: {type(exc).__name__}: {exc}")
            return
        slot.connector = connector
        slot.manifest = connector.manifest
        if not isinstance(declared, ConnectorManifest) and not self._config_valid(slot, connector.manifest):
            return
        try:
            await asyncio.wait_for(connector.setup(), self.setup_timeout_s)
        except TimeoutError:
            self._fail(slot, f"setup did not finish within {self.setup_timeout_s:g} s")
            return
        except Exception as exc:  # noqa: BLE001 -- a failing plugin is reported and skipped, never fatal
            self._fail(slot, f"setup failed: {type(exc).__name__}: {exc}")
            return
        slot.set_up = True
        self._setup_order.append(entry.name)
        log.info("connector %s (%s %s) ready", entry.name, entry.plugin, connector.manifest.version,
                 extra={"capabilities": sorted(connector.manifest.capabilities)})

    def _config_valid(self, slot: _Slot, manifest: ConnectorManifest) -> bool:
        slot.manifest = manifest
        try:
            manifest.config_schema.model_validate(slot.entry.config)
        except ValidationError as exc:
            self._fail(slot, f"invalid config: {describe_validation_error(exc)}")
            return False
        return True

    def _fail(self, slot: _Slot, reason: str) -> None:
        slot.error = reason
        slot.failed_at = datetime.fromtimestamp(self.context.clock.time(), UTC)
        log.error("connector %s (%s) not loaded: %s", slot.entry.name, slot.entry.plugin, reason)

    # --- lookup --------------------------------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._slots))

    def get(self, name: str) -> Connector:
        """The ready connector called ``name``.

        Raises:
            KeyError: no connector of that name is configured.
            ConnectorUnavailable: it is configured but failed to load (or is unloaded): use the fallback.
        """
        slot = self._slots[name]
        if slot.connector is None or not slot.set_up:
            raise ConnectorUnavailable(f"connector {name!r} is not loaded: {slot.error or 'not set up'}")
        return slot.connector

    def ready(self, capability: Capability | None = None) -> list[tuple[str, Connector]]:
        """Ready connectors (optionally only those offering ``capability``), in configuration order."""
        found = []
        for name, slot in self._slots.items():
            if slot.connector is None or not slot.set_up:
                continue
            if capability is None or capability in slot.connector.manifest.capabilities:
                found.append((name, slot.connector))
        return found

    def error(self, name: str) -> str | None:
        """Why the connector ``name`` failed to load (``None`` when it is ready)."""
        return self._slots[name].error

    # --- health --------------------------------------------------------------------------------------------

    async def probe_all(self, timeout: float) -> None:
        """Probe every ready connector at once, each within ``timeout`` s (a hung vendor holds nobody else)."""
        slots = [slot for slot in self._slots.values() if slot.connector is not None and slot.set_up]
        await asyncio.gather(*(self._probe(slot, timeout) for slot in slots))

    async def run_probes(self, interval: float, timeout: float) -> None:
        """Probe every ``interval`` s until cancelled (run it under a ``TaskSupervisor``)."""
        while True:
            await self.probe_all(timeout)
            await asyncio.sleep(interval)

    async def _probe(self, slot: _Slot, timeout: float) -> None:
        connector = slot.connector
        assert connector is not None
        try:
            async with asyncio.timeout(timeout):
                await connector.probe()
        except TimeoutError:
            slot.probe_error = f"probe did not answer within {timeout:g} s"
        except Exception as exc:  # noqa: BLE001 -- a plugin's probe bug reads as down, it must not stop probing
            slot.probe_error = f"probe failed: {type(exc).__name__}: {exc}"
        else:
            slot.probe_error = None
        slot.probed = True
        slot.probed_at = datetime.fromtimestamp(self.context.clock.time(), UTC)
        if slot.probe_error is not None:
            log.warning("connector %s: %s", slot.entry.name, slot.probe_error)

    def statuses(self) -> list[ConnectorStatus]:
        """Name, capabilities and health of every configured connector, failed ones included."""
        return [self._status(slot) for slot in self._slots.values()]

    def _status(self, slot: _Slot) -> ConnectorStatus:
        manifest = slot.manifest
        capabilities = tuple(sorted(manifest.capabilities)) if manifest else ()
        version = manifest.version if manifest else None
        breaker: str | None = None
        if slot.connector is not None and slot.set_up:
            try:
                health = slot.connector.health()
                if isinstance(slot.connector, HasBreakerState):
                    breaker = slot.connector.breaker_state()
            except Exception as exc:  # noqa: BLE001 -- a broken health() reads as down, it must not break /v1
                health = ConnectorHealth("down", f"health check failed: {type(exc).__name__}",
                                         datetime.fromtimestamp(self.context.clock.time(), UTC))
            if slot.probe_error is not None:
                health = ConnectorHealth("down", slot.probe_error, slot.probed_at)
            elif not slot.probed and health.state == "up":  # "up" means checked
                health = ConnectorHealth("degraded", "not checked yet", health.checked_at)
        else:
            health = ConnectorHealth("down", slot.error or "not set up", slot.failed_at)
        return ConnectorStatus(slot.entry.name, slot.entry.plugin, version, capabilities, health, breaker)

    def gauge_samples(self) -> Iterator[tuple[str, str, str | None]]:
        """For the scrape-time collector in :mod:`iim.connectors.metrics`."""
        for status in self.statuses():
            yield status.name, status.health.state, status.breaker
