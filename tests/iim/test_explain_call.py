"""`iim explain-call`: the decision and every rule, from the registry in PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fs_app.dialstring import DialSettings
from iim.explain import explain, find_snapshot, render
from policy_cache.bootstrap import load_demo
from policy_cache.db import Pool
from policy_cache.store import PgPolicyStore
from tests.pg import PgDatabase

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def store(pg_db: PgDatabase, app_pool: Pool) -> AsyncIterator[PgPolicyStore]:
    async with app_pool.acquire() as conn:
        await load_demo(conn)
    s = PgPolicyStore(pg_db.cache_url)
    yield s
    await s.aclose()


async def test_explains_quiet_hours_in_the_subscribers_local_time(store: PgPolicyStore) -> None:
    snapshot = await find_snapshot(store, "79001234567")
    assert snapshot is not None
    decision, report = explain(snapshot, "+79001234567", "+79160000000", "2026-11-25T23:30", DialSettings())
    assert report["local_time"] == "2026-11-25T23:30:00+03:00"
    assert [leg.kind for leg in decision.legs] == ["phone"]
    text = render(report, as_json=False)
    assert "quiet hours 23:00-07:00 Europe/Moscow are on: home devices skipped" in text
    assert "Dial string: {ignore_early_media=true,iim_policy_version=1}[leg_timeout=20]" in text


async def test_explains_a_daytime_fork_with_the_cloud_announcement(store: PgPolicyStore) -> None:
    snapshot = await find_snapshot(store, "+79001234567")
    assert snapshot is not None
    _, report = explain(snapshot, "+79001234567", None, "2026-11-25T12:00:00+03:00", DialSettings())
    assert [[leg["target"] for leg in group] for group in report["groups"]] == [  # type: ignore[attr-defined]
        ["+79001234567", "speaker-1@iim.local"]]
    assert report["announcements"][0]["endpoint"] == "webhook:kitchen-speaker-1"  # type: ignore[index]
    assert json.loads(render(report, as_json=True))["action"] == "ring"


@pytest.mark.parametrize("dialled", ["89001234567", "8 900 123-45-67", "0079001234567"])
async def test_a_national_or_international_form_explains_the_same_subscriber(store: PgPolicyStore, dialled: str
                                                                             ) -> None:
    found = await find_snapshot(store, dialled)
    assert found is not None
    assert found == await find_snapshot(store, "+79001234567")


async def test_unknown_number_is_not_a_subscriber(store: PgPolicyStore) -> None:
    assert await find_snapshot(store, "+10000000000") is None


def test_cli_bootstraps_an_embedded_postgres_on_a_fresh_data_dir(tmp_path: Path) -> None:
    env = {**os.environ, "IIM_DATA_DIR": str(tmp_path / "pg")}
    env.pop("IIM_DATABASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "iim", "explain-call", "--to", "+79001234567", "--from", "+79160000000",
         "--at", "2026-11-25T12:00", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["action"] == "ring"
    assert report["policy_version"] == 1
