"""The MQTT ingress: IIM's subscription to the hubs' broker, each event through the HTTPS bridge's own path.

Durability is the broker's and PostgreSQL's, in that order: IIM keeps a persistent session (clean session off,
QoS 1), and sends a message's PUBACK only after its event is committed (or refused for good). A crash, a cut
connection or a stop before the commit leaves the message unacknowledged, and the broker delivers it again on
the next connection; the intake's ledger (unique per device and ``event_id``) makes the second copy a replay
that answers as the first and acts no more. PUBACKs leave in the order the messages came (MQTT 3.1.1, 4.6), so
up to ``max_in_flight`` events are taken at once and each is acknowledged once it and every earlier one is done.

Commands go the other way (:mod:`iot_bridge.mqtt.commands`): :meth:`MqttIngress.publish_command` returns once
the broker acknowledged the PUBLISH (its PUBACK), within ``command_timeout_s``. The hubs' answers to commands
(``{prefix}/+/+/cmd-ack``, a second subscription) are recorded as durably as events: PUBACK after the commit,
held while PostgreSQL is away; an answer that is not one is dropped and counted.

A refused event (bad signature, bad body, over the hub's rate) is answered on the hub's ``ack`` topic with the
bridge's status and error id and acknowledged: the broker must not redeliver what can never pass. PostgreSQL
away is not a refusal: the event is held (no PUBACK) and tried again with backoff until it is stored.

Every wait has a deadline: TCP and TLS connect, CONNACK, SUBACK, each write, and the broker's silence (a
PINGREQ every half keep-alive, the connection dropped after a keep-alive without a byte). The connection runs
under :class:`~iim.core.lifecycle.TaskSupervisor`, reconnecting with jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from uuid import UUID

from prometheus_client import Counter, Gauge

from iim.core.errors import STORE_UNAVAILABLE
from iim.core.lifecycle import AsyncResource, TaskSupervisor
from iim.core.metrics import REGISTRY
from iim.core.retry import backoff_delay
from iot_bridge.app import Bridge, BridgeRefusal
from iot_bridge.intake import IntakeOutcome, StoreDown
from iot_bridge.mqtt import commands, hub
from iot_bridge.mqtt.commands import MqttUnavailable
from iot_bridge.mqtt.protocol import (
    NEED_DATA,
    ConnAck,
    MqttClient,
    MqttProtocolError,
    PubAck,
    Publish,
    SubAck,
)
from iot_bridge.ratelimit import TokenBucketLimiter
from iot_bridge.tls import ClientIdentity
from policy_cache.db import tenant_tx

__all__ = ["MESSAGES", "MqttConfig", "MqttIngress", "MqttUnavailable", "client_context"]

log = logging.getLogger(__name__)

_E = TypeVar("_E", ConnAck, SubAck)

MESSAGES = Counter("iim_mqtt_messages", "Hub messages by outcome (accepted, replayed, refused, dropped, held) and "
                   "reason", ["outcome", "reason"], registry=REGISTRY)
CONNECTED = Gauge("iim_mqtt_connected", "1 while IIM is subscribed to the hubs' broker", registry=REGISTRY)
CONNECT_FAILURES = Counter("iim_mqtt_connection_failures", "MQTT connections that failed or were lost, by reason",
                           ["reason"], registry=REGISTRY)


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """Where the broker is and how IIM proves itself to it (its own client certificate)."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None  # the broker's CA; None: the system's
    host: str = "127.0.0.1"
    port: int = 8883
    client_id: str = "iim"
    prefix: str = "iim"
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    write_timeout_s: float = 10.0
    command_timeout_s: float = 3.0  # a command's PUBLISH until the broker's PUBACK
    max_in_flight: int = 16
    hub_rate: float = 5.0
    hub_burst: int = 50
    reconnect_initial_s: float = 0.5
    reconnect_ceiling_s: float = 10.0
    store_retry_ceiling_s: float = 5.0


def client_context(config: MqttConfig) -> ssl.SSLContext:
    """TLS 1.2+ verifying the broker (its name and its CA), presenting IIM's client certificate."""
    ctx = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.cert_file, config.key_file)
    return ctx


class MqttIngress(AsyncResource):
    """Subscribes to ``{prefix}/+/+/events`` and feeds each message to ``bridge`` (shared with the HTTPS bridge:
    the same keys, limits, refusal audit and intake); records the hubs' answers to commands from
    ``{prefix}/+/+/cmd-ack`` in the bridge's database; publishes commands (:meth:`publish_command`)."""

    def __init__(self, bridge: Bridge, config: MqttConfig, *, context: ssl.SSLContext | None = None) -> None:
        hub.check_prefix(config.prefix)
        self.bridge = bridge
        self.config = config
        self._context = context
        self._limiter = TokenBucketLimiter(config.hub_rate, config.hub_burst)
        self._tasks = TaskSupervisor()
        self._closing = False
        self._link: _Link | None = None
        self._connected = asyncio.Event()
        #: why the last connection failed or ended (for /health), None while subscribed
        self.last_error: str | None = "not connected yet"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def broker(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    async def wait_connected(self, timeout: float) -> None:
        """Until subscribed (TimeoutError after ``timeout``)."""
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    async def start(self) -> None:
        if self._context is None:
            self._context = await asyncio.to_thread(client_context, self.config)
        self._tasks.supervise(self._connection, name="mqtt-ingress", initial=self.config.reconnect_initial_s,
                              ceiling=self.config.reconnect_ceiling_s, until=lambda: self._closing)

    async def aclose(self) -> None:
        self._closing = True
        link = self._link
        if link is not None:
            await link.stop()
        await self._tasks.aclose()

    async def publish_command(self, tenant: UUID, hub_id: str, payload: bytes) -> None:
        """Send ``payload`` to the hub's ``cmd`` topic at QoS 1; returns once the broker acknowledged it.

        Raises:
            MqttUnavailable: not connected to the broker now, the connection went, or no PUBACK in time.
        """
        route = hub.Route(self.config.prefix, tenant, hub_id)
        link = self._link
        if link is None or not self.connected:
            raise MqttUnavailable("not connected to the MQTT broker")
        try:
            async with asyncio.timeout(self.config.command_timeout_s):
                await link.publish(route.topic("cmd"), payload, confirmed=True)
        except (OSError, TimeoutError, MqttProtocolError) as exc:
            raise MqttUnavailable(f"the MQTT broker did not take the command: {str(exc) or type(exc).__name__}") \
                from exc

    # ------------------------------------------------------------------ one connection
    async def _connection(self) -> None:
        assert self._context is not None
        link = _Link(self, self._context)
        self._link = link
        try:
            await link.run()
        except (OSError, TimeoutError, MqttProtocolError, _Refused) as exc:
            reason = type(exc).__name__
            CONNECT_FAILURES.labels(reason).inc()
            self.last_error = f"{reason}: {exc}" if str(exc) else reason
            if not self._closing:
                log.warning("MQTT connection to %s:%s lost or refused: %s", self.config.host, self.config.port,
                            str(exc) or reason)
        finally:
            self._connected.clear()
            CONNECTED.set(0)
            self._link = None
            await link.stop()

    def _subscribed(self) -> None:
        self.last_error = None
        self._connected.set()
        CONNECTED.set(1)
        log.info("MQTT ingress subscribed", extra={"broker": f"{self.config.host}:{self.config.port}"})

    # ------------------------------------------------------------------ one message
    async def process(self, topic: str, payload: bytes) -> tuple[str, bytes] | None:
        """The reply (topic, body) to one hub message once it is settled: stored (or stored before) or refused.
        None for a message outside the topic layout (nobody to answer). Waits while PostgreSQL is away."""
        try:
            route = hub.read_topic(self.config.prefix, topic)
        except hub.BadTopic as exc:
            MESSAGES.labels("dropped", "bad-topic").inc()
            log.warning("MQTT message on an unexpected topic dropped: %s", exc)
            return None
        if route.leaf == hub.CMD_ACK:
            await self._command_answer(route, payload)
            return None
        source = f"mqtt:{route.tenant}/{route.hub}"
        msg_id: str | None = None
        try:
            self._rate_limit(route)
            message = hub.read_payload(payload, max_body=self.bridge.config.max_body)
            msg_id = message.msg_id
            outcome = await self._store(route, message, source)
        except BridgeRefusal as exc:
            self.bridge.refused(exc, source)
            MESSAGES.labels("refused", exc.error_id).inc()
            return route.topic("ack"), hub.nack(exc, msg_id)
        MESSAGES.labels(outcome.kind, "").inc()
        return route.topic("ack"), hub.ack(outcome, msg_id)

    async def _command_answer(self, route: hub.Route, payload: bytes) -> None:
        """A hub's answer to a command: recorded (PUBACK after the commit; held while PostgreSQL is away), or
        dropped when it is not an answer or the hub is over its rate (nobody to tell: counted and logged)."""
        try:
            self._rate_limit(route)
        except BridgeRefusal:
            MESSAGES.labels("dropped", "cmd-ack-rate-limited").inc()
            return
        answer = commands.read_ack(payload)
        if answer is None:
            MESSAGES.labels("dropped", "bad-cmd-ack").inc()
            log.warning("MQTT command answer from hub %s/%s is not one; dropped", route.tenant, route.hub)
            return
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(self.bridge.config.store_deadline_s), \
                        tenant_tx(self.bridge.pool, route.tenant) as conn:
                    moved = await commands.record_ack(conn, route.hub, answer)
                break
            except STORE_UNAVAILABLE as exc:
                attempt += 1
                MESSAGES.labels("held", "store-unavailable").inc()
                log.error("MQTT command answer held (no PUBACK) while the store is unavailable: %s", exc)
                await asyncio.sleep(backoff_delay(attempt, 0.5, self.config.store_retry_ceiling_s))
        MESSAGES.labels("cmd-ack" if moved else "dropped", answer.status if moved else "cmd-ack-unmatched").inc()

    def internal_error(self, topic: str) -> tuple[str, bytes] | None:
        """The answer to a message IIM failed on (a bug): 500, acknowledged, so it is not delivered forever."""
        try:
            route = hub.read_topic(self.config.prefix, topic)
        except hub.BadTopic:
            return None
        if route.leaf != hub.EVENTS:
            return None
        failed = BridgeRefusal(500, "internal-error", "internal error; the event was not accepted")
        return route.topic("ack"), hub.nack(failed, None)

    def _rate_limit(self, route: hub.Route) -> None:
        """Per hub, as the broker authenticated it (charged before the signature: the hub is already known)."""
        wait = self._limiter.take(f"{route.tenant}/{route.hub}", time.monotonic())
        if wait is not None:
            raise BridgeRefusal(429, "rate-limited", "too many messages (hub)", retry_after=max(1, round(wait + 0.5)))

    async def _store(self, route: hub.Route, message: hub.HubMessage, source: str) -> IntakeOutcome:
        device = self.bridge.jws_device(message.body) if message.jose else (message.device or route.hub)
        identity = ClientIdentity(str(route.tenant), "gateway", route.hub, fingerprint="")
        attempt = 0
        while True:
            try:
                return await self.bridge.device_event(route.tenant, device, message.body, jose=message.jose,
                                                      headers=message.headers, identity=identity, source=source)
            except StoreDown as exc:
                attempt += 1
                MESSAGES.labels("held", "store-unavailable").inc()
                log.error("MQTT event held (no PUBACK) while the event store is unavailable: %s", exc)
                await asyncio.sleep(backoff_delay(attempt, 0.5, self.config.store_retry_ceiling_s))


class _Refused(Exception):
    """The broker refused the connection or the subscription."""


class _Link:
    """One TLS connection to the broker: the protocol state, the reader loop, the pinger, the ordered PUBACKs."""

    def __init__(self, ingress: MqttIngress, context: ssl.SSLContext) -> None:
        self.ingress = ingress
        self.config = ingress.config
        self.context = context
        self.protocol = MqttClient(max_packet=ingress.bridge.config.max_body + 4096)
        self.writer: asyncio.StreamWriter | None = None
        self.slots = asyncio.Semaphore(self.config.max_in_flight)
        #: QoS 1 messages in arrival order: [packet id, settled]; PUBACKs go out from the head.
        self.unacked: deque[list[int | bool]] = deque()
        self.handlers: set[asyncio.Task[None]] = set()
        self.stopped = False
        self.early: list[Publish] = []
        #: QoS 1 PUBLISHes of ours whose PUBACK someone awaits (commands), by packet id
        self.confirmations: dict[int, asyncio.Future[None]] = {}

    async def run(self) -> None:
        c = self.config
        async with asyncio.timeout(c.connect_timeout_s):
            reader, self.writer = await asyncio.open_connection(c.host, c.port, ssl=self.context,
                                                                server_hostname=c.host,
                                                                ssl_handshake_timeout=c.connect_timeout_s)
            await self.send(self.protocol.connect(c.client_id, keepalive_s=c.keepalive_s, clean_session=False))
            connack = await self._expect(reader, ConnAck)
            if connack.return_code:
                raise _Refused(f"CONNACK return code {connack.return_code}")
            packet_id, packet = self.protocol.subscribe([(hub.events_filter(c.prefix), 1),
                                                         (hub.cmd_ack_filter(c.prefix), 1)])
            await self.send(packet)
            suback = await self._expect(reader, SubAck)
            if suback.packet_id != packet_id or not suback.granted or suback.granted[0] == 0x80:
                raise _Refused("the broker refused the subscription")
            if 0x80 in suback.granted[1:]:  # an ACL from before commands: events still flow
                log.warning("the MQTT broker refused IIM's subscription to %s: hubs' answers to commands are not "
                            "recorded (see the README's ACL)", hub.cmd_ack_filter(c.prefix))
        self.ingress._subscribed()
        pinger = asyncio.create_task(self._ping(), name="mqtt-ping")
        try:
            for early in self.early:
                await self._admit(early)
            self.early.clear()
            while True:
                async with asyncio.timeout(c.keepalive_s):
                    data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the broker closed the connection")
                self.protocol.receive_data(data)
                while (event := self.protocol.next_event()) is not NEED_DATA:
                    if isinstance(event, Publish):
                        await self._admit(event)
                    elif isinstance(event, PubAck):
                        waiter = self.confirmations.pop(event.packet_id, None)
                        if waiter is not None and not waiter.done():
                            waiter.set_result(None)
        finally:
            pinger.cancel()
            for waiter in self.confirmations.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionError("the connection to the broker ended"))
            self.confirmations.clear()

    async def _expect(self, reader: asyncio.StreamReader, kind: type[_E]) -> _E:
        """The next ``kind`` packet. A persistent session's messages may come before the SUBACK (the broker
        sends what it kept right after CONNACK): they are kept, in order, for :meth:`run` to take."""
        while True:
            while (event := self.protocol.next_event()) is NEED_DATA:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the broker closed the connection")
                self.protocol.receive_data(data)
            if not isinstance(event, Publish):
                break
            self.early.append(event)
        if not isinstance(event, kind):
            raise _Refused(f"expected {kind.__name__}, got {type(event).__name__}")
        return event

    async def _ping(self) -> None:
        """A PINGREQ every half keep-alive; a failed one ends here (the reader's deadline then ends the link)."""
        with contextlib.suppress(OSError, TimeoutError, MqttProtocolError):
            while True:
                await asyncio.sleep(max(1.0, self.config.keepalive_s / 2))
                await self.send(self.protocol.pingreq())

    async def _admit(self, message: Publish) -> None:
        await self.slots.acquire()  # at max_in_flight the reader waits: the broker holds the rest
        if self.stopped:  # stopping: left unacknowledged, the broker delivers it again later
            self.slots.release()
            return
        entry: list[int | bool] | None = None
        if message.qos == 1 and message.packet_id is not None:
            entry = [message.packet_id, False]
            self.unacked.append(entry)
        task = asyncio.create_task(self._handle(message, entry), name="mqtt-event")
        self.handlers.add(task)
        task.add_done_callback(self.handlers.discard)

    async def _handle(self, message: Publish, entry: list[int | bool] | None) -> None:
        try:
            try:
                reply = await self.ingress.process(message.topic, message.payload)
            except Exception:  # a bug, not the hub's fault: answered, acknowledged, counted (never a crash loop)
                log.exception("MQTT message could not be handled")
                MESSAGES.labels("refused", "internal-error").inc()
                reply = self.ingress.internal_error(message.topic)
            if reply is not None:
                await self.publish(*reply)
            if entry is not None:
                entry[1] = True
                await self._flush()
        except (OSError, TimeoutError, MqttProtocolError) as exc:
            log.warning("MQTT reply not sent (the connection is going): %s", exc)
        finally:
            self.slots.release()

    async def _flush(self) -> None:
        packets = b""
        while self.unacked and self.unacked[0][1]:
            packet_id = self.unacked.popleft()[0]
            assert isinstance(packet_id, int)
            packets += self.protocol.puback(packet_id)
        if packets:
            await self.send(packets)

    async def publish(self, topic: str, payload: bytes, *, confirmed: bool = False) -> None:
        """QoS 1; with ``confirmed``, until the broker's PUBACK (the caller's deadline bounds the wait)."""
        packet_id, packet = self.protocol.publish(topic, payload, qos=1)
        if not confirmed or packet_id is None:
            await self.send(packet)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.confirmations[packet_id] = waiter
        try:
            await self.send(packet)
            await waiter
        finally:
            if self.confirmations.get(packet_id) is waiter:
                del self.confirmations[packet_id]

    async def send(self, data: bytes) -> None:
        writer = self.writer
        if writer is None or writer.is_closing():
            raise ConnectionError("the connection is closed")
        writer.write(data)
        try:
            async with asyncio.timeout(self.config.write_timeout_s):
                await writer.drain()
        except TimeoutError:
            writer.transport.abort()  # the reader then ends the connection
            raise

    async def stop(self) -> None:
        """Handlers cancelled (their transactions roll back, their messages stay unacknowledged), then a clean
        DISCONNECT when possible: the broker keeps the session and redelivers what was not acknowledged."""
        first = not self.stopped
        self.stopped = True
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        writer = self.writer
        if writer is None or not first:
            return
        with contextlib.suppress(OSError, TimeoutError, MqttProtocolError, ConnectionError):
            if not writer.is_closing():
                writer.write(self.protocol.disconnect())
                async with asyncio.timeout(1.0):
                    await writer.drain()
        writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
