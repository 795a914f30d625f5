"""Live presence end to end, against a real PostgreSQL: each source writes its claim, the claim reaches the policy
cache by the change feed (LISTEN/NOTIFY), and the next call's decision and ``explain-call`` see it.

Sources: the operator's app (through the store, as the admin API does), registrations (the FreeSWITCH emulator's
``sofia::register`` / ``unregister`` events, read by the inbound ESL client: a person's phone from the household's
home network is home, from elsewhere away; the living-room speaker says nothing unless its presence_hint says so),
a connector's home/away (the vendor peer posting a signed report to the connector callback app).
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from fs_app.dialstring import DialSettings
from fs_app.inbound import InboundClient, InboundSettings
from fs_app.registrations import REGISTRATION_EVENTS, presence_listener
from fs_app.routing import CallFacts, decide
from fs_app.testing import FreeSwitchEmulator
from iim.connectors.contract import ConnectorContext, PresenceReport
from iim.connectors.http import CALLBACK_PREFIX, connector_callback_app
from iim.connectors.registry import ConnectorRegistry
from iim.connectors.webhook import WebhookConnector
from iim.core.secrets import resolve_secret
from iim.explain import explain, render
from policy_cache import presence_store, registry
from policy_cache.audit import flush_pending
from policy_cache.bootstrap import Demo, load_demo
from policy_cache.cache import PolicyCache
from policy_cache.db import Connection, DbRole, Pool, connect_pool, tenant_tx
from policy_cache.models import DeviceUpdate, HouseholdUpdate, PolicyUpdate, PresenceState
from policy_cache.presence_feed import PresenceFeed, ReportOutcome
from policy_cache.snapshot import RoutingSnapshot
from policy_cache.store import PgPolicyStore
from tests.conftest import eventually
from tests.connector_peer import SIGNING_SECRET_TEXT, STATIC_TOKEN, StepClock, VendorPeer, serve
from tests.pg import PgDatabase

OWNER = "+79001234567"
SPEAKER = "speaker-1@iim.local"
OWNER_AOR = f"{OWNER}@iim.local"  # the demo owner's own sip_aor: their phone


@pytest.fixture
async def demo(app_pool: Pool, admin_conn: Connection) -> Demo:
    """The demo home, nobody home by the registry, home devices ring only when someone is home; no claims, no home
    networks, the speaker's presence_hint by type."""
    async with app_pool.acquire() as conn:
        demo = await load_demo(conn)
    await admin_conn.execute("DELETE FROM iim.presence_claim")
    async with tenant_tx(app_pool, demo.tenant_id) as tx:
        await registry.update(tx, registry.HOUSEHOLD, demo.household_id,
                              HouseholdUpdate(presence=PresenceState.AWAY, home_networks=[]), actor="test")
        await registry.update(tx, registry.DEVICE, demo.sip_speaker_id, DeviceUpdate(presence_hint=None),
                              actor="test")
        await registry.update(tx, registry.POLICY, demo.policy_id, PolicyUpdate(home_only_when_present=True),
                              actor="test")
    return demo


@pytest.fixture
async def cache(pg_db: PgDatabase, demo: Demo) -> AsyncIterator[PolicyCache]:
    store = PgPolicyStore(pg_db.cache_url)
    c = PolicyCache(store, resync_interval=30.0)  # changes must come by NOTIFY, not by the periodic resync
    await c.start(timeout=10)
    yield c
    await c.aclose()
    await store.aclose()


@pytest.fixture
async def feed(pg_db: PgDatabase, app_pool: Pool) -> AsyncIterator[PresenceFeed]:
    directory = await connect_pool(pg_db.cache_url, role=DbRole.CACHE, min_size=1, max_size=2)
    async with PresenceFeed(app_pool, directory, deadline_s=5.0) as f:
        yield f
    await directory.close()


def _snapshot(cache: PolicyCache) -> RoutingSnapshot:
    snap = cache.lookup(OWNER)
    assert snap is not None
    return snap


def _rings_home(snap: RoutingSnapshot, at: datetime | None = None) -> bool:
    decision = decide(snap, CallFacts(OWNER, None), at or datetime.now(UTC))
    return any(leg.kind == "speaker" for leg in decision.legs)


async def _audit(admin_conn: Connection, app_pool: Pool, demo: Demo, actor: str
                 ) -> list[tuple[str, str, dict[str, Any]]]:
    await flush_pending(app_pool)
    rows = await admin_conn.fetch(
        "SELECT actor, action, detail FROM iim.audit_log WHERE tenant_id = $1 AND action LIKE 'household.presence_%' "
        "AND actor = $2 ORDER BY id", demo.tenant_id, actor)
    return [(r["actor"], r["action"], r["detail"]) for r in rows]


async def test_an_app_claim_reaches_the_next_call_and_its_expiry_returns_the_registry_presence(
        cache: PolicyCache, app_pool: Pool, demo: Demo, admin_conn: Connection) -> None:
    assert not _rings_home(_snapshot(cache))
    async with tenant_tx(app_pool, demo.tenant_id) as tx:
        written = await presence_store.put_claim(tx, demo.household_id, source="app", subject="anna", state="home",
                                                 ttl_s=600, actor="app@operator", chain_tenant=demo.tenant_id)
    assert written.changed
    await eventually(lambda: bool(_snapshot(cache).presence_claims), timeout=5)
    snap = _snapshot(cache)
    assert _rings_home(snap)
    assert not _rings_home(snap, datetime.now(UTC) + timedelta(seconds=601))  # expired: the registry's away
    _, report = explain(snap, OWNER, None, None, DialSettings())
    assert report["presence"]["state"] == "home"  # type: ignore[index]
    assert report["presence"]["source"] == "app"  # type: ignore[index]
    assert "Presence: presence home (operator app anna" in render(report, as_json=False)
    later = (datetime.now(UTC) + timedelta(seconds=700)).isoformat()
    _, report = explain(snap, OWNER, None, later, DialSettings())
    assert report["presence"]["source"] == "registry"  # type: ignore[index]
    # The same word again is a refresh, not a change: one audit line, with the actor.
    async with tenant_tx(app_pool, demo.tenant_id) as tx:
        again = await presence_store.put_claim(tx, demo.household_id, source="app", subject="anna", state="home",
                                               ttl_s=600, actor="app@operator", chain_tenant=demo.tenant_id)
    assert not again.changed
    audit = await _audit(admin_conn, app_pool, demo, "app@operator")
    assert [(actor, action, detail["state"], detail["previous"]) for actor, action, detail in audit] == [
        ("app@operator", "household.presence_claim", "home", None)]


@dataclass
class Registrations:
    emu: FreeSwitchEmulator
    heard: list[str]  # the AoRs handed to the feed so far

    async def settled(self, feed: PresenceFeed, count: int) -> None:
        """Until ``count`` registration words reached the feed and it wrote them (a word of no claim included)."""
        await eventually(lambda: len(self.heard) >= count, timeout=5)
        await feed.wait_idle()


@pytest.fixture
async def emulated_registrations(feed: PresenceFeed) -> AsyncIterator[Registrations]:
    """The emulator's registrations, read by the inbound ESL client into the feed (as ``iim serve`` wires it)."""
    emu = FreeSwitchEmulator(time_scale=0.01, write_recordings=False)
    server = await emu.start_inbound()
    client = InboundClient(InboundSettings(host="127.0.0.1", port=server.port, command_timeout=2.0,
                                           events=REGISTRATION_EVENTS))
    heard: list[str] = []

    def sink(aor: str, online: bool, expires_s: float | None, sources: tuple[str, ...]) -> None:
        feed.registration(aor, online, expires_s, sources)
        heard.append(aor)

    client.add_listener(presence_listener(sink))
    try:
        await client.start()
        await client.wait_connected(2)
        yield Registrations(emu, heard)
    finally:
        await client.aclose()
        await server.close()
        await emu.close()


async def _home_networks(app_pool: Pool, demo: Demo, networks: list[str]) -> None:
    async with tenant_tx(app_pool, demo.tenant_id) as tx:
        await registry.update(tx, registry.HOUSEHOLD, demo.household_id, HouseholdUpdate(home_networks=networks),
                              actor="test")


async def test_the_owners_phone_registered_from_the_home_network_says_home_and_from_elsewhere_away(
        cache: PolicyCache, feed: PresenceFeed, demo: Demo, admin_conn: Connection, app_pool: Pool,
        emulated_registrations: Registrations) -> None:
    emu = emulated_registrations.emu
    await _home_networks(app_pool, demo, ["192.0.2.0/24"])
    emu.register_user(OWNER, "iim.local", expires=120, network_ip="192.0.2.14")  # the home Wi-Fi
    await eventually(lambda: bool(_snapshot(cache).presence_claims), timeout=5)
    (claim,) = _snapshot(cache).presence_claims
    assert (claim.source, claim.subject, claim.state) == ("registration", OWNER_AOR, "home")
    assert 120 <= claim.expires_at - claim.observed_at <= 160  # its Expires and a little grace
    assert _rings_home(_snapshot(cache))
    _, report = explain(_snapshot(cache), OWNER, None, None, DialSettings())
    assert report["presence"]["explanation"].startswith(  # type: ignore[index]
        f"presence home (device registration {OWNER_AOR} from home network 192.0.2.0/24;")
    emu.register_user(OWNER, "iim.local", expires=120, network_ip="192.0.2.14")  # a refresh: no new write, no audit
    emu.register_user(OWNER, "iim.local", expires=120, network_ip="198.51.100.7")  # out, on the mobile network
    await eventually(lambda: _snapshot(cache).presence_claims[0].state == "away", timeout=5)
    assert not _rings_home(_snapshot(cache))
    _, report = explain(_snapshot(cache), OWNER, None, None, DialSettings())
    assert f"device registration {OWNER_AOR} from 198.51.100.7, outside the home networks" in render(
        report, as_json=False)
    emu.unregister_user(OWNER, "iim.local")
    await eventually(lambda: not _snapshot(cache).presence_claims, timeout=5)
    emu.register_user("stranger", "elsewhere.example", expires=120)  # nobody's device: ignored
    await emulated_registrations.settled(feed, 5)
    audit = await _audit(admin_conn, app_pool, demo, "freeswitch:registration")
    assert [(action, detail["state"], detail.get("basis")) for _, action, detail in audit] == [
        ("household.presence_claim", "home", "from home network 192.0.2.0/24"),
        ("household.presence_claim", "away", "from 198.51.100.7, outside the home networks"),
        ("household.presence_release", "away", None)]


async def test_the_living_room_speaker_says_nothing_unless_its_presence_hint_says_so(
        cache: PolicyCache, feed: PresenceFeed, demo: Demo, admin_conn: Connection, app_pool: Pool,
        emulated_registrations: Registrations) -> None:
    emu = emulated_registrations.emu
    await _home_networks(app_pool, demo, ["127.0.0.0/8"])
    emu.register_user("speaker-1", "iim.local", expires=120)  # from 127.0.0.1: inside, but a fixed device
    await emulated_registrations.settled(feed, 1)
    assert await admin_conn.fetchval("SELECT count(*) FROM iim.presence_claim") == 0
    assert not _rings_home(_snapshot(cache))  # the registry's away stands
    async with tenant_tx(app_pool, demo.tenant_id) as tx:
        await registry.update(tx, registry.DEVICE, demo.sip_speaker_id, DeviceUpdate(presence_hint=True),
                              actor="test")
    emu.register_user("speaker-1", "iim.local", expires=120)
    await eventually(lambda: bool(_snapshot(cache).presence_claims), timeout=5)
    assert _snapshot(cache).presence_claims[0].subject == SPEAKER
    assert _rings_home(_snapshot(cache))


async def test_without_home_networks_the_owners_phone_says_nothing(
        feed: PresenceFeed, demo: Demo, admin_conn: Connection, emulated_registrations: Registrations) -> None:
    emulated_registrations.emu.register_user(OWNER, "iim.local", expires=120, network_ip="192.0.2.14")
    await emulated_registrations.settled(feed, 1)
    assert await admin_conn.fetchval("SELECT count(*) FROM iim.presence_claim") == 0  # reachable is not located


@pytest.fixture
async def vendor() -> AsyncIterator[VendorPeer]:
    peer = VendorPeer()
    runner, peer.url = await serve(peer.app())
    yield peer
    await peer.close()
    await runner.cleanup()


@pytest.fixture
async def presence_callbacks(vendor: VendorPeer, feed: PresenceFeed, monkeypatch: pytest.MonkeyPatch
                             ) -> AsyncIterator[str]:
    """IIM's public side: connector ``webhook`` (the demo's devices name it) taking presence reports."""
    monkeypatch.setenv("ACME_TOKEN", STATIC_TOKEN)
    monkeypatch.setenv("ACME_SIGNING", SIGNING_SECRET_TEXT)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    context = ConnectorContext(resolve_secret=resolve_secret, http_session=aiohttp.ClientSession, clock=StepClock(),
                               callback_base_url=url)
    connectors = ConnectorRegistry(context, factories={"webhook": WebhookConnector})
    await connectors.load([{"name": "webhook", "plugin": "webhook", "config": {
        "base_url": vendor.url, "paths": {"send_notification": "/notify"},
        "auth": {"kind": "bearer", "token_ref": "env:ACME_TOKEN"}, "signing_secret_ref": "env:ACME_SIGNING",
        "accept_presence": True}}])

    async def sink(name: str, report: PresenceReport) -> bool:
        outcome = await feed.connector_report(name, report.target, report.state, report.ttl_s, report.subject)
        return outcome is ReportOutcome.APPLIED

    root = web.Application()
    root.add_subapp(CALLBACK_PREFIX, connector_callback_app(connectors, presence=sink))
    runner = web.AppRunner(root, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    yield f"{url}{CALLBACK_PREFIX}/webhook/presence"
    await connectors.aclose()
    await runner.cleanup()


async def test_a_vendors_home_and_away_reach_the_household_of_its_device(
        cache: PolicyCache, vendor: VendorPeer, presence_callbacks: str, demo: Demo, admin_conn: Connection,
        app_pool: Pool) -> None:
    status, _ = await vendor.post_callback(presence_callbacks, {"target": "kitchen-speaker-1", "state": "home",
                                                                "ttl_s": 900})
    assert status == 204
    await eventually(lambda: bool(_snapshot(cache).presence_claims), timeout=5)
    (claim,) = _snapshot(cache).presence_claims
    assert (claim.source, claim.subject, claim.state) == ("connector", "webhook:kitchen-speaker-1", "home")
    assert _rings_home(_snapshot(cache))
    status, _ = await vendor.post_callback(presence_callbacks, {"target": "kitchen-speaker-1", "state": "away",
                                                                "ttl_s": 900})
    assert status == 204
    await eventually(lambda: _snapshot(cache).presence_claims[0].state == "away", timeout=5)
    assert not _rings_home(_snapshot(cache))
    audit = await _audit(admin_conn, app_pool, demo, "connector:webhook")
    assert [(actor, detail["state"], detail["previous"]) for actor, _, detail in audit] == [
        ("connector:webhook", "home", None), ("connector:webhook", "away", "home")]


@pytest.mark.parametrize(("doc", "secret", "status", "error_id"), [
    ({"target": "no-such-device", "state": "home", "ttl_s": 900}, None, 404, "no-such-target"),
    ({"target": "kitchen-speaker-1", "state": "maybe", "ttl_s": 900}, None, 422, "bad-body"),
    ({"target": "kitchen-speaker-1", "state": "home", "ttl_s": 10**9}, None, 422, "bad-body"),
    ({"target": "kitchen-speaker-1", "state": "home", "ttl_s": 900}, b"not-the-vendors-secret-0123456789",
     401, "bad-signature"),
])
async def test_a_report_that_names_no_household_or_is_not_the_vendors_is_refused(
        vendor: VendorPeer, presence_callbacks: str, demo: Demo, admin_conn: Connection, doc: dict[str, Any],
        secret: bytes | None, status: int, error_id: str) -> None:
    kwargs: dict[str, Any] = {} if secret is None else {"secret": secret}
    got, problem = await vendor.post_callback(presence_callbacks, doc, **kwargs)
    assert (got, problem["error_id"]) == (status, error_id)
    assert await admin_conn.fetchval("SELECT count(*) FROM iim.presence_claim") == 0
