"""Presence from registrations through the real Kamailio edge: usrloc writes them through to IIM's PostgreSQL
(``db_mode 1``, role ``iim_registrar``), the trigger tells the running ``iim serve``, and the household's presence
(the admin API's view, as ``explain-call`` words it) follows who registered from where: a member's phone from the
household's home network (127.0.0.0/8: the test's REGISTERs come from 127.0.0.4) says "device registration ... from
home network 127.0.0.0/8"; with the home network listed elsewhere it says away; an un-REGISTER withdraws it. The
kitchen speaker, registered all day, says nothing. A restarted edge reloads the registrations from the table and
still reaches the speaker.

Anna's phone: the edge authenticates registry devices only, so her AoR's SIP credentials are a device row of the
household (a fixed type, no presence_hint: by itself it would say nothing); what makes it speak for presence is
that it is her own ``sip_aor`` as a member of the household."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
import pytest

from policy_cache import registry
from policy_cache.db import DbRole, connect_pool, tenant_tx
from policy_cache.models import (
    BindingCreate,
    BindingRole,
    DeviceCapability,
    DeviceCreate,
    DeviceType,
    SubscriberCreate,
)
from tests import sip_client, sipp
from tests.kamailio_edge import DOMAIN, KamailioEdge, ha1, running_edge, tcp_bridge_to, wait_until
from tests.pg import PgCluster, PgDatabase, run_sync
from tests.real_switch import RealSwitch, free_port
from tests.real_switch_tier.conftest import Iim, Ports, start_iim, stop_iim
from tests.real_switch_tier.kamailio_fixtures import SPEAKER, Speaker, kamailio_db_url, provision_speakers

TOKEN = "registrar-presence-operator-token"
AOR = f"{SPEAKER.user}@{DOMAIN}"
ANNA = Speaker("anna", "Anna-Phone-Secret-3")
ANNA_AOR = f"{ANNA.user}@{DOMAIN}"


@dataclass(frozen=True)
class Home:
    tenant: UUID
    household: UUID
    http_port: int


@pytest.fixture(scope="module")
def home(pg_cluster: PgCluster, pg_db: PgDatabase) -> Home:
    """The kitchen speaker, added with its sip_ha1 through IIM's registry (the edge's roles get their password), and
    Anna, a member whose own sip_aor is ``ANNA_AOR`` (its credentials: a device row, see the module)."""
    tenant = provision_speakers(pg_cluster, pg_db, SPEAKER)

    async def household() -> UUID:
        pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=1)
        try:
            async with tenant_tx(pool, tenant) as conn:
                found: UUID = await conn.fetchval("SELECT household_id FROM iim.device")
                anna = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(
                    msisdn="+79005550123", sip_aor=f"sip:{ANNA_AOR}", display_name="Anna"), actor="test")
                await registry.create(conn, registry.BINDING, BindingCreate(
                    subscriber_id=anna.id, household_id=found, role=BindingRole.MEMBER), actor="test")
                await registry.create(conn, registry.DEVICE, DeviceCreate(
                    household_id=found, name="Anna's softphone", type=DeviceType.SPEAKER,
                    capabilities=frozenset({DeviceCapability.SIP}), sip_uri=f"sip:{ANNA_AOR}",
                    sip_ha1=ha1(ANNA.user, DOMAIN, ANNA.password)), actor="test")
            return found
        finally:
            await pool.close()

    return Home(tenant, run_sync(household()), free_port())


@pytest.fixture(scope="module")
def edge(real_switch: RealSwitch, pg_cluster: PgCluster, pg_db: PgDatabase, home: Home,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[KamailioEdge]:
    with tcp_bridge_to(pg_db.admin_url) as bridge, running_edge(
            tmp_path_factory.mktemp("kamailio"), [real_switch.external_sip_port],
            kamailio_db_url(pg_cluster, pg_db, bridge.port)) as running:
        yield running


@pytest.fixture(scope="module")
def iim(real_switch: RealSwitch, pg_db: PgDatabase, ports: Ports, home: Home, edge: KamailioEdge,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Iim]:
    """``iim serve`` with its defaults (presence from the edge's registrations is on) and an operator token."""
    tokens = {hashlib.sha256(TOKEN.encode()).hexdigest(): {"actor": "noc", "role": "operator",
                                                           "tenant": str(home.tenant)}}
    served = start_iim(real_switch, pg_db, ports.iim_primary, tmp_path_factory.mktemp("iim"), env={
        "IIM_HTTP_PORT": str(home.http_port), "IIM_ADMIN_TOKENS_REF": "env:IIM_TEST_ADMIN_TOKENS",
        "IIM_TEST_ADMIN_TOKENS": json.dumps(tokens)})
    yield served
    stop_iim(served)


def _api(home: Home, method: str, path: str, body: Any = None) -> Any:
    async def call() -> Any:
        async with aiohttp.ClientSession() as http, http.request(
                method, f"http://127.0.0.1:{home.http_port}/v1/tenants/{home.tenant}{path}", json=body,
                headers={"Authorization": f"Bearer {TOKEN}"}, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    return run_sync(call())


def _presence(home: Home) -> dict[str, Any]:
    found: dict[str, Any] = _api(home, "GET", f"/households/{home.household}/presence")
    return found


def _home_networks(home: Home, networks: list[str]) -> None:
    """The operator lists the household's home networks (``PATCH /v1/tenants/T/households/H``)."""
    assert _api(home, "PATCH", f"/households/{home.household}", {"home_networks": networks})[
        "home_networks"] == networks


def _silent_words(home: Home) -> float:
    """Registrations IIM judged to say nothing (``iim_presence_words_total{outcome="silent"}``)."""
    async def get() -> str:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{home.http_port}/metrics") as resp:
            return await resp.text()

    match = re.search(r'^iim_presence_words_total\{outcome="silent",source="registration"\} (\S+)$',
                      run_sync(get()), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _anna_is(home: Home, state: str) -> bool:
    view = _presence(home)
    return view["presence"] == state and view["source"] == "registration" and view["subject"] == ANNA_AOR


def _location_rows(pg_db: PgDatabase) -> list[tuple[str, str | None, str]]:
    async def rows() -> list[tuple[str, str | None, str]]:
        conn = await asyncpg.connect(pg_db.admin_url)
        try:
            return [(r[0], r[1], r[2]) for r in await conn.fetch(
                "SELECT username, domain, contact FROM kamailio.location ORDER BY id")]
        finally:
            await conn.close()

    return run_sync(rows())


def _register(edge: KamailioEdge, contact: str, expires: int = 300, who: Speaker = SPEAKER) -> int | None:
    """The edge's final answer to an authenticated REGISTER (``expires=0``: un-REGISTER) of ``contact``."""
    # (from 127.0.0.4: 127.0.0.1 is the test's trunk, which may not register)
    _, final = sip_client.Udp("127.0.0.4").register(("127.0.0.1", edge.sip_port), who.user, who.password,
                                                    DOMAIN, contact=contact, expires=expires)
    return None if final is None else final.code


def test_the_kitchen_speaker_registered_through_the_edge_says_nothing_about_who_is_home(
        edge: KamailioEdge, iim: Iim, home: Home, pg_db: PgDatabase) -> None:
    _home_networks(home, ["127.0.0.0/8"])
    silent = _silent_words(home)
    contact = f"sip:{SPEAKER.user}@127.0.0.4:{free_port()}"
    assert _register(edge, contact) == 200, edge.log_text()[-3000:]
    assert _location_rows(pg_db) == [(SPEAKER.user, DOMAIN, contact)]  # usrloc wrote it through
    assert wait_until(lambda: _silent_words(home) > silent, 15), iim.log_text()[-3000:]  # heard, judged: no claim
    view = _presence(home)
    assert (view["source"], view["claims"]) == ("registry", []), view
    assert _register(edge, contact, expires=0) == 200
    assert _location_rows(pg_db) == []


def test_a_members_phone_through_the_edge_is_home_from_the_home_network_and_away_from_elsewhere(
        edge: KamailioEdge, iim: Iim, home: Home, pg_db: PgDatabase) -> None:
    _home_networks(home, ["127.0.0.0/8"])
    assert _presence(home)["source"] == "registry"
    contact = f"sip:{ANNA.user}@127.0.0.4:{free_port()}"
    assert _register(edge, contact, who=ANNA) == 200, edge.log_text()[-3000:]
    assert wait_until(lambda: _anna_is(home, "home"), 15), (_presence(home), iim.log_text()[-3000:])
    view = _presence(home)
    assert view["explanation"].startswith(
        f"presence home (device registration {ANNA_AOR} from home network 127.0.0.0/8;"), view
    (claim,) = view["claims"]
    assert (claim["actor"], claim["live"], claim["basis"]) == (
        "kamailio:registration", True, "from home network 127.0.0.0/8")

    _home_networks(home, ["192.0.2.0/24"])  # her home is elsewhere: 127.0.0.4 is not it
    assert _register(edge, contact, who=ANNA) == 200  # her phone's next refresh
    assert wait_until(lambda: _anna_is(home, "away"), 15), _presence(home)
    assert _presence(home)["explanation"].startswith(
        f"presence away (device registration {ANNA_AOR} from 127.0.0.4, outside the home networks;")

    assert _register(edge, contact, expires=0, who=ANNA) == 200  # Expires: 0
    assert _location_rows(pg_db) == []
    assert wait_until(lambda: _presence(home)["source"] == "registry", 15), _presence(home)
    assert _presence(home)["claims"] == []


def test_a_phone_behind_a_nat_is_placed_by_the_address_it_registered_from_not_its_private_contact(
        edge: KamailioEdge, iim: Iim, home: Home, pg_db: PgDatabase) -> None:
    _home_networks(home, ["127.0.0.0/8"])
    contact = f"sip:{ANNA.user}@10.20.30.40:5060"  # her phone's own (private) address; it comes from 127.0.0.4
    assert _register(edge, contact, who=ANNA) == 200, edge.log_text()[-3000:]
    assert wait_until(lambda: _anna_is(home, "home"), 15), (_presence(home), iim.log_text()[-3000:])
    assert _presence(home)["claims"][0]["basis"] == "from home network 127.0.0.0/8"
    assert "127.0.0.4" in edge.rpc("ul.dump")  # the edge reaches her there too (location's received)
    assert _register(edge, contact, expires=0, who=ANNA) == 200
    assert wait_until(lambda: _presence(home)["source"] == "registry", 15), _presence(home)


def test_a_restarted_edge_reloads_its_registrations_and_still_reaches_the_speaker(
        edge: KamailioEdge, iim: Iim, home: Home, pg_db: PgDatabase, real_switch: RealSwitch,
        tmp_path: Path) -> None:
    _home_networks(home, ["127.0.0.0/8"])
    speaker_port = free_port()
    contact = f"sip:{SPEAKER.user}@127.0.0.1:{speaker_port}"
    phone = f"sip:{ANNA.user}@127.0.0.4:{free_port()}"
    assert _register(edge, contact) == 200
    assert _register(edge, phone, who=ANNA) == 200
    assert wait_until(lambda: _anna_is(home, "home"), 15), _presence(home)

    edge.stop()
    assert sorted(_location_rows(pg_db)) == sorted([(SPEAKER.user, DOMAIN, contact), (ANNA.user, DOMAIN, phone)])
    edge.start()  # the edge down: the rows stay
    assert AOR in edge.rpc("ul.dump"), edge.log_text()[-3000:]  # loaded from the table, nobody re-registered
    assert _anna_is(home, "home")  # and IIM's presence never blinked
    with sipp.core(tmp_path, speaker_port, "core_answer.xml"):  # the speaker answers
        answered = real_switch.api(
            f"originate sofia/external/{SPEAKER.user}@127.0.0.1:{edge.sip_port} &park", timeout=15)
        assert answered.startswith("+OK"), (answered, edge.log_text()[-2000:])
        real_switch.api(f"uuid_kill {answered.split()[1]}")

    assert _register(edge, contact, expires=0) == 200
    assert _register(edge, phone, expires=0, who=ANNA) == 200
    assert wait_until(lambda: _presence(home)["source"] == "registry", 15), _presence(home)
