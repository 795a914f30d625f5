"""The chaos checker finds each violation in small hand-written histories, and passes a clean one."""

from __future__ import annotations

from pathlib import Path

from benchmarks._chaos.checker import ActionRow, CallRecord, Fault, IncidentRow, Observed, SmsRow, check
from benchmarks._chaos.history import TIMEOUT, HistoryWriter, Op, pairs, read_history

T = 1_000_000.0
INC = "11111111-1111-4111-8111-111111111111"
OWNER, BACKUP = "+79610000001", "+79620000001"


def _ops(*extra: Op, status: int = 202) -> list[Op]:
    return [Op("invoke", 1, "ev-1", T, "a", 10.0), Op("ok", 1, "ev-1", T + 0.1, "a", 10.0, status, INC), *extra]


def _incident(state: str = "acknowledged", deadline: float | None = None) -> IncidentRow:
    closed = None if state in ("open", "notifying") else T + 5
    return IncidentRow(INC, state, 0, deadline, T + 0.05, T + 5, closed, "ev-1")


def _call_action(n: int = 0, dest: str = OWNER, *, outcome: str | None = "acknowledge", dispatched: bool = True,
                 detail: str = "") -> ActionRow:
    return ActionRow(INC, f"{INC}/0/0/{n}", 0, "call", dest, f"00000000-0000-4000-8000-00000000000{n}",
                     T + 0.06 if dispatched else None, outcome, detail, T + 0.05, T + 3 if outcome else None)


def _sms_action(n: int = 1) -> ActionRow:
    return ActionRow(INC, f"{INC}/0/0/{n}", 0, "sms", OWNER, None, None, "queued", "", T + 0.05, T + 0.06)


def _call(n: int = 0, *, at: float = T + 0.1, result: str | None = "+OK", result_at: float | None = T + 1,
          killed: float | None = None, uuid: str | None = None, dest: str = OWNER) -> CallRecord:
    return CallRecord(uuid or f"00000000-0000-4000-8000-00000000000{n}", INC, f"{INC}/0/0/{n}", dest, at, result,
                      result_at, T + 1 if result == "+OK" else None, killed, "a")


def _sms(n: int = 1, *, at_smsc: bool = True, status: str = "sent") -> SmsRow:
    return SmsRow(f"{INC}/0/0/{n}", INC, OWNER, status, None, at_smsc)


def _clean(**overrides: object) -> Observed:
    values: dict[str, object] = {"ops": _ops(), "incidents": [_incident()], "actions": [_call_action(), _sms_action()],
                                 "calls": [_call()], "sms": [_sms()]}
    values.update(overrides)
    return Observed(**values)  # type: ignore[arg-type]


def test_a_clean_history_has_no_violation() -> None:
    v = check(_clean(), now=T + 100, grace_s=10)
    assert (v.alarms, v.acked, v.lost, v.duplicate_calls, v.stuck, v.hung_requests, v.answered_hung_up) == \
        (1, 1, 0, 0, 0, 0, 0)
    assert v.violations == []


def test_an_acked_alarm_without_its_incident_is_lost() -> None:
    v = check(_clean(incidents=[], actions=[], calls=[], sms=[]), now=T + 100, grace_s=10)
    assert v.lost == 1
    assert "no incident row" in v.by_kind("lost")[0].detail


def test_an_acked_alarm_whose_call_never_reached_the_switch_is_lost_even_if_marked_failed() -> None:
    """A call claimed, marked dispatched and then "failed, not redialled" by a restarted worker never rang."""
    action = _call_action(outcome="failed", detail="worker restarted after dispatch; the call is not redialled")
    v = check(_clean(actions=[action, _sms_action()], calls=[]), now=T + 100, grace_s=10)
    assert v.lost == 1
    lost = v.by_kind("lost")[0]
    assert lost.alarm == "ev-1"
    assert lost.incident == INC
    assert "never reached the switch" in lost.detail
    assert any("req 1 ok" in line for line in lost.timeline)


def test_a_refused_or_unreachable_call_is_a_recorded_reason_not_a_loss() -> None:
    for outcome in ("refused", "unreachable"):
        v = check(_clean(actions=[_call_action(outcome=outcome), _sms_action()], calls=[]), now=T + 100, grace_s=10)
        assert v.lost == 0, outcome


def test_a_call_not_yet_dispatched_when_the_incident_ended_is_not_lost() -> None:
    later = _call_action(1, BACKUP, outcome=None, dispatched=False)
    v = check(_clean(actions=[_call_action(), later]), now=T + 100, grace_s=10)
    assert v.lost == 0


def test_an_sms_that_never_reached_the_smsc_is_lost() -> None:
    v = check(_clean(sms=[_sms(at_smsc=False, status="queued")]), now=T + 100, grace_s=10)
    assert v.lost == 1
    assert "never reached the SMSC" in v.by_kind("lost")[0].detail


def test_a_notification_reached_by_the_vendor_or_by_a_fallback_sms_is_not_lost() -> None:
    notify = ActionRow(INC, f"{INC}/ack/0", 0, "notify", None, None, None, "sms_fallback", "", T + 3, T + 4)
    actions = [_call_action(), _sms_action(), notify]
    assert check(_clean(actions=actions), now=T + 100, grace_s=10).lost == 1
    assert check(_clean(actions=actions, notified=frozenset({INC})), now=T + 100, grace_s=10).lost == 0
    fallback = SmsRow(f"{INC}/ack/0/sms/0", INC, OWNER, "sent", None, True)
    assert check(_clean(actions=actions, sms=[_sms(), fallback]), now=T + 100, grace_s=10).lost == 0


def test_a_second_call_to_a_contact_for_one_step_while_the_first_rang_is_a_duplicate() -> None:
    again = _call(at=T + 0.5, uuid="00000000-0000-4000-8000-0000000000ff", result="+OK", result_at=T + 1.5)
    v = check(_clean(calls=[_call(), again]), now=T + 100, grace_s=10)
    assert v.duplicate_calls == 1
    dup = v.by_kind("duplicate_call")[0]
    assert dup.alarm == "ev-1"
    assert OWNER in dup.detail


def test_a_second_call_after_the_first_failed_is_not_a_duplicate() -> None:
    failed = _call(result="-ERR NORMAL_TEMPORARY_FAILURE", result_at=T + 0.2)
    again = _call(at=T + 2.5, uuid="00000000-0000-4000-8000-0000000000ff")
    assert check(_clean(calls=[failed, again]), now=T + 100, grace_s=10).duplicate_calls == 0
    # ... but a failure only learnt after the second call went out does not excuse it.
    late = _call(result="-ERR NO_ANSWER", result_at=T + 6)
    assert check(_clean(calls=[late, again]), now=T + 100, grace_s=10).duplicate_calls == 1


def test_calls_to_one_contact_in_different_steps_are_not_duplicates() -> None:
    step2 = CallRecord("00000000-0000-4000-8000-0000000000ee", INC, f"{INC}/2/0/0", OWNER, T + 9, "+OK", T + 10,
                       T + 10, None, "b")
    assert check(_clean(calls=[_call(), step2]), now=T + 100, grace_s=10).duplicate_calls == 0


def test_an_answered_call_killed_by_iim_is_reported_and_a_ringing_one_is_not() -> None:
    v = check(_clean(calls=[_call(killed=T + 2)]), now=T + 100, grace_s=10)
    assert v.answered_hung_up == 1
    ringing = _call(result="-ERR ORIGINATOR_CANCEL", result_at=T + 0.3, killed=T + 0.2)
    assert check(_clean(calls=[ringing]), now=T + 100, grace_s=10).answered_hung_up == 0


def test_a_live_incident_past_its_deadline_plus_grace_and_the_longest_fault_is_stuck() -> None:
    live = _incident("notifying", deadline=T + 20)
    assert check(_clean(incidents=[live]), now=T + 29, grace_s=10).stuck == 0  # still within the grace
    v = check(_clean(incidents=[live]), now=T + 31, grace_s=10)
    assert (v.stuck, v.unfinished) == (1, 0)
    assert "passed by" in v.by_kind("stuck")[0].detail
    faulted = [Fault("pg_stop", "", T + 1, T + 9)]
    assert check(_clean(incidents=[live], faults=faulted), now=T + 31, grace_s=10).stuck == 0
    assert check(_clean(incidents=[_incident("open", deadline=None)]), now=T + 31, grace_s=10).stuck == 1


def test_a_request_without_an_answer_within_its_deadline_is_hung() -> None:
    timed_out = [Op("invoke", 2, "ev-1", T + 1, "b", 10.0), Op("info", 2, "ev-1", T + 11, "b", 10.0, error=TIMEOUT)]
    assert check(_clean(ops=_ops(*timed_out)), now=T + 100, grace_s=10).hung_requests == 1
    never = [Op("invoke", 2, "ev-1", T + 1, "b", 10.0)]
    assert check(_clean(ops=_ops(*never)), now=T + 100, grace_s=10).hung_requests == 1
    late = [Op("invoke", 2, "ev-1", T + 1, "b", 2.0), Op("fail", 2, "ev-1", T + 5, "b", 2.0, 503)]
    assert check(_clean(ops=_ops(*late)), now=T + 100, grace_s=10).hung_requests == 1
    quick = [Op("invoke", 2, "ev-1", T + 1, "b", 10.0), Op("fail", 2, "ev-1", T + 1.2, "b", 10.0, 503),
             Op("invoke", 3, "ev-1", T + 2, "a", 10.0), Op("info", 3, "ev-1", T + 2.1, "a", 10.0,
                                                            error="ServerDisconnectedError")]
    assert check(_clean(ops=_ops(*quick)), now=T + 100, grace_s=10).hung_requests == 0


def test_an_alarm_never_acknowledged_is_not_owed_an_escalation() -> None:
    ops = [Op("invoke", 1, "ev-1", T, "a", 10.0), Op("fail", 1, "ev-1", T + 0.1, "a", 10.0, 503)]
    v = check(_clean(ops=ops, incidents=[], actions=[], calls=[], sms=[]), now=T + 100, grace_s=10)
    assert (v.alarms, v.acked, v.lost) == (1, 0, 0)


def test_the_history_round_trips_through_its_file_and_pairs_invokes_with_completions(tmp_path: Path) -> None:
    writer = HistoryWriter(tmp_path / "history.jsonl")
    for op in _ops(Op("invoke", 2, "ev-2", T + 1, "b", 10.0)):
        writer.add(op)
    writer.close()
    with (tmp_path / "history.jsonl").open("a") as fh:
        fh.write('{"type": "ok", "req"')  # a torn last line
    ops = read_history(tmp_path / "history.jsonl")
    assert ops == _ops(Op("invoke", 2, "ev-2", T + 1, "b", 10.0))
    assert [(i.req, d.type if d else None) for i, d in pairs(ops)] == [(1, "ok"), (2, None)]


def test_an_answered_call_iim_hung_up_on_its_socket_before_saying_anything_is_reported() -> None:
    unheard = CallRecord("00000000-0000-4000-8000-000000000000", INC, f"{INC}/0/0/0", OWNER, T + 0.1, "+OK", T + 1,
                         T + 1, None, "b", hung_up_unheard=True)
    v = check(_clean(calls=[unheard]), now=T + 100, grace_s=10)
    assert v.answered_hung_up == 1
    assert "before playing" in v.by_kind("answered_hung_up")[0].detail


def test_an_answered_call_redialled_with_its_uuid_is_one_hang_up_and_one_duplicate() -> None:
    first = CallRecord("00000000-0000-4000-8000-000000000000", INC, f"{INC}/0/0/0", OWNER, T + 0.1, "+OK", T + 1,
                       T + 1, None, "a", hung_up_unheard=True)
    again = CallRecord(first.uuid, INC, first.action_key, OWNER, T + 5, "+OK", T + 6, T + 6, None, "a",
                       hung_up_unheard=True)
    v = check(_clean(calls=[first, again]), now=T + 100, grace_s=10)
    assert (v.answered_hung_up, v.duplicate_calls) == (1, 1)


def test_a_call_superseded_because_the_incident_ended_is_excused_but_not_one_the_incident_moved_past() -> None:
    ended = _call_action(1, BACKUP, outcome="superseded", dispatched=False, detail="incident is acknowledged")
    assert check(_clean(actions=[_call_action(), ended]), now=T + 100, grace_s=10).lost == 0
    skipped = _call_action(1, BACKUP, outcome="superseded", dispatched=False, detail="incident is notifying")
    v = check(_clean(actions=[_call_action(), skipped]), now=T + 100, grace_s=10)
    assert v.lost == 1
    assert "superseded" in v.by_kind("lost")[0].detail
