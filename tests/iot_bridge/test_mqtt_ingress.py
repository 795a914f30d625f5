"""MQTT ingress against a real Mosquitto (TLS, client certificates, ACL) and real PostgreSQL.

Each hub is a paho-mqtt client with its own certificate (CN ``{tenant}/{hub}``); IIM connects with its own.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import pytest_asyncio

from iim.core.metrics import REGISTRY
from iot_bridge.app import BRIDGE_KEY, Bridge, BridgeConfig, create_bridge_app
from iot_bridge.mqtt.ingress import MqttConfig, MqttIngress
from iot_bridge.signing import sign_webhook
from policy_cache.db import Connection, Pool
from tests.alarm_rig import AlarmRig, build_rig
from tests.conftest import eventually
from tests.mosquitto import Broker, running_mosquitto
from tests.mqtt_hub import MqttHub, Received
from tests.pki import make_ca

pytestmark = pytest.mark.timeout(180)


def hmac_payload(rig: AlarmRig, body: bytes, *, device: str | None = None, msg_id: str | None = None) -> bytes:
    """Standard Webhooks headers, a blank line, the exact body: the MQTT form of ``POST /v1/events``."""
    ts, msg_id = int(time.time()), msg_id or f"msg_{uuid4().hex}"
    lines = [f"webhook-id: {msg_id}", f"webhook-timestamp: {ts}",
             f"webhook-signature: {sign_webhook(msg_id, ts, body, rig.secret)}",
             f"iim-device: {device or rig.sensor}"]
    return ("\n".join(lines) + "\n\n").encode() + body


def metric(outcome: str, reason: str = "") -> float:
    return REGISTRY.get_sample_value("iim_mqtt_messages_total", {"outcome": outcome, "reason": reason}) or 0.0


@dataclass
class MqttRig:
    broker: Broker
    bridge: Bridge
    a: AlarmRig
    b: AlarmRig
    admin: Connection
    stack: AsyncExitStack
    hubs: list[MqttHub] = field(default_factory=list)

    def config(self, **changes: Any) -> MqttConfig:
        pki = self.broker.pki
        base = MqttConfig(cert_file=pki.iim.cert, key_file=pki.iim.key, ca_file=pki.ca_file, host="localhost",
                          port=self.broker.port, client_id="iim-test", keepalive_s=10, connect_timeout_s=10)
        return replace(base, **changes)

    async def ingress(self, **changes: Any) -> MqttIngress:
        ingress = MqttIngress(self.bridge, self.config(**changes))
        await ingress.start()
        await ingress.wait_connected(15)
        return ingress

    async def hub(self, rig: AlarmRig, *, listen: bool = True) -> MqttHub:
        """``rig``'s hub, connected with its own certificate and listening on its ack topic."""
        cert = self.broker.pki.client(f"{rig.tenant_id}/{rig.hub}")
        hub = MqttHub(self.broker.port, str(self.broker.pki.ca_file), cert, f"hub-{uuid4().hex[:8]}")
        assert await hub.connect(), self.broker.log()
        self.hubs.append(hub)
        if listen:
            assert await hub.subscribe(topic(rig, "ack")) == [1]
        return hub

    async def rows(self, event_id: str) -> int:
        count: int = await self.admin.fetchval("SELECT count(*) FROM iim.device_event WHERE event_id = $1", event_id)
        return count


def topic(rig: AlarmRig, leaf: str) -> str:
    return f"iim/{rig.tenant_id}/{rig.hub}/{leaf}"


@pytest_asyncio.fixture
async def mqtt(app_pool: Pool, admin_conn: Connection, tmp_path: Path) -> AsyncIterator[MqttRig]:
    a = await build_rig(app_pool, tmp_path)
    b = await build_rig(app_pool, tmp_path, name="other")
    async with AsyncExitStack() as stack:
        broker = await stack.enter_async_context(running_mosquitto(tmp_path))
        bridge = create_bridge_app(app_pool, BridgeConfig())[BRIDGE_KEY]
        await stack.enter_async_context(bridge.refusals)
        rig = MqttRig(broker, bridge, a, b, admin_conn, stack)
        yield rig
        for hub in rig.hubs:
            await hub.close()


async def ack_for(hub: MqttHub, event_id: str) -> dict[str, Any]:
    """The hub's next reply, which must be about ``event_id``."""
    reply: Received = await hub.next_message()
    body = reply.json()
    assert body.get("event_id") == event_id, body
    return body  # type: ignore[no-any-return]


async def test_event_is_committed_then_acknowledged_to_the_hub_and_to_the_broker(mqtt: MqttRig) -> None:
    ingress = await mqtt.ingress()
    hub = await mqtt.hub(mqtt.a)
    body = mqtt.a.event("smoke")
    event_id = json.loads(body)["event_id"]
    await hub.publish(topic(mqtt.a, "events"), hmac_payload(mqtt.a, body))
    answer = await ack_for(hub, event_id)
    assert answer["code"] == 202
    assert answer["replayed"] is False
    assert answer["incident_id"]
    assert await mqtt.rows(event_id) == 1  # the ack left after the commit
    # The broker got IIM's PUBACK: a new session of the same client is not given the event again.
    await ingress.aclose()
    replayed = metric("replayed")
    ingress = await mqtt.ingress()
    second = mqtt.a.event("smoke")
    await hub.publish(topic(mqtt.a, "events"), hmac_payload(mqtt.a, second))
    assert (await ack_for(hub, json.loads(second)["event_id"]))["code"] == 202
    assert metric("replayed") == replayed
    await ingress.aclose()


async def test_subscriber_killed_before_the_commit_is_given_the_event_again_and_stores_it_once(
        mqtt: MqttRig) -> None:
    ingress = await mqtt.ingress()
    hub = await mqtt.hub(mqtt.a)
    body = mqtt.a.event("smoke")
    event_id = json.loads(body)["event_id"]
    held = metric("held", "store-unavailable")
    async with mqtt.admin.transaction():
        # The intake cannot write while this lock is held: IIM has the message but cannot commit it.
        await mqtt.admin.execute("LOCK TABLE iim.device_event IN ACCESS EXCLUSIVE MODE")
        await hub.publish(topic(mqtt.a, "events"), hmac_payload(mqtt.a, body))
        await eventually(lambda: metric("held", "store-unavailable") > held, timeout=20)
        await ingress.aclose()  # killed mid-intake: the transaction rolls back, no PUBACK was sent
    assert await mqtt.rows(event_id) == 0
    assert hub.pending() == 0  # and no answer reached the hub
    ingress = await mqtt.ingress()  # the same client id: the broker delivers the unacknowledged message again
    answer = await ack_for(hub, event_id)
    assert answer["code"] == 202
    assert answer["replayed"] is False
    assert await mqtt.rows(event_id) == 1
    await ingress.aclose()


async def test_duplicate_event_id_is_stored_once_and_answered_as_the_first(mqtt: MqttRig) -> None:
    ingress = await mqtt.ingress()
    hub = await mqtt.hub(mqtt.a)
    body = mqtt.a.event("smoke")
    event_id = json.loads(body)["event_id"]
    await hub.publish(topic(mqtt.a, "events"), hmac_payload(mqtt.a, body))
    first = await ack_for(hub, event_id)
    await hub.publish(topic(mqtt.a, "events"), hmac_payload(mqtt.a, body))  # a hub retry: new message id
    again = await ack_for(hub, event_id)
    assert (first["replayed"], again["replayed"]) == (False, True)
    assert again["incident_id"] == first["incident_id"]
    assert await mqtt.rows(event_id) == 1
    await ingress.aclose()


async def test_hub_cannot_publish_or_listen_on_another_hubs_topics(mqtt: MqttRig) -> None:
    ingress = await mqtt.ingress()
    hub_a = await mqtt.hub(mqtt.a)
    hub_b = await mqtt.hub(mqtt.b)
    forged = mqtt.a.event("smoke")
    # Hub B publishes an event (even one correctly signed with A's key) under hub A's topic: the broker's ACL
    # drops it (MQTT 3.1.1 has no way to tell B), so IIM never sees it.
    await hub_b.publish(topic(mqtt.a, "events"), hmac_payload(mqtt.a, forged))
    own = mqtt.b.event("smoke")
    await hub_b.publish(topic(mqtt.b, "events"), hmac_payload(mqtt.b, own))
    assert (await ack_for(hub_b, json.loads(own)["event_id"]))["code"] == 202  # B's own topic works
    assert await mqtt.rows(json.loads(forged)["event_id"]) == 0
    assert hub_a.pending() == 0
    # B listening on A's topics (Mosquitto grants the subscription, its ACL filters what is delivered) hears
    # nothing of A: not A's events, acks nor commands.
    for leaf in ("ack", "cmd", "events"):
        await hub_b.subscribe(topic(mqtt.a, leaf))
    body = mqtt.a.event("smoke")
    await hub_a.publish(topic(mqtt.a, "events"), hmac_payload(mqtt.a, body))
    assert (await ack_for(hub_a, json.loads(body)["event_id"]))["code"] == 202
    await ingress.publish_command(mqtt.a.tenant_id, mqtt.a.hub, b'{"command":"siren_off"}')
    await hub_b.publish(topic(mqtt.b, "events"), hmac_payload(mqtt.b, mqtt.b.event("smoke")))
    assert (await hub_b.next_message()).topic == topic(mqtt.b, "ack")  # B's own answer, and nothing before it
    assert hub_b.pending() == 0
    await ingress.aclose()


async def test_wrong_or_absent_client_certificate_cannot_connect(mqtt: MqttRig, tmp_path: Path) -> None:
    pki = mqtt.broker.pki
    rogue_ca = make_ca("Rogue CA")
    identity = f"{mqtt.a.tenant_id}/{mqtt.a.hub}"
    no_cert = MqttHub(mqtt.broker.port, str(pki.ca_file), None, "no-cert")
    rogue = MqttHub(mqtt.broker.port, str(pki.ca_file), pki.client(identity, ca=rogue_ca), "rogue")
    assert not await no_cert.connect(timeout=5)
    assert not await rogue.connect(timeout=5)
    for hub in (no_cert, rogue):
        await hub.close()
    # IIM itself with a certificate the broker does not trust never subscribes, and keeps trying.
    rogue_iim = pki.client("iim", ca=rogue_ca)
    ingress = MqttIngress(mqtt.bridge, mqtt.config(cert_file=rogue_iim.cert, key_file=rogue_iim.key,
                                                   reconnect_initial_s=0.1, reconnect_ceiling_s=0.2))
    failures = REGISTRY.get_sample_value("iim_mqtt_connection_failures_total", {"reason": "SSLError"}) or 0.0
    failures += sum(REGISTRY.get_sample_value("iim_mqtt_connection_failures_total", {"reason": r}) or 0.0
                    for r in ("ConnectionResetError", "ConnectionError", "IncompleteReadError"))
    await ingress.start()
    try:
        with pytest.raises(TimeoutError):
            await ingress.wait_connected(3)
        total = sum(REGISTRY.get_sample_value("iim_mqtt_connection_failures_total", {"reason": r}) or 0.0
                    for r in ("SSLError", "ConnectionResetError", "ConnectionError", "IncompleteReadError"))
        assert total >= failures + 2
    finally:
        await ingress.aclose()
    # The genuine certificate connects.
    assert await (await mqtt.hub(mqtt.a, listen=False)).subscribe(topic(mqtt.a, "ack")) == [1]


async def test_bad_payloads_are_refused_counted_and_the_ingress_goes_on(mqtt: MqttRig) -> None:
    ingress = await mqtt.ingress()
    hub = await mqtt.hub(mqtt.a)
    events = topic(mqtt.a, "events")
    before = {reason: metric("refused", reason) for reason in ("signature-invalid", "malformed-message",
                                                                "validation-failed")}
    await hub.publish(events, b"\x00\xff not an event at all")
    assert (await hub.next_message()).json()["code"] == 401
    await hub.publish(events, b"webhook-id: m1\nx-smuggled: 1\n\n{}")
    refused = (await hub.next_message()).json()
    assert (refused["code"], refused["error_id"]) == (400, "malformed-message")
    body = mqtt.a.event("smoke")
    tampered = hmac_payload(mqtt.a, body).replace(b'"smoke"', b'"flood"')
    await hub.publish(events, tampered)
    assert (await hub.next_message()).json()["error_id"] == "signature-invalid"
    wrong = json.dumps({"event_id": "e-1", "device_id": mqtt.a.sensor, "type": "smoke",
                        "occurred_at": 1700000000}).encode()
    await hub.publish(events, hmac_payload(mqtt.a, wrong))
    answer = (await hub.next_message()).json()
    assert (answer["code"], answer["error_id"]) == (422, "validation-failed")
    assert "1700000000" not in json.dumps(answer)  # errors never echo the input
    assert metric("refused", "signature-invalid") == before["signature-invalid"] + 2
    assert metric("refused", "malformed-message") == before["malformed-message"] + 1
    assert metric("refused", "validation-failed") == before["validation-failed"] + 1
    good = mqtt.a.event("smoke")
    await hub.publish(events, hmac_payload(mqtt.a, good))
    assert (await ack_for(hub, json.loads(good)["event_id"]))["code"] == 202
    await ingress.aclose()


async def test_jws_signed_event_is_accepted_over_mqtt(mqtt: MqttRig) -> None:
    ingress = await mqtt.ingress()
    hub = await mqtt.hub(mqtt.a)
    event = {"event_id": f"ev-{uuid4().hex[:12]}", "device_id": mqtt.a.jws_sensor, "type": "co",
             "occurred_at": "2026-11-25T10:00:00+03:00", "payload": {"ppm": 90}}
    await hub.publish(topic(mqtt.a, "events"), mqtt.a.jws(event))
    assert (await ack_for(hub, event["event_id"]))["code"] == 202
    await ingress.aclose()


async def test_event_for_a_device_outside_the_hubs_tenant_is_refused_like_a_bad_signature(mqtt: MqttRig) -> None:
    ingress = await mqtt.ingress()
    hub_b = await mqtt.hub(mqtt.b)
    body = mqtt.a.event("smoke")  # A's sensor, A's key, on B's topic: B's tenant has no such device
    await hub_b.publish(topic(mqtt.b, "events"), hmac_payload(mqtt.a, body))
    answer = (await hub_b.next_message()).json()
    assert (answer["code"], answer["error_id"]) == (401, "signature-invalid")
    assert await mqtt.rows(json.loads(body)["event_id"]) == 0
    await ingress.aclose()


async def test_hub_over_its_rate_is_refused_with_retry_after(mqtt: MqttRig) -> None:
    ingress = await mqtt.ingress(hub_rate=0.05, hub_burst=2)
    hub = await mqtt.hub(mqtt.a)
    bodies = [mqtt.a.event("smoke", payload={"n": n}) for n in range(3)]
    for body in bodies:
        await hub.publish(topic(mqtt.a, "events"), hmac_payload(mqtt.a, body))
    answers = [(await hub.next_message()).json() for _ in bodies]
    by_event: dict[str | None, dict[str, Any]] = {a.get("event_id"): a for a in answers}
    statuses = sorted(a["code"] for a in answers)
    assert statuses == [202, 202, 429], answers
    limited = next(a for a in answers if a["code"] == 429)
    assert limited["retry_after"] >= 1
    assert limited["error_id"] == "rate-limited"
    assert len(by_event) >= 2
    await ingress.aclose()


async def test_command_reaches_the_hub_on_its_cmd_topic(mqtt: MqttRig) -> None:
    ingress = await mqtt.ingress()
    hub = await mqtt.hub(mqtt.a, listen=False)
    assert await hub.subscribe(topic(mqtt.a, "cmd")) == [1]
    await ingress.publish_command(mqtt.a.tenant_id, mqtt.a.hub, b'{"command":"siren_off"}')
    received = await hub.next_message()
    assert (received.topic, received.json()) == (topic(mqtt.a, "cmd"), {"command": "siren_off"})
    await ingress.aclose()


async def test_reconnects_after_the_broker_restarts(mqtt: MqttRig, tmp_path: Path) -> None:
    """Supervised: a broker that goes away and comes back on the same port is reconnected to."""
    ingress = await mqtt.ingress(reconnect_initial_s=0.1, reconnect_ceiling_s=0.5)
    broker = mqtt.broker
    broker.process.terminate()
    await asyncio.to_thread(broker.process.wait)
    await eventually(lambda: not ingress.connected, timeout=20)
    restarted: Callable[[], Any] = lambda: running_mosquitto(tmp_path / "again", broker.pki, port=broker.port)
    (tmp_path / "again").mkdir()
    async with restarted():
        await ingress.wait_connected(20)
    await ingress.aclose()


async def test_a_hub_the_registry_does_not_know_cannot_speak_for_a_household(mqtt: MqttRig) -> None:
    """The broker lets any certificate of its CA publish under its own CN; IIM still binds that CN to a registered
    hub of the device's household (as a gateway certificate on the HTTPS bridge)."""
    ingress = await mqtt.ingress()
    stranger = MqttHub(mqtt.broker.port, str(mqtt.broker.pki.ca_file),
                       mqtt.broker.pki.client(f"{mqtt.a.tenant_id}/hub-unknown"), "stranger")
    assert await stranger.connect()
    mqtt.hubs.append(stranger)
    own = f"iim/{mqtt.a.tenant_id}/hub-unknown"
    assert await stranger.subscribe(f"{own}/ack") == [1]
    body = mqtt.a.event("smoke")
    await stranger.publish(f"{own}/events", hmac_payload(mqtt.a, body))
    answer = (await stranger.next_message()).json()
    assert (answer["code"], answer["error_id"]) == (403, "identity-mismatch")
    assert await mqtt.rows(json.loads(body)["event_id"]) == 0
    await ingress.aclose()


async def test_event_is_held_while_the_store_is_unavailable_and_stored_once_it_is_back(mqtt: MqttRig) -> None:
    ingress = await mqtt.ingress()
    hub = await mqtt.hub(mqtt.a)
    body = mqtt.a.event("smoke")
    event_id = json.loads(body)["event_id"]
    held = metric("held", "store-unavailable")
    async with mqtt.admin.transaction():
        await mqtt.admin.execute("LOCK TABLE iim.device_event IN ACCESS EXCLUSIVE MODE")
        await hub.publish(topic(mqtt.a, "events"), hmac_payload(mqtt.a, body))
        await eventually(lambda: metric("held", "store-unavailable") > held, timeout=20)
        assert hub.pending() == 0  # no answer while nothing is stored
    answer = await ack_for(hub, event_id)
    assert answer["code"] == 202
    assert answer["replayed"] is False
    assert await mqtt.rows(event_id) == 1
    await ingress.aclose()
