"""OpenAPI 3.1 document of the device bridge, built from the same pydantic models that validate requests."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from iot_bridge.events import CloudWebhook, DeviceEvent

__all__ = ["bridge_openapi", "openapi_view"]

_PROBLEM = {"$ref": "#/components/schemas/Problem"}


def _problems(*codes: int) -> dict[str, Any]:
    reasons = {400: "malformed event, missing tenant or device header", 401: "signature or client certificate refused",
               403: "the identity is not bound to this device", 413: "body over the size limit",
               422: "schema violation, idempotency conflict, unknown device",
               429: "rate limited (Retry-After)", 503: "event store unavailable (Retry-After); nothing was written"}
    return {str(c): {"description": reasons[c], "content": {"application/problem+json": {"schema": _PROBLEM}}}
            for c in codes}


def bridge_openapi() -> dict[str, Any]:
    event_schema = DeviceEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    webhook_schema = CloudWebhook.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = {}
    for schema in (event_schema, webhook_schema):
        schemas.update(schema.pop("$defs", {}))
    schemas["DeviceEvent"] = event_schema
    schemas["CloudWebhook"] = webhook_schema
    schemas["Accepted"] = {"type": "object", "required": ["event_id", "status", "incident_id", "action"],
                           "properties": {"event_id": {"type": "string"}, "status": {"const": "accepted"},
                                          "incident_id": {"type": ["string", "null"], "format": "uuid"},
                                          "action": {"enum": ["opened", "updated", "cleared", "recorded"]}}}
    schemas["Problem"] = {"type": "object", "required": ["type", "title", "status", "detail", "error_id"],
                          "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                                         "status": {"type": "integer"}, "detail": {"type": "string"},
                                         "instance": {"type": "string"}, "error_id": {"type": "string"},
                                         "errors": {"type": "array", "items": {"type": "object"}}}}
    signature_headers = [
        {"name": "webhook-id", "in": "header", "schema": {"type": "string"}, "description": "message id"},
        {"name": "webhook-timestamp", "in": "header", "schema": {"type": "string", "pattern": "^[0-9]{1,12}$"},
         "description": "Unix seconds; within 300 s of the server clock either way"},
        {"name": "webhook-signature", "in": "header", "schema": {"type": "string"},
         "description": "space-separated v1,<base64 HMAC-SHA256 of id.timestamp.body>; several for key rotation"},
        {"name": "IIM-Tenant", "in": "header", "schema": {"type": "string", "format": "uuid"},
         "description": "the tenant (optional with a client certificate that names it)"},
    ]
    return {
        "openapi": "3.1.0",
        "info": {"title": "IIM device bridge", "version": "1",
                 "description": "Signed device events in (Standard Webhooks HMAC or JWS ES256/EdDSA), "
                                "acknowledged only once committed together with the job that acts on them."},
        "paths": {
            "/v1/events": {"post": {
                "operationId": "postDeviceEvent",
                "summary": "A device or hub posts one event",
                "parameters": [*signature_headers,
                               {"name": "IIM-Device", "in": "header", "schema": {"type": "string"},
                                "description": "the device's external id (HMAC); a JWS names it in kid"}],
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/DeviceEvent"}},
                    "application/jose": {"schema": {
                        "type": "string", "description": "compact JWS; claims iat, jti, sub (device id), event"}}}},
                "responses": {"202": {"description": "committed (or the first answer to this event_id again)",
                                      "content": {"application/json": {
                                          "schema": {"$ref": "#/components/schemas/Accepted"}}}},
                              **_problems(400, 401, 403, 413, 422, 429, 503)}}},
            "/v1/webhooks/{source}": {"post": {
                "operationId": "postCloudWebhook",
                "summary": "An OEM or aggregator cloud posts events for its devices",
                "parameters": [{"name": "source", "in": "path", "required": True, "schema": {"type": "string"}},
                               *signature_headers],
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/CloudWebhook"}}}},
                "responses": {"202": {"description": "every event committed",
                                      "content": {"application/json": {"schema": {
                                          "type": "object", "properties": {"results": {
                                              "type": "array",
                                              "items": {"$ref": "#/components/schemas/Accepted"}}}}}}},
                              **_problems(400, 401, 403, 413, 422, 429, 503)}}},
        },
        "components": {"schemas": schemas},
    }


async def openapi_view(_request: web.Request) -> web.Response:
    return web.json_response(bridge_openapi())
