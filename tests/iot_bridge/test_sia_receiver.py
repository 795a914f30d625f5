"""The SIA DC-09 receiver over real TCP and UDP sockets against real PostgreSQL, with a panel written from the
standard (tests/sia_sender.py): plain and encrypted accounts, bad CRC, stale timestamps, unknown accounts,
repeated frames, Contact ID, no ACK while the store is away, and extended data carried into the event (or
dropped and counted, the alarm acked all the same)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import pytest_asyncio

from iim.core.metrics import REGISTRY
from iot_bridge.app import Bridge, BridgeConfig
from iot_bridge.sia.receiver import SiaReceiver
from iot_bridge.sia.server import SiaServer, SiaServerConfig
from policy_cache import audit, registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import SiaAccountCreate, SiaAccountUpdate
from tests.alarm_rig import AlarmRig, build_rig
from tests.sia_sender import Panel, Reply, send_tcp, send_udp


def new_account() -> str:
    return secrets.token_hex(5).upper()


@dataclass
class SiaRig:
    rig: AlarmRig
    pool: Pool
    server: SiaServer
    plain: Panel  # the hub's account, plain messages
    secure: Panel  # the smoke sensor's account, AES-256
    hub_id: UUID

    async def tcp(self, *frames: bytes, panel: Panel | None = None) -> list[Reply]:
        assert self.server.tcp_port is not None
        raw = await send_tcp("127.0.0.1", self.server.tcp_port, list(frames))
        return [(panel or self.plain).read(r) for r in raw]

    async def udp(self, frame: bytes, panel: Panel | None = None) -> Reply:
        assert self.server.udp_port is not None
        return (panel or self.plain).read(await send_udp("127.0.0.1", self.server.udp_port, frame))

    async def rows(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        await audit.flush_pending(self.pool)
        async with tenant_tx(self.pool, self.rig.tenant_id) as conn:
            return [dict(r) for r in await conn.fetch(sql, *args)]

    async def events(self) -> list[dict[str, Any]]:
        return await self.rows("SELECT e.event_id, e.type, e.channel, e.payload, d.external_id AS device "
                               "FROM iim.device_event e JOIN iim.device d ON d.id = e.device_id ORDER BY received_at")

    async def incidents(self) -> list[dict[str, Any]]:
        return await self.rows("SELECT i.hazard, i.event_count, d.external_id AS device FROM iim.incident i "
                               "JOIN iim.device d ON d.id = i.device_id ORDER BY opened_at")


@pytest_asyncio.fixture
async def sia(app_pool: Pool, tmp_path: Path) -> AsyncIterator[SiaRig]:
    rig = await build_rig(app_pool, tmp_path, name="sia")
    key = secrets.token_bytes(32)
    key_file = tmp_path / "panel.key"
    key_file.write_text(key.hex())
    key_file.chmod(0o600)
    plain, secure = Panel(new_account(), line="7", receiver="12"), Panel(new_account(), key=key)
    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        devices = {d.external_id: d.id for d in await registry.list_rows(conn, registry.DEVICE)}
        await registry.create(conn, registry.SIA_ACCOUNT, SiaAccountCreate(
            account=plain.account, device_id=devices[rig.hub], receiver="12", line="7"), actor="test")
        await registry.create(conn, registry.SIA_ACCOUNT, SiaAccountCreate(
            account=secure.account.lower(), device_id=devices[rig.sensor], key_ref=f"file:{key_file}"), actor="test")
    bridge = Bridge(app_pool, BridgeConfig())
    async with bridge.refusals, SiaServer(SiaReceiver(bridge), SiaServerConfig(port=0)) as server:
        yield SiaRig(rig, app_pool, server, plain, secure, devices[rig.hub])


async def test_fire_over_tcp_is_stored_opens_an_incident_and_is_acked_after_the_commit(sia: SiaRig) -> None:
    [reply] = await sia.tcp(sia.plain.frame("Nri1/FA01", sequence=17))
    assert (reply.kind, reply.sequence, reply.account) == ("ACK", "0017", sia.plain.account)
    [event] = await sia.events()
    assert (event["type"], event["channel"], event["device"]) == ("smoke", "sia", sia.rig.hub)
    assert event["payload"]["sia_code"] == "FA"
    assert event["payload"]["zone"] == "01"
    assert await sia.incidents() == [{"hazard": "smoke", "event_count": 1, "device": sia.rig.hub}]


async def test_several_frames_on_one_connection_each_get_their_reply(sia: SiaRig) -> None:
    replies = await sia.tcp(sia.plain.frame("NBA03"), sia.plain.frame("Nri1/OP001"), sia.plain.frame("NRP"))
    assert [r.kind for r in replies] == ["ACK", "ACK", "ACK"]
    assert sorted(e["type"] for e in await sia.events()) == ["heartbeat", "intrusion"]  # an opening opens nothing


async def test_udp_frame_is_stored_and_acked(sia: SiaRig) -> None:
    reply = await sia.udp(sia.plain.frame("NGA02", sequence=3))
    assert (reply.kind, reply.sequence) == ("ACK", "0003")
    assert [e["type"] for e in await sia.events()] == ["co"]


async def test_encrypted_frames_over_tcp_and_udp_get_encrypted_acks_with_the_time(sia: SiaRig) -> None:
    [over_tcp] = await sia.tcp(sia.secure.frame("NMA01"), panel=sia.secure)
    over_udp = await sia.udp(sia.secure.frame("NPA02"), panel=sia.secure)
    for reply in (over_tcp, over_udp):
        assert reply.kind == "*ACK"
        assert reply.timestamp is not None
        assert abs((reply.timestamp - datetime.now(UTC)).total_seconds()) < 30
    assert [(e["type"], e["device"]) for e in await sia.events()] == [("panic", sia.rig.sensor)] * 2


async def test_contact_id_fire_opens_a_fire_incident(sia: SiaRig) -> None:
    reply = await sia.udp(sia.plain.frame("1110 01 015", message_id="ADM-CID"))
    assert reply.kind == "ACK"
    [event] = await sia.events()
    assert (event["type"], event["payload"]["sia_code"], event["payload"]["zone"]) == ("smoke", "CID:1110", "015")


async def test_a_repeated_frame_is_acked_again_and_stored_once(sia: SiaRig) -> None:
    frame = sia.plain.frame("NFA01")
    first = await sia.tcp(frame)
    again = await sia.udp(frame)
    encrypted = sia.secure.frame("NFA02")
    twice = await sia.tcp(encrypted, encrypted, panel=sia.secure)
    assert [r.kind for r in (*first, again, *twice)] == ["ACK", "ACK", "*ACK", "*ACK"]
    assert len(await sia.events()) == 2
    assert sorted(i["event_count"] for i in await sia.incidents()) == [1, 1]
    replays = await sia.rows("SELECT count(*) AS n FROM iim.audit_log WHERE action = 'event.replayed'")
    assert replays[0]["n"] >= 1  # the bridge's refusal audit, aggregated


async def test_bad_crc_is_nak_with_the_receivers_time_and_nothing_is_stored(sia: SiaRig) -> None:
    [reply] = await sia.tcp(sia.plain.frame("NFA01", bad_crc=True))
    assert (reply.kind, reply.sequence) == ("NAK", "0000")
    assert reply.timestamp is not None
    assert await sia.events() == []


@pytest.mark.parametrize("skew", [timedelta(seconds=-90), timedelta(seconds=45)])
async def test_a_timestamp_outside_the_window_is_nak(sia: SiaRig, skew: timedelta) -> None:
    stale = sia.secure.frame("NFA01", at=datetime.now(UTC) + skew)
    reply = await sia.udp(stale, panel=sia.secure)
    assert reply.kind == "NAK"
    assert reply.timestamp is not None
    [plain] = await sia.tcp(sia.plain.frame("NFA01", at=datetime.now(UTC) + skew))
    assert plain.kind == "NAK"
    assert await sia.events() == []


async def test_unknown_account_wrong_line_and_disabled_account_are_duh(sia: SiaRig) -> None:
    stranger = Panel(new_account())
    wrong_line = Panel(sia.plain.account, line="8", receiver="12")
    replies = [await sia.udp(stranger.frame("NFA01"), panel=stranger),
               await sia.udp(wrong_line.frame("NFA01"), panel=wrong_line)]
    async with tenant_tx(sia.pool, sia.rig.tenant_id) as conn:
        [account] = await registry.list_rows(conn, registry.SIA_ACCOUNT, device_id=sia.hub_id)
        await registry.update(conn, registry.SIA_ACCOUNT, account.id, SiaAccountUpdate(enabled=False), actor="test")
    replies.append(await sia.udp(sia.plain.frame("NFA01")))
    assert [r.kind for r in replies] == ["DUH", "DUH", "DUH"]
    assert await sia.events() == []


async def test_encryption_that_does_not_match_the_account_is_refused(sia: SiaRig) -> None:
    plain_to_secure = Panel(sia.secure.account)
    encrypted_to_plain = Panel(sia.plain.account, line="7", receiver="12", key=bytes(16))
    wrong_key = Panel(sia.secure.account, key=bytes(32))
    assert (await sia.udp(plain_to_secure.frame("NFA01"), panel=plain_to_secure)).kind == "DUH"
    assert (await sia.udp(encrypted_to_plain.frame("NFA01"), panel=encrypted_to_plain)).kind == "DUH"
    assert (await sia.udp(wrong_key.frame("NFA01"), panel=wrong_key)).kind == "NAK"
    assert await sia.events() == []


async def test_null_link_test_is_acked_and_stores_nothing(sia: SiaRig) -> None:
    [reply] = await sia.tcp(sia.plain.frame("", message_id="NULL"))
    assert reply.kind == "ACK"
    assert await sia.events() == []


async def test_garbage_is_answered_and_the_connection_goes_on(sia: SiaRig) -> None:
    assert sia.server.tcp_port is not None
    raw = await send_tcp("127.0.0.1", sia.server.tcp_port, [b"\n\x00\xff not a frame\r", sia.plain.frame("NFA01")])
    assert [sia.plain.read(r).kind for r in raw] == ["NAK", "ACK"]


async def test_no_ack_while_the_store_is_unavailable(app_pool: Pool, tmp_path: Path) -> None:
    """The intake's deadline passes (a store that does not answer in time): no reply, the connection is closed,
    nothing is acknowledged; the same frame once the store answers is stored and acked."""
    rig = await build_rig(app_pool, tmp_path, name="sia-down")
    panel = Panel(new_account())
    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        hub = next(d for d in await registry.list_rows(conn, registry.DEVICE) if d.external_id == rig.hub)
        await registry.create(conn, registry.SIA_ACCOUNT, SiaAccountCreate(account=panel.account, device_id=hub.id),
                              actor="test")
    frame = panel.frame("NFA01")
    stalled = Bridge(app_pool, BridgeConfig(store_deadline_s=0.000_001))
    async with stalled.refusals, SiaServer(SiaReceiver(stalled), SiaServerConfig(port=0, udp=False)) as server:
        assert server.tcp_port is not None
        with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):  # closed without a reply
            await send_tcp("127.0.0.1", server.tcp_port, [frame], timeout=10)
    bridge = Bridge(app_pool, BridgeConfig())
    async with bridge.refusals, SiaServer(SiaReceiver(bridge), SiaServerConfig(port=0, udp=False)) as server:
        assert server.tcp_port is not None
        [reply] = await send_tcp("127.0.0.1", server.tcp_port, [frame])
    assert panel.read(reply).kind == "ACK"
    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        assert await conn.fetchval("SELECT count(*) FROM iim.device_event WHERE channel = 'sia'") == 1


async def test_an_account_number_two_tenants_hold_is_refused_not_guessed(sia: SiaRig, tmp_path: Path) -> None:
    other = await build_rig(sia.pool, tmp_path, name="sia-other")
    async with tenant_tx(sia.pool, other.tenant_id) as conn:
        await registry.create(conn, registry.SIA_ACCOUNT, SiaAccountCreate(account=sia.plain.account,
                                                                           device_id=other.sensor_id), actor="test")
    assert (await sia.udp(sia.plain.frame("NFA01"))).kind == "DUH"
    assert await sia.events() == []


async def test_a_restore_is_a_cleared_event_for_the_same_device(sia: SiaRig) -> None:
    replies = await sia.tcp(sia.plain.frame("NFA01"), sia.plain.frame("NFR01"))
    assert [r.kind for r in replies] == ["ACK", "ACK"]
    assert [e["type"] for e in await sia.events()] == ["smoke", "cleared"]
    ticks = await sia.rows("SELECT count(*) AS n FROM iim_jobs.pgqueuer WHERE dedupe_key LIKE 'clear:sia-%'")
    assert ticks[0]["n"] == 1  # the live fire incident is queued to be resolved


# -- extended data ------------------------------------------------------------------------------------------

def dropped(block: str, reason: str) -> float:
    return REGISTRY.get_sample_value("iim_sia_extended_dropped_total", {"block": block, "reason": reason}) or 0.0


async def occurred(sia: SiaRig) -> list[datetime]:
    return [r["occurred_at"] for r in await sia.rows("SELECT occurred_at FROM iim.device_event ORDER BY received_at")]


async def test_extended_data_rides_in_the_event_location_link_and_the_panels_time(sia: SiaRig) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    happened = now - timedelta(seconds=25)
    url = "https://verify.example.net/clip/" + "c" * 150
    blocks = ["XE37.6176", "YN55.7558", f"V{url}", happened.strftime("H_%H:%M:%S,%m-%d-%Y"), "MA0B1C2D3E4F5",
              "IFire zone 1 kitchen", "KFFFFFFFFFFFFFFFF", "P0102"]
    [over_tcp] = await sia.tcp(sia.secure.frame("NFA01", at=now, extended=blocks), panel=sia.secure)
    over_udp = await sia.udp(sia.plain.frame("NMA02", at=now, extended=blocks))
    assert (over_tcp.kind, over_udp.kind) == ("*ACK", "ACK")
    events = await sia.events()
    for event in events:
        payload = event["payload"]
        assert payload["location"] == {"lat": 55.7558, "lon": 37.6176}
        assert payload["verification_url"] == url
        assert (payload["panel_mac"], payload["alarm_text"]) == ("A0B1C2D3E4F5", "Fire zone 1 kitchen")
        assert "FFFFFFFFFFFFFFFF" not in str(payload)  # a key exchange block is never kept
    assert await occurred(sia) == [happened, happened]  # the panel's time of occurrence, not the message's


async def test_bad_extended_data_is_dropped_and_counted_and_the_alarm_still_acked(sia: SiaRig) -> None:
    before = {key: dropped(*key) for key in [("X", "location-out-of-range"), ("V", "verification-not-https"),
                                             ("?", "malformed"), ("H", "time-outside-window"),
                                             ("Y", "location-incomplete")]}
    now = datetime.now(UTC).replace(microsecond=0)
    stale = now - timedelta(hours=2)
    blocks = ["XE237.6", "YN55.7", "Vhttp://verify.example.net/clip", "I" + "x" * 300,
              stale.strftime("H_%H:%M:%S,%m-%d-%Y")]
    [reply] = await sia.tcp(sia.plain.frame("NFA01", at=now, extended=blocks))
    encrypted = await sia.udp(sia.secure.frame("NGA02", at=now, extended=["[nested]", "V javascript:x"]),
                              panel=sia.secure)
    assert (reply.kind, encrypted.kind) == ("ACK", "*ACK")
    events = await sia.events()
    assert [e["type"] for e in events] == ["smoke", "co"]
    for event in events:
        assert not {"location", "verification_url", "alarm_text"} & set(event["payload"])
        assert event["payload"]["sia_code"] in ("FA", "GA")
    assert await occurred(sia) == [now, now]  # a time of occurrence outside the window: the message's time
    assert dropped("X", "location-out-of-range") == before[("X", "location-out-of-range")] + 1
    assert dropped("Y", "location-incomplete") == before[("Y", "location-incomplete")] + 1
    assert dropped("V", "verification-not-https") == before[("V", "verification-not-https")] + 2
    assert dropped("?", "malformed") >= before[("?", "malformed")] + 2  # the overlong block, the nested one
    assert dropped("H", "time-outside-window") == before[("H", "time-outside-window")] + 1
