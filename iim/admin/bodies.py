"""Strict request input: size-limited JSON objects and query strings, validated by pydantic models.

JSON is parsed more strictly than :func:`json.loads` does by default: duplicate keys
(``{"msisdn": "a", "msisdn": "b"}`` would silently keep the last) and the non-standard
constants ``NaN``/``Infinity`` are refused. Fields a model does not declare are refused too,
whatever the model's own ``extra`` setting, so a typo never passes silently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from iim.admin.problems import (
    FieldError,
    InvalidParameter,
    MalformedRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
    field_errors,
)

M = TypeVar("M", bound=BaseModel)

JSON_TYPES = frozenset({"application/json", "application/merge-patch+json"})


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MalformedRequest(f"duplicate key {key!r} in JSON object")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise MalformedRequest(f"{name} is not valid JSON")


def loads_strict(data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedRequest("request body is not UTF-8") from exc
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise MalformedRequest(f"request body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise MalformedRequest("request body nests too deeply") from exc


#: The body as read already (by a brand/region scope check before the handler: ``iim.admin.scopes``).
RAW_BODY = web.RequestKey("admin_raw_body", bytes)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The raw body, refusing more than ``limit`` bytes before reading them when the length is declared."""
    kept: bytes | None = request.get(RAW_BODY)
    if kept is not None:
        return kept
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    buf = bytearray()
    async for chunk in request.content.iter_any():
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    request[RAW_BODY] = bytes(buf)
    return request[RAW_BODY]


async def read_json_object(request: web.Request, limit: int) -> tuple[bytes, dict[str, Any]]:
    """The raw body and its decoded JSON object."""
    if request.content_type not in JSON_TYPES:
        raise UnsupportedMediaType(f"send the body as application/json (got {request.content_type or 'nothing'})")
    raw = await read_body(request, limit)
    payload = loads_strict(raw)
    if not isinstance(payload, dict):
        raise MalformedRequest("request body must be a JSON object")
    return raw, payload


def _declared_names(model: type[BaseModel]) -> set[str]:
    names: set[str] = set()
    for name, field in model.model_fields.items():
        names.add(name)
        if isinstance(field.alias, str):
            names.add(field.alias)
        if isinstance(field.validation_alias, str):
            names.add(field.validation_alias)
    return names


def unknown_field_errors(model: type[BaseModel], payload: Mapping[str, Any], where: str) -> list[FieldError]:
    declared = _declared_names(model)
    return [
        FieldError(loc=[where, key], msg="Extra inputs are not permitted", type="extra_forbidden")
        for key in payload
        if key not in declared
    ]


def validate_body(model: type[M], raw: bytes, payload: Mapping[str, Any]) -> M:
    """``model`` from a JSON object, or :class:`ValidationFailed` listing every error with its location.

    Validated from the JSON text (``raw``), not the decoded dict: the registry's input models are strict,
    and strict models take UUIDs, datetimes and enum values as strings only in JSON mode.
    """
    errors = unknown_field_errors(model, payload, "body")
    try:
        value = model.model_validate_json(raw)
    except ValidationError as exc:
        errors.extend(e for e in field_errors(exc, "body") if e not in errors)
        raise ValidationFailed(f"{len(errors)} invalid field(s) in the request body", errors=errors) from exc
    if errors:
        raise ValidationFailed(f"{len(errors)} invalid field(s) in the request body", errors=errors)
    return value


async def parse_body(request: web.Request, model: type[M], limit: int) -> M:
    raw, payload = await read_json_object(request, limit)
    return validate_body(model, raw, payload)


def parse_query(request: web.Request, model: type[M]) -> M:
    """Query parameters into ``model``; a repeated parameter or an unknown one is refused."""
    params: dict[str, str] = {}
    for key in request.query:
        values = request.query.getall(key)
        if len(values) > 1:
            raise InvalidParameter(
                f"query parameter {key!r} given {len(values)} times",
                errors=[FieldError(loc=["query", key], msg="given more than once", type="duplicate")],
            )
        params[key] = values[0]
    errors = unknown_field_errors(model, params, "query")
    try:
        value = model.model_validate(params)
    except ValidationError as exc:
        errors.extend(field_errors(exc, "query"))
        raise InvalidParameter(f"{len(errors)} invalid query parameter(s)", errors=errors) from exc
    if errors:
        raise InvalidParameter(f"{len(errors)} invalid query parameter(s)", errors=errors)
    return value
