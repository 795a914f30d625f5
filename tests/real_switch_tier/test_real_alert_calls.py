"""Alert calls end to end on the real switch, with IIM and FreeSWITCH as if on two hosts.

IIM places the alarm's call through the switch to the owner (the IMS core, played by SIPp); the owner answers,
the call's IVR plays the prompt IIM rendered while the phone rang, and a key press (RFC 2833) or its absence
decides the incident. IIM's speech cache is on a file system the switch cannot see (a mount namespace of
IIM's own), and ``IIM_SWITCH_AUDIO_BASE_URL`` is set: the switch must fetch the prompt over HTTP. Before,
IIM handed the switch a path in its own cache: unreadable there, ``play_and_get_digits`` failed at once, every
try, and the owner who pressed 1 was never heard.
"""

from __future__ import annotations

import time
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

OWNERS = {"ack": ("+79002220001", "+79002220002", "+79002220003"),
          "silent": ("+79002220011", "+79002220012", "+79002220013"),
          "help": ("+79002220021", "+79002220022", "+79002220023")}


@pytest.fixture(scope="module")
def rigs(pg_db: PgDatabase, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AlarmRig]:
    tmp = tmp_path_factory.mktemp("alert-rigs")
    return {name: run_sync(alert_rig.household(pg_db, tmp, *numbers)) for name, numbers in OWNERS.items()}


@pytest.fixture(scope="module")
def iim(real_switch: RealSwitch, pg_db: PgDatabase, ports: Ports, rigs: dict[str, AlarmRig],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Iim]:
    served = start_iim(real_switch, pg_db, ports.iim_primary, tmp_path_factory.mktemp("iim"),
                       audio_over_http=True, own_filesystem=can_hide_directories())
    yield served
    stop_iim(served)


@pytest_asyncio.fixture
async def pool(pg_db: PgDatabase) -> AsyncIterator[Pool]:
    pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=2)
    yield pool
    await pool.close()


def _assert_fetched_over_http(iim: Iim, switch: RealSwitch) -> None:
    """Every prompt the switch played was a URL on IIM's HTTP site that it downloaded (once: the same prompt
    again is a cache hit) and IIM served; no path of IIM's host was ever handed to the switch."""
    log = switch.log_text()
    played = set(alert_rig.prompts_played(log))
    assert played, log[-4000:]
    for prompt in played:
        assert prompt.startswith(f"http_cache://http://127.0.0.1:{iim.http_port}/v1/audio/"), prompt
        assert f"URL {prompt.removeprefix('http_cache://')} downloaded" in log, log[-4000:]
    assert alert_rig.served_to_switch(iim.http_port) >= len(played), iim.log_text()[-3000:]
    assert iim.tts_cache is not None
    assert str(iim.tts_cache) not in log
    assert "Error Opening File" not in log
    assert "Failure opening playback file" not in log


async def test_the_owner_pressing_1_on_the_prompt_fetched_from_iim_acknowledges_the_alarm(
        real_switch: RealSwitch, iim: Iim, ports: Ports, rigs: dict[str, AlarmRig], pool: Pool,
        tmp_path: Path) -> None:
    rig = rigs["ack"]
    # Answers 2 s after ringing (the prompt is rendered by then), presses 1 while it plays.
    with sipp.core(tmp_path, ports.core, "core_answer_press_1.xml", answer_ms=2000):
        incident = await alert_rig.raise_alarm(pool, rig)
        done = await alert_rig.settled(pool, rig, incident)
    context = f"{done}\n{iim.log_text()[-3000:]}\n{real_switch.log_text()[-3000:]}"
    assert done.state == "acknowledged", context
    [call] = [a for a in done.actions if a["kind"] == "call"]
    assert (call["destination"], call["outcome"], call["detail"]) == (rig.owner, "acknowledge", "digit"), context
    audit = [line["action"] for line in done.audit]
    assert "incident.call" in audit
    assert audit[-1] == "incident.acknowledged"
    assert "incident.degraded" not in audit  # the owner heard the alarm's own prompt, not the generic one
    _assert_fetched_over_http(iim, real_switch)


async def test_an_owner_who_presses_nothing_gets_every_try_in_full_then_the_backup_is_texted(
        real_switch: RealSwitch, iim: Iim, ports: Ports, rigs: dict[str, AlarmRig], pool: Pool,
        tmp_path: Path) -> None:
    rig = rigs["silent"]
    with sipp.core(tmp_path, ports.core, "core_answer.xml", answer_ms=2000):
        started = time.monotonic()
        incident = await alert_rig.raise_alarm(pool, rig)
        done = await alert_rig.settled(pool, rig, incident)
        took = time.monotonic() - started
    context = f"{done}\n{iim.log_text()[-3000:]}\n{real_switch.log_text()[-3000:]}"
    [call] = [a for a in done.actions if a["kind"] == "call"]
    # "no_input": the switch's read timed out (read_result=timeout) on every try; a prompt it cannot play makes
    # it fail at once instead (read_result=failure: "invalid_input"), which is what the issue saw.
    assert (call["outcome"], call["detail"]) == ("no_input", "no_input"), context
    # The floor, not a speed: the callee was given every try's digit timeout before the alarm moved on.
    assert took >= alert_rig.TRIES * alert_rig.DIGIT_TIMEOUT_S, context
    assert rig.backup in done.sms_to, context  # the next step ran
    assert done.state == "exhausted", context
    _assert_fetched_over_http(iim, real_switch)


async def test_the_owner_pressing_2_for_help_escalates_to_the_next_step_at_once(
        real_switch: RealSwitch, iim: Iim, ports: Ports, rigs: dict[str, AlarmRig], pool: Pool,
        tmp_path: Path) -> None:
    rig = rigs["help"]
    with sipp.core(tmp_path, ports.core, "core_answer_press_2.xml", answer_ms=2000):
        incident = await alert_rig.raise_alarm(pool, rig)
        done = await alert_rig.settled(pool, rig, incident)
    context = f"{done}\n{iim.log_text()[-3000:]}\n{real_switch.log_text()[-3000:]}"
    [call] = [a for a in done.actions if a["kind"] == "call"]
    assert (call["outcome"], call["detail"]) == ("escalate", "digit"), context
    assert [a["kind"] for a in done.actions] == ["call", "sms"], context
    assert rig.backup in done.sms_to, context
    _assert_fetched_over_http(iim, real_switch)
