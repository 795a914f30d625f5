"""A WebRTC speaker for real: added through IIM's API while everything runs, it registers over WSS on the Kamailio
edge (credentials straight from the registry: no XML, no reloadxml), is rung by the call IIM forks for its
household (caller -> FreeSWITCH -> IIM -> the edge's location -> the WebSocket), answers with DTLS-SRTP media,
and IIM records that this speaker took the call.

Before: IIM rang speakers as ``user/AOR`` in the switch's own directory, where an edge-registered speaker does not
exist, and offered plain RTP, which a browser cannot take; the edge lost the WebSocket speaker's Contact (a
``*.invalid`` host) for the ACK and the BYE; nothing recorded which leg answered."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID, uuid4

import aiohttp
import pytest

from policy_cache import registry
from policy_cache.db import DbRole, connect_pool, tenant_tx
from policy_cache.models import (
    BindingCreate,
    BindingRole,
    ConsentCreate,
    ConsentPurpose,
    FallbackAction,
    HouseholdCreate,
    PolicyCreate,
    PresenceState,
    RingMode,
    SubscriberCreate,
    TenantCreate,
)
from tests import sipp
from tests.kamailio_edge import DOMAIN, KamailioEdge, ha1, running_edge, tcp_bridge_to
from tests.pg import PgCluster, PgDatabase, run_sync
from tests.real_switch import RealSwitch, free_port
from tests.real_switch_tier.conftest import Iim, Ports, start_iim, stop_iim
from tests.real_switch_tier.kamailio_fixtures import grant_edge_login, kamailio_db_url
from tests.webrtc_speaker import WebRtcSpeaker, require_aiortc

SUBSCRIBER = "79101110077"  # home_only: the household's speakers ring, the mobile does not
USER, PASSWORD = "browser", "Browser-Secret-7"
TOKEN = "webrtc-operator-token"


@dataclass(frozen=True)
class Home:
    tenant: UUID
    household: UUID
    http_port: int


@pytest.fixture(scope="module")
def home(pg_db: PgDatabase) -> Home:
    """A household whose calls ring its speakers only; it has no speaker yet (the test adds one by the API)."""
    async def create() -> Home:
        pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=1)
        tenant = uuid4()
        try:
            async with tenant_tx(pool, tenant) as tx:
                kw = {"actor": "test"}
                await registry.create(tx, registry.TENANT, TenantCreate(name="webrtc home"), **kw)
                flat = await registry.create(tx, registry.HOUSEHOLD, HouseholdCreate(
                    name="Flat", time_zone="Europe/Moscow", presence=PresenceState.HOME), **kw)
                owner = await registry.create(tx, registry.SUBSCRIBER, SubscriberCreate(msisdn=f"+{SUBSCRIBER}"),
                                              **kw)
                await registry.create(tx, registry.BINDING, BindingCreate(
                    subscriber_id=owner.id, household_id=flat.id, role=BindingRole.OWNER, priority=0), **kw)
                await registry.create(tx, registry.CONSENT, ConsentCreate(
                    subscriber_id=owner.id, purpose=ConsentPurpose.ANNOUNCE_CALLS, evidence={"channel": "test"}),
                    **kw)
                await registry.create(tx, registry.POLICY, PolicyCreate(
                    household_id=flat.id, ring_mode=RingMode.HOME_ONLY, home_timeout_s=20,
                    fallback=FallbackAction.NONE), **kw)
            return Home(tenant, flat.id, free_port())
        finally:
            await pool.close()

    return run_sync(create())


@pytest.fixture(scope="module")
def edge(real_switch: RealSwitch, pg_cluster: PgCluster, pg_db: PgDatabase,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[KamailioEdge]:
    grant_edge_login(pg_cluster, pg_db)
    with tcp_bridge_to(pg_db.admin_url) as bridge, running_edge(
            tmp_path_factory.mktemp("kamailio"), [real_switch.external_sip_port],
            kamailio_db_url(pg_cluster, pg_db, bridge.port)) as running:
        yield running


@pytest.fixture(scope="module")
def iim(real_switch: RealSwitch, pg_db: PgDatabase, ports: Ports, home: Home, edge: KamailioEdge,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Iim]:
    """IIM rings speakers through the edge and takes registry changes from an operator of the home's tenant."""
    tokens = {hashlib.sha256(TOKEN.encode()).hexdigest(): {"actor": "noc", "role": "operator",
                                                           "tenant": str(home.tenant)}}
    served = start_iim(real_switch, pg_db, ports.iim_primary, tmp_path_factory.mktemp("iim"), env={
        "IIM_SPEAKER_ENDPOINT": f"sofia/external/{{aor}};fs_path=sip:127.0.0.1:{edge.sip_port}",
        "IIM_HTTP_PORT": str(home.http_port), "IIM_ADMIN_TOKENS_REF": "env:IIM_TEST_ADMIN_TOKENS",
        "IIM_TEST_ADMIN_TOKENS": json.dumps(tokens)})
    yield served
    stop_iim(served)


async def _add_speaker_by_api(home: Home) -> str:
    body = {"household_id": str(home.household), "name": "Browser speaker", "type": "speaker",
            "capabilities": ["webrtc"], "sip_uri": f"sip:{USER}@{DOMAIN}", "sip_ha1": ha1(USER, DOMAIN, PASSWORD)}
    async with aiohttp.ClientSession() as http, http.post(
            f"http://127.0.0.1:{home.http_port}/v1/tenants/{home.tenant}/devices", json=body,
            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        created = await resp.json()
        assert resp.status == 201, created
    assert "sip_ha1" not in created  # never shown back
    return str(created["id"])


async def _answered_rows(pg_db: PgDatabase, tenant: UUID) -> list[dict[str, object]]:
    import asyncpg

    conn = await asyncpg.connect(pg_db.admin_url)
    try:
        rows = await conn.fetch("SELECT detail FROM iim.audit_log WHERE tenant_id = $1 AND action = 'call.answered'",
                                tenant)
    finally:
        await conn.close()
    return [json.loads(row["detail"]) if isinstance(row["detail"], str) else dict(row["detail"]) for row in rows]


async def test_a_webrtc_speaker_added_by_the_api_takes_its_households_call_with_dtls_srtp_media(
        real_switch: RealSwitch, edge: KamailioEdge, iim: Iim, home: Home, pg_db: PgDatabase,
        tmp_path: Path) -> None:
    require_aiortc()
    device_id = await _add_speaker_by_api(home)
    speaker = WebRtcSpeaker("127.0.0.1", edge.wss_port, USER, PASSWORD, DOMAIN)
    async with speaker.connected():
        answers = await speaker.register()
        assert [a.code for a in answers] == [401, 200], (answers, edge.log_text()[-3000:])

        # The caller echoes the media it gets: the speaker's tone comes back only if it crossed the switch both ways.
        caller = asyncio.create_task(asyncio.to_thread(
            sipp.call, tmp_path, real_switch.external_sip_port, SUBSCRIBER, hold_ms=8000, rtp_echo=True,
            timeout_s=30))
        try:
            call = await speaker.answer_call(timeout=15)
            # Proof of a WebRTC offer: ICE, a DTLS fingerprint, secure AVPF.
            audio = next(line for line in call.offer.splitlines() if line.startswith("m=audio "))
            assert audio.split()[2].endswith("SAVPF"), call.offer  # RTP/SAVPF (FreeSWITCH's) or UDP/TLS/RTP/SAVPF
            assert "a=fingerprint:sha-256 " in call.offer, call.offer
            assert "a=ice-ufrag:" in call.offer, call.offer
            try:
                await asyncio.wait_for(call.media.heard.wait(), 15)
            except TimeoutError:
                media_lines = [line for line in real_switch.log_text().splitlines()
                               if any(k in line for k in ("RTP", "rtp", "DTLS", "ICE", "SRTP", "codec", "Codec"))]
                pytest.fail(f"no sound came back: {call.describe()}\n" + "\n".join(media_lines[-60:]))
            stats = await call.stats()
            await speaker.answer_bye(timeout=20)
        finally:
            result = await caller
    assert result.finals == [200], result.output + real_switch.log_text()[-3000:]
    assert stats["inbound-rtp"].packetsReceived > 0, stats
    assert stats["outbound-rtp"].packetsSent > 0, stats
    assert call.media.loud_frames >= 10  # decrypted, decoded and carrying the tone that went out

    rows: list[dict[str, object]] = []
    for _ in range(50):
        rows = await _answered_rows(pg_db, home.tenant)
        if rows:
            break
        await asyncio.sleep(0.2)
    assert [(r["leg"], r["device_id"]) for r in rows] == [("speaker", device_id)], iim.log_text()[-3000:]
