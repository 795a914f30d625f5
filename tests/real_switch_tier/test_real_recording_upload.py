"""A message left on a real FreeSWITCH that shares no directory with IIM (``IIM_RECORDINGS_UPLOAD``).

The switch records to IIM's signed upload URL (``http_cache://http://IIM/v1/recordings/...``); mod_http_cache
PUTs the WAV when ``record`` closes it. The caller speaks (SIPp streaming a 400 Hz tone, PCMU) and hangs up;
IIM keeps the upload in its own recordings directory -- never named to the switch -- announces it by SMS, and
the SMS's link serves the caller's audio: the tone, not silence."""

from __future__ import annotations

import asyncio
import io
import re
import wave
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from uuid import UUID

import aiohttp
import pytest

from policy_cache.db import DbRole, connect_pool, tenant_tx
from policy_cache.models import FallbackAction, RingMode
from tests import rtp, sipp
from tests.home_delivery_rig import build_home, create_tenant
from tests.pg import PgDatabase, opened, run_sync
from tests.real_switch import RealSwitch
from tests.real_switch_tier.conftest import Iim, Ports, start_iim, stop_iim

NUMBER = "79101130001"  # mobile only, 3 s, then a message
VOICE_HZ = 400.0  # 20 samples a period: a second of frames loops without a click
TALK_MS = 20000  # the greeting (Russian and English, then the tone), then some seconds of message


@pytest.fixture(scope="module")
def households(pg_db: PgDatabase) -> UUID:
    async def create() -> UUID:
        pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=1)
        try:
            tenant = await create_tenant(pool, "uploads")
            home = await build_home(pool, tenant, f"+{NUMBER}", speaker=False, ring_mode=RingMode.PHONE_ONLY,
                                    fallback=FallbackAction.RECORD_MESSAGE, recording_consent=True)
            async with tenant_tx(pool, tenant) as conn:  # nobody answers the mobile: 3 s of ringing is enough
                await conn.execute("UPDATE iim.policy SET phone_timeout_s = 3 WHERE subscriber_id = $1",
                                   home.subscriber_id)
            return tenant
        finally:
            await pool.close()

    return run_sync(create())


@pytest.fixture(scope="module")
def iim_recordings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("iim-own-recordings")


@pytest.fixture(scope="module")
def iim(real_switch: RealSwitch, pg_db: PgDatabase, ports: Ports, households: UUID, iim_recordings: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Iim]:
    served = start_iim(real_switch, pg_db, ports.iim_primary, tmp_path_factory.mktemp("iim"), audio_over_http=True,
                       env={"IIM_RECORDINGS_DIR": str(iim_recordings), "IIM_RECORDINGS_UPLOAD": "true"})
    yield served
    stop_iim(served)


async def _message_sms(pg_db: PgDatabase, tenant: UUID, timeout_s: float = 20.0) -> tuple[str, str]:
    """(outbox key, clear body) of the tenant's message SMS, once IIM queued it."""
    pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=1)
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            async with tenant_tx(pool, tenant, readonly=True) as conn:
                rows = await conn.fetch("SELECT tenant_id, key, body, body_key FROM iim.sms_outbox "
                                        "WHERE key LIKE 'message:%' OR key LIKE 'missed-call:%'")
            if rows:
                [row] = rows
                body = await opened(pool, row)
                assert body is not None
                return row["key"], body
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("no SMS for the message")
            await asyncio.sleep(0.2)
    finally:
        await pool.close()


def _tone_frames(data: bytes) -> tuple[int, int, int]:
    """(frames of the voice tone, frames of silence, all frames) in a 16-bit mono WAV, 20 ms each."""
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        rate = w.getframerate()
        raw = w.readframes(w.getnframes())
    samples = [int.from_bytes(raw[i:i + 2], "little", signed=True) for i in range(0, len(raw), 2)]
    step = rate // 50
    frames = [samples[i:i + step] for i in range(0, len(samples) - step + 1, step)]
    if rate != rtp.RATE:  # the tone detector works at 8 kHz
        frames = [f[::rate // rtp.RATE] for f in frames]
    voice = sum(1 for f in frames if rtp.tone_share(f, VOICE_HZ) >= 0.8)
    silent = sum(1 for f in frames if max(map(abs, f), default=0) < 50)
    return voice, silent, len(frames)


async def test_a_message_left_on_a_switch_elsewhere_arrives_by_put_is_kept_and_its_link_plays_the_caller(
        real_switch: RealSwitch, iim: Iim, pg_db: PgDatabase, households: UUID, iim_recordings: Path,
        ports: Ports, tmp_path: Path) -> None:
    (tmp_path / "caller-voice.ulaw").write_bytes(b"".join(islice(rtp.tone(VOICE_HZ), 50)))
    switch_dir = real_switch.base / "recordings"
    before = set(switch_dir.iterdir())
    with sipp.core(tmp_path, ports.core, "core_ring.xml"):
        result = await asyncio.to_thread(sipp.call, tmp_path, real_switch.external_sip_port, NUMBER,
                                         scenario="caller_speaks.xml", hold_ms=TALK_MS)
    context = result.output + real_switch.log_text()[-6000:] + iim.log_text()[-4000:]
    assert result.finals == [200], context
    key, body = await _message_sms(pg_db, households)
    assert key.startswith("message:"), (body, context)  # kept and announced, not the plain missed call
    call_uuid = key.removeprefix("message:")

    # The switch recorded to IIM's URL, not to a path; nothing of it is in the switch's recordings directory.
    log = real_switch.log_text()
    upload = re.search(rf"record\(http_cache://(http://127\.0\.0\.1:{iim.http_port}/v1/recordings/{households}/"
                       rf"{call_uuid}\.wav\?exp=\d+&sig=[0-9a-f]{{64}})", log)
    assert upload is not None, context
    assert "trying to save" not in log  # mod_http_cache's upload error
    assert set(switch_dir.iterdir()) == before
    kept = iim_recordings / f"iim-{call_uuid}.wav"
    assert kept.is_file()
    assert '"msg": "recording uploaded"' in iim.log_text()

    link = re.search(r"http://\S+", body)
    assert link is not None, body
    async with aiohttp.ClientSession() as http, http.get(link.group(0)) as resp:
        assert resp.status == 200
        audio = await resp.read()
    assert audio == kept.read_bytes()
    voice, silent, frames = _tone_frames(audio)
    assert frames >= 5 * 50, frames  # TALK_MS less the greeting
    assert voice >= 0.9 * frames, (voice, silent, frames)  # the caller's voice, not silence
    stated = re.search(r"a message was left \((\d+) s\)", body)  # record_ms, as the switch reported it
    assert stated is not None, body
    assert abs(int(stated.group(1)) - frames / 50) <= 1, (body, frames)

    # The upload URL, as anyone reading the switch's log sees it, is spent: a replay changes nothing.
    async with aiohttp.ClientSession() as http, http.put(upload.group(1), data=audio[:44] + bytes(8000)) as resp:
        assert (resp.status, await resp.text()) == (404, "no such recording")
    assert kept.read_bytes() == audio

    # What the README warns of: the switch keeps its own copy in mod_http_cache's directory (a cache entry for
    # the URL) until the cache replaces it (max-urls) or the switch restarts; IIM's retention cannot reach it.
    copies = [p for p in (real_switch.base / "cache").rglob("*.wav") if p.read_bytes() == audio]
    assert len(copies) == 1, sorted(map(str, (real_switch.base / "cache").rglob("*")))
