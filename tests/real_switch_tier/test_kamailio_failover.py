"""Two real FreeSWITCH nodes behind the Kamailio edge's dispatcher: OPTIONS probing sees both, and when one is
killed the calls go to the other (the first call that still picks the dead node fails over within the call)."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import sip_client, sipp
from tests.kamailio_edge import KamailioEdge, running_edge, tcp_bridge_to, wait_until
from tests.pg import PgCluster, PgDatabase
from tests.real_switch import RealSwitch, running_switch
from tests.real_switch_tier.conftest import Iim, Ports
from tests.real_switch_tier.kamailio_fixtures import kamailio_db_url, provision_speakers
from tests.real_switch_tier.test_real_calls import UNKNOWN_SUBSCRIBER, _call_ended


@pytest.fixture(scope="module")
def second_switch(real_switch: RealSwitch, ports: Ports,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealSwitch]:
    with running_switch(tmp_path_factory.mktemp("freeswitch-b"),
                        IIM_FS_IMS_PROXY=f"127.0.0.1:{ports.core}",
                        IIM_FS_SOCKET_PRIMARY=f"127.0.0.1:{ports.iim_primary}",
                        IIM_FS_SOCKET_SECONDARY=f"127.0.0.1:{ports.iim_secondary}") as switch:
        yield switch


@pytest.fixture(scope="module")
def edge(real_switch: RealSwitch, second_switch: RealSwitch, pg_cluster: PgCluster, pg_db: PgDatabase,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[KamailioEdge]:
    provision_speakers(pg_cluster, pg_db)
    nodes = [real_switch.external_sip_port, second_switch.external_sip_port]
    with tcp_bridge_to(pg_db.admin_url) as bridge, running_edge(
            tmp_path_factory.mktemp("kamailio"), nodes, kamailio_db_url(pg_cluster, pg_db, bridge.port)) as running:
        yield running


def _flags(edge: KamailioEdge) -> dict[int, str]:
    """Each FreeSWITCH node's dispatcher flags by port: ``AP`` active and probed, ``IP`` inactive."""
    listing = edge.rpc("dispatcher.list")
    return {int(port): flags for port, flags in
            re.findall(r"URI: sip:127\.0\.0\.1:(\d+)\s+FLAGS: (\w+)", listing)}


def test_options_probing_sees_both_nodes_up(edge: KamailioEdge, real_switch: RealSwitch,
                                            second_switch: RealSwitch) -> None:
    ports = {real_switch.external_sip_port, second_switch.external_sip_port}
    assert wait_until(lambda: {p for p, f in _flags(edge).items() if f.startswith("A")} == ports, 15), \
        edge.rpc("dispatcher.list")


def test_calls_are_spread_over_both_nodes(edge: KamailioEdge, real_switch: RealSwitch, second_switch: RealSwitch,
                                          iim: Iim, ports: Ports, tmp_path: Path) -> None:
    before = len(_call_ended(iim))
    with sipp.core(tmp_path, ports.core, "core_answer.xml"):
        result = sipp.call(tmp_path, edge.sip_port, UNKNOWN_SUBSCRIBER, calls=4, rate=4)
    assert result.finals == [200] * 4, result.output
    assert len(_call_ended(iim, before + 4)) == before + 4
    for switch in (real_switch, second_switch):
        assert f"[{UNKNOWN_SUBSCRIBER}]" in switch.log_text() or UNKNOWN_SUBSCRIBER in switch.log_text()


def test_one_node_killed_then_calls_go_to_the_other(edge: KamailioEdge, real_switch: RealSwitch,
                                                    second_switch: RealSwitch, iim: Iim, ports: Ports,
                                                    tmp_path: Path) -> None:
    assert second_switch.process is not None
    second_switch.process.kill()
    second_switch.process.wait(timeout=10)
    before = len(_call_ended(iim))
    with sipp.core(tmp_path, ports.core, "core_answer.xml"):
        result = sipp.call(tmp_path, edge.sip_port, UNKNOWN_SUBSCRIBER, calls=4, rate=4)
    assert result.finals == [200] * 4, (result.output, edge.log_text()[-3000:])
    assert len(_call_ended(iim, before + 4)) == before + 4
    assert wait_until(lambda: _flags(edge).get(second_switch.external_sip_port, "").startswith("I"), 10), \
        edge.rpc("dispatcher.list")
    assert _flags(edge)[real_switch.external_sip_port].startswith("A")


def test_pike_bans_a_source_sending_faster_than_its_density(edge: KamailioEdge) -> None:
    probe = sip_client.options(f"sip:127.0.0.1:{edge.sip_port}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.8", 0))
        via = f"127.0.0.8:{sock.getsockname()[1]}"
        for _ in range(300):  # the shipped PIKE_DENSITY: 40 requests per 2 s
            sock.sendto(probe.encode("UDP", via), ("127.0.0.1", edge.sip_port))
    assert wait_until(lambda: "pike: flood from 127.0.0.8" in edge.log_text(), 10)
    assert sip_client.Udp("127.0.0.8").request(probe, ("127.0.0.1", edge.sip_port), 1.0) is None
