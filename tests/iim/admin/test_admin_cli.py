"""The registry CLI end to end: ``iim <entity> <action>`` against the live admin API and PostgreSQL.

Commands run through ``iim.admin.cli.main(argv)`` in a worker thread (the CLI is synchronous; the server
keeps running on the test's loop), and once as a real subprocess.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from opentelemetry.trace import SpanKind

from iim.admin import cli
from iim.admin.api import create_registry_app, mount_registry
from iim.admin.auth import TokenTable, hash_token
from iim.http import create_app as create_root_app
from policy_cache.db import DbRole, Pool, connect, connect_pool
from tests.otlp_receiver import otlp_receiver
from tests.pg import PgCluster, PgDatabase, create_tenant
from tests.tracing_rig import Spans, is_child

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKENS = {"adm-secret": ("root@noc", "admin"), "op-a-secret": ("alice@tenant-a", "operator")}


@dataclass
class Live:
    url: str
    tenant_a: UUID
    tenant_b: UUID


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(pg_db: PgDatabase) -> AsyncIterator[Live]:
    pool: Pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=4)
    directory: Pool = await connect_pool(pg_db.cache_url, role=DbRole.CACHE, min_size=1, max_size=2)
    tenant_a, tenant_b = await create_tenant(pool, "CLI A"), await create_tenant(pool, "CLI B")
    table = {hash_token(tok): {"actor": actor, "role": role, "tenant": str(tenant_a) if role == "operator" else None}
             for tok, (actor, role) in TOKENS.items()}
    root = create_root_app([])
    mount_registry(root, create_registry_app(lambda: pool, directory_pool=lambda: directory,
                                             tokens=TokenTable.from_json(json.dumps(table))))
    server = TestServer(root, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield Live(str(server.make_url("")).rstrip("/"), tenant_a, tenant_b)
    finally:
        await server.close()
        await pool.close()
        await directory.close()


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def iim(live: Live, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("IIM_ADMIN_TOKEN", "adm-secret")
    monkeypatch.setenv("IIM_OP_TOKEN", "op-a-secret")

    async def run(*argv: str, token_ref: str = "env:IIM_ADMIN_TOKEN") -> Result:
        capsys.readouterr()
        args = [*argv, "--api", live.url, "--token-ref", token_ref]
        code = await asyncio.to_thread(cli.main, args)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def _msisdn() -> str:
    return "+7911" + str(uuid4().int)[:7]


async def test_tenant_lifecycle(iim: Any) -> None:
    made = await iim("tenant", "create", "--name", "Made by CLI", "-o", "json")
    assert made.code == 0, made.err
    tid = made.json()["id"]
    listed = await iim("tenant", "list", "--all")
    assert listed.code == 0
    assert listed.out.startswith("ID ")
    assert any(line.startswith(tid) and "Made by CLI" in line for line in listed.out.splitlines())
    shown = await iim("tenant", "show", tid)
    assert shown.code == 0
    assert f"id          {tid}" in shown.out
    assert "name        Made by CLI" in shown.out
    renamed = await iim("tenant", "update", tid, "--name", "Renamed", "-o", "json")
    assert renamed.json()["name"] == "Renamed"
    deleted = await iim("tenant", "delete", tid, "--yes")
    assert (deleted.code, deleted.out) == (0, f"deleted  tenant\nid       {tid}\n")
    missing = await iim("tenant", "show", tid)
    assert missing.code == cli.EXIT_API_ERROR
    assert missing.err.startswith("error: 404 not-found: Not found: tenant")


async def test_registry_end_to_end(iim: Any, live: Live) -> None:
    t = ["--tenant", str(live.tenant_a), "-o", "json"]
    home = (await iim("household", "create", *t, "--name", "Flat 12", "--time-zone", "Europe/Moscow")).json()
    msisdn = _msisdn()
    sub = (await iim("subscriber", "create", *t, "--msisdn", msisdn, "--display-name", "Anna")).json()
    dev = await iim("device", "create", *t, "--household-id", home["id"], "--name", "Speaker", "--type", "speaker",
                    "--capabilities", "sip", "tts", "--sip-uri", "sip:spk@iim.local")
    assert dev.code == 0, dev.err
    dev_id = dev.json()["id"]
    assert sorted(dev.json()["capabilities"]) == ["sip", "tts"]
    bind = (await iim("binding", "create", *t, "--subscriber-id", sub["id"], "--household-id", home["id"],
                      "--role", "owner", "--priority", "0")).json()
    pol = await iim("policy", "create", *t, "--household-id", home["id"], "--ring-mode", "home_then_phone",
                    "--quiet-start", "22:30", "--quiet-end", "07:00", "--allowed-callers", "+79001112233")
    assert pol.code == 0, pol.err
    pol_id = pol.json()["id"]

    devices = await iim("device", "list", "--tenant", str(live.tenant_a), "--household-id", home["id"])
    assert devices.code == 0
    header, row = devices.out.splitlines()
    assert header.split() == ["ID", "HOUSEHOLD_ID", "NAME", "TYPE", "STATUS", "ENABLED"]
    assert row.split() == [dev_id, home["id"], "Speaker", "speaker", "unknown", "True"]

    found = (await iim("subscriber", "list", *t, "--msisdn", msisdn)).json()
    assert [s["id"] for s in found["items"]] == [sub["id"]]
    changed = (await iim("device", "update", *t, dev_id, "--status", "online", "--no-enabled",
                         "--unset", "sip-uri")).json()
    assert (changed["status"], changed["enabled"], changed["sip_uri"]) == ("online", False, None)
    bumped = await iim("policy", "update", *t, pol_id, "--dnd", "--expected-version", "1")
    assert bumped.json()["version"] == 2
    stale = await iim("policy", "update", *t, pol_id, "--no-dnd", "--expected-version", "1")
    assert stale.code == cli.EXIT_API_ERROR
    assert json.loads(stale.err)["error_id"] == "version-conflict"
    rebound = (await iim("binding", "update", *t, bind["id"], "--data", '{"priority": 7}')).json()
    assert rebound["priority"] == 7

    for entity, row_id in (("binding", bind["id"]), ("policy", pol_id), ("device", dev_id),
                           ("subscriber", sub["id"]), ("household", home["id"])):
        gone = await iim(entity, "delete", "--tenant", str(live.tenant_a), row_id)
        assert gone.code == 0, gone.err
        again = await iim(entity, "show", "--tenant", str(live.tenant_a), row_id)
        assert again.code == cli.EXIT_API_ERROR
        assert "404 not-found" in again.err

    audit = await iim("audit", "list", "--tenant", str(live.tenant_a), "--entity-id", dev_id)
    lines = audit.out.splitlines()
    assert lines[0].split() == ["ID", "AT", "ACTOR", "ACTION", "ENTITY", "ENTITY_ID"]
    assert [ln.split()[3] for ln in lines[1:]] == ["device.delete", "device.update", "device.create"]
    assert all(ln.split()[2] == "root@noc" for ln in lines[1:])
    verified = (await iim("audit", "verify", "--tenant", str(live.tenant_a), "-o", "json")).json()
    assert verified["intact"] is True


async def test_consent_grant_list_revoke(iim: Any, live: Live) -> None:
    t = ["--tenant", str(live.tenant_a)]
    sub = (await iim("subscriber", "create", *t, "-o", "json", "--msisdn", _msisdn())).json()
    granted = await iim("consent", "grant", *t, "-o", "json", "--subscriber-id", sub["id"], "--purpose",
                        "announce_calls", "--evidence", '{"channel": "app", "version": "tos-3"}',
                        token_ref="env:IIM_OP_TOKEN")
    assert granted.code == 0, granted.err
    consent = granted.json()
    listed = await iim("consent", "list", *t, "--subscriber-id", sub["id"])
    assert consent["id"] in listed.out
    assert "announce_calls" in listed.out
    revoked = await iim("consent", "revoke", *t, consent["id"], "-o", "json", token_ref="env:IIM_OP_TOKEN")
    assert revoked.code == 0
    assert revoked.json()["revoked_at"] is not None
    shown = (await iim("consent", "show", *t, consent["id"], "-o", "json")).json()
    assert shown["revoked_at"] == revoked.json()["revoked_at"]
    assert shown["evidence"]["version"] == "tos-3"
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["consent", "delete", *t, consent["id"]])


async def test_problems_are_printed_with_error_id_and_locations(iim: Any, live: Live) -> None:
    t = ["--tenant", str(live.tenant_a)]
    msisdn = _msisdn()
    assert (await iim("subscriber", "create", *t, "--msisdn", msisdn)).code == 0
    dup = await iim("subscriber", "create", *t, "--msisdn", msisdn)
    assert dup.code == cli.EXIT_API_ERROR
    assert dup.out == ""
    assert dup.err.splitlines() == [
        "error: 409 conflict: Conflict: subscriber already exists (subscriber_tenant_id_msisdn_key)",
        "  body.msisdn: already taken in this tenant [unique]",
    ]
    other_tenant = await iim("subscriber", "create", "--tenant", str(live.tenant_b), "--msisdn", msisdn)
    assert other_tenant.code == 0
    bad = await iim("household", "create", *t, "--name", "H", "--time-zone", "Moscow/Kremlin", "-o", "json")
    assert bad.code == cli.EXIT_API_ERROR
    problem = json.loads(bad.err)
    assert problem["error_id"] == "validation-failed"
    assert problem["errors"][0]["loc"] == ["body", "time_zone"]
    unknown = await iim("subscriber", "create", *t, "--data", '{"msisdn": "+79001234567", "colour": "red"}')
    assert "body.colour: Extra inputs are not permitted [extra_forbidden]" in unknown.err
    foreign = await iim("household", "list", "--tenant", str(live.tenant_b), token_ref="env:IIM_OP_TOKEN")
    assert foreign.code == cli.EXIT_API_ERROR
    assert foreign.err.startswith("error: 403 forbidden:")
    bad_data = await iim("subscriber", "create", *t, "--data", "[1]")
    assert bad_data.code == cli.EXIT_USAGE
    assert "--data must be a JSON object" in bad_data.err


async def test_bad_token_is_reported(iim: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IIM_WRONG_TOKEN", "guess")
    denied = await iim("tenant", "list", token_ref="env:IIM_WRONG_TOKEN")
    assert denied.code == cli.EXIT_API_ERROR
    assert denied.err.startswith("error: 401 unauthenticated: Authentication required:")


async def test_as_a_real_process(live: Live) -> None:
    env = {"IIM_ADMIN_TOKEN": "op-a-secret", "IIM_ADMIN_API": live.url, "IIM_TENANT": str(live.tenant_a),
           "PATH": "/usr/bin:/bin"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "iim.admin.cli", "subscriber", "create", "--msisdn", _msisdn(), "-o", "json",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out)["tenant_id"] == str(live.tenant_a)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "iim.admin.cli", "tenant", "create", "--name", "nope",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == cli.EXIT_API_ERROR
    assert err.decode().startswith("error: 403 forbidden:")


async def test_db_upgrade_migrates_an_empty_database(
    pg_empty_db: PgDatabase, pg_cluster: PgCluster, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
) -> None:
    # The login roles already have this session's password: hand the bootstrap the same one by reference,
    # so it does not change cluster-wide passwords under the other tests.
    monkeypatch.setenv("IIM_TEST_ROLE_PASSWORD", pg_cluster.role_password)
    monkeypatch.setenv("IIM_DB_APP_PASSWORD_REF", "env:IIM_TEST_ROLE_PASSWORD")
    monkeypatch.setenv("IIM_DB_CACHE_PASSWORD_REF", "env:IIM_TEST_ROLE_PASSWORD")
    argv = ["db", "upgrade", "--database-url", pg_empty_db.admin_url, "--data-dir", str(tmp_path / "pg")]
    assert await asyncio.to_thread(cli.main, argv) == 0
    out = capsys.readouterr().out
    assert f"database {pg_empty_db.name} on the server at IIM_DATABASE_URL: migrations applied: 1, 2" in out
    assert await asyncio.to_thread(cli.main, argv) == 0
    assert "migrations applied: none (up to date)" in capsys.readouterr().out
    conn = await connect(pg_empty_db.admin_url, role=DbRole.OWNER)
    try:
        assert await conn.fetchval("SELECT count(*) FROM iim.tenant") == 0
    finally:
        await conn.close()


async def test_audit_verify_exits_4_when_the_chain_is_broken(iim: Any, pg_db: PgDatabase) -> None:
    import asyncpg

    made = (await iim("tenant", "create", "--name", "Chain", "-o", "json")).json()
    tenant = made["id"]
    sub = await iim("subscriber", "create", "--tenant", tenant, "-o", "json", "--msisdn", _msisdn())
    assert sub.code == 0, sub.err
    intact = await iim("audit", "verify", "--tenant", tenant)
    assert (intact.code, intact.err) == (0, "")
    # A superuser can switch the append-only triggers off; the chain still tells.
    admin = await asyncpg.connect(pg_db.admin_url)
    try:
        async with admin.transaction():
            await admin.execute("SET LOCAL session_replication_role = replica")
            first = await admin.fetchval("SELECT min(id) FROM iim.audit_log WHERE tenant_id = $1", UUID(tenant))
            await admin.execute("UPDATE iim.audit_log SET actor = 'mallory' WHERE id = $1", first)
    finally:
        await admin.close()
    for output in ("table", "json"):
        broken = await iim("audit", "verify", "--tenant", tenant, "-o", output)
        assert broken.code == cli.EXIT_CHAIN_BROKEN == 4
        assert broken.err == f"error: the audit chain is broken at row {first}\n"


async def test_operators_set_caps_plan_and_allow_list_from_the_cli_and_a_premium_contact_is_refused(
    iim: Any, live: Live
) -> None:
    """Issue 14 item 7: caps were settable only by SQL, and premium numbers were accepted as contacts."""
    t = ["--tenant", str(live.tenant_b), "-o", "json"]
    refused = await iim("subscriber", "create", *t, "--msisdn", "+78091234567")
    assert refused.code == cli.EXIT_API_ERROR
    assert json.loads(refused.err)["errors"][0]["type"] == "special_range"
    limits = await iim("originate-limit", "create", *t, "--max-concurrent", "1", "--country-codes", "+7", "+375")
    assert limits.code == 0, limits.err
    assert limits.json()["country_codes"] == ["+7", "+375"]
    raised = await iim("originate-limit", "update", *t, limits.json()["id"], "--max-per-hour", "30")
    assert (raised.code, raised.json()["max_per_hour"]) == (0, 30), raised.err
    allowed = await iim("originate-allow", "create", *t, "--prefix", "+78091234567", "--note", "hotline")
    assert allowed.code == 0, allowed.err
    accepted = await iim("subscriber", "create", *t, "--msisdn", "+78091234567")
    assert accepted.code == 0, accepted.err
    audit = (await iim("audit", "list", *t, "--entity", "originate_limit")).json()
    assert [(r["action"], r["actor"]) for r in audit["items"]] == [
        ("originate_limit.update", "root@noc"), ("originate_limit.create", "root@noc")]


async def test_audit_verify_against_published_heads_exits_4_after_a_superuser_rehash(
        iim: Any, pg_db: PgDatabase, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from policy_cache.audit_heads import AuditHeadPublisher, key_id
    from tests.audit_rehash import rehash_from

    made = (await iim("tenant", "create", "--name", "Heads", "-o", "json")).json()
    tenant = made["id"]
    for _ in range(3):
        assert (await iim("subscriber", "create", "--tenant", tenant, "--msisdn", _msisdn())).code == 0
    key = Ed25519PrivateKey.generate()
    heads = tmp_path / "heads.jsonl"
    pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=2)
    try:
        async with AuditHeadPublisher(pool, key, heads_file=heads, interval=3600):
            pass  # signs the heads at start (and at stop, had they moved)
    finally:
        await pool.close()
    good = await iim("audit", "verify", "--tenant", tenant, "--heads", str(heads), "-o", "json")
    assert (good.code, good.err) == (0, ""), good.err
    assert good.json()["heads_checked"] == 1
    assert good.json()["key_id"] == key_id(key.public_key())
    wrong = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    pinned = await iim("audit", "verify", "--tenant", tenant, "--heads", str(heads), "--public-key", wrong)
    assert pinned.code == cli.EXIT_CHAIN_BROKEN
    assert "carry no valid signature" in pinned.err

    first = (await iim("audit", "list", "--tenant", tenant, "-o", "json")).json()["items"][-1]["id"]
    await rehash_from(pg_db.admin_url, UUID(tenant), first + 1)
    blind = await iim("audit", "verify", "--tenant", tenant)
    assert blind.code == 0  # the chain alone verifies after a complete re-hash ...
    caught = await iim("audit", "verify", "--tenant", tenant, "--heads", str(heads))
    assert caught.code == cli.EXIT_CHAIN_BROKEN  # ... the published head does not
    assert "no longer on the chain" in caught.err


async def test_operators_set_and_show_the_numbering_plan_from_the_cli_and_type_numbers_in_national_form(
    iim: Any, live: Live
) -> None:
    """Issue 15 item 4: a number in national form was refused at the API and passed through unrouted on calls."""
    t = ["--tenant", str(live.tenant_b), "-o", "json"]
    plan = await iim("numbering-plan", "create", *t, "--country-code", "49", "--trunk-prefix", "0",
                     "--international-prefixes", "00", "--national-lengths", "7", "8", "9", "10", "11")
    assert plan.code == 0, plan.err
    assert (plan.json()["country_code"], plan.json()["national_lengths"]) == ("49", [7, 8, 9, 10, 11])
    shown = await iim("numbering-plan", "show", *t, plan.json()["id"])
    assert shown.json() == plan.json()
    await iim("originate-allow", "create", *t, "--prefix", "+49")
    created = await iim("subscriber", "create", *t, "--msisdn", "030 1234567")
    assert (created.code, created.json()["msisdn"]) == (0, "+49301234567"), created.err
    munich = await iim("subscriber", "create", *t, "--msisdn", "89 0012345")  # a bare German national number
    assert (munich.code, munich.json()["msisdn"]) == (0, "+49890012345"), munich.err
    refused = await iim("subscriber", "create", *t, "--msisdn", "0 12345")
    assert refused.code == cli.EXIT_API_ERROR
    assert json.loads(refused.err)["errors"][0]["type"] == "not_a_number"
    audit = (await iim("audit", "list", *t, "--entity", "numbering_plan")).json()
    assert [(r["action"], r["actor"]) for r in audit["items"]] == [("numbering_plan.create", "root@noc")]


async def test_presence_the_operator_app_sets_and_clears_a_geofence_word_audited_with_the_actor(
        iim: Any, live: Live) -> None:
    tenant = str(live.tenant_a)
    made = await iim("household", "create", "--tenant", tenant, "--name", "Geofenced", "--time-zone", "Europe/Moscow",
                     "--presence", "away", "-o", "json")
    assert made.code == 0, made.err
    household = made.json()["id"]
    set_home = await iim("presence", "set", "--tenant", tenant, "--household", household, "--subject", "anna",
                         "--state", "home", "--ttl", "600", "-o", "json", token_ref="env:IIM_OP_TOKEN")
    assert set_home.code == 0, set_home.err
    view = set_home.json()
    assert (view["presence"], view["source"], view["subject"], view["baseline"]) == ("home", "app", "anna", "away")
    assert [(c["source"], c["state"], c["actor"], c["live"]) for c in view["claims"]] == [
        ("app", "home", "alice@tenant-a", True)]
    shown = await iim("presence", "show", "--tenant", tenant, "--household", household)
    assert shown.code == 0
    assert shown.err.startswith("presence home (operator app anna")
    assert shown.out.startswith("SOURCE ")
    too_long = await iim("presence", "set", "--tenant", tenant, "--household", household, "--subject", "anna",
                         "--state", "away", "--ttl", "999999")
    assert (too_long.code, too_long.err.split(":")[1].strip()) == (cli.EXIT_API_ERROR, "422 validation-failed")
    other_tenant = await iim("presence", "set", "--tenant", str(live.tenant_b), "--household", household,
                             "--subject", "anna", "--state", "away", token_ref="env:IIM_OP_TOKEN")
    assert other_tenant.code == cli.EXIT_API_ERROR
    assert "403" in other_tenant.err
    nowhere = await iim("presence", "show", "--tenant", tenant, "--household", str(uuid4()))
    assert (nowhere.code, "404" in nowhere.err) == (cli.EXIT_API_ERROR, True)
    cleared = await iim("presence", "clear", "--tenant", tenant, "--household", household, "--subject", "anna",
                        "-o", "json")
    assert cleared.code == 0, cleared.err
    assert (cleared.json()["presence"], cleared.json()["source"], cleared.json()["claims"]) == ("away", "registry", [])
    audit = await iim("audit", "list", "--tenant", tenant, "--entity-id", household, "-o", "json")
    lines = [(a["action"], a["actor"]) for a in audit.json()["items"]]
    assert lines[:2] == [("household.presence_release", "root@noc"), ("household.presence_claim", "alice@tenant-a")]


async def test_operators_list_a_households_home_networks_and_a_devices_presence_hint_from_the_cli(
        iim: Any, live: Live) -> None:
    t = ("--tenant", str(live.tenant_a))
    made = await iim("household", "create", *t, "--name", "Networked", "--time-zone", "Europe/Moscow",
                     "--home-networks", "192.0.2.0/24", "2001:db8:1::/48", "-o", "json")
    assert made.code == 0, made.err
    household = made.json()
    assert household["home_networks"] == ["192.0.2.0/24", "2001:db8:1::/48"]
    host_bits = await iim("household", "update", *t, household["id"], "--home-networks", "192.0.2.1/24", "-o", "json")
    assert host_bits.code == cli.EXIT_API_ERROR
    assert json.loads(host_bits.err)["errors"][0]["loc"] == ["body", "home_networks", 0]
    everything = await iim("household", "update", *t, household["id"], "--home-networks", "0.0.0.0/0")
    assert everything.code == cli.EXIT_API_ERROR
    moved = await iim("household", "update", *t, household["id"], "--home-networks", "198.51.100.0/24", "-o", "json")
    assert (moved.code, moved.json()["home_networks"]) == (0, ["198.51.100.0/24"]), moved.err
    speaker = await iim("device", "create", *t, "--household-id", household["id"], "--name", "Kitchen",
                        "--type", "speaker", "-o", "json")
    assert (speaker.code, speaker.json()["presence_hint"]) == (0, None), speaker.err
    hinted = await iim("device", "update", *t, speaker.json()["id"], "--presence-hint", "-o", "json")
    assert (hinted.code, hinted.json()["presence_hint"]) == (0, True), hinted.err
    by_type = await iim("device", "update", *t, speaker.json()["id"], "--unset", "presence_hint", "-o", "json")
    assert (by_type.code, by_type.json()["presence_hint"]) == (0, None), by_type.err
    audit = (await iim("audit", "list", *t, "--entity-id", household["id"], "-o", "json")).json()
    [change] = [a["detail"]["changed"] for a in audit["items"] if a["action"] == "household.update"]
    assert change["home_networks"] == {"from": ["192.0.2.0/24", "2001:db8:1::/48"], "to": ["198.51.100.0/24"]}


# -- trace context: the API's spans of a command join the operator's command --------------------------------

async def test_the_apis_spans_of_a_command_are_children_of_the_commands_own_span(
        iim: Any, live: Live, spans: Spans) -> None:
    """With a tracer provider recording in the CLI's process, the command is a span and each request a child."""
    done = await iim("tenant", "list", "--all", "--limit", "1", "-o", "json")
    assert done.code == 0, done.err
    assert done.err == ""  # nothing new printed
    command = spans.one("iim tenant list")
    assert command.kind is SpanKind.CLIENT
    served = spans.named("GET /v1/tenants")
    assert len(served) >= 2  # one request per page, every one under the command
    assert all(is_child(s, command) for s in served)


async def _cli_process(live: Live, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    base = {"IIM_ADMIN_TOKEN": "adm-secret", "IIM_ADMIN_API": live.url, "PATH": "/usr/bin:/bin"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "iim", *argv, env=base | (env or {}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_command_without_the_sdk_still_sends_one_trace_id_which_the_apis_spans_carry(
        live: Live, spans: Spans) -> None:
    """A real `iim` process (tracing off in it) generates a traceparent; the API's span carries its trace id,
    printed only with --show-trace."""
    code, out, err = await _cli_process(live, "tenant", "show", str(live.tenant_a), "-o", "json", "--show-trace")
    assert code == 0, err
    assert json.loads(out)["id"] == str(live.tenant_a)
    (line,) = err.splitlines()
    trace_id = line.removeprefix("trace_id ")
    served = spans.one("GET /v1/tenants/{tenant_id}")
    assert f"{served.context.trace_id:032x}" == trace_id
    assert served.parent is not None
    assert served.parent.is_remote

    spans.exporter.clear()
    code, out, err = await _cli_process(live, "tenant", "show", str(live.tenant_a), "-o", "json")
    assert (code, err) == (0, "")  # by default nothing new is printed
    assert f"{spans.one('GET /v1/tenants/{tenant_id}').context.trace_id:032x}" != trace_id  # a trace per command


async def test_a_traceparent_handed_down_by_a_calling_tool_is_the_parent_of_the_apis_span(
        live: Live, spans: Spans) -> None:
    outer = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    code, _, err = await _cli_process(live, "tenant", "show", str(live.tenant_a), env={"TRACEPARENT": outer})
    assert code == 0, err
    served = spans.one("GET /v1/tenants/{tenant_id}")
    assert served.parent is not None
    assert (f"{served.context.trace_id:032x}", f"{served.parent.span_id:016x}") == (outer[3:35], outer[36:52])


async def test_with_otlp_configured_the_command_exports_its_span_and_the_apis_spans_are_its_children(
        live: Live, spans: Spans) -> None:
    """The operator's environment configures OTLP as for `iim serve`: the command's span reaches the receiver
    (service iim-cli) and the API's span of its request is its child."""
    async with otlp_receiver() as receiver:
        code, _, err = await _cli_process(live, "tenant", "show", str(live.tenant_a), env={
            "IIM_TRACES_EXPORTER": "otlp", "IIM_OTLP_TRACES_ENDPOINT": receiver.url})
        assert (code, err) == (0, "")
    command = receiver.one("iim tenant show")
    assert command.kind == 3  # CLIENT
    assert command.resource["service.name"] == "iim-cli"
    served = spans.one("GET /v1/tenants/{tenant_id}")
    assert served.parent is not None
    assert (f"{served.context.trace_id:032x}", f"{served.parent.span_id:016x}") == (command.trace_id,
                                                                                     command.span_id)


async def test_a_receiver_that_hangs_holds_a_command_at_most_its_flush_timeout(live: Live) -> None:
    async with otlp_receiver(mode="hang") as receiver:
        began = time.monotonic()
        code, out, err = await _cli_process(live, "tenant", "show", str(live.tenant_a), "-o", "json", env={
            "IIM_TRACES_EXPORTER": "otlp", "IIM_OTLP_TRACES_ENDPOINT": receiver.url})
        took = time.monotonic() - began
    assert code == 0, err
    assert json.loads(out)["id"] == str(live.tenant_a)
    assert receiver.requests == 1  # the span was sent ...
    assert took < 10  # ... and the command did not wait for the exporter's 10 s timeout and retries
