"""A visitor at the door, heard by whoever answers: the doorphone template end to end on the real switch.

The doorbell event opens an incident; IIM calls the owner through the switch (the IMS core, played by one of the
tests' own phones, :class:`tests.sip_phone.SipPhone`); once the owner answers and the prompt has played, the call
is bridged to the door, a second phone registered on the switch's internal profile as the doorphone (a directory
user, digest auth, as an operator provisions one). Both phones talk plain RTP, each its own tone: the owner must
hear the door's tone and the door the owner's, through FreeSWITCH's media path, not only the SIP signalling.

Keys: the owner presses 5 (RFC 4733) during the conversation. A door that opens on a key (``dtmf_open``) gets it
as a telephone event on its leg; any other door does not (IIM sets ``bridge_filter_dtmf`` on the owner's leg).

An offline door (provisioned, never registered): the owner hears the prompt, the bridge fails at once, and that
answer does not count; the scenario goes on. Before, it acknowledged the incident: nobody talked to the visitor,
and nobody offered them the message either.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pytest
import pytest_asyncio

from iot_bridge.events import DeviceEvent, body_fingerprint
from iot_bridge.intake import KnownDevice, accept_event
from policy_cache import registry
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from policy_cache.models import DeviceCapability, DeviceUpdate
from tests import sip_client
from tests.alarm_rig import AlarmRig, build_rig
from tests.kamailio_edge import ha1
from tests.pg import PgDatabase, run_sync
from tests.real_switch import RealSwitch, free_port
from tests.real_switch_tier import alert_rig
from tests.real_switch_tier.conftest import Iim, Ports, start_iim, stop_iim
from tests.sip_phone import SipPhone

SWITCH_DOMAIN = "127.0.0.1"  # IIM_FS_DOMAIN of benchmarks._realfs: the directory's domain
OWNER_HZ, DOOR_HZ = 400.0, 1000.0  # on the 50 Hz grid, far from each other and from every DTMF frequency
HEARD_FRAMES = 25  # half a second of the other party's voice
#: how long keys have to cross the bridge before the door is asked what it got (media keeps flowing meanwhile)
KEY_WAIT_S = 3.0


@dataclass(frozen=True)
class Home:
    rig: AlarmRig
    door_user: str
    door_password: str
    door_id: UUID


async def _home(db: PgDatabase, tmp: Path, name: str, owner: str, *, dtmf_open: bool) -> Home:
    """:func:`tests.alarm_rig.build_rig`'s household, its doorphone a user of the switch's directory."""
    pool = await connect_pool(db.app_url, role=DbRole.APP, min_size=1, max_size=1)
    try:
        rig = await build_rig(pool, tmp, name=name, owner=owner, backup=owner[:-1] + "8", security=owner[:-1] + "9")
        async with tenant_tx(pool, rig.tenant_id) as conn:
            door_id = await conn.fetchval("SELECT id FROM iim.device WHERE external_id = $1", rig.doorphone)
            capabilities = {DeviceCapability.SIP} | ({DeviceCapability.DTMF_OPEN} if dtmf_open else set())
            await registry.update(conn, registry.DEVICE, door_id, DeviceUpdate(
                sip_uri=f"sip:{rig.doorphone}@{SWITCH_DOMAIN}", capabilities=frozenset(capabilities)), actor="test")
    finally:
        await pool.close()
    return Home(rig, rig.doorphone, f"Door-{rig.doorphone}-secret", door_id)


@pytest.fixture(scope="module")
def homes(pg_db: PgDatabase, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Home]:
    tmp = tmp_path_factory.mktemp("door-rigs")
    return {"opens": run_sync(_home(pg_db, tmp, "door-opens", "+79002240001", dtmf_open=True)),
            "plain": run_sync(_home(pg_db, tmp, "door-plain", "+79002240011", dtmf_open=False)),
            "offline": run_sync(_home(pg_db, tmp, "door-offline", "+79002240021", dtmf_open=False))}


@pytest.fixture(scope="module")
def doors(real_switch: RealSwitch, homes: dict[str, Home]) -> dict[str, Home]:
    """Each door provisioned on the switch as the README says: one directory file, ``reloadxml``."""
    for home in homes.values():
        digest = ha1(home.door_user, SWITCH_DOMAIN, home.door_password)
        (real_switch.base / "conf" / "directory" / "iim" / f"{home.door_user}.xml").write_text(
            f'<include>\n  <user id="{home.door_user}">\n    <params>\n'
            f'      <param name="a1-hash" value="{digest}"/>\n    </params>\n  </user>\n</include>\n')
    assert "+OK" in real_switch.api("reloadxml")
    return homes


@pytest.fixture(scope="module")
def iim(real_switch: RealSwitch, pg_db: PgDatabase, ports: Ports, doors: dict[str, Home],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Iim]:
    served = start_iim(real_switch, pg_db, ports.iim_primary, tmp_path_factory.mktemp("iim"), audio_over_http=True)
    yield served
    stop_iim(served)


@pytest_asyncio.fixture
async def pool(pg_db: PgDatabase) -> AsyncIterator[Pool]:
    pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=2)
    yield pool
    await pool.close()


async def _register(switch: RealSwitch, home: Home, port: int) -> None:
    """The door registers on the internal profile (digest), its contact the phone playing it."""
    _, final = await asyncio.to_thread(
        sip_client.Udp("127.0.0.1").register, ("127.0.0.1", switch.internal_sip_port), home.door_user,
        home.door_password, SWITCH_DOMAIN, contact=f"sip:{home.door_user}@127.0.0.1:{port}")
    assert final is not None
    assert final.code == 200, final


async def _ring_the_doorbell(pool: Pool, home: Home) -> UUID:
    rig = home.rig
    raw = rig.event("doorbell", device=rig.doorphone)
    event = DeviceEvent.model_validate_json(raw)
    device = KnownDevice(rig.tenant_id, home.door_id, rig.household_id, rig.doorphone, "doorphone")
    outcome = await accept_event(pool, device, event, fingerprint=body_fingerprint(raw), channel="device",
                                 msg_id=None)
    assert outcome.incident_id is not None
    return outcome.incident_id


@dataclass
class Visit:
    """What each side heard, and IIM's record of the incident."""

    owner_heard_door: int
    door_heard_owner: int
    door_heard_owner_after_key: int
    door_keys: str
    owner_keys: str
    incident: alert_rig.Incident
    context: str


async def _visit(switch: RealSwitch, iim: Iim, ports: Ports, pool: Pool, home: Home) -> Visit:
    """The doorbell rings; the owner answers, talks, presses 5, and the visitor hangs up."""
    door_port = free_port()
    async with (SipPhone("127.0.0.1", ports.core, tone_hz=OWNER_HZ, answer_ms=1000, user="owner") as owner,
                SipPhone("127.0.0.1", door_port, tone_hz=DOOR_HZ, user=home.door_user) as door):
        await _register(switch, home, door_port)
        incident = await _ring_the_doorbell(pool, home)

        def context() -> str:
            return (f"owner: {owner.invites} INVITE(s), {len(owner.received)} packets; door: {door.invites} "
                    f"INVITE(s), {len(door.received)} packets\n{iim.log_text()[-3000:]}\n{switch.log_text()[-5000:]}")

        try:
            await owner.answered(timeout=30)
            await door.answered(timeout=30)  # after the prompt: IIM bridges the owner's call to the door
        except TimeoutError:
            pytest.fail(f"the call never reached both phones\n{context()}", pytrace=False)
        owner_heard = await owner.until_heard(DOOR_HZ, HEARD_FRAMES, timeout=15)
        door_heard = await door.until_heard(OWNER_HZ, HEARD_FRAMES, timeout=15)
        await owner.press("5")
        await asyncio.sleep(KEY_WAIT_S)
        door_heard_after = door.heard(OWNER_HZ) - door_heard
        door_keys, owner_keys = door.keys(), owner.keys()
        assert await door.hang_up() == 200, context()
        try:
            await owner.ended(timeout=15)  # the bridge ends with the door's leg: the owner's call is hung up
        except TimeoutError:
            pytest.fail(f"the owner's call outlived the door's\n{context()}", pytrace=False)
        done = await alert_rig.settled(pool, home.rig, incident)
        return Visit(owner_heard, door_heard, door_heard_after, door_keys, owner_keys, done, context())


def _assert_the_visit_was_a_conversation(visit: Visit, home: Home) -> None:
    context = f"{visit}\n{visit.context}"
    assert visit.owner_heard_door >= HEARD_FRAMES, context  # the visitor is heard by the answering phone
    assert visit.door_heard_owner >= HEARD_FRAMES, context  # and the visitor hears the owner
    # The media path stayed up while the key was (or was not) passed: a missing key is not a dead bridge.
    assert visit.door_heard_owner_after_key >= HEARD_FRAMES, context
    assert visit.incident.state == "acknowledged", context
    [owner_call] = [a for a in visit.incident.actions if a["kind"] == "call" and a["destination"] == home.rig.owner]
    assert (owner_call["outcome"], owner_call["detail"]) == ("answered", "bridged"), context
    bridged = [line["detail"] for line in visit.incident.audit if line["action"] == "incident.call"
               and line["detail"].get("detail") == "bridged"]
    assert bridged, context
    assert bridged[0]["bridged_to"] == f"sip:{home.door_user}@{SWITCH_DOMAIN}", context


async def test_the_owner_hears_the_visitor_and_a_door_that_opens_on_a_key_gets_the_owners_key(
        real_switch: RealSwitch, iim: Iim, ports: Ports, doors: dict[str, Home], pool: Pool) -> None:
    home = doors["opens"]
    visit = await _visit(real_switch, iim, ports, pool, home)
    _assert_the_visit_was_a_conversation(visit, home)
    assert visit.door_keys == "5", f"{visit}\n{visit.context}"
    assert visit.owner_keys == ""


async def test_a_door_that_does_not_open_on_a_key_never_gets_the_owners_key_but_the_visitor_is_heard(
        real_switch: RealSwitch, iim: Iim, ports: Ports, doors: dict[str, Home], pool: Pool) -> None:
    home = doors["plain"]
    visit = await _visit(real_switch, iim, ports, pool, home)
    _assert_the_visit_was_a_conversation(visit, home)
    assert visit.door_keys == "", f"{visit}\n{visit.context}"


async def test_an_owner_who_answers_while_the_door_is_offline_has_not_taken_the_visitor(
        real_switch: RealSwitch, iim: Iim, ports: Ports, doors: dict[str, Home], pool: Pool) -> None:
    home = doors["offline"]  # provisioned on the switch, never registered: the bridge fails at once
    async with SipPhone("127.0.0.1", ports.core, tone_hz=OWNER_HZ, answer_ms=1000, user="owner") as owner:
        incident = await _ring_the_doorbell(pool, home)
        try:
            await owner.answered(timeout=30)
            await owner.ended(timeout=30)  # the prompt, a failed bridge, the call ended by IIM
        except TimeoutError:
            pytest.fail(f"the owner's call did not end\n{iim.log_text()[-3000:]}\n{real_switch.log_text()[-4000:]}",
                        pytrace=False)
        done = await alert_rig.settled(pool, home.rig, incident)
    context = f"{done}\n{iim.log_text()[-3000:]}\n{real_switch.log_text()[-4000:]}"
    [owner_call] = [a for a in done.actions if a["kind"] == "call" and a["destination"] == home.rig.owner]
    assert (owner_call["outcome"], owner_call["detail"]) == ("failed", "bridge_failed"), context
    # Nobody took the visitor: the scenario went on (a message at the door, then the owner is told), not ended.
    assert [a["kind"] for a in done.actions if a["kind"] == "record"] == ["record"], context
    assert done.state == "exhausted", context
    assert home.rig.owner in done.sms_to, context
