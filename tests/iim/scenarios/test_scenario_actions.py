"""The engine's actions as stored for the executors: every field reaches them, or the action is refused loudly."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from uuid import uuid4
from zoneinfo import ZoneInfo

import pytest

from iim.scenarios.engine import Action, PlaceCall
from iim.scenarios.model import ContactRole
from iim.scenarios.simulate import simulate, synthetic_facts
from iim.scenarios.store import ActionRow, _action_fields, action_spec, decode_action
from iim.scenarios.templates import TEMPLATES

START = datetime(2026, 11, 25, 3, 0, tzinfo=ZoneInfo("Europe/Moscow"))


def _row(action: Action) -> ActionRow:
    kind, destination = _action_fields(action)
    return ActionRow(key=action.key, incident_id=uuid4(), step=action.step, kind=kind, destination=destination,
                     call_uuid=None, dispatched_at=None, outcome=None, spec=action_spec(action))


def _every_action() -> list[Action]:
    """Every action the shipped templates emit, with the device opening on a key (bridges pass DTMF)."""
    out: list[Action] = []
    for scenario in TEMPLATES.values():
        facts = dataclasses.replace(synthetic_facts(scenario), device_dtmf_open=True)
        for script in ({}, {"owner": "acknowledge"}, {"owner": "escalate", "backup_contact": "acknowledge"}):
            timeline = simulate(scenario, facts, START, script)  # type: ignore[arg-type]
            out += [a for entry in timeline for a in entry.actions]
    return out


def test_every_action_of_every_template_is_executed_as_the_engine_decided_it() -> None:
    actions = _every_action()
    assert {a.kind for a in actions} == {"call", "sms", "notify", "record"}
    assert any(isinstance(a, PlaceCall) and a.bridge_to and a.bridge_dtmf for a in actions)
    for action in actions:
        assert decode_action(_row(action)) == action


def test_a_stored_field_the_executor_does_not_know_is_refused() -> None:
    call = PlaceCall("i/0/0/0", 0, ContactRole.OWNER, "+79000000001", None, 30, "hi", "sip:door@flat.local")
    row = _row(call)
    with pytest.raises(ValueError, match="does not know: open_gate"):
        decode_action(dataclasses.replace(row, spec={**row.spec, "open_gate": True}))
    with pytest.raises(ValueError, match="ring_s"):
        decode_action(dataclasses.replace(row, spec={k: v for k, v in row.spec.items() if k != "ring_s"}))


def test_a_field_that_cannot_be_stored_is_refused() -> None:
    call = PlaceCall("i/0/0/0", 0, None, "sip:a@flat.local", None, 30, "hi", bridge_to=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot be stored"):
        action_spec(call)


def test_calls_stored_before_the_bridge_fields_existed_still_decode() -> None:
    legacy = ActionRow(key="i/0/0/0", incident_id=uuid4(), step=0, kind="call", destination="+79000000001",
                       call_uuid=None, dispatched_at=None, outcome=None,
                       spec={"ring_s": 30, "prompt_text": "hi", "ivr": None})
    assert decode_action(legacy) == PlaceCall("i/0/0/0", 0, None, "+79000000001", None, 30, "hi")
