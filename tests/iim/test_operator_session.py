"""A whole operator session against the assembled service (issue 16's "done when"): an OIDC token from a local
issuer over HTTP -> list incidents -> show the timeline -> a test call the ESL emulator answers with DTMF 1 ->
close as a false alarm; the incident opened by a signed device event through the HTTPS bridge, PostgreSQL real.
Every step leaves an audit row carrying the operator's actor (``sub (issuer)``), through the API and the CLI."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import pytest

from fs_app.testing import FreeSwitchEmulator, TargetBehaviour
from iim.cli import main as iim_main
from iim.service import DatabaseUrls, Service
from iim.settings import Settings
from policy_cache import audit, registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import DeviceCapability, DeviceCreate, DeviceStatus, DeviceType
from tests.alarm_rig import AlarmRig, build_rig
from tests.connector_peer import SIGNING_SECRET_TEXT, STATIC_TOKEN, VendorPeer, serve
from tests.oidc_issuer import AUDIENCE, Issuer, running_issuer
from tests.pg import TEST_MASTER_KEY_ENV, PgDatabase

ESL_PASSWORD = "operator-session-esl-secret"
GW = "sofia/gateway/ims/{}"


@dataclass
class Live:
    rig: AlarmRig
    pool: Pool
    emu: FreeSwitchEmulator
    issuer: Issuer
    api: str
    bridge: str
    tls: ssl.SSLContext
    http: aiohttp.ClientSession
    sub: str = "olga@noc"

    @property
    def actor(self) -> str:
        return f"{self.sub} ({self.issuer.url})"

    def token(self, sub: str | None = None, **scope: str) -> str:
        """The operator's bearer JWT: operator of this tenant only (``scope``: role, brand, region)."""
        grant = {"role": "operator", "tenant": str(self.rig.tenant_id), **scope}
        return self.issuer.token(sub or self.sub, [grant])

    def t(self, tail: str) -> str:
        return f"/v1/tenants/{self.rig.tenant_id}{tail}"

    def script(self, number: str, behaviour: TargetBehaviour) -> None:
        self.emu.targets[GW.format(number)] = behaviour

    def calls_to(self, number: str) -> int:
        return len(self.emu.originates_to(number))

    async def call(self, method: str, path: str, body: Any = None, *, params: dict[str, str] | None = None,
                   token: str | None = None) -> tuple[int, Any]:
        async with self.http.request(method, self.api + path, json=body, params=params,
                                     headers={"Authorization": f"Bearer {token or self.token()}"}) as resp:
            text = await resp.text()
            return resp.status, json.loads(text) if text else None

    async def alarm(self, event_type: str = "smoke") -> UUID:
        """A signed device event posted to the bridge over HTTPS; the incident it opened."""
        body = self.rig.event(event_type)
        async with self.http.post(self.bridge + "/v1/events", data=body, headers=self.rig.signed_headers(body),
                                  ssl=self.tls) as resp:
            answer = await resp.json()
            assert resp.status == 202, answer
        return UUID(answer["incident_id"])

    async def state(self, incident: UUID) -> str:
        async with tenant_tx(self.pool, self.rig.tenant_id) as conn:
            return str(await conn.fetchval("SELECT state::text FROM iim.incident WHERE id = $1", incident))

    async def until(self, what: str, check: Any, timeout: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not await check():
            assert asyncio.get_running_loop().time() < deadline, f"{what}: not reached in {timeout} s"
            await asyncio.sleep(0.1)

    async def ringing(self, number: str) -> None:
        async def rang() -> bool:
            return self.calls_to(number) > 0
        await self.until(f"a call to {number}", rang)

    async def audit_by(self, actor: str) -> list[dict[str, Any]]:
        """The tenant's chained audit rows written with ``actor``, oldest first."""
        await audit.flush_pending(self.pool)
        async with tenant_tx(self.pool, self.rig.tenant_id) as conn:
            rows = await conn.fetch("SELECT action, entity, entity_id, detail, correlation FROM iim.audit_log "
                                    "WHERE actor = $1 ORDER BY id", actor)
        return [dict(r) for r in rows]


@asynccontextmanager
async def live_service(pg_db: PgDatabase, app_pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       numbers: tuple[str, str, str], *, vendor: VendorPeer | None = None) -> AsyncIterator[Live]:
    """``iim serve`` as the Service object: OIDC issuer, one FreeSWITCH node (the emulator, in real time so an
    unanswered alarm call rings its full 30 s), the device bridge, the scenario worker, PostgreSQL; with
    ``vendor``, the connector ``acme`` to that vendor cloud (probed every 0.2 s)."""
    owner, backup, security = numbers
    rig = await build_rig(app_pool, tmp_path, name=f"session-{owner[-4:]}", owner=owner, backup=backup,
                          security=security)
    emu = FreeSwitchEmulator(time_scale=1.0, default_target=TargetBehaviour.no_answer())
    inbound = await emu.start_inbound(password=ESL_PASSWORD)
    monkeypatch.setenv("IIM_FS_PASSWORD", ESL_PASSWORD)
    for name, value in TEST_MASTER_KEY_ENV.items():  # the module's instances share one database: one master key
        monkeypatch.setenv(name, value)
    try:
        async with running_issuer() as issuer:
            monkeypatch.setenv("IIM_OIDC_ISSUER", issuer.url)
            monkeypatch.setenv("IIM_OIDC_AUDIENCE", AUDIENCE)
            monkeypatch.delenv("IIM_ADMIN_TOKENS_REF", raising=False)  # the JWT is the only way in
            connectors = [] if vendor is None else [{"name": "acme", "plugin": "webhook", "config": {
                "base_url": vendor.url, "paths": {"send_notification": "/notify"}, "probe_path": "/health",
                "auth": {"kind": "bearer", "token_ref": "env:ACME_TOKEN"}, "signing_secret_ref": "env:ACME_SIGNING"}}]
            monkeypatch.setenv("ACME_TOKEN", STATIC_TOKEN)
            monkeypatch.setenv("ACME_SIGNING", SIGNING_SECRET_TEXT)
            settings = Settings(esl_port=0, http_port=0, bridge_port=0, data_dir=str(tmp_path / "pg"),
                                fs_nodes=[{"host": "127.0.0.1", "port": inbound.port, "name": "fs1"}],
                                connectors=connectors, connector_probe_interval_s=0.2)
            async with Service(settings, database=DatabaseUrls(pg_db.app_url, pg_db.cache_url)) as service:
                running = service.running
                assert running.bridge_port is not None
                # The bridge's self-signed certificate (made in the data directory's parent), trusted as such.
                tls = ssl.create_default_context(cafile=str(tmp_path / "tls" / "bridge-cert.pem"))
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
                    live = Live(rig, app_pool, emu, issuer, f"http://127.0.0.1:{running.http_port}",
                                f"https://127.0.0.1:{running.bridge_port}", tls, http)
                    await live.until("the switch connected", _connected(service))
                    yield live
    finally:
        await emu.close()


def _connected(service: Service) -> Any:
    async def check() -> bool:
        return all(c.connected for c in service.inbound)
    return check


@pytest.mark.timeout(180)
async def test_an_operator_session_over_the_api_is_audited_step_by_step_with_the_oidc_actor(
        pg_db: PgDatabase, app_pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with live_service(pg_db, app_pool, tmp_path, monkeypatch,
                            ("+79034440001", "+79034440002", "+79034440003")) as live:
        rig = live.rig
        incident = await live.alarm("smoke")
        await live.ringing(rig.owner)  # the owner's phone rings (nobody answers: 30 s)

        status, page = await live.call("GET", live.t("/incidents"), params={"state": "notifying"})
        assert status == 200, page
        assert [i["id"] for i in page["items"]] == [str(incident)]

        status, shown = await live.call("GET", live.t(f"/incidents/{incident}"))
        assert status == 200, shown
        assert [e["type"] for e in shown["events"]] == ["smoke"]
        assert rig.owner in {a["destination"] for a in shown["actions"] if a["kind"] == "call"}

        live.script(rig.backup, TargetBehaviour.answer(after_ms=100, dtmf="1"))
        status, tested = await live.call("POST", live.t("/test-calls"),
                                         {"household_id": str(rig.household_id), "contact": rig.backup})
        assert status == 200, tested
        assert (tested["outcome"], tested["digit"], tested["confirmed"]) == ("answered", "1", True)
        live.script(rig.backup, TargetBehaviour.no_answer())

        status, closed = await live.call("POST", live.t(f"/incidents/{incident}/close"),
                                         {"reason": "burnt toast, seen on the camera"})
        assert (status, closed["state"]) == (200, "false_alarm"), closed
        assert await live.state(incident) == "false_alarm"

        steps = await live.audit_by(live.actor)
        assert [(s["action"], s["entity"]) for s in steps] == [
            ("incident.read", "incident"),  # the list
            ("incident.read", "incident"),  # the timeline
            ("test_call.placed", "household"),
            ("test_call.finished", "household"),
            ("incident.operator_decision", "incident"),
            ("incident.false_alarm", "incident"),
        ]
        listed, timeline = steps[0], steps[1]
        assert (listed["entity_id"], listed["detail"]["listed"]) == (None, 1)
        assert timeline["entity_id"] == str(incident)
        assert {s["entity_id"] for s in steps[2:4]} == {str(rig.household_id)}
        assert steps[3]["detail"]["confirmed"] is True
        assert {s["entity_id"] for s in steps[4:]} == {str(incident)}
        assert steps[4]["detail"]["note"] == "burnt toast, seen on the camera"
        requests = [s["correlation"]["request_id"] for s in steps[:5] if s["correlation"]["channel"] == "admin-api"]
        assert len(set(requests)) == 4  # list, show, test call (placed and finished), close
        assert steps[5]["correlation"]["event_id"] == steps[4]["correlation"]["event_id"]  # the state the close set

        # The timeline tells the incident's story; who read it is in the audit log, not in the story.
        status, shown = await live.call("GET", live.t(f"/incidents/{incident}"))
        assert "incident.read" not in {a["action"] for a in shown["audit"]}
        assert [a["actor"] for a in shown["audit"] if a["action"] == "incident.false_alarm"] == [live.actor]
        status, verified = await live.call("GET", live.t("/audit/verify"))
        assert (status, verified["intact"]) == (200, True), verified


@pytest.fixture
async def vendor() -> AsyncIterator[VendorPeer]:
    peer = VendorPeer()
    runner, peer.url = await serve(peer.app())
    yield peer
    await peer.close()
    await runner.cleanup()


@pytest.mark.timeout(180)
async def test_the_same_session_through_the_cli_with_the_jwt_as_the_token(
        pg_db: PgDatabase, app_pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], vendor: VendorPeer) -> None:
    async with live_service(pg_db, app_pool, tmp_path, monkeypatch,
                            ("+79034450001", "+79034450002", "+79034450003"), vendor=vendor) as live:
        rig = live.rig
        monkeypatch.setenv("IIM_ADMIN_TOKEN", live.token())
        monkeypatch.setenv("IIM_ADMIN_API", live.api)
        monkeypatch.setenv("IIM_TENANT", str(rig.tenant_id))

        async def iim(*argv: str) -> tuple[int, str, str]:
            capsys.readouterr()
            code = await asyncio.to_thread(iim_main, list(argv))
            out = capsys.readouterr()
            return code, out.out, out.err

        incident = await live.alarm("smoke")
        await live.ringing(rig.owner)
        code, out, err = await iim("incident", "list", "--state", "notifying", "-o", "json")
        assert code == 0, err
        assert [i["id"] for i in json.loads(out)["items"]] == [str(incident)]
        code, out, err = await iim("incident", "show", str(incident))
        assert code == 0, err
        assert "device event smoke" in out
        live.script(rig.security, TargetBehaviour.answer(after_ms=100, dtmf="1"))
        code, _, err = await iim("test", "call", "--household", str(rig.household_id), "--contact", rig.security)
        assert code == 0, err
        assert "test call: answered, pressed 1: confirmed" in err
        live.script(rig.security, TargetBehaviour.no_answer())
        code, out, err = await iim("incident", "close", str(incident), "--reason", "drill", "-o", "json")
        assert code == 0, err
        assert json.loads(out)["state"] == "false_alarm"

        # Connector status and a test notification through it.
        async def probed() -> bool:  # "up" only once a probe has answered
            _, listed = await live.call("GET", "/v1/connectors")
            return bool(listed["connectors"][0]["health"]["state"] == "up")
        await live.until("the connector probed", probed)
        assert "/health" in vendor.probes
        code, out, err = await iim("connector", "list")
        assert code == 0, err
        header, row = out.splitlines()[:2]
        assert header.split()[:3] == ["NAME", "PLUGIN", "STATE"]
        assert row.split()[:3] == ["acme", "webhook", "up"]
        async with tenant_tx(app_pool, rig.tenant_id) as conn:
            speaker = await registry.create(conn, registry.DEVICE, DeviceCreate(
                household_id=rig.household_id, name="Cloud speaker", type=DeviceType.SPEAKER, connector="acme",
                connector_ref="hall-speaker-1", capabilities=frozenset({DeviceCapability.CLOUD_ANNOUNCE}),
                status=DeviceStatus.ONLINE), actor="test")
        code, _, err = await iim("test", "notify", "--connector", "acme", "--device", str(speaker.id))
        assert code == 0, err
        assert [r.body["target"] for r in vendor.received] == ["hall-speaker-1"]

        steps = await live.audit_by(live.actor)
        assert [s["action"] for s in steps] == ["incident.read", "incident.read", "test_call.placed",
                                                "test_call.finished", "incident.operator_decision",
                                                "incident.false_alarm", "test_notify"]
        code, out, err = await iim("audit", "verify")
        assert code == 0, err


@pytest.mark.timeout(180)
async def test_a_brand_scoped_grant_reaches_the_incidents_of_its_brands_households_only(
        pg_db: PgDatabase, app_pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with live_service(pg_db, app_pool, tmp_path, monkeypatch,
                            ("+79034460001", "+79034460002", "+79034460003")) as live:
        rig = live.rig
        brands = {}
        for name in ("North", "South"):
            status, brand = await live.call("POST", live.t("/brands"), {"name": name})
            assert status == 201, brand
            brands[name] = brand["id"]
        status, home = await live.call("PATCH", live.t(f"/households/{rig.household_id}"),
                                       {"brand_id": brands["North"]})
        assert status == 200, home
        live.script(rig.owner, TargetBehaviour.answer(after_ms=100, dtmf="2"))
        incident = await live.alarm("smoke")

        async def settled() -> bool:
            return await live.state(incident) == "false_alarm"
        await live.until("the owner's false alarm", settled)

        north = live.token("nina@north", brand=brands["North"])
        by_household = {"household_id": str(rig.household_id)}
        status, page = await live.call("GET", live.t("/incidents"), params=by_household, token=north)
        assert status == 200, page
        assert [i["id"] for i in page["items"]] == [str(incident)]
        status, shown = await live.call("GET", live.t(f"/incidents/{incident}"), token=north)
        assert (status, shown["incident"]["id"]) == (200, str(incident))
        status, reopened = await live.call("POST", live.t(f"/incidents/{incident}/reopen"),
                                           {"reason": "smoke again", "resume_calls": False}, token=north)
        assert (status, reopened["held"]) == (200, True), reopened
        viewer = live.issuer.token("vic@north", [{"role": "viewer", "tenant": str(rig.tenant_id),
                                                  "brand": brands["North"]}])
        status, problem = await live.call("POST", live.t(f"/incidents/{incident}/close"), {"reason": "x"},
                                          token=viewer)
        assert (status, problem["error_id"]) == (403, "forbidden")  # it may read this incident, not decide

        # Another brand's grant, or a list that names no household of its brand: no such incident.
        south = live.token("sam@south", brand=brands["South"])
        for token, path, params in ((south, f"/incidents/{incident}", None),
                                    (south, f"/incidents/{incident}/close", None),
                                    (south, "/incidents", by_household), (north, "/incidents", None)):
            method = "POST" if path.endswith("/close") else "GET"
            status, problem = await live.call(method, live.t(path), {"reason": "x"} if method == "POST" else None,
                                              params=params, token=token)
            assert (status, problem["error_id"]) == (404, "not-found"), (path, params)
        status, closed = await live.call("POST", live.t(f"/incidents/{incident}/close"), {"reason": "checked"},
                                         token=north)
        assert (status, closed["state"]) == (200, "false_alarm"), closed
        decided = [s["detail"]["decision"] for s in await live.audit_by(f"nina@north ({live.issuer.url})")
                   if s["action"] == "incident.operator_decision"]
        assert decided == ["false_alarm"]
