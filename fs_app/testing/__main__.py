"""``fs-emulator``: run the FreeSWITCH emulator from the command line.

    fs-emulator inbound --port 8021                 # serve inbound ESL clients until Ctrl-C
    fs-emulator call --port 8084 --dest 79001234567  # place one outbound-socket call, print the result
    fs-emulator load --port 8084 --rate 2000 --count 20000
    fs-emulator app --port 8084                      # the trivial outbound app (a load target)
    fs-emulator bench --rate 2000 --count 20000      # trivial app in a child process + load here
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from fs_app.testing.emulator import FreeSwitchEmulator
from fs_app.testing.load import DEFAULT_TARGET, run_load
from fs_app.testing.spec import CallSpec, TargetBehaviour
from fs_app.testing.trivial_app import serve


def _run(coro: Coroutine[Any, Any, int], use_uvloop: bool) -> int:
    if use_uvloop:
        try:
            import uvloop

            return uvloop.run(coro)
        except ImportError:
            pass
    return asyncio.run(coro)


def _print(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


async def _inbound(args: argparse.Namespace) -> int:
    emu = FreeSwitchEmulator(time_scale=args.time_scale)
    server = await emu.start_inbound(args.host, args.port, args.password)
    _print({"listening": f"{args.host}:{server.port}"})
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()
    await emu.close()
    return 0


def _spec(args: argparse.Namespace) -> CallSpec:
    return CallSpec(destination=args.dest, caller_id_number=args.cid, socket_args=args.socket_args)


async def _call(args: argparse.Namespace) -> int:
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.answer(args.answer_ms, args.callee_hangup_ms),
                             time_scale=args.time_scale)
    result = await emu.place_call(args.host, args.port, _spec(args))
    _print({
        "uuid": result.uuid, "disconnect": result.disconnect, "hangup_cause": result.hangup_cause,
        "bridged_to": result.bridged_to, "originate_disposition": result.originate_disposition,
        "error": result.error, "sent": result.sent,
    })
    return 0 if result.error is None else 1


async def _load(args: argparse.Namespace) -> int:
    emu = FreeSwitchEmulator(default_target=TargetBehaviour.answer(args.answer_ms, args.callee_hangup_ms))
    report = await run_load(args.host, args.port, args.rate, args.count, args.concurrency, spec=_spec(args),
                            emulator=emu, batch_writes=not args.split_writes)
    _print(report.summary())
    return 0 if report.failed == 0 else 1


async def _app(args: argparse.Namespace) -> int:
    server = await serve(args.host, args.port, args.dest_endpoint)
    _print({"app_listening": f"{args.host}:{server.sockets[0].getsockname()[1]}"})
    with contextlib.suppress(asyncio.CancelledError):
        await server.serve_forever()
    return 0


def _bench(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "fs_app.testing", "app", "--host", args.host, "--port", str(args.port)]
    if args.uvloop:
        cmd.append("--uvloop")
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE)  # noqa: S603 - our own module
    try:
        assert child.stdout is not None
        child.stdout.readline()
        time.sleep(0.2)
        return _run(_load(args), args.uvloop)
    finally:
        child.terminate()
        child.wait(timeout=10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fs-emulator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop if installed")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, port: int) -> None:
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=port)
        p.add_argument("--uvloop", action="store_true", default=argparse.SUPPRESS)

    def call_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dest", default="79001234567", help="destination number of the caller's INVITE")
        p.add_argument("--cid", default="79007654321", help="caller id number")
        p.add_argument("--socket-args", default="async full")
        p.add_argument("--answer-ms", type=float, default=0.0, help="callee answers after this long")
        p.add_argument("--callee-hangup-ms", type=float, default=0.0, help="callee hangs up this long after answer")

    p_in = sub.add_parser("inbound", help="serve inbound ESL clients")
    common(p_in, 8021)
    p_in.add_argument("--password", default="ClueCon")
    p_in.add_argument("--time-scale", type=float, default=1.0)
    p_call = sub.add_parser("call", help="place one outbound-socket call")
    common(p_call, 8084)
    call_opts(p_call)
    p_call.add_argument("--time-scale", type=float, default=1.0)
    for name in ("load", "bench"):
        p = sub.add_parser(name, help="open-loop load" if name == "load" else "trivial app + load")
        common(p, 8084 if name == "load" else 18084)
        call_opts(p)
        p.add_argument("--rate", type=float, default=1000.0)
        p.add_argument("--count", type=int, default=10_000)
        p.add_argument("--concurrency", type=int, default=10_000)
        p.add_argument("--split-writes", action="store_true",
                       help="two send()s per event like FreeSWITCH (default: one send per loop turn)")
    p_app = sub.add_parser("app", help="run the trivial outbound app")
    common(p_app, 8084)
    p_app.add_argument("--dest-endpoint", default=DEFAULT_TARGET)

    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    runner = {"inbound": _inbound, "call": _call, "load": _load, "app": _app}[args.command]
    try:
        return _run(runner(args), args.uvloop)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
