"""``sip-tests/``: named SIPp suites through Kamailio -> FreeSWITCH -> ``iim serve``, each judged on the SIP
outcome the caller saw and on IIM's own rows.

One rig runs everything an operator runs: the Kamailio edge (``kamailio/kamailio.cfg``) in front of a real
FreeSWITCH 1.10.12 (``freeswitch-conf/`` and ``dialplan/``), ``iim serve`` on the dialplan's socket, the IMS
core played by SIPp, and speakers registered on the switch's internal profile and played by SIPp. PostgreSQL
is the embedded server of the tests (``tests/pg.py``); the households the suites call are created through
IIM's registry before IIM loads its cache (:data:`HOMES`).

Each suite places its call(s) at the edge as a trunk would and checks, for every call:

- the SIP outcome: SIPp's ``FINAL <code>`` per call (``tests/sipp.py``);
- IIM's rows: the ``call.routed`` audit line (route, ring groups, fallback), the ``call ended`` log line's
  hangup cause, the message recorded by the switch (``iim-<call uuid>.wav``) and the missed-call SMS in
  ``iim.sms_outbox``, each present or absent as the household's policy says.

Two entry points share the table: ``sip-tests/run`` (:func:`main`: ``--list``, ``--suite``, ``--rate``,
``--calls``; a table, exit status 1 on any failure) and ``tests/real_switch_tier/test_sip_suites.py`` (CI).
Suites for national/international number formats and for alert calls (IVR, DTMF) join the table in
:data:`NUMBER_FORMAT_SUITES` and :data:`ALERT_CALL_SUITES`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID, uuid4

import asyncpg

from benchmarks._realfs import RealSwitch, free_media_port, free_port, freeswitch_home
from policy_cache import registry
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from policy_cache.models import (
    BindingCreate,
    BindingRole,
    ConsentCreate,
    ConsentPurpose,
    DeviceCapability,
    DeviceCreate,
    DeviceStatus,
    DeviceType,
    FallbackAction,
    HouseholdCreate,
    PolicyCreate,
    PresenceState,
    RingMode,
    SubscriberCreate,
    TenantCreate,
)
from tests import sip_client, sipp
from tests.kamailio_edge import KamailioEdge, ha1, running_edge, tcp_bridge_to, wait_until
from tests.pg import PgCluster, PgDatabase, run_sync
from tests.real_switch_tier import alert_rig
from tests.real_switch_tier.conftest import Iim, Ports, start_iim, stop_iim
from tests.real_switch_tier.kamailio_fixtures import kamailio_db_url, provision_speakers

SWITCH_DOMAIN = "127.0.0.1"  # IIM_FS_DOMAIN of benchmarks._realfs: the speakers' directory domain
CALLER = "79160000000"
UNKNOWN_NUMBER = "79100000005"  # in the subscriber plan, no subscriber: IIM passes it through
OUTSIDE_PLAN = "12345"  # refused by the dialplan before IIM
ROW_DEADLINE_S = 10.0  # audit lines are written off the call path, in batches every 0.2 s
T = TypeVar("T")
#: The cause FreeSWITCH 1.10 gives a bridge whose legs all outlived their leg_timeout (not NO_ANSWER).
LEG_TIMED_OUT = "ALLOTTED_TIMEOUT"


# ---------------------------------------------------------------------------------------------- households


@dataclass(frozen=True)
class Home:
    """A household with one owner (``msisdn``) and its policy; ``speaker``: one SIP speaker on the switch."""

    msisdn: str  # digits, as dialled; the subscriber is +msisdn
    ring_mode: RingMode
    fallback: FallbackAction = FallbackAction.NONE
    phone_timeout_s: int = 20
    home_timeout_s: int = 20
    speaker: bool = False

    @property
    def speaker_user(self) -> str:
        return f"spk{self.msisdn}"

    @property
    def speaker_password(self) -> str:
        return f"Speaker-{self.msisdn}-secret"


HOMES: dict[str, Home] = {
    "simultaneous": Home("79102220001", RingMode.SIMULTANEOUS, speaker=True),
    "simultaneous_vm": Home("79102220002", RingMode.SIMULTANEOUS, FallbackAction.VOICEMAIL, 3, 3, speaker=True),
    "phone_then_home": Home("79102220003", RingMode.PHONE_THEN_HOME, phone_timeout_s=2, speaker=True),
    "home_then_phone": Home("79102220004", RingMode.HOME_THEN_PHONE, home_timeout_s=2, speaker=True),
    "home_only": Home("79102220005", RingMode.HOME_ONLY, FallbackAction.MISSED_CALL_SMS, speaker=True),
    "phone_only": Home("79102220006", RingMode.PHONE_ONLY),
    "voicemail": Home("79102220007", RingMode.PHONE_ONLY, FallbackAction.VOICEMAIL, 2),
    "record_message": Home("79102220008", RingMode.PHONE_ONLY, FallbackAction.RECORD_MESSAGE, 2),
    "missed_call_sms": Home("79102220009", RingMode.PHONE_ONLY, FallbackAction.MISSED_CALL_SMS, 2),
    "failover": Home("79102220010", RingMode.PHONE_ONLY),
    "cancelled": Home("79102220011", RingMode.PHONE_ONLY, FallbackAction.VOICEMAIL),
}
LOAD_HOMES = [Home(f"7910333{n:04d}", RingMode.PHONE_ONLY) for n in range(20)]


@dataclass(frozen=True)
class Seeded:
    tenant_id: UUID
    subscriber_id: UUID


async def _create_home(pool: Pool, home: Home) -> Seeded:
    tenant = uuid4()
    kw = {"actor": "sip-tests"}
    async with tenant_tx(pool, tenant) as tx:
        await registry.create(tx, registry.TENANT, TenantCreate(name=f"home {home.msisdn}"), **kw)
        house = await registry.create(tx, registry.HOUSEHOLD, HouseholdCreate(
            name="Flat", time_zone="Europe/Moscow", presence=PresenceState.HOME), **kw)
        owner = await registry.create(tx, registry.SUBSCRIBER, SubscriberCreate(msisdn=f"+{home.msisdn}"), **kw)
        await registry.create(tx, registry.BINDING, BindingCreate(
            subscriber_id=owner.id, household_id=house.id, role=BindingRole.OWNER, priority=0), **kw)
        if home.fallback is FallbackAction.RECORD_MESSAGE:  # without it the message is not recorded
            await registry.create(tx, registry.CONSENT, ConsentCreate(
                subscriber_id=owner.id, purpose=ConsentPurpose.CALL_RECORDING, evidence={"channel": "sip-tests"}),
                **kw)
        if home.speaker:
            await registry.create(tx, registry.DEVICE, DeviceCreate(
                household_id=house.id, name="Speaker", type=DeviceType.SPEAKER, vendor="generic-sip",
                capabilities=frozenset({DeviceCapability.SIP}),
                sip_uri=f"sip:{home.speaker_user}@{SWITCH_DOMAIN}", status=DeviceStatus.ONLINE), **kw)
            await registry.create(tx, registry.CONSENT, ConsentCreate(
                subscriber_id=owner.id, purpose=ConsentPurpose.ANNOUNCE_CALLS, evidence={"channel": "sip-tests"}),
                **kw)
        await registry.create(tx, registry.POLICY, PolicyCreate(
            household_id=house.id, ring_mode=home.ring_mode, phone_timeout_s=home.phone_timeout_s,
            home_timeout_s=home.home_timeout_s, fallback=home.fallback), **kw)
    return Seeded(tenant, owner.id)


def seed_homes(db: PgDatabase, homes: Sequence[Home]) -> dict[str, Seeded]:
    """Every household through IIM's registry (as an operator would), before IIM loads its cache."""

    async def create() -> dict[str, Seeded]:
        pool = await connect_pool(db.app_url, role=DbRole.APP, min_size=1, max_size=2)
        try:
            return {home.msisdn: await _create_home(pool, home) for home in homes}
        finally:
            await pool.close()

    return run_sync(create())


def speaker_directory_entry(home: Home) -> str:
    """The switch's directory file for a speaker (``freeswitch-conf/directory/iim.xml``: one file per device)."""
    digest = ha1(home.speaker_user, SWITCH_DOMAIN, home.speaker_password)
    return (f'<include>\n  <user id="{home.speaker_user}">\n    <params>\n'
            f'      <param name="a1-hash" value="{digest}"/>\n    </params>\n  </user>\n</include>\n')


# ---------------------------------------------------------------------------------------------- the rig


@dataclass(frozen=True)
class Load:
    rate: float = 20.0
    calls: int = 200


@dataclass
class Rig:
    """Everything a suite talks to; ``iim`` changes when a suite restarts IIM."""

    workdir: Path
    db: PgDatabase
    switch: RealSwitch
    edge: KamailioEdge
    iim: Iim
    ports: Ports
    seeded: dict[str, Seeded]
    speaker_ports: dict[str, int]
    load: Load

    def home(self, name: str) -> Home:
        return HOMES[name]

    def register_speaker(self, home: Home) -> None:
        """(Re-)register the speaker on the switch's internal profile, its contact the SIPp playing it."""
        _, final = sip_client.Udp("127.0.0.1").register(
            ("127.0.0.1", self.switch.internal_sip_port), home.speaker_user, home.speaker_password, SWITCH_DOMAIN,
            contact=f"sip:{home.speaker_user}@127.0.0.1:{self.speaker_ports[home.msisdn]}")
        if final is None or final.code != 200:
            raise RuntimeError(f"speaker {home.speaker_user} did not register: {final}")

    def query(self, sql: str, *args: object) -> list[dict[str, Any]]:
        """Rows read as the superuser (row-level security does not hide other tenants from the check)."""

        async def run() -> list[dict[str, Any]]:
            conn = await asyncpg.connect(self.db.admin_url)
            try:
                return [dict(row) for row in await conn.fetch(sql, *args)]
            finally:
                await conn.close()

        return run_sync(run())

    def routed(self, home: Home, after: int = 0) -> list[dict[str, Any]]:
        """The home's ``call.routed`` audit lines with an id above ``after``."""
        seeded = self.seeded[home.msisdn]
        rows = self.query("SELECT id, detail, correlation FROM iim.audit_log WHERE tenant_id = $1 "
                          "AND action = 'call.routed' AND entity_id = $2 AND id > $3 ORDER BY id",
                          seeded.tenant_id, str(seeded.subscriber_id), after)
        for row in rows:
            row["detail"], row["correlation"] = json.loads(row["detail"]), json.loads(row["correlation"])
        return rows

    def last_routed_id(self, home: Home) -> int:
        rows = self.routed(home)
        return int(rows[-1]["id"]) if rows else 0

    def all_routed_count(self) -> int:
        return int(self.query("SELECT count(*) AS n FROM iim.audit_log WHERE action = 'call.routed'")[0]["n"])

    def sms(self, home: Home) -> list[dict[str, Any]]:
        return self.query("SELECT key, msisdn, body FROM iim.sms_outbox WHERE tenant_id = $1 ORDER BY created_at",
                          self.seeded[home.msisdn].tenant_id)

    def calls_ended(self, iim: Iim | None = None) -> list[dict[str, Any]]:
        """IIM's ``call ended`` log lines (one per call, after its socket closed)."""
        lines = [json.loads(line) for line in (iim or self.iim).log_text().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("msg") == "call ended"]

    def recording(self, call_id: str) -> Path:
        return self.switch.base / "recordings" / f"iim-{call_id}.wav"


@contextlib.contextmanager
def running_rig(workdir: Path, cluster: PgCluster, db: PgDatabase, *, load: Load | None = None) -> Iterator[Rig]:
    """Households seeded, then FreeSWITCH (with the speakers' directory files), Kamailio, ``iim serve``."""
    workdir.mkdir(parents=True, exist_ok=True)
    homes = [*HOMES.values(), *LOAD_HOMES]
    seeded = seed_homes(db, homes)
    provision_speakers(cluster, db)  # the edge's own database role (and its registry speakers)
    ports = Ports(core=free_port(), iim_primary=free_port(), iim_secondary=free_port())
    home_dir = freeswitch_home()
    if home_dir is None:
        raise RuntimeError("no FreeSWITCH installed (../shared/freeswitch/install, or IIM_TEST_FREESWITCH)")
    switch = RealSwitch(home=home_dir, base=workdir / "freeswitch")
    switch.render({"IIM_FS_IMS_PROXY": f"127.0.0.1:{ports.core}",
                   "IIM_FS_SOCKET_PRIMARY": f"127.0.0.1:{ports.iim_primary}",
                   "IIM_FS_SOCKET_SECONDARY": f"127.0.0.1:{ports.iim_secondary}"})
    speakers = [home for home in homes if home.speaker]
    for home in speakers:
        (switch.base / "conf" / "directory" / "iim" / f"{home.speaker_user}.xml").write_text(
            speaker_directory_entry(home))
    with contextlib.ExitStack() as stack:
        stack.callback(switch.stop)
        switch.start()
        bridge = stack.enter_context(tcp_bridge_to(db.admin_url))
        edge = stack.enter_context(running_edge(workdir / "kamailio", [switch.external_sip_port],
                                                kamailio_db_url(cluster, db, bridge.port)))
        if not wait_until(lambda: "AP" in edge.rpc("dispatcher.list"), 15):
            raise RuntimeError(f"the edge never saw FreeSWITCH up:\n{edge.rpc('dispatcher.list')}")
        iim = start_iim(switch, db, ports.iim_primary, workdir / "iim", audio_over_http=True)
        rig = Rig(workdir, db, switch, edge, iim, ports, seeded,
                  {home.msisdn: free_port() for home in speakers}, load or Load())
        stack.callback(lambda: stop_iim(rig.iim))
        for home in speakers:
            rig.register_speaker(home)
        yield rig


# ---------------------------------------------------------------------------------------------- outcomes


@dataclass
class Check:
    kind: str  # "SIP" (what the caller saw) or "rows" (IIM's record)
    what: str
    ok: bool
    detail: str = ""


@dataclass
class Outcome:
    suite: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(check.ok for check in self.checks)

    def check(self, kind: str, what: str, ok: bool, detail: object = "") -> bool:
        self.checks.append(Check(kind, what, ok, "" if ok else str(detail)[-3000:]))
        return ok

    def column(self, kind: str) -> str:
        mine = [check for check in self.checks if check.kind == kind]
        if not mine:
            return "-"
        return "ok" if all(check.ok for check in mine) else "FAIL"

    def report(self) -> str:
        lines = [f"{self.suite}: {'passed' if self.passed else 'FAILED'}", *self.notes]
        lines += [f"  [{c.kind}] {c.what}: {'ok' if c.ok else 'FAILED'}" + (f"\n    {c.detail}" if c.detail else "")
                  for c in self.checks]
        if self.error:
            lines.append(f"  error: {self.error}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Suite:
    name: str
    covers: str  # what of issue 15's list it plays
    play: Callable[[Rig, Outcome], None]


def play(rig: Rig, suite: Suite) -> Outcome:
    """Run one suite; an exception is the suite's failure (with its traceback), never the runner's."""
    outcome = Outcome(suite.name)
    started = time.monotonic()
    workdir = rig.workdir / "suites" / suite.name
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        suite.play(rig, outcome)
    except Exception:  # noqa: BLE001  (a suite that crashes has failed; the runner goes on to the next)
        outcome.error = traceback.format_exc(limit=6)[-3000:]
    outcome.seconds = time.monotonic() - started
    return outcome


def eventually(fetch: Callable[[], T], timeout: float = ROW_DEADLINE_S) -> T:
    """``fetch()`` until it gives something truthy or ``timeout`` passes; its last answer either way."""
    deadline = time.monotonic() + timeout
    while not (value := fetch()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def _ended_for(rig: Rig, call_id: str, iim: Iim | None = None) -> dict[str, Any] | None:
    return eventually(lambda: next((line for line in rig.calls_ended(iim) if line.get("call_id") == call_id), None))


# ---------------------------------------------------------------------------------------------- inbound calls


@dataclass(frozen=True)
class InboundCall:
    """A call to a household's owner: who answers how, and what the caller and IIM's rows must show."""

    home: str
    final: int
    groups: list[list[str]]  # leg kinds per ring group in the audit line, e.g. [["phone", "speaker"]]
    core: str = "core_answer.xml"  # the mobile (the IMS core)
    speaker: str | None = None  # the speaker's SIPp, for a home with one
    caller: str = "caller.xml"
    cause: str | None = "NORMAL_CLEARING"  # the hangup cause in IIM's "call ended" line
    message: bool = False  # a message recorded by the switch
    sms: bool = False  # a missed-call SMS queued for the owner
    hold_ms: int = 500  # caller.xml: talk time; caller_cancel.xml: ringing time before the CANCEL
    confirm_prompt: bool = False  # the forked mobile heard IIM's confirmation prompt (fetched over HTTP)

    def __call__(self, rig: Rig, out: Outcome) -> None:
        home = rig.home(self.home)
        work = rig.workdir / "suites" / out.suite
        before = rig.last_routed_id(home)
        sms_before = len(rig.sms(home))
        prompts_before = rig.switch.log_text().count("/v1/prompts/confirm-call.wav")
        with contextlib.ExitStack() as peers:
            peers.enter_context(sipp.core(work, rig.ports.core, self.core))
            if home.speaker:
                assert self.speaker is not None, f"{self.home} has a speaker: say what it does"
                peers.enter_context(sipp.core(work / "speaker", rig.speaker_ports[home.msisdn], self.speaker))
                rig.register_speaker(home)
            result = sipp.call(work, rig.edge.sip_port, home.msisdn, caller=CALLER, scenario=self.caller,
                               hold_ms=self.hold_ms, timeout_s=90)
        out.check("SIP", f"caller's final answer {self.final}", result.finals == [self.final],
                  f"finals {result.finals}: {result.output}")
        routed = eventually(lambda: rig.routed(home, before))
        if not out.check("rows", "one call.routed audit line", len(routed) == 1, routed):
            return
        detail, call_id = routed[0]["detail"], str(routed[0]["correlation"].get("call_id"))
        kinds = [[leg.split(":", 1)[0] for leg in group] for group in detail["groups"]]
        out.check("rows", f"routed by policy, ring groups {self.groups}, fallback {home.fallback.value}",
                  (detail["route"], kinds, detail["fallback"]) == ("policy", self.groups, home.fallback.value),
                  detail)
        ended = _ended_for(rig, call_id)
        out.check("rows", f"call ended {self.cause}", ended is not None and ended.get("hangup_cause") == self.cause,
                  ended or rig.iim.log_text()[-2000:])
        has_message = wait_until(lambda: rig.recording(call_id).is_file(), 5 if self.message else 0.5)
        out.check("rows", "message recorded" if self.message else "no message recorded", has_message == self.message,
                  rig.switch.log_text()[-2000:])
        key = f"missed-call:{call_id}"
        texts = [row for row in rig.sms(home)[sms_before:] if row["key"] == key]
        out.check("rows", "missed-call SMS queued" if self.sms else "no missed-call SMS",
                  len(texts) == (1 if self.sms else 0) and all(t["msisdn"] == f"+{home.msisdn}" for t in texts),
                  texts)
        if self.confirm_prompt:
            out.check("rows", "the mobile heard IIM's confirmation prompt",
                      rig.switch.log_text().count("/v1/prompts/confirm-call.wav") > prompts_before,
                      rig.switch.log_text()[-2000:])


def unknown_callee(rig: Rig, out: Outcome) -> None:
    """A number in the subscriber plan without a subscriber goes where it was dialled; one outside the plan is
    refused by the dialplan without reaching IIM. Neither writes an audit line (no tenant owns them)."""
    work = rig.workdir / "suites" / out.suite
    routed_before, ended_before = rig.all_routed_count(), len(rig.calls_ended())
    with sipp.core(work, rig.ports.core, "core_answer.xml"):
        known = sipp.call(work, rig.edge.sip_port, UNKNOWN_NUMBER, caller=CALLER)
    out.check("SIP", "unknown subscriber: 200 from the dialled number", known.finals == [200], known.output)
    wait_until(lambda: len(rig.calls_ended()) > ended_before, ROW_DEADLINE_S, 0.1)
    ended = rig.calls_ended()[ended_before:]
    out.check("rows", "passed through by IIM: call ended ok, NORMAL_CLEARING",
              [(e.get("result"), e.get("hangup_cause")) for e in ended] == [("ok", "NORMAL_CLEARING")], ended)
    outside = sipp.call(work, rig.edge.sip_port, OUTSIDE_PLAN, caller=CALLER)
    out.check("SIP", "outside the subscriber plan: 404", outside.finals == [404], outside.output)
    time.sleep(0.5)  # what is checked is that nothing more came
    out.check("rows", "outside the plan never reached IIM", len(rig.calls_ended()) == ended_before + 1,
              rig.calls_ended()[ended_before:])
    out.check("rows", "no call.routed audit line for either", rig.all_routed_count() == routed_before,
              rig.all_routed_count() - routed_before)


def iim_down(rig: Rig, out: Outcome) -> None:
    """The primary IIM down: the secondary socket takes the call (and audits it); both down: the dialplan's
    safe bridge connects the caller to the dialled number. The primary is back at the end."""
    home = rig.home("failover")
    work = rig.workdir / "suites" / out.suite
    no_controller = f"no controller took [{home.msisdn}]"
    stop_iim(rig.iim)
    try:
        before = rig.last_routed_id(home)
        secondary = start_iim(rig.switch, rig.db, rig.ports.iim_secondary, work / "secondary", audio_over_http=True)
        try:
            with sipp.core(work, rig.ports.core, "core_answer.xml"):
                taken = sipp.call(work, rig.edge.sip_port, home.msisdn, caller=CALLER)
            out.check("SIP", "primary down: 200 through the secondary", taken.finals == [200], taken.output)
            routed = eventually(lambda: rig.routed(home, before))
            out.check("rows", "the secondary routed it by policy (one call.routed line)",
                      [r["detail"]["route"] for r in routed] == ["policy"], routed)
            ended = _ended_for(rig, str(routed[0]["correlation"].get("call_id")), secondary) if routed else None
            out.check("rows", "call ended on the secondary", ended is not None, secondary.log_text()[-2000:])
            out.check("rows", "the dialplan did not bridge it itself", no_controller not in rig.switch.log_text(),
                      no_controller)
        finally:
            stop_iim(secondary)
        before = rig.last_routed_id(home)
        with sipp.core(work, rig.ports.core, "core_answer.xml"):
            bridged = sipp.call(work, rig.edge.sip_port, home.msisdn, caller=CALLER)
        out.check("SIP", "both down: 200 through the safe bridge", bridged.finals == [200], bridged.output)
        out.check("rows", "the switch logged the safe bridge", no_controller in rig.switch.log_text(),
                  rig.switch.log_text()[-2000:])
        out.check("rows", "no audit line without IIM", rig.routed(home, before) == [], rig.routed(home, before))
    finally:
        rig.iim = start_iim(rig.switch, rig.db, rig.ports.iim_primary, rig.workdir / "iim", audio_over_http=True)


# ---------------------------------------------------------------------------------------------- alert calls


_alert_homes = iter(range(1, 1000))


@dataclass(frozen=True)
class AlertCall:
    """An alarm at a household of its own whose scenario (``alert_rig.SCENARIO``) calls the owner's mobile (the
    IMS core, played by SIPp ``core``) with an IVR, then texts the backup contact; what the incident, the call's
    outcome and the switch's download of the prompt from IIM (``IIM_SWITCH_AUDIO_BASE_URL``) must show."""

    core: str
    state: str
    outcome: str
    detail: str
    backup_texted: bool
    every_try: bool = False  # the callee pressed nothing: every try's digit timeout ran before the next step

    def __call__(self, rig: Rig, out: Outcome) -> None:
        work = rig.workdir / "suites" / out.suite
        n = next(_alert_homes)
        owner, backup, security = (f"+7900225{n:03d}{role}" for role in "123")
        home = run_sync(alert_rig.household(rig.db, work, owner, backup, security))

        async def alarm() -> tuple[alert_rig.Incident, float]:
            pool = await connect_pool(rig.db.app_url, role=DbRole.APP, min_size=1, max_size=2)
            try:
                started = time.monotonic()
                incident = await alert_rig.raise_alarm(pool, home)
                return await alert_rig.settled(pool, home, incident), time.monotonic() - started
            finally:
                await pool.close()

        with sipp.core(work, rig.ports.core, self.core, answer_ms=2000):
            done, took = run_sync(alarm())
        log = rig.switch.log_text()
        out.check("SIP", "the owner's mobile answered the alert call",
                  f"Channel [sofia/external/{owner}] has been answered" in log, log[-2000:])
        calls = [a for a in done.actions if a["kind"] == "call"]
        out.check("rows", f"the call's outcome: {self.outcome} ({self.detail})",
                  [(a["outcome"], a["detail"]) for a in calls] == [(self.outcome, self.detail)], done)
        out.check("rows", f"the incident: {self.state}", done.state == self.state, done)
        out.check("rows", "the backup contact texted" if self.backup_texted else "nobody else texted",
                  (backup in done.sms_to) == self.backup_texted, done.sms_to)
        if self.every_try:
            floor = alert_rig.TRIES * alert_rig.DIGIT_TIMEOUT_S
            out.check("rows", f"every try's digit timeout ran first (>= {floor} s)", took >= floor, f"{took:.1f} s")
        url = f"http_cache://http://127.0.0.1:{rig.iim.http_port}/v1/audio/"
        mine = [line for line in log.splitlines() if f"sofia/external/{owner} play_and_get_digits(" in line]
        prompts = alert_rig.prompts_played("\n".join(mine))
        out.check("rows", "the prompt was a URL on IIM's HTTP site the switch downloaded",
                  bool(prompts) and all(p.startswith(url) and f"URL {p.removeprefix('http_cache://')} downloaded"
                                        in log for p in prompts), prompts or log[-2000:])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(rig: Rig, out: Outcome) -> None:
    """``--calls`` calls at ``--rate`` per second over the load households (mobile answers at once): every
    call answered and audited; the setup time (INVITE -> 200 at the caller, through the edge) reported."""
    work = rig.workdir / "suites" / out.suite
    numbers = work / "numbers.csv"
    numbers.write_text("SEQUENTIAL\n" + "".join(f"{home.msisdn};\n" for home in LOAD_HOMES))
    before = {home.msisdn: rig.last_routed_id(home) for home in LOAD_HOMES}
    rate, calls = rig.load.rate, rig.load.calls
    run_dir = work / f"run-{free_port()}"
    run_dir.mkdir()
    with sipp.core(work, rig.ports.core, "core_answer.xml", answer_ms=0):
        argv = [sipp.require_sipp(), "-sf", str(sipp.SCENARIOS / "caller_load.xml"), "-inf", str(numbers),
                "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1", "-mp", str(free_media_port()),
                "-m", str(calls), "-r", str(rate), "-l", str(max(10, int(rate * 10))), "-d", "300",
                "-key", "caller", CALLER, "-key", "extra", "X-Test: load", "-trace_rtt", "-rtt_freq", "1",
                "-trace_logs", "-log_file", str(run_dir / "final.log"), "-trace_err", "-error_file",
                str(run_dir / "errors.log"), "-nostdin", "-timeout", f"{int(calls / rate) + 60}s", "-timeout_error", f"127.0.0.1:{rig.edge.sip_port}"]
        done = subprocess.run(argv, cwd=run_dir, capture_output=True, text=True, check=False,
                              timeout=int(calls / rate) + 90)
    finals = (run_dir / "final.log").read_text() if (run_dir / "final.log").exists() else ""
    answered = finals.count("FINAL 200 ")
    setups: list[float] = []
    for rtt in run_dir.glob("*_rtt.csv"):
        with rtt.open() as rows:
            setups += [float(row[1]) for row in csv.reader(rows, delimiter=";")
                       if len(row) >= 3 and row[2].strip() == "setup"]
    failed = calls - answered
    if setups:
        out.notes.append(f"  rate {rate:g}/s, calls {calls}, failed {failed}, setup ms p50 {_percentile(setups, .5):.1f}"
                         f" p95 {_percentile(setups, .95):.1f} p99 {_percentile(setups, .99):.1f}"
                         f" max {max(setups):.1f}")
    out.check("SIP", f"{calls} calls at {rate:g}/s, every one answered", failed == 0,
              f"failed {failed}; sipp exit {done.returncode}: {done.stdout[-1500:]}{done.stderr[-1500:]}")

    def audited() -> int:
        return sum(len(rig.routed(home, before[home.msisdn])) for home in LOAD_HOMES)

    wait_until(lambda: audited() >= answered, ROW_DEADLINE_S + calls / 100, 0.5)
    out.check("rows", "one call.routed audit line per call", audited() == calls, f"{audited()} of {calls}")


# ---------------------------------------------------------------------------------------------- the table


INBOUND_SUITES = [
    Suite("simultaneous_speaker_answers", "simultaneous: the speaker answers (the mobile leg is cancelled)",
          InboundCall("simultaneous", 200, [["phone", "speaker"]], core="core_ring.xml", speaker="core_answer.xml")),
    Suite("simultaneous_mobile_confirms", "simultaneous: the mobile answers and confirms with 1",
          InboundCall("simultaneous", 200, [["phone", "speaker"]], core="core_answer_press_1.xml",
                      speaker="core_ring.xml", hold_ms=3000, confirm_prompt=True)),
    Suite("simultaneous_no_answer_voicemail", "simultaneous: nobody answers -> voicemail (recorded) + SMS",
          InboundCall("simultaneous_vm", 200, [["phone", "speaker"]], core="core_ring.xml", speaker="core_ring.xml",
                      caller="caller_until_bye.xml", message=True, sms=True)),
    Suite("phone_then_home_speaker_answers", "sequential, mobile first: no answer on the mobile, the speaker answers",
          InboundCall("phone_then_home", 200, [["phone"], ["speaker"]], core="core_ring.xml",
                      speaker="core_answer.xml")),
    Suite("home_then_phone_mobile_answers", "sequential, home first: the speaker rings out, the mobile answers",
          InboundCall("home_then_phone", 200, [["speaker"], ["phone"]], speaker="core_ring.xml")),
    Suite("speakers_only_speaker_answers", "speakers only: the speaker answers",
          InboundCall("home_only", 200, [["speaker"]], speaker="core_answer.xml")),
    Suite("speakers_only_busy_missed_call_sms", "speakers only: the speaker is busy -> 486 + missed-call SMS",
          InboundCall("home_only", 486, [["speaker"]], speaker="core_busy.xml", cause="USER_BUSY", sms=True)),
    Suite("mobile_only_answers", "mobile only: the mobile answers (no confirmation: nothing to fork against)",
          InboundCall("phone_only", 200, [["phone"]])),
    Suite("mobile_only_busy", "mobile only: busy -> the caller gets 486",
          InboundCall("phone_only", 486, [["phone"]], core="core_busy.xml", cause="USER_BUSY")),
    Suite("no_answer_voicemail", "no answer -> voicemail (the switch records, no platform set) + SMS",
          InboundCall("voicemail", 200, [["phone"]], core="core_ring.xml", caller="caller_until_bye.xml",
                      message=True, sms=True)),
    Suite("no_answer_record_message", "no answer -> the household's recorded message + SMS",
          InboundCall("record_message", 200, [["phone"]], core="core_ring.xml", caller="caller_until_bye.xml",
                      message=True, sms=True)),
    Suite("no_answer_missed_call_sms", "no answer -> missed-call SMS, the caller gets 480",
          InboundCall("missed_call_sms", 480, [["phone"]], core="core_ring.xml", cause=LEG_TIMED_OUT, sms=True)),
    # A caller who gave up while it rang is a missed call (issue 17 item 2): the SMS, but nothing recorded.
    Suite("caller_cancel", "the caller cancels while it rings: 487, the mobile leg cancelled, no voicemail, "
          "the missed-call SMS",
          InboundCall("cancelled", 487, [["phone"]], core="core_ring.xml", caller="caller_cancel.xml",
                      cause="ORIGINATOR_CANCEL", hold_ms=1000, sms=True)),
    Suite("unknown_callee", "unknown callee: passed through; outside the plan: 404 before IIM", unknown_callee),
]
FAILOVER_SUITES = [
    Suite("iim_down_secondary_then_safe_bridge", "IIM down -> the secondary socket -> the safe bridge", iim_down),
]
#: National (8XXXXXXXXXX) and international (+, 00/810) number formats: issue 15 item 4, the numbering plan.
def number_formats(rig: Rig, out: Outcome) -> None:
    """One subscriber dialled in every form the default numbering plan reads (E.164, without ``+``, national
    with the trunk prefix 8, international with 810): each call meets that subscriber's policy (one
    ``call.routed`` line, route ``policy``) and is answered on the mobile."""
    home = rig.home("phone_only")
    work = rig.workdir / "suites" / out.suite
    national = home.msisdn[1:]  # 7 9102220006 -> 9102220006
    forms = {"E.164": f"+{home.msisdn}", "without +": home.msisdn, "national (8...)": f"8{national}",
             "international prefix (810...)": f"810{home.msisdn}"}
    for label, dialled in forms.items():
        before = rig.last_routed_id(home)
        with sipp.core(work, rig.ports.core, "core_answer.xml"):
            result = sipp.call(work, rig.edge.sip_port, dialled, caller=CALLER)
        out.check("SIP", f"{label} {dialled}: 200", result.finals == [200], result.output)
        routed = eventually(lambda before=before: rig.routed(home, before))  # type: ignore[misc]
        out.check("rows", f"{label}: routed by the subscriber's policy",
                  [r["detail"]["route"] for r in routed] == ["policy"], routed)


NUMBER_FORMAT_SUITES: list[Suite] = [
    Suite("number_formats", "national and international number formats meet the subscriber's policy",
          number_formats),
]
#: Alert call -> answer -> IVR -> DTMF ack / escalate / no input with the real digit timeout: issue 15 item 3.
ALERT_CALL_SUITES: list[Suite] = [
    Suite("alert_call_acknowledged", "alert call -> answer -> IVR prompt from IIM over HTTP -> DTMF 1 acknowledges",
          AlertCall("core_answer_press_1.xml", "acknowledged", "acknowledge", "digit", backup_texted=False)),
    Suite("alert_call_escalated", "alert call -> answer -> DTMF 2 (help) escalates to the next step at once",
          AlertCall("core_answer_press_2.xml", "exhausted", "escalate", "digit", backup_texted=True)),
    Suite("alert_call_no_input", "alert call -> answer -> no key: every try's real digit timeout, then the next step",
          AlertCall("core_answer.xml", "exhausted", "no_input", "no_input", backup_texted=True, every_try=True)),
]
LOAD_SUITES = [Suite("load", "a load run at --rate for --calls calls: failed calls, setup-time percentiles", load)]

SUITES: list[Suite] = [*INBOUND_SUITES, *FAILOVER_SUITES, *NUMBER_FORMAT_SUITES, *ALERT_CALL_SUITES, *LOAD_SUITES]


# ---------------------------------------------------------------------------------------------- the runner


def missing_peers() -> list[str]:
    """What this machine lacks to run the suites (empty: everything is there)."""
    from tests.kamailio_edge import MODULES

    missing = []
    if freeswitch_home() is None:
        missing.append("FreeSWITCH 1.10.12 (../shared/freeswitch/install, or IIM_TEST_FREESWITCH=DIR)")
    if shutil.which("sipp") is None:
        missing.append("sipp (Debian package sip-tester)")
    modules = {module.name for module in Path("/usr/lib").glob("*/kamailio/modules/*.so")}
    binary = shutil.which("kamailio") or Path("/usr/sbin/kamailio").is_file()
    if not binary or not set(MODULES) <= modules:
        missing.append("kamailio with its websocket, tls and postgres modules (Debian's kamailio 5.6 packages)")
    return missing


def table(outcomes: Sequence[Outcome]) -> str:
    width = max([len("suite"), *(len(o.suite) for o in outcomes)])
    rows = [f"{'suite':<{width}}  SIP   rows  result  seconds", "-" * (width + 32)]
    for o in outcomes:
        rows.append(f"{o.suite:<{width}}  {o.column('SIP'):<4}  {o.column('rows'):<4}  "
                    f"{'pass' if o.passed else 'FAIL':<6}  {o.seconds:7.1f}")
    return "\n".join(rows)


def select(names: Sequence[str] | None) -> list[Suite]:
    """The suites named (in the table's order), or all; an unknown name is a ``ValueError``."""
    if not names:
        return list(SUITES)
    wanted = {name for arg in names for name in arg.split(",") if name}
    unknown = wanted - {suite.name for suite in SUITES}
    if unknown:
        raise ValueError(f"unknown suite(s): {', '.join(sorted(unknown))} (see --list)")
    return [suite for suite in SUITES if suite.name in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sip-tests/run", description="SIPp suites through Kamailio -> FreeSWITCH -> iim serve, each judged "
        "on the caller's SIP outcome and IIM's rows. Exit status 0: all passed; 1: a suite failed; 2: cannot run.")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument("--suite", action="append", metavar="NAME", help="run only NAME (repeat, or a,b,c)")
    parser.add_argument("--rate", type=float, default=Load.rate, help="load suite: calls per second (20)")
    parser.add_argument("--calls", type=int, default=Load.calls, help="load suite: how many calls (200)")
    parser.add_argument("--workdir", type=Path, help="keep logs, recordings and SIPp traces here")
    args = parser.parse_args(argv)
    if args.list:
        width = max(len(suite.name) for suite in SUITES)
        for suite in SUITES:
            print(f"{suite.name:<{width}}  {suite.covers}")
        return 0
    try:
        suites = select(args.suite)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.rate <= 0 or args.calls <= 0:
        print("--rate and --calls must be positive", file=sys.stderr)
        return 2
    missing = missing_peers()
    if missing:
        print("cannot run: this machine lacks " + "; ".join(missing), file=sys.stderr)
        return 2
    return _run(suites, Load(args.rate, args.calls), args.workdir)


def _run(suites: Sequence[Suite], load_settings: Load, workdir: Path | None) -> int:
    from tests import run_guard
    from tests.pg import standalone_database

    run_guard.start()  # a killed runner leaves no PostgreSQL, switch or IIM behind
    keep = workdir is not None
    base = workdir or Path(tempfile.mkdtemp(prefix="sip-tests-"))
    outcomes: list[Outcome] = []
    try:
        with standalone_database() as (cluster, db), running_rig(base, cluster, db, load=load_settings) as rig:
            for suite in suites:
                outcomes.append(play(rig, suite))
                print(f"{suite.name}: {'pass' if outcomes[-1].passed else 'FAIL'} "
                      f"({outcomes[-1].seconds:.1f} s)", flush=True)
    finally:
        failed = [o.suite for o in outcomes if not o.passed] or ([] if len(outcomes) == len(suites) else ["rig"])
        keep = keep or bool(failed)  # a failure's logs are what the operator reads next
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    print()
    print(table(outcomes))
    for outcome in outcomes:
        if outcome.notes or not outcome.passed:
            print()
            print(outcome.report())
    print(f"\n{len(outcomes) - len(failed)} passed, {len(failed)} failed" + (f" (logs in {base})" if keep else ""))
    return 1 if failed else 0
