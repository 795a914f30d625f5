"""The URLs FreeSWITCH fetches alert prompts by: signed, expiring, keyed content ids, one 404 for every refusal."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from iim.core.metrics import REGISTRY
from iim.tts.engine import EspeakTts
from iim.tts.switch_audio import SwitchAudio, switch_audio_routes

SECRET = b"s" * 32
BASE = "http://10.0.0.7:8080"


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Rendered:
    path: Path
    key: str


def _path_of(playable: str) -> str:
    """The request the switch makes for an ``http_cache://http://host/...`` playable: path and query."""
    assert playable.startswith(f"http_cache://{BASE}/")
    url = URL(playable.removeprefix("http_cache://"))
    return str(url.relative())


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], SwitchAudio,
                                                        EspeakTts, Clock]]:
    clock = Clock()
    tts = EspeakTts(tmp_path / "tts")
    audio = SwitchAudio(SECRET, BASE, ttl_s=900, granularity_s=300, clock=clock)
    app = web.Application()
    app.add_routes(switch_audio_routes(audio, tts))
    async with TestClient(TestServer(app)) as client:
        yield client, audio, tts, clock
    await tts.aclose()


def test_without_a_base_url_the_switch_gets_the_local_path(tmp_path: Path) -> None:
    audio = SwitchAudio(SECRET, None)
    assert audio.playable(Rendered(tmp_path / "x.wav", "ab" * 32)) == str(tmp_path / "x.wav")


async def test_a_rendered_prompt_is_an_http_cache_url_the_route_serves(served: tuple[
        TestClient[web.Request, web.Application], SwitchAudio, EspeakTts, Clock]) -> None:
    client, audio, tts, _ = served
    text = "Alarm at Flat 12: smoke in the kitchen"
    rendered = await tts.render(text)
    playable = audio.playable(rendered)
    before = REGISTRY.get_sample_value("iim_switch_audio_requests_total", {"result": "served"}) or 0
    resp = await client.get(_path_of(playable))
    assert resp.status == 200
    assert resp.content_type == "audio/wav"
    assert await resp.read() == rendered.path.read_bytes()
    assert resp.headers["Cache-Control"].startswith("private, max-age=")
    assert REGISTRY.get_sample_value("iim_switch_audio_requests_total", {"result": "served"}) == before + 1
    # Nothing of the text is in the URL, not even its cache key (a hash anyone could compute from a guess).
    assert "Flat" not in playable
    assert "kitchen" not in playable.lower()
    assert rendered.key not in playable
    assert hashlib.sha256(text.encode()).hexdigest() not in playable
    # The file name's extension, as mod_http_cache reads it (before the query string), is wav.
    assert URL(playable.removeprefix("http_cache://")).path.endswith(".wav")


async def test_the_same_prompt_signed_again_soon_is_the_same_url_one_download_at_the_switch(served: tuple[
        TestClient[web.Request, web.Application], SwitchAudio, EspeakTts, Clock]) -> None:
    _, audio, tts, clock = served
    generic = await tts.generic({"1": "acknowledge"})
    first = audio.playable(generic)
    clock.now += 30
    assert audio.playable(generic) == first  # mod_http_cache keys by the whole URL, query included
    clock.now += 600
    assert audio.playable(generic) != first


async def test_a_bad_signature_an_expired_url_and_an_unknown_id_are_the_same_404(served: tuple[
        TestClient[web.Request, web.Application], SwitchAudio, EspeakTts, Clock]) -> None:
    client, audio, tts, clock = served
    path = _path_of(audio.playable(await tts.generic({"1": "acknowledge"})))
    url = URL(path)
    sig = url.query["sig"]
    stranger = SwitchAudio(b"t" * 32, BASE, clock=clock)  # another key: its ids are not ours
    foreign = _path_of(stranger.playable(await tts.generic({"1": "acknowledge"})))
    unsigned_key = (await tts.render("Someone else's prompt")).key
    answers = []
    for bad in (url.update_query(sig=("0" if sig[0] != "0" else "1") + sig[1:]),
                url.update_query(exp=str(int(url.query["exp"]) + 300)),
                url.with_query({}),
                URL(foreign),
                url.with_path(f"/v1/audio/{unsigned_key}.wav"),  # the cache key itself never resolves
                url.with_path(f"/v1/audio/{'0' * 64}.wav")):
        resp = await client.get(str(bad))
        answers.append((resp.status, await resp.text()))
    clock.now += 1300  # past the rounded expiry
    resp = await client.get(path)
    answers.append((resp.status, await resp.text()))
    assert len(set(answers)) == 1, answers
    assert answers[0][0] == 404
    assert (await client.get("/v1/audio/")).status == 404  # nothing to list


async def test_an_id_signed_long_ago_is_forgotten_within_the_bound(tmp_path: Path) -> None:
    audio = SwitchAudio(SECRET, BASE, max_ids=2)
    urls = [URL(audio.playable(Rendered(tmp_path / f"{n}.wav", f"{n:064x}")).removeprefix("http_cache://"))
            for n in range(3)]
    resolved = [audio.resolve(u.name.removesuffix(".wav"), u.query["exp"], u.query["sig"]) for u in urls]
    assert resolved == [None, f"{1:064x}", f"{2:064x}"]


def test_a_weak_secret_or_a_base_url_with_a_query_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        SwitchAudio(b"short", BASE)
    with pytest.raises(ValueError, match="base URL"):
        SwitchAudio(SECRET, "http://iim/?x=1")
    with pytest.raises(ValueError, match="base URL"):
        SwitchAudio(SECRET, "/v1")


@pytest.mark.parametrize("value", ["iim.example.net:8088", "ftp://iim/", "http://iim:8088/?k=v", "http://iim/#x"])
def test_a_malformed_switch_audio_base_url_is_refused_when_the_settings_load(value: str) -> None:
    from pydantic import ValidationError

    from iim.settings import Settings

    with pytest.raises(ValidationError, match="switch_audio_base_url"):
        Settings(switch_audio_base_url=value)
    assert Settings(switch_audio_base_url="http://10.0.0.7:8088").switch_audio_base_url == "http://10.0.0.7:8088"
