"""A real Kamailio 5.6 running the project's ``kamailio/kamailio.cfg`` for the real-switch tier.

Where it comes from: Debian's ``kamailio`` packages (``kamailio``, ``-websocket-modules``, ``-tls-modules``,
``-postgres-modules``), installed by ``.ci/run`` next to FreeSWITCH. Without them the Kamailio tests skip, or
fail under ``IIM_REQUIRE_REAL_SWITCH=1`` (the same rule as the FreeSWITCH tier).

How the configuration gets here: the shipped file is used as is; every address, port and path comes in as
``-A`` defines (the way an operator overrides them), the dispatcher list names the test's FreeSWITCH nodes and
a self-signed certificate is made for the WSS listener. PostgreSQL is reached over TCP (Kamailio's db_postgres
takes ``postgres://user:pass@host:port/db``); the embedded test server listens on a Unix socket only, so a
loopback TCP bridge runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from benchmarks._realfs import ROOT
from tests import sip_client
from tests.real_switch import free_port, skip_or_fail
from tests.tcp_proxy import TcpFaultProxy

CONFIG = ROOT / "kamailio" / "kamailio.cfg"
START_TIMEOUT_S = 20.0
DOMAIN = "iim.test"


MODULES = ("websocket.so", "tls.so", "db_postgres.so")


def require_kamailio() -> str:
    binary = shutil.which("kamailio") or ("/usr/sbin/kamailio" if Path("/usr/sbin/kamailio").is_file() else None)
    found = {module.name for module in Path("/usr/lib").glob("*/kamailio/modules/*.so")}
    if binary is None or not set(MODULES) <= found:
        skip_or_fail("no kamailio with its websocket, tls and postgres modules (apt-get install kamailio "
                     "kamailio-websocket-modules kamailio-tls-modules kamailio-postgres-modules)")
    assert binary is not None
    return binary


def registrar_url(db_url: str) -> str:
    """usrloc's URL (``UL_DB_URL``): the auth role's, as the registrations' writer ``iim_registrar`` (the tier gives
    both login roles the run's one password)."""
    scheme, rest = db_url.split("://", 1)
    userinfo, _, where = rest.rpartition("@")
    _, colon, password = userinfo.partition(":")
    return f"{scheme}://iim_registrar{colon}{password}@{where}"


def ha1(user: str, domain: str, password: str) -> str:
    return hashlib.md5(f"{user}:{domain}:{password}".encode()).hexdigest()


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "wss.crt", directory / "wss.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


@contextlib.contextmanager
def tcp_bridge_to(dsn: str) -> Iterator[TcpFaultProxy]:
    """A loopback TCP port in front of ``dsn``'s server (a Unix socket for the embedded one), in a thread."""
    loop = asyncio.new_event_loop()
    proxy = TcpFaultProxy(dsn)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(proxy.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="pg-tcp-bridge", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the PostgreSQL TCP bridge did not start")
    try:
        yield proxy
    finally:
        asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@dataclass
class KamailioEdge:
    """One Kamailio process with the shipped configuration under ``base``."""

    binary: str
    base: Path
    sip_port: int = 0
    wss_port: int = 0
    defines: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self.base / "kamailio.log"

    @property
    def ctl(self) -> str:
        return f"unix:{self.base / 'ctl.sock'}"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def render(self, fs_nodes: Sequence[int], db_url: str, overrides: Mapping[str, str]) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        ds_list = self.base / "dispatcher.list"
        ds_list.write_text("".join(f"1 sip:127.0.0.1:{port} 0 0\n" for port in fs_nodes))
        cert, key = self_signed(self.base)
        self.sip_port, self.wss_port = free_port(), free_port()
        self.defines = {
            "SIP_IP": "127.0.0.1", "SIP_PORT": str(self.sip_port), "WSS_PORT": str(self.wss_port),
            "SIP_DOMAIN": f'"{DOMAIN}"', "DB_URL": f'"{db_url}"', "UL_DB_URL": f'"{registrar_url(db_url)}"',
            "DS_LIST": f'"{ds_list}"',
            "TRUNK_NET": '"127.0.0.1/32"', "TLS_CERT": f'"{cert}"', "TLS_KEY": f'"{key}"',
            "CTL_SOCKET": f'"{self.ctl}"', "DS_PING_INTERVAL": "1", "FS_FR_TIMER": "1500", "CHILDREN": "2",
            **overrides,
        }

    def start(self) -> None:
        argv = [self.binary, "-f", str(CONFIG), "-DD", "-E", "-m", "64", "-M", "8", "-Y", str(self.base),
                "-P", str(self.base / "kamailio.pid"), "-w", str(self.base)]
        for name, value in self.defines.items():
            argv += ["-A", f"{name}={value}"]
        with self.log_file.open("ab") as out:
            self.process = subprocess.Popen(argv, cwd=self.base, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kamailio exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            if self.options_ok():
                return
            time.sleep(0.2)
        raise RuntimeError(f"kamailio did not answer OPTIONS in {START_TIMEOUT_S} s:\n{self.log_text()[-4000:]}")

    def options_ok(self) -> bool:
        with contextlib.suppress(OSError, TimeoutError):
            reply = sip_client.Udp("127.0.0.1").request(
                sip_client.options(f"sip:127.0.0.1:{self.sip_port}"), ("127.0.0.1", self.sip_port), 0.5)
            return reply is not None and reply.code == 200
        return False

    def rpc(self, *command: str) -> str:
        """A command over the ctl socket (``kamcmd``), e.g. ``rpc("dispatcher.list")``."""
        kamcmd = shutil.which("kamcmd") or "/usr/sbin/kamcmd"
        done = subprocess.run([kamcmd, "-s", self.ctl.replace("unix:", "unixs:", 1), *command], capture_output=True, text=True, timeout=10,
                              check=False)
        return done.stdout + done.stderr

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


@contextlib.contextmanager
def running_edge(base: Path, fs_nodes: Sequence[int], db_url: str, **overrides: str) -> Iterator[KamailioEdge]:
    edge = KamailioEdge(binary=require_kamailio(), base=base)
    edge.render(fs_nodes, db_url, overrides)
    try:
        edge.start()
        yield edge
    finally:
        edge.stop()


def wait_until(predicate: object, timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` seconds pass (every wait in the tier has a deadline)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


