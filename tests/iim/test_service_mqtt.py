"""``iim serve`` with the MQTT ingress: off by default, on by settings, sharing the device bridge's intake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iim.core.errors import ConfigError
from iim.service import DatabaseUrls, Service
from iim.settings import Settings
from policy_cache.db import Pool
from tests.alarm_rig import build_rig
from tests.iim.test_service import _settings, urls
from tests.iot_bridge.test_mqtt_ingress import hmac_payload, topic
from tests.mosquitto import running_mosquitto
from tests.mqtt_hub import MqttHub

__all__ = ["urls"]

pytestmark = pytest.mark.timeout(180)


def test_mqtt_is_off_by_default() -> None:
    assert Settings().mqtt_enabled is False


async def test_service_started_without_mqtt_has_no_ingress(urls: DatabaseUrls, tmp_path: Path) -> None:
    async with Service(_settings(tmp_path), database=urls) as service:
        assert service.mqtt is None


async def test_mqtt_without_iims_client_certificate_refuses_the_start(urls: DatabaseUrls, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="IIM_MQTT_CERT_FILE"):
        async with Service(_settings(tmp_path, mqtt_enabled=True), database=urls):
            pass


async def test_service_takes_a_hubs_event_over_mqtt(urls: DatabaseUrls, app_pool: Pool, tmp_path: Path) -> None:
    rig = await build_rig(app_pool, tmp_path)
    async with running_mosquitto(tmp_path) as broker:
        pki = broker.pki
        settings = _settings(tmp_path, mqtt_enabled=True, mqtt_host="localhost", mqtt_port=broker.port,
                             mqtt_ca_file=str(pki.ca_file), mqtt_cert_file=str(pki.iim.cert),
                             mqtt_key_file=str(pki.iim.key), mqtt_client_id="iim-serve-test")
        async with Service(settings, database=urls) as service:
            assert service.mqtt is not None
            await service.mqtt.wait_connected(15)
            hub = MqttHub(broker.port, str(pki.ca_file), pki.client(f"{rig.tenant_id}/{rig.hub}"), "hub-serve")
            assert await hub.connect()
            try:
                assert await hub.subscribe(topic(rig, "ack")) == [1]
                body = rig.event("smoke")
                await hub.publish(topic(rig, "events"), hmac_payload(rig, body))
                answer = (await hub.next_message()).json()
            finally:
                await hub.close()
        assert answer["code"] == 202
        assert answer["event_id"] == json.loads(body)["event_id"]
