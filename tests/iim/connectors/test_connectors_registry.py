"""The connector loader: entry-point discovery, config validation, isolated failures, paired unload, health API."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import aiohttp
import pytest
from aiohttp import web
from pydantic import BaseModel, ConfigDict

from iim.connectors import registry as registry_module
from iim.connectors.contract import (
    Capability,
    Connector,
    ConnectorContext,
    ConnectorHealth,
    ConnectorManifest,
    ConnectorUnavailable,
    Notification,
    TtsDelivery,
    UserActionRequest,
    UserActionResult,
)
from iim.connectors.http import connector_list_view
from iim.connectors.registry import (
    ENTRY_POINT_GROUP,
    ConnectorConfigError,
    ConnectorRegistry,
    default_context,
    discover_factories,
)
from iim.connectors.webhook import WebhookConnector
from iim.core.metrics import REGISTRY
from tests.connector_peer import SIGNING_SECRET_TEXT, STATIC_TOKEN, serve


class RecordingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fail_setup: bool = False
    hang_setup: bool = False
    fail_unload: bool = False
    hang_probe: bool = False
    fail_probe: bool = False


class Recording:
    """A plugin that writes its lifecycle into a shared journal."""

    manifest = ConnectorManifest("recording", "0.1.0", frozenset({Capability.SEND_NOTIFICATION}), RecordingConfig)
    journal: ClassVar[list[str]] = []

    def __init__(self, config: dict[str, Any], context: ConnectorContext, /) -> None:
        self.config = RecordingConfig.model_validate(config)
        self.name = context.connector_name

    async def setup(self) -> None:
        self.journal.append(f"setup {self.name}")
        if self.config.fail_setup:
            raise RuntimeError("vendor said no")
        if self.config.hang_setup:
            await asyncio.sleep(10)

    async def unload(self) -> None:
        self.journal.append(f"unload {self.name}")
        if self.config.fail_unload:
            raise RuntimeError("unload bug")

    async def send_notification(self, notification: Notification) -> str:
        return "sent"

    async def request_user_action(self, request: UserActionRequest) -> UserActionResult:
        return UserActionResult(None)

    async def deliver_tts(self, delivery: TtsDelivery) -> str:
        return "spoken"

    def health(self) -> ConnectorHealth:
        return ConnectorHealth("up")

    async def probe(self) -> ConnectorHealth:
        self.journal.append(f"probe {self.name}")
        if self.config.hang_probe:
            await asyncio.sleep(10)
        if self.config.fail_probe:
            raise RuntimeError("probe bug")
        return self.health()


def bare_factory(config: dict[str, Any], context: ConnectorContext) -> Connector:
    """A factory that does not declare its manifest: validated after construction, before setup."""
    return Recording({}, context) if not config.get("bad") else Recording(config, context)


@pytest.fixture(autouse=True)
def _journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Recording, "journal", [])
    monkeypatch.setenv("ACME_TOKEN", STATIC_TOKEN)
    monkeypatch.setenv("ACME_SIGNING", SIGNING_SECRET_TEXT)
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)


@pytest.fixture
async def registry() -> AsyncIterator[ConnectorRegistry]:
    reg = ConnectorRegistry(default_context(), factories={"recording": Recording, "bare": bare_factory,
                                                         "webhook": WebhookConnector}, setup_timeout_s=0.2)
    yield reg
    await reg.aclose()


def _webhook(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"base_url": "https://vendor.example.com/api", "paths": {"send_notification": "/n"},
                              "auth": {"kind": "bearer", "token_ref": "env:ACME_TOKEN"},
                              "signing_secret_ref": "env:ACME_SIGNING"}
    config.update(overrides)
    return config


def test_the_installed_entry_point_finds_the_webhook_connector() -> None:
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert eps["webhook"] == "iim.connectors.webhook:WebhookConnector"
    factories, errors = discover_factories()
    assert factories["webhook"] is WebhookConnector
    assert "webhook" not in errors


async def test_a_registry_without_given_factories_loads_plugins_from_entry_points() -> None:
    reg = ConnectorRegistry(default_context())
    assert "webhook" in reg.plugins
    await reg.load([{"name": "acme", "plugin": "webhook", "config": _webhook()}])
    try:
        connector = reg.get("acme")
        assert isinstance(connector, WebhookConnector)
        assert connector.name == "acme"
        assert connector.manifest.capabilities == {Capability.SEND_NOTIFICATION}
        assert [name for name, _ in reg.ready(Capability.SEND_NOTIFICATION)] == ["acme"]
        assert reg.ready(Capability.DELIVER_TTS) == []
    finally:
        await reg.aclose()


async def test_a_plugin_that_fails_to_import_fails_only_its_connectors(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.entry_points
    broken = importlib.metadata.EntryPoint(name="broken", value="no_such_module_anywhere:factory",
                                           group=ENTRY_POINT_GROUP)

    def fake_entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        return [*real(group=group), broken]

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    reg = ConnectorRegistry(default_context())
    await reg.load([{"name": "b", "plugin": "broken"}, {"name": "w", "plugin": "webhook", "config": _webhook()}])
    try:
        assert "failed to import: ModuleNotFoundError" in (reg.error("b") or "")
        assert reg.error("w") is None
    finally:
        await reg.aclose()


async def test_bad_config_is_refused_with_a_clear_error_and_the_plugin_is_not_built(
        registry: ConnectorRegistry) -> None:
    await registry.load([
        {"name": "bad", "plugin": "webhook",
         "config": _webhook(base_url="http://user:hunter2@vendor.example.com", retry={"attempts": 0})},
        {"name": "typo", "plugin": "recording", "config": {"fail_stup": True}},
        {"name": "good", "plugin": "recording"},
    ])
    bad = registry.error("bad") or ""
    assert bad.startswith("invalid config: base_url: Value error, base_url must not carry credentials")
    assert "; retry.attempts: Input should be greater than or equal to 1" in bad
    assert "hunter2" not in bad
    assert registry.error("typo") == "invalid config: fail_stup: Extra inputs are not permitted"
    assert Recording.journal == ["setup good"]  # refused configs never reach a constructor or setup()
    with pytest.raises(ConnectorUnavailable, match="invalid config"):
        registry.get("bad")
    statuses = {s.name: s for s in registry.statuses()}
    assert statuses["bad"].health.state == "down"
    assert statuses["bad"].capabilities == ("deliver_tts", "request_user_action", "send_notification")
    assert statuses["good"].health.state == "degraded"  # loaded, not probed yet: never "up" unchecked


async def test_a_factory_without_a_manifest_is_validated_after_construction(registry: ConnectorRegistry) -> None:
    await registry.load([{"name": "x", "plugin": "bare", "config": {"bad": True}}])
    assert registry.error("x") == "invalid config: bad: Extra inputs are not permitted"


async def test_one_failing_setup_does_not_stop_the_others(registry: ConnectorRegistry) -> None:
    await registry.load([
        {"name": "first", "plugin": "recording"},
        {"name": "broken", "plugin": "recording", "config": {"fail_setup": True}},
        {"name": "nocreds", "plugin": "webhook",
         "config": _webhook(auth={"kind": "bearer", "token_ref": "env:NOT_SET_ANYWHERE"})},
        {"name": "hangs", "plugin": "recording", "config": {"hang_setup": True}},
        {"name": "ghost", "plugin": "nonexistent"},
        {"name": "last", "plugin": "recording"},
    ])
    assert registry.error("first") is None
    assert registry.error("last") is None
    assert registry.error("broken") == "setup failed: RuntimeError: vendor said no"
    assert registry.error("nocreds") == ("setup failed: ConnectorError: auth.token_ref: "
                                         "credential reference 'env:NOT_SET_ANYWHERE' does not resolve")
    assert registry.error("hangs") == "setup did not finish within 0.2 s"
    assert (registry.error("ghost") or "").startswith("no connector plugin 'nonexistent' (installed: bare, ")
    await registry.probe_all(timeout=1.0)
    health = {s.name: s.health for s in registry.statuses()}
    assert {n: h.state for n, h in health.items()} == {
        "first": "up", "broken": "down", "nocreds": "down", "hangs": "down", "ghost": "down", "last": "up"}
    assert health["broken"].last_error == "setup failed: RuntimeError: vendor said no"
    assert health["broken"].checked_at is not None
    assert [name for name, _ in registry.ready()] == ["first", "last"]


async def test_unload_pairs_with_setup_in_reverse_order_and_survives_a_failing_unload(
        registry: ConnectorRegistry) -> None:
    await registry.load([
        {"name": "a", "plugin": "recording"},
        {"name": "b", "plugin": "recording", "config": {"fail_setup": True}},
        {"name": "c", "plugin": "recording", "config": {"fail_unload": True}},
        {"name": "d", "plugin": "recording"},
    ])
    await registry.aclose()
    assert Recording.journal == ["setup a", "setup b", "setup c", "setup d", "unload d", "unload c", "unload a"]
    assert list(registry) == []
    await registry.load([{"name": "a", "plugin": "recording"}])  # loadable again after aclose
    with pytest.raises(RuntimeError, match="already loaded"):
        await registry.load([])


async def test_the_loaded_context_manager_unloads_on_exit(registry: ConnectorRegistry) -> None:
    async with registry.loaded([{"name": "a", "plugin": "recording"}]) as reg:
        assert reg.get("a").health().state == "up"
    assert Recording.journal == ["setup a", "unload a"]


@pytest.mark.parametrize(("configs", "complaint"), [
    ([{"name": "a", "plugin": "recording"}, {"name": "a", "plugin": "recording"}], "'a' is used more than once"),
    ([{"name": "a"}], "connectors[0]: plugin: Field required"),
    ([{"name": "Bad Name!", "plugin": "recording"}], "connectors[0]: name: String should match pattern"),
])
async def test_a_malformed_connector_list_is_refused_as_a_whole(registry: ConnectorRegistry,
                                                                configs: list[dict[str, Any]], complaint: str) -> None:
    with pytest.raises(ConnectorConfigError, match="connector configuration refused") as err:
        await registry.load(configs)
    assert complaint in str(err.value)
    assert Recording.journal == []


async def test_get_unknown_connector_is_a_key_error(registry: ConnectorRegistry) -> None:
    with pytest.raises(KeyError):
        registry.get("nobody")


async def test_health_listing_and_gauges(registry: ConnectorRegistry) -> None:
    await registry.load([
        {"name": "listed-ok", "plugin": "webhook", "config": _webhook()},
        {"name": "listed-bad", "plugin": "recording", "config": {"fail_setup": True}},
    ])
    app = web.Application()
    app.router.add_get("/v1/connectors", connector_list_view(registry))
    runner, url = await serve(app)
    try:
        async with aiohttp.ClientSession() as session, session.get(url + "/v1/connectors") as resp:
            assert resp.status == 200
            doc = await resp.json()
    finally:
        await runner.cleanup()
    ok, bad = doc["connectors"]
    assert ok["name"] == "listed-ok"
    assert ok["plugin"] == "webhook"
    assert ok["capabilities"] == ["send_notification"]
    # Nobody has used it and no probe has run: not "up" (up means checked).
    assert ok["health"] == {"state": "degraded", "last_error": "not checked yet", "checked_at": None}
    assert ok["breaker"] == "closed"
    assert bad["health"] == {"state": "down", "last_error": "setup failed: RuntimeError: vendor said no",
                             "checked_at": bad["health"]["checked_at"]}
    breaker = "iim_connector_breaker_state"
    assert REGISTRY.get_sample_value(breaker, {"connector": "listed-ok", "state": "closed"}) == 1.0
    assert REGISTRY.get_sample_value(breaker, {"connector": "listed-ok", "state": "open"}) == 0.0
    assert REGISTRY.get_sample_value(breaker, {"connector": "listed-bad", "state": "closed"}) is None
    assert REGISTRY.get_sample_value("iim_connector_up", {"connector": "listed-ok"}) is None  # renamed away


async def test_a_probe_that_hangs_past_its_deadline_or_raises_makes_the_connector_down(
        registry: ConnectorRegistry) -> None:
    await registry.load([{"name": "hangs", "plugin": "recording", "config": {"hang_probe": True}},
                         {"name": "buggy", "plugin": "recording", "config": {"fail_probe": True}},
                         {"name": "fine", "plugin": "recording"}])
    # The plugin says "up", but nothing has checked it yet.
    assert {s.name: s.health.state for s in registry.statuses()} == {
        "hangs": "degraded", "buggy": "degraded", "fine": "degraded"}
    await registry.probe_all(timeout=0.2)
    health = {s.name: s.health for s in registry.statuses()}
    assert (health["hangs"].state, health["hangs"].last_error) == ("down", "probe did not answer within 0.2 s")
    assert (health["buggy"].state, health["buggy"].last_error) == ("down", "probe failed: RuntimeError: probe bug")
    assert health["fine"].state == "up"
    assert sorted(line for line in Recording.journal if line.startswith("probe")) == [
        "probe buggy", "probe fine", "probe hangs"]


async def test_probes_run_on_their_interval_until_cancelled(registry: ConnectorRegistry) -> None:
    await registry.load([{"name": "fine", "plugin": "recording"}])
    task = asyncio.create_task(registry.run_probes(interval=0.05, timeout=1.0))
    try:
        for _ in range(200):
            if Recording.journal.count("probe fine") >= 3:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert Recording.journal.count("probe fine") >= 3
