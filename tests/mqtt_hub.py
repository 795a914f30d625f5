"""A local hub for the MQTT tests, on paho-mqtt (an MQTT implementation independent of IIM's own client).

paho runs its network loop in a thread; messages land in a queue the async tests read with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import queue
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from tests.pki import PemFiles

__all__ = ["MqttHub", "Received"]


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class MqttHub:
    """A hub known to the broker by its certificate's CN; ``connect()`` then ``publish``/``next_message``."""

    port: int
    ca_file: str
    cert: PemFiles | None
    client_id: str
    inbox: queue.Queue[Received] = field(default_factory=queue.Queue)
    suback: queue.Queue[list[int]] = field(default_factory=queue.Queue)
    connack: queue.Queue[int] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=mqtt.MQTTv311, clean_session=True)
        self.client.tls_set(ca_certs=self.ca_file, certfile=str(self.cert.cert) if self.cert else None,
                            keyfile=str(self.cert.key) if self.cert else None)
        self.client.on_message = lambda _c, _u, msg: self.inbox.put(Received(msg.topic, msg.payload))
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connack.put(rc.value)
        self.client.on_subscribe = lambda _c, _u, _m, codes, _p: self.suback.put([c.value for c in codes])

    async def connect(self, timeout: float = 10.0) -> bool:
        """True once the broker accepted the connection; False if TLS or the broker refused it."""
        try:
            await asyncio.to_thread(self.client.connect, "localhost", self.port, 30)
        except OSError:  # ssl.SSLError included: a refused or absent client certificate
            return False
        self.client.loop_start()
        try:
            code = await asyncio.to_thread(self.connack.get, True, timeout)
        except queue.Empty:
            return False
        return code == 0

    async def subscribe(self, topic: str, timeout: float = 10.0) -> list[int]:
        """The SUBACK codes (128 = refused by the broker's ACL)."""
        self.client.subscribe(topic, qos=1)
        return await asyncio.to_thread(self.suback.get, True, timeout)

    async def publish(self, topic: str, payload: bytes, timeout: float = 10.0) -> None:
        """QoS 1, returning once the broker acknowledged it (its PUBACK to the hub)."""
        info = self.client.publish(topic, payload, qos=1)
        await asyncio.to_thread(info.wait_for_publish, timeout)
        if not info.is_published():
            raise TimeoutError("the broker did not acknowledge the publish")

    async def next_message(self, timeout: float = 15.0) -> Received:
        return await asyncio.to_thread(self.inbox.get, True, timeout)

    def pending(self) -> int:
        return self.inbox.qsize()

    async def close(self) -> None:
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)
