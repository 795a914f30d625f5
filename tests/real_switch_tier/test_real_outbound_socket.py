"""What IIM asks of the real switch on each call's outbound socket, read off the wire (issue 15 item 5).

FreeSWITCH's CPU per call with IIM was 4-5x the reference app's: IIM's ``filter Event-Name /regex/`` made
mod_event_socket test (and pcre2-compile) the filter of every socket on every event of every channel. A recording
proxy sits between the dialplan's ``socket`` and ``iim serve`` here: a routed call must cost the switch no more
than the minimal app's (``benchmarks/_thin_outbound_app.py``): ``connect``, ``linger``, ``myevents`` and the
bridge, no server-side filter or subscription, only that channel's events, and once the channel has hung up the
socket is closed by IIM (no ``exit`` for FreeSWITCH to answer and no more events to serialise).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fs_app.esl import CommandDecoder, EslCodec, Event, Execute
from tests import sipp
from tests.pg import PgDatabase
from tests.real_switch import RealSwitch, free_port
from tests.real_switch_tier.conftest import Iim, Ports, start_iim, stop_iim

UNKNOWN_SUBSCRIBER = "79100000007"  # in the subscriber plan, no policy: IIM routes it to the core


@dataclass
class Recorded:
    """One proxied socket: the bytes each side sent, and which side closed first."""

    to_switch: bytearray = field(default_factory=bytearray)
    to_app: bytearray = field(default_factory=bytearray)
    first_close: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


class RecordingProxy:
    """The dialplan's socket target: every connection is relayed to ``upstream`` and recorded both ways."""

    def __init__(self, port: int, upstream: int) -> None:
        self.upstream = upstream
        self.sessions: list[Recorded] = []
        self._listener = socket.create_server(("127.0.0.1", port))
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                switch_side, _ = self._listener.accept()
            except OSError:
                return
            app_side = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            record = Recorded()
            self.sessions.append(record)
            pumps = [threading.Thread(target=self._pump, args=(switch_side, app_side, record.to_app, "switch", record)),
                     threading.Thread(target=self._pump, args=(app_side, switch_side, record.to_switch, "app", record))]
            for pump in pumps:
                pump.start()
            threading.Thread(target=lambda p=pumps, r=record: ([t.join() for t in p], r.done.set()),
                             daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, into: bytearray, side: str, record: Recorded) -> None:
        source.settimeout(30)
        try:
            while data := source.recv(65536):
                into += data
                sink.sendall(data)
        except OSError:
            pass
        if record.first_close is None:
            record.first_close = side
        for sock, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass

    def close(self) -> None:
        self._listener.close()


@pytest.fixture(scope="module")
def proxied(real_switch: RealSwitch, pg_db: PgDatabase, ports: Ports,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Iim, RecordingProxy]]:
    """``iim serve`` on a port of its own, behind the recording proxy the dialplan's socket points at."""
    iim_port = free_port()
    served = start_iim(real_switch, pg_db, iim_port, tmp_path_factory.mktemp("iim"))
    proxy = RecordingProxy(ports.iim_primary, iim_port)
    yield served, proxy
    proxy.close()
    stop_iim(served)


def test_a_routed_call_asks_the_switch_for_nothing_but_its_own_events_and_closes_once_hung_up(
        real_switch: RealSwitch, proxied: tuple[Iim, RecordingProxy], ports: Ports, tmp_path: Path) -> None:
    _, proxy = proxied
    with sipp.core(tmp_path, ports.core, "core_answer.xml"):
        result = sipp.call(tmp_path, real_switch.external_sip_port, UNKNOWN_SUBSCRIBER)
    assert result.finals == [200], result.output
    assert len(proxy.sessions) == 1
    session = proxy.sessions[0]
    assert session.done.wait(10), "the socket was never closed"

    commands = CommandDecoder().feed(bytes(session.to_switch))
    verbs = [f"execute:{c.app}" if isinstance(c, Execute) else type(c).__name__ for c in commands]
    # The minimal app's set: no `filter`, no `event` subscription, no `exit` (before: `filter Event-Name /.../`
    # after `myevents`, and `exit` after the hangup).
    assert verbs == ["Connect", "Linger", "MyEvents", "execute:bridge"], verbs
    assert session.first_close == "app", "IIM closes the socket of a hung-up channel itself"

    messages = EslCodec().feed(bytes(session.to_app))
    events = [m for m in messages if isinstance(m, Event)]
    channel = {e.get("Unique-ID") for e in events}
    assert len(channel) == 1, f"events of other channels reached the socket: {channel}"
    assert "CHANNEL_HANGUP" in [e.name for e in events]
