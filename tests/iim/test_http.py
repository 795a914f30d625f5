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
