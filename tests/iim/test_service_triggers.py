"""Call and SMS triggers through ``iim serve``'s own wiring (settings -> service -> intake -> store -> worker ->
executor): real PostgreSQL, the FreeSWITCH emulator on both ESL sides (our outbound server takes the child's
call, the inbound link places the announcement), the SMPP simulator delivering the MO SMS.

A household's ``call_announce`` scenario, set through the admin API, announces on the kitchen speaker when the
child calls while the home is away; a stranger's call starts nothing. An ``sms_keyword`` scenario answers an SMS
"SOS". With PostgreSQL stopped for longer than a transaction's 10 s deadline, the child's call is still routed at
once and its announcement still made, once, after PostgreSQL is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fs_app.testing import CallResult, CallSpec, FreeSwitchEmulator, TargetBehaviour
from iim.scenarios.templates import CALL_ANNOUNCE, SMS_KEYWORD
from iim.service import DatabaseUrls, Service
from iim.settings import Settings
from iim.sms.smsc_sim import SmscProcess
from policy_cache import audit, registry
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from policy_cache.models import BindingCreate, BindingRole, HouseholdUpdate, SubscriberCreate
from tests.alarm_rig import AlarmRig, build_rig
from tests.pg import TEST_MASTER_KEY_ENV, PgDatabase, opened, private_pg

pytestmark = pytest.mark.timeout(180)

ESL_PASSWORD = "service-triggers-esl-secret"
ADMIN_TOKEN = "service-triggers-admin-token"
GW = "sofia/gateway/ims/{}"
_numbers = itertools.count(1)

#: "My child calls while I am away -> announce on the kitchen speaker": the shipped template's trigger and
#: conditions, its announcement placed on the home's SIP speakers (answered = heard).
SPEAKER_ANNOUNCE = {
    "name": CALL_ANNOUNCE.name,
    **{k: v for k, v in CALL_ANNOUNCE.model_dump(mode="json").items() if k in ("trigger", "conditions")},
    "steps": [{"action": "call", "to": "home", "message": "{sender} is calling {household}.", "ring_s": 20}],
    "enabled": True,
}


@pytest.fixture(autouse=True)
def _service_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's secrets, as an operator provides them: the ESL password, an admin token, the tests' master
    key (the test reads the sealed SMS bodies with it)."""
    monkeypatch.setenv("IIM_FS_PASSWORD", ESL_PASSWORD)
    table = {hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest(): {"actor": "noc", "role": "admin"}}
    monkeypatch.setenv("IIM_TEST_ADMIN_TOKENS", json.dumps(table))
    monkeypatch.setenv("IIM_ADMIN_TOKENS_REF", "env:IIM_TEST_ADMIN_TOKENS")
    monkeypatch.delenv("IIM_OIDC_ISSUER", raising=False)
    for name, value in TEST_MASTER_KEY_ENV.items():
        monkeypatch.setenv(name, value)


@dataclass
class Live:
    service: Service
    rig: AlarmRig
    child: str
    pool: Pool
    emu: FreeSwitchEmulator
    http: aiohttp.ClientSession
    smsc: SmscProcess | None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.service.running.http_port}"

    @property
    def speaker(self) -> str:
        """The kitchen speaker's dial string (``IIM_SPEAKER_ENDPOINT`` ``user/{aor}``)."""
        return f"user/speaker-{self.rig.tenant_id.hex[:6]}@iim.local"

    async def presence_words(self, outcome: str) -> float:
        """``iim_presence_words_total{outcome,source="registration"}`` as ``/metrics`` shows it."""
        async with self.http.get(self.api + "/metrics") as resp:
            text = await resp.text()
        pattern = rf'^iim_presence_words_total\{{outcome="{outcome}",source="registration"\}} (\S+)$'
        match = re.search(pattern, text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(method, self.api + path, json=body,
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None

    async def install(self, scenario: dict[str, Any]) -> None:
        """The household's scenario, as an operator sets it (``POST /v1/tenants/T/scenarios``)."""
        status, body = await self.request("POST", f"/v1/tenants/{self.rig.tenant_id}/scenarios",
                                          {**scenario, "household_id": str(self.rig.household_id)})
        assert status == 201, body

    async def call(self, caller: str) -> CallResult:
        """A call to the owner from ``caller`` (national form, as the switch presents it), over outbound ESL."""
        return await self.emu.place_call("127.0.0.1", self.service.outbound.port, CallSpec(
            destination=self.rig.owner.removeprefix("+"), caller_id_number="8" + caller.removeprefix("+7")))

    async def rows(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        await audit.flush_pending(self.pool)
        async with tenant_tx(self.pool, self.rig.tenant_id) as conn:
            return [dict(r) for r in await conn.fetch(sql, *args)]

    async def incidents(self, hazard: str) -> list[dict[str, Any]]:
        return await self.rows("SELECT id, sender, state::text AS state, first_event_id, scenario->>'name' AS name "
                               "FROM iim.incident WHERE hazard = $1 ORDER BY opened_at", hazard)

    async def settled(self, hazard: str, timeout: float = 30.0) -> dict[str, Any]:
        """The one incident of ``hazard`` once it has ended."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = await self.incidents(hazard)
            if found and found[0]["state"] not in ("open", "notifying"):
                [one] = found
                return one
            assert asyncio.get_running_loop().time() < deadline, f"no ended {hazard} incident: {found}"
            await asyncio.sleep(0.1)

    async def trigger_count(self, kind: str, result: str) -> float:
        """``iim_scenario_triggers_total{kind,result}`` as ``/metrics`` shows it."""
        async with self.http.get(self.api + "/metrics") as resp:
            text = await resp.text()
        pattern = rf'^iim_scenario_triggers_total\{{kind="{kind}",result="{result}"\}} (\S+)$'
        match = re.search(pattern, text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0


async def until(what: str, check: Any, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not reached in {timeout} s"
        await asyncio.sleep(0.1)


async def household(pool: Pool, tmp_path: Path) -> tuple[AlarmRig, str]:
    """The alarm rig's household (away; owner, backup, security; a SIP kitchen speaker; home network 127.0.0.0/8,
    where the emulator's registrations come from) and a child, Masha, bound to it as a member."""
    n = next(_numbers)
    rig = await build_rig(pool, tmp_path, name=f"triggers-{n}", owner=f"+7906{n:04d}001", backup=f"+7906{n:04d}002",
                          security=f"+7906{n:04d}003")
    child = f"+7906{n:04d}004"
    async with tenant_tx(pool, rig.tenant_id) as conn:
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=child, display_name="Masha"),
                                    actor="test")
        await registry.create(conn, registry.BINDING, BindingCreate(
            subscriber_id=sub.id, household_id=rig.household_id, role=BindingRole.MEMBER, priority=15), actor="test")
        await registry.update(conn, registry.HOUSEHOLD, rig.household_id,
                              HouseholdUpdate(home_networks=["127.0.0.0/8"]), actor="test")
    return rig, child


@asynccontextmanager
async def live_service(urls: DatabaseUrls, pool: Pool, tmp_path: Path, *, smsc: SmscProcess | None = None,
                       **overrides: Any) -> AsyncIterator[Live]:
    """``iim serve`` as the Service object with one FreeSWITCH node (the emulator), the scenario worker and,
    with ``smsc``, the SMPP account at the simulator."""
    rig, child = await household(pool, tmp_path)
    emu = FreeSwitchEmulator(time_scale=1.0, default_target=TargetBehaviour.answer(after_ms=100, hangup_after_ms=200))
    inbound = await emu.start_inbound(password=ESL_PASSWORD)
    values: dict[str, Any] = {
        "esl_port": 0, "http_port": 0, "bridge_enabled": False, "data_dir": str(tmp_path / "pg"),
        "fs_nodes": [{"host": "127.0.0.1", "port": inbound.port, "name": "fs1"}],
        "master_key_ref": TEST_MASTER_KEY_ENV["IIM_MASTER_KEY_REF"], "job_heartbeat_timeout_s": 2.0}
    if smsc is not None:
        values.update(smpp_host="127.0.0.1", smpp_port=smsc.port)
    values.update(overrides)
    try:
        async with Service(Settings(**values), database=urls) as service, aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=60)) as http:
            live = Live(service, rig, child, pool, emu, http, smsc)

            async def ready() -> bool:
                policy = service.running.policy
                return (all(c.connected for c in service.inbound) and policy is not None
                        and policy.cache.lookup(rig.owner) is not None)
            await until("the switch connected and the owner routable", ready)
            # The kitchen speaker registers as it does all day, from the home network, and answers its
            # announcements (the emulator's default for a registered user). A fixed device says nothing about who
            # is home: this away household stays away, so call_announce ("while I am away") still applies.
            silent = await live.presence_words("silent")

            async def judged() -> bool:  # (re-)REGISTER until heard: the event subscription may still be on its way
                emu.register_user(f"speaker-{rig.tenant_id.hex[:6]}", "iim.local", network_ip="127.0.0.1")
                await asyncio.sleep(0.2)
                return await live.presence_words("silent") > silent
            await until("the speaker's registration judged (no claim)", judged)
            yield live
    finally:
        await emu.close()


def urls_of(db: PgDatabase) -> DatabaseUrls:
    return DatabaseUrls(db.app_url, db.cache_url)


# -- item 4: a call from the child announces on the kitchen speaker; a stranger's call does not ----------------

async def test_a_childs_call_through_the_service_announces_on_the_kitchen_speaker_and_a_strangers_does_not(
        pg_db: PgDatabase, app_pool: Pool, tmp_path: Path) -> None:
    async with live_service(urls_of(pg_db), app_pool, tmp_path) as live:
        assert live.emu.is_registered(live.speaker.removeprefix("user/").partition("@")[0], "iim.local")
        assert await live.rows("SELECT subject FROM iim.presence_claim") == []  # its registration claimed nothing
        await live.install(SPEAKER_ANNOUNCE)
        no_scenario = await live.trigger_count("call", "no_scenario")
        stranger = await live.call("+79169990000")
        assert stranger.bridged_to == GW.format(live.rig.owner)  # routed as usual

        async def stranger_judged() -> bool:
            return await live.trigger_count("call", "no_scenario") > no_scenario
        await until("the stranger's call judged", stranger_judged)
        assert await live.incidents("incoming_call") == []
        assert live.emu.originates_to(live.speaker) == []

        result = await live.call(live.child)
        assert result.bridged_to == GW.format(live.rig.owner)  # the call itself goes on as routing decided
        incident = await live.settled("incoming_call")
        assert incident["state"] == "acknowledged"  # the speaker answered: the announcement was heard
        assert (incident["sender"], incident["first_event_id"], incident["name"]) == (
            live.child, f"call:{result.uuid}", "call_announce")
        # The switch's side: one originate to the speaker, for this incident; nobody's phone is called.
        [originate] = live.emu.originates_to(live.speaker)
        assert originate.variables["iim_incident_id"] == str(incident["id"])
        assert [o for o in live.emu.originates if o.destination.startswith("+")] == []
        lines = await live.rows("SELECT actor, action, detail FROM iim.audit_log WHERE entity = 'incident' "
                                "AND entity_id = $1 ORDER BY id", str(incident["id"]))
        actions = [(r["actor"], r["action"]) for r in lines]
        assert actions[0] == ("scenario-trigger", "incident.triggered")
        assert lines[0]["detail"]["sender"] == live.child
        assert lines[0]["detail"]["presence"] == "away"
        assert ("scenario-engine", "incident.call") in actions
        [call] = await live.rows("SELECT destination, outcome FROM iim.incident_action WHERE incident_id = $1",
                                 incident["id"])
        assert call == {"destination": f"sip:speaker-{live.rig.tenant_id.hex[:6]}@iim.local", "outcome": "answered"}


# -- item 4: an MO SMS with a keyword from the SMPP peer runs sms_keyword's actions ---------------------------

@pytest.fixture
async def smsc(tmp_path: Path) -> AsyncIterator[SmscProcess]:
    proc = SmscProcess(tmp_path / "smsc.jsonl")
    async with proc.running():
        yield proc


async def test_an_sos_sms_from_the_smpp_peer_texts_the_home_and_the_backup_and_calls_the_backup(
        pg_db: PgDatabase, app_pool: Pool, tmp_path: Path, smsc: SmscProcess) -> None:
    async with live_service(urls_of(pg_db), app_pool, tmp_path, smsc=smsc) as live:
        rig = live.rig
        await live.install({**SMS_KEYWORD.model_dump(mode="json"), "enabled": True})
        live.emu.targets[GW.format(rig.backup)] = TargetBehaviour.answer(after_ms=100, dtmf="1")

        async def bound() -> bool:
            policy = live.service.running.policy
            return policy is not None and policy.smsc is not None and policy.smsc.ready
        await until("the SMPP account bound", bound)
        assert await smsc.deliver(destination=rig.owner[1:], source=live.child[1:], source_ton=1,
                                  text="Mum, SOS: I fell") == 0
        incident = await live.settled("incoming_sms")
        assert (incident["sender"], incident["name"], incident["state"]) == (live.child, "sms_keyword", "acknowledged")
        assert incident["first_event_id"].startswith("sms:")
        # The backup's phone rang through the switch and confirmed with 1.
        assert len(live.emu.originates_to(rig.backup)) == 1
        # Texts: the household told (no connector: by SMS to owner and member), the backup warned; all through the
        # SMPP peer.
        sealed = await live.rows("SELECT tenant_id, key, msisdn, body, body_key FROM iim.sms_outbox "
                                 "WHERE incident_id = $1 ORDER BY msisdn", incident["id"])
        texts = {r["msisdn"]: await opened(live.pool, r) for r in sealed}
        assert set(texts) == {rig.owner, rig.backup, live.child}
        assert texts[rig.backup].startswith("Masha asked Flat 12 for help by SMS at ")
        assert texts[rig.owner].startswith("Masha asked Flat 12 for help by SMS at ")

        async def submitted() -> bool:
            return {rig.owner[1:], rig.backup[1:], live.child[1:]} <= {r.dest.lstrip("+") for r in smsc.records()}
        await until("the texts submitted to the SMSC", submitted)
        [line] = await live.rows("SELECT detail FROM iim.audit_log WHERE action = 'incident.triggered' "
                                 "AND entity_id = $1", str(incident["id"]))
        assert (line["detail"]["trigger"], line["detail"]["keyword"]) == ("sms", "sos")
        assert "fell" not in json.dumps(line["detail"])  # the SMS text is matched, never stored


# -- gap: PostgreSQL away past the old 10 s window: the trigger waits and runs once it is back ----------------

@pytest.mark.timeout(240)
async def test_with_postgresql_stopped_past_ten_seconds_the_call_is_routed_and_announced_once_it_is_back(
        tmp_path: Path) -> None:
    async with private_pg() as pg:
        assert pg.db is not None
        pool = await connect_pool(pg.db.app_url, role=DbRole.APP, min_size=1, max_size=2)
        try:
            async with live_service(urls_of(pg.db), pool, tmp_path, trigger_max_age_s=120.0,
                                    trigger_retry_max_s=2.0) as live:
                await live.install(SPEAKER_ANNOUNCE)
                retried = await live.trigger_count("call", "retried")
                expired = await live.trigger_count("call", "expired")
                await pg.stop()
                began = time.monotonic()
                result = await live.call(live.child)
                routed_in = time.monotonic() - began
                assert result.bridged_to == GW.format(live.rig.owner)
                assert routed_in < 5.0, f"the call waited {routed_in:.1f} s for the trigger"
                await asyncio.sleep(max(0.0, 12.0 - (time.monotonic() - began)))  # past the old 10 s window
                assert await live.trigger_count("call", "retried") > retried  # held, tried again
                assert live.emu.originates_to(live.speaker) == []
                await pg.start()

                async def announced() -> bool:
                    return len(live.emu.originates_to(live.speaker)) > 0
                await until("the announcement after PostgreSQL came back", announced, timeout=60)
                await pool.expire_connections()
                incident = await live.settled("incoming_call", timeout=60)
                assert (incident["first_event_id"], incident["state"]) == (f"call:{result.uuid}", "acknowledged")
                await asyncio.sleep(2.0)  # a second try of the same offer would have shown by now
                assert len(await live.incidents("incoming_call")) == 1
                assert len(live.emu.originates_to(live.speaker)) == 1
                assert await live.trigger_count("call", "expired") == expired
        finally:
            await pool.close()
