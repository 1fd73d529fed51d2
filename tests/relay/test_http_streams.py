"""Icecast-compatible HTTP streams, against a real node on a real port with the real clock.

Clients are real: ffmpeg decodes the streams, raw sockets read ICY metadata and count Ogg pages,
VLC and GStreamer play Ogg Opus joined mid-stream. VLC (Debian vlc-bin, vlc-plugin-base) refuses
to run as root: it runs as `nobody` through runuser, writing a WAV file in a directory of its own.
Waits are bounded polls on the server's own counters (how many bytes it sent, who it dropped),
never timing thresholds.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from loa.codecs.ogg import FLAG_BOS, OggPage, read_pages
from loa.relay.icecast import icy_block
from loa.web.streams.http import http_stats
from tests.audio import peak_hz
from tests.helpers import until
from tests.httpstreams import AREA, Server, Start, mp3_frames, open_stream, read_wav, servers

MP3_BYTES_PER_SECOND = 4000  # 32 kbit/s


@pytest.fixture(params=[0, 1], ids=["in-process", "worker"])
async def start(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Start]:
    async with servers(tmp_path, request.param) as _start:
        yield _start


@pytest.fixture
async def start_in_process(tmp_path: Path) -> AsyncIterator[Start]:
    """For tests that read a channel's listeners: the node's own HttpStreamer (a worker runs the
    same one; tests/relay/test_fanout.py checks what crosses to it)."""
    async with servers(tmp_path, 0) as _start:
        yield _start


@pytest.mark.parametrize("codec", ["mp3", "opus"])
async def test_ffmpeg_hears_the_tone_then_the_preempting_bulletin(
        start: Start, tmp_path: Path, codec: str) -> None:
    srv = await start(warm_seconds=0.5)
    srv.background(440)
    out = tmp_path / f"out-{codec}.wav"
    proc = await asyncio.create_subprocess_exec(
        "ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", srv.url(f"/streams/{AREA}.{codec}"),
        "-t", "4", "-ac", "1", "-ar", "48000", str(out))
    # Switch once the server has written 1.5 s of audio to ffmpeg (bytes, not wall time).
    rate = MP3_BYTES_PER_SECOND if codec == "mp3" else 4200  # Opus 32 kbit/s, Ogg framed
    await until(lambda: srv.sent(AREA, codec) >= 1.5 * rate, "1.5 s of audio sent", timeout=20.0)
    srv.bulletin(1000)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    pcm, rate_hz = read_wav(out)
    assert pcm.shape[0] >= 3.9 * rate_hz  # ffmpeg got 4 s of audio
    assert abs(peak_hz(pcm[:int(1.2 * rate_hz)], rate_hz) - 440) < 10
    assert abs(peak_hz(pcm[int(2.6 * rate_hz):int(4.0 * rate_hz)], rate_hz) - 1000) < 10
    await until(lambda: srv.streamer.total == 0, "ffmpeg's connection to be closed", timeout=20.0)
    # Kept warm for a returning listener, then unsubscribed (the encoder stops).
    await until(lambda: srv.node.hub.channels[(AREA, codec)].subs == [], "the warm time to end", timeout=20.0)


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
    srv = await start(max_listeners_per_area=2, max_listeners=3, retry_after=7, warm_seconds=0.5)
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
    await until(lambda: srv.streamer.total == 0, "closed listeners to be noticed", timeout=20.0)
    await until(lambda: srv.streamer.channels == {}, "the channels' warm time to end", timeout=20.0)


def audio_pages(data: bytes) -> list[OggPage]:
    pages = list(read_pages(data))
    assert all(p.crc_ok for p in pages)
    assert pages[0].flags & FLAG_BOS and pages[0].packets()[0].startswith(b"OpusHead")
    assert pages[1].packets()[0].startswith(b"OpusTags")
    # Each listener's stream is numbered as a file: 0, 1, 2, ... (no page missing, none twice)
    assert [p.seq for p in pages] == list(range(len(pages)))
    audio = pages[2:]
    # Granules count from the listener's first audio page (a player shows the time since join).
    assert audio[0].granule == 960 * len(audio[0].packets())
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
    await until(lambda: len(received) > 8000, "the good listener to receive audio", timeout=20.0)
    # A raw socket with a tiny receive buffer that never calls recv(): the server's backlog for
    # it grows (past the 32 KiB kernel buffer) until it passes 16 KiB, and the server drops it.
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stalled.connect(("127.0.0.1", srv.port))
    stalled.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await until(lambda: http_stats(srv.app)["dropped"] == 1, "the stalled listener's drop", timeout=20.0)
    mark = len(received)
    late_reader, late_writer, _, _ = await open_stream(srv.port, path)
    late = bytearray()
    while len(late) < 20_000:
        late += await late_reader.read(65536)
    await until(lambda: len(received) > mark + 40_000, "more audio after the drop", timeout=20.0)
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
    # Mux once: the pages both listeners got carry the same audio, numbered for each.
    # (a tone repeats its packets: align the longest run of equal bodies)
    def overlap(d: int) -> list[tuple[OggPage, OggPage]]:
        return list(zip(good[d:], later, strict=False))

    d = max(range(len(good)), key=lambda d: sum(a.body == b.body for a, b in overlap(d)))
    pairs = overlap(d)
    assert len(pairs) >= 5 and all(a.body == b.body for a, b in pairs)
    assert len({a.seq - b.seq for a, b in pairs}) == 1
    assert len({a.granule - b.granule for a, b in pairs}) == 1
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
    from loa.web.bench import http as bench_http
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


# ---- third-party clients on Ogg Opus -----------------------------------------------------
OPUS_BYTES_PER_SECOND = 4200  # 32 kbit/s Opus, Ogg framed


async def _live_for_a_while(start: Start, seconds: float = 3.0
                            ) -> tuple[Server, asyncio.StreamReader, asyncio.StreamWriter]:
    """A node airing 440 Hz whose Ogg channel has run for `seconds`: a listener joining now
    gets pages far from the channel's first (the live sequence and granule are not 0)."""
    srv = await start()
    srv.background(440)
    reader, writer, _, _ = await open_stream(srv.port, f"/streams/{AREA}.opus")
    await until(lambda: srv.sent(AREA, "opus") >= seconds * OPUS_BYTES_PER_SECOND,
                f"{seconds} s of Ogg to the first listener", timeout=20.0)
    return srv, reader, writer


async def _run(*cmd: str, timeout: float = 60.0, env: dict[str, str] | None = None
               ) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_late_ogg_listener_stream_is_numbered_from_zero_and_ffmpeg_is_strict(
        start: Start, tmp_path: Path) -> None:
    srv, _, first_writer = await _live_for_a_while(start)
    reader, writer, _, headers = await open_stream(srv.port, f"/streams/{AREA}.opus")
    assert headers["content-type"] == "audio/ogg"
    data = bytearray()
    while len(data) < 3 * OPUS_BYTES_PER_SECOND:
        data += await reader.read(65536)
    writer.close()
    first_writer.close()
    audio = audio_pages(whole_pages(data))  # CRC, sequence from 0, granules from the join
    assert len(audio) >= 10
    # ffmpeg with the Ogg demuxer's strictness (a sequence jump or bad CRC is an error).
    path = tmp_path / "late.opus"
    path.write_bytes(whole_pages(data))
    rc, out = await _run("ffmpeg", "-nostdin", "-v", "warning", "-err_detect", "crccheck",
                         "-xerror", "-i", str(path), "-f", "null", "-")
    assert rc == 0 and "error" not in out.lower(), out


async def test_vlc_plays_a_late_joined_ogg_opus_stream(start: Start, tmp_path: Path) -> None:
    cvlc = shutil.which("cvlc")
    assert cvlc, "Debian vlc-bin (make sysdeps) is missing"
    srv, _, first_writer = await _live_for_a_while(start)
    # pytest's tmp_path is under a root-only directory: VLC writes to one of its own.
    work = Path(tempfile.mkdtemp(prefix="loa-vlc-"))
    os.chmod(work, 0o777)
    wav = work / "out.wav"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work)}
    rc, out = await _run(
        "runuser", "-u", "nobody", "--", cvlc, "-I", "dummy", "--no-video",
        "--aout=afile", f"--audiofile-file={wav}", "--audiofile-channels=1",
        srv.url(f"/streams/{AREA}.opus"), "--run-time=5", "vlc://quit", env=env, timeout=90)
    first_writer.close()
    try:
        assert rc == 0 and wav.exists(), out
        pcm, rate = read_wav(wav)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert pcm.shape[0] >= 2 * rate, f"VLC played {pcm.shape[0] / rate:.2f} s\n{out}"
    assert abs(peak_hz(pcm[-2 * rate:], rate) - 440) < 10


async def test_ogg_gets_no_icy_metadata_and_gstreamer_decodes_it(
        start: Start, tmp_path: Path) -> None:
    srv, _, first_writer = await _live_for_a_while(start, 1.0)
    reader, writer, status, headers = await open_stream(srv.port, f"/streams/{AREA}.opus",
                                                        "Icy-MetaData: 1")
    assert status == "HTTP/1.0 200 OK"
    assert "icy-metaint" not in headers
    data = bytearray()
    while len(data) < 20_000:  # past several 16,000-byte ICY intervals
        data += await reader.read(65536)
    writer.close()
    pages = list(read_pages(whole_pages(data)))  # raises on any byte between pages
    assert sum(p.size for p in pages) == len(whole_pages(data)) and all(p.crc_ok for p in pages)
    # The MP3 stream still gets it.
    _, w2, _, mp3_headers = await open_stream(srv.port, f"/streams/{AREA}.mp3", "Icy-MetaData: 1")
    w2.close()
    assert mp3_headers["icy-metaint"] == str(srv.streamer.settings.icy_metaint)

    gst = shutil.which("gst-launch-1.0")
    assert gst, "Debian gstreamer1.0-tools (make sysdeps) is missing"
    wav = tmp_path / "gst.wav"
    rc, out = await _run(
        gst, "-q", "souphttpsrc", f"location={srv.url(f'/streams/{AREA}.opus')}",
        "extra-headers=\"extra, Icy-MetaData=(string)1\"", "iradio-mode=true",
        "num-buffers=40", "!", "oggdemux", "!", "opusdec", "!", "audioconvert", "!",
        "audioresample", "!", "audio/x-raw,rate=48000,channels=1,format=S16LE", "!", "wavenc",
        "!", "filesink", f"location={wav}", timeout=90)
    first_writer.close()
    assert rc == 0, out
    pcm, rate = read_wav(wav)
    assert pcm.shape[0] >= rate // 2, out
    assert abs(peak_hz(pcm, rate) - 440) < 10


async def _read_at_least(reader: asyncio.StreamReader, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await reader.read(65536)
        assert chunk, "the stream ended"
        data += chunk
    return bytes(data)


async def _decode(tmp_path: Path, name: str, data: bytes) -> tuple[np.ndarray, int]:
    """ffmpeg, strict (a bad CRC, sequence or frame is an error), to 48 kHz mono WAV."""
    src, wav = tmp_path / name, tmp_path / f"{name}.wav"
    src.write_bytes(data)
    rc, out = await _run("ffmpeg", "-nostdin", "-v", "warning", "-err_detect", "crccheck",
                         "-xerror", "-i", str(src), "-ac", "1", "-ar", "48000", str(wav))
    assert rc == 0 and "error" not in out.lower(), out
    return read_wav(wav)


@pytest.mark.parametrize("codec", ["mp3", "opus"])
async def test_a_browser_on_a_young_channel_gets_its_burst_filled_with_silence(
        start: Start, tmp_path: Path, codec: str) -> None:
    """A channel's first listener gets the 160 ms the mixer's history primes: a player starts on
    that (no silence added), a browser (it waits for ~64 KiB) gets encoded silence up to its
    burst, in one valid stream that continues into the live audio."""
    srv = await start()
    srv.background(440)
    path = f"/streams/{AREA}.{codec}"
    rate = MP3_BYTES_PER_SECOND if codec == "mp3" else OPUS_BYTES_PER_SECOND
    reader, player, _, _ = await open_stream(srv.port, path)
    heard = await _read_at_least(reader, rate)  # about its first second
    if codec == "opus":
        heard = whole_pages(bytearray(heard))
        audio_pages(heard)
    else:
        heard = heard[:len(heard) - len(heard) % 96]  # whole 96-byte frames
        mp3_frames(heard)
    pcm, hz = await _decode(tmp_path, f"player.{codec}", heard)
    assert abs(peak_hz(pcm, hz) - 440) < 10  # the tone from the start: no silence first

    burst = srv.streamer.settings.burst_kb * 1024
    reader, browser, _, _ = await open_stream(
        srv.port, path, user_agent="Mozilla/5.0 (X11; Linux x86_64) Chrome/120.0")
    data = await _read_at_least(reader, burst + 3 * rate)  # the burst, then 3 s of live audio
    player.close()
    browser.close()
    if codec == "opus":
        data = whole_pages(bytearray(data))
        audio_pages(data)  # numbered from 0, every granule 960 apart, CRCs right
    else:
        data = data[:len(data) - len(data) % 96]
        assert mp3_frames(data) == len(data) // 96  # nothing but MP3 frames
    pcm, hz = await _decode(tmp_path, f"browser.{codec}", data)
    burst_seconds = burst / rate
    assert pcm.shape[0] >= (burst_seconds + 2) * hz  # the whole burst is audio, not a header
    assert float(np.abs(pcm[:int(10 * hz)]).max()) < 0.01  # silence first (the channel is young)
    assert abs(peak_hz(pcm[-2 * hz:], hz) - 440) < 10  # then the live tone, in the same stream


# ---- browsers ------------------------------------------------------------------------------
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
@pytest.mark.parametrize("codec", ["mp3", "opus"])
async def test_chromium_autoplays_the_stream_from_a_page_of_another_origin(
        start_in_process: Start, codec: str, warm: bool) -> None:
    """Chromium's <audio autoplay> starts on a live stream only once about 64 KiB arrived: the
    connect burst must hold that much (a 200 ms burst left it waiting ~16 s for the trickle,
    and so did a channel's first listener, ~24 s). Warm: the listener comes back to a channel
    kept warm after its previous listener left. Cold: Chromium is the area's first listener."""
    from playwright.async_api import async_playwright

    srv = await start_in_process()
    srv.background(440)
    burst = srv.streamer.settings.burst_kb * 1024
    if warm:
        _, writer, _, _ = await open_stream(srv.port, f"/streams/{AREA}.{codec}")
        await until(lambda: srv.sent(AREA, codec) >= burst + 4096, "a burst's worth of audio",
                    timeout=60)
        writer.close()
        await until(lambda: srv.streamer.total == 0, "the first listener to leave", timeout=20.0)
        assert (AREA, codec) in srv.streamer.channels  # kept warm
    else:
        assert (AREA, codec) not in srv.streamer.channels

    page_app = web.Application()
    html = (f'<!doctype html><audio id="a" autoplay '
            f'src="{srv.url(f"/streams/{AREA}.{codec}")}"></audio>')
    page_app.router.add_get("/", lambda _: web.Response(text=html, content_type="text/html"))
    runner = web.AppRunner(page_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    page_port = runner.addresses[0][1]
    assert page_port != srv.port  # another origin
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path="/usr/bin/chromium",
                                              args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                await page.goto(f"http://127.0.0.1:{page_port}/")
                await until(lambda: srv.streamer.total == 1, "Chromium's connection", timeout=20.0)
                [ch] = [c for c in srv.streamer.channels.values() if c.codec == codec]
                [ls] = ch.listeners
                assert ls.first_write >= burst
                await page.wait_for_function(
                    "document.getElementById('a').readyState === 4 && "
                    "!document.getElementById('a').paused", timeout=60_000)
                # It started from the burst, not after the trickle of live audio made it up.
                assert ls.bytes < ls.first_write + burst // 2
                t0 = await page.evaluate("document.getElementById('a').currentTime")
                await page.wait_for_function(
                    f"document.getElementById('a').currentTime > {t0} + 1", timeout=60_000)
                assert await page.evaluate("document.getElementById('a').error") is None
            finally:
                await browser.close()
    finally:
        await runner.cleanup()


async def test_burst_is_the_larger_of_time_and_bytes_and_a_player_may_ask_for_less(
        start_in_process: Start) -> None:
    srv = await start_in_process(burst_ms=1000, burst_kb=8)
    srv.background(440)
    _, first, _, _ = await open_stream(srv.port, f"/streams/{AREA}.mp3")
    await until(lambda: srv.sent(AREA, "mp3") >= 12_000, "3 s of MP3 to the first listener", timeout=20.0)
    _, w1, _, _ = await open_stream(srv.port, f"/streams/{AREA}.mp3")
    _, w2, _, _ = await open_stream(srv.port, f"/streams/{AREA}.mp3?burst_ms=200")
    [ch] = srv.streamer.channels.values()
    default, short = ch.listeners[1], ch.listeners[2]
    assert default.first_write >= 8 * 1024  # 8 KiB (2 s) is more than 1000 ms (4 KB) here
    assert 0 < short.first_write <= 200 * MP3_BYTES_PER_SECOND // 1000 + 200
    for w in (first, w1, w2):
        w.close()
    async with aiohttp.ClientSession() as http:
        for bad in ("-1", "x", "600000"):
            async with http.get(srv.url(f"/streams/{AREA}.mp3?burst_ms={bad}")) as r:
                assert r.status == 422
                assert (await r.json())["field"] == "burst_ms"


def test_bench_fanout_http_storm_small(capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The storm bench: every listener reconnects through the worker; clock figures reported."""
    from loa.web.bench import http as bench_http
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
