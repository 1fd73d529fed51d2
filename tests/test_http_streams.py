"""Icecast-compatible HTTP streams, against a real node on a real port with the real clock.

Clients are real: ffmpeg decodes the streams, raw sockets read ICY metadata and count Ogg pages.
Waits are bounded polls on the server's own counters (how many bytes it sent, who it dropped),
never timing thresholds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from loa.codecs.ogg import FLAG_BOS, OggPage, read_pages
from loa.relay.icecast import HttpStreamer, icy_block
from loa.streamer.broadcast import Broadcast
from loa.streamer.sources import ToneSource
from loa.web.app import Node, create_app
from loa.web.streams_http import HTTP_STREAMER, http_stats
from tests.apiclient import make_config
from tests.audio import peak_hz

AREA = "T01-H1-X1"
MP3_BYTES_PER_SECOND = 4000  # 32 kbit/s


@dataclass
class Server:
    node: Node
    app: web.Application
    runner: web.AppRunner
    port: int

    @property
    def streamer(self) -> HttpStreamer:
        return self.app[HTTP_STREAMER]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def background(self, freq: float = 440, title: str = "Nhạc nền") -> str:
        return self.node.engine.start(Broadcast(ToneSource(freq, 0.3), ["T01-H1"],
                                                issuer="T01-H1", klass="background",
                                                title=title))

    def bulletin(self, freq: float = 1000, title: str = "Bản tin huyện") -> str:
        return self.node.engine.start(Broadcast(ToneSource(freq, 0.3), ["T01-H1"],
                                                issuer="T01-H1", klass="normal", title=title))

    def sent(self, area: str, codec: str) -> int:
        for s in self.streamer.stats()["streams"]:
            if (s["area"], s["codec"]) == (area, codec):
                return int(s["bytes"])
        return 0


Start = Callable[..., Awaitable[Server]]


@contextlib.asynccontextmanager
async def servers(tmp_path: Path, workers: int) -> AsyncIterator[Start]:
    """Start nodes serving HTTP streams themselves (workers = 0) or through fan-out workers."""
    started: list[Server] = []

    async def _start(**settings: Any) -> Server:
        cfg = make_config(tmp_path / f"node{len(started)}")
        cfg.http_streams.workers = workers
        for key, value in settings.items():
            target = cfg.http_streams if hasattr(cfg.http_streams, key) else cfg.encoders
            assert hasattr(target, key), key
            setattr(target, key, value)
        node = Node(cfg, realtime=True)
        await node.start()
        app = create_app(node)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        server = Server(node, app, runner, port)
        started.append(server)
        return server

    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    try:
        yield _start
    finally:
        for s in started:
            await s.runner.cleanup()
            await s.node.stop()


@pytest.fixture(params=[0, 1], ids=["in-process", "worker"])
async def start(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Start]:
    async with servers(tmp_path, request.param) as _start:
        yield _start


async def until(cond: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    """Poll a condition on the server's counters; the limit only bounds a broken run."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


async def open_stream(port: int, path: str, *extra: str, method: str = "GET"
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str, dict[str, str]]:
    """A raw HTTP/1.1 client: returns the reader after the response head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    req = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "User-Agent: loa-test", *extra]
    writer.write(("\r\n".join(req) + "\r\n\r\n").encode())
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("utf-8").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return reader, writer, lines[0], headers


def mp3_frames(data: bytes) -> int:
    """Count consecutive MPEG-2 layer III frames; fails on any byte that is not a frame."""
    bitrates = [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160]
    rates = [22050, 24000, 16000]
    pos = n = 0
    while pos + 4 <= len(data):
        h = struct.unpack_from(">I", data, pos)[0]
        assert h >> 21 == 0x7FF, f"no MP3 frame sync at byte {pos}"
        assert (h >> 19) & 3 == 2 and (h >> 17) & 3 == 1, "not MPEG-2 layer III"
        br = bitrates[(h >> 12) & 15] * 1000
        sr = rates[(h >> 10) & 3]
        pos += 72 * br // sr + ((h >> 9) & 1)
        n += 1
    return n


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32)
        return pcm / 32768, w.getframerate()


@pytest.mark.parametrize("codec", ["mp3", "opus"])
async def test_ffmpeg_hears_the_tone_then_the_preempting_bulletin(
        start: Start, tmp_path: Path, codec: str) -> None:
    srv = await start()
    srv.background(440)
    out = tmp_path / f"out-{codec}.wav"
    proc = await asyncio.create_subprocess_exec(
        "ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", srv.url(f"/streams/{AREA}.{codec}"),
        "-t", "4", "-ac", "1", "-ar", "48000", str(out))
    # Switch once the server has written 1.5 s of audio to ffmpeg (bytes, not wall time).
    rate = MP3_BYTES_PER_SECOND if codec == "mp3" else 4200  # Opus 32 kbit/s, Ogg framed
    await until(lambda: srv.sent(AREA, codec) >= 1.5 * rate, "1.5 s of audio sent")
    srv.bulletin(1000)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    pcm, rate_hz = read_wav(out)
    assert pcm.shape[0] >= 3.9 * rate_hz  # ffmpeg got 4 s of audio
    assert abs(peak_hz(pcm[:int(1.2 * rate_hz)], rate_hz) - 440) < 10
    assert abs(peak_hz(pcm[int(2.6 * rate_hz):int(4.0 * rate_hz)], rate_hz) - 1000) < 10
    await until(lambda: srv.streamer.total == 0, "ffmpeg's connection to be closed")
    assert srv.node.hub.channels[(AREA, codec)].subs == []  # unsubscribed with the last one


async def test_icy_metadata_names_what_is_on_air(start: Start) -> None:
    srv = await start(icy_metaint=1000)
    srv.background(440, "Nhạc nền")
    reader, writer, status, headers = await open_stream(srv.port, f"/streams/{AREA}.mp3",
                                                        "Icy-MetaData: 1")
    assert status == "HTTP/1.0 200 OK"
    assert headers["icy-metaint"] == "1000"
    assert "transfer-encoding" not in headers and "content-length" not in headers
    audio = bytearray()
    titles: list[str | None] = []
    try:
        for _ in range(60):
            audio += await reader.readexactly(1000)
            n = (await reader.readexactly(1))[0]
            if n == 0:
                titles.append(None)
            else:
                block = await reader.readexactly(n * 16)
                text = block.rstrip(b"\0").decode("utf-8")
                assert text.startswith("StreamTitle='") and text.endswith("';")
                titles.append(text[len("StreamTitle='"):-2])
            if len(titles) == 2:
                srv.bulletin(1000, "Bản tin huyện")
            if titles[-1] == "Bản tin huyện (normal)":
                break
    finally:
        writer.close()
    named = [t for t in titles if t is not None]
    assert named == ["Nhạc nền (background)", "Bản tin huyện (normal)"]
    assert titles[0] == "Nhạc nền (background)"
    assert None in titles[1:-1]  # unchanged: a single zero byte
    # With the metadata taken out at exactly every 1000 bytes, the rest is whole MP3 frames.
    assert mp3_frames(bytes(audio)) >= len(audio) // 96 - 1


def test_icy_block_is_padded_and_escaped() -> None:
    block = icy_block("Bản tin 'khẩn'")
    assert (len(block) - 1) % 16 == 0 and block[0] == (len(block) - 1) // 16
    assert block[1:].rstrip(b"\0").decode() == "StreamTitle='Bản tin \u2019khẩn\u2019';"
    assert len(icy_block("x" * 10_000)) <= 1 + 255 * 16


async def test_head_404_and_response_headers(start: Start) -> None:
    srv = await start()
    srv.background()
    reader, writer, status, headers = await open_stream(srv.port, f"/streams/{AREA}.mp3",
                                                        method="HEAD")
    assert status == "HTTP/1.0 200 OK"
    assert await reader.read() == b""  # headers only, then the server closes
    writer.close()
    assert headers["content-type"] == "audio/mpeg"
    assert headers["icy-name"] == "Xã 1 huyện 1"
    assert headers["icy-br"] == "32"
    assert headers["cache-control"].startswith("no-cache")
    assert headers["connection"].lower() == "close"
    assert "icy-description" in headers and "icy-metaint" not in headers
    assert srv.streamer.total == 0 and (AREA, "mp3") not in srv.streamer.channels

    async with aiohttp.ClientSession() as http:
        async with http.get(srv.url(f"/streams/{AREA}.opus")) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "audio/ogg"
            assert "Transfer-Encoding" not in r.headers
            first = await r.content.readexactly(200)
            assert first.startswith(b"OggS")
        async with http.get(srv.url("/streams/KHONG-CO.mp3")) as r:
            assert r.status == 404
            body = json.loads(await r.text())
            assert body["error"] == "không có khu vực / unknown area: KHONG-CO"
        async with http.head(srv.url("/streams/KHONG-CO.opus")) as r:
            assert r.status == 404


async def test_limits_answer_503_with_retry_after(start: Start) -> None:
    srv = await start(max_listeners_per_area=2, max_listeners=3, retry_after=7)
    srv.background()
    a = await open_stream(srv.port, f"/streams/{AREA}.mp3")
    b = await open_stream(srv.port, f"/streams/{AREA}.opus")  # per area: every codec counts
    async with aiohttp.ClientSession() as http:
        async with http.get(srv.url(f"/streams/{AREA}.mp3")) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "7"
            assert "khu vực đã đủ người nghe / listener limit reached" in (await r.json())["error"]
        c = await open_stream(srv.port, "/streams/T01-H1-X2.mp3")
        assert c[2] == "HTTP/1.0 200 OK"
        async with http.get(srv.url("/streams/T01-H1-X3.mp3")) as r:
            assert r.status == 503
            assert "máy chủ đã đủ người nghe / server listener limit" in (await r.json())["error"]
    assert srv.streamer.rejected == 2
    assert http_stats(srv.app)["listeners"] == 3
    for _, writer, _, _ in (a, b, c):
        writer.close()
    await until(lambda: srv.streamer.total == 0, "closed listeners to be noticed")
    assert srv.streamer.channels == {}


def audio_pages(data: bytes) -> list[OggPage]:
    pages = list(read_pages(data))
    assert all(p.crc_ok for p in pages)
    assert pages[0].flags & FLAG_BOS and pages[0].packets()[0].startswith(b"OpusHead")
    assert pages[1].packets()[0].startswith(b"OpusTags")
    seqs = [p.seq for p in pages]
    assert seqs == list(range(seqs[0], seqs[0] + len(pages)))  # no page missing, none twice
    audio = pages[2:]
    for prev, page in zip(audio, audio[1:], strict=False):
        assert page.granule - prev.granule == 960 * len(page.packets())  # every 20 ms packet
    return audio


async def test_stalled_listener_is_dropped_and_others_get_every_page(start: Start) -> None:
    srv = await start(high_water_kb=16, sndbuf_kb=16, opus_bitrate=256_000)
    srv.background()
    path = f"/streams/{AREA}.opus"
    good_reader, good_writer, _, _ = await open_stream(srv.port, path)
    received = bytearray()

    async def read_good() -> None:
        while chunk := await good_reader.read(65536):
            received.extend(chunk)

    reading = asyncio.create_task(read_good())
    await until(lambda: len(received) > 8000, "the good listener to receive audio")
    # A raw socket with a tiny receive buffer that never calls recv(): the server's backlog for
    # it grows (past the 32 KiB kernel buffer) until it passes 16 KiB, and the server drops it.
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stalled.connect(("127.0.0.1", srv.port))
    stalled.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await until(lambda: http_stats(srv.app)["dropped"] == 1, "the stalled listener's drop")
    mark = len(received)
    late_reader, late_writer, _, _ = await open_stream(srv.port, path)
    late = bytearray()
    while len(late) < 20_000:
        late += await late_reader.read(65536)
    await until(lambda: len(received) > mark + 40_000, "more audio after the drop")
    assert srv.streamer.total == 2
    assert len(srv.node.hub.channels[(AREA, "opus")].subs) == 1  # one subscription for all
    good_writer.close()
    late_writer.close()
    reading.cancel()

    stats = http_stats(srv.app)
    assert stats["dropped"] == 1
    assert [s["dropped"] for s in stats["streams"] if s["codec"] == "opus"] == [1]
    good = audio_pages(whole_pages(received))
    later = audio_pages(whole_pages(late))
    assert len(good) >= 20  # 100 ms pages: at least 2 s of audio, every packet of it
    # Mux once: the pages both listeners got are the same bytes.
    by_seq = {p.seq: p for p in good}
    shared = [p for p in later if p.seq in by_seq]
    assert len(shared) >= 5
    assert all(by_seq[p.seq].body == p.body and by_seq[p.seq].granule == p.granule
               for p in shared)
    # The dropped socket was cut by the server (reset), not left hanging.
    stalled.settimeout(10)
    with pytest.raises(ConnectionResetError):
        while stalled.recv(1 << 16):
            pass
    stalled.close()


def whole_pages(buf: bytearray) -> bytes:
    """The longest prefix of buf made of whole Ogg pages (the read stops mid-page)."""
    pos = 0
    while len(buf) - pos >= 27:
        nseg = buf[pos + 26]
        if len(buf) - pos < 27 + nseg:
            break
        end = pos + 27 + nseg + sum(buf[pos + 27:pos + 27 + nseg])
        if end > len(buf):
            break
        pos = end
    return bytes(buf[:pos])


def test_bench_fanout_http_small(capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench runs end to end with real listeners; Icecast missing gives a null baseline."""
    from loa.web import bench_http
    from loa.web.cli import main

    monkeypatch.setattr(bench_http, "SETTLE_SECONDS", 0.2)
    monkeypatch.setattr(bench_http, "BASELINE_SECONDS", 0.5)
    monkeypatch.setattr(bench_http, "WARMUP_SECONDS", 0.5)
    monkeypatch.setattr(bench_http, "FRESH_LISTENERS", 3)
    monkeypatch.setattr(bench_http.shutil, "which",
                        lambda name: None if name.startswith("icecast") else "/usr/bin/" + name)
    rc = main(["bench", "fanout", "--transport", "http", "--listeners", "5", "--seconds", "1",
               "--baseline", "icecast"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1  # exactly one JSON object on stdout
    r = json.loads(out[0])
    assert (r["transport"], r["listeners"], r["listeners_streaming"]) == ("http", 5, 5)
    assert r["listeners_failed"] == 0 and r["dropped"] == 0
    assert r["server_cpu_fraction"] > 0 and r["server_cpu_per_listener"] > 0
    assert r["delivered_ratio"] > 0
    assert r["first_audio_ms"]["n"] == 3
    assert r["baseline"] is None and "icecast2 not found" in r["baseline_reason"]
    assert r["ratio_vs_icecast"] is None


def test_bench_fanout_http_storm_small(capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The storm bench: every listener reconnects through the worker; clock figures reported."""
    from loa.web import bench_http
    from loa.web.cli import main

    monkeypatch.setattr(bench_http, "SETTLE_SECONDS", 0.2)
    monkeypatch.setattr(bench_http, "WARMUP_SECONDS", 0.5)
    rc = main(["bench", "fanout", "--transport", "http", "--storm", "--listeners", "20",
               "--workers", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(out) == 1
    r = json.loads(out[0])
    assert (r["storm"], r["workers"], r["reconnected"], r["reconnect_failed"]) == (True, 1, 20, 0)
    assert r["media_clock_skipped_ticks"] >= 0 and r["media_clock_late_ticks"] >= 0
    assert r["server_cpu_seconds"] >= r["node_process_cpu_seconds"] > 0
