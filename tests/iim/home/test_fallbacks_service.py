"""Fallbacks that deliver, through the running service (`iim serve`'s own assembly): real PostgreSQL, the
FreeSWITCH emulator placing the calls, and each fallback's outcome read from IIM's rows (the SMS outbox).

The forked paths: a household whose SIP speaker rings with the owner's mobile (together or in sequence),
nobody answers, or the caller gives up while it rings -- a missed call either way."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from fs_app.esl import Execute
from fs_app.testing import CallResult, CallSpec, FreeSwitchEmulator, TargetBehaviour
from iim.service import DatabaseUrls, Service
from iim.settings import Settings
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import FallbackAction, RingMode
from tests.home_delivery_rig import Home, build_home, create_tenant
from tests.pg import TEST_MASTER_KEY_ENV, PgDatabase, opened

CALLER = "+4930111222"
_NUMBERS = itertools.count(1)


@pytest.fixture(autouse=True)
def _shared_master_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every service of this module seals SMS bodies under the tests' master key, so the test can read them."""
    for name, value in TEST_MASTER_KEY_ENV.items():
        monkeypatch.setenv(name, value)


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"esl_port": 0, "http_port": 0, "bridge_enabled": False, "scenario_worker": False,
                              "data_dir": str(tmp_path / "pg"),
                              "master_key_ref": TEST_MASTER_KEY_ENV["IIM_MASTER_KEY_REF"]}
    values.update(overrides)
    return Settings(**values)


@dataclass
class Served:
    pool: Pool
    tenant: UUID
    service: Service
    emu: FreeSwitchEmulator

    async def call(self, home: Home, **spec: Any) -> CallResult:
        return await self.emu.place_call("127.0.0.1", self.service.outbound.port, CallSpec(
            destination=home.msisdn.removeprefix("+"), caller_id_number=CALLER, **spec))

    async def outbox(self) -> list[dict[str, Any]]:
        async with tenant_tx(self.pool, self.tenant) as conn:
            rows = await conn.fetch("SELECT tenant_id, key, msisdn, body, body_key FROM iim.sms_outbox ORDER BY key")
        # Bodies are sealed with the tenant's data key (migration 0028): read them as the sender does.
        return [{"key": r["key"], "msisdn": r["msisdn"], "body": await opened(self.pool, r)} for r in rows]

    def ring_sip_speaker(self, home: Home, behaviour: TargetBehaviour) -> None:
        user = f"sip-{home.msisdn[-7:]}"
        self.emu.register_user(user, "iim.local")
        self.emu.targets[f"user/{user}@iim.local"] = behaviour


@pytest.fixture
async def served(pg_db: PgDatabase, app_pool: Pool, tmp_path: Path) -> AsyncIterator[Served]:
    tenant = await create_tenant(app_pool, "fallbacks")
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.no_answer(), time_scale=0.01)
    try:
        async with Service(settings(tmp_path), database=DatabaseUrls(pg_db.app_url, pg_db.cache_url)) as service:
            yield Served(app_pool, tenant, service, emu)
    finally:
        await emu.close()


async def forked_home(served: Served, ring_mode: RingMode,
                      fallback: FallbackAction = FallbackAction.MISSED_CALL_SMS) -> Home:
    home = await build_home(served.pool, served.tenant, f"+79106{next(_NUMBERS):06d}", speaker=False,
                            sip_speaker=True, announce_consent=True, ring_mode=ring_mode, fallback=fallback)
    await wait_routable(served, home)
    return home


async def wait_routable(served: Served, home: Home) -> None:
    """The cache has the new subscriber (the change feed is asynchronous)."""
    import asyncio

    policy = served.service.running.policy
    assert policy is not None
    for _ in range(200):
        if policy.cache.lookup(home.msisdn) is not None:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{home.msisdn} never reached the policy cache")


def bridges(result: CallResult) -> list[str]:
    return [c.arg or "" for c in result.commands if isinstance(c, Execute) and c.app == "bridge"]


def missed(result: CallResult, home: Home) -> dict[str, str]:
    return {"key": f"missed-call:{result.uuid}", "msisdn": home.msisdn,
            "body": f"Missed call from {CALLER}: nobody took it at home."}


@pytest.mark.parametrize("mode", [RingMode.SIMULTANEOUS, RingMode.HOME_THEN_PHONE, RingMode.PHONE_THEN_HOME])
async def test_a_forked_call_nobody_answers_queues_the_missed_call_sms(served: Served, mode: RingMode) -> None:
    home = await forked_home(served, mode)
    served.ring_sip_speaker(home, TargetBehaviour.no_answer())
    result = await served.call(home)
    [dial] = bridges(result)
    speaker = f"user/sip-{home.msisdn[-7:]}@iim.local"
    assert speaker in dial
    assert f"sofia/gateway/ims/{home.msisdn}" in dial
    assert ("|" in dial) == (mode != RingMode.SIMULTANEOUS)  # in sequence, or together
    assert result.bridged_to is None
    assert await served.outbox() == [missed(result, home)]


async def test_a_caller_who_gives_up_while_the_home_rings_gets_a_missed_call_sms(served: Served) -> None:
    """A missed call is a missed call: the caller hanging up before anyone answered is what a phone shows."""
    home = await forked_home(served, RingMode.SIMULTANEOUS)
    served.ring_sip_speaker(home, TargetBehaviour.no_answer())
    result = await served.call(home, caller_hangup_after_ms=5000)  # 50 ms: while both legs ring
    assert len(bridges(result)) == 1
    assert result.bridged_to is None
    assert await served.outbox() == [missed(result, home)]


async def test_a_caller_who_gives_up_leaves_no_message_but_is_still_reported(served: Served) -> None:
    home = await forked_home(served, RingMode.SIMULTANEOUS, FallbackAction.RECORD_MESSAGE)
    served.ring_sip_speaker(home, TargetBehaviour.no_answer())
    result = await served.call(home, caller_hangup_after_ms=5000)
    assert "record" not in [c.app for c in result.commands if isinstance(c, Execute)]
    assert [s["key"] for s in await served.outbox()] == [f"missed-call:{result.uuid}"]


async def test_an_answered_forked_call_sends_no_sms(served: Served) -> None:
    home = await forked_home(served, RingMode.SIMULTANEOUS)
    served.ring_sip_speaker(home, TargetBehaviour.answer(after_ms=100, hangup_after_ms=100))
    result = await served.call(home)
    assert result.bridged_to == f"user/sip-{home.msisdn[-7:]}@iim.local"
    assert await served.outbox() == []


async def test_a_call_without_fallback_sends_no_sms_even_when_the_caller_gives_up(served: Served) -> None:
    home = await forked_home(served, RingMode.SIMULTANEOUS, FallbackAction.NONE)
    served.ring_sip_speaker(home, TargetBehaviour.no_answer())
    await served.call(home, caller_hangup_after_ms=5000)
    assert await served.outbox() == []


# -- the HTTP SMSC, chosen by settings ----------------------------------------------------------------------

async def _status(pool: Pool, tenant: UUID, key: str, wanted: str) -> None:
    import asyncio

    for _ in range(400):
        async with tenant_tx(pool, tenant) as conn:
            if await conn.fetchval("SELECT status::text FROM iim.sms_outbox WHERE key = $1", key) == wanted:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"SMS {key} never became {wanted}")


async def test_iim_serve_sends_through_the_http_smsc_its_settings_name(
        pg_db: PgDatabase, app_pool: Pool, tmp_path: Path) -> None:
    import aiohttp
    from aiohttp import web

    from tests.alarm_rig import new_secret, secret_text
    from tests.iim.sms.test_messaging_http import FakeSmsc, signed

    secret = new_secret()
    secret_file = tmp_path / "smsc.whsec"
    secret_file.write_text(secret_text(secret))
    secret_file.chmod(0o600)
    smsc = FakeSmsc(secret)
    app = web.Application()
    app.router.add_post("/sms", smsc.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    tenant = await create_tenant(app_pool, "http-smsc")
    home = await build_home(app_pool, tenant, "+79107770001", speaker=False, ring_mode=RingMode.PHONE_ONLY)
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.no_answer(), time_scale=0.01)
    try:
        config = settings(tmp_path, http_smsc_url=f"http://{host}:{port}/sms",
                          http_smsc_secret_ref=f"file:{secret_file}", http_smsc_source_addr="HOME")
        async with Service(config, database=DatabaseUrls(pg_db.app_url, pg_db.cache_url)) as service:
            served = Served(app_pool, tenant, service, emu)
            await wait_routable(served, home)
            result = await served.call(home)
            key = f"missed-call:{result.uuid}"
            await _status(app_pool, tenant, key, "sent")
            # The module's database holds other tests' queued SMS too: the sender sends those as well.
            [request] = [r for r in smsc.requests if r["body"]["to"] == home.msisdn]
            assert request["body"]["from"] == "HOME"
            assert request["body"]["text"] == f"Missed call from {CALLER}: nobody took it at home."
            async with tenant_tx(app_pool, tenant) as conn:
                [smsc_id] = await conn.fetchval("SELECT smsc_message_ids FROM iim.sms_outbox WHERE key = $1", key)
            base = f"http://127.0.0.1:{service.running.http_port}/v1/smsc/http"
            async with aiohttp.ClientSession() as http:
                raw, headers = signed({"message_id": smsc_id, "state": "delivered"}, new_secret())
                async with http.post(base + "/receipts", data=raw, headers=headers) as resp:
                    assert resp.status == 401  # not signed with the SMSC's secret
                raw, headers = signed({"message_id": smsc_id, "state": "delivered"}, secret)
                async with http.post(base + "/receipts", data=raw, headers=headers) as resp:
                    assert resp.status == 200
            await _status(app_pool, tenant, key, "delivered")
    finally:
        await emu.close()
        await runner.cleanup()


def test_two_smscs_refuse_the_start(tmp_path: Path) -> None:
    from iim.core.errors import ConfigError

    service = Service(settings(tmp_path, smpp_host="127.0.0.1", http_smsc_url="http://127.0.0.1:9/sms"))
    with pytest.raises(ConfigError, match="one SMSC"):
        service._sms_transport()


def test_an_unusable_http_smsc_secret_refuses_the_start(tmp_path: Path) -> None:
    from iim.core.errors import ConfigError

    service = Service(settings(tmp_path, http_smsc_url="http://127.0.0.1:9/sms",
                               http_smsc_secret_ref="env:IIM_TEST_NO_SUCH_SMSC_SECRET"))
    with pytest.raises(ConfigError, match="HTTP SMSC secret"):
        service._sms_transport()


# -- messages callers leave: kept under consent, announced with a signed link, served by IIM ------------------

@pytest.fixture
async def recording(pg_db: PgDatabase, app_pool: Pool, tmp_path: Path) -> AsyncIterator[Served]:
    tenant = await create_tenant(app_pool, "messages")
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.no_answer(), time_scale=0.01, write_recordings=True)
    config = settings(tmp_path, recordings_dir=str(tmp_path / "messages"))
    try:
        async with Service(config, database=DatabaseUrls(pg_db.app_url, pg_db.cache_url)) as service:
            yield Served(app_pool, tenant, service, emu)
    finally:
        await emu.close()


async def _message_home(served: Served, *, consent: bool) -> Home:
    home = await build_home(served.pool, served.tenant, f"+79108{next(_NUMBERS):06d}", speaker=False,
                            ring_mode=RingMode.PHONE_ONLY, fallback=FallbackAction.RECORD_MESSAGE,
                            recording_consent=consent)
    await wait_routable(served, home)
    return home


def _local(served: Served, link: str) -> str:
    """The link as sent, pointed at the port this test's HTTP site got (the settings said port 0)."""
    from yarl import URL

    url = URL(link)
    assert url.path_qs.startswith("/v1/messages/")
    return f"http://127.0.0.1:{served.service.running.http_port}{url.path_qs}"


async def test_a_message_left_is_kept_announced_with_a_signed_link_and_served(recording: Served,
                                                                             tmp_path: Path) -> None:
    import re

    import aiohttp

    served = recording
    home = await _message_home(served, consent=True)
    result = await served.call(home)
    recorded = tmp_path / "messages" / f"iim-{result.uuid}.wav"
    assert [r.path for r in served.emu.recordings] == [str(recorded)]  # the switch recorded where IIM keeps them
    [sms] = await served.outbox()
    assert sms["key"] == f"message:{result.uuid}"  # the message's SMS, instead of the plain missed-call one
    assert sms["msisdn"] == home.msisdn
    assert sms["body"].startswith(f"Missed call from {CALLER}: a message was left (120 s). Listen: http")
    link = re.search(r"http://\S+", sms["body"])
    assert link is not None
    async with aiohttp.ClientSession() as http:
        async with http.get(_local(served, link.group(0))) as resp:
            assert resp.status == 200
            assert resp.content_type == "audio/wav"
            assert await resp.read() == recorded.read_bytes()
        refusals = [link.group(0).replace("sig=", "sig=0") [:-1],  # a signature that does not match
                    re.sub(r"exp=\d+", "exp=1", link.group(0)),  # expired (and no longer matching)
                    re.sub(r"/v1/messages/[0-9a-f-]{36}/", f"/v1/messages/{UUID(int=1)}/", link.group(0)),
                    re.sub(r"/([0-9a-f-]{36})\.wav", f"/{UUID(int=2)}.wav", link.group(0))]
        bodies = set()
        for refused in refusals:
            async with http.get(_local(served, refused)) as resp:
                assert resp.status == 404
                bodies.add(await resp.text())
        async with tenant_tx(served.pool, served.tenant) as conn:
            await conn.execute("UPDATE iim.consent SET revoked_at = now() WHERE subscriber_id = $1",
                               home.subscriber_id)
        async with http.get(_local(served, link.group(0))) as resp:  # consent revoked since: not served
            assert resp.status == 404
            bodies.add(await resp.text())
    assert len(bodies) == 1  # one 404 for every refusal
    async with tenant_tx(served.pool, served.tenant) as conn:
        [row] = await conn.fetch("SELECT call_uuid, caller, file_name, duration_ms, expires_at > now() + "
                                 "interval '29 days' AS retained FROM iim.recorded_message")
    assert dict(row) == {"call_uuid": result.uuid, "caller": CALLER, "file_name": recorded.name,
                         "duration_ms": 120000, "retained": True}


async def test_without_recording_consent_nothing_is_recorded_and_the_missed_call_sms_sent(
        recording: Served, tmp_path: Path) -> None:
    served = recording
    home = await _message_home(served, consent=False)
    result = await served.call(home)
    # The routing cache knows the consent is missing: the fallback is the missed-call SMS, nothing is recorded.
    assert not served.emu.recordings
    assert not (tmp_path / "messages" / f"iim-{result.uuid}.wav").exists()
    assert await served.outbox() == [missed(result, home)]
    async with tenant_tx(served.pool, served.tenant) as conn:
        assert await conn.fetchval("SELECT count(*) FROM iim.recorded_message") == 0


# -- ... uploaded by a switch on another host (IIM_RECORDINGS_UPLOAD): mod_http_cache's PUT, emulated ----------

@pytest.fixture
async def uploading(pg_db: PgDatabase, app_pool: Pool, tmp_path: Path) -> AsyncIterator[Served]:
    from tests.real_switch import free_port

    tenant = await create_tenant(app_pool, "uploads")
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.no_answer(), time_scale=0.01)
    port = free_port()  # the upload URL names IIM's real port: the emulated switch PUTs to it
    config = settings(tmp_path, http_port=port, recordings_dir=str(tmp_path / "messages"), recordings_upload=True,
                      switch_audio_base_url=f"http://127.0.0.1:{port}")
    try:
        async with Service(config, database=DatabaseUrls(pg_db.app_url, pg_db.cache_url)) as service:
            yield Served(app_pool, tenant, service, emu)
    finally:
        await emu.close()


async def test_a_message_uploaded_by_a_switch_elsewhere_is_kept_announced_and_served(uploading: Served,
                                                                                    tmp_path: Path) -> None:
    import re

    import aiohttp

    served = uploading
    home = await _message_home(served, consent=True)
    result = await served.call(home)
    [recording] = served.emu.recordings
    port = served.service.running.http_port
    assert re.fullmatch(rf"http_cache://http://127\.0\.0\.1:{port}/v1/recordings/{served.tenant}/{result.uuid}"
                        r"\.wav\?exp=\d+&sig=[0-9a-f]{64}", recording.path)  # not a path on the switch
    assert recording.uploaded == 201  # before record returned: the router then found the file
    kept = tmp_path / "messages" / f"iim-{result.uuid}.wav"
    assert len(kept.read_bytes()) == 44 + 120 * 8000 * 2  # the 120 s the emulated caller spoke
    [sms] = await served.outbox()
    assert sms["key"] == f"message:{result.uuid}"
    link = re.search(r"http://\S+", sms["body"])
    assert link is not None
    async with aiohttp.ClientSession() as http, http.get(_local(served, link.group(0))) as resp:
        assert resp.status == 200
        assert await resp.read() == kept.read_bytes()
    async with tenant_tx(served.pool, served.tenant) as conn:
        assert await conn.fetchval("SELECT file_name FROM iim.recorded_message WHERE call_uuid = $1",
                                   result.uuid) == kept.name


async def test_a_message_whose_upload_never_arrives_is_reported_by_the_missed_call_sms(
        pg_db: PgDatabase, app_pool: Pool, tmp_path: Path) -> None:
    """The switch cannot reach IIM's upload URL (here: nothing listens there): mod_http_cache logs the failure,
    ``record`` completes all the same, nothing is kept, and the household still learns of the call."""
    from tests.real_switch import free_port

    tenant = await create_tenant(app_pool, "uploads-lost")
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.no_answer(), time_scale=0.01)
    config = settings(tmp_path, recordings_dir=str(tmp_path / "messages"), recordings_upload=True,
                      switch_audio_base_url=f"http://127.0.0.1:{free_port()}")
    try:
        async with Service(config, database=DatabaseUrls(pg_db.app_url, pg_db.cache_url)) as service:
            served = Served(app_pool, tenant, service, emu)
            home = await _message_home(served, consent=True)
            result = await served.call(home)
            [recording] = emu.recordings
            assert recording.uploaded == 0  # no response
            assert any("trying to save a recording" in e for e in emu.errors)
            assert list((tmp_path / "messages").glob("iim-*.wav")) == []
            assert await served.outbox() == [missed(result, home)]
    finally:
        await emu.close()


def test_uploads_without_a_recordings_directory_refuse_the_start(tmp_path: Path) -> None:
    from iim.core.errors import ConfigError

    service = Service(settings(tmp_path, recordings_upload=True))
    with pytest.raises(ConfigError, match="IIM_RECORDINGS_UPLOAD needs IIM_RECORDINGS_DIR"):
        service._recorded_messages(None, None)  # type: ignore[arg-type]
