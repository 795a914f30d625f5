"""A real Mosquitto for the MQTT tests: started by the test on a free loopback port, TLS only, mutual TLS
required, each client known by its certificate's CN (``use_identity_as_username``) and confined by an ACL.

The broker is Debian's ``mosquitto`` (``/usr/sbin/mosquitto``, or ``IIM_TEST_MOSQUITTO``). Without it the tests
skip and say so, unless ``IIM_REQUIRE_REAL_SWITCH=1`` (the CI tier flag, set by ``.ci/run``, which installs
the package), which turns the skip into a failure, as for the real-switch tier.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.pki import Issued, PemFiles, make_ca, make_named_client_cert, make_server_cert, write_pem
from tests.real_switch import free_port, skip_or_fail

__all__ = ["ACL", "Broker", "BrokerPki", "make_broker_pki", "require_mosquitto", "running_mosquitto"]

#: The ACL the README documents: IIM reads every hub's events and answers to commands and writes their acks and
#: commands; a hub (CN ``{tenant}/{hub}``) writes only its own events and answers, reads only its own acks and
#: commands.
ACL = """\
user iim
topic read iim/+/+/events
topic read iim/+/+/cmd-ack
topic write iim/+/+/ack
topic write iim/+/+/cmd

pattern write iim/%u/events
pattern write iim/%u/cmd-ack
pattern read iim/%u/ack
pattern read iim/%u/cmd
"""


def require_mosquitto() -> str:
    """The broker binary, or skip (fail under ``IIM_REQUIRE_REAL_SWITCH=1``)."""
    found = os.environ.get("IIM_TEST_MOSQUITTO") or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(found).is_file():
        skip_or_fail("no mosquitto broker installed (Debian package mosquitto, or set IIM_TEST_MOSQUITTO)")
    return found


@dataclass(frozen=True)
class BrokerPki:
    """One CA for the broker's clients (IIM and the hubs) and its server certificate."""

    ca: Issued
    ca_file: Path
    server: PemFiles
    iim: PemFiles
    directory: Path

    def client(self, common_name: str, *, ca: Issued | None = None) -> PemFiles:
        """A client certificate with CN ``common_name`` (from another CA when ``ca`` is given)."""
        issued = make_named_client_cert(ca or self.ca, common_name)
        return write_pem(self.directory, f"client-{common_name.replace('/', '_')}-{id(issued)}", issued)


def make_broker_pki(directory: Path) -> BrokerPki:
    ca = make_ca("Hub broker CA")
    ca_file = directory / "broker-ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    server = write_pem(directory, "broker", make_server_cert(ca))
    iim = write_pem(directory, "iim", make_named_client_cert(ca, "iim"))
    return BrokerPki(ca, ca_file, server, iim, directory)


@dataclass
class Broker:
    port: int
    pki: BrokerPki
    process: subprocess.Popen[bytes]
    log_file: Path

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


@asynccontextmanager
async def running_mosquitto(directory: Path, pki: BrokerPki | None = None, *,
                            port: int | None = None) -> AsyncIterator[Broker]:
    """A broker on a free port, stopped (SIGTERM, then SIGKILL) on exit."""
    binary = require_mosquitto()
    pki = pki or make_broker_pki(directory)
    port = port or free_port()
    acl = directory / "mosquitto.acl"
    acl.write_text(ACL)
    conf = directory / "mosquitto.conf"
    conf.write_text(f"""\
per_listener_settings false
allow_anonymous false
persistence false
user root
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
acl_file {acl}
listener {port} 127.0.0.1
cafile {pki.ca_file}
certfile {pki.server.cert}
keyfile {pki.server.key}
require_certificate true
use_identity_as_username true
tls_version tlsv1.2
""")
    log_file = directory / "mosquitto.log"
    with log_file.open("wb") as sink:
        process = subprocess.Popen([binary, "-c", str(conf)], stdout=sink, stderr=subprocess.STDOUT,  # noqa: ASYNC220
                                   start_new_session=True)
    try:
        for _ in range(100):
            if process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {log_file.read_text(errors='replace')}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
        else:
            raise RuntimeError("mosquitto did not listen within 5 s")
        yield Broker(port, pki, process, log_file)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(process.wait), 5)
            except TimeoutError:
                process.kill()
                await asyncio.to_thread(process.wait)
