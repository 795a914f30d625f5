"""``PUT /v1/recordings/{tenant}/{call}.wav``: what a switch on another host uploads, and every refusal.

A real aiohttp site on a loopback port and a real directory; the requests are sent as curl (mod_http_cache)
sends them: ``Content-Length``, ``Expect: 100-continue``, ``application/octet-stream``. A refused body must leave
nothing in the directory, and no refusal is a 5xx."""

from __future__ import annotations

import asyncio
import io
import re
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID, uuid4

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from fs_app.messages import MAX_MESSAGE_S
from iim.home.recording_upload import (
    MAX_HEADER,
    NotWav,
    RecordingUploads,
    UploadLinks,
    WavFormat,
    parse_wav_header,
    upload_routes,
)

SECRET = b"k" * 32
TENANT = str(UUID(int=7))
NOW = 1_800_000_000.0


def wav(seconds: float, *, rate: int = 8000, channels: int = 1, value: int = 1000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(value.to_bytes(2, "little", signed=True) * int(seconds * rate) * channels)
    return out.getvalue()


@dataclass
class Site:
    base: str
    directory: Path
    links: UploadLinks
    clock: list[float]

    def url(self, call: str, tenant: str = TENANT) -> str:
        return self.links.url(tenant, call).removeprefix("http_cache://")

    def leftovers(self) -> list[str]:
        """Everything in the directory but the claims (which are meant to stay until their links expire)."""
        return sorted(p.name for p in self.directory.iterdir() if p.name != ".uploads")


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    clock = [NOW]
    directory = tmp_path / "recordings"
    directory.mkdir()
    server = TestServer(web.Application(), host="127.0.0.1", port=0)
    links = UploadLinks(SECRET, "http://placeholder", clock=lambda: clock[0])
    uploads = RecordingUploads(directory, links, timeout_s=1.0, clock=lambda: clock[0])
    server.app.add_routes(upload_routes(uploads))
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}"
    links.base_url = base
    try:
        yield Site(base, directory, links, clock)
    finally:
        await server.close()


async def put(url: str, body: bytes, **headers: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.put(
            url, data=io.BytesIO(body), expect100=True,
            headers={"Content-Type": "application/octet-stream", **headers}) as resp:
        return resp.status, await resp.text()


async def test_a_genuine_upload_is_stored_under_the_calls_name_and_nothing_else(site: Site) -> None:
    call = str(uuid4())
    body = wav(3)
    assert await put(site.url(call), body) == (201, "")
    assert site.leftovers() == [f"iim-{call}.wav"]  # no temporary file left
    assert (site.directory / f"iim-{call}.wav").read_bytes() == body
    assert (site.directory / f"iim-{call}.wav").stat().st_mode & 0o077 == 0  # private to IIM


async def test_the_upload_url_is_what_the_switch_records_to(site: Site) -> None:
    url = site.links.url(TENANT, "abc-1")
    assert re.fullmatch(rf"http_cache://{site.base}/v1/recordings/{TENANT}/abc-1\.wav\?exp=(\d+)&sig=[0-9a-f]{{64}}",
                        url)
    assert int(url.split("exp=")[1].split("&")[0]) == int(NOW) + MAX_MESSAGE_S + 180
    with pytest.raises(ValueError):
        site.links.url("not-a-tenant", "abc-1")
    with pytest.raises(ValueError):
        site.links.url(TENANT, "../etc/passwd")


async def test_every_refused_link_is_the_same_404_and_stores_nothing(site: Site) -> None:
    call = str(uuid4())
    genuine = site.url(call)
    other_tenant = str(UUID(int=8))
    refused = [
        genuine.replace("sig=", "sig=0")[:-1],  # a signature that does not match
        re.sub(r"exp=\d+", f"exp={int(NOW) + 10_000}", genuine),  # a later expiry than signed
        genuine.replace(f"/{TENANT}/", f"/{other_tenant}/"),  # another tenant
        genuine.replace(f"/{call}.wav", f"/{uuid4()}.wav"),  # another call
        genuine.split("?")[0],  # no signature at all
        genuine.replace("sig=", "sig=XYZ"),  # not hex
    ]
    answers = {await put(url, wav(1)) for url in refused}
    site.clock[0] = NOW + MAX_MESSAGE_S + 181  # past the expiry
    answers.add(await put(genuine, wav(1)))
    assert answers == {(404, "no such recording")}
    assert site.leftovers() == []


async def test_a_replay_is_refused_even_after_the_message_was_deleted(site: Site) -> None:
    call = str(uuid4())
    url = site.url(call)
    assert (await put(url, wav(1)))[0] == 201
    assert await put(url, wav(2)) == (404, "no such recording")  # the file is there: never overwritten
    (site.directory / f"iim-{call}.wav").unlink()  # e.g. deleted for want of consent
    assert await put(url, wav(2)) == (404, "no such recording")  # the call had its one upload
    assert site.leftovers() == []


async def test_claims_are_pruned_once_their_links_expired(site: Site) -> None:
    assert (await put(site.url(str(uuid4())), wav(1)))[0] == 201
    claims = site.directory / ".uploads"
    assert len(list(claims.iterdir())) == 1
    site.clock[0] = NOW + MAX_MESSAGE_S + 200
    assert (await put(site.url(str(uuid4())), wav(1)))[0] == 201  # this upload prunes the expired one
    assert [p.name for p in claims.iterdir()] == [str(int(site.clock[0]) + MAX_MESSAGE_S + 180)]


@pytest.mark.parametrize("body", [b"", b"hello, this is not audio", b"RIFF\0\0\0\0AVI LIST" + bytes(100),
                                  wav(1, rate=8000)[:20] + b"\x03\0" + wav(1)[22:],  # IEEE float, not PCM
                                  b"RIFF\0\0\0\0WAVE" + b"JUNK" + (5000).to_bytes(4, "little") + bytes(5000)],
                         ids=["empty", "text", "avi", "float", "no-data-chunk"])
async def test_a_body_that_is_not_a_pcm_wav_is_refused_and_nothing_kept(site: Site, body: bytes) -> None:
    status, _ = await put(site.url(str(uuid4())), body)
    assert status == 415
    assert site.leftovers() == []


async def test_a_wav_whose_data_is_cut_short_is_refused(site: Site) -> None:
    status, _ = await put(site.url(str(uuid4())), wav(2)[:-4000])
    assert status == 415
    assert site.leftovers() == []


async def test_a_wav_longer_than_the_longest_message_is_refused_before_it_is_read(site: Site) -> None:
    status, text = await put(site.url(str(uuid4())), wav(MAX_MESSAGE_S + 10))
    assert (status, text) == (413, "the recording is longer than the longest message")
    assert site.leftovers() == []
    # The longest message itself (with wideband audio) is taken.
    assert (await put(site.url(str(uuid4())), wav(MAX_MESSAGE_S, rate=16000)))[0] == 201


async def _raw(site: Site, head: str, body: bytes = b"", *, wait_s: float = 5.0) -> bytes:
    """Send ``head`` (and ``body``) on a plain socket; what came back within ``wait_s``."""
    port = int(site.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        async with asyncio.timeout(wait_s):
            return await reader.read(4096)
    finally:
        writer.close()


async def test_a_declared_length_beyond_any_message_is_refused_without_100_continue(site: Site) -> None:
    path = site.url(str(uuid4())).removeprefix(site.base)
    answer = await _raw(site, f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n"
                              "Expect: 100-continue\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"100 Continue" not in answer  # curl never sends the body


async def test_a_bad_link_is_refused_before_100_continue(site: Site) -> None:
    path = site.url(str(uuid4())).removeprefix(site.base).replace("sig=", "sig=0")[:-1]
    answer = await _raw(site, f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                              "Expect: 100-continue\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 "), answer
    assert answer.endswith(b"no such recording")


async def test_a_body_without_a_declared_length_is_refused(site: Site) -> None:
    path = site.url(str(uuid4())).removeprefix(site.base)
    answer = await _raw(site, f"PUT {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                        b"10\r\n" + wav(1)[:16] + b"\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 411 "), answer
    assert site.leftovers() == []


async def test_a_body_that_stalls_is_cut_off_within_the_timeout_and_nothing_kept(site: Site) -> None:
    path = site.url(str(uuid4())).removeprefix(site.base)
    body = wav(2)
    started = asyncio.get_running_loop().time()
    answer = await _raw(site, f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n",
                        body[:1000])  # the rest never comes
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert asyncio.get_running_loop().time() - started < 3  # the site's 1 s, not the client's patience
    assert site.leftovers() == []


async def test_a_peer_that_goes_mid_body_leaves_nothing(site: Site) -> None:
    path = site.url(str(uuid4())).removeprefix(site.base)
    body = wav(2)
    port = int(site.base.rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:2000])
    await writer.drain()
    writer.close()
    for _ in range(100):
        await asyncio.sleep(0.02)
        if site.leftovers() == [] and not any(p.name.endswith(".part") for p in site.directory.iterdir()):
            break
    assert site.leftovers() == []


def test_the_wav_header_reader_takes_what_libsndfile_writes_and_nothing_else() -> None:
    assert parse_wav_header(wav(1)) == WavFormat(1, 8000, 44, 16000)
    assert parse_wav_header(wav(1, rate=48000, channels=2)) == WavFormat(2, 48000, 44, 192000)
    assert parse_wav_header(wav(1)[:30]) is None  # more bytes needed
    assert parse_wav_header(b"RI") is None
    list_chunk = b"LIST" + (26).to_bytes(4, "little") + bytes(26)
    with_list = wav(1)[:36] + list_chunk + wav(1)[36:]
    assert parse_wav_header(with_list) == WavFormat(1, 8000, 44 + len(list_chunk), 16000)
    for bad in (b"OggS" + bytes(40), wav(1, rate=96000), wav(1)[:34] + b"\x08\0" + wav(1)[36:],
                b"RIFF\0\0\0\0WAVE" + b"JUNK" + (MAX_HEADER).to_bytes(4, "little")):
        with pytest.raises(NotWav):
            parse_wav_header(bad)
