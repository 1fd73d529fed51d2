"""Uploads under abuse and at scale: declared sizes, many parts, long files, a full disk, and
content deduplication that never hands one commune's record to another."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import aiohttp
import pytest

from tests.apiclient import Api, make_config, running_api, tone_file
from tests.emergencynode import X3, live_config, serving, start_music
from tests.helpers import until


@pytest.fixture
async def api(tmp_path):
    async with running_api(make_config(tmp_path, max_mb=1, max_seconds=600)) as a:
        yield a


async def raw_request(api: Api, head: list[str], body: bytes) -> tuple[bytes, bytes]:
    """Send a request head and the first bytes of a body, then only read: the status line and
    what follows until the server closes (b"" at the end means it closed)."""
    port = api.client.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join([*head, "Host: 127.0.0.1"]) + "\r\n\r\n").encode() + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 20.0)  # until the server closes
    finally:
        writer.close()
    status, _, rest = response.partition(b"\r\n")
    return status, rest


@pytest.mark.parametrize("path,ctype", [("/api/v1/media", "multipart/form-data; boundary=x"),
                                        ("/api/v1/tts", "application/json")])
async def test_declared_length_over_the_limit_is_refused_before_the_body(api, path, ctype):
    token = api.tokens["xa11"]
    status, rest = await raw_request(api, [
        f"POST {path} HTTP/1.1", f"Authorization: Bearer {token}", f"Content-Type: {ctype}",
        f"Content-Length: {250 * 2**20}"], b"--x\r\n")
    assert status == b"HTTP/1.1 413 Request Entity Too Large", (status, rest)
    assert b"request body too large" in rest
    assert b"\r\nconnection: close\r\n" in rest.lower()  # closed, the rest never read
    assert await api.node.store.count("media") == 0


# ---- deduplication: of the stored bytes, never of the record ---------------------------------
async def test_same_bytes_in_another_commune_get_their_own_record(api, tmp_path):
    tone = tone_file(tmp_path / "chuong.wav", 440, 3)
    status, a = await api.upload("xa11", tone, "A")
    assert status == 201, a
    status, b = await api.upload("xa12", tone, "B")
    assert status == 201, b
    assert b["id"] != a["id"] and b["sha256"] == a["sha256"]
    assert (b["title"], b["area"], b["owner"]) == ("B", "T01-H1-X2", "xa12")
    assert await api.call("xa11", "GET", f"/api/v1/media/{a['id']}") == (200, a)  # unchanged
    assert (await api.call("xa12", "GET", f"/api/v1/media/{a['id']}"))[0] == 404
    assert len(list(api.node.library.root.glob("*/*.s16"))) == 1  # the audio is shared
    status, _ = await api.call("xa12", "DELETE", f"/api/v1/media/{b['id']}")
    assert status == 204
    assert await api.call("xa11", "GET", f"/api/v1/media/{a['id']}") == (200, a)
    aired = api.node.library.source(a)  # A still plays: its audio outlived B's record
    assert abs(aired.size / 48_000 - 3.0) < 0.05 and float(abs(aired.read(4800)).max()) > 0.1
    assert api.node.library.pcm_path(a["sha256"]).exists()
    status, _ = await api.call("xa11", "DELETE", f"/api/v1/media/{a['id']}")
    assert status == 204
    assert not list(api.node.library.root.glob("*/*.s16"))  # gone with its last record
    assert not list(api.node.library.root.glob("*/*.orig"))


async def test_speech_is_cached_per_area_and_never_hands_over_another_areas_record(api):
    text = {"text": "Họp tổ dân phố lúc 19 giờ"}
    status, a = await api.call("xa11", "POST", "/api/v1/tts", json=text)
    assert status == 201, a
    status, again = await api.call("bientap11", "POST", "/api/v1/tts", json=text)
    assert status == 201 and again["id"] == a["id"]  # same area: the cached record
    status, b = await api.call("xa12", "POST", "/api/v1/tts", json=text)
    assert status == 201, b
    assert b["id"] != a["id"] and (b["area"], b["owner"]) == ("T01-H1-X2", "xa12")
    assert b["sha256"] == a["sha256"]
    assert await api.call("xa11", "GET", f"/api/v1/media/{a['id']}") == (200, a)


# ---- bounded decoding ----------------------------------------------------------------------------
INGEST_AND_MEASURE = """
import asyncio, json, resource, shutil, sys
from pathlib import Path
from loa.streamer.library import MediaLibrary
from loa.streamer.state.open import open_store

async def main(src, data):
    store = await open_store("sqlite", data)
    lib = MediaLibrary(Path(data) / "media", store)
    temps = [lib.temp_path(".mp3") for _ in range(2)]
    for t in temps:
        shutil.copyfile(src, t)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    records = await asyncio.gather(*(lib.ingest(t, title="Dài", area="T01", owner="x")
                                      for t in temps))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    await store.close()
    print(json.dumps({"grew_kb": peak - before, "records": records}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_two_long_uploads_at_once_decode_in_bounded_memory(tmp_path):
    """1 h of 8 kbit/s MP3 (3.6 MB) is 2.7 GB of float samples in memory: decoded whole, two
    such uploads took 5 GB; streamed to the store they take a few tens of MB each."""
    mp3 = tmp_path / "long.mp3"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "sine=f=440:r=8000", "-t", "3600", "-ac", "1", "-c:a", "libmp3lame",
                    "-b:a", "8k", str(mp3)], check=True)
    out = subprocess.run([sys.executable, "-c", INGEST_AND_MEASURE, str(mp3),
                          str(tmp_path / "data")], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout)
    print(f"peak memory growth of two 1 h decodes at once: {result['grew_kb'] / 1024:.0f} MiB")
    assert result["grew_kb"] < 400 * 1024
    for r in result["records"]:
        assert abs(r["duration"] - 3600) < 1 and r["gain_db"] is not None
    pcm = tmp_path / "data" / "media" / r["sha256"][:2] / f"{r['sha256']}.s16"
    assert pcm.stat().st_size == 3600 * 48_000 * 2
    assert not list((tmp_path / "data" / "media" / "tmp").iterdir())


# ---- a full disk -------------------------------------------------------------------------------
@pytest.fixture
async def small_disk_api(tmp_path):
    """A node whose data directory is a 4 MiB tmpfs."""
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(data)], check=True)
    try:
        async with running_api(make_config(tmp_path, max_mb=8, max_seconds=600)) as a:
            yield a
    finally:
        subprocess.run(["umount", "-l", str(data)], check=True)


def stored_files(api: Api) -> list[str]:
    return sorted(str(p.relative_to(api.node.library.root))
                  for p in api.node.library.root.rglob("*") if p.is_file())


async def test_full_disk_answers_507_and_leaves_no_partial_file(small_disk_api, tmp_path):
    api = small_disk_api
    # 60 s of speech-rate MP3 is small, its 16-bit store is 5.8 MB: the disk fills while decoding.
    long = tone_file(tmp_path / "long.mp3", 440, 60)
    big = tmp_path / "big.wav"  # bigger than the disk: it fills while the upload is received
    big.write_bytes(tone_file(tmp_path / "t.wav", 440, 3).read_bytes()[:44] + os.urandom(5 << 20))
    for path in (long, big):
        status, body = await api.upload("xa11", path)
        assert status == 507, (path.name, status, body)
        assert "disk full" in body["error"] and "ổ đĩa đầy" in body["error"]
        assert stored_files(api) == []  # no temp upload, no partial PCM, no original
    assert await api.node.store.count("media") == 0
    status, m = await api.upload("xa11", tone_file(tmp_path / "short.wav", 440, 3))
    assert status == 201, m  # the space was given back
    assert stored_files(api) == sorted(f"{m['sha256'][:2]}/{m['sha256']}{s}"
                                       for s in (".orig", ".s16"))


# ---- many parts ----------------------------------------------------------------------------------
class GapMeter:
    """An HTTP listener of an Ogg stream that records the largest pause between its reads."""

    def __init__(self) -> None:
        self.reads = 0
        self.last = 0.0
        self.largest = 0.0

    async def listen(self, http: aiohttp.ClientSession, url: str) -> None:
        loop = asyncio.get_running_loop()
        async with http.get(url) as r:
            assert r.status == 200
            async for _ in r.content.iter_any():
                now = loop.time()
                if self.reads:
                    self.largest = max(self.largest, now - self.last)
                self.last = now
                self.reads += 1


async def test_many_tiny_parts_are_refused_without_stalling_another_communes_listener(tmp_path):
    cfg = live_config(tmp_path)
    cfg.http_streams.batch_bytes = 1  # write every Ogg page (20 ms): a stall shows as a gap
    cfg.http_streams.batch_ms = 20
    cfg.http_streams.page_ms = 20
    parts = b"".join(b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\ny\r\n'
                     for _ in range(100_000))
    body = b'--b\r\nContent-Disposition: form-data; name="title"\r\n\r\nA\r\n' + parts + b"--b--\r\n"
    async with serving(cfg, realtime=True) as srv:
        start_music(srv.node)
        meter = GapMeter()
        task = asyncio.create_task(meter.listen(srv.http, f"{srv.base}/streams/{X3}.opus"))
        try:
            await until(lambda: meter.reads >= 20, "the listener's first pages")
            meter.largest = 0.0
            status, got = await srv.call("xa11", "POST", "/api/v1/media", data=body,
                                         headers={"Content-Type":
                                                  "multipart/form-data; boundary=b"})
            seen = meter.reads
            await until(lambda: meter.reads >= seen + 10, "pages after the refusal")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    print(f"largest gap of the listener: {meter.largest * 1000:.0f} ms")
    assert status == 400 and "more than 8 parts" in got["error"], (status, got)
    assert meter.largest < 0.3  # pages every 20 ms; the uncapped parser stalled it ~1 s


def part(name: str, value: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return (f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n{head}\r\n'.encode()
            + value + b"\r\n")


@pytest.mark.parametrize("body,status,reason", [
    (part("title", b"A", *(f"X-Extra-{i}: 1" for i in range(20))), 400, "16 header lines"),
    (part("title", b"A", "X-Long: " + "a" * 2000), 400, "1024 bytes"),
    (part("title", b"A" * 5000), 413, "longer than 4096 bytes"),
    (part("area", b"T01-H1-X1" * 1000), 413, "longer than 4096 bytes"),
    (b'--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\n\r\nz\r\n--c--\r\n', 400,
     "nested"),
])
async def test_oversized_part_headers_and_fields_are_refused(api, body, status, reason):
    r = await api.client.post("/api/v1/media", data=body + b"--b--\r\n", headers={
        **api.auth("xa11"), "Content-Type": "multipart/form-data; boundary=b"})
    got = await r.json()
    assert (r.status, reason in got["error"]) == (status, True), got
    assert await api.node.store.count("media") == 0


async def test_decodes_wait_their_turn(tmp_path, monkeypatch):
    """At most `decoders` uploads decode at once; the others wait instead of adding memory."""
    from loa.streamer import library as lib_mod
    from loa.streamer.state.open import open_store

    active = peak = 0
    real = lib_mod.decode_chunks

    def counting(*args, **kw):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            yield from real(*args, **kw)
        finally:
            active -= 1

    monkeypatch.setattr(lib_mod, "decode_chunks", counting)
    store = await open_store("sqlite", tmp_path)
    lib = lib_mod.MediaLibrary(tmp_path / "media", store, lib_mod.LibrarySettings(decoders=2))
    temps = []
    for i in range(4):
        t = lib.temp_path(".wav")
        t.write_bytes(tone_file(tmp_path / f"{i}.wav", 300 + 100 * i, 20).read_bytes())
        temps.append(t)
    try:
        records = await asyncio.gather(*(lib.ingest(t, title=f"{i}", area="T01", owner="x")
                                         for i, t in enumerate(temps)))
    finally:
        await store.close()
    assert len({r["sha256"] for r in records}) == 4
    assert 1 <= peak <= 2
