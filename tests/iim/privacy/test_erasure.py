"""Right to erasure end to end: ``iim subscriber erase`` through the live admin API against PostgreSQL, then
every table of the database scanned for the subscriber's SMS bodies, event payloads and recorded messages (and
the recordings directory for their files), and the audit chain verified (``iim audit verify``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from iim.admin import cli
from iim.admin.api import create_registry_app, mount_registry
from iim.admin.auth import TokenTable, hash_token
from iim.http import create_app as create_root_app
from iim.keys.keyring import Keyring
from iim.linking.sealing import seal_secret
from iim.linking.store import ACCOUNT_LINK, LINK_STATE
from policy_cache import audit, registry
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from policy_cache.models import (
    BindingCreate,
    BindingRole,
    ConsentCreate,
    ConsentPurpose,
    DeviceCreate,
    DeviceType,
    HouseholdCreate,
    SubscriberCreate,
)
from tests.pg import TEST_MASTER_KEY, PgDatabase, create_tenant

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKENS = {"adm-secret": ("root@noc", "admin"), "op-secret": ("alice@tenant", "operator")}


@dataclass
class Live:
    url: str
    pool: Pool
    tenant: UUID
    admin_url: str
    recordings: Path


@dataclass
class Person:
    id: UUID
    msisdn: str
    device: UUID
    secrets: tuple[str, ...]
    recording: str


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def live(pg_db: PgDatabase, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Live]:
    recordings = tmp_path_factory.mktemp("recordings")
    pool: Pool = await connect_pool(pg_db.app_url, role=DbRole.APP, min_size=1, max_size=4)
    tenant = await create_tenant(pool, "Erasure")
    table = {hash_token(tok): {"actor": actor, "role": role, "tenant": str(tenant) if role == "operator" else None}
             for tok, (actor, role) in TOKENS.items()}
    root = create_root_app([])
    mount_registry(root, create_registry_app(lambda: pool, tokens=TokenTable.from_json(json.dumps(table)),
                                             recordings_dir=recordings))
    server = TestServer(root, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield Live(str(server.make_url("")).rstrip("/"), pool, tenant, pg_db.admin_url, recordings)
    finally:
        await server.close()
        await pool.close()


@pytest.fixture
def iim(live: Live, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("IIM_ADMIN_TOKEN", "adm-secret")
    monkeypatch.setenv("IIM_OP_TOKEN", "op-secret")

    async def run(*argv: str, token_ref: str = "env:IIM_ADMIN_TOKEN") -> tuple[int, str]:
        capsys.readouterr()
        code = await asyncio.to_thread(cli.main, [*argv, "--tenant", str(live.tenant), "--api", live.url,
                                                  "--token-ref", token_ref, "-o", "json"])
        return code, capsys.readouterr().out

    return run


async def _person(live: Live, name: str) -> Person:
    """A subscriber who owns a household with a wearable, has SMS read out, got an SMS and whose wearable
    reported an event, and to whom a caller left a recorded message (row and file), whose home is linked to a
    vendor account (tokens sealed under the tenant's data key) with another linking started; the SMS body and
    the payload also reached audit details."""
    tag = uuid4().hex[:12]
    sms_body, payload_value = f"sms body {tag} my door code is 4711", f"pulse-note-{tag}"
    msisdn = "+7911" + str(uuid4().int)[:7]
    call_uuid, recording = f"call-{tag}", f"iim-{tag}.wav"
    (live.recordings / recording).write_bytes(b"RIFF" + tag.encode())
    async with tenant_tx(live.pool, live.tenant) as conn:
        home = await registry.create(conn, registry.HOUSEHOLD, HouseholdCreate(name=f"{name}'s flat",
                                                                               time_zone="Europe/Moscow"), actor="t")
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=msisdn, display_name=name),
                                    actor="t")
        watch = await registry.create(conn, registry.DEVICE, DeviceCreate(
            household_id=home.id, name="watch", type=DeviceType.WEARABLE), actor="t")
        await registry.create(conn, registry.BINDING, BindingCreate(subscriber_id=sub.id, household_id=home.id,
                                                                    role=BindingRole.OWNER), actor="t")
        await registry.create(conn, registry.CONSENT, ConsentCreate(
            subscriber_id=sub.id, purpose=ConsentPurpose.READ_SMS, evidence={"channel": "test"}), actor="t")
        await conn.execute(
            "INSERT INTO iim.sms_inbound (sms_id, content_hash, transport, source, destination, subscriber_id, body, "
            "body_length) VALUES ($1, $2, 'smpp', '+79990000000', $3, $4, $5, length($5))",
            f"smpp:{tag}", "0" * 64, msisdn, sub.id, sms_body)
        await conn.execute(
            "INSERT INTO iim.device_event (event_id, device_id, type, occurred_at, fingerprint, payload, channel, "
            "response) VALUES ($1, $2, 'pulse', now(), $3, $4, 'device', '{}')",
            f"ev-{tag}", watch.id, "1" * 64, {"note": payload_value, "bpm": 181})
        await conn.execute(
            "INSERT INTO iim.recorded_message (call_uuid, subscriber_id, caller, file_name, duration_ms, expires_at) "
            "VALUES ($1, $2, '+79990000000', $3, 4000, now() + interval '30 days')", call_uuid, sub.id, recording)
        await audit.append(conn, live.tenant, actor="t", action="test.note", entity="subscriber", entity_id=sub.id,
                           detail={"said": sms_body})
        await audit.stage(conn, actor="t", action="test.event", entity="device", entity_id=watch.id,
                          detail={"payload": {"note": payload_value}})
        key = await Keyring(live.pool, TEST_MASTER_KEY).active(conn, live.tenant)
        link_id, state_id = uuid4(), uuid4()
        access = seal_secret(key, ACCOUNT_LINK, link_id, "access_token", f"at-{tag}")
        refresh = seal_secret(key, ACCOUNT_LINK, link_id, "refresh_token", f"rt-{tag}")
        verifier = seal_secret(key, LINK_STATE, state_id, "code_verifier", f"cv-{tag}")
        await conn.execute(
            "INSERT INTO iim.account_link (id, household_id, connector, scopes, access_token_sealed, access_token_key, "
            "refresh_token_sealed, refresh_token_key, access_expires_at, actor) VALUES ($1, $2, 'webhook', "
            "'{send_notifications}', $3, $4, $5, $6, now() + interval '1 hour', 't')",
            link_id, home.id, access.text, access.key_id, refresh.text, refresh.key_id)
        await conn.execute(
            "INSERT INTO iim.link_state (id, household_id, connector, state_digest, verifier_sealed, verifier_key, "
            "scopes, actor, expires_at) VALUES ($1, $2, 'webhook', $3, $4, $5, '{read_events}', 't', "
            "now() + interval '10 minutes')", state_id, home.id, uuid4().bytes * 2, verifier.text, verifier.key_id)
    return Person(sub.id, msisdn, watch.id, (sms_body, payload_value, call_uuid, recording, access.text,
                                             refresh.text, verifier.text), recording)


async def _tables_holding(admin_url: str, needles: tuple[str, ...]) -> list[str]:
    """Every table of every schema but PostgreSQL's own whose rows, as text, contain one of ``needles``."""
    conn = await asyncpg.connect(admin_url)
    try:
        tables = await conn.fetch(
            """SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                  AND n.nspname NOT LIKE 'pg\\_%'""")
        assert len(tables) > 20  # the scan sees the whole schema, not an empty database
        found = []
        for t in tables:
            name = f'"{t["nspname"]}"."{t["relname"]}"'
            for needle in needles:
                if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {name} x WHERE strpos(x::text, $1) > 0)",
                                       needle):
                    found.append(f"{name}: {needle}")
        return found
    finally:
        await conn.close()


async def test_after_erase_no_table_holds_the_subscribers_content_and_the_chain_verifies(
        live: Live, iim: Any) -> None:
    gone, kept = await _person(live, "Vera"), await _person(live, "Ivan")
    assert await _tables_holding(live.admin_url, gone.secrets)  # the scan does find them before

    code, out = await iim("subscriber", "erase", str(gone.id))
    assert code == 0, out
    report = json.loads(out)
    assert report["sms_inbound_deleted"] == 1
    assert report["event_payloads_erased"] == 1
    assert report["audit_details_tombstoned"] >= 2
    assert (report["recordings_deleted"], report["recording_files_deleted"]) == (1, 1)
    assert report["account_links_revoked"] == 1

    assert await _tables_holding(live.admin_url, gone.secrets) == []
    assert not (live.recordings / gone.recording).exists()
    assert len(await _tables_holding(live.admin_url, kept.secrets)) >= 3  # another subscriber's content stays
    assert (live.recordings / kept.recording).exists()
    code, out = await iim("audit", "verify")
    assert code == 0, out
    assert json.loads(out)["intact"] is True
    async with tenant_tx(live.pool, live.tenant) as conn:
        assert await conn.fetchval("SELECT count(*) FROM iim.subscriber WHERE id = $1", gone.id) == 0
        links = await conn.fetch("SELECT status::text, reason, actor, access_token_key FROM iim.account_link "
                                 "WHERE access_token_sealed IS NULL")
        assert [tuple(r) for r in links] == [("revoked", "erased with the subscriber", "root@noc", None)]
        rows = await audit.entries(conn, entity="subscriber", entity_id=gone.id, limit=1)
    assert rows[0].action == "subscriber.erased"
    assert rows[0].actor == "root@noc"


async def test_erase_is_for_admins_only_and_an_unknown_subscriber_is_a_404(live: Live, iim: Any) -> None:
    person = await _person(live, "Olga")
    code, _ = await iim("subscriber", "erase", str(person.id), token_ref="env:IIM_OP_TOKEN")
    assert code != 0
    assert await _tables_holding(live.admin_url, person.secrets)  # nothing erased by the refused call
    assert (live.recordings / person.recording).exists()
    code, _ = await iim("subscriber", "erase", str(uuid4()))
    assert code != 0


async def test_admin_reads_of_subscribers_and_contacts_are_audited_with_the_actor(live: Live, iim: Any) -> None:
    person = await _person(live, "Petr")
    code, _ = await iim("subscriber", "show", str(person.id), token_ref="env:IIM_OP_TOKEN")
    assert code == 0
    code, _ = await iim("binding", "list", "--subscriber-id", str(person.id))
    assert code == 0
    await audit.flush_pending(live.pool)
    async with tenant_tx(live.pool, live.tenant) as conn:
        shown = await audit.entries(conn, entity="subscriber", entity_id=person.id, limit=1)
        listed = await conn.fetch("SELECT actor, detail FROM iim.audit_log WHERE action = 'binding.read'")
    assert (shown[0].action, shown[0].actor) == ("subscriber.read", "alice@tenant")
    assert [(r["actor"], r["detail"]["listed"]) for r in listed] == [("root@noc", 1)]
