"""Done when: a dump of the database holds no readable SMS body after an SMS went MO -> store and MT -> outbox.

A real SMSC simulator (SMPP over a socket) delivers an MO to the sender, which stores it (the subscriber has a
read_sms consent, so the body is kept); an MT is queued through the service's outbox sink and sent to the
SMSC, which receives it in clear. Then ``pg_dump`` of the whole database (and a SELECT of every row of every
table as text) must not contain either body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from uuid import UUID

import pytest

from iim.home.outbox_sink import OutboxSmsSink
from iim.keys.keyring import Keyring
from iim.sms.outbox import BackoffPolicy, InboundSms, SmsSender
from iim.sms.smpp import SmppSettings, SmppTransport
from iim.sms.smsc_sim import SmscProcess
from policy_cache import registry
from policy_cache.db import Connection, Pool, tenant_tx
from policy_cache.models import ConsentCreate, ConsentPurpose, SubscriberCreate
from tests.pg import PgDatabase, create_tenant, dump_data, every_row_as_text

MO_TEXT = "Код для входа 482913, никому не сообщайте"
MT_TEXT = "Smoke alarm at Flat 12, code 775533"


@pytest.fixture(scope="module")
def smsc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmscProcess]:
    proc = SmscProcess(tmp_path_factory.mktemp("smsc") / "smsc.jsonl")
    proc.start_sync()
    yield proc
    proc.stop_sync()


async def _until(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def _readable(text: str, clear: str) -> list[str]:
    """Where ``clear`` shows in ``text``: as is, or as the hex a bytea column would dump."""
    return [form for form in (clear, clear.encode().hex(), "482913", "775533") if form in text]


async def test_a_database_dump_holds_no_readable_sms_body_after_mo_to_store_and_mt_to_outbox(
        pg_db: PgDatabase, app_pool: Pool, admin_conn: Connection, keyring: Keyring, smsc: SmscProcess) -> None:
    tenant = await create_tenant(app_pool)
    async with tenant_tx(app_pool, tenant) as conn:
        sub = await registry.create(conn, registry.SUBSCRIBER, SubscriberCreate(msisdn="+79005550101"), actor="test")
        await registry.create(conn, registry.CONSENT, ConsentCreate(
            subscriber_id=sub.id, purpose=ConsentPurpose.READ_SMS, scope={"allowed_senders": ["*"]},
            evidence={"channel": "test"}), actor="test")
    mos: list[tuple[UUID, InboundSms]] = []

    async def on_mo(tenant_id: UUID, mo: InboundSms) -> None:
        mos.append((tenant_id, mo))

    transport = SmppTransport(SmppSettings("127.0.0.1", smsc.port, "iim", "secret", response_timeout=3.0,
                                           reconnect_min=0.05, reconnect_max=0.4))
    sender = SmsSender(app_pool, transport, keyring=keyring, on_mo=on_mo, poll_interval=0.05,
                       retry=BackoffPolicy(base=0.05, cap=0.3, max_attempts=5))
    await sender.start()
    try:
        await transport.wait_bound()
        assert await smsc.deliver(destination="79005550101", source="79161112233", text=MO_TEXT, data_coding=8) == 0
        await OutboxSmsSink(app_pool, keyring).send(tenant, "+79005550102", MT_TEXT, "dump-test/mt/0")
        sender.wake()

        async def sent() -> bool:
            async with tenant_tx(app_pool, tenant) as conn:
                return bool(await conn.fetchval("SELECT status = 'sent' FROM iim.sms_outbox WHERE key = $1",
                                                "dump-test/mt/0"))
        await _until(sent)
        await _until(lambda: _true(bool(mos)))
    finally:
        await sender.aclose()
    # The service read both in clear: the MO reached its hook, the SMSC received the MT's text.
    assert mos[0][1].body == MO_TEXT
    assert any(MT_TEXT.encode("ascii") in r.sm for r in smsc.records() if r.dest == "79005550102")
    async with tenant_tx(app_pool, tenant) as conn:
        stored = await conn.fetchrow("SELECT body, body_key FROM iim.sms_inbound")
        queued = await conn.fetchrow("SELECT body, body_key FROM iim.sms_outbox")
    assert stored is not None
    assert stored["body"] is not None
    assert stored["body_key"] is not None
    assert queued is not None
    assert queued["body_key"] is not None
    rows = await every_row_as_text(admin_conn)
    dump = await dump_data(pg_db)
    assert stored["body"] in dump  # the dump holds the rows: what it shows of the bodies is ciphertext
    for clear in (MO_TEXT, MT_TEXT):
        assert _readable(rows, clear) == []
        assert _readable(dump, clear) == []


async def _true(value: bool) -> bool:
    return value
