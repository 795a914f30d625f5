"""The device event contract: what a device (or a cloud on its behalf) may post, validated strictly.

Everything a body can get wrong ends in :class:`EventRejected` (an answer of 400/422), never in another
exception: the models forbid unknown fields, accept no type coercion except where JSON has no native type
(the event type's string, the RFC 3339 timestamp), and error reports never echo input values, which may
be secrets or personal data.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from iim.core import strict_json
from iot_bridge.event_types import OWN_FINDINGS, EventType

__all__ = [
    "ID_PATTERN", "MAX_EVENTS_PER_WEBHOOK", "MAX_PAYLOAD_KEYS", "MAX_PAYLOAD_STRING",
    "CloudWebhook", "DeviceEvent", "EventRejected",
    "body_fingerprint", "event_fingerprint", "parse_event", "parse_webhook",
]

#: Event, device and source ids: safe in logs, URLs, SQL text and ESL variables.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
MAX_PAYLOAD_KEYS = 64
MAX_PAYLOAD_STRING = 1024
MAX_EVENTS_PER_WEBHOOK = 100

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})", re.ASCII)
_SAFE_LOC = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _rfc3339_text(value: object) -> object:
    """Only RFC 3339 text (or an aware ``datetime`` from Python code): pydantic alone would take unix numbers."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 date-time string with an offset, e.g. 2026-01-31T23:59:59Z")
    return value


def _plain_offset(value: datetime) -> datetime:
    """Replace pydantic's tzinfo with the stdlib one carrying the same offset (predictable repr and pickling)."""
    offset = value.utcoffset()
    assert offset is not None  # AwareDatetime guarantees it
    return value.replace(tzinfo=timezone(offset))


def _bounded_payload(payload: dict[str, JsonValue]) -> dict[str, JsonValue]:
    """Keep payloads small and storable: ``jsonb`` refuses U+0000, and nobody needs 64 kB strings."""
    if len(payload) > MAX_PAYLOAD_KEYS:
        raise ValueError(f"at most {MAX_PAYLOAD_KEYS} keys")
    stack: list[Any] = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if len(item) > MAX_PAYLOAD_STRING:
                raise ValueError(f"strings (keys and values, at any depth) are limited to {MAX_PAYLOAD_STRING} "
                                 "characters")
            if "\x00" in item:
                raise ValueError("strings must not contain U+0000")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return payload


Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
OccurredAt = Annotated[AwareDatetime, Field(strict=False), BeforeValidator(_rfc3339_text),
                       AfterValidator(_plain_offset)]
Payload = Annotated[dict[str, JsonValue], AfterValidator(_bounded_payload)]


class DeviceEvent(BaseModel):
    """One thing that happened at one device; ``device_id`` is the device's ``external_id`` in the registry."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    event_id: Identifier
    device_id: Identifier
    type: Annotated[EventType, Field(strict=False)]
    occurred_at: OccurredAt
    payload: Payload = Field(default_factory=dict)
    severity: Literal["info", "warning", "critical"] | None = None

    @field_validator("type")
    @classmethod
    def _not_our_finding(cls, value: EventType) -> EventType:
        """"offline" is what IIM concludes from a device's silence; a device saying so would be heard saying it."""
        if value in OWN_FINDINGS:
            raise ValueError(f"{value.value!r} is IIM's own finding (device supervision), not a device's event")
        return value


class CloudWebhook(BaseModel):
    """A batch posted by an OEM/aggregator cloud on behalf of its devices."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    source: Identifier
    events: Annotated[list[DeviceEvent], Field(min_length=1, max_length=MAX_EVENTS_PER_WEBHOOK)]

    @model_validator(mode="after")
    def _event_ids_unique(self) -> CloudWebhook:
        """One id, one event: two different bodies under one id in one batch could not both be answered."""
        ids = [event.event_id for event in self.events]
        if len(set(ids)) != len(ids):
            raise ValueError("event_id repeated within one batch")
        return self


class EventRejected(ValueError):
    """The body is not a valid event. ``errors`` are pydantic-style ``{"loc", "msg", "type"}`` without inputs."""

    def __init__(self, reason: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errors = errors


def _safe_loc(part: str | int) -> str | int:
    if isinstance(part, int) or _SAFE_LOC.fullmatch(part):
        return part
    return "<key>"


def _public_errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": [_safe_loc(part) for part in err["loc"]], "msg": err["msg"], "type": err["type"]}
            for err in exc.errors(include_url=False, include_context=False, include_input=False)]


def _summary(what: str, errors: list[dict[str, Any]]) -> str:
    shown = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(body)'}: {err['msg']}" for err in errors[:5])
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return f"invalid {what}: {shown}{more}"


def _load(raw: bytes) -> Any:
    try:
        return strict_json.loads(raw)
    except strict_json.BadJson as exc:
        reason = exc.reason
    raise EventRejected(f"bad JSON: {reason}", [{"loc": [], "msg": reason, "type": "json_invalid"}])


def parse_event(raw: bytes) -> DeviceEvent:
    """Strict JSON, then the model; any failure is :class:`EventRejected` (raised without a chained cause,
    so a logged traceback cannot carry the input)."""
    data = _load(raw)
    try:
        return DeviceEvent.model_validate(data)
    except ValidationError as exc:
        errors = _public_errors(exc)
    raise EventRejected(_summary("event", errors), errors)


def parse_webhook(raw: bytes) -> CloudWebhook:
    """As :func:`parse_event`, for a cloud's batch."""
    data = _load(raw)
    try:
        return CloudWebhook.model_validate(data)
    except ValidationError as exc:
        errors = _public_errors(exc)
    raise EventRejected(_summary("webhook", errors), errors)


def body_fingerprint(raw: bytes) -> str:
    """SHA-256 of the exact body: the same ``event_id`` with another body is a conflict (422), not a retry."""
    return hashlib.sha256(raw).hexdigest()


def event_fingerprint(event: DeviceEvent) -> str:
    """SHA-256 of the validated event in canonical form, for events without a body of their own (batch items):
    key order, whitespace and an omitted default do not change it."""
    return body_fingerprint(strict_json.canonical_json(event.model_dump(mode="json")))
