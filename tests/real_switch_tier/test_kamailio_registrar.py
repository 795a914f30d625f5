"""Presence from registrations through the real Kamailio edge: usrloc writes them through to IIM's PostgreSQL
(``db_mode 1``, role ``iim_registrar``), the trigger tells the running ``iim serve``, and the household's presence
(the admin API's view, as ``explain-call`` words it) says "device registration" while the speaker is registered;
an un-REGISTER withdraws it; a restarted edge reloads the registration from the table and still reaches the
speaker."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
import pytest

from tests import sip_client, sipp
from tests.kamailio_edge import DOMAIN, KamailioEdge, running_edge, tcp_bridge_to, wait_until
from tests.pg import PgCluster, PgDatabase, run_sync
from tests.real_switch import RealSwitch, free_port
from tests.real_switch_tier.conftest import Iim, Ports, start_iim, stop_iim
from tests.real_switch_tier.kamailio_fixtures import SPEAKER, kamailio_db_url, provision_speakers

TOKEN = "registrar-presence-operator-token"
AOR = f"{SPEAKER.user}@{DOMAIN}"


@dataclass(frozen=True)
class Home:
    tenant: UUID
    household: UUID
    http_port: int


@pytest.fixture(scope="module")
def home(pg_cluster: PgCluster, pg_db: PgDatabase) -> Home:
    """The kitchen speaker, added with its sip_ha1 through IIM's registry (the edge's roles get their password)."""
    tenant = provision_speakers(pg_cluster, pg_db, SPEAKER)

    async def household() -> UUID:
        conn = await asyncpg.connect(pg_db.admin_url)
        try:
            found: UUID = await conn.fetchval("SELECT household_id FROM iim.device WHERE tenant_id = $1", tenant)
            return found
        finally:
            await conn.close()

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


def _presence(home: Home) -> dict[str, Any]:
    async def get() -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{home.http_port}/v1/tenants/{home.tenant}/households/{home.household}/presence",
                headers={"Authorization": f"Bearer {TOKEN}"}, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            assert resp.status == 200, await resp.text()
            found: dict[str, Any] = await resp.json()
            return found

    return run_sync(get())


def _registered_at_home(home: Home) -> bool:
    view = _presence(home)
    return view["presence"] == "home" and view["source"] == "registration" and view["subject"] == AOR


def _location_rows(pg_db: PgDatabase) -> list[tuple[str, str | None, str]]:
    async def rows() -> list[tuple[str, str | None, str]]:
        conn = await asyncpg.connect(pg_db.admin_url)
        try:
            return [(r[0], r[1], r[2]) for r in await conn.fetch(
                "SELECT username, domain, contact FROM kamailio.location ORDER BY id")]
        finally:
            await conn.close()

    return run_sync(rows())


def _register(edge: KamailioEdge, contact: str, expires: int = 300) -> int | None:
    """The edge's final answer to an authenticated REGISTER (``expires=0``: un-REGISTER) of ``contact``."""
    # (from 127.0.0.4: 127.0.0.1 is the test's trunk, which may not register)
    _, final = sip_client.Udp("127.0.0.4").register(("127.0.0.1", edge.sip_port), SPEAKER.user, SPEAKER.password,
                                                    DOMAIN, contact=contact, expires=expires)
    return None if final is None else final.code


def test_a_speaker_registered_through_the_edge_makes_its_household_home_until_it_unregisters(
        edge: KamailioEdge, iim: Iim, home: Home, pg_db: PgDatabase) -> None:
    assert _presence(home)["source"] == "registry"
    contact = f"sip:{SPEAKER.user}@127.0.0.4:{free_port()}"
    assert _register(edge, contact) == 200, edge.log_text()[-3000:]
    assert _location_rows(pg_db) == [(SPEAKER.user, DOMAIN, contact)]  # usrloc wrote it through
    assert wait_until(lambda: _registered_at_home(home), 15), (_presence(home), iim.log_text()[-3000:])
    view = _presence(home)
    assert view["explanation"].startswith(f"presence home (device registration {AOR};"), view
    (claim,) = view["claims"]
    assert (claim["actor"], claim["live"]) == ("kamailio:registration", True)

    assert _register(edge, contact, expires=0) == 200  # the speaker says goodbye: Expires: 0
    assert _location_rows(pg_db) == []
    assert wait_until(lambda: _presence(home)["source"] == "registry", 15), _presence(home)
    assert _presence(home)["claims"] == []


def test_a_restarted_edge_reloads_its_registrations_and_still_reaches_the_speaker(
        edge: KamailioEdge, iim: Iim, home: Home, pg_db: PgDatabase, real_switch: RealSwitch,
        tmp_path: Path) -> None:
    speaker_port = free_port()
    contact = f"sip:{SPEAKER.user}@127.0.0.1:{speaker_port}"
    assert _register(edge, contact) == 200
    assert wait_until(lambda: _registered_at_home(home), 15), _presence(home)

    edge.stop()
    assert _location_rows(pg_db) == [(SPEAKER.user, DOMAIN, contact)]  # the edge down: the row stays
    edge.start()
    assert AOR in edge.rpc("ul.dump"), edge.log_text()[-3000:]  # loaded from the table, nobody re-registered
    assert _registered_at_home(home)  # and IIM's presence never blinked
    with sipp.core(tmp_path, speaker_port, "core_answer.xml"):  # the speaker answers
        answered = real_switch.api(
            f"originate sofia/external/{SPEAKER.user}@127.0.0.1:{edge.sip_port} &park", timeout=15)
        assert answered.startswith("+OK"), (answered, edge.log_text()[-2000:])
        real_switch.api(f"uuid_kill {answered.split()[1]}")

    assert _register(edge, contact, expires=0) == 200
    assert wait_until(lambda: _presence(home)["source"] == "registry", 15), _presence(home)
