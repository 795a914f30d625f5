"""The policy cache finds a subscriber by the national and international forms of its number, under the
numbering plan of the subscriber's own tenant (iim.numbering_plan, migration 0024), against a real PostgreSQL.

Before, ``lookup`` only stripped ``+``: ``89001234567`` from the switch was an unknown callee and the call
went through unrouted (issue 15 item 4)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from uuid import UUID, uuid4

import pytest

from policy_cache import registry
from policy_cache.bootstrap import Demo, load_demo
from policy_cache.cache import PolicyCache
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import NumberingPlanCreate, SubscriberCreate
from policy_cache.store import PgPolicyStore
from tests.conftest import eventually
from tests.pg import PgDatabase, create_tenant

OWNER = "+79001234567"  # the demo tenant's owner; the demo tenant has no plan row: Russia's
UK_PLAN = NumberingPlanCreate(country_code="44", trunk_prefix="0", international_prefixes=["00"],
                              national_lengths=[9, 10])


@pytest.fixture
async def demo(app_pool: Pool) -> Demo:
    async with app_pool.acquire() as conn:
        return await load_demo(conn)


@dataclass(frozen=True)
class UkTenant:
    id: UUID
    national: str  # 020 7946 xxxx, a London number of this test's own

    @property
    def e164(self) -> str:
        return "+44" + self.national[1:]


@pytest.fixture
async def uk_tenant(app_pool: Pool) -> UkTenant:
    tenant = UkTenant(await create_tenant(app_pool, "UK operator"), "0207946" + str(uuid4().int)[:4])
    async with tenant_tx(app_pool, tenant.id) as tx:
        await registry.create(tx, registry.SUBSCRIBER, SubscriberCreate(msisdn=tenant.e164), actor="test")
    return tenant


@pytest.fixture
async def cache(pg_db: PgDatabase, demo: Demo, uk_tenant: UkTenant) -> AsyncIterator[PolicyCache]:
    store = PgPolicyStore(pg_db.cache_url, connect_timeout=1.0)
    c = PolicyCache(store, resync_interval=5.0)
    await c.start(timeout=10)
    yield c
    await c.aclose()
    await store.aclose()


async def _set_plan(pool: Pool, tenant: UUID, plan: NumberingPlanCreate | None) -> None:
    async with tenant_tx(pool, tenant) as tx:
        for row in await registry.list_rows(tx, registry.NUMBERING_PLAN):
            await registry.delete(tx, registry.NUMBERING_PLAN, row.id, actor="test")
        if plan is not None:
            await registry.create(tx, registry.NUMBERING_PLAN, plan, actor="test")


@pytest.mark.parametrize("dialled", ["89001234567", "79001234567", "0079001234567", "81079001234567",
                                     "+79001234567", "9001234567"])
async def test_every_form_of_a_russian_number_finds_the_same_subscriber(cache: PolicyCache, dialled: str) -> None:
    owner = cache.lookup(OWNER)
    assert owner is not None
    assert cache.lookup(dialled) is owner


async def test_a_uk_tenants_subscriber_is_found_by_uk_national_forms_once_its_plan_arrives(
        cache: PolicyCache, app_pool: Pool, uk_tenant: UkTenant) -> None:
    subscriber = cache.lookup(uk_tenant.e164)
    assert subscriber is not None
    assert cache.lookup(uk_tenant.e164[1:]) is subscriber  # E.164 without + needs no plan
    assert cache.lookup(uk_tenant.national) is None  # read as Russian, the UK number's forms mean nothing
    await _set_plan(app_pool, uk_tenant.id, UK_PLAN)  # arrives by the change feed, no reload
    await eventually(lambda: cache.lookup(uk_tenant.national) is subscriber)
    assert cache.lookup("00" + uk_tenant.e164[1:]) is subscriber
    assert cache.lookup("89001234567") is cache.lookup(OWNER)  # the other tenants keep theirs
    await _set_plan(app_pool, uk_tenant.id, None)
    await eventually(lambda: cache.lookup(uk_tenant.national) is None)


async def test_a_national_form_reads_only_under_the_subscribers_own_plan(
        cache: PolicyCache, app_pool: Pool, uk_tenant: UkTenant) -> None:
    """``8 10 44 ...`` is how Russia dials the UK number, but its tenant's plan is the UK's: the cache does
    not reach a subscriber through another tenant's plan."""
    await _set_plan(app_pool, uk_tenant.id, UK_PLAN)
    await eventually(lambda: cache.lookup(uk_tenant.national) is not None)
    assert cache.lookup("810" + uk_tenant.e164[1:]) is None


async def test_digits_that_name_two_subscribers_under_two_plans_are_not_guessed(
        cache: PolicyCache, app_pool: Pool, demo: Demo) -> None:
    """``84912345678`` is Vietnam's +84 912 345 678 written without + and Ryazan's 8 491 234-56-78."""
    vietnam = await create_tenant(app_pool, "Vietnamese operator")
    async with tenant_tx(app_pool, vietnam) as tx:
        await registry.create(tx, registry.SUBSCRIBER, SubscriberCreate(msisdn="+84912345678"), actor="test")
    async with tenant_tx(app_pool, demo.tenant_id) as tx:
        await registry.create(tx, registry.SUBSCRIBER, SubscriberCreate(msisdn="+74912345678"), actor="test")
    await eventually(lambda: cache.lookup("+84912345678") is not None and cache.lookup("+74912345678") is not None)
    assert cache.lookup("84912345678") is None
    assert cache.lookup("+84912345678") is not cache.lookup("+74912345678")
