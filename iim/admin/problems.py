"""RFC 9457 problem details for the admin API, each carrying a stable ``error_id``.

Hierarchy (every class is an :class:`ApiError`; ``status`` is the HTTP status sent)::

    ApiError
    +-- MalformedRequest      400 malformed-request   body is not a JSON object, duplicate keys, NaN ...
    +-- InvalidParameter      400 invalid-parameter   a query parameter failed validation
    +-- Unauthenticated       401 unauthenticated     no / unknown bearer token
    +-- Forbidden             403 forbidden           the token's role or tenant does not allow this
    +-- NotFound              404 not-found           no such row (or not visible to this tenant)
    +-- MethodNotAllowed      405 method-not-allowed
    +-- Conflict              409 conflict            unique constraint, e.g. an MSISDN already in the tenant
    |   +-- VersionConflict   409 version-conflict    the row changed since the expected version
    |   +-- StillReferenced   409 still-referenced    a delete refused while other rows refer to the row
    +-- PayloadTooLarge       413 body-too-large
    +-- UnsupportedMediaType  415 unsupported-media-type
    +-- ValidationFailed      422 validation-failed   pydantic errors, with their locations in ``errors``
    +-- InvalidReference      422 invalid-reference   a referenced row does not exist in this tenant
    +-- StoreUnavailable      503 store-unavailable   PostgreSQL cannot be reached
    +-- ServiceUnavailable    503 service-unavailable what the request needs (scenario worker, switch) does not run
    |   +-- BrokerUnavailable 503 broker-unavailable  the hubs' MQTT broker is not connected (a command was not sent)
    +-- IdentityUnavailable   503 identity-unavailable the OIDC issuer's keys cannot be fetched (JWTs only)
    +-- InternalError         500 internal-error

The ``error_id`` values are part of the API contract: clients and runbooks match on them, so
they never change meaning. ``title`` is fixed per ``error_id``; ``detail`` explains this occurrence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROBLEM_CONTENT_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:iim:problem:"


class FieldError(BaseModel):
    """One validation failure: where (``loc``, pydantic's location path), what and why."""

    model_config = ConfigDict(extra="forbid")

    loc: list[str | int] = Field(description="location, first element is body, query or path")
    msg: str
    type: str = Field(description="pydantic error type, e.g. missing, extra_forbidden, enum")


class Problem(BaseModel):
    """``application/problem+json`` body (RFC 9457) with our extension members."""

    model_config = ConfigDict(extra="forbid", title="Problem")

    type: str = Field(description="URI naming the problem type: urn:iim:problem:<error_id>")
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    instance: str | None = Field(default=None, description="the request path")
    error_id: str = Field(description="stable machine-readable identifier")
    errors: list[FieldError] | None = None


class ApiError(Exception):
    """An error answered as problem+json. Subclasses fix ``status``, ``error_id`` and ``title``."""

    status: ClassVar[int] = 500
    error_id: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        errors: Sequence[FieldError] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors) if errors is not None else None
        self.headers = dict(headers or {})

    def to_problem(self, instance: str | None = None) -> Problem:
        return Problem(
            type=PROBLEM_TYPE_PREFIX + self.error_id,
            title=self.title,
            status=self.status,
            detail=self.detail,
            instance=instance,
            error_id=self.error_id,
            errors=self.errors,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, error_id={self.error_id!r}, detail={self.detail!r})"


class MalformedRequest(ApiError):
    status = 400
    error_id = "malformed-request"
    title = "Malformed request"


class InvalidParameter(ApiError):
    status = 400
    error_id = "invalid-parameter"
    title = "Invalid parameter"


class Unauthenticated(ApiError):
    status = 401
    error_id = "unauthenticated"
    title = "Authentication required"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="iim-admin"'})


class Forbidden(ApiError):
    status = 403
    error_id = "forbidden"
    title = "Forbidden"


class NotFound(ApiError):
    status = 404
    error_id = "not-found"
    title = "Not found"


class MethodNotAllowed(ApiError):
    status = 405
    error_id = "method-not-allowed"
    title = "Method not allowed"


class Conflict(ApiError):
    status = 409
    error_id = "conflict"
    title = "Conflict"


class VersionConflict(Conflict):
    error_id = "version-conflict"
    title = "Version conflict"


class StillReferenced(Conflict):
    error_id = "still-referenced"
    title = "Still referenced"


class PayloadTooLarge(ApiError):
    status = 413
    error_id = "body-too-large"
    title = "Request body too large"


class UnsupportedMediaType(ApiError):
    status = 415
    error_id = "unsupported-media-type"
    title = "Unsupported media type"


class ValidationFailed(ApiError):
    status = 422
    error_id = "validation-failed"
    title = "Validation failed"


class InvalidReference(ApiError):
    status = 422
    error_id = "invalid-reference"
    title = "Invalid reference"


class StoreUnavailable(ApiError):
    """PostgreSQL away, or not answering within its deadlines: a client should retry (``Retry-After``)."""

    status = 503
    error_id = "store-unavailable"
    title = "Registry store unavailable"

    def __init__(self, detail: str, *, retry_after_s: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})


class ServiceUnavailable(ApiError):
    """A part the request needs (the scenario worker, a switch) does not run in this process: retry later."""

    status = 503
    error_id = "service-unavailable"
    title = "Service unavailable"

    def __init__(self, detail: str, *, retry_after_s: int = 5) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})


class BrokerUnavailable(ServiceUnavailable):
    """The hubs' MQTT broker is not connected, or did not take the command in time: nothing was sent."""

    error_id = "broker-unavailable"
    title = "Broker unavailable"


class IdentityUnavailable(ApiError):
    """The OIDC issuer's keys cannot be fetched: a JWT cannot be checked now (static tokens still work)."""

    status = 503
    error_id = "identity-unavailable"
    title = "Identity provider unavailable"

    def __init__(self, detail: str, *, retry_after_s: int = 30) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})


class InternalError(ApiError):
    status = 500
    error_id = "internal-error"
    title = "Internal error"


ALL_ERRORS: tuple[type[ApiError], ...] = (
    MalformedRequest, InvalidParameter, Unauthenticated, Forbidden, NotFound, MethodNotAllowed, Conflict,
    VersionConflict, StillReferenced, PayloadTooLarge, UnsupportedMediaType, ValidationFailed, InvalidReference, StoreUnavailable, ServiceUnavailable, InternalError,
    IdentityUnavailable,
)


def field_errors(exc: ValidationError, where: str) -> list[FieldError]:
    """Pydantic's errors with ``where`` (``body``, ``query``, ``path``) prepended to each location.

    The offending input is deliberately not echoed back: it may be a secret or personal data.
    """
    out = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        out.append(FieldError(loc=[where, *err["loc"]], msg=err["msg"], type=err["type"]))
    return out


def problem_response(error: ApiError, instance: str | None = None) -> web.Response:
    body = error.to_problem(instance).model_dump(mode="json", exclude_none=True)
    return web.Response(
        status=error.status,
        body=json.dumps(body).encode(),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=error.headers,
    )


def problem_from_json(payload: Any) -> Problem | None:
    """Parse a problem document received by a client; ``None`` when the body is not one."""
    if not isinstance(payload, dict):
        return None
    try:
        return Problem.model_validate(payload)
    except ValidationError:
        return None
