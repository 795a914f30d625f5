"""An SMSC simulator on ``smpp34`` (tests, benchmarks, local trials; not on the production path).

Run it as its own process, so it can be killed and restarted like a real SMSC::

    python -m iim.sms.smsc_sim --port 2775 --control-port 2776 --log /tmp/smsc.jsonl

* SMPP: accepts any ``bind_transceiver``; answers ``submit_sm`` with ``accept(id)`` or, when a rule says so,
  ``reject(status)`` (ESME_RTHROTTLED, ESME_RMSGQFUL, ESME_RINVDSTADR, ...). Optionally sends a delivery
  receipt (``deliver_sm``, esm_class 0x04, ``id:... stat:...`` text) after each accepted part.
* Every accepted part is appended to the JSON-lines log (one ``write`` per line, before the ``accept``),
  so the log survives ``SIGKILL`` and a restarted simulator reloads it.
* Client reference: a part carrying our reference TLV (:data:`iim.sms.smpp.CLIENT_REF_TAG`) whose
  (reference, part) was already accepted is answered with the first message id and logged as ``dup``,
  not delivered again - what an SMSC honouring client references does. Counting the submits per reference
  shows the resubmissions anyway.
* Control (HTTP on ``--control-port``): ``POST /rules``, ``POST /receipts``, ``POST /deliver``, ``GET /stats``.

:class:`SmscProcess` starts, kills and restarts it from tests and benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import smpp34
from aiohttp import web

from iim.core.lifecycle import AsyncResource
from iim.sms.smpp import CLIENT_REF_TAG

__all__ = ["SmscProcess", "SubmitRecord", "free_port", "read_log"]


@dataclass
class Rule:
    """Reject submits (to ``destination``, or all when None) with ``status``, ``times`` times (-1: always)."""

    status: int
    destination: str | None = None
    times: int = -1


@dataclass
class SimState:
    log_path: Path
    boot: str = field(default_factory=lambda: f"{int(time.time() * 1000) % 10**9:x}")
    counter: int = 0
    accepted: dict[tuple[str, int], str] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    receipts: dict[str, str] = field(default_factory=dict)  # destination (or "*") -> stat
    receipt_date_format: str = "%y%m%d%H%M"
    sessions: dict[str, smpp34.Esme] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"submits": 0, "accepted": 0, "rejected": 0,
                                                            "dup": 0, "binds": 0, "receipts_sent": 0})
    fd: int = -1
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


def _concat(short_message: bytes, esm_class: int) -> tuple[int, int]:
    """(part number, total) from a concatenation UDH, or (1, 1)."""
    if esm_class & 0x40 and len(short_message) >= 6 and short_message[1] == 0x00 and short_message[2] == 3:
        return short_message[5], short_message[4]
    return 1, 1


def _load(state: SimState) -> None:
    for record in read_log(state.log_path):
        if not record.get("dup"):
            state.accepted.setdefault((record["ref"], record["seq"]), record["id"])


def _write(state: SimState, record: dict[str, Any]) -> None:
    os.write(state.fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())


async def _send_receipt(state: SimState, esme: smpp34.Esme, ev_dest: str, ev_src: str, message_id: str,
                        stat: str, text: bytes) -> None:
    now = time.strftime(state.receipt_date_format)
    err = 0 if stat == "DELIVRD" else 1
    if text[:1] == b"\x05" and text[1:3] == b"\x00\x03":  # quote the text, not the UDH
        text = text[6:]
    text = bytes(b for b in text if 0x20 <= b < 0x7F)
    body = (f"id:{message_id} sub:001 dlvrd:{1 if stat == 'DELIVRD' else 0:03d} submit date:{now} "
            f"done date:{now} stat:{stat} err:{err:03d} text:").encode() + text[:20]
    with contextlib.suppress(smpp34.SmppError, RuntimeError):
        await esme.deliver_sm(ev_src, body, source_addr=ev_dest, esm_class=0x04,
                              tlvs=[smpp34.Tlv(0x001E, message_id.encode() + b"\x00")])
        state.stats["receipts_sent"] += 1


def _on_submit(state: SimState, ev: smpp34.SubmitSmEvent) -> None:
    state.stats["submits"] += 1
    for rule in state.rules:
        if rule.times != 0 and (rule.destination is None or rule.destination == ev.destination_addr):
            if rule.times > 0:
                rule.times -= 1
            state.stats["rejected"] += 1
            ev.reject(rule.status)
            return
    ref = ""
    for tlv in ev.tlvs:
        if tlv.tag == CLIENT_REF_TAG:
            ref = tlv.value.decode("ascii", "replace").rstrip("\x00")
    seq, total = _concat(ev.short_message, ev.esm_class)
    record: dict[str, Any] = {"ref": ref, "seq": seq, "total": total, "dest": ev.destination_addr,
                              "src": ev.source_addr, "esm": ev.esm_class, "dc": ev.data_coding,
                              "rd": ev.registered_delivery, "sm": ev.short_message.hex(), "t": time.time()}
    known = state.accepted.get((ref, seq)) if ref else None
    if known is not None:
        record.update(id=known, dup=True)
        state.stats["dup"] += 1
        _write(state, record)
        ev.accept(known)
        return
    state.counter += 1
    message_id = f"{state.boot}-{state.counter}"
    record["id"] = message_id
    _write(state, record)  # durable (page cache) before the SMSC says yes: survives SIGKILL
    if ref:
        state.accepted[(ref, seq)] = message_id
    state.stats["accepted"] += 1
    ev.accept(message_id)
    stat = state.receipts.get(ev.destination_addr, state.receipts.get("*"))
    esme = state.sessions.get(ev.session_id)
    if stat and esme is not None and ev.registered_delivery & 0x03:
        task = asyncio.create_task(_send_receipt(state, esme, ev.destination_addr, ev.source_addr, message_id,
                                                 stat, ev.short_message))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)


async def _smpp_loop(state: SimState, server: smpp34.Server) -> None:
    while True:
        ev = await server.next()
        if isinstance(ev, smpp34.SubmitSmEvent):
            _on_submit(state, ev)
        elif isinstance(ev, smpp34.Esme):
            state.sessions[ev.session_id] = ev
            state.stats["binds"] += 1
        elif isinstance(ev, smpp34.Unbound):
            state.sessions.pop(ev.session_id, None)


def _control_app(state: SimState) -> web.Application:
    async def rules(request: web.Request) -> web.Response:
        body = await request.json()
        state.rules = [Rule(status=int(r["status"]), destination=r.get("destination"), times=int(r.get("times", -1)))
                       for r in body.get("rules", [])]
        return web.json_response({"rules": len(state.rules)})

    async def receipts(request: web.Request) -> web.Response:
        body = await request.json()
        state.receipts = dict(body.get("receipts", {}))
        state.receipt_date_format = body.get("date_format", "%y%m%d%H%M")
        return web.json_response({"receipts": len(state.receipts)})

    async def deliver(request: web.Request) -> web.Response:
        body = await request.json()
        esmes = [e for e in state.sessions.values() if e.can_receive]
        if not esmes:
            return web.json_response({"error": "no bound receiver"}, status=409)
        if "hex" in body:
            short_message = bytes.fromhex(body["hex"])
        else:
            short_message = str(body.get("text", "")).encode("utf-16-be" if body.get("data_coding") == 8 else "ascii")
        tlvs = [smpp34.Tlv(int(tag), bytes.fromhex(value)) for tag, value in body.get("tlvs", [])]
        resp = await esmes[0].deliver_sm(
            body["destination"], short_message, source_addr=body.get("source", ""),
            esm_class=int(body.get("esm_class", 0)), data_coding=int(body.get("data_coding", 0)),
            source_addr_ton=int(body.get("source_ton", 1)), dest_addr_ton=int(body.get("dest_ton", 1)), tlvs=tlvs)
        return web.json_response({"command_status": resp.command_status})

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response({**state.stats, "sessions": len(state.sessions), "unique": len(state.accepted)})

    app = web.Application()
    app.router.add_post("/rules", rules)
    app.router.add_post("/receipts", receipts)
    app.router.add_post("/deliver", deliver)
    app.router.add_get("/stats", stats)
    return app


async def serve(port: int, control_port: int, log_path: Path, system_id: str = "SMSC") -> None:
    state = SimState(log_path=log_path)
    _load(state)
    state.fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    server = smpp34.Server("127.0.0.1", port, system_id=system_id, inbound_capacity=4096)
    await server.start()
    runner = web.AppRunner(_control_app(state), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", control_port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(json.dumps({"ready": True, "port": port, "control_port": control_port}) + "\n")
    sys.stdout.flush()
    smpp_task = asyncio.create_task(_smpp_loop(state, server))
    await stop.wait()
    smpp_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await smpp_task
    await server.stop()
    await runner.cleanup()
    os.close(state.fd)


@dataclass(frozen=True, slots=True)
class SubmitRecord:
    ref: str
    seq: int
    total: int
    id: str
    dest: str
    src: str
    esm: int
    dc: int
    sm: bytes
    dup: bool


def read_log(path: Path) -> list[dict[str, Any]]:
    """The simulator's log (accepted parts), tolerating a torn last line after a kill."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SmscProcess(AsyncResource):
    """The simulator in a child process: start, kill -9, restart on the same ports, control, read the log."""

    def __init__(self, log_path: Path, *, port: int | None = None, control_port: int | None = None) -> None:
        self.log_path = log_path
        self.port = port or free_port()
        self.control_port = control_port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
            [sys.executable, "-m", "iim.sms.smsc_sim", "--port", str(self.port), "--control-port",
             str(self.control_port), "--log", str(self.log_path)], stdout=subprocess.PIPE)
        return self.proc

    @staticmethod
    def _check_ready(line: bytes) -> None:
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError(f"SMSC simulator did not start: {line!r}")

    def start_sync(self) -> None:
        proc = self._spawn()
        assert proc.stdout is not None
        self._check_ready(proc.stdout.readline())

    async def start(self) -> None:
        proc = self._spawn()
        assert proc.stdout is not None
        self._check_ready(await asyncio.to_thread(proc.stdout.readline))

    def kill_sync(self) -> None:
        """SIGKILL: no unbind, no flush, connections reset - a crash."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

    async def kill(self) -> None:
        await asyncio.to_thread(self.kill_sync)

    def stop_sync(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.stop_sync)

    async def restart(self) -> None:
        await self.kill()
        await self.start()

    async def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http, http.request(
                method, f"http://127.0.0.1:{self.control_port}{path}", json=payload) as resp:
            data: dict[str, Any] = await resp.json()
            if resp.status >= 400:
                raise RuntimeError(f"SMSC control {path}: {resp.status} {data}")
            return data

    async def set_rules(self, *rules: dict[str, Any]) -> None:
        await self._call("POST", "/rules", {"rules": list(rules)})

    async def set_receipts(self, receipts: dict[str, str], *, date_format: str = "%y%m%d%H%M") -> None:
        await self._call("POST", "/receipts", {"receipts": receipts, "date_format": date_format})

    async def deliver(self, **fields: Any) -> int:
        status: int = (await self._call("POST", "/deliver", fields))["command_status"]
        return status

    async def stats(self) -> dict[str, Any]:
        return await self._call("GET", "/stats")

    def records(self) -> list[SubmitRecord]:
        return [SubmitRecord(ref=r["ref"], seq=r["seq"], total=r["total"], id=r["id"], dest=r["dest"], src=r["src"],
                             esm=r["esm"], dc=r["dc"], sm=bytes.fromhex(r["sm"]), dup=bool(r.get("dup")))
                for r in read_log(self.log_path)]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SmscProcess]:
        await self.start()
        try:
            yield self
        finally:
            await self.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=2775)
    parser.add_argument("--control-port", type=int, default=2776)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--system-id", default="SMSC")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(args.port, args.control_port, args.log, args.system_id))
    else:
        uvloop.run(serve(args.port, args.control_port, args.log, args.system_id))


if __name__ == "__main__":
    main()
