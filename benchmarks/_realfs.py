"""A real FreeSWITCH 1.10.12 running this repository's ``freeswitch-conf/`` and ``dialplan/`` on free ports.

Shared by the real-switch test tier (``tests/real_switch.py`` adds pytest's skip rules) and the real-switch
benchmarks. The configuration is copied the way ``Dockerfile.fs`` copies it into ``/etc/freeswitch``, into a
base directory of its own, and every address and port comes through the environment variables the image's
entrypoint takes (``IIM_FS_*``), so what runs is exactly what an operator deploys, on free loopback ports.
The bundle comes from ``../shared/freeswitch/install`` (``$IIM_TEST_FREESWITCH`` or ``/usr/local/freeswitch``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HOME = Path("/usr/local/freeswitch")
START_TIMEOUT_S = 30.0
PASSWORD = "RealSwitchTest-" + "0123456789abcdef"
# The flags Dockerfile.fs's CMD runs FreeSWITCH with. ``-np`` above all: without it FreeSWITCH makes itself
# realtime (SCHED_FIFO), and on a loaded box its session threads, each waking every millisecond until its
# outbound socket answers ``connect``, starve IIM of the CPU it needs to answer: a run melts down.
IMAGE_FLAGS = ("-nonat", "-nf", "-nc", "-np")


def freeswitch_home() -> Path | None:
    """The installed bundle, or None when this machine has no FreeSWITCH."""
    home = Path(os.environ.get("IIM_TEST_FREESWITCH", DEFAULT_HOME))
    return home if (home / "bin" / "freeswitch").is_file() else None


def free_media_port() -> int:
    """An even loopback port with the three above it free for UDP too: SIPp's ``-mp`` binds four (audio RTP and
    RTCP, video RTP and RTCP), and one of them taken kills the run ("Unable to bind video RTP socket")."""
    while True:
        port = free_port() & ~1
        socks: list[socket.socket] = []
        try:
            for offset in range(4):
                udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(udp)
                udp.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        finally:
            for udp in socks:
                udp.close()
        return port


def free_port() -> int:
    """A loopback port free for both TCP and UDP (SIP listens on both)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port


@dataclass
class RealSwitch:
    """One FreeSWITCH process with the project's configuration under ``base``."""

    home: Path
    base: Path
    env: dict[str, str] = field(default_factory=dict)
    esl_port: int = 0
    internal_sip_port: int = 0
    external_sip_port: int = 0
    wss_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def password(self) -> str:
        return self.env["IIM_FS_PASSWORD"]

    @property
    def log_file(self) -> Path:
        return self.base / "log" / "freeswitch.log"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self, *levels: str) -> list[str]:
        """Log lines at the given levels (``"ERR"``, ``"CRIT"``...)."""
        pattern = re.compile(r"\[(" + "|".join(map(re.escape, levels)) + r")\]")
        return [line for line in self.log_text().splitlines() if pattern.search(line)]

    def render(self, overrides: Mapping[str, str]) -> None:
        """Lay out the base directory as ``Dockerfile.fs`` lays out ``/etc/freeswitch``."""
        conf = self.base / "conf"
        for name in ("log", "run", "db", "temp", "certs", "recordings", "storage", "cache", "sounds"):
            (self.base / name).mkdir(parents=True, exist_ok=True)
        shutil.copytree(ROOT / "freeswitch-conf", conf, dirs_exist_ok=True)
        shutil.copytree(ROOT / "dialplan", conf / "dialplan", dirs_exist_ok=True)
        bundled_cert = self.home / "certs" / "wss.pem"
        if bundled_cert.is_file():
            shutil.copy(bundled_cert, self.base / "certs" / "wss.pem")
        self.esl_port, self.internal_sip_port = free_port(), free_port()
        self.external_sip_port, self.wss_port = free_port(), free_port()
        self.env = {
            "IIM_FS_PASSWORD": PASSWORD,
            "IIM_FS_BIND_IP": "127.0.0.1",
            "IIM_FS_EXT_IP": "127.0.0.1",
            "IIM_FS_DOMAIN": "127.0.0.1",
            "IIM_FS_ESL_PORT": str(self.esl_port),
            "IIM_FS_INTERNAL_SIP_PORT": str(self.internal_sip_port),
            "IIM_FS_EXTERNAL_SIP_PORT": str(self.external_sip_port),
            "IIM_FS_INTERNAL_WSS_PORT": str(self.wss_port),
            "IIM_FS_IMS_CORE_CIDRS": "127.0.0.1/32",
            "IIM_FS_SPEAKER_CIDRS": "127.0.0.0/8",
            **overrides,
        }

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IIM_FS_")}
        env.update(self.env)
        env["LD_LIBRARY_PATH"] = str(self.home / "lib")
        b = self.base
        argv = [str(self.home / "bin" / "freeswitch"), *IMAGE_FLAGS, "-base", str(self.home),
                "-conf", str(b / "conf"), "-log", str(b / "log"), "-run", str(b / "run"), "-db", str(b / "db"),
                "-temp", str(b / "temp"), "-certs", str(b / "certs"), "-recordings", str(b / "recordings"),
                "-storage", str(b / "storage"), "-cache", str(b / "cache"), "-sounds", str(b / "sounds")]
        with (b / "stdout.log").open("wb") as out:
            self.process = subprocess.Popen(argv, env=env, cwd=b, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"FreeSWITCH exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            if "FreeSWITCH Started" in self.log_text() or "FreeSWITCH Version" in self.log_text():
                with contextlib.suppress(OSError):
                    if self.api("status").find("is ready") >= 0:
                        return
            time.sleep(0.2)
        raise RuntimeError(f"FreeSWITCH did not become ready in {START_TIMEOUT_S} s:\n{self.log_text()[-4000:]}")

    def api(self, command: str, timeout: float = 5.0) -> str:
        """One ``api`` command over a fresh inbound Event Socket connection (a blocking test helper)."""
        with socket.create_connection(("127.0.0.1", self.esl_port), timeout=timeout) as sock:
            reader = sock.makefile("rb")

            def frame() -> tuple[dict[str, str], bytes]:
                headers: dict[str, str] = {}
                while (line := reader.readline()) not in (b"\n", b""):
                    name, _, value = line.decode().rstrip("\n").partition(": ")
                    headers[name] = value
                body = reader.read(int(headers["Content-Length"])) if "Content-Length" in headers else b""
                return headers, body

            frame()  # auth/request
            sock.sendall(f"auth {self.password}\n\n".encode())
            reply, _ = frame()
            if not reply.get("Reply-Text", "").startswith("+OK"):
                raise OSError(f"ESL auth refused: {reply}")
            sock.sendall(f"api {command}\n\n".encode())
            _, body = frame()
            return body.decode(errors="replace")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(OSError):
            self.api("fsctl shutdown", timeout=2.0)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=5)
