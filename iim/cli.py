"""``iim`` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from iim import logs
from iim.settings import Settings


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
    from iim.service import run

    _run_loop(run(settings))
    return 0


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
