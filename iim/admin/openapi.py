"""An OpenAPI 3.1 document generated from the route table and the pydantic models.

OpenAPI 3.1 schemas are JSON Schema 2020-12, which is what pydantic emits, so the models'
schemas go into ``components/schemas`` unchanged (references rewritten to point there).
Every route contributes one operation: its path and query parameters, its request body,
its success response and one problem+json response per status it can fail with.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from iim.admin.problems import (
    PROBLEM_CONTENT_TYPE,
    ApiError,
    Forbidden,
    IdentityUnavailable,
    InternalError,
    Problem,
    StoreUnavailable,
    Unauthenticated,
)
from iim.admin.routing import Access, Route

OPENAPI_VERSION = "3.1.0"
SECURITY_SCHEME = "bearerAuth"
REF_TEMPLATE = "#/components/schemas/{model}"

_STATUS_TEXT = {
    200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
    415: "Unsupported Media Type", 422: "Unprocessable Content", 500: "Internal Server Error",
    503: "Service Unavailable",
}


RefMap = dict[tuple[type[BaseModel], JsonSchemaMode], Any]


def _model_refs(routes: Sequence[Route]) -> tuple[RefMap, dict[str, Any]]:
    wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {(Problem, "serialization"): None}
    for route in routes:
        if route.request_model is not None:
            wanted[(route.request_model, "validation")] = None
        if route.query_model is not None:
            wanted[(route.query_model, "validation")] = None
        if route.response_model is not None:
            wanted[(route.response_model, "serialization")] = None
    refs, top = models_json_schema(list(wanted), ref_template=REF_TEMPLATE)
    out: RefMap = {}
    for (model, mode), schema in refs.items():
        if issubclass(model, BaseModel):
            out[(model, mode)] = schema
    return out, dict(top.get("$defs", {}))


def _resolve(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
        return dict(defs[ref.rsplit("/", 1)[1]])
    return schema


def _query_parameters(schema: dict[str, Any]) -> list[dict[str, Any]]:
    required = set(schema.get("required", ()))
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        description = prop.pop("description", None)
        prop.pop("title", None)
        param: dict[str, Any] = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params


def _error_responses(errors: Iterable[type[ApiError]]) -> dict[str, Any]:
    by_status: dict[int, list[type[ApiError]]] = defaultdict(list)
    for err in errors:
        if err not in by_status[err.status]:
            by_status[err.status].append(err)
    out: dict[str, Any] = {}
    for status in sorted(by_status):
        ids = ", ".join(f"`{e.error_id}` ({e.title.lower()})" for e in by_status[status])
        out[str(status)] = {
            "description": f"{_STATUS_TEXT.get(status, 'Error')}: problem details with error_id {ids}",
            "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": REF_TEMPLATE.format(model="Problem")}}},
        }
    return out


def _operation(
    route: Route,
    refs: RefMap,
    defs: dict[str, Any],
) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary, "tags": [route.tag]}
    params: list[dict[str, Any]] = [
        {
            "name": p.name,
            "in": "path",
            "required": True,
            "description": p.description,
            "schema": {"type": "string", "format": p.format},
        }
        for p in route.path_params
    ]
    if route.query_model is not None:
        params.extend(_query_parameters(_resolve(refs[(route.query_model, "validation")], defs)))
    if params:
        op["parameters"] = params
    if route.request_model is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(route.request_model, "validation")]}},
        }
    success: dict[str, Any] = {"description": route.response_description}
    if route.response_model is not None:
        success["content"] = {"application/json": {"schema": refs[(route.response_model, "serialization")]}}
    responses: dict[str, Any] = {str(route.response_status): success}
    errors: list[type[ApiError]] = list(route.errors)
    if route.access is not Access.PUBLIC:
        errors += [Unauthenticated, Forbidden, StoreUnavailable, IdentityUnavailable]
        op["security"] = [{SECURITY_SCHEME: []}]
    else:
        op["security"] = []
    errors.append(InternalError)
    responses.update(_error_responses(errors))
    op["responses"] = responses
    return op


def build_openapi(
    routes: Sequence[Route],
    *,
    prefix: str,
    root_routes: Sequence[Route] = (),
    title: str = "IIM registry admin API",
    version: str = "1",
    description: str = "",
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``routes`` (paths relative to ``prefix``, e.g. ``/v1``) and
    ``root_routes`` (paths served as they are, outside the prefix).
    """
    everything = [*routes, *root_routes]
    refs, defs = _model_refs(everything)
    paths: dict[str, dict[str, Any]] = defaultdict(dict)
    for route in routes:
        paths[prefix + route.path][route.method.lower()] = _operation(route, refs, defs)
    for route in root_routes:
        paths[route.path][route.method.lower()] = _operation(route, refs, defs)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": description},
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "security": [{SECURITY_SCHEME: []}],
        "tags": [{"name": t} for t in dict.fromkeys(r.tag for r in everything)],
        "paths": dict(paths),
        "components": {
            "schemas": defs,
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An admin API token (the server stores only its SHA-256) or a JWT of the "
                                   "configured OIDC issuer.",
                }
            },
        },
    }

