"""The SMS outbox end to end: PostgreSQL (RLS, the claim function), the sender, aiosmpplib, and a real SMSC
process (smpp34) that throttles, refuses, sends receipts and MO, and is killed and restarted."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from iim.core.errors import STORE_UNAVAILABLE
from iim.core.metrics import REGISTRY
from iim.keys.keyring import Keyring
from iim.sms.outbox import BackoffPolicy, InboundSms, OutboxRow, SmsSender
from iim.sms.smpp import SmppSettings, SmppTransport
from iim.sms.smsc_sim import SmscProcess
from iim.sms.store import enqueue_sms
from policy_cache import registry
from policy_cache.db import DbRole, Pool, connect_pool, tenant_tx
from policy_cache.models import ConsentCreate, ConsentPurpose, SubscriberCreate
from tests.pg import TEST_MASTER_KEY, create_tenant, opened, private_pg

ESME_RTHROTTLED = 0x58
ESME_RMSGQFUL = 0x14
ESME_RINVDSTADR = 0x0B
FAST = BackoffPolicy(base=0.05, factor=2.0, cap=0.3, jitter=0.5, max_attempts=10)
_numbers = itertools.count(1000)


def number() -> str:
    return f"+7904{next(_numbers):07d}"


@pytest.fixture(scope="module")
def smsc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmscProcess]:
    proc = SmscProcess(tmp_path_factory.mktemp("smsc") / "smsc.jsonl")
    proc.start_sync()
    yield proc
    proc.stop_sync()


class Hooks:
    def __init__(self) -> None:
        self.undelivered: list[tuple[UUID, OutboxRow]] = []
        self.mo: list[tuple[UUID, InboundSms]] = []

    async def on_undelivered(self, tenant_id: UUID, row: OutboxRow) -> None:
        self.undelivered.append((tenant_id, row))

    async def on_mo(self, tenant_id: UUID, mo: InboundSms) -> None:
        self.mo.append((tenant_id, mo))


@asynccontextmanager
async def sender(pool: Pool, smsc: SmscProcess, hooks: Hooks | None = None,
                 **options: Any) -> AsyncIterator[SmsSender]:
    transport = SmppTransport(SmppSettings("127.0.0.1", smsc.port, "iim", "secret", response_timeout=3.0,
                                           reconnect_min=0.05, reconnect_max=0.4))
    hooks = hooks or Hooks()
    opts: dict[str, Any] = {"retry": FAST, "poll_interval": 0.05, "lease": 30.0, "throttle_pause": 0.05,
                            "on_undelivered": hooks.on_undelivered, "on_mo": hooks.on_mo}
    opts.update(options)
    s = SmsSender(pool, transport, keyring=Keyring(pool, TEST_MASTER_KEY), **opts)
    await s.start()
    await transport.wait_bound()
    try:
        yield s
    finally:
        await s.aclose()


async def enqueue(pool: Pool, tenant_id: UUID, key: str, msisdn: str, body: str, **kw: Any) -> UUID:
    async with tenant_tx(pool, tenant_id) as conn:
        data_key = await Keyring(pool, TEST_MASTER_KEY).active(conn, tenant_id)
        return await enqueue_sms(conn, key=key, msisdn=msisdn, body=body, data_key=data_key, **kw)


async def row(pool: Pool, tenant_id: UUID, row_id: UUID) -> dict[str, Any]:
    async with tenant_tx(pool, tenant_id) as conn:
        found = await conn.fetchrow("SELECT * FROM iim.sms_outbox WHERE id = $1", row_id)
    assert found is not None
    return dict(found)


async def settle(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def settled(pool: Pool, tenant_id: UUID, *ids: UUID, states: tuple[str, ...] = ("sent", "failed"),
                  timeout: float = 10.0) -> None:
    async def done() -> bool:
        async with tenant_tx(pool, tenant_id) as conn:
            n = await conn.fetchval("SELECT count(*) FROM iim.sms_outbox WHERE id = ANY($1) AND status = ANY($2)",
                                    list(ids), list(states))
        return bool(n == len(ids))
    await settle(done, timeout)


def accepted_per_ref(smsc: SmscProcess) -> Counter[tuple[str, int]]:
    return Counter((r.ref, r.seq) for r in smsc.records() if not r.dup)


async def test_enqueue_is_idempotent_by_key(app_pool: Pool) -> None:
    tenant = await create_tenant(app_pool)
    first = await enqueue(app_pool, tenant, "incident-1/step-0/sms", "+79001112233", "Smoke!")
    again = await enqueue(app_pool, tenant, "incident-1/step-0/sms", "+79001112233", "Smoke, changed")
    assert first == again
    stored = await row(app_pool, tenant, first)
    stored["body"] = await opened(app_pool, stored)
    assert (stored["body"], stored["status"], stored["attempts"], stored["flash"]) == ("Smoke!", "queued", 0, False)


async def test_queued_sms_of_several_tenants_are_sent_and_recorded_with_their_smsc_ids(
        app_pool: Pool, smsc: SmscProcess) -> None:
    await smsc.set_rules()
    a, b = await create_tenant(app_pool), await create_tenant(app_pool)
    long_ru = "Внимание! Сработал датчик дыма на кухне, квартира 12. " * 3 + "Позвоните 112."
    ids = {
        "gsm": (a, await enqueue(app_pool, a, "k-gsm", number(), "Smoke alarm, Flat 12")),
        "ru": (b, await enqueue(app_pool, b, "k-ru", number(), long_ru)),
        "flash": (a, await enqueue(app_pool, a, "k-flash", number(), "FIRE! Leave now", flash=True)),
    }
    async with sender(app_pool, smsc):
        for tenant, rid in ids.values():
            await settled(app_pool, tenant, rid)
    records = {(r.ref, r.seq): r for r in smsc.records()}
    for name, (tenant, rid) in ids.items():
        stored = await row(app_pool, tenant, rid)
        assert stored["status"] == "sent", name
        assert stored["attempts"] == 1
        assert stored["transport"] == "smpp"
        assert stored["sent_at"] is not None
        expected = 3 if name == "ru" else 1
        assert stored["segments"] == expected
        assert stored["smsc_message_ids"] == [records[(str(rid), i)].id for i in range(1, expected + 1)]
    assert records[(str(ids["flash"][1]), 1)].dc == 0x10
    assert {records[(str(ids["ru"][1]), i)].dc for i in (1, 2, 3)} == {0x08}


async def test_throttled_sms_is_retried_later_and_sent_once(app_pool: Pool, smsc: SmscProcess) -> None:
    tenant = await create_tenant(app_pool)
    msisdn = number()
    await smsc.set_rules({"status": ESME_RTHROTTLED, "destination": msisdn[1:], "times": 2})
    rid = await enqueue(app_pool, tenant, "throttled", msisdn, "Please slow down")
    throttled_before = _retries("throttled")
    started = time.monotonic()
    async with sender(app_pool, smsc):
        await settled(app_pool, tenant, rid)
    stored = await row(app_pool, tenant, rid)
    assert stored["status"] == "sent"
    assert stored["attempts"] == 3
    assert time.monotonic() - started >= 0.05  # it waited before trying again
    assert _retries("throttled") - throttled_before == 2
    assert accepted_per_ref(smsc)[(str(rid), 1)] == 1
    assert sum(1 for r in smsc.records() if r.ref == str(rid)) == 1


def _retries(reason: str) -> float:
    return REGISTRY.get_sample_value("iim_sms_retries_total", {"reason": reason}) or 0.0


async def test_queue_full_is_retried_and_then_sent(app_pool: Pool, smsc: SmscProcess) -> None:
    tenant = await create_tenant(app_pool)
    msisdn = number()
    await smsc.set_rules({"status": ESME_RMSGQFUL, "destination": msisdn[1:], "times": 1})
    rid = await enqueue(app_pool, tenant, "queue-full", msisdn, "Queue full once")
    async with sender(app_pool, smsc):
        await settled(app_pool, tenant, rid)
    stored = await row(app_pool, tenant, rid)
    assert (stored["status"], stored["attempts"]) == ("sent", 2)
    assert accepted_per_ref(smsc)[(str(rid), 1)] == 1


async def test_rejected_destination_fails_at_once_without_retry(app_pool: Pool, smsc: SmscProcess) -> None:
    tenant = await create_tenant(app_pool)
    msisdn = number()
    await smsc.set_rules({"status": ESME_RINVDSTADR, "destination": msisdn[1:]})
    rid = await enqueue(app_pool, tenant, "bad-dest", msisdn, "Nobody home")
    async with sender(app_pool, smsc):
        await settled(app_pool, tenant, rid)
    stored = await row(app_pool, tenant, rid)
    assert (stored["status"], stored["attempts"]) == ("failed", 1)
    assert "ESME_RINVDSTADR" in stored["last_error"]
    await smsc.set_rules()


async def test_receipts_mark_rows_delivered_or_undelivered_and_undelivered_calls_the_hook(
        app_pool: Pool, smsc: SmscProcess) -> None:
    await smsc.set_rules()
    tenant = await create_tenant(app_pool)
    good, bad = number(), number()
    await smsc.set_receipts({good[1:]: "DELIVRD", bad[1:]: "UNDELIV"})
    ok_long = await enqueue(app_pool, tenant, "dlr-ok", good, "y" * 320)  # 3 parts, 3 receipts
    lost = await enqueue(app_pool, tenant, "dlr-bad", bad, "Are you there?", incident_id=None)
    hooks = Hooks()
    async with sender(app_pool, smsc, hooks):
        await settled(app_pool, tenant, ok_long, states=("delivered",))
        await settled(app_pool, tenant, lost, states=("undelivered",))
        await settle(lambda: _true(len(hooks.undelivered) == 1))
    delivered = await row(app_pool, tenant, ok_long)
    assert sorted(delivered["delivered_ids"]) == sorted(delivered["smsc_message_ids"])
    assert delivered["delivered_at"] is not None
    failed = await row(app_pool, tenant, lost)
    assert (failed["receipt_state"], failed["receipt_error"]) == ("undelivered", "001")
    [(hook_tenant, hook_row)] = hooks.undelivered
    assert (hook_tenant, hook_row.id, hook_row.key, hook_row.status) == (tenant, lost, "dlr-bad", "undelivered")
    await smsc.set_receipts({})


async def _true(value: bool) -> bool:
    return value


async def test_mo_is_stored_once_even_if_redelivered_and_reaches_the_hook(app_pool: Pool, smsc: SmscProcess) -> None:
    tenant = await create_tenant(app_pool)
    owner = number()
    async with tenant_tx(app_pool, tenant) as conn:
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=owner), actor="test")
    hooks = Hooks()
    async with sender(app_pool, smsc, hooks):
        for _ in range(2):  # the SMSC redelivers (our ack was "lost")
            assert await smsc.deliver(destination=owner[1:], source="79167770000", text="Call me back") == 0
        assert await smsc.deliver(destination="79990000000", source="79167770000", text="Nobody's number") == 0
        await settle(lambda: _true(len(hooks.mo) == 1))
        await asyncio.sleep(0.2)
    async with tenant_tx(app_pool, tenant) as conn:
        stored = await conn.fetch("SELECT * FROM iim.sms_inbound")
    assert len(stored) == 1
    mo = stored[0]
    assert (mo["source"], mo["destination"], mo["subscriber_id"]) == ("+79167770000", owner, sub.id)
    assert mo["handled_at"] is None
    [(hook_tenant, inbound)] = hooks.mo
    assert (hook_tenant, inbound.id, inbound.body) == (tenant, mo["id"], "Call me back")


async def test_mo_body_without_a_read_sms_consent_is_never_stored_only_its_metadata(
        app_pool: Pool, smsc: SmscProcess) -> None:
    tenant = await create_tenant(app_pool)
    owner = number()
    async with tenant_tx(app_pool, tenant) as conn:
        await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=owner), actor="test")
    hooks = Hooks()
    async with sender(app_pool, smsc, hooks):
        assert await smsc.deliver(destination=owner[1:], source="79167770000", text="Private: 123456") == 0
        await settle(lambda: _true(len(hooks.mo) == 1))
    async with tenant_tx(app_pool, tenant) as conn:
        [mo] = await conn.fetch("SELECT * FROM iim.sms_inbound")
    assert mo["body"] is None
    assert (mo["source"], mo["body_length"], len(mo["content_hash"])) == ("+79167770000", 15, 64)
    assert hooks.mo[0][1].body == "Private: 123456"  # the hook still decides (and audits the refusal)


async def test_consented_mo_body_is_kept_for_the_retention_then_purged_by_the_sender(
        app_pool: Pool, smsc: SmscProcess) -> None:
    tenant = await create_tenant(app_pool)
    owner = number()
    async with tenant_tx(app_pool, tenant) as conn:
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=owner), actor="test")
        await registry.create(conn, registry.CONSENT, ConsentCreate(
            subscriber_id=sub.id, purpose=ConsentPurpose.READ_SMS, scope={"allowed_senders": ["*"]}, evidence={"channel": "test"}),
            actor="test")
    hooks = Hooks()

    async def body() -> str | None:
        async with tenant_tx(app_pool, tenant) as conn:
            row = await conn.fetchrow("SELECT tenant_id, sms_id, body, body_key FROM iim.sms_inbound")
            return await opened(conn, row, table="sms_inbound")

    async with sender(app_pool, smsc, hooks, mo_body_retention=1.0, purge_interval=0.1):
        assert await smsc.deliver(destination=owner[1:], source="79167770000", text="Read me out") == 0
        await settle(lambda: _true(len(hooks.mo) == 1))
        assert await body() == "Read me out"  # kept while it may be read out
        await settle(lambda: _is_none(body()), timeout=5)
    async with tenant_tx(app_pool, tenant) as conn:
        [mo] = await conn.fetch("SELECT * FROM iim.sms_inbound")
    assert mo["body_purged_at"] is not None
    assert mo["content_hash"] is None  # unkeyed, it would give a short body back by brute force
    assert (mo["source"], mo["body_length"], mo["subscriber_id"]) == ("+79167770000", 11, sub.id)
    assert (REGISTRY.get_sample_value("iim_sms_mo_bodies_purged_total") or 0) >= 1


async def test_the_content_hash_of_an_mo_never_stored_goes_after_the_retention_too(
        app_pool: Pool, smsc: SmscProcess) -> None:
    """A 6-digit code's sha256 is a lookup away from the code: no hash outlives the body's retention."""
    tenant = await create_tenant(app_pool)
    owner = number()
    async with tenant_tx(app_pool, tenant) as conn:
        await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=owner), actor="test")
    hooks = Hooks()

    async def content_hash() -> str | None:
        async with tenant_tx(app_pool, tenant) as conn:
            value: str | None = await conn.fetchval("SELECT content_hash FROM iim.sms_inbound")
        return value

    async with sender(app_pool, smsc, hooks, mo_body_retention=1.0, purge_interval=0.1):
        assert await smsc.deliver(destination=owner[1:], source="79167770001", text="482913") == 0
        await settle(lambda: _true(len(hooks.mo) == 1))
        await settle(lambda: _is_none(content_hash()), timeout=5)
    async with tenant_tx(app_pool, tenant) as conn:
        [mo] = await conn.fetch("SELECT sms_id, body FROM iim.sms_inbound")
    assert mo["body"] is None


async def _is_none(value: Awaitable[object]) -> bool:
    return await value is None


async def test_rows_left_sending_by_a_crashed_sender_are_claimed_again_after_their_lease(
        app_pool: Pool, smsc: SmscProcess) -> None:
    await smsc.set_rules()
    tenant = await create_tenant(app_pool)
    rid = await enqueue(app_pool, tenant, "orphan", number(), "Claimed by a sender that died")
    async with app_pool.acquire() as conn:  # a sender claims ... and dies before submitting
        claimed = await conn.fetch("SELECT * FROM iim.sms_claim(1000, $1)", timedelta(seconds=1))
    assert rid in {r["id"] for r in claimed}
    assert (await row(app_pool, tenant, rid))["status"] == "sending"
    async with sender(app_pool, smsc):
        await settled(app_pool, tenant, rid, timeout=5)
    stored = await row(app_pool, tenant, rid)
    assert (stored["status"], stored["attempts"]) == ("sent", 2)


async def test_smsc_killed_and_restarted_loses_nothing_and_delivers_each_once(
        app_pool: Pool, tmp_path: Path) -> None:
    own = SmscProcess(tmp_path / "smsc.jsonl")
    await own.start()
    tenants = [await create_tenant(app_pool) for _ in range(3)]
    ids: list[tuple[UUID, UUID]] = []
    for i in range(600):
        tenant = tenants[i % 3]
        ids.append((tenant, await enqueue(app_pool, tenant, f"bulk-{i}", number(), f"Bulk message {i}")))
    try:
        async with sender(app_pool, own, max_inflight=64) as s:
            await settle(lambda: _true(len(own.records()) >= 150), timeout=10)
            await own.kill()  # mid-run, with submits in flight
            await asyncio.sleep(0.3)
            await own.start()
            for tenant in tenants:
                await settled(app_pool, tenant, *[rid for t, rid in ids if t == tenant], states=("sent",),
                              timeout=15)
            assert s.inflight == 0
    finally:
        await own.aclose()
    submits = Counter(r.ref for r in own.records())
    delivered = Counter(r.ref for r in own.records() if not r.dup)
    assert set(delivered) == {str(rid) for _, rid in ids}  # nothing lost
    assert max(delivered.values()) == 1  # no message delivered twice
    resubmitted = sum(n - 1 for n in submits.values())
    assert resubmitted <= 64  # only what was in flight at the kill can have been submitted again


async def test_cross_tenant_entry_points_are_for_the_app_role_only(admin_conn: Any, app_pool: Pool) -> None:
    for fn in ("iim.sms_claim(integer, interval)", "iim.sms_find_by_smsc_id(text, text[])",
               "iim.subscriber_tenant(text)", "iim.sms_queue_depth()"):
        assert await admin_conn.fetchval("SELECT has_function_privilege('iim_app', $1, 'EXECUTE')", fn)
        assert not await admin_conn.fetchval("SELECT has_function_privilege('iim_cache', $1, 'EXECUTE')", fn)
        assert await admin_conn.fetchval("SELECT prosecdef FROM pg_proc WHERE oid = $1::regprocedure", fn)
    a, b = await create_tenant(app_pool), await create_tenant(app_pool)
    shared, own = number(), number()
    for tenant in (a, b):
        async with tenant_tx(app_pool, tenant) as conn:
            await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=shared), actor="test")
    async with tenant_tx(app_pool, b) as conn:
        await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn=own), actor="test")
        await conn.execute("""INSERT INTO iim.sms_inbound (sms_id, content_hash, transport, source, destination, body,
                                                          body_length)
                              VALUES ('x:1', repeat('a', 64), 'smpp', '+79160000000', $1, 'private', 7)""", own)
    assert await app_pool.fetchval("SELECT iim.subscriber_tenant($1)", own) == b
    assert await app_pool.fetchval("SELECT iim.subscriber_tenant($1)", shared) is None  # ambiguous: no guess
    assert await app_pool.fetchval("SELECT iim.subscriber_tenant('+79999999999')") is None
    async with tenant_tx(app_pool, a) as conn:  # RLS: tenant a sees none of b's MO
        assert await conn.fetchval("SELECT count(*) FROM iim.sms_inbound") == 0


async def test_sms_queued_after_a_postgresql_restart_are_sent_by_the_same_sender(smsc: SmscProcess) -> None:
    async with private_pg() as pg:
        assert pg.db is not None
        pool = await connect_pool(pg.db.app_url, role=DbRole.APP, min_size=1, max_size=4)
        try:
            tenant = await create_tenant(pool)
            async with sender(pool, smsc):
                before = await enqueue(pool, tenant, "before-restart", number(), "Before the restart")
                await settled(pool, tenant, before, states=("sent",))
                await pg.restart(down_s=1.0)
                deadline = asyncio.get_running_loop().time() + 15
                while True:  # the pool's connections died with the server
                    try:
                        after = await enqueue(pool, tenant, "after-restart", number(), "After the restart")
                        break
                    except STORE_UNAVAILABLE:
                        assert asyncio.get_running_loop().time() < deadline
                        await asyncio.sleep(0.2)
                await settled(pool, tenant, after, states=("sent",), timeout=20)
        finally:
            await pool.close()
