"""MO SMS read aloud at home, end to end: PostgreSQL (RLS, audit chain), a real vendor cloud over HTTP,
WAV files from a renderer, signed URLs. The consent matrix reads nothing and audits why; the body never
reaches a log line or a refusal's audit row."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from iim.core.metrics import REGISTRY
from iim.home.sms_readout import SmsReadoutService, text_digest
from iim.keys.keyring import Keyring
from policy_cache import audit, registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import PresenceState
from tests.home_delivery_rig import (
    BrokenRenderer,
    Connectors,
    HmacSigner,
    Home,
    HttpConnector,
    Mo,
    VendorCloud,
    WavRenderer,
    audit_rows,
    build_home,
    create_tenant,
)
from tests.pg import opened

SENDER = "+79161234567"
_NUMBERS = itertools.count(1)
HASH_KEY = b"h" * 32


def new_msisdn() -> str:
    return f"+7900{next(_NUMBERS):07d}"


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Rig:
    pool: Pool
    cloud: VendorCloud
    connector: HttpConnector
    renderer: WavRenderer
    clock: Clock
    service: SmsReadoutService

    def mo(self, home: Home, body: str, *, sender: str = SENDER, sms_id: str | None = None) -> Mo:
        return Mo(sms_id or f"sms-{uuid4().hex[:12]}", sender.removeprefix("+"), home.msisdn.removeprefix("+"),
                  body, self.clock.now)

    def service_with(self, **kw: Any) -> SmsReadoutService:
        args: dict[str, Any] = {"hash_key": HASH_KEY, "clock": self.clock, "connector_timeout_s": 2.0}
        args.update(kw)
        return SmsReadoutService(self.pool, args.pop("renderer", self.renderer), HmacSigner(),
                                 Connectors(webhook=self.connector), None, **args)


@pytest.fixture
async def rig(app_pool: Pool, tmp_path: Path) -> AsyncIterator[Rig]:
    cloud = VendorCloud()
    await cloud.start()
    connector = HttpConnector(cloud.url)
    await connector.setup()
    renderer = WavRenderer(tmp_path)
    clock = Clock()
    service = SmsReadoutService(app_pool, renderer, HmacSigner(), Connectors(webhook=connector), None,
                                hash_key=HASH_KEY, clock=clock, connector_timeout_s=2.0)
    yield Rig(app_pool, cloud, connector, renderer, clock, service)
    await connector.unload()
    await cloud.stop()


@pytest.fixture
def body() -> str:
    return f"Your bank code is {uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)


def assert_not_logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    assert caplog.records  # the service does log; just never the body
    for record in caplog.records:
        assert text not in record.getMessage()
        assert text not in repr(record.__dict__)


ALLOW = {"allowed_senders": ["+7916"]}


async def test_consented_sms_is_read_aloud_on_the_speaker_with_a_signed_url_and_audited(
        rig: Rig, body: str, caplog: pytest.LogCaptureFixture) -> None:
    tenant = await create_tenant(rig.pool)
    home = await build_home(rig.pool, tenant, new_msisdn(), consent_scope=ALLOW, display=True, sip_speaker=True)
    mo = rig.mo(home, body)
    assert await rig.service.handle(tenant, mo) == "read_aloud"

    [tts] = rig.cloud.paths("/tts")
    assert tts["target"] == f"spk-{home.msisdn[-7:]}"
    assert tts["audio_url"].startswith("https://iim.example.net/tts/")
    assert "sig=" in tts["audio_url"]
    assert "exp=" in tts["audio_url"]
    assert tts["text"] == f"Message from {SENDER}. {body}"
    assert tts["sms_id"] == mo.sms_id
    [note] = rig.cloud.paths("/notify")  # the hall panel shows it
    assert note["target"] == f"panel-{home.msisdn[-7:]}"
    assert note["title"] == f"SMS from {SENDER}"
    assert (rig.renderer.directory / f"{rig.renderer.rendered[0]}.wav").stat().st_size > 44

    rows = await audit_rows(rig.pool, tenant, mo.sms_id)
    assert [r["action"] for r in rows] == ["sms.readout.claimed", "sms.read_aloud", "sms.shown"]
    read = rows[1]["detail"]
    assert read["device_id"] == str(home.devices["speaker"])
    assert read["consent_id"] == str(home.consent_id)
    assert read["text_hash"] == text_digest(HASH_KEY, tts["text"])
    assert rows[1]["correlation"] == {"sms_id": mo.sms_id}
    assert "device_sip_only" in rows[0]["detail"]["codes"]  # said, not hidden
    for row in rows:
        assert body not in json.dumps(row, default=str)
    assert_not_logged(caplog, body)
    async with tenant_tx(rig.pool, tenant) as conn:
        assert await audit.verify_chain(conn, tenant) is None

    assert (REGISTRY.get_sample_value("iim_home_sms_readouts_total", {"outcome": "read_aloud"}) or 0) >= 1
    assert (REGISTRY.get_sample_value("iim_home_sms_deliveries_total", {"kind": "tts", "result": "delivered"})
            or 0) >= 1
    again = rig.mo(home, body)  # the same text again: rendered once, from the cache
    assert await rig.service.handle(str(tenant), again) == "read_aloud"
    assert len(rig.renderer.rendered) == 1


@dataclass(frozen=True)
class Case:
    code: str
    home: dict[str, Any]
    sender: str = SENDER
    at: datetime | None = None


CASES = [
    Case("no_consent", {}),
    Case("sender_blocked", {"consent_scope": {"allowed_senders": ["*"]}, "blocked": [SENDER]}),
    Case("sender_not_allowed", {"consent_scope": ALLOW}, sender="+79031112233"),
    Case("sender_not_allowed", {"consent_scope": {"allowed_senders": []}}),
    Case("quiet_hours", {"consent_scope": ALLOW, "quiet": (time(23, 0), time(7, 0))},
         at=datetime(2026, 11, 25, 21, 30, tzinfo=UTC)),  # 00:30 in Moscow
    Case("quiet_hours", {"consent_scope": ALLOW, "quiet": (time(22, 0), time(8, 0))},
         at=datetime(2026, 11, 25, 19, 5, tzinfo=UTC)),  # 22:05 in Moscow
    Case("nobody_home", {"consent_scope": ALLOW, "presence": PresenceState.AWAY}),
    Case("dnd", {"consent_scope": ALLOW, "dnd": True}),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.code}-{i}" for i, c in enumerate(CASES)])
async def test_refused_sms_reads_nothing_and_audits_why_without_the_body(
        rig: Rig, body: str, case: Case, caplog: pytest.LogCaptureFixture) -> None:
    tenant = await create_tenant(rig.pool)
    home = await build_home(rig.pool, tenant, new_msisdn(), **case.home)
    if case.at is not None:
        rig.clock.now = case.at
    mo = rig.mo(home, body, sender=case.sender)
    assert await rig.service.handle(tenant, mo) == "nothing"
    assert rig.cloud.received == []
    assert rig.renderer.rendered == []
    [row] = await audit_rows(rig.pool, tenant, mo.sms_id)
    assert row["action"] == "sms.not_read"
    assert case.code in row["detail"]["codes"]
    assert row["detail"]["reasons"]
    assert body not in json.dumps(row, default=str)
    assert_not_logged(caplog, body)


async def test_revoked_consent_reads_nothing(rig: Rig, body: str, caplog: pytest.LogCaptureFixture) -> None:
    tenant = await create_tenant(rig.pool)
    home = await build_home(rig.pool, tenant, new_msisdn(), consent_scope=ALLOW)
    assert home.consent_id is not None
    async with tenant_tx(rig.pool, tenant) as conn:
        await registry.revoke(conn, registry.CONSENT, home.consent_id, actor="test")
    mo = rig.mo(home, body)
    assert await rig.service.handle(tenant, mo) == "nothing"
    [row] = await audit_rows(rig.pool, tenant, mo.sms_id)
    assert row["detail"]["codes"] == ["consent_revoked"]
    assert rig.cloud.received == []
    assert_not_logged(caplog, body)


async def test_expired_consent_reads_nothing(rig: Rig, body: str) -> None:
    tenant = await create_tenant(rig.pool)
    home = await build_home(rig.pool, tenant, new_msisdn(), consent_scope=ALLOW,
                            consent_expires=datetime.now(UTC) + timedelta(minutes=5))
    rig.clock.now = datetime.now(UTC) + timedelta(minutes=6)
    mo = rig.mo(home, body)
    assert await rig.service.handle(tenant, mo) == "nothing"
    [row] = await audit_rows(rig.pool, tenant, mo.sms_id)
    assert row["detail"]["codes"] == ["consent_expired"]
    assert body not in json.dumps(row, default=str)
    assert rig.cloud.received == []


async def test_another_tenants_consent_for_the_same_number_does_not_count(rig: Rig, body: str) -> None:
    msisdn = new_msisdn()
    tenant_a = await create_tenant(rig.pool, "a")
    tenant_b = await create_tenant(rig.pool, "b")
    home_a = await build_home(rig.pool, tenant_a, msisdn)  # no consent in A
    home_b = await build_home(rig.pool, tenant_b, msisdn, consent_scope={"allowed_senders": ["*"]})
    mo = rig.mo(home_a, body)
    assert await rig.service.handle(tenant_a, mo) == "nothing"
    [row] = await audit_rows(rig.pool, tenant_a, mo.sms_id)
    assert row["detail"]["codes"] == ["no_consent"]
    assert rig.cloud.received == []
    assert await audit_rows(rig.pool, tenant_b, mo.sms_id) == []
    # The same number in B, where the consent is, is read (and only B's speaker hears it).
    assert await rig.service.handle(tenant_b, rig.mo(home_b, body)) == "read_aloud"
    assert [t["target"] for t in rig.cloud.paths("/tts")] == [f"spk-{msisdn[-7:]}"]


async def test_unknown_destination_reads_nothing(rig: Rig, body: str) -> None:
    tenant = await create_tenant(rig.pool)
    mo = Mo("sms-unknown", SENDER, "+79999999999", body, rig.clock.now)
    assert await rig.service.handle(tenant, mo) == "nothing"
    [row] = await audit_rows(rig.pool, tenant, "sms-unknown")
    assert row["detail"]["codes"] == ["no_subscriber"]


async def test_tts_down_sends_the_text_as_a_notification_instead(rig: Rig, body: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    tenant = await create_tenant(rig.pool)
    home = await build_home(rig.pool, tenant, new_msisdn(), consent_scope=ALLOW)
    mo = rig.mo(home, body)
    assert await rig.service_with(renderer=BrokenRenderer()).handle(tenant, mo) == "shown"
    assert rig.cloud.paths("/tts") == []
    [note] = rig.cloud.paths("/notify")
    assert note["target"] == f"spk-{home.msisdn[-7:]}"
    assert note["text"].endswith(body)
    rows = await audit_rows(rig.pool, tenant, mo.sms_id)
    assert [r["action"] for r in rows] == ["sms.readout.claimed", "sms.shown"]
    assert rows[1]["detail"]["why"] == "tts_unavailable"
    assert_not_logged(caplog, body)


@pytest.mark.parametrize("how", ["vendor_503", "peer_gone"])
async def test_connector_down_is_recorded_and_the_sms_stays_on_the_phone(rig: Rig, body: str, how: str) -> None:
    tenant = await create_tenant(rig.pool)
    home = await build_home(rig.pool, tenant, new_msisdn(), consent_scope=ALLOW)
    if how == "vendor_503":
        rig.cloud.behaviour[f"spk-{home.msisdn[-7:]}"] = "down"
    else:
        await rig.cloud.stop()
    mo = rig.mo(home, body)
    assert await rig.service.handle(tenant, mo) == "failed"
    rows = await audit_rows(rig.pool, tenant, mo.sms_id)
    assert [r["action"] for r in rows] == ["sms.readout.claimed", "sms.delivery_failed"]
    failed = rows[1]["detail"]
    assert failed["result"] == "unavailable"
    assert failed["error"] == "ConnectorUnavailable"
    assert failed["fallback"].startswith("phone")
    assert failed["device_id"] == str(home.devices["speaker"])


async def test_unknown_connector_is_recorded(rig: Rig, body: str) -> None:
    tenant = await create_tenant(rig.pool)
    home = await build_home(rig.pool, tenant, new_msisdn(), consent_scope=ALLOW)
    service = SmsReadoutService(rig.pool, rig.renderer, HmacSigner(), Connectors(), hash_key=HASH_KEY,
                                clock=rig.clock)
    mo = rig.mo(home, body)
    assert await service.handle(tenant, mo) == "failed"
    rows = await audit_rows(rig.pool, tenant, mo.sms_id)
    assert rows[1]["detail"]["result"] == "no_connector"


async def test_redelivered_mo_is_read_once(rig: Rig, body: str) -> None:
    tenant = await create_tenant(rig.pool)
    home = await build_home(rig.pool, tenant, new_msisdn(), consent_scope=ALLOW)
    mo = rig.mo(home, body, sms_id="smsc-42")
    assert await rig.service.handle(tenant, mo) == "read_aloud"
    await rig.service.on_mo(tenant, mo)  # the messaging hook itself
    assert await rig.service.handle(tenant, mo) == "duplicate"
    # Two deliveries racing (two IIM instances, an SMSC retry) still read it once.
    racing = rig.mo(home, body, sms_id="smsc-43")
    results = await asyncio.gather(rig.service.handle(tenant, racing), rig.service.handle(tenant, racing))
    assert sorted(results) == ["duplicate", "read_aloud"]
    assert len(rig.cloud.paths("/tts")) == 2
    actions = [r["action"] for r in await audit_rows(rig.pool, tenant, "smsc-42")]
    assert actions == ["sms.readout.claimed", "sms.read_aloud"]
    # A refused MO redelivered is not audited twice either.
    other = rig.mo(home, body, sender="+79031112233", sms_id="smsc-44")
    assert await rig.service.handle(tenant, other) == "nothing"
    assert await rig.service.handle(tenant, other) == "duplicate"
    assert len(await audit_rows(rig.pool, tenant, "smsc-44")) == 1


async def test_the_same_sms_id_in_two_tenants_is_two_messages(rig: Rig, body: str) -> None:
    tenants: list[UUID] = []
    for _ in range(2):
        tenant = await create_tenant(rig.pool)
        home = await build_home(rig.pool, tenant, new_msisdn(), consent_scope=ALLOW)
        tenants.append(tenant)
        assert await rig.service.handle(tenant, rig.mo(home, body, sms_id="smsc-1")) == "read_aloud"
    assert len(rig.cloud.paths("/tts")) == 2


async def _stored_body(pool: Pool, tenant: UUID, sms_id: str) -> str | None:
    async with tenant_tx(pool, tenant) as conn:
        row = await conn.fetchrow("SELECT tenant_id, sms_id, body, body_key FROM iim.sms_inbound WHERE sms_id = $1",
                                  sms_id)
        assert row is not None
        return await opened(conn, row, table="sms_inbound")


async def test_a_declined_readout_forgets_the_stored_body_at_once(rig: Rig, body: str, keyring: Keyring) -> None:
    from iim.sms import store as sms_store
    from iim.sms.transport import MoSms

    tenant = await create_tenant(rig.pool)
    home = await build_home(rig.pool, tenant, new_msisdn(), consent_scope=ALLOW)  # consented, but not this sender
    incoming = MoSms("smpp", "+79031112233", home.msisdn, body, rig.clock.now, sms_id=uuid4().hex[:12])
    async with tenant_tx(rig.pool, tenant) as conn:
        row = await sms_store.store_mo(conn, incoming, "a" * 64, dedup_window=300,
                                       data_key=await keyring.active(conn, tenant))
    assert row is not None
    assert await _stored_body(rig.pool, tenant, row["sms_id"]) == body  # a live consent: kept to be read
    mo = Mo(row["sms_id"], "79031112233", home.msisdn.removeprefix("+"), body, rig.clock.now)
    assert await rig.service.handle(tenant, mo) == "nothing"
    assert await _stored_body(rig.pool, tenant, row["sms_id"]) is None
    async with tenant_tx(rig.pool, tenant) as conn:
        kept = await conn.fetchrow("SELECT body_length, handled_at, body_purged_at FROM iim.sms_inbound "
                                   "WHERE sms_id = $1", row["sms_id"])
    assert kept is not None
    assert kept["body_length"] == len(body)
    assert kept["handled_at"] is not None
    assert kept["body_purged_at"] is not None
