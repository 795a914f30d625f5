"""``http_cache://`` prompts in the emulator: fetched over HTTP as mod_http_cache fetches them, so a broken URL
fails in fast tests as it fails on the switch (FreeSWITCH 1.10.12: ``FILE NOT FOUND``, and every try of
``play_and_get_digits`` failing at once, ``read_result`` unset)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from fs_app.esl import Execute, HangupCmd
from fs_app.testing import CallSpec, FreeSwitchEmulator, TargetBehaviour
from fs_app.testing.peers import EslPeer
from tests.connector_peer import serve
from tests.fs_app.testing.test_emulator_outbound import GW, finish, run_call, start


@pytest.fixture
async def site() -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTP site with one prompt (``/ok.wav``, cacheable for a minute); every request path is noted."""
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path_qs)
        if request.path != "/ok.wav":
            raise web.HTTPNotFound()
        return web.Response(body=b"RIFF....WAVE", content_type="audio/wav", headers={"Cache-Control": "max-age=60"})

    app = web.Application()
    app.router.add_get("/{name}", handler)
    runner, url = await serve(app)
    yield url, hits
    await runner.cleanup()


def _emulator() -> FreeSwitchEmulator:
    return FreeSwitchEmulator(targets={GW: TargetBehaviour.answer(after_ms=50)}, time_scale=0.05)


async def test_a_prompt_url_is_downloaded_once_and_played_then_served_from_the_cache(
        site: tuple[str, list[str]]) -> None:
    url, hits = site
    emu = _emulator()

    async def app(peer: EslPeer) -> None:
        await start(peer)
        for n in (1, 2):
            peer.send(Execute(app="playback", arg=f"http_cache://{url}/ok.wav?exp=1&sig=x", event_uuid=f"p{n}"))
            done = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="playback")
            assert done.get("Application-Response") == "FILE PLAYED"
        peer.send(HangupCmd())
        await finish(peer)

    await run_call(app, CallSpec(), emu)
    assert hits == ["/ok.wav?exp=1&sig=x"]  # keyed by the whole URL, fetched once
    assert emu.http_cache.fetched == [f"{url}/ok.wav?exp=1&sig=x"]


async def test_a_prompt_url_that_does_not_download_fails_the_playback(site: tuple[str, list[str]]) -> None:
    url, hits = site

    async def app(peer: EslPeer) -> None:
        await start(peer)
        peer.send(Execute(app="playback", arg=f"http_cache://{url}/missing.wav", event_uuid="p"))
        done = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="playback")
        assert done.get("Application-Response") == "FILE NOT FOUND"
        peer.send(HangupCmd())
        await finish(peer)

    await run_call(app, CallSpec(), _emulator())
    assert hits == ["/missing.wav"]


async def test_play_and_get_digits_with_an_unplayable_prompt_fails_every_try_without_waiting_for_a_key(
        site: tuple[str, list[str]]) -> None:
    url, hits = site

    async def app(peer: EslPeer) -> None:
        await start(peer)
        peer.send(Execute(app="answer", event_uuid="a"))
        # A 10-minute digit timeout: waiting for it would outlast the test.
        peer.send(Execute(app="play_and_get_digits", arg=f"1 1 3 600000 none http_cache://{url}/gone.wav "
                                                         "silence_stream://250 iim_alert_digit [1]",
                          event_uuid="pg"))
        done = await peer.expect_event("CHANNEL_EXECUTE_COMPLETE", app="play_and_get_digits")
        assert done.variable("read_result") is None  # switch_ivr_read gave up before setting it
        assert done.variable("iim_alert_digit") is None
        peer.send(HangupCmd())
        await finish(peer)

    await run_call(app, CallSpec(dtmf="1"), _emulator())
    assert hits == ["/gone.wav"] * 3  # a failed download is not cached: each try asks again
