"""Serving an aiohttp app: the bound port is reported, and closing (or failing to start) frees it."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from aiohttp import web

from iim.http import HttpSite, create_app


def _bind_again(port: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # EADDRINUSE if the site left its listener open


async def test_a_site_on_port_zero_reports_the_bound_port_and_frees_it_on_exit() -> None:
    async with HttpSite(create_app([]), "127.0.0.1", 0) as site:
        assert site.port != 0
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{site.port}/health") as resp:
            assert resp.status == 200
    _bind_again(site.port)


async def test_a_site_whose_port_is_taken_fails_to_start_and_cleans_its_app_up() -> None:
    cleaned: list[web.Application] = []

    async def on_cleanup(app: web.Application) -> None:
        cleaned.append(app)

    app = web.Application()
    app.on_cleanup.append(on_cleanup)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(OSError):
            await HttpSite(app, "127.0.0.1", holder.getsockname()[1]).__aenter__()
    assert cleaned == [app]  # the runner set up before the bind failed was cleaned up, not leaked


async def _raw_exchange(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send bytes no HTTP client would; the answer's head and body."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Evil: <script>" + b"A" * 16384 + b"\r\n\r\n",  # 16 KiB header
    b"POST /v1/events HTTP/1.1\r\nHost: x\r\nX-Ev\x01il: <script>secret\r\n\r\n",  # a bad header token
    b"GET /" + b"<script>" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a request line over 8 KiB
])
async def test_a_request_aiohttp_cannot_parse_is_answered_in_problem_json_without_echoing_it(
        request_bytes: bytes) -> None:
    import json

    async with HttpSite(create_app([]), "127.0.0.1", 0) as site:
        head, body = await _raw_exchange(site.port, request_bytes)
    assert head.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), head
    assert b"Content-Type: application/problem+json" in head
    problem = json.loads(body)
    assert (problem["status"], problem["error_id"]) == (400, "malformed-request")
    for echoed in (b"script", b"secret", b"AAAA"):
        assert echoed not in body
