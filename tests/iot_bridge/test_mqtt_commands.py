"""Commands to hubs, the hubs' answers and the hub's list of them, against a real Mosquitto (TLS, client
certificates, the README's ACL) and real PostgreSQL; each hub is a paho-mqtt client with its own certificate."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic import ValidationError

from iot_bridge.mqtt.commands import (
    CommandConflict,
    HubCommandBody,
    HubCommandQuery,
    HubCommandRecord,
    HubDisabled,
    MqttUnavailable,
    UnknownHub,
    get_command,
    list_commands,
    send_command,
)
from iot_bridge.mqtt.ingress import MqttIngress
from policy_cache import registry
from policy_cache.audit import flush_pending
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import DeviceUpdate
from tests.alarm_rig import AlarmRig
from tests.conftest import eventually
from tests.iot_bridge.test_mqtt_ingress import MqttRig, metric, mqtt, topic

__all__ = ["mqtt"]

pytestmark = pytest.mark.timeout(180)


def command(command_id: str = "c-1", name: str = "arm", **arguments: Any) -> HubCommandBody:
    return HubCommandBody.model_validate_json(json.dumps({"id": command_id, "name": name, "arguments": arguments}))


async def send(pool: Pool, ingress: MqttIngress | None, rig: AlarmRig, body: HubCommandBody, *,
               hub: str | None = None) -> tuple[HubCommandRecord, bool]:
    async with tenant_tx(pool, rig.tenant_id) as conn:
        return await send_command(conn, ingress, rig.tenant_id, hub or rig.hub, body, actor="op@noc",
                                  correlation={"channel": "test"})


async def state(pool: Pool, rig: AlarmRig, command_id: str) -> HubCommandRecord:
    async with tenant_tx(pool, rig.tenant_id, readonly=True) as conn:
        return await get_command(conn, rig.hub, command_id)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def listening_hub(mqtt: MqttRig, rig: AlarmRig) -> Any:
    hub = await mqtt.hub(rig, listen=False)
    assert await hub.subscribe(topic(rig, "cmd")) == [1]
    return hub


# -- what a command may be ---------------------------------------------------------------------------------


def test_commands_outside_the_allow_list_or_with_foreign_arguments_are_refused() -> None:
    for bad in ({"id": "c-1", "name": "unlock"}, {"id": "c-1", "name": "arm", "arguments": {"mode": "party"}},
                {"id": "c-1", "name": "silence", "arguments": {"duration_s": 5}},
                {"id": "c-1", "name": "silence", "arguments": {"duration_s": "60"}},
                {"id": "c-1", "name": "reboot", "arguments": {"now": True}},
                {"id": "c-1", "name": "test", "arguments": {"device": "a/b"}},
                {"id": "bad id", "name": "arm"}, {"id": "c" * 129, "name": "arm"},
                {"id": "c-1", "name": "arm", "arguments": {f"k{i}": i for i in range(5)}},
                {"id": "c-1", "name": "arm", "extra": 1}):
        with pytest.raises(ValidationError):
            HubCommandBody.model_validate_json(json.dumps(bad))


def test_arguments_are_completed_with_their_defaults() -> None:
    assert command().resolved_arguments() == {"mode": "away"}
    assert command(name="silence").resolved_arguments() == {"duration_s": 300}
    assert command(name="test").resolved_arguments() == {}
    assert command(name="test", device="smoke-1").resolved_arguments() == {"device": "smoke-1"}


# -- against the broker and the database ------------------------------------------------------------------


async def test_command_reaches_the_hub_once_the_broker_took_it_and_is_audited(mqtt: MqttRig, app_pool: Pool) -> None:
    ingress = await mqtt.ingress()
    hub = await listening_hub(mqtt, mqtt.a)
    record, replayed = await send(app_pool, ingress, mqtt.a, command("c-arm", mode="night"))
    assert (record.state, replayed, record.actor) == ("sent", False, "op@noc")
    received = await hub.next_message()
    assert received.topic == topic(mqtt.a, "cmd")
    body = received.json()
    assert {k: body[k] for k in ("id", "name", "arguments")} == {"id": "c-arm", "name": "arm",
                                                                  "arguments": {"mode": "night"}}
    audit = await mqtt.admin.fetch("SELECT actor, detail FROM iim.audit_log WHERE tenant_id = $1 "
                                   "AND action = 'hub_command.send'", mqtt.a.tenant_id)
    assert [(r["actor"], r["detail"]) for r in audit] == [("op@noc", {
        "hub": mqtt.a.hub, "command_id": "c-arm", "command": "arm", "arguments": {"mode": "night"}})]
    await ingress.aclose()


async def test_the_same_id_again_returns_the_first_command_and_publishes_nothing(
        mqtt: MqttRig, app_pool: Pool) -> None:
    ingress = await mqtt.ingress()
    hub = await listening_hub(mqtt, mqtt.a)
    first, _ = await send(app_pool, ingress, mqtt.a, command("c-once", name="silence"))
    await hub.next_message()
    again, replayed = await send(app_pool, ingress, mqtt.a, command("c-once", name="silence", duration_s=300))
    assert replayed is True
    assert again == first  # the defaults made explicit are the same command
    with pytest.raises(CommandConflict):
        await send(app_pool, ingress, mqtt.a, command("c-once", name="silence", duration_s=60))
    with pytest.raises(CommandConflict):
        await send(app_pool, ingress, mqtt.a, command("c-once", name="reboot"))
    await asyncio.sleep(1.0)
    assert hub.pending() == 0
    count = await mqtt.admin.fetchval("SELECT count(*) FROM iim.audit_log WHERE tenant_id = $1 "
                                      "AND action = 'hub_command.send'", mqtt.a.tenant_id)
    assert count == 1
    await ingress.aclose()


async def test_a_command_the_broker_cannot_take_leaves_no_row_and_its_id_free(mqtt: MqttRig, app_pool: Pool) -> None:
    with pytest.raises(MqttUnavailable):
        await send(app_pool, None, mqtt.a, command("c-later"))  # MQTT not running
    ingress = await mqtt.ingress()
    await ingress.aclose()
    with pytest.raises(MqttUnavailable):
        await send(app_pool, ingress, mqtt.a, command("c-later"))  # not connected
    assert await mqtt.admin.fetchval("SELECT count(*) FROM iim.hub_command WHERE tenant_id = $1",
                                     mqtt.a.tenant_id) == 0
    ingress = await mqtt.ingress()
    hub = await listening_hub(mqtt, mqtt.a)
    record, replayed = await send(app_pool, ingress, mqtt.a, command("c-later"))
    assert (record.state, replayed) == ("sent", False)
    assert (await hub.next_message()).json()["id"] == "c-later"
    await ingress.aclose()


async def test_unknown_hubs_and_another_tenants_hub_are_the_same_unknown(mqtt: MqttRig, app_pool: Pool) -> None:
    ingress = await mqtt.ingress()
    for hub in (mqtt.b.hub, "hub-nobody", mqtt.a.sensor, f"{mqtt.a.hub}/#", "+"):
        with pytest.raises(UnknownHub):
            await send(app_pool, ingress, mqtt.a, command(), hub=hub)
    assert await mqtt.admin.fetchval("SELECT count(*) FROM iim.hub_command WHERE tenant_id = ANY($1::uuid[])",
                                     [mqtt.a.tenant_id, mqtt.b.tenant_id]) == 0
    await ingress.aclose()


async def test_two_requests_with_one_id_at_once_publish_one_command(mqtt: MqttRig, app_pool: Pool) -> None:
    ingress = await mqtt.ingress()
    hub = await listening_hub(mqtt, mqtt.a)
    results = await asyncio.gather(*(send(app_pool, ingress, mqtt.a, command("c-race", name="test"))
                                     for _ in range(4)))
    assert sorted(replayed for _, replayed in results) == [False, True, True, True]
    assert all(record == results[0][0] for record, _ in results)
    assert (await hub.next_message()).json()["id"] == "c-race"
    await asyncio.sleep(1.0)
    assert hub.pending() == 0
    await ingress.aclose()


async def test_a_disabled_hub_gets_no_command_and_a_deleted_one_takes_its_commands_along(
        mqtt: MqttRig, app_pool: Pool) -> None:
    ingress = await mqtt.ingress()
    await send(app_pool, ingress, mqtt.a, command("c-before"))
    async with tenant_tx(app_pool, mqtt.a.tenant_id) as conn:
        device = await conn.fetchval("SELECT id FROM iim.device WHERE external_id = $1", mqtt.a.hub)
        await registry.update(conn, registry.DEVICE, device, DeviceUpdate(enabled=False), actor="test")
    with pytest.raises(HubDisabled):
        await send(app_pool, ingress, mqtt.a, command("c-after"))
    async with tenant_tx(app_pool, mqtt.a.tenant_id) as conn:
        await registry.delete(conn, registry.DEVICE, device, actor="test")
    assert await mqtt.admin.fetchval("SELECT count(*) FROM iim.hub_command WHERE tenant_id = $1",
                                     mqtt.a.tenant_id) == 0
    await ingress.aclose()


async def test_the_hubs_answers_are_recorded_and_a_final_one_is_never_replaced(
        mqtt: MqttRig, app_pool: Pool) -> None:
    ingress = await mqtt.ingress()
    hub = await listening_hub(mqtt, mqtt.a)
    await send(app_pool, ingress, mqtt.a, command("c-acked"))
    await hub.next_message()
    answers = topic(mqtt.a, "cmd-ack")
    await hub.publish(answers, b'{"id": "c-acked", "status": "accepted"}')
    await until(lambda: _is(app_pool, mqtt.a, "c-acked", "accepted"))
    await hub.publish(answers, b'{"id": "c-acked", "status": "done", "detail": "armed away"}')
    await until(lambda: _is(app_pool, mqtt.a, "c-acked", "done"))
    await hub.publish(answers, b'{"id": "c-acked", "status": "accepted"}')  # late: ignored
    unmatched = metric("dropped", "cmd-ack-unmatched")
    await hub.publish(answers, b'{"id": "c-acked", "status": "failed"}')  # after the final one: ignored
    await eventually(lambda: metric("dropped", "cmd-ack-unmatched") >= unmatched + 1, timeout=15)
    record = await state(app_pool, mqtt.a, "c-acked")
    assert (record.state, record.ack_detail) == ("done", "armed away")
    assert record.acked_at is not None
    await flush_pending(app_pool)
    rows = await mqtt.admin.fetch("SELECT actor, detail FROM iim.audit_log WHERE tenant_id = $1 "
                                  "AND action = 'hub_command.ack' ORDER BY id", mqtt.a.tenant_id)
    assert [(r["actor"], r["detail"]["status"]) for r in rows] == [(f"hub:{mqtt.a.hub}", "accepted"),
                                                                   (f"hub:{mqtt.a.hub}", "done")]
    await ingress.aclose()


async def _is(pool: Pool, rig: AlarmRig, command_id: str, expected: str) -> bool:
    return (await state(pool, rig, command_id)).state == expected


async def test_answers_that_are_not_answers_are_dropped_and_the_ingress_goes_on(
        mqtt: MqttRig, app_pool: Pool) -> None:
    ingress = await mqtt.ingress()
    hub = await listening_hub(mqtt, mqtt.a)
    await send(app_pool, ingress, mqtt.a, command("c-after"))
    bad = metric("dropped", "bad-cmd-ack")
    answers = topic(mqtt.a, "cmd-ack")
    for payload in (b"not json", b'{"id": "c-after", "status": "exploded"}', b'{"id": "c-after"}',
                    b'{"id": "c-after", "status": "done", "detail": "\\u0000"}', b"{" + b" " * 4096 + b"}"):
        await hub.publish(answers, payload)
    await eventually(lambda: metric("dropped", "bad-cmd-ack") >= bad + 5, timeout=15)
    assert (await state(app_pool, mqtt.a, "c-after")).state == "sent"
    await hub.publish(answers, b'{"id": "c-after", "status": "rejected", "detail": "zone 3 open"}')
    await until(lambda: _is(app_pool, mqtt.a, "c-after", "rejected"))
    await ingress.aclose()


async def test_a_hub_cannot_answer_for_another_hub(mqtt: MqttRig, app_pool: Pool) -> None:
    """The broker's ACL lets a hub write only its own ``cmd-ack``: a forged answer never reaches IIM."""
    ingress = await mqtt.ingress()
    hub_b = await listening_hub(mqtt, mqtt.b)
    await send(app_pool, ingress, mqtt.b, command("c-b"))
    await hub_b.next_message()
    hub_a = await mqtt.hub(mqtt.a, listen=False)
    await hub_a.publish(topic(mqtt.b, "cmd-ack"), b'{"id": "c-b", "status": "done"}')
    await asyncio.sleep(1.0)
    assert (await state(app_pool, mqtt.b, "c-b")).state == "sent"
    await hub_b.publish(topic(mqtt.b, "cmd-ack"), b'{"id": "c-b", "status": "failed", "detail": "siren fault"}')
    await until(lambda: _is(app_pool, mqtt.b, "c-b", "failed"))  # B's own answer goes through
    await ingress.aclose()


async def test_an_answer_is_held_while_the_store_is_unavailable_and_recorded_once_it_is_back(
        mqtt: MqttRig, app_pool: Pool) -> None:
    ingress = await mqtt.ingress(store_retry_ceiling_s=0.5)
    hub = await listening_hub(mqtt, mqtt.a)
    await send(app_pool, ingress, mqtt.a, command("c-held"))
    held = metric("held", "store-unavailable")
    async with mqtt.admin.transaction():
        await mqtt.admin.execute("LOCK TABLE iim.hub_command IN ACCESS EXCLUSIVE MODE")
        await hub.publish(topic(mqtt.a, "cmd-ack"), b'{"id": "c-held", "status": "done"}')
        # Past the store's deadline the answer is held (no PUBACK) and tried again.
        await eventually(lambda: metric("held", "store-unavailable") > held, timeout=20)
    await until(lambda: _is(app_pool, mqtt.a, "c-held", "done"))
    await ingress.aclose()


async def test_commands_sent_over_the_broker_are_listed_newest_first_with_the_hubs_answers(
        mqtt: MqttRig, app_pool: Pool) -> None:
    ingress = await mqtt.ingress()
    hub = await listening_hub(mqtt, mqtt.a)
    for command_id, name in (("l-1", "arm"), ("l-2", "silence"), ("l-3", "test")):
        await send(app_pool, ingress, mqtt.a, command(command_id, name=name))
        await hub.next_message()
    await send(app_pool, ingress, mqtt.b, command("l-b"))  # another tenant's hub: never in A's list
    await hub.publish(topic(mqtt.a, "cmd-ack"), b'{"id": "l-2", "status": "done", "detail": "silenced"}')
    await until(lambda: _is(app_pool, mqtt.a, "l-2", "done"))
    async with tenant_tx(app_pool, mqtt.a.tenant_id, readonly=True) as conn:
        everything = await list_commands(conn, mqtt.a.hub, HubCommandQuery(), 50)
        first = await list_commands(conn, mqtt.a.hub, HubCommandQuery(limit=2), 2)
        rest = await list_commands(conn, mqtt.a.hub, HubCommandQuery(after=first.next_after), 2)
        done = await list_commands(conn, mqtt.a.hub, HubCommandQuery(state="done"), 50)
        with pytest.raises(UnknownHub):
            await list_commands(conn, mqtt.b.hub, HubCommandQuery(), 50)
    assert [(c.id, c.state) for c in everything.items] == [("l-3", "sent"), ("l-2", "done"), ("l-1", "sent")]
    assert everything.next_after is None
    assert [c.id for c in first.items + rest.items] == ["l-3", "l-2", "l-1"]
    assert [(c.id, c.ack_detail) for c in done.items] == [("l-2", "silenced")]
    await ingress.aclose()
