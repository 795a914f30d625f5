"""``iim serve`` with the SIA DC-09 receiver: off by default, on by settings, sharing the device bridge's intake."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from iim.core.errors import ConfigError
from iim.service import DatabaseUrls, Service
from iim.settings import Settings
from policy_cache import registry
from policy_cache.db import Pool, tenant_tx
from policy_cache.models import SiaAccountCreate
from tests.alarm_rig import build_rig
from tests.iim.test_service import _settings, urls
from tests.sia_sender import Panel, send_tcp, send_udp

__all__ = ["urls"]

pytestmark = pytest.mark.timeout(180)


def test_sia_is_off_by_default_and_on_loopback() -> None:
    settings = Settings()
    assert settings.sia_enabled is False
    assert settings.sia_host == "127.0.0.1"


async def test_sia_without_a_transport_refuses_the_start(urls: DatabaseUrls, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="IIM_SIA_TCP"):
        async with Service(_settings(tmp_path, sia_enabled=True, sia_tcp=False, sia_udp=False), database=urls):
            pass


async def test_service_takes_a_panels_frames_over_tcp_and_udp(urls: DatabaseUrls, app_pool: Pool,
                                                               tmp_path: Path) -> None:
    rig = await build_rig(app_pool, tmp_path)
    panel = Panel(secrets.token_hex(4).upper())
    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        await registry.create(conn, registry.SIA_ACCOUNT, SiaAccountCreate(account=panel.account,
                                                                           device_id=rig.sensor_id), actor="test")
    async with Service(_settings(tmp_path, sia_enabled=True, sia_port=0), database=urls) as service:
        assert service.sia is not None
        assert service.sia.tcp_port is not None
        assert service.sia.udp_port == service.sia.tcp_port
        [tcp] = await send_tcp("127.0.0.1", service.sia.tcp_port, [panel.frame("NFA01")])
        udp = await send_udp("127.0.0.1", service.sia.udp_port, panel.frame("NWA02"))
    assert [panel.read(tcp).kind, panel.read(udp).kind] == ["ACK", "ACK"]
    assert service.sia is None
    async with tenant_tx(app_pool, rig.tenant_id) as conn:
        types = await conn.fetch("SELECT type FROM iim.device_event WHERE channel = 'sia' ORDER BY received_at")
    assert [r["type"] for r in types] == ["smoke", "water_leak"]
