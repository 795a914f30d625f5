"""The registry's table specs, the admin API's OpenAPI document and the CLI cover the same entities and fields.

Each entity is described once (``policy_cache.registry.TABLES``); the API and the CLI are generated from
that description. These tests read the generated OpenAPI document and the CLI's parser tree, so a resource,
a route or a command written by hand beside the specs (and left behind when a field or an entity is added)
fails here.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

from iim.admin import cli
from iim.admin.api import create_registry_app
from iim.admin.auth import TokenTable
from iim.admin.resources import RESOURCES
from iim.admin.settings import AdminSettings
from iim.admin.views import OPENAPI
from policy_cache.registry import TABLES, TENANT, TableSpec

Spec = TableSpec[Any, Any, Any]
#: Commands that are not registry entities.
#: (incident and test: the operator desk, not registry rows; connector: the service's configuration; link: OAuth)
NOT_ENTITIES = {"audit", "token", "db", "incident", "test", "presence", "connector", "link", "hub"}
#: Options every command of an entity has besides its fields (connection, paging, body input).
COMMON_DESTS = {"help", "api", "token_ref", "timeout", "output", "show_trace", "tenant", "data", "unset", "all", "id",
                "expected_version"}


def _no_pool() -> object:
    raise LookupError("no database in unit tests")


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    app = create_registry_app(_no_pool, AdminSettings(), tokens=TokenTable({}))  # type: ignore[arg-type]
    doc: dict[str, Any] = json.loads(app[OPENAPI])
    return doc


def _commands() -> dict[str, argparse.ArgumentParser]:
    return _subparsers(cli.build_parser())


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            choices: dict[str, argparse.ArgumentParser] = action.choices
            return choices
    return {}


def _field_options(parser: argparse.ArgumentParser) -> set[str]:
    """The model fields a command takes as options (``--household-id`` -> ``household_id``)."""
    return {a.dest.removeprefix(cli._FIELD) for a in parser._actions if a.dest.startswith(cli._FIELD)}


def _other_options(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if not a.dest.startswith(cli._FIELD)} - COMMON_DESTS


def _fields(model: type[Any] | None) -> set[str]:
    return set() if model is None else set(model.model_fields)


def _shown(model: type[Any]) -> set[str]:
    """The fields a row shows (a stored secret such as a device's ``sip_ha1`` is excluded from output)."""
    return {name for name, info in model.model_fields.items() if not info.exclude}


def _schema(doc: dict[str, Any], ref_holder: dict[str, Any]) -> dict[str, Any]:
    ref = ref_holder["content"]["application/json"]["schema"]["$ref"]
    schema: dict[str, Any] = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    return schema


def _paths(spec: Spec) -> tuple[str, str]:
    if spec is TENANT:
        return "/v1/tenants", "/v1/tenants/{tenant_id}"
    base = f"/v1/tenants/{{tenant_id}}/{spec.plural}"
    return base, base + "/{id}"


def test_the_api_and_the_cli_serve_exactly_the_specified_entities(openapi: dict[str, Any]) -> None:
    assert [r.name for r in RESOURCES] == [t.name for t in TABLES if t is not TENANT]
    assert set(_commands()) - NOT_ENTITIES == {t.command for t in TABLES}
    assert {t["name"] for t in openapi["tags"]} - {"audit", "meta"} == {t.plural for t in TABLES}
    entity_paths = {p for p in openapi["paths"]
                    if p.startswith("/v1/tenants") and "/audit" not in p and not p.endswith("/presence")}
    presence = openapi["paths"]["/v1/tenants/{tenant_id}/households/{id}/presence"]
    assert set(presence) == {"get", "put", "delete"}
    assert entity_paths == {p for t in TABLES for p in _paths(t)} | {
        f"/v1/tenants/{{tenant_id}}/{t.plural}/{{id}}/revoke" for t in TABLES if t.revoked_at is not None} | {
        "/v1/tenants/{tenant_id}/subscribers/{id}/erase"}  # right to erasure (iim.privacy.erasure)


@pytest.mark.parametrize("spec", TABLES, ids=lambda t: t.name)
def test_openapi_bodies_and_rows_have_the_specs_fields(openapi: dict[str, Any], spec: Spec) -> None:
    collection, one = (openapi["paths"][p] for p in _paths(spec))
    assert set(_schema(openapi, collection["post"]["requestBody"])["properties"]) == _fields(spec.create)
    assert set(_schema(openapi, collection["post"]["responses"]["201"])["properties"]) == _shown(spec.record)
    assert set(_schema(openapi, one["get"]["responses"]["200"])["properties"]) == _shown(spec.record)
    if spec.update is None:
        assert "patch" not in one
    else:
        assert set(_schema(openapi, one["patch"]["requestBody"])["properties"]) == _fields(spec.update)
        versioned = {p["name"] for p in one["patch"].get("parameters", ()) if p["in"] == "query"}
        assert versioned == ({"expected_version"} if spec.versioned else set())
    assert ("delete" in one) is spec.deletable
    query = {p["name"] for p in collection["get"]["parameters"] if p["in"] == "query"}
    assert query == {"limit", "after"} | {f.column for f in spec.filters}


@pytest.mark.parametrize("spec", TABLES, ids=lambda t: t.name)
def test_cli_commands_take_the_specs_fields(spec: Spec) -> None:
    actions = _subparsers(_commands()[spec.command])
    expected = {spec.create_verb, "list", "show"} | ({"update"} if spec.update is not None else set()) | (
        {"delete"} if spec.deletable else set()) | ({"revoke"} if spec.revoked_at is not None else set())
    assert set(actions) - {"simulate", "templates", "erase"} == expected  # scenario tools, right to erasure
    assert _field_options(actions[spec.create_verb]) == _fields(spec.create)
    assert _other_options(actions[spec.create_verb]) == set()
    if spec.update is not None:
        assert _field_options(actions["update"]) == _fields(spec.update)
        assert _other_options(actions["update"]) == set()
    assert _field_options(actions["list"]) == {"limit", "after"} | {f.column for f in spec.filters}


@pytest.mark.parametrize("spec", TABLES, ids=lambda t: t.name)
def test_spec_names_only_columns_its_models_have(spec: Spec) -> None:
    record = _fields(spec.record)
    assert set(spec.columns) <= record
    assert {f.column for f in spec.filters} <= record & _fields(spec.create)
    assert spec.digest <= record
    assert spec.revoked_at is None or spec.revoked_at in record
    assert ("version" in record) is spec.versioned
    assert spec.tenant_column in record
    assert _fields(spec.update) <= record
    assert _fields(spec.create) <= record
