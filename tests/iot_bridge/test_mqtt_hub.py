"""The hub's side of the contract: topics and payloads read strictly, replies that never echo input."""

from __future__ import annotations

import json
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iot_bridge.app import BridgeRefusal
from iot_bridge.intake import IntakeOutcome
from iot_bridge.mqtt import hub

TENANT = UUID("6f1c1b1e-1d7c-4f59-9a53-0c3a4b7e2f10")
FUZZ = settings(max_examples=300, deadline=None, derandomize=True)


def test_topic_names_tenant_and_hub() -> None:
    route = hub.read_topic("iim", f"iim/{TENANT}/hub-1/events")
    assert (route.tenant, route.hub) == (TENANT, "hub-1")
    assert route.topic("ack") == f"iim/{TENANT}/hub-1/ack"
    assert hub.events_filter("iim") == "iim/+/+/events"


def test_a_hubs_answer_to_a_command_comes_on_its_cmd_ack_topic() -> None:
    route = hub.read_topic("iim", f"iim/{TENANT}/hub-1/cmd-ack")
    assert (route.tenant, route.hub, route.leaf) == (TENANT, "hub-1", "cmd-ack")
    assert hub.cmd_ack_filter("iim") == "iim/+/+/cmd-ack"


@pytest.mark.parametrize("topic", [
    f"iim/{TENANT}/hub-1/ack", f"iim/{TENANT}/hub-1/cmd", f"other/{TENANT}/hub-1/events", "iim/not-a-uuid/hub-1/events",
    f"iim/{str(TENANT).upper()}/hub-1/events", f"iim/{TENANT}/hub 1/events", f"iim/{TENANT}/hub-1/events/x",
    f"iim/{TENANT}//events",
])
def test_topics_outside_the_layout_are_bad(topic: str) -> None:
    with pytest.raises(hub.BadTopic):
        hub.read_topic("iim", topic)


def test_header_block_then_the_exact_body() -> None:
    body = b'{"event_id": "e1"}\n\n{"not": "a header"}'
    message = hub.read_payload(b"webhook-id: m1\r\nWebhook-Timestamp: 1\r\nwebhook-signature: v1,abc\r\n"
                               b"iim-device: smoke-1\r\n\r\n" + body, max_body=1024)
    assert not message.jose
    assert message.body == body
    assert message.headers == {"webhook-id": "m1", "webhook-timestamp": "1", "webhook-signature": "v1,abc"}
    assert (message.device, message.msg_id) == ("smoke-1", "m1")


def test_without_a_header_block_the_payload_is_a_jws() -> None:
    message = hub.read_payload(b"eyJhbGciOiJFUzI1NiJ9.e30.c2ln", max_body=1024)
    assert message.jose
    assert (message.device, message.msg_id) == (None, None)


@pytest.mark.parametrize(("payload", "status"), [
    (b"x-other: 1\n\n{}", 400), (b"webhook-id: a\nwebhook-id: b\n\n{}", 400), (b"no colon\n\n{}", 400),
    (b"iim-device: bad id\n\n{}", 400), (b"webhook-id: \xff\n\n{}", 400), (b"x" * 2000, 413),
])
def test_bad_payloads_are_refused_with_a_status(payload: bytes, status: int) -> None:
    with pytest.raises(BridgeRefusal) as refused:
        hub.read_payload(payload, max_body=1024)
    assert refused.value.status == status


def test_replies_carry_the_bridges_answer() -> None:
    outcome = IntakeOutcome("replayed", {"status": "accepted", "event_id": "e1", "incident_id": "i1"})
    assert json.loads(hub.ack(outcome, "m1")) == {"code": 202, "replayed": True, "status": "accepted",
                                                   "event_id": "e1", "incident_id": "i1", "msg_id": "m1"}
    refusal = BridgeRefusal(429, "rate-limited", "too many messages (hub)", retry_after=3)
    assert json.loads(hub.nack(refusal, None)) == {"code": 429, "error_id": "rate-limited",
                                                    "detail": "too many messages (hub)", "retry_after": 3}


@FUZZ
@given(st.binary(max_size=600))
def test_any_payload_is_read_or_refused_with_a_4xx(payload: bytes) -> None:
    status = 0
    try:
        message = hub.read_payload(payload, max_body=512)
    except BridgeRefusal as refused:
        status = refused.status
    if status:
        assert 400 <= status < 500
    else:
        assert message.body in payload


@FUZZ
@given(st.text(max_size=200))
def test_any_topic_is_read_or_bad(topic: str) -> None:
    try:
        route = hub.read_topic("iim", topic)
    except hub.BadTopic:
        return
    assert route.topic(route.leaf) == topic
