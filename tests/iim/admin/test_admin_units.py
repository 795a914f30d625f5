"""Admin API pieces that need no database: tokens, strict bodies, problems, OpenAPI, CLI options."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from uuid import UUID, uuid4

import pytest
from openapi_spec_validator import validate as validate_openapi

from iim.admin import cli
from iim.admin.api import ROUTES, create_registry_app
from iim.admin.auth import (
    BAD_TOKEN,
    Principal,
    Role,
    TokenConfigError,
    TokenTable,
    hash_token,
    principal_from_header,
)
from iim.admin.bodies import loads_strict
from iim.admin.problems import ALL_ERRORS, Forbidden, MalformedRequest, Unauthenticated, problem_response
from iim.admin.resources import RESOURCES
from iim.admin.settings import AdminSettings
from iim.admin.views import OPENAPI

TENANT = UUID("11111111-1111-4111-8111-111111111111")


def _table(**entries: dict[str, object]) -> TokenTable:
    return TokenTable.from_json(json.dumps({hash_token(tok): e for tok, e in entries.items()}))


def _no_pool() -> object:
    raise LookupError("no database in unit tests")


# -- tokens -------------------------------------------------------------------------------------------------

def test_token_table_maps_hash_to_principal() -> None:
    table = _table(
        root={"actor": "root@noc", "role": "admin"},
        op={"actor": "op@a", "role": "operator", "tenant": str(TENANT)},
    )
    assert table.authenticate("root") == Principal.single("root@noc", Role.ADMIN, None)
    assert table.authenticate("op") == Principal.single("op@a", Role.OPERATOR, TENANT)
    assert table.authenticate("nope") is None
    assert table.authenticate("") is None


def test_token_table_stores_hashes_not_tokens() -> None:
    with pytest.raises(TokenConfigError, match="SHA-256") as info:
        TokenTable.from_json(json.dumps({"plain-secret-token": {"actor": "x", "role": "admin"}}))
    assert "plain-secret-token" not in str(info.value)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"actor": "x", "role": "operator"}, "operator token must name its tenant"),
        ({"actor": "x", "role": "admin", "tenant": str(TENANT)}, "admin token is not bound"),
        ({"actor": "x", "role": "root"}, "Input should be"),
        ({"actor": "", "role": "viewer"}, "at least 1 character"),
        ({"actor": "x", "role": "viewer", "extra": 1}, "Extra inputs"),
    ],
)
def test_token_entries_are_validated(entry: dict[str, object], message: str) -> None:
    with pytest.raises(TokenConfigError, match=message):
        TokenTable.from_json(json.dumps({hashlib.sha256(b"t").hexdigest(): entry}))


def test_token_table_by_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = json.dumps({hash_token("abc"): {"actor": "env-admin", "role": "admin"}})
    monkeypatch.setenv("IIM_TEST_ADMIN_TOKENS", doc)
    assert TokenTable.load("env:IIM_TEST_ADMIN_TOKENS").authenticate("abc") is not None
    assert len(TokenTable.load(None)) == 0
    with pytest.raises(TokenConfigError, match="does not resolve"):
        TokenTable.load("env:IIM_TEST_ADMIN_TOKENS_MISSING")
    monkeypatch.setenv("IIM_TEST_ADMIN_TOKENS", "{oops")
    with pytest.raises(TokenConfigError, match="not JSON"):
        TokenTable.load("env:IIM_TEST_ADMIN_TOKENS")


def test_token_table_from_a_file_named_by_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({hash_token("s3cret"): {"actor": "file-op", "role": "viewer", "tenant": None}}))
    monkeypatch.setenv("IIM_ADMIN_TOKENS_REF", f"file:{path}")
    settings = AdminSettings()
    assert settings.tokens_ref == f"file:{path}"
    assert TokenTable.load(settings.tokens_ref).authenticate("s3cret") == Principal.single("file-op", Role.VIEWER, None)


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer", "Bearer   ", "Bearer wrong"])
def test_bad_authorization_headers_are_unauthenticated(header: str | None) -> None:
    table = _table(good={"actor": "a", "role": "viewer"})
    with pytest.raises(Unauthenticated) as info:
        principal_from_header(header, table)
    assert info.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert info.value.detail == BAD_TOKEN  # the same answer whatever was wrong


def test_roles_and_tenants() -> None:
    other = uuid4()
    admin = Principal.single("a", Role.ADMIN, None)
    operator = Principal.single("o", Role.OPERATOR, TENANT)
    viewer_all = Principal.single("v", Role.VIEWER, None)
    viewer_one = Principal.single("w", Role.VIEWER, TENANT)
    admin.require_admin()
    admin.require_write(other)
    operator.require_write(TENANT)
    viewer_all.require_read(other)
    viewer_one.require_read(TENANT)
    checks: list[tuple[Callable[..., None], tuple[UUID, ...]]] = [
        (operator.require_admin, ()),
        (operator.require_read, (other,)),
        (operator.require_write, (other,)),
        (viewer_all.require_write, (TENANT,)),
        (viewer_one.require_read, (other,)),
    ]
    for check, args in checks:
        with pytest.raises(Forbidden):
            check(*args)


# -- strict JSON and problems --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b'{"a": Infinity}', "Infinity"),
        (b"\xff\xfe", "not UTF-8"),
        (b"{", "not JSON"),
        (b"[" * 100_000, "nests too deeply"),
    ],
)
def test_strict_json_refuses_ambiguous_documents(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedRequest, match=message):
        loads_strict(raw)


def test_problem_document_shape() -> None:
    response = problem_response(Forbidden("nope"), "/v1/tenants")
    assert response.status == 403
    assert response.content_type == "application/problem+json"
    assert response.body is not None
    body = json.loads(bytes(response.body))  # type: ignore[arg-type]
    assert body == {"type": "urn:iim:problem:forbidden", "title": "Forbidden", "status": 403, "detail": "nope",
                    "instance": "/v1/tenants", "error_id": "forbidden"}


def test_error_ids_are_unique_and_stable() -> None:
    ids = [e.error_id for e in ALL_ERRORS]
    assert len(ids) == len(set(ids))
    assert {"validation-failed", "not-found", "conflict", "invalid-reference", "forbidden",
            "unauthenticated"} <= set(ids)


# -- OpenAPI ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registry_app() -> object:
    return create_registry_app(_no_pool, AdminSettings(), tokens=TokenTable({}))  # type: ignore[arg-type]


def test_openapi_document_is_valid_openapi_3_1(registry_app: object) -> None:
    doc = json.loads(registry_app[OPENAPI])  # type: ignore[index]
    assert doc["openapi"] == "3.1.0"
    validate_openapi(doc)


def test_openapi_lists_every_route_with_its_schemas(registry_app: object) -> None:
    app = registry_app
    doc = json.loads(app[OPENAPI])  # type: ignore[index]
    registered = set()
    for resource in app.router.resources():  # type: ignore[attr-defined]
        for route in resource:
            if route.method != "HEAD":
                registered.add((route.method.lower(), "/v1" + resource.canonical))
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert registered <= documented
    assert documented - registered == {("get", "/openapi.json")}  # the alias mounted on the root app
    schemas = doc["components"]["schemas"]
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "An admin API token (the server stores only its SHA-256) or a JWT of the configured "
                           "OIDC issuer."}
    assert "Problem" in schemas
    assert "error_id" in schemas["Problem"]["required"]
    for route in app[ROUTES]:  # type: ignore[index]
        op = doc["paths"]["/v1" + route.path][route.method.lower()]
        names = {p["name"] for p in op.get("parameters", ())}
        assert {p.name for p in route.path_params} <= names, route.operation_id
        if route.request_model is not None:
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] in schemas
            assert schemas[ref.rsplit("/", 1)[1]]["additionalProperties"] is False
        if route.response_model is not None:
            ref = op["responses"][str(route.response_status)]["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] in schemas
        if route.access.value != "public":
            assert op["security"] == [{"bearerAuth": []}]
            assert "401" in op["responses"]
            assert "403" in op["responses"]
            problem = op["responses"]["401"]["content"]["application/problem+json"]["schema"]
            assert problem == {"$ref": "#/components/schemas/Problem"}
    for res in RESOURCES:
        assert f"/v1/tenants/{{tenant_id}}/{res.plural}" in doc["paths"]
    assert "post" in doc["paths"]["/v1/tenants/{tenant_id}/consents/{id}/revoke"]
    assert "delete" not in doc["paths"]["/v1/tenants/{tenant_id}/consents/{id}"]
    query = {p["name"] for p in doc["paths"]["/v1/tenants/{tenant_id}/devices"]["get"]["parameters"]}
    assert {"limit", "after", "household_id"} <= query


# -- CLI options from the models ----------------------------------------------------------------------------

def test_cli_options_are_generated_from_the_models() -> None:
    parser = cli.build_parser()
    args = parser.parse_args([
        "device", "create", "--tenant", str(TENANT), "--household-id", str(TENANT), "--name", "Kitchen",
        "--type", "speaker", "--capabilities", "sip", "tts", "--no-enabled",
    ])
    assert cli.model_body(args) == {"household_id": str(TENANT), "name": "Kitchen", "type": "speaker",
                                    "capabilities": ["sip", "tts"], "enabled": False}
    args = parser.parse_args(["policy", "update", "-t", str(TENANT), str(TENANT), "--phone-timeout-s", "30",
                              "--allowed-callers", "--unset", "quiet-start", "--unset", "quiet_end",
                              "--expected-version", "2"])
    assert cli.model_body(args) == {"phone_timeout_s": 30, "allowed_callers": [], "quiet_start": None,
                                    "quiet_end": None}
    assert args.expected_version == 2
    args = parser.parse_args(["consent", "grant", "-t", str(TENANT), "--subscriber-id", str(TENANT),
                              "--purpose", "read_sms", "--evidence", '{"channel": "ivr"}',
                              "--data", '{"scope": {"senders": ["+79001112233"]}}'])
    assert cli.model_body(args) == {"scope": {"senders": ["+79001112233"]}, "subscriber_id": str(TENANT),
                                    "purpose": "read_sms", "evidence": {"channel": "ivr"}}


def test_cli_refuses_bad_enum_and_bad_ids(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["device", "create", "--type", "toaster"])
    assert info.value.code == cli.EXIT_USAGE
    with pytest.raises(SystemExit):
        parser.parse_args(["subscriber", "show", "not-a-uuid"])
    err = capsys.readouterr().err
    assert "invalid choice: 'toaster'" in err
    assert "is not a UUID" in err


def test_cli_table_rendering() -> None:
    out = io.StringIO()
    cli.render_table([{"id": "a", "msisdn": "+79001234567", "tags": ["x", "y"], "n": None}],
                     ("id", "msisdn", "tags", "n"), out)
    assert out.getvalue().splitlines() == ["ID  MSISDN        TAGS  N", "a   +79001234567  x,y   -"]
    out = io.StringIO()
    cli.render_table([], ("id",), out)
    assert out.getvalue() == "(none)\n"


def test_cli_token_new_prints_the_hash_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["token", "new", "--actor", "ops@a", "--role", "operator", "--tenant", str(TENANT)]) == 0
    printed = json.loads(capsys.readouterr().out)
    token = printed["token"]
    table = TokenTable.from_json(json.dumps(printed["table_entry"]))
    assert table.authenticate(token) == Principal.single("ops@a", Role.OPERATOR, TENANT)
    assert cli.main(["token", "new", "--actor", "ops@a", "--role", "operator"]) == cli.EXIT_USAGE


def test_cli_without_a_token_exits_3(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IIM_ADMIN_TOKEN", raising=False)
    assert cli.main(["tenant", "list", "--token-ref", "env:IIM_ADMIN_TOKEN"]) == cli.EXIT_UNREACHABLE
    assert "admin token" in capsys.readouterr().err


def test_cli_unreachable_api_exits_3(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IIM_TEST_TOKEN", "x")
    code = cli.main(["tenant", "list", "--api", "http://127.0.0.1:9", "--token-ref", "env:IIM_TEST_TOKEN",
                     "--timeout", "2"])
    assert code == cli.EXIT_UNREACHABLE
    assert "cannot reach the admin API" in capsys.readouterr().err


def test_register_subcommands_plugs_into_an_existing_parser() -> None:
    parser = argparse.ArgumentParser(prog="iim")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve")
    cli.register_subcommands(sub)
    names = set(sub.choices)
    assert {"serve", "tenant", "household", "subscriber", "device", "binding", "consent", "policy", "audit",
            "token", "db"} <= names
    args = parser.parse_args(["consent", "revoke", "-t", str(TENANT), str(TENANT)])
    assert callable(args.func)
