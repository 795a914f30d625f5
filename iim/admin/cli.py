"""``iim`` sub-commands for the registry, talking to the admin API over HTTP.

Wire into the ``iim`` parser with ``register_subcommands(subparsers)``. Commands::

    iim tenant     create|list|show|update|delete
    iim household  create|list|show|update|delete   --tenant T   (also: subscriber, device, binding,
    iim consent    grant|list|show|revoke            --tenant T    policy, brand, region, credential-ref,
                                                                   originate-limit: caps and numbering plan)
    iim originate-allow  create|list|show|delete     --tenant T   (the alert-call allow-list)
    iim audit      list|verify [--heads FILE]        --tenant T
    iim incident   list|show|acknowledge|close|reopen --tenant T
    iim test       call|notify                       --tenant T   (exit 5: not confirmed / not delivered)
    iim connector  list                                           (connector status: capabilities and health)
    iim presence   show|set|clear --household H      --tenant T   (live presence; set: the app's geofence word)
    iim link       start|status|revoke --household H --connector C --tenant T  (a household's vendor account link)
    iim hub command send|show|list --hub H           --tenant T   (a command to a local hub over MQTT)
    iim scenario   simulate|templates list|show|install  (besides create|list|show|update|delete; simulate
                                                     and templates list|show need no API)
    iim token      new|hash                          (offline: make a token and its table entry)
    iim db         upgrade                           (offline: migrate the database via the bootstrap)

The registry commands are made from the registry's table specs (``policy_cache.registry.TABLES``, through
``iim.admin.resources``) and their field options from the same pydantic models the API validates with, so
the CLI cannot drift from the API: ``iim subscriber create --tenant T --msisdn +79001234567``. Values of
list fields are given as several words (``--capabilities sip tts``), object fields as JSON, and
``--data JSON`` (or ``@file``, or ``-`` for stdin) supplies a whole body; ``update --unset FIELD``
sends ``null``. Output is a readable table (default) or ``--output json``.

Every command sends a W3C ``traceparent`` on each of its requests, so the API's spans of one command share one
trace: the command's own span when a tracer provider records in this process, else ``$TRACEPARENT`` (the
OpenTelemetry convention for a context handed down by a calling tool), else a fresh trace id per command.
Nothing new is printed unless ``--show-trace`` asks for the trace id (on stderr).

Exit codes: 0 success; 1 the API answered an error (problem details printed, ``error_id`` first);
2 usage error; 3 the API cannot be reached, or a token/reference does not resolve.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, TextIO
from urllib.parse import quote
from uuid import UUID, uuid4
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ValidationError

from iim.admin.auth import Role, TokenEntry, hash_token, new_token
from iim.admin.client import ApiClient, ApiProblem, ClientError
from iim.admin.resources import RESOURCES, ListQuery, Resource
from iim.admin.service import AuditQuery
from iim.core import tracing
from iim.core.numbering import NotANumber, to_e164
from iim.core.secrets import resolve_secret
from iim.scenarios.engine import ActionOutcome, Contact, mismatches
from iim.scenarios.model import ContactRole, Scenario
from iim.scenarios.operator.models import IncidentQuery
from iim.scenarios.simulate import format_timeline, simulate, synthetic_facts, timeline_json
from iim.scenarios.templates import TEMPLATES
from iot_bridge.event_types import EventType
from iot_bridge.mqtt.commands import HubCommandQuery
from policy_cache.models import DeviceStatus, DeviceType, PresenceState
from policy_cache.registry import TENANT

__all__ = ["register_subcommands", "main", "traced_command"]

DEFAULT_API = "http://127.0.0.1:8088"
DEFAULT_TOKEN_REF = "env:IIM_ADMIN_TOKEN"  # noqa: S105 - where the token is, not a token
EXIT_OK, EXIT_API_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
#: ``iim audit verify`` found the tenant's hash chain broken (scripts and monitoring test for this code).
EXIT_CHAIN_BROKEN = 4
#: Where a calling tool hands down its trace context (OpenTelemetry's environment-variable carrier).
TRACEPARENT_ENV = "TRACEPARENT"

Command = Callable[[argparse.Namespace], int]
_FIELD = "field_"


class CliError(Exception):
    """A problem on our side of the wire (bad --data, unresolvable token reference ...): exit 3 or 2."""

    def __init__(self, message: str, code: int = EXIT_UNREACHABLE) -> None:
        super().__init__(message)
        self.code = code


# -- option generation from the models ---------------------------------------------------------------------

def _strip_null(prop: Mapping[str, Any]) -> Mapping[str, Any]:
    variants = prop.get("anyOf")
    if isinstance(variants, list):
        rest = [v for v in variants if v.get("type") != "null"]
        if len(rest) == 1:
            return {**rest[0], **{k: v for k, v in prop.items() if k != "anyOf"}}
    return prop


def _deref(prop: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = prop.get("$ref")
    if isinstance(ref, str):
        return {**defs[ref.rsplit("/", 1)[1]], **{k: v for k, v in prop.items() if k != "$ref"}}
    return prop


def _describe(prop: Mapping[str, Any], defs: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """(kind, resolved schema): kind is string, integer, number, boolean, array or json."""
    resolved = _deref(_strip_null(prop), defs)
    kind = resolved.get("type")
    if kind in ("string", "integer", "number", "boolean"):
        return str(kind), resolved
    if kind == "array":
        items = _deref(_strip_null(resolved.get("items", {})), defs)
        if items.get("type") in ("string", "integer", "number"):
            return "array", {**resolved, "items": items}
    return "json", resolved


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg}") from exc


def _scalar(kind: str) -> Callable[[str], Any]:
    return {"integer": int, "number": float}.get(kind, str)


@functools.cache
def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


def add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel], *, required: bool) -> None:
    """One ``--field-name`` per model field (destination ``field_<name>``; absent unless given)."""
    schema = _schema(model)
    defs = schema.get("$defs", {})
    needed = set(schema.get("required", ())) if required else set()
    group = parser.add_argument_group(f"{model.__name__} fields")
    for name, prop in schema.get("properties", {}).items():
        kind, resolved = _describe(prop, defs)
        flag = "--" + name.replace("_", "-")
        doc = (prop.get("description") or resolved.get("description") or "").replace("%", "%%")
        mark = " (required)" if name in needed else ""
        common: dict[str, Any] = {"dest": _FIELD + name, "default": argparse.SUPPRESS}
        if kind == "boolean":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"{doc}{mark}", **common)
        elif kind == "array":
            items = resolved["items"]
            choices = items.get("enum")
            hint = f" one or more of {', '.join(map(str, choices))}" if choices else ""
            group.add_argument(flag, nargs="*", type=_scalar(str(items.get("type"))), metavar="VALUE",
                               help=f"{doc}{hint} (list; give none for an empty list){mark}", **common)
        elif kind == "json":
            group.add_argument(flag, type=_json_value, metavar="JSON", help=f"{doc} (JSON){mark}", **common)
        else:
            choices = resolved.get("enum")
            fmt = resolved.get("format") or resolved.get("pattern") or ("" if kind == "string" else kind)
            hint = f" [{fmt}]".replace("%", "%%") if fmt else ""
            group.add_argument(flag, type=_scalar(kind), choices=choices, metavar=None if choices else "VALUE",
                               help=f"{doc}{hint}{mark}".strip(), **common)


def _read_data(value: str) -> dict[str, Any]:
    if value == "-":
        text = sys.stdin.read()
    elif value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise CliError(f"--data {value}: {exc.strerror}", EXIT_USAGE) from exc
    else:
        text = value
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"--data is not JSON: {exc.msg} (line {exc.lineno})", EXIT_USAGE) from exc
    if not isinstance(data, dict):
        raise CliError("--data must be a JSON object", EXIT_USAGE)
    return data


def model_body(args: argparse.Namespace) -> dict[str, Any]:
    """The request body: ``--data``, then the field options, then ``--unset`` (null)."""
    body = _read_data(args.data) if getattr(args, "data", None) else {}
    for key, value in vars(args).items():
        if key.startswith(_FIELD):
            body[key[len(_FIELD):]] = value
    for name in getattr(args, "unset", None) or ():
        body[name.replace("-", "_")] = None
    return body


# -- output ------------------------------------------------------------------------------------------------

def _cell(value: Any, width: int = 40) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, list):
        text = ",".join(str(v) for v in value) or "-"
    elif isinstance(value, dict):
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    else:
        text = str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], out: TextIO) -> None:
    if not rows:
        out.write("(none)\n")
        return
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    out.write("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
    out.writelines("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in cells)


def render_record(row: Mapping[str, Any], out: TextIO) -> None:
    width = max((len(k) for k in row), default=0)
    out.writelines(f"{key.ljust(width)}  {_cell(value, 200)}\n" for key, value in row.items())


def _print_result(args: argparse.Namespace, result: Any, columns: Sequence[str], out: TextIO) -> None:
    if args.output == "json":
        out.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    elif isinstance(result, dict) and isinstance(result.get("items"), list):
        render_table(result["items"], columns, out)
        if result.get("next_after"):
            out.write(f"(more: --after {result['next_after']})\n")
    elif isinstance(result, dict):
        render_record(result, out)
    else:
        out.write(f"{result}\n")


def _print_problem(args: argparse.Namespace, exc: ApiProblem, err: TextIO) -> None:
    if getattr(args, "output", "table") == "json" and exc.problem is not None:
        err.write(json.dumps(exc.problem.model_dump(mode="json", exclude_none=True), indent=2) + "\n")
        return
    err.write(f"error: {exc.describe()}\n")
    if exc.problem is not None:
        for fe in exc.problem.errors or ():
            where = ".".join(str(p) for p in fe.loc)
            err.write(f"  {where}: {fe.msg} [{fe.type}]\n")


# -- talking to the API ------------------------------------------------------------------------------------

def traced_command(args: argparse.Namespace) -> AbstractContextManager[tracing.Span]:
    """The command's own span (``iim <command> <action>``, a client span, a child of ``$TRACEPARENT``); a no-op
    unless a tracer provider records in this process (then the API's spans are its children)."""
    words = ["iim", *(w for w in (getattr(args, name, None) for name in (
        "command", "kind", "action", "templates_action", "keys_command")) if isinstance(w, str))]
    return tracing.span(" ".join(words), parent=os.environ.get(TRACEPARENT_ENV), kind=tracing.SpanKind.CLIENT)


def _traceparent(args: argparse.Namespace) -> str:
    """The one ``traceparent`` of this command (kept on ``args``: every client of the command sends the same)."""
    known = getattr(args, "_traceparent", None)
    if isinstance(known, str):
        return known
    outer = os.environ.get(TRACEPARENT_ENV)
    chosen = (tracing.current_traceparent() or (outer if tracing.context_from(outer) is not None else None)
              or tracing.new_traceparent())
    args._traceparent = chosen
    if getattr(args, "show_trace", False):
        sys.stderr.write(f"trace_id {chosen[3:35]}\n")
    return chosen


def _client(args: argparse.Namespace) -> ApiClient:
    try:
        token = resolve_secret(args.token_ref)
    except (LookupError, ValueError) as exc:
        raise CliError(f"admin token: {exc} (set IIM_ADMIN_TOKEN or pass --token-ref)") from exc
    try:
        return ApiClient(args.api, token, timeout=args.timeout, traceparent=_traceparent(args))
    except ClientError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


def _run(action: Callable[[argparse.Namespace, ApiClient], Any], columns: Sequence[str] = ("id",),
         verdict: Callable[[Any], int] | None = None) -> Command:
    """A command that calls the API, prints the result and exits 0 (or what ``verdict`` says of the result)."""
    def command(args: argparse.Namespace) -> int:
        out, err = sys.stdout, sys.stderr
        try:
            result = action(args, _client(args))
        except ApiProblem as exc:
            _print_problem(args, exc, err)
            return EXIT_API_ERROR
        except ClientError as exc:
            err.write(f"error: {exc}\n")
            return EXIT_UNREACHABLE
        except CliError as exc:
            err.write(f"error: {exc}\n")
            return exc.code
        _print_result(args, result, columns, out)
        return EXIT_OK if verdict is None else verdict(result)

    return command


def _query(args: argparse.Namespace) -> dict[str, str | int]:
    query: dict[str, str | int] = {}
    for key, value in vars(args).items():
        if key.startswith(_FIELD) and value is not None:
            query[key[len(_FIELD):]] = value if isinstance(value, int) else str(value)
    return query


def _list_all(client: ApiClient, path: str, query: dict[str, str | int], follow: bool) -> Any:
    page = client.request("GET", path, query=query)
    if not follow:
        return page
    items = list(page["items"])
    while page.get("next_after"):
        page = client.request("GET", path, query={**query, "after": page["next_after"]})
        items.extend(page["items"])
    return {"items": items, "next_after": None}


def _tenant_path(args: argparse.Namespace) -> str:
    tenant = args.tenant or os.environ.get("IIM_TENANT")
    if not tenant:
        raise CliError("--tenant is required (or set IIM_TENANT)", EXIT_USAGE)
    try:
        return f"/v1/tenants/{UUID(tenant)}"
    except ValueError as exc:
        raise CliError(f"--tenant {tenant!r} is not a UUID", EXIT_USAGE) from exc


def _id(value: str) -> str:
    try:
        return str(UUID(value))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} is not a UUID") from exc


# -- parsers -----------------------------------------------------------------------------------------------

def _common(tenant_scoped: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--api", default=os.environ.get("IIM_ADMIN_API", DEFAULT_API),
                   help=f"admin API base URL (default $IIM_ADMIN_API or {DEFAULT_API})")
    g.add_argument("--token-ref", default=os.environ.get("IIM_ADMIN_TOKEN_REF", DEFAULT_TOKEN_REF),
                   help=f"where the bearer token is: env:VAR or file:/path (default {DEFAULT_TOKEN_REF})")
    g.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    g.add_argument("--output", "-o", choices=("table", "json"), default="table", help="output format")
    g.add_argument("--show-trace", action="store_true",
                   help="print the trace id the API's spans of this command share (stderr)")
    if tenant_scoped:
        g.add_argument("--tenant", "-t", help="tenant id (default $IIM_TENANT)")
    return p


def _add_list_options(parser: argparse.ArgumentParser, query_model: type[BaseModel]) -> None:
    add_model_options(parser, query_model, required=False)
    parser.add_argument("--all", action="store_true", help="follow every page")


def _add_body_options(parser: argparse.ArgumentParser, model: type[BaseModel], *, update: bool) -> None:
    parser.add_argument("--data", metavar="JSON|@FILE|-", help="the whole body as JSON (field options override)")
    if update:
        parser.add_argument("--unset", action="append", metavar="FIELD", help="send FIELD as null (clear it)")
    add_model_options(parser, model, required=not update)


def _register_resource(sub: Any, res: Resource) -> Any:
    """The resource's commands; returns its ``ACTION`` sub-parsers (for extra, resource-specific ones)."""
    command = res.table.command
    top = sub.add_parser(command, help=f"manage {res.plural.replace('-', ' ')} of a tenant",
                         description=res.description)
    actions = top.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = _common(tenant_scoped=True)
    label = res.table.label

    p = actions.add_parser(res.create_verb, parents=[common], help=f"{res.create_verb} a {label}")
    _add_body_options(p, res.create_model, update=False)
    p.set_defaults(func=_run(
        lambda a, c: c.request("POST", f"{_tenant_path(a)}/{res.plural}", body=model_body(a)), res.columns))

    p = actions.add_parser("list", parents=[common], help=f"list {res.plural.replace('-', ' ')}")
    _add_list_options(p, res.list_query)
    p.set_defaults(func=_run(
        lambda a, c: _list_all(c, f"{_tenant_path(a)}/{res.plural}", _query(a), a.all), res.columns))

    p = actions.add_parser("show", parents=[common], help=f"show one {label}")
    p.add_argument("id", type=_id)
    p.set_defaults(func=_run(lambda a, c: c.request("GET", f"{_tenant_path(a)}/{res.plural}/{a.id}")))

    if res.update_model is not None:
        p = actions.add_parser("update", parents=[common], help=f"change a {label} (only the fields given)")
        p.add_argument("id", type=_id)
        _add_body_options(p, res.update_model, update=True)
        if "expected_version" in res.update_query.model_fields:
            p.add_argument("--expected-version", type=int, help="refuse (409) unless still at this version")
        p.set_defaults(func=_run(lambda a, c: c.request(
            "PATCH", f"{_tenant_path(a)}/{res.plural}/{a.id}", body=model_body(a),
            query={"expected_version": a.expected_version} if getattr(a, "expected_version", None) else None,
        )))

    if res.deletable:
        p = actions.add_parser("delete", parents=[common], help=f"delete a {label}")
        p.add_argument("id", type=_id)
        p.set_defaults(func=_run(lambda a, c: _deleted(c, f"{_tenant_path(a)}/{res.plural}/{a.id}", label, a.id)))

    if res.revocable:
        p = actions.add_parser("revoke", parents=[common], help=f"revoke a {label} (the record is kept)")
        p.add_argument("id", type=_id)
        p.set_defaults(func=_run(lambda a, c: c.request("POST", f"{_tenant_path(a)}/{res.plural}/{a.id}/revoke")))
    return actions


def _register_erase(actions: Any, res: Resource) -> None:
    p = actions.add_parser("erase", parents=[_common(tenant_scoped=True)],
                           help="right to erasure (admin): remove the subscriber's personal content and the "
                                "subscriber; the audit chain still verifies")
    p.add_argument("id", type=_id)
    p.set_defaults(func=_run(lambda a, c: c.request("POST", f"{_tenant_path(a)}/{res.plural}/{a.id}/erase"),
                             ("subscriber_id", "sms_inbound_deleted", "event_payloads_erased",
                              "audit_details_tombstoned", "recordings_deleted")))


def _deleted(client: ApiClient, path: str, label: str, row_id: str) -> dict[str, str]:
    client.request("DELETE", path)
    return {"deleted": label, "id": row_id}


def _register_tenant(sub: Any) -> None:
    top = sub.add_parser("tenant", help="manage tenants (admin token for changes)")
    actions = top.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = _common(tenant_scoped=False)
    columns = TENANT.columns

    p = actions.add_parser("create", parents=[common], help="create a tenant")
    _add_body_options(p, TENANT.create, update=False)
    p.set_defaults(func=_run(lambda a, c: c.request("POST", "/v1/tenants", body=model_body(a)), columns))

    p = actions.add_parser("list", parents=[common], help="list tenants")
    _add_list_options(p, ListQuery)
    p.set_defaults(func=_run(lambda a, c: _list_all(c, "/v1/tenants", _query(a), a.all), columns))

    p = actions.add_parser("show", parents=[common], help="show a tenant")
    p.add_argument("id", type=_id)
    p.set_defaults(func=_run(lambda a, c: c.request("GET", f"/v1/tenants/{a.id}")))

    p = actions.add_parser("update", parents=[common], help="change a tenant")
    p.add_argument("id", type=_id)
    assert TENANT.update is not None
    _add_body_options(p, TENANT.update, update=True)
    p.set_defaults(func=_run(lambda a, c: c.request("PATCH", f"/v1/tenants/{a.id}", body=model_body(a))))

    p = actions.add_parser("delete", parents=[common], help="delete a tenant and its whole registry")
    p.add_argument("id", type=_id)
    p.add_argument("--yes", action="store_true", required=True, help="confirm: this deletes every row of it")
    p.set_defaults(func=_run(lambda a, c: _deleted(c, f"/v1/tenants/{a.id}", "tenant", a.id)))


def _register_audit(sub: Any) -> None:
    top = sub.add_parser("audit", help="read and verify a tenant's audit log")
    actions = top.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = _common(tenant_scoped=True)
    p = actions.add_parser("list", parents=[common], help="newest audit rows first")
    add_model_options(p, AuditQuery, required=False)
    p.set_defaults(func=_run(lambda a, c: c.request("GET", f"{_tenant_path(a)}/audit", query=_query(a)),
                             ("id", "at", "actor", "action", "entity", "entity_id")))
    p = actions.add_parser("verify", parents=[common],
                           help=f"recompute the hash chain (exit {EXIT_CHAIN_BROKEN} when it is broken)")
    p.add_argument("--heads", metavar="FILE",
                   help="signed chain heads the service published (IIM_AUDIT_HEADS_FILE): each of this tenant's "
                        "must be validly signed and still on the chain")
    p.add_argument("--public-key", metavar="KEY|file:PATH|env:VAR",
                   help="the heads' Ed25519 public key (PEM, or 32 bytes hex/base64); default: the key named in "
                        "the file, which must be one key throughout")
    p.set_defaults(func=_run(_verify_audit, ("intact", "first_broken_id", "head_id", "heads_checked",
                                             "heads_off_chain", "bad_signatures"), verdict=_chain_verdict))


def _register_presence(sub: Any) -> None:
    """``iim presence show|set|clear``: the household's live presence, and the operator app's word (geofence)."""
    top = sub.add_parser("presence", help="a household's live presence; the operator app's word (geofence)")
    actions = top.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = _common(tenant_scoped=True)

    def path(args: argparse.Namespace) -> str:
        return f"{_tenant_path(args)}/households/{args.household}/presence"

    columns = ("source", "subject", "state", "expires_at", "live", "actor")
    p = actions.add_parser("show", parents=[common], help="presence now, what decided it, every claim")
    p.add_argument("--household", type=_id, required=True, help="the household")
    p.set_defaults(func=_run(lambda a, c: _presence_page(c.request("GET", path(a))), columns))
    p = actions.add_parser("set", parents=[common], help="the app's word about one subject, with expiry "
                                                          "(geofence enter: home, leave: away)")
    p.add_argument("--household", type=_id, required=True, help="the household")
    p.add_argument("--subject", required=True, help="who the word is about (a person of the household)")
    p.add_argument("--state", required=True, choices=("home", "away"))
    p.add_argument("--ttl", type=int, default=3600, help="seconds the word counts (60..86400, default 3600)")
    p.set_defaults(func=_run(lambda a, c: _presence_page(c.request(
        "PUT", path(a), body={"subject": a.subject, "state": a.state, "ttl_s": a.ttl})), columns))
    p = actions.add_parser("clear", parents=[common], help="withdraw the app's word about one subject")
    p.add_argument("--household", type=_id, required=True, help="the household")
    p.add_argument("--subject", required=True, help="who the word was about")
    p.set_defaults(func=_run(lambda a, c: _presence_page(c.request("DELETE", path(a),
                                                                   query={"subject": a.subject})), columns))


def _register_link(sub: Any) -> None:
    """``iim link start|status|revoke``: a household's vendor account link (OAuth2 authorization code + PKCE)."""
    top = sub.add_parser("link", help="a household's vendor account link at a cloud connector (OAuth2 + PKCE)")
    actions = top.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = _common(tenant_scoped=True)

    def path(args: argparse.Namespace) -> str:
        return f"{_tenant_path(args)}/households/{args.household}/connectors/{args.connector}/links"

    def where(p: argparse.ArgumentParser) -> None:
        p.add_argument("--household", type=_id, required=True, help="the household")
        p.add_argument("--connector", required=True, help="the connector's configured name")

    columns = ("connector", "status", "scopes", "access_expires_at", "changed_at", "actor", "reason")
    p = actions.add_parser("start", parents=[common], help="start linking: prints the URL to send the household to")
    where(p)
    p.add_argument("--scope", dest="scopes", action="append", required=True,
                   choices=("read_events", "send_notifications", "voice_interaction"),
                   help="what the household is asked to allow (repeat; nothing wider exists)")
    p.set_defaults(func=_run(lambda a, c: c.request("POST", path(a), body={"scopes": a.scopes}),
                             ("authorization_url", "expires_at", "scopes")))
    p = actions.add_parser("status", parents=[common], help="the link: status, granted scopes, expiry (no tokens)")
    where(p)
    p.set_defaults(func=_run(lambda a, c: c.request("GET", path(a)), columns))
    p = actions.add_parser("revoke", parents=[common], help="unlink: revoke at the vendor and forget the tokens")
    where(p)
    p.set_defaults(func=_run(lambda a, c: c.request("DELETE", path(a)), (*columns, "vendor_revoked")))


def _argument(text: str) -> tuple[str, str | int | bool]:
    """``KEY=VALUE``: an integer or true/false as such, anything else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    if value in ("true", "false"):
        return key, value == "true"
    try:
        return key, int(value)
    except ValueError:
        return key, value


def _hub_command(args: argparse.Namespace, client: ApiClient) -> Any:
    body = {"id": args.id or f"cli-{uuid4().hex}", "name": args.name, "arguments": dict(args.arg or ())}
    return client.request("POST", f"{_tenant_path(args)}/hubs/{quote(args.hub, safe='')}/commands", body=body)


def _register_hub(sub: Any) -> None:
    """``iim hub command send|show|list``: commands to a local hub over MQTT, and the hub's answers."""
    top = sub.add_parser("hub", help="local hubs over MQTT: send a command, see its answer")
    kinds = top.add_subparsers(dest="kind", required=True, metavar="KIND")
    actions = kinds.add_parser("command", help="commands to a hub (arm, disarm, silence, test, reboot)") \
        .add_subparsers(dest="action", required=True, metavar="ACTION")
    common = _common(tenant_scoped=True)
    columns = ("id", "hub", "name", "state", "sent_at", "acked_at", "ack_detail")
    p = actions.add_parser("send", parents=[common], help="publish a command to the hub (QoS 1); the same --id "
                                                          "again returns the first result and sends nothing")
    p.add_argument("--hub", required=True, help="the hub's device id (its external_id)")
    p.add_argument("--name", required=True, choices=("arm", "disarm", "silence", "test", "reboot"))
    p.add_argument("--arg", action="append", type=_argument, metavar="KEY=VALUE",
                   help="an argument (repeat): arm mode=away|stay|night, silence duration_s=10..3600, test device=D")
    p.add_argument("--id", help="your id for the command, to retry safely (default: a new one, printed)")
    p.set_defaults(func=_run(_hub_command, columns))
    p = actions.add_parser("show", parents=[common], help="a command sent to the hub, and the hub's answer")
    p.add_argument("--hub", required=True, help="the hub's device id (its external_id)")
    p.add_argument("id", help="the command's id")
    p.set_defaults(func=_run(lambda a, c: c.request(
        "GET", f"{_tenant_path(a)}/hubs/{quote(a.hub, safe='')}/commands/{quote(a.id, safe='')}"), columns))
    p = actions.add_parser("list", parents=[common], help="the commands sent to the hub, newest first")
    p.add_argument("--hub", required=True, help="the hub's device id (its external_id)")
    _add_list_options(p, HubCommandQuery)
    p.set_defaults(func=_run(lambda a, c: _list_all(c, f"{_tenant_path(a)}/hubs/{quote(a.hub, safe='')}/commands",
                                                    _query(a), a.all), columns))


def _presence_page(view: Any) -> Any:
    """The claims as the table, the resolved presence as its title line (JSON output: the whole view)."""
    sys.stderr.write(f"{view['explanation']}\n")
    return {**view, "items": view["claims"], "next_after": None}


#: Published heads sent per request (each is ~100 bytes of JSON; the API's body limit is 64 KiB).
_HEADS_PER_REQUEST = 400


def _verify_audit(args: argparse.Namespace, client: ApiClient) -> Any:
    """``audit verify``: the chain recomputed by the API; with ``--heads``, the signatures checked here (the
    key is the verifier's, not the server's word) and every published head of the tenant sent to be found on
    the chain."""
    path = f"{_tenant_path(args)}/audit/verify"
    if not args.heads:
        return client.request("GET", path)
    from pathlib import Path

    from policy_cache import audit_heads

    tenant = path.split("/")[3]
    try:
        lines = [h for h in audit_heads.read_heads(Path(args.heads)) if str(h.get("tenant_id")) == tenant]
        key = audit_heads.load_public_key(_public_key_text(args.public_key, lines))
    except (OSError, ValueError, LookupError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    bad = audit_heads.check_signatures(lines, key)
    signed = [h for h in lines if not any(b.seq == h.get("seq") for b in bad)]
    heads = [{"seq": h["seq"], "hash": h["hash"]} for h in signed]
    status: dict[str, Any] = client.request("GET", path)
    off_chain: set[int] = set()
    for start in range(0, len(heads), _HEADS_PER_REQUEST):
        part = client.request("POST", path, body={"heads": heads[start:start + _HEADS_PER_REQUEST]})
        off_chain.update(part.get("heads_off_chain", []))
    status.update(heads_checked=len(heads), heads_off_chain=sorted(off_chain),
                  bad_signatures=[b.seq for b in bad], key_id=audit_heads.key_id(key))
    status["intact"] = bool(status.get("intact")) and not off_chain and not bad
    return status


def _public_key_text(given: str | None, lines: Sequence[Mapping[str, Any]]) -> str:
    if given:
        return resolve_secret(given) if given.startswith(("file:", "env:")) else given
    keys = {str(h.get("public_key")) for h in lines}
    if len(keys) > 1:
        raise ValueError("the heads file names several keys: give the right one with --public-key")
    if not keys:
        raise ValueError("the heads file holds no head of this tenant")
    return keys.pop()


def _chain_verdict(status: Any) -> int:
    """``audit verify`` fails (exit 4, a line on stderr) when the chain is broken, a published head is no longer
    on it, or a head's signature does not hold: a cron job or a monitoring check must not read ``intact: false``
    in a successful run as good news."""
    if isinstance(status, dict) and status.get("intact") is True:
        return EXIT_OK
    if not isinstance(status, dict):
        status = {}
    if status.get("first_broken_id") is not None:
        sys.stderr.write(f"error: the audit chain is broken at row {status.get('first_broken_id')}\n")
    if status.get("heads_off_chain"):
        sys.stderr.write("error: published chain heads are no longer on the chain (re-hashed or truncated): "
                         f"seq {', '.join(map(str, status['heads_off_chain']))}\n")
    if status.get("bad_signatures"):
        sys.stderr.write(f"error: {len(status['bad_signatures'])} published head(s) carry no valid signature\n")
    if not any(status.get(k) for k in ("first_broken_id", "heads_off_chain", "bad_signatures")):
        sys.stderr.write("error: the audit chain is broken\n")
    return EXIT_CHAIN_BROKEN


# -- incidents and tests -----------------------------------------------------------------------------------

#: ``iim test call|notify``: the API answered, but the test did not pass (not confirmed, not delivered).
EXIT_TEST_FAILED = 5
_INCIDENT_COLUMNS = ("id", "opened_at", "state", "hazard", "device_name", "step", "held", "reason")


def _print_timeline(args: argparse.Namespace, shown: Any) -> int:
    if args.output == "json":
        sys.stdout.write(json.dumps(shown, indent=2, ensure_ascii=False) + "\n")
        return EXIT_OK
    render_record(shown["incident"], sys.stdout)
    sys.stdout.write("\n")
    # One line per entry, never cut: the summary is what an operator reads.
    sys.stdout.writelines(f"{e['at']}  {e['kind']:<8}  {_cell(e['summary'], 500)}\n" for e in shown["timeline"])
    return EXIT_OK


def _register_incident(sub: Any) -> None:
    top = sub.add_parser("incident", help="list, inspect, acknowledge, close and reopen incidents")
    actions = top.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = _common(tenant_scoped=True)

    p = actions.add_parser("list", parents=[common], help="the tenant's incidents, newest first")
    _add_list_options(p, IncidentQuery)
    p.set_defaults(func=_run(lambda a, c: _list_all(c, f"{_tenant_path(a)}/incidents", _query(a), a.all),
                             _INCIDENT_COLUMNS))

    p = actions.add_parser("show", parents=[common],
                           help="an incident and its timeline (event, decisions, calls, SMS, audit lines)")
    p.add_argument("id", type=_id)
    p.set_defaults(func=_timeline_command)

    p = actions.add_parser("acknowledge", parents=[common],
                           help="acknowledge a live incident: the escalation stops as on a DTMF 1")
    p.add_argument("id", type=_id)
    p.add_argument("--note", default="", help="why (kept in the audit line)")
    p.set_defaults(func=_run(lambda a, c: c.request("POST", f"{_tenant_path(a)}/incidents/{a.id}/acknowledge",
                                                    body={"note": a.note})))

    p = actions.add_parser("close", parents=[common],
                           help="close a live incident as a false alarm: the escalation stops as on a DTMF 2")
    p.add_argument("id", type=_id)
    p.add_argument("--reason", required=True, help="why it is a false alarm (kept in the audit line)")
    p.set_defaults(func=_run(lambda a, c: c.request("POST", f"{_tenant_path(a)}/incidents/{a.id}/close",
                                                    body={"reason": a.reason})))

    p = actions.add_parser("reopen", parents=[common], help="make an ended incident live again")
    p.add_argument("id", type=_id)
    p.add_argument("--reason", required=True, help="why (kept in the audit line)")
    p.add_argument("--resume-calls", action=argparse.BooleanOptionalAction, required=True,
                   help="--resume-calls: the chain goes on at once with its first group not yet tried; "
                        "--no-resume-calls: open and held, nobody is called until an operator decides")
    p.set_defaults(func=_run(lambda a, c: c.request("POST", f"{_tenant_path(a)}/incidents/{a.id}/reopen",
                                                    body={"reason": a.reason, "resume_calls": a.resume_calls})))


def _timeline_command(args: argparse.Namespace) -> int:
    try:
        shown = _client(args).request("GET", f"{_tenant_path(args)}/incidents/{args.id}")
    except ApiProblem as exc:
        _print_problem(args, exc, sys.stderr)
        return EXIT_API_ERROR
    except (ClientError, CliError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exc.code if isinstance(exc, CliError) else EXIT_UNREACHABLE
    return _print_timeline(args, shown)


def _call_verdict(result: Any) -> int:
    """One line on stderr saying how the test call went; exit 0 only when it was answered and 1 pressed."""
    outcome = result.get("outcome") if isinstance(result, dict) else None
    if outcome == "answered":
        digit = result.get("digit")
        line = "answered, pressed 1: confirmed" if result.get("confirmed") else \
            f"answered, {'pressed ' + digit if digit else 'no key pressed'}: not confirmed"
    elif outcome == "refused":
        line = f"refused by the toll-fraud guard: {result.get('refusal_reason')} ({result.get('detail')})"
    else:
        line = f"{str(outcome).replace('_', ' ')} ({result.get('hangup_cause') or result.get('detail') or '-'})" \
            if isinstance(result, dict) else "no answer from the API"
    sys.stderr.write(f"test call: {line}\n")
    return EXIT_OK if isinstance(result, dict) and result.get("confirmed") else EXIT_TEST_FAILED


def _notify_verdict(result: Any) -> int:
    delivered = isinstance(result, dict) and result.get("delivered") is True
    if delivered:
        sys.stderr.write(f"test notification: delivered (vendor id {result.get('vendor_message_id')})\n")
        return EXIT_OK
    sys.stderr.write(f"test notification: not delivered ({result.get('error') if isinstance(result, dict) else '-'})\n")
    return EXIT_TEST_FAILED


def _test_call(args: argparse.Namespace, _client_: ApiClient) -> Any:
    # The API answers when the call has ended: ring time, the IVR's tries, and the switch's own slack.
    client = _client(argparse.Namespace(**{**vars(args), "timeout": max(args.timeout, args.ring_s + 90.0)}))
    return client.request("POST", f"{_tenant_path(args)}/test-calls",
                          body={"household_id": args.household, "contact": args.contact, "ring_s": args.ring_s})


def _register_test(sub: Any) -> None:
    top = sub.add_parser("test", help="a test call or a test notification through the real alert paths")
    actions = top.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = _common(tenant_scoped=True)
    p = actions.add_parser(
        "call", parents=[common], help=f"ring a household contact as an alert call would (exit 0 when answered and "
                                       f"1 pressed, {EXIT_TEST_FAILED} otherwise)")
    p.add_argument("--household", type=_id, required=True, help="the household")
    p.add_argument("--contact", required=True, help="a contact bound to it: subscriber id or number")
    p.add_argument("--ring-s", type=int, default=30, help="seconds to ring (5..120, default 30)")
    p.set_defaults(func=_run(_test_call, verdict=_call_verdict))
    p = actions.add_parser(
        "notify", parents=[common], help=f"send a notification to a device through its connector (exit 0 when the "
                                         f"vendor took it, {EXIT_TEST_FAILED} otherwise)")
    p.add_argument("--connector", required=True, help="the connector's configured name")
    p.add_argument("--device", type=_id, required=True, help="a device behind that connector")
    p.add_argument("--text", default="IIM test notification", help="what it says")
    p.set_defaults(func=_run(lambda a, c: c.request("POST", f"{_tenant_path(a)}/test-notifications", body={
        "connector": a.connector, "device_id": a.device, "text": a.text}), verdict=_notify_verdict))


# -- connectors --------------------------------------------------------------------------------------------

_CONNECTOR_COLUMNS = ("name", "plugin", "state", "checked_at", "breaker", "capabilities", "last_error")


def _connectors(args: argparse.Namespace, client: ApiClient) -> Any:
    """``GET /v1/connectors``; for the table, one row per connector with its health flattened into it."""
    listed = client.request("GET", "/v1/connectors")
    if args.output == "json":
        return listed
    rows = [{**c, **(c.get("health") or {})} for c in listed.get("connectors", []) if isinstance(c, dict)]
    return {"items": rows, "next_after": None}


def _register_connector(sub: Any) -> None:
    top = sub.add_parser("connector", help="the smart-home connectors this IIM runs: capabilities and health")
    actions = top.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("list", parents=[_common(tenant_scoped=False)],
                           help="every configured connector, its state (probed), last check and circuit breaker")
    p.set_defaults(func=_run(_connectors, _CONNECTOR_COLUMNS))


# -- offline commands --------------------------------------------------------------------------------------

def _token_new(args: argparse.Namespace) -> int:
    try:
        entry = TokenEntry(actor=args.actor, role=Role(args.role), tenant=args.tenant)
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_USAGE
    token = new_token()
    record = {hash_token(token): entry.model_dump(mode="json")}
    sys.stdout.write(json.dumps({"token": token, "table_entry": record}, indent=2) + "\n")
    sys.stderr.write("Keep the token secret; put only table_entry into the IIM_ADMIN_TOKENS_REF table.\n")
    return EXIT_OK


def _token_hash(args: argparse.Namespace) -> int:
    try:
        token = resolve_secret(args.token_ref)
    except (LookupError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_UNREACHABLE
    sys.stdout.write(hash_token(token) + "\n")
    return EXIT_OK


def _register_token(sub: Any) -> None:
    top = sub.add_parser("token", help="make admin API tokens and their table entries (offline)")
    actions = top.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("new", help="a new random token and the table entry holding its SHA-256")
    p.add_argument("--actor", required=True, help="who uses it (goes into every audit row)")
    p.add_argument("--role", required=True, choices=[r.value for r in Role])
    p.add_argument("--tenant", type=_id, help="the tenant an operator (or viewer) is bound to")
    p.set_defaults(func=_token_new)
    p = actions.add_parser("hash", help="print the SHA-256 table key of an existing token")
    p.add_argument("--token-ref", default=DEFAULT_TOKEN_REF, help="env:VAR or file:/path holding the token")
    p.set_defaults(func=_token_hash)


def _db_upgrade(args: argparse.Namespace) -> int:
    import asyncio

    from policy_cache.bootstrap import bootstrap
    from policy_cache.errors import PolicyStoreError

    async def run() -> int:
        db = await bootstrap(database_url=args.database_url, data_dir=args.data_dir, demo=args.demo)
        applied = ", ".join(str(v) for v in db.applied) or "none (up to date)"
        where = f"embedded PostgreSQL in {db.embedded.data_dir}" if db.embedded else "the server at IIM_DATABASE_URL"
        sys.stdout.write(f"database {db.database} on {where}: migrations applied: {applied}\n")
        if db.demo is not None:
            sys.stdout.write(f"demo tenant loaded: {db.demo.tenant_id}\n")
        await db.aclose()
        return EXIT_OK

    try:
        return asyncio.run(run())
    except (PolicyStoreError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_UNREACHABLE


def _register_db(sub: Any) -> None:
    top = sub.add_parser("db", help="database maintenance")
    actions = top.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("upgrade", help="apply pending migrations (and set role passwords) via the bootstrap")
    p.add_argument("--database-url", default=None,
                   help="superuser URL (default $IIM_DATABASE_URL; unset: the embedded server in --data-dir)")
    p.add_argument("--data-dir", default=os.environ.get("IIM_DATA_DIR", ".iim-data/pg"),
                   help="embedded PostgreSQL data directory (default $IIM_DATA_DIR or .iim-data/pg, as iim serve)")
    p.add_argument("--demo", action=argparse.BooleanOptionalAction, default=False,
                   help="load the demo tenant into an empty registry")
    p.set_defaults(func=_db_upgrade)


# -- scenario tools: simulate, templates -------------------------------------------------------------------

#: Keys of a stored row / API body that are not part of a scenario's definition (``--file`` accepts both).
_ROW_KEYS = frozenset({"id", "tenant_id", "household_id", "subscriber_id", "version", "created_at", "updated_at"})


def _scenario_tool(action: Callable[[argparse.Namespace], int]) -> Command:
    """Error handling of the scenario tools (they reach the API only when asked to)."""
    def command(args: argparse.Namespace) -> int:
        try:
            return action(args)
        except ApiProblem as exc:
            _print_problem(args, exc, sys.stderr)
            return EXIT_API_ERROR
        except ClientError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return EXIT_UNREACHABLE
        except CliError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return exc.code

    return command


def _definition(data: Any, where: str) -> Scenario:
    if not isinstance(data, dict):
        raise CliError(f"{where}: a scenario is a JSON object", EXIT_USAGE)
    try:
        return Scenario.model_validate({k: v for k, v in data.items() if k not in _ROW_KEYS})
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                 for e in exc.errors(include_url=False, include_input=False)]
        raise CliError(f"{where} is not a valid scenario:\n" + "\n".join(lines), EXIT_USAGE) from exc


def _load_scenario(args: argparse.Namespace, client: Callable[[], ApiClient]) -> Scenario:
    if args.template:
        return TEMPLATES[args.template]
    if args.file:
        try:
            with open(args.file, encoding="utf-8") as fh:
                data = json.load(fh)
        except OSError as exc:
            raise CliError(f"--file {args.file}: {exc.strerror}", EXIT_USAGE) from exc
        except json.JSONDecodeError as exc:
            raise CliError(f"--file {args.file} is not JSON: {exc.msg} (line {exc.lineno})", EXIT_USAGE) from exc
        return _definition(data, f"--file {args.file}")
    page = client().request("GET", f"{_tenant_path(args)}/scenarios", query={"name": args.name})
    if not page["items"]:
        raise CliError(f"the tenant has no scenario named {args.name!r}", EXIT_API_ERROR)
    return _definition(page["items"][0], f"scenario {args.name!r}")


def _all_items(client: ApiClient, path: str, query: dict[str, str | int]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = _list_all(client, path, query, True)["items"]
    return items


def _household_facts(args: argparse.Namespace, client: ApiClient) -> dict[str, Any]:
    """Contacts, home devices, zone, presence and (``--device``) the triggering device, through the API."""
    base = _tenant_path(args)
    home = client.request("GET", f"{base}/households/{args.household}")
    devices = _all_items(client, f"{base}/devices", {"household_id": args.household})
    device = None
    if args.device:
        device = next((d for d in devices if d["id"] == args.device), None)
        if device is None:
            raise CliError(f"--device {args.device} is not a device of household {args.household}", EXIT_USAGE)
    contacts = []
    for binding in _all_items(client, f"{base}/bindings", {"household_id": args.household}):
        if binding["device_id"] not in (None, args.device):
            continue  # bound to another device of the household only
        sub = client.request("GET", f"{base}/subscribers/{binding['subscriber_id']}")
        contacts.append(Contact(ContactRole(binding["role"]), sub["msisdn"], sub["id"], binding["priority"],
                                sub.get("display_name")))
    # The worker rings enabled SIP speakers for to="home"; the triggering device never rings itself.
    ringing = tuple(d["sip_uri"] for d in devices if d["enabled"] and d["sip_uri"] and d["type"] == "speaker"
                    and "sip" in d["capabilities"] and d["id"] != args.device)
    facts: dict[str, Any] = {"household_name": home["name"], "time_zone": home["time_zone"],
                             "presence": PresenceState(home["presence"]), "contacts": contacts,
                             "home_targets": ringing}
    if device is not None:
        facts.update(device_type=DeviceType(device["type"]), device_name=device["name"],
                     device_status=DeviceStatus(device["status"]))
        facts["device_sip_uri"] = device["sip_uri"]
    return facts


def _script(answers: Sequence[str]) -> dict[str, ActionOutcome]:
    script: dict[str, ActionOutcome] = {}
    for answer in answers:
        who, sep, what = answer.partition("=")
        if not sep or not who:
            raise CliError(f"--answer {answer!r}: write WHO=OUTCOME (owner=false_alarm)", EXIT_USAGE)
        try:
            script[who] = ActionOutcome(what)
        except ValueError:
            known = ", ".join(o.value for o in ActionOutcome)
            raise CliError(f"--answer {answer!r}: {what!r} is not one of {known}", EXIT_USAGE) from None
    return script


def _start(text: str | None, zone: str) -> datetime:
    if text is None:
        return datetime.now(ZoneInfo(zone))
    try:
        at = datetime.fromisoformat(text)
    except ValueError as exc:
        raise CliError(f"--at {text!r} is not an ISO time (2026-11-25T03:00:00+03:00)", EXIT_USAGE) from exc
    return at if at.tzinfo is not None else at.replace(tzinfo=ZoneInfo(zone))


def _scenario_simulate(args: argparse.Namespace) -> int:
    made: list[ApiClient] = []

    def client() -> ApiClient:
        if not made:
            made.append(_client(args))
        return made[0]

    if args.device and not args.household:
        raise CliError("--device needs --household", EXIT_USAGE)
    scenario = _load_scenario(args, client)
    found: dict[str, Any] = _household_facts(args, client()) if args.household else {}
    if args.device_type:
        found["device_type"] = DeviceType(args.device_type)
    if args.presence:
        found["presence"] = PresenceState(args.presence)
    if args.device_status:
        found["device_status"] = DeviceStatus(args.device_status)
    if args.time_zone:
        found["time_zone"] = args.time_zone
    zone = found.get("time_zone", "Europe/Moscow")
    try:
        ZoneInfo(zone)
    except (ValueError, LookupError) as exc:
        raise CliError(f"--time-zone {zone!r} is not an IANA zone", EXIT_USAGE) from exc
    start = _start(args.at, zone)
    registered_device = "device_sip_uri" in found  # a registered device without a SIP URI keeps none
    sip_uri = found.pop("device_sip_uri", None)
    sender = None
    if args.sender:
        try:
            sender = to_e164(args.sender)
        except NotANumber as exc:
            raise CliError(f"--sender {args.sender!r}: {exc}", EXIT_USAGE) from None
    facts = synthetic_facts(scenario, event=EventType(args.event) if args.event else None, occurred_at=start,
                            sender=sender, text=args.text, **found)
    if registered_device:
        facts = dataclasses.replace(facts, device_sip_uri=sip_uri)
    script = _script(args.answer or ())
    mismatched = mismatches(scenario, facts, start)
    timeline = simulate(scenario, facts, start, script)
    if args.output == "json":
        sys.stdout.write(json.dumps({
            "scenario": scenario.name, "applies": not mismatched, "mismatches": list(mismatched),
            "facts": facts.to_json(), "script": {k: v.value for k, v in script.items()},
            "timeline": timeline_json(timeline)}, indent=2, ensure_ascii=False) + "\n")
        return EXIT_OK
    source = f"{facts.device_type} {facts.device_name!r}" if facts.sender is None else facts.sender
    sys.stdout.write(f"scenario {scenario.name}: {facts.event_type} from {source} "
                     f"at {start.isoformat()} ({facts.time_zone}), presence {facts.presence}\n")
    for reason in mismatched:
        sys.stdout.write(f"note: would not be selected: {reason}\n")
    sys.stdout.write(format_timeline(timeline))
    return EXIT_OK


def _templates_list(args: argparse.Namespace) -> int:
    rows = [{"name": s.name, "events": [e.value for e in s.trigger.event_types] or [s.trigger.kind.value],
             "devices": [d.value for d in s.trigger.device_types] or ["any"], "steps": len(s.steps),
             "on_acknowledge": len(s.on_acknowledge)} for s in TEMPLATES.values()]
    if args.output == "json":
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        render_table(rows, ("name", "events", "devices", "steps", "on_acknowledge"), sys.stdout)
    return EXIT_OK


def _templates_show(args: argparse.Namespace) -> int:
    sys.stdout.write(TEMPLATES[args.template].model_dump_json(indent=2) + "\n")
    return EXIT_OK


def _templates_install(args: argparse.Namespace) -> int:
    client = _client(args)
    path = f"{_tenant_path(args)}/scenarios"
    created = []
    unknown = sorted(set(args.templates) - set(TEMPLATES))
    if unknown:
        raise CliError(f"no template {', '.join(unknown)}; known: {', '.join(sorted(TEMPLATES))}", EXIT_USAGE)
    for name in args.templates or sorted(TEMPLATES):
        body = TEMPLATES[name].model_dump(mode="json")
        body.update(name=f"{name}@{args.household}", household_id=args.household, enabled=args.enable)
        created.append(client.request("POST", path, body=body))
    _print_result(args, {"items": created, "next_after": None}, ("id", "name", "household_id", "enabled", "version"),
                  sys.stdout)
    return EXIT_OK


def _register_scenario_tools(actions: Any) -> None:
    """``iim scenario simulate`` and ``iim scenario templates list|show|install``."""
    common = _common(tenant_scoped=True)
    p = actions.add_parser(
        "simulate", parents=[common], help="dry-run a scenario against a scripted world (nothing is called)",
        description="Runs the escalation engine with deterministic outcomes: by default nobody answers, "
                    "SMS are sent. Contacts are synthetic (owner +79000000001, backup_contact +79000000002, "
                    "security_service +79000000003) unless --household names a household of --tenant.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--template", choices=sorted(TEMPLATES), help="a shipped template")
    source.add_argument("--file", metavar="PATH", help="a scenario as JSON (as `templates show` prints it)")
    source.add_argument("--name", help="a stored scenario of --tenant (read through the API)")
    p.add_argument("--event", choices=[e.value for e in EventType], help="default: the trigger's first event")
    p.add_argument("--device-type", choices=[d.value for d in DeviceType],
                   help="default: the trigger's first device type, else sensor")
    p.add_argument("--at", help="ISO time; without an offset, local time of the zone (default now)")
    p.add_argument("--presence", choices=[s.value for s in PresenceState], help="default: the household's, else unknown")
    p.add_argument("--device-status", choices=[s.value for s in DeviceStatus], help="default: online")
    p.add_argument("--time-zone", help="IANA zone (default: the household's, else Europe/Moscow)")
    p.add_argument("--household", type=_id, help="take contacts, ringing devices, zone and presence from it")
    p.add_argument("--device", type=_id, help="the triggering device (of --household)")
    p.add_argument("--answer", action="append", metavar="WHO=OUTCOME",
                   help="script an outcome: WHO is a role, home, a number, an action key or call/sms/notify/record; "
                        "e.g. owner=false_alarm, backup_contact=acknowledge, owner=busy (repeatable)")
    p.add_argument("--sender", help="call and SMS scenarios: who calls or writes (default: a contact its sender "
                                    "condition names)")
    p.add_argument("--text", help="SMS scenarios: the SMS text (default: its first keyword)")
    p.set_defaults(func=_scenario_tool(_scenario_simulate))

    top = actions.add_parser("templates", help="the shipped scenario templates")
    tools = top.add_subparsers(dest="templates_action", required=True, metavar="ACTION")
    p = tools.add_parser("list", help="list the templates")
    p.add_argument("--output", "-o", choices=("table", "json"), default="table", help="output format")
    p.set_defaults(func=_scenario_tool(_templates_list))
    p = tools.add_parser("show", help="print a template as JSON (a starting point for --data / --file)")
    p.add_argument("template", choices=sorted(TEMPLATES))
    p.set_defaults(func=_scenario_tool(_templates_show))
    p = tools.add_parser("install", parents=[common], help="create scenarios of a household from templates")
    p.add_argument("--household", type=_id, required=True, help="the household the scenarios belong to")
    p.add_argument("templates", nargs="*", metavar="TEMPLATE",
                   help=f"which ones (default all: {', '.join(sorted(TEMPLATES))}); each is named TEMPLATE@HOUSEHOLD")
    p.add_argument("--enable", action=argparse.BooleanOptionalAction, default=True,
                   help="enable them at once (default yes)")
    p.set_defaults(func=_scenario_tool(_templates_install))


def register_subcommands(subparsers: Any, *, include_db: bool = True) -> None:
    """Add the registry commands to the ``iim`` parser's sub-parsers (``parser.add_subparsers(...)``).

    Each leaf sets ``func(args) -> int`` (the exit code), as ``iim serve`` does.
    """
    _register_tenant(subparsers)
    for res in RESOURCES:
        actions = _register_resource(subparsers, res)
        if res.name == "scenario":
            _register_scenario_tools(actions)
        if res.name == "subscriber":
            _register_erase(actions, res)
    _register_audit(subparsers)
    _register_incident(subparsers)
    _register_test(subparsers)
    _register_connector(subparsers)
    _register_presence(subparsers)
    _register_link(subparsers)
    _register_hub(subparsers)
    _register_token(subparsers)
    if include_db:
        _register_db(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iim", description="IIM registry administration")
    register_subcommands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m iim.admin.cli``); ``iim`` itself calls :func:`register_subcommands`."""
    args = build_parser().parse_args(argv)
    func: Command = args.func
    with traced_command(args):
        return func(args)


if __name__ == "__main__":
    sys.exit(main())
