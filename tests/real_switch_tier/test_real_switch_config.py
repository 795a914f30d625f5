"""The shipped ``freeswitch-conf/`` and ``dialplan/`` load cleanly on the real switch and listen where documented."""

from __future__ import annotations

import socket

import pytest

from tests.real_switch import RealSwitch


def test_the_shipped_configuration_loads_without_errors(real_switch: RealSwitch) -> None:
    assert real_switch.log_lines("ERR", "CRIT", "ALERT") == []


def test_both_sip_profiles_and_the_wss_listener_run_on_the_configured_ports(real_switch: RealSwitch) -> None:
    status = real_switch.api("sofia status").splitlines()
    running = [line for line in status if "RUNNING" in line]
    assert any(f"127.0.0.1:{real_switch.internal_sip_port}" in line for line in running), status
    assert any(f"127.0.0.1:{real_switch.external_sip_port}" in line for line in running), status
    assert f":{real_switch.wss_port}" in real_switch.api("sofia status profile internal")


def test_the_event_socket_refuses_the_public_default_password(real_switch: RealSwitch) -> None:
    with socket.create_connection(("127.0.0.1", real_switch.esl_port), timeout=5) as sock:
        sock.recv(4096)
        sock.sendall(b"auth ClueCon\n\n")
        reply = sock.recv(4096)
    assert b"-ERR invalid" in reply


def test_the_event_socket_listens_on_loopback_only(real_switch: RealSwitch) -> None:
    with socket.socket() as probe:
        probe.settimeout(2)
        other = _non_loopback_address()
        if other is None:
            pytest.skip("this machine has no non-loopback IPv4 address to probe from")
        assert probe.connect_ex((other, real_switch.esl_port)) != 0


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(udp.getsockname()[0])
    return None if address.startswith("127.") else address
