"""The scenario registry: rows of ``iim.scenario``, each validated as a runnable :class:`Scenario` on write.

The generic CRUD (audit row per change, SQLSTATE mapping) is the registry's (``policy_cache.repository``);
this module adds what only scenarios have: their definition must validate before it is stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from iim.scenarios.model import Scenario as ScenarioDefinition
from policy_cache.db import Connection
from policy_cache.errors import InvalidData, NotFound
from policy_cache.models import ScenarioCreate, ScenarioRecord, ScenarioUpdate
from policy_cache.repository import (
    Correlation,
    _delete,
    _errors,
    _get,
    _insert,
    _list,
    _Table,
    _update,
    _values,
)

__all__ = [
    "create_scenario", "delete_scenario", "get_scenario", "get_scenario_by_name", "list_scenarios",
    "scenarios_for_household", "update_scenario",
]

_SCENARIO = _Table("scenario", ScenarioRecord, versioned=True)

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
    values = _values(data, only_set=False)
    _check_definition(values)
    row = await _insert(conn, _SCENARIO, values, actor=actor, correlation=correlation)
    return ScenarioRecord.model_validate(dict(row))


async def get_scenario(conn: Connection, scenario_id: UUID) -> ScenarioRecord:
    return ScenarioRecord.model_validate(dict(await _get(conn, _SCENARIO, scenario_id)))


async def get_scenario_by_name(conn: Connection, name: str) -> ScenarioRecord:
    rows = await _list(conn, _SCENARIO, {"name": name}, limit=1, after=None)
    if not rows:
        raise NotFound(f"scenario {name!r} not found", entity="scenario")
    return ScenarioRecord.model_validate(dict(rows[0]))


async def list_scenarios(conn: Connection, *, household_id: UUID | None = None, subscriber_id: UUID | None = None,
                         name: str | None = None, enabled: bool | None = None, limit: int = 100,
                         after: UUID | None = None) -> list[ScenarioRecord]:
    rows = await _list(conn, _SCENARIO, {"household_id": household_id, "subscriber_id": subscriber_id,
                                         "name": name, "enabled": enabled}, limit=limit, after=after)
    return [ScenarioRecord.model_validate(dict(r)) for r in rows]


async def scenarios_for_household(conn: Connection, household_id: UUID, *,
                                  enabled_only: bool = True) -> list[ScenarioRecord]:
    """The scenarios that may answer an event of the household, in priority order for
    ``iim.scenarios.engine.select_scenario``: the household's own, then the tenant-wide ones (no household,
    no subscriber); by name within each."""
    with _errors("scenario"):
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
    values = _values(data, only_set=True)
    if set(values) & set(_DEFINITION):
        current = dict(await _get(conn, _SCENARIO, scenario_id, lock=True))
        _check_definition({**current, **values})
    row = await _update(conn, _SCENARIO, scenario_id, values, actor=actor, correlation=correlation,
                        expected_version=expected_version)
    return ScenarioRecord.model_validate(dict(row))


async def delete_scenario(conn: Connection, scenario_id: UUID, *, actor: str,
                          correlation: Correlation = None) -> None:
    await _delete(conn, _SCENARIO, scenario_id, actor=actor, correlation=correlation)
