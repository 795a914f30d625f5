"""The pure parts of the operator's desk: where a reopened incident resumes, the merged timeline, page cursors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iim.scenarios.engine import IncidentState, Progress, reopen
from iim.scenarios.operator.models import (
    ActionEntry,
    AuditLine,
    EventEntry,
    SmsEntry,
    decode_cursor,
    encode_cursor,
)
from iim.scenarios.operator.timeline import merge
from iim.scenarios.templates import TEMPLATES

SMOKE = TEMPLATES["smoke_co"]  # groups: 0-1 (owner call + SMS), 2-3 (backup), 4 (security)
T0 = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(("ended", "tried", "resumes_at"), [
    (Progress(IncidentState.FALSE_ALARM, 0, 0), True, 2),  # closed while the owner's group ran: the backup next
    (Progress(IncidentState.ACKNOWLEDGED, 2, 1), True, 4),  # in the backup group's retry: the security service
    (Progress(IncidentState.FALSE_ALARM, 2, 0), False, 2),  # before that group ran (a wait step): that group
    (Progress(IncidentState.EXHAUSTED, 5, 0), False, 5),  # nothing left: the next advance ends it exhausted
    (Progress(IncidentState.RESOLVED, 4, 0), True, 5),
])
def test_a_reopened_incident_resumes_at_the_first_group_not_yet_tried(
        ended: Progress, tried: bool, resumes_at: int) -> None:
    assert reopen(SMOKE, ended, step_tried=tried) == Progress(IncidentState.OPEN, resumes_at, 0)


def test_a_live_incident_is_not_moved_by_reopen() -> None:
    live = Progress(IncidentState.NOTIFYING, 2, 1)
    assert reopen(SMOKE, live, step_tried=True) is live


def test_the_timeline_is_in_time_order_with_the_cause_first_at_the_same_instant() -> None:
    key = f"{uuid4()}/0/0/0"
    event = EventEntry(event_id="e1", type="smoke", occurred_at=T0, received_at=T0, channel="device")
    call = ActionEntry(key=key, step=0, kind="call", destination="+79001234567", call_id=uuid4(), started_at=T0,
                       dispatched_at=T0, sent_at=None, finished_at=T0 + timedelta(seconds=9), outcome="busy",
                       detail="USER_BUSY")
    sms_action = ActionEntry(key=key[:-1] + "1", step=0, kind="sms", destination="+79001234567", call_id=None,
                             started_at=T0, dispatched_at=None, sent_at=None, finished_at=T0, outcome="queued",
                             detail="")
    sms = SmsEntry(key=key[:-1] + "1", msisdn="+79001234567", status="delivered", attempts=1, created_at=T0,
                   updated_at=T0 + timedelta(seconds=3), last_error=None)
    decided = AuditLine(id=7, at=T0, actor="scenario-engine", action="incident.notifying",
                        detail={"reason": "step 0: call owner"}, correlation={})
    note = AuditLine(id=8, at=T0 + timedelta(seconds=1), actor="toll-fraud-guard", action="originate.queued",
                     detail={}, correlation={})
    lines = merge([event], [call, sms_action], [sms], [note, decided])
    assert [(e.kind, e.ref) for e in lines] == [("event", "e1"), ("decision", "7"), ("call", key),
                                                ("sms", sms.key), ("audit", "8")]
    assert "busy" in lines[2].summary
    assert "delivered" in lines[3].summary


def test_a_cursor_round_trips() -> None:
    ident = uuid4()
    at = T0 + timedelta(microseconds=123)
    assert decode_cursor(encode_cursor(at, ident)) == (at, ident)


@given(st.text(max_size=300))
def test_any_text_is_a_cursor_or_a_value_error(text: str) -> None:
    try:
        at, ident = decode_cursor(text)
    except ValueError:
        return
    assert at.tzinfo is not None
    assert isinstance(ident, UUID)
