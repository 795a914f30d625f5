"""Signed audio URLs against a real aiohttp server: fetch, tamper, expiry, traversal."""

from __future__ import annotations

import io
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from iim.tts.urls import AudioUrlSigner, audio_routes
from tests.connector_peer import serve

SECRET = b"k" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


class DirStore:
    """A store over a directory of ``<key>.wav`` files (the engine's layout, without rendering)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, key: str) -> Path | None:
        path = self.root / f"{key}.wav"
        return path if path.is_file() else None


def _wav(path: Path) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(b"\x10\x00" * 1600)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


KEY = "ab" * 32
OTHER = "cd" * 32


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[tuple[str, Clock, AudioUrlSigner, bytes, aiohttp.ClientSession]]:
    data = _wav(tmp_path / f"{KEY}.wav")
    _wav(tmp_path / f"{OTHER}.wav")
    (tmp_path.parent / "secret.wav").write_bytes(b"outside the store")
    clock = Clock()
    app = web.Application()
    placeholder = AudioUrlSigner(SECRET, "http://127.0.0.1", 300, clock=clock)
    app.add_routes(audio_routes(placeholder, DirStore(tmp_path)))
    runner, url = await serve(app)
    signer = AudioUrlSigner(SECRET, url, 300, clock=clock)  # same secret, the real base URL
    async with aiohttp.ClientSession() as session:
        yield url, clock, signer, data, session
    await runner.cleanup()


async def _get(session: aiohttp.ClientSession, url: str | URL) -> tuple[int, str, bytes]:
    async with session.get(url) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


async def test_a_signed_url_serves_the_wav(site: tuple[str, Clock, AudioUrlSigner, bytes,
                                                       aiohttp.ClientSession]) -> None:
    url, _, signer, data, session = site
    signed = signer.sign(KEY)
    assert signed.startswith(f"{url}/v1/audio/{KEY}.wav?exp=1900000300&sig=")
    async with session.get(signed) as resp:
        status, ctype, body = resp.status, resp.headers["Content-Type"], await resp.read()
        assert resp.headers["Cache-Control"] == "private, max-age=300"
    assert (status, ctype, body) == (200, "audio/wav", data)
    with wave.open(io.BytesIO(body), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels()) == (16000, 1)
    async with session.head(signed) as resp:
        assert resp.status == 200


async def test_tampered_urls_are_forbidden(site: tuple[str, Clock, AudioUrlSigner, bytes,
                                                       aiohttp.ClientSession]) -> None:
    url, _, signer, _, session = site
    signed = URL(signer.sign(KEY))
    exp, sig = signed.query["exp"], signed.query["sig"]
    flipped = ("B" if sig[0] == "A" else "A") + sig[1:]
    for bad in (
        signed.update_query(sig=flipped),
        signed.update_query(exp=str(int(exp) + 60)),  # stretching the expiry
        URL(f"{url}/v1/audio/{OTHER}.wav").with_query(exp=exp, sig=sig),  # another file, same signature
        signed.with_query(exp=exp),
        signed.with_query(None),
        signed.update_query(sig=sig + "="),
    ):
        status, _, body = await _get(session, bad)
        assert status == 403, bad
        assert b"RIFF" not in body


async def test_expired_urls_are_forbidden(site: tuple[str, Clock, AudioUrlSigner, bytes,
                                                      aiohttp.ClientSession]) -> None:
    _, clock, signer, _, session = site
    signed = signer.sign(KEY)
    clock.now += 299
    assert (await _get(session, signed))[0] == 200
    clock.now += 1
    assert (await _get(session, signed))[0] == 403


async def test_an_expiry_beyond_the_ttl_is_refused_even_when_signed(site: tuple[str, Clock, AudioUrlSigner,
                                                                                bytes, aiohttp.ClientSession]) -> None:
    url, clock, _, _, session = site
    generous = AudioUrlSigner(SECRET, url, 86400, clock=clock)  # e.g. before ttl_s was lowered
    assert (await _get(session, generous.sign(KEY)))[0] == 403


async def test_unknown_keys_are_404_only_with_a_valid_signature(site: tuple[str, Clock, AudioUrlSigner, bytes,
                                                                            aiohttp.ClientSession]) -> None:
    url, _, signer, _, session = site
    missing = "ef" * 32
    assert (await _get(session, signer.sign(missing)))[0] == 404
    assert (await _get(session, f"{url}/v1/audio/{missing}.wav?exp=1&sig=x"))[0] == 403


@pytest.mark.parametrize("path", [
    "/v1/audio/..%2Fsecret.wav",
    "/v1/audio/%2e%2e%2fsecret.wav",
    "/v1/audio/../secret.wav",
    "/v1/audio/..%2F..%2Fetc%2Fpasswd%00.wav",
    f"/v1/audio/{KEY.upper()}.wav",
    f"/v1/audio/{KEY}0.wav",
    f"/v1/audio/{KEY}.wav/..",
    f"/v1/audio/{KEY}%2F..%2F..%2Fsecret.wav",
])
async def test_nothing_but_a_hex_key_reaches_the_file_system(
        site: tuple[str, Clock, AudioUrlSigner, bytes, aiohttp.ClientSession], path: str) -> None:
    url, _, signer, _, session = site
    query = URL(signer.sign(KEY)).query_string
    status, _, body = await _get(session, URL(f"{url}{path}?{query}", encoded=True))
    assert status in (403, 404)
    assert b"outside the store" not in body
    assert b"RIFF" not in body or status == 200


def test_the_signer_refuses_weak_settings() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        AudioUrlSigner(b"short", "https://iim.example.net", 60)
    with pytest.raises(ValueError, match="ttl_s"):
        AudioUrlSigner(SECRET, "https://iim.example.net", 0)
    with pytest.raises(ValueError, match="base_url"):
        AudioUrlSigner(SECRET, "iim.example.net/x?y=1", 60)
    signer = AudioUrlSigner(SECRET, "https://iim.example.net/", 60)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        signer.sign("../../etc/passwd")
    assert "k" * 32 not in repr(signer)
    assert not signer.check("zz", "1", "x" * 43)
