"""With speech down, an alert call on the real switch plays the generic prompt, fetched from IIM over HTTP.

IIM's espeak-ng library is gone (``IIM_TTS_LIBRARY`` names no file), so the alarm's own prompt cannot be
rendered; the call is placed with the generic prompt (the IVR's instructions from shipped recordings, no
private text), which the switch fetches from IIM's HTTP site like any prompt. Before, the switch was handed
a path in IIM's cache (unreadable from another host), or, with FreeSWITCH's TTS, ``say:`` with a ``flite``
the image lacks: either way ``play_and_get_digits`` failed at once and the alarm was exhausted in seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from policy_cache.db import DbRole, Pool, connect_pool
from tests import sipp
from tests.alarm_rig import AlarmRig
from tests.pg import PgDatabase, run_sync
from tests.real_switch import RealSwitch
from tests.real_switch_tier import alert_rig
from tests.real_switch_tier.conftest import Iim, Ports, can_hide_directories, start_iim, stop_iim


@pytest.fixture(scope="module")
def rig(pg_db: PgDatabase, tmp_path_factory: pytest.TempPathFactory) -> AlarmRig:
    return run_sync(alert_rig.household(pg_db, tmp_path_factory.mktemp("rig"), "+79002230001", "+79002230002",
                                        "+79002230003"))


@pytest.fixture(scope="module")
def iim(real_switch: RealSwitch, pg_db: PgDatabase, ports: Ports, rig: AlarmRig,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Iim]:
    workdir = tmp_path_factory.mktemp("iim")
    served = start_iim(real_switch, pg_db, ports.iim_primary, workdir, audio_over_http=True,
                       own_filesystem=can_hide_directories(),
                       env={"IIM_TTS_LIBRARY": str(workdir / "libespeak-ng-removed.so")})
    yield served
    stop_iim(served)


@pytest_asyncio.fixture
async def pool(pg_db: PgDatabase) -> AsyncIterator[Pool]:
    pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=2)
    yield pool
    await pool.close()


async def test_with_speech_down_the_owner_hears_the_generic_prompt_from_iim_and_pressing_1_acknowledges(
        real_switch: RealSwitch, iim: Iim, ports: Ports, rig: AlarmRig, pool: Pool, tmp_path: Path) -> None:
    with sipp.core(tmp_path, ports.core, "core_answer_press_1.xml", answer_ms=1000):
        incident = await alert_rig.raise_alarm(pool, rig)
        done = await alert_rig.settled(pool, rig, incident)
    log = real_switch.log_text()
    context = f"{done}\n{iim.log_text()[-3000:]}\n{log[-3000:]}"
    assert done.state == "acknowledged", context
    [call] = [a for a in done.actions if a["kind"] == "call"]
    assert (call["outcome"], call["detail"]) == ("acknowledge", "digit"), context
    [note] = [line["detail"] for line in done.audit if line["action"] == "incident.degraded"]
    assert (note["degraded"], note["reason"]) == ("prompt", "unavailable")
    [played] = alert_rig.prompts_played(log)
    assert played.startswith(f"http_cache://http://127.0.0.1:{iim.http_port}/v1/audio/"), played
    assert f"URL {played.removeprefix('http_cache://')} downloaded" in log
    assert alert_rig.served_to_switch(iim.http_port) >= 1
    assert iim.tts_cache is not None
    assert str(iim.tts_cache) not in log
    for private in ("Flat 12", "Kitchen smoke sensor", "say:", "Smoke at"):
        assert private not in log  # nothing of the alarm's own text reached the switch
