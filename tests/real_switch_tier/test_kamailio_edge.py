"""The Kamailio edge in front of the real switch: speakers' digest auth from IIM's registry, the security rules
of ``kamailio/kamailio.cfg`` one test each, a trunk call reaching IIM, and a flood banned per source."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests import sip_client, sipp
from tests.kamailio_edge import DOMAIN, KamailioEdge, running_edge, tcp_bridge_to, wait_until
from tests.pg import PgCluster, PgDatabase
from tests.real_switch import RealSwitch, free_port
from tests.real_switch_tier.conftest import Iim, Ports
from tests.real_switch_tier.kamailio_fixtures import CALLER, SPEAKER, kamailio_db_url, provision_speakers
from tests.real_switch_tier.test_real_calls import UNKNOWN_SUBSCRIBER, _call_ended


@pytest.fixture(scope="module")
def edge(real_switch: RealSwitch, pg_cluster: PgCluster, pg_db: PgDatabase,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[KamailioEdge]:
    provision_speakers(pg_cluster, pg_db)
    with tcp_bridge_to(pg_db.admin_url) as bridge, running_edge(
            tmp_path_factory.mktemp("kamailio"), [real_switch.external_sip_port],
            kamailio_db_url(pg_cluster, pg_db, bridge.port),
            PIKE_DENSITY="10000", REGISTER_LIMIT="40", INVITE_LIMIT="40") as running:
        yield running


def _code(response: sip_client.Response | None) -> int | None:
    return None if response is None else response.code


def _target(edge: KamailioEdge) -> tuple[str, int]:
    return ("127.0.0.1", edge.sip_port)


def test_a_speaker_in_iims_registry_registers_with_its_password(edge: KamailioEdge) -> None:
    challenge, final = sip_client.Udp("127.0.0.4").register(_target(edge), SPEAKER.user, SPEAKER.password, DOMAIN)
    assert _code(challenge) == 401, challenge
    assert _code(final) == 200, (final, edge.log_text()[-3000:])
    assert f"sip:{SPEAKER.user}@127.0.0.4" in (final.header("Contact") or "")


def _shape(response: sip_client.Response | None) -> tuple[int, str, list[str]] | None:
    return None if response is None else (response.code, response.reason, response.header_names())


def test_an_unknown_user_and_a_wrong_password_get_identical_answers(edge: KamailioEdge) -> None:
    udp = sip_client.Udp("127.0.0.4")
    _, unknown = udp.register(_target(edge), "nobody", "whatever", DOMAIN)
    _, wrong = udp.register(_target(edge), SPEAKER.user, "not-the-password", DOMAIN)
    assert _code(unknown) == 403, unknown
    assert _shape(unknown) == _shape(wrong)


def test_the_auth_user_must_be_the_to_user(edge: KamailioEdge) -> None:
    # The kitchen's own valid credentials, used to register the hallway's address.
    _, final = sip_client.Udp("127.0.0.4").register(_target(edge), SPEAKER.user, SPEAKER.password, DOMAIN,
                                                    to_user=CALLER.user)
    assert _code(final) == 403, final


def test_a_call_to_a_foreign_domain_is_refused_not_relayed(edge: KamailioEdge) -> None:
    request = sip_client.invite("sip:+15550100@relay.example.net", f"sip:{SPEAKER.user}@{DOMAIN}",
                                "sip:kitchen@127.0.0.4:5060")
    for source in ("127.0.0.1", "127.0.0.4"):  # the trunk, and anyone else
        response = sip_client.Udp(source).request(request, _target(edge), 3.0)
        assert _code(response) == 403, (source, response)


@pytest.mark.parametrize("agent", ["friendly-scanner", "sipvicious 0.3.0", "SIPCLI/v1.8", "sipsak 0.9.6"])
def test_a_scanner_user_agent_gets_no_answer(edge: KamailioEdge, agent: str) -> None:
    probe = sip_client.options(f"sip:127.0.0.1:{edge.sip_port}", user_agent=agent)
    assert sip_client.Udp("127.0.0.5").request(probe, _target(edge), 1.0) is None
    assert "scanner user agent from 127.0.0.5 banned" in edge.log_text()


def _banners(response: sip_client.Response) -> list[str]:
    return [f"{name}: {value}" for name, value in response.headers if name.lower() in ("server", "user-agent")]


def test_no_answer_carries_a_version_banner(edge: KamailioEdge, tmp_path: Path) -> None:
    options = sip_client.Udp("127.0.0.4").request(sip_client.options(f"sip:127.0.0.1:{edge.sip_port}"),
                                                   _target(edge), 3.0)
    challenge, _ = sip_client.Udp("127.0.0.4").register(_target(edge), SPEAKER.user, "x", DOMAIN)
    # A 404 made by FreeSWITCH (a number outside the subscriber plan), relayed through the edge.
    relayed = sip_client.Udp("127.0.0.1").request(
        sip_client.invite(f"sip:12345@127.0.0.1:{edge.sip_port}", "sip:79160000000@127.0.0.1",
                          "sip:79160000000@127.0.0.1:5060"), _target(edge), 10.0)
    for response in (options, challenge, relayed):
        assert response is not None
        for banner in _banners(response):
            assert not any(ch.isdigit() for ch in banner), banner
            assert "kamailio" not in banner.lower(), banner
            assert "freeswitch" not in banner.lower(), banner
    assert _code(relayed) in (404, 480), relayed


def test_a_trunk_call_reaches_iim_through_freeswitch(
        edge: KamailioEdge, iim: Iim, ports: Ports, tmp_path: Path) -> None:
    before = len(_call_ended(iim))
    with sipp.core(tmp_path, ports.core, "core_answer.xml"):
        result = sipp.call(tmp_path, edge.sip_port, UNKNOWN_SUBSCRIBER)
    assert result.finals == [200], result.output
    assert [line["result"] for line in _call_ended(iim, before + 1)[before:]] == ["ok"]


def test_a_register_flood_bans_its_source_while_another_speaker_keeps_calling(
        edge: KamailioEdge, iim: Iim, ports: Ports, tmp_path: Path) -> None:
    sip_client.flood("127.0.0.2", _target(edge), 200, DOMAIN)
    assert wait_until(lambda: "from 127.0.0.2 over" in edge.log_text() or "flood from 127.0.0.2" in edge.log_text(),
                      10), (edge.rpc("htable.dump", "rate")[-2000:], edge.rpc("htable.dump", "ipban"))
    # The flooder now gets silence, even for a well-formed REGISTER with valid credentials...
    challenge, _ = sip_client.Udp("127.0.0.2").register(_target(edge), SPEAKER.user, SPEAKER.password, DOMAIN,
                                                        timeout=1.0)
    assert challenge is None
    # ...while a speaker on 127.0.0.3 authenticates and its call reaches IIM and the core.
    before = len(_call_ended(iim))
    with sipp.core(tmp_path, ports.core, "core_answer.xml"):
        result = sipp.call(tmp_path, edge.sip_port, UNKNOWN_SUBSCRIBER, source="127.0.0.3",
                           scenario="caller_auth.xml", caller=CALLER.user, domain=DOMAIN,
                           auth=(CALLER.user, CALLER.password))
    assert result.finals == [200], (result.output, edge.log_text()[-3000:])
    assert len(_call_ended(iim, before + 1)) == before + 1


async def _register_over_wss(port: int, user: str, password: str) -> list[sip_client.Response]:
    """REGISTER over ``wss://127.0.0.1:port`` (subprotocol ``sip``, RFC 7118), answering the challenge."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test's self-signed certificate
    answers: list[sip_client.Response] = []
    async with aiohttp.ClientSession() as session, session.ws_connect(
            f"wss://127.0.0.1:{port}/", protocols=("sip",), ssl=context, timeout=aiohttp.ClientWSTimeout(ws_close=5),
            ) as ws:
        # The websocket's close releases its TLS connection, not the session's close: its TLS shutdown ends
        # when Kamailio answers, after asyncio.run has returned under load, and uvloop refuses to close a loop
        # with the transport still open (EBUSY). Wait for the connection itself to be lost.
        connection = ws._response.connection
        lost = connection.protocol.closed if connection is not None and connection.protocol is not None else None
        request = sip_client.register(user, DOMAIN, f"sip:{user}@df7jal23ls0d.invalid;transport=ws")
        for _ in range(2):
            await ws.send_str(request.encode("WSS", "df7jal23ls0d.invalid").decode())
            message = await asyncio.wait_for(ws.receive(), 5)
            assert message.type == aiohttp.WSMsgType.TEXT, message
            answers.append(sip_client.parse_response(message.data.encode()))
            if answers[-1].code != 401:
                break
            request = sip_client.authorize(request, answers[-1], user, password)
    if lost is not None:
        with contextlib.suppress(aiohttp.ClientConnectionError):  # lost uncleanly is lost all the same
            await asyncio.wait_for(lost, 10)
    return answers


def test_a_webrtc_speaker_registers_over_wss(edge: KamailioEdge) -> None:
    answers = asyncio.run(_register_over_wss(edge.wss_port, SPEAKER.user, SPEAKER.password))
    assert [a.code for a in answers] == [401, 200], (answers, edge.log_text()[-3000:])
    assert "transport=ws" in (answers[-1].header("Contact") or "")


def test_an_invite_burst_bans_its_source(edge: KamailioEdge) -> None:
    target = _target(edge)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.6", 0))
        port = sock.getsockname()[1]
        for _ in range(60):  # INVITE_LIMIT is 40 here; each would be challenged
            request = sip_client.invite(f"sip:{UNKNOWN_SUBSCRIBER}@127.0.0.1:{edge.sip_port}",
                                        f"sip:{CALLER.user}@{DOMAIN}", f"sip:{CALLER.user}@127.0.0.6:{port}")
            sock.sendto(request.encode("UDP", f"127.0.0.6:{port}"), target)
    assert wait_until(lambda: "INVITE rate from 127.0.0.6" in edge.log_text(), 10)
    probe = sip_client.options(f"sip:127.0.0.1:{edge.sip_port}")
    assert sip_client.Udp("127.0.0.6").request(probe, target, 1.0) is None


def test_repeated_authentication_failures_ban_their_source(edge: KamailioEdge) -> None:
    udp = sip_client.Udp("127.0.0.9")
    for _ in range(11):  # AUTH_FAIL_LIMIT is 10
        udp.register(_target(edge), SPEAKER.user, "guess", DOMAIN, timeout=1.0)
    challenge, _ = udp.register(_target(edge), SPEAKER.user, SPEAKER.password, DOMAIN, timeout=1.0)
    assert challenge is None
    assert "authentication failures from 127.0.0.9" in edge.log_text()


def test_sipp_registers_a_speaker_and_is_refused_with_a_wrong_password(edge: KamailioEdge, tmp_path: Path) -> None:
    good = sipp.call(tmp_path, edge.sip_port, SPEAKER.user, source="127.0.0.10", scenario="register_auth.xml",
                     domain=DOMAIN, auth=(SPEAKER.user, SPEAKER.password), timeout_s=10)
    wrong = sipp.call(tmp_path, edge.sip_port, SPEAKER.user, source="127.0.0.10", scenario="register_auth.xml",
                      domain=DOMAIN, auth=(SPEAKER.user, "wrong"), timeout_s=10)
    assert (good.finals, wrong.finals) == ([200], [403]), (good.output, wrong.output)


def test_freeswitch_reaches_a_registered_speaker_through_the_edge(
        edge: KamailioEdge, real_switch: RealSwitch, tmp_path: Path) -> None:
    speaker_port = free_port()
    # (registered from 127.0.0.4: 127.0.0.1 is the test's trunk, which may not register)
    _, final = sip_client.Udp("127.0.0.4").register(_target(edge), SPEAKER.user, SPEAKER.password, DOMAIN,
                                                    contact=f"sip:{SPEAKER.user}@127.0.0.1:{speaker_port}")
    assert _code(final) == 200, final
    with sipp.core(tmp_path, speaker_port, "core_answer.xml"):  # the speaker answers
        answered = real_switch.api(
            f"originate sofia/external/{SPEAKER.user}@127.0.0.1:{edge.sip_port} &park", timeout=15)
        assert answered.startswith("+OK"), (answered, edge.log_text()[-2000:])
        real_switch.api(f"uuid_kill {answered.split()[1]}")
    unknown = real_switch.api(f"originate sofia/external/nobody@127.0.0.1:{edge.sip_port} &park", timeout=15)
    assert unknown.startswith("-ERR UNALLOCATED_NUMBER"), unknown  # the edge's 404


def test_the_shipped_configuration_runs_without_errors(edge: KamailioEdge) -> None:
    problems = [line for line in edge.log_text().splitlines()
                if any(level in line for level in (" ERROR: ", " CRITICAL: ", " ALERT: ", " BUG: "))]
    assert problems == []
