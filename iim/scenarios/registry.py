"""The scenario registry: rows of ``iim.scenario``, each validated as a runnable :class:`Scenario` on write.

The table and its generic CRUD (audit row per change, SQLSTATE mapping) are the registry's
(:data:`policy_cache.registry.SCENARIO`); this module adds what only scenarios have: their definition must
validate before it is stored, and the household's candidates are selected in priority order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from iim.scenarios.model import Scenario as ScenarioDefinition
from policy_cache import registry
from policy_cache.db import Connection
from policy_cache.errors import InvalidData, NotFound
from policy_cache.models import ScenarioCreate, ScenarioRecord, ScenarioUpdate
from policy_cache.registry import SCENARIO, Correlation

__all__ = [
    "create_scenario", "delete_scenario", "get_scenario", "get_scenario_by_name", "list_scenarios",
    "scenarios_for_household", "update_scenario",
]

_DEFINITION = ("name", "trigger", "conditions", "steps", "on_acknowledge", "enabled")


def _check_definition(values: Mapping[str, Any]) -> None:
    """Refuse a definition :class:`iim.scenarios.model.Scenario` does not accept, so every stored scenario runs."""
    try:
        ScenarioDefinition.model_validate({k: values[k] for k in _DEFINITION if k in values})
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "scenario"
        raise InvalidData(f"scenario: {where}: {first['msg']} ({exc.error_count()} error(s))",
                          entity="scenario") from exc


async def create_scenario(conn: Connection, data: ScenarioCreate, *, actor: str,
                          correlation: Correlation = None) -> ScenarioRecord:
    """:class:`InvalidData` when the definition does not validate as a :class:`iim.scenarios.model.Scenario`."""
    _check_definition(registry.row_values(data, only_set=False))
    return await registry.create(conn, SCENARIO, data, actor=actor, correlation=correlation)


async def get_scenario(conn: Connection, scenario_id: UUID) -> ScenarioRecord:
    return await registry.get(conn, SCENARIO, scenario_id)


async def get_scenario_by_name(conn: Connection, name: str) -> ScenarioRecord:
    rows = await registry.list_rows(conn, SCENARIO, name=name, limit=1)
    if not rows:
        raise NotFound(f"scenario {name!r} not found", entity="scenario")
    return rows[0]


async def list_scenarios(conn: Connection, *, household_id: UUID | None = None, subscriber_id: UUID | None = None,
                         name: str | None = None, enabled: bool | None = None, limit: int = 100,
                         after: UUID | None = None) -> list[ScenarioRecord]:
    return await registry.list_rows(conn, SCENARIO, household_id=household_id, subscriber_id=subscriber_id,
                                    name=name, enabled=enabled, limit=limit, after=after)


async def scenarios_for_household(conn: Connection, household_id: UUID, *,
                                  enabled_only: bool = True) -> list[ScenarioRecord]:
    """The scenarios that may answer an event of the household, in priority order for
    ``iim.scenarios.engine.select_scenario``: the household's own, then the tenant-wide ones (no household,
    no subscriber); by name within each."""
    with registry.store_errors(SCENARIO):
        rows = await conn.fetch(
            """SELECT * FROM iim.scenario
                WHERE (household_id = $1 OR (household_id IS NULL AND subscriber_id IS NULL))
                  AND (enabled OR NOT $2)
                ORDER BY (household_id IS NULL), name""",
            household_id, enabled_only)
    return [ScenarioRecord.model_validate(dict(r)) for r in rows]


async def update_scenario(conn: Connection, scenario_id: UUID, data: ScenarioUpdate, *, actor: str,
                          expected_version: int | None = None, correlation: Correlation = None) -> ScenarioRecord:
    """Partial update (a list field is replaced whole); the definition that results must validate.

    ``expected_version`` makes it conditional (:class:`VersionConflict`); the database bumps ``version``.
    """
    values = registry.row_values(data, only_set=True)
    if set(values) & set(_DEFINITION):
        current = await registry.get(conn, SCENARIO, scenario_id, lock=True)
        _check_definition({**current.model_dump(), **values})
    return await registry.update(conn, SCENARIO, scenario_id, data, actor=actor, correlation=correlation,
                                 expected_version=expected_version)


async def delete_scenario(conn: Connection, scenario_id: UUID, *, actor: str,
                          correlation: Correlation = None) -> None:
    await registry.delete(conn, SCENARIO, scenario_id, actor=actor, correlation=correlation)
