"""``iim`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from iim import logs
from iim.core.errors import ConfigError
from iim.settings import Settings

log = logging.getLogger("iim.service")


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (it is a dependency on Linux), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, object] = {}
    for name in ("esl_host", "esl_port", "http_host", "http_port", "log_level"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    settings = Settings().model_copy(update=overrides)
    logs.configure(settings.log_level)
    try:
        for node in settings.fs_nodes:  # refused before anything starts
            node.password()
        _run_loop(serve(settings))
    except ConfigError as exc:
        sys.stderr.write(f"iim: configuration refused: {exc}\n")
        return 2
    return 0


async def serve(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM; leaving the ``async with`` drains calls and flushes queues."""
    from iim.service import Service

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with Service(settings):
        await stop.wait()
        log.info("stopping: draining calls")


def cmd_explain_call(args: argparse.Namespace) -> int:
    settings = Settings()
    logs.configure("WARNING")
    return asyncio.run(_explain_call(args, settings))


async def _explain_call(args: argparse.Namespace, settings: Settings) -> int:
    from fs_app.dialstring import DialSettings
    from iim.core.numbering import DEFAULT_PLAN
    from iim.explain import explain, find_snapshot, render
    from policy_cache.bootstrap import bootstrap
    from policy_cache.store import PgPolicyStore

    db = await bootstrap(database_url=args.database_url or settings.database_url, data_dir=settings.data_dir,
                         demo=settings.demo_data)
    async with db, PgPolicyStore(db.cache_url) as store:
        snapshot = await find_snapshot(store, args.to)
        plans = await store.load_plans()
    if snapshot is None:
        print(f"{args.to} is not a subscriber: the call goes to the dialled number unchanged (passthrough)")
        return 0
    dial = DialSettings(phone_endpoint=settings.passthrough_endpoint.replace("{destination}", "{msisdn}"))
    _, report = explain(snapshot, args.to, args.caller, args.at, dial, plans.get(snapshot.tenant_id, DEFAULT_PLAN))
    print(render(report, as_json=args.json))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """``iim health``: the running service's ``/health``, one line per dependency; exit 0 ok, 1 not ok, 2 no
    answer."""
    import json
    import urllib.error
    import urllib.request

    url = args.url or f"http://{Settings().http_host}:{Settings().http_port}"
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=args.timeout) as resp:  # noqa: S310
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 503: still a health document
        doc = json.loads(exc.read() or b"{}")
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"iim: no health answer from {url}: {exc}\n")
        return 2
    sys.stdout.write(json.dumps(doc, indent=2) + "\n" if args.json else render_health(doc))
    return 0 if doc.get("status") == "ok" else 1


def render_health(doc: dict[str, Any]) -> str:
    """The overall status, then a table: dependency, status, since, why."""
    rows = [("DEPENDENCY", "STATUS", "SINCE", "REASON")]
    for name, dep in sorted((doc.get("dependencies") or {}).items()):
        rows.append((name, str(dep.get("status")), str(dep.get("since", "")), str(dep.get("reason") or "")))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"status: {doc.get('status')}"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3]
              for row in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iim", description="IoT Integration Module")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the outbound ESL server and the HTTP surface")
    serve.add_argument("--esl-host", help="address for FreeSWITCH's socket app (default 127.0.0.1)")
    serve.add_argument("--esl-port", type=int, help="port for FreeSWITCH's socket app (default 8084)")
    serve.add_argument("--http-host", help="address for /metrics and /health (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, help="port for /metrics and /health (default 8088)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING ...")
    serve.set_defaults(func=cmd_serve)
    explain = sub.add_parser("explain-call", help="show how a call would be routed and which rules decided it")
    explain.add_argument("--to", required=True, help="the dialled subscriber number (E.164) or SIP AoR")
    explain.add_argument("--from", dest="caller", help="the caller's number")
    explain.add_argument("--at", help="ISO time; without an offset, the subscriber's local time (default now)")
    explain.add_argument("--json", action="store_true", help="print JSON")
    explain.add_argument("--database-url", help="PostgreSQL URL (default IIM_DATABASE_URL, else embedded)")
    explain.set_defaults(func=cmd_explain_call)
    health = sub.add_parser("health", help="ask the running service's /health: each dependency, since when")
    health.add_argument("--url", help="IIM's HTTP site (default http://IIM_HTTP_HOST:IIM_HTTP_PORT)")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    health.add_argument("--json", action="store_true", help="print the JSON document")
    health.set_defaults(func=cmd_health)
    from iim.admin.cli import register_subcommands
    from iim.keys_cli import register_subcommands as register_key_commands

    register_subcommands(sub)
    register_key_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return int(args.func(args))
    from iim.admin.cli import traced_command
    from iim.telemetry import command_tracing

    # The command is a span, exported when the environment configures OTLP as for `iim serve`; the API's spans
    # of the command are its children (each request carries its traceparent: iim.admin.cli).
    with command_tracing(), traced_command(args):
        return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
