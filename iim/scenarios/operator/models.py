"""The shapes of the operator's incident and test endpoints (validated at the API, documented in its OpenAPI)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from iim.core import cursor
from iim.scenarios.engine import IncidentState

__all__ = [
    "IncidentQuery", "IncidentSummary", "IncidentPage", "EventEntry", "ActionEntry", "SmsEntry", "AuditLine",
    "TimelineEntry", "IncidentTimeline", "AcknowledgeBody", "CloseBody", "ReopenBody", "TestCallBody",
    "TestCallResult", "TestNotifyBody", "TestNotifyResult", "encode_cursor", "decode_cursor",
]

_FROZEN = ConfigDict(extra="forbid", frozen=True)
_OUT = ConfigDict(extra="forbid")


def encode_cursor(opened_at: datetime, incident_id: UUID) -> str:
    """The page cursor after an incident (its opening time and id, newest first)."""
    return cursor.encode_cursor(opened_at, str(incident_id))


def decode_cursor(text: str) -> tuple[datetime, UUID]:
    """Raises ValueError for anything :func:`encode_cursor` did not make."""
    at, ident = cursor.decode_cursor(text)
    return at, UUID(ident)


class IncidentQuery(BaseModel):
    """Filters of ``GET /tenants/{tenant_id}/incidents`` (the tenant is the path's), newest first."""

    model_config = _FROZEN

    household_id: UUID | None = Field(default=None, description="only this household's incidents")
    state: IncidentState | None = Field(default=None, description="only incidents in this state")
    since: AwareDatetime | None = Field(default=None, description="opened at or after (ISO 8601 with offset)")
    until: AwareDatetime | None = Field(default=None, description="opened before (ISO 8601 with offset)")
    limit: int = Field(default=50, ge=1, le=500, description="page size")
    after: str | None = Field(default=None, max_length=200, pattern=r"^[A-Za-z0-9_-]+$",
                              description="the next_after of the previous page")

    @field_validator("after")
    @classmethod
    def _cursor(cls, value: str | None) -> str | None:
        if value is not None:
            decode_cursor(value)
        return value


class IncidentSummary(BaseModel):
    """One incident as operators see it."""

    model_config = _OUT

    id: UUID
    household_id: UUID
    device_id: UUID | None = Field(description="null: an incoming call or SMS started it (hazard incoming_call, "
                                               "incoming_sms)")
    device_name: str = Field(description="the device, or the caller or SMS sender (E.164) when no device")
    hazard: str
    state: IncidentState
    step: int = Field(description="the scenario step (group) it is at or ended at")
    attempt: int
    held: bool = Field(description="reopened without calls: open, nothing is due until an operator decides")
    deadline: datetime | None = Field(description="when the scenario worker judges it next (live, not held)")
    reason: str = Field(description="why it is in this state (the engine's or the operator's words)")
    scenario: str | None = Field(description="the scenario it runs (null: its chain has not started)")
    first_event_id: str
    event_count: int
    opened_at: datetime
    updated_at: datetime
    closed_at: datetime | None


class IncidentPage(BaseModel):
    model_config = _OUT

    items: list[IncidentSummary] = Field(description="newest first")
    next_after: str | None = Field(description="pass as ?after= for the next page; null on the last one")


class EventEntry(BaseModel):
    """A device event of the incident (the first one opened it). The payload is not shown."""

    model_config = _OUT

    event_id: str
    type: str
    occurred_at: datetime
    received_at: datetime
    channel: str


class ActionEntry(BaseModel):
    """A scenario action (call, SMS, notification, recording) with its outcome."""

    model_config = _OUT

    key: str
    step: int
    kind: Literal["call", "sms", "notify", "record"]
    destination: str | None
    call_id: UUID | None
    started_at: datetime
    dispatched_at: datetime | None
    sent_at: datetime | None
    finished_at: datetime | None
    outcome: str | None = Field(description="null while it runs: answered, no_answer, acknowledge, queued, ...")
    detail: str


class SmsEntry(BaseModel):
    """An SMS of the incident in the outbox (the text is not shown) and how its delivery went."""

    model_config = _OUT

    key: str
    msisdn: str
    status: str
    attempts: int
    created_at: datetime
    updated_at: datetime
    last_error: str | None


class AuditLine(BaseModel):
    model_config = _OUT

    id: int
    at: datetime
    actor: str
    action: str
    detail: dict[str, Any]
    correlation: dict[str, Any]


class TimelineEntry(BaseModel):
    """One line of the merged timeline; ``ref`` names the row in its own list (event id, action key, audit id)."""

    model_config = _OUT

    at: datetime
    kind: Literal["event", "decision", "call", "sms", "notify", "record", "audit"]
    ref: str
    summary: str


class IncidentTimeline(BaseModel):
    model_config = _OUT

    incident: IncidentSummary
    events: list[EventEntry]
    actions: list[ActionEntry]
    sms: list[SmsEntry]
    audit: list[AuditLine] = Field(description="the incident's chained audit lines, oldest first")
    timeline: list[TimelineEntry] = Field(description="all of the above in time order")


class AcknowledgeBody(BaseModel):
    model_config = _FROZEN

    note: str = Field(default="", max_length=500, description="why (kept in the audit line)")


class CloseBody(BaseModel):
    model_config = _FROZEN

    reason: str = Field(min_length=1, max_length=500, description="why it is a false alarm (kept in the audit line)")


class ReopenBody(BaseModel):
    model_config = _FROZEN

    reason: str = Field(min_length=1, max_length=500, description="why it is reopened (kept in the audit line)")
    resume_calls: bool = Field(description="true: the chain goes on at once with its first group not yet tried; "
                                           "false: open and held, nobody is called until an operator decides")


class TestCallBody(BaseModel):
    model_config = _FROZEN

    household_id: UUID
    contact: str = Field(min_length=1, max_length=64,
                         description="a contact bound to the household: its subscriber id or number")
    ring_s: int = Field(default=30, ge=5, le=120, description="seconds to ring")


class TestCallResult(BaseModel):
    """How the test call went. ``confirmed``: answered and "1" pressed (the alert call's acknowledge key)."""

    model_config = _OUT

    call_id: UUID
    household_id: UUID
    destination: str
    outcome: Literal["answered", "no_answer", "busy", "failed", "unreachable", "refused"]
    digit: str | None
    confirmed: bool
    hangup_cause: str | None
    refusal_reason: str | None = Field(description="the toll-fraud guard's reason when refused")
    detail: str


class TestNotifyBody(BaseModel):
    model_config = _FROZEN

    connector: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="the connector's configured name")
    device_id: UUID = Field(description="a device of the tenant behind that connector")
    text: str = Field(default="IIM test notification", min_length=1, max_length=200)


class TestNotifyResult(BaseModel):
    model_config = _OUT

    connector: str
    device_id: UUID
    delivered: bool
    vendor_message_id: str | None = Field(description="the vendor's id for the notification (its answer)")
    error: str | None = Field(description="why it was not delivered (the connector's error kind and message)")
