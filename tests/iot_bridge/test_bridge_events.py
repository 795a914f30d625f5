"""The device event contract: strict models, EventRejected for every bad body, no input echoed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from iot_bridge.event_types import EventType
from iot_bridge.events import (
    CloudWebhook,
    DeviceEvent,
    EventRejected,
    body_fingerprint,
    event_fingerprint,
    parse_event,
    parse_webhook,
)


def _event(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"event_id": "evt-0001", "device_id": "smoke-42", "type": "smoke",
                             "occurred_at": "2026-03-01T12:30:00+03:00"}
    event.update(changes)
    return {key: value for key, value in event.items() if value is not _DROP}


_DROP = object()


def _raw(value: Any) -> bytes:
    return json.dumps(value).encode()


def _rejected(raw: bytes) -> EventRejected:
    with pytest.raises(EventRejected) as info:
        parse_event(raw)
    return info.value


def _locs(exc: EventRejected) -> list[list[str | int]]:
    return [err["loc"] for err in exc.errors]


def test_minimal_event_parses_with_defaults() -> None:
    event = parse_event(_raw(_event()))
    assert event.event_id == "evt-0001"
    assert event.device_id == "smoke-42"
    assert event.type is EventType.SMOKE
    assert event.occurred_at == datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    assert event.occurred_at.tzinfo == timezone(timedelta(hours=3))
    assert event.payload == {}
    assert event.severity is None


def test_full_event_keeps_payload_and_severity() -> None:
    payload = {"ppm": 412, "ratio": 0.5, "ok": False, "room": "kitchen", "tags": ["a", {"b": None}]}
    event = parse_event(_raw(_event(payload=payload, severity="critical", type="co")))
    assert event.payload == payload
    assert event.severity == "critical"
    assert event.type is EventType.CO


def test_event_is_frozen() -> None:
    event = parse_event(_raw(_event()))
    with pytest.raises(ValidationError):
        event.__setattr__("event_id", "other")


@pytest.mark.parametrize("stamp", ["2026-03-01T12:30:00Z", "2026-03-01t12:30:00z", "2026-03-01T12:30:00.123456-05:30",
                                   "2026-03-01T12:30:00.123456789+00:00"])
def test_rfc3339_timestamps_with_offset_are_accepted(stamp: str) -> None:
    assert parse_event(_raw(_event(occurred_at=stamp))).occurred_at.utcoffset() is not None


@pytest.mark.parametrize("stamp", ["2026-03-01T12:30:00", "2026-03-01", "2026-03-01 12:30:00Z", 1772357400,
                                   1772357400.5, None, "2026-02-30T00:00:00Z", "2026-03-01T12:30:00+0300",
                                   "yesterday", ["2026-03-01T12:30:00Z"]])
def test_naive_non_rfc3339_or_non_string_timestamps_are_rejected(stamp: Any) -> None:
    assert _locs(_rejected(_raw(_event(occurred_at=stamp)))) == [["occurred_at"]]


@pytest.mark.parametrize("bad_id", ["", "-starts-with-dash", "has space", "a" * 129, "new\nline", "é", 42, None])
def test_ids_outside_the_pattern_are_rejected(bad_id: Any) -> None:
    exc = _rejected(_raw(_event(event_id=bad_id, device_id=bad_id)))
    assert _locs(exc) == [["event_id"], ["device_id"]]


def test_id_of_128_characters_with_all_allowed_punctuation_is_accepted() -> None:
    long_id = "A0_.:-" + "z" * 122
    assert parse_event(_raw(_event(event_id=long_id))).event_id == long_id


@pytest.mark.parametrize("kind", ["SMOKE", "fire", 1, None])
def test_unknown_event_type_is_rejected(kind: Any) -> None:
    assert _locs(_rejected(_raw(_event(type=kind)))) == [["type"]]


@pytest.mark.parametrize("severity", ["CRITICAL", "fatal", 3, True])
def test_unknown_severity_is_rejected(severity: Any) -> None:
    assert _locs(_rejected(_raw(_event(severity=severity)))) == [["severity"]]


def test_unknown_top_level_field_is_rejected() -> None:
    exc = _rejected(_raw(_event(tenant_id="someone-else")))
    assert exc.errors == [{"loc": ["tenant_id"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}]


def test_missing_required_fields_are_all_reported() -> None:
    exc = _rejected(b"{}")
    assert _locs(exc) == [["event_id"], ["device_id"], ["type"], ["occurred_at"]]
    assert exc.reason.startswith("invalid event: event_id: Field required")


@pytest.mark.parametrize("raw", [b"[]", b'"event"', b"null", b"3"])
def test_non_object_body_is_rejected(raw: bytes) -> None:
    assert _locs(_rejected(raw)) == [[]]


def test_payload_with_64_keys_is_accepted_and_65_rejected() -> None:
    assert len(parse_event(_raw(_event(payload={f"k{i}": i for i in range(64)}))).payload) == 64
    exc = _rejected(_raw(_event(payload={f"k{i}": i for i in range(65)})))
    assert _locs(exc) == [["payload"]]
    assert "64" in exc.errors[0]["msg"]


@pytest.mark.parametrize("payload", [{"s": "x" * 1025}, {"deep": [{"s": "x" * 1025}]}, {"k" * 1025: 1}])
def test_payload_strings_over_1024_characters_are_rejected_at_any_depth(payload: dict[str, Any]) -> None:
    assert _locs(_rejected(_raw(_event(payload=payload)))) == [["payload"]]


def test_payload_string_of_1024_characters_is_accepted() -> None:
    assert parse_event(_raw(_event(payload={"s": "x" * 1024}))).payload["s"] == "x" * 1024


@pytest.mark.parametrize("payload", [{"s": "a\u0000b"}, {"a\u0000": 1}, {"l": ["\u0000"]}])
def test_payload_nul_characters_are_rejected_because_jsonb_cannot_store_them(payload: dict[str, Any]) -> None:
    assert "U+0000" in _rejected(_raw(_event(payload=payload))).reason


@pytest.mark.parametrize("payload", [[1], "text", None, 5])
def test_payload_that_is_not_an_object_is_rejected(payload: Any) -> None:
    assert _locs(_rejected(_raw(_event(payload=payload)))) == [["payload"]]


def test_bad_json_becomes_event_rejected_with_its_reason() -> None:
    exc = _rejected(b'{"event_id": "a", "event_id": "b"}')
    assert exc.reason == "bad JSON: duplicate object key 'event_id'"
    assert exc.errors == [{"loc": [], "msg": "duplicate object key 'event_id'", "type": "json_invalid"}]
    assert "NaN" in _rejected(_raw(_event()).replace(b"}", b', "payload": {"v": NaN}}')).reason


def test_errors_never_echo_input_values() -> None:
    secret = "hunter2-SECRET-TOKEN"
    body = _event(event_id=secret + " ", device_id=[secret], type=secret, occurred_at=secret, severity=secret,
                  payload={"x": secret * 100})
    body[f"password={secret}"] = secret
    exc = _rejected(_raw(body))
    assert secret not in exc.reason
    assert secret not in repr(exc.errors)
    assert exc.__cause__ is None
    assert exc.__context__ is None
    assert ["<key>"] in _locs(exc)  # an unknown key that is not an identifier is not echoed either


def test_webhook_batch_parses() -> None:
    batch = {"source": "acme-cloud", "events": [_event(), _event(event_id="evt-0002", type="heartbeat")]}
    webhook = parse_webhook(_raw(batch))
    assert isinstance(webhook, CloudWebhook)
    assert webhook.source == "acme-cloud"
    assert [event.type for event in webhook.events] == [EventType.SMOKE, EventType.HEARTBEAT]


@pytest.mark.parametrize("count", [0, 101])
def test_webhook_batch_outside_1_to_100_events_is_rejected(count: int) -> None:
    events = [_event(event_id=f"e{i}") for i in range(count)]
    with pytest.raises(EventRejected) as info:
        parse_webhook(_raw({"source": "acme", "events": events}))
    assert [err["loc"] for err in info.value.errors] == [["events"]]


def test_webhook_batch_of_100_events_is_accepted() -> None:
    events = [_event(event_id=f"e{i}") for i in range(100)]
    assert len(parse_webhook(_raw({"source": "acme", "events": events})).events) == 100


def test_webhook_with_a_repeated_event_id_is_rejected() -> None:
    with pytest.raises(EventRejected, match="repeated"):
        parse_webhook(_raw({"source": "acme", "events": [_event(), _event()]}))


def test_webhook_errors_point_into_the_bad_event() -> None:
    batch = {"source": "acme", "events": [_event(), _event(event_id="e2", type="fire")]}
    with pytest.raises(EventRejected) as info:
        parse_webhook(_raw(batch))
    assert [err["loc"] for err in info.value.errors] == [["events", 1, "type"]]
    assert info.value.reason.startswith("invalid webhook: events.1.type:")


@pytest.mark.parametrize("body", [{"events": [_event()]}, {"source": "bad source", "events": [_event()]},
                                  {"source": "acme", "events": [_event()], "extra": 1}, {"source": "acme"}])
def test_webhook_missing_or_bad_source_or_extra_field_is_rejected(body: dict[str, Any]) -> None:
    with pytest.raises(EventRejected):
        parse_webhook(_raw(body))


def test_webhook_bad_json_is_event_rejected() -> None:
    with pytest.raises(EventRejected, match="bad JSON"):
        parse_webhook(b"\xff")


def test_body_fingerprint_is_sha256_hex_of_the_exact_bytes() -> None:
    assert body_fingerprint(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert body_fingerprint(b'{"a":1}') != body_fingerprint(b'{"a": 1}')


def test_event_fingerprint_ignores_key_order_whitespace_and_omitted_defaults() -> None:
    one = parse_event(b'{"event_id":"e1","device_id":"d1","type":"co","occurred_at":"2026-01-01T00:00:00Z"}')
    two = parse_event(b'{ "occurred_at" : "2026-01-01T00:00:00Z", "type": "co", "device_id": "d1", '
                      b'"event_id": "e1", "payload": {}, "severity": null }')
    three = parse_event(b'{"event_id":"e1","device_id":"d1","type":"co","occurred_at":"2026-01-01T00:00:01Z"}')
    assert event_fingerprint(one) == event_fingerprint(two)
    assert event_fingerprint(one) != event_fingerprint(three)


def test_models_can_be_built_from_python_values() -> None:
    event = DeviceEvent(event_id="e1", device_id="d1", type=EventType.PANIC,
                        occurred_at=datetime(2026, 1, 1, tzinfo=UTC))
    assert event.payload == {}
    with pytest.raises(ValidationError):
        DeviceEvent(event_id="e1", device_id="d1", type=EventType.PANIC,
                    occurred_at=datetime(2026, 1, 1))  # noqa: DTZ001 - naive on purpose


_FIELD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
                          st.sampled_from(["smoke", "2026-01-01T00:00:00Z", "e1", "info"]),
                          st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                               max_size=3))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_nothing_but_event_rejected(raw: bytes) -> None:
    for parse in (parse_event, parse_webhook):
        try:
            parse(raw)
        except EventRejected:
            pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["event_id", "device_id", "type", "occurred_at", "payload", "severity", "x"]),
                       _FIELD_VALUES))
def test_arbitrary_field_values_raise_nothing_but_event_rejected(fields: dict[str, Any]) -> None:
    try:
        raw = json.dumps(fields, allow_nan=False).encode()
    except ValueError:
        return  # infinity from st.floats: not JSON
    try:
        parse_event(raw)
    except EventRejected as exc:
        errors = exc.errors
    else:
        return
    assert errors
