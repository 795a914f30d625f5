"""``iim.sms.store``, the outbox's one writer: queueing several SMS at once, in the caller's transaction."""

from __future__ import annotations

from uuid import UUID

import pytest

from iim.keys.keyring import Keyring
from iim.sms import store
from policy_cache.db import Pool, tenant_tx
from tests.pg import create_tenant, opened


async def _bodies(pool: Pool, tenant: UUID) -> dict[str, str | None]:
    async with tenant_tx(pool, tenant) as conn:
        rows = await conn.fetch("SELECT tenant_id, key, body, body_key FROM iim.sms_outbox")
        return {r["key"]: await opened(conn, r) for r in rows}


async def test_enqueue_many_queues_each_key_once_and_the_first_body_wins(app_pool: Pool, keyring: Keyring) -> None:
    tenant = await create_tenant(app_pool)
    async with tenant_tx(app_pool, tenant) as conn:
        key = await keyring.active(conn, tenant)
        await store.enqueue_many(conn, [store.QueuedSms("k/sms/0", "+79001112233", "first"),
                                        store.QueuedSms("k/sms/1", "+79001112244", "first")], key)
    async with tenant_tx(app_pool, tenant) as conn:
        await store.enqueue_many(conn, [store.QueuedSms("k/sms/1", "+79001112244", "again")], key)
        await store.enqueue_many(conn, [store.QueuedSms("k/sms/0", "+79001112233", "again"),
                                        store.QueuedSms("k/sms/2", "+79001112255", "new")], key)
        await store.enqueue_many(conn, [], key)
    assert await _bodies(app_pool, tenant) == {"k/sms/0": "first", "k/sms/1": "first", "k/sms/2": "new"}


async def test_enqueue_many_commits_with_the_callers_transaction(app_pool: Pool, keyring: Keyring) -> None:
    tenant = await create_tenant(app_pool)

    async def queue_then_fail() -> None:
        async with tenant_tx(app_pool, tenant) as conn:
            await store.enqueue_many(conn, [store.QueuedSms("gone/sms/0", "+79001112233", "never sent")],
                                     await keyring.active(conn, tenant))
            raise LookupError("the caller fails after queueing")

    with pytest.raises(LookupError):
        await queue_then_fail()
    assert await _bodies(app_pool, tenant) == {}


async def test_count_keyed_counts_the_tenants_sms_under_a_key_prefix(app_pool: Pool, keyring: Keyring) -> None:
    tenant, other = await create_tenant(app_pool), await create_tenant(app_pool)
    for owner, keys in ((tenant, ["a/unreachable/0", "a/unreachable/1", "a/sms/0"]), (other, ["a/unreachable/0"])):
        async with tenant_tx(app_pool, owner) as conn:
            await store.enqueue_many(conn, [store.QueuedSms(k, "+79001112233", "x") for k in keys],
                                     await keyring.active(conn, owner))
    async with tenant_tx(app_pool, tenant) as conn:
        assert await store.count_keyed(conn, "a/unreachable/") == 2
        assert await store.count_keyed(conn, "b/") == 0
