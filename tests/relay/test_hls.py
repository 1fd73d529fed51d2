"""HLS out from the outside: FFmpeg plays the playlist, the window slides, gaps are marked."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path

import av
import numpy as np
import pytest

from loa.codecs.encoders import Mp3Encoder, Packet
from loa.streamer.broadcast import Broadcast
from loa.streamer.sources import ToneSource
from loa.web.testing import LiveNode, running_node
from tests.apiclient import Api, make_config, running_api
from tests.audio import peak_hz, rms

AREA = "T01-H1-X1"


@pytest.fixture
async def live(tmp_path) -> AsyncIterator[LiveNode]:
    """A node on the real clock, listening on a free port of 127.0.0.1."""
    cfg = make_config(tmp_path)
    cfg.hls.segment_seconds = 1.0
    cfg.hls.window = 4
    async with running_node(cfg) as ln:
        yield ln


@pytest.fixture
async def api(tmp_path) -> AsyncIterator[Api]:
    cfg = make_config(tmp_path)
    cfg.hls.segment_seconds = 1.0
    cfg.hls.window = 3
    async with running_api(cfg) as a:
        yield a


def parse_playlist(text: str) -> dict[str, object]:
    lines = text.strip().splitlines()
    assert lines[0] == "#EXTM3U"
    head = {m.group(1): int(m.group(2)) for m in
            (re.match(r"#EXT-X-([A-Z-]+):(\d+)$", ln) for ln in lines) if m}
    segs: list[tuple[int, float, bool]] = []
    disc = False
    dur = 0.0
    for ln in lines[1:]:
        if ln == "#EXT-X-DISCONTINUITY":
            disc = True
        elif ln.startswith("#EXTINF:"):
            dur = float(ln[8:].rstrip(","))
        elif not ln.startswith("#"):
            segs.append((int(ln.removesuffix(".ts")), dur, disc))
            disc = False
    return {"head": head, "segments": segs}


def windows_hz(pcm: np.ndarray, rate: int, width: float = 0.25) -> list[float]:
    n = int(width * rate)
    return [round(peak_hz(pcm[i:i + n], rate)) for i in range(0, pcm.shape[0] - n + 1, n)]


# ---- FFmpeg plays it -----------------------------------------------------------------------
async def test_ffmpeg_plays_the_playlist_and_hears_the_preemption(live: LiveNode, tmp_path):
    live.node.engine.start(Broadcast(ToneSource(440, 0.3), ["T01-H1"], issuer="T01-H1"))
    out = tmp_path / "out.wav"
    proc = await asyncio.create_subprocess_exec(
        "ffmpeg", "-nostdin", "-loglevel", "warning", "-y",
        "-i", f"{live.url}/streams/{AREA}/index.m3u8", "-t", "6", "-ac", "1", "-ar", "24000",
        str(out), stderr=asyncio.subprocess.PIPE)
    hls = live.node.hls
    while not (AREA in hls.segmenters and hls.segmenters[AREA].segments):
        await asyncio.sleep(0.05)
    await asyncio.sleep(2.5)
    # The province (a higher authority) preempts the district's tone.
    live.node.engine.start(Broadcast(ToneSource(880, 0.3), ["T01"], issuer="T01"))
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert b"corrupt" not in err.lower() and b"continuity" not in err.lower(), err.decode()
    with av.open(str(out), "r") as c:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    pcm = pcm.astype(np.float32) / (32768 if pcm.dtype == np.int16 else 1)
    rate = 24_000
    assert pcm.shape[0] == 6 * rate  # six seconds, no hole
    hz = windows_hz(pcm, rate)
    assert hz[:4] == [440] * 4 and hz[-4:] == [880] * 4, hz
    # Exactly one switch, at most one mixed window at the switch, never silence.
    switch = hz.index(880)
    assert all(h == 440 for h in hz[:switch - 1]) and all(h == 880 for h in hz[switch:]), hz
    assert all(rms(pcm[i:i + rate // 4]) > 0.1 for i in range(0, pcm.shape[0], rate // 4))


# ---- the playlist ---------------------------------------------------------------------------
async def get_playlist(api: Api, area: str = AREA, drive: float = 0.0) -> str:
    """GET the playlist while the virtual clock renders `drive` seconds (a fresh segmenter waits
    for its first segment)."""
    task = asyncio.ensure_future(api.client.get(f"/streams/{area}/index.m3u8"))
    for _ in range(20):
        await asyncio.sleep(0)
        if area in api.node.hls.segmenters:
            break
    api.run(drive)
    r = await task
    assert r.status == 200, await r.text()
    assert r.headers["Content-Type"] == "application/vnd.apple.mpegurl"
    return await r.text()


async def test_media_sequence_increases_and_the_window_slides(api: Api):
    api.node.engine.start(Broadcast(ToneSource(440, 0.3), ["T01-H1"], issuer="T01-H1"))
    # Media time on x.5 s: far from a segment boundary (1 s grid) whatever the encoder delay.
    first = parse_playlist(await get_playlist(api, drive=4.5))
    head = first["head"]
    segs = first["segments"]
    assert isinstance(head, dict) and isinstance(segs, list)
    assert head["VERSION"] == 3 and head["TARGETDURATION"] == 1
    assert len(segs) == 3 and [s[0] for s in segs] == list(range(segs[0][0], segs[0][0] + 3))
    assert head["MEDIA-SEQUENCE"] == segs[0][0]
    assert all(0.95 <= d <= 1.03 for _, d, _ in segs)  # whole segments of the 1 s grid
    old = segs[0][0]
    r = await api.client.get(f"/streams/{AREA}/{old}.ts")
    assert r.status == 200 and r.headers["Content-Type"] == "video/mp2t"
    body = await r.read()
    assert len(body) % 188 == 0 and body[0] == 0x47

    api.run(10)
    await asyncio.sleep(0)
    later = parse_playlist(await get_playlist(api))
    lhead = later["head"]
    lsegs = later["segments"]
    assert isinstance(lhead, dict) and isinstance(lsegs, list)
    assert lhead["MEDIA-SEQUENCE"] == head["MEDIA-SEQUENCE"] + 10  # ten seconds, ten segments
    assert [s[0] for s in lsegs] == list(range(old + 10, old + 13))
    assert not any(disc for *_, disc in lsegs)
    # The segment that slid out (beyond the grace) is gone; the listed ones are served.
    assert (await api.client.get(f"/streams/{AREA}/{old}.ts")).status == 404
    for seq, _, _ in lsegs:
        r = await api.client.get(f"/streams/{AREA}/{seq}.ts")
        assert r.status == 200
        data = await r.read()
        pcm = decode_ts(data)
        assert peak_hz(pcm, 24_000) == pytest.approx(440, abs=2)


def decode_ts(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data), "r", format="mpegts") as c:
        out = [f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]
    return np.concatenate(out).astype(np.float32)


def mp3_packets(freq: float, seconds: float, start: int) -> list[Packet]:
    """Real MP3 packets of a tone, stamped from 48 kHz sample `start` (on the MP3 grid)."""
    enc = Mp3Encoder(start)
    n = int(seconds * 48_000)
    t = np.arange(start, start + n) / 48_000
    pcm = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    out: list[Packet] = []
    for i in range(0, n - 959, 960):
        out.extend(enc.encode(pcm[i:i + 960]))
    return out


async def test_a_gap_in_the_channel_is_a_discontinuity(api: Api):
    get = asyncio.ensure_future(api.client.get(f"/streams/{AREA}/index.m3u8"))
    while AREA not in api.node.hls.segmenters:
        await asyncio.sleep(0)
    channel = api.node.hub.channel(AREA, "mp3")
    before = mp3_packets(440, 3.0, 0)
    gap_start = before[-1].end
    # 105 frames (2.52 s) of the channel never arrive; then 880 Hz, on the same clock.
    after = mp3_packets(880, 2.0, (before[-1].end + 105 * 576) * 2)
    channel.deliver(before)
    r = await get
    assert r.status == 200
    channel.deliver(after)
    pl = parse_playlist(await (await api.client.get(f"/streams/{AREA}/index.m3u8")).text())
    segs = pl["segments"]
    head = pl["head"]
    assert isinstance(segs, list) and isinstance(head, dict)
    flagged = [s for s in segs if s[2]]
    assert len(flagged) == 1  # exactly one tag, on the first segment after the gap
    assert head["DISCONTINUITY-SEQUENCE"] == 0
    idx = segs.index(flagged[0])
    seg = api.node.hls.segmenters[AREA]
    assert seg.segment(flagged[0][0]).pts == after[0].pts  # type: ignore[union-attr]
    assert seg.segment(segs[idx - 1][0]).pts < gap_start  # type: ignore[union-attr]
    # Both sides decode from the served bytes: 440 Hz before the tag, 880 Hz after it.
    data_before = await (await api.client.get(f"/streams/{AREA}/{segs[idx - 1][0]}.ts")).read()
    data_after = await (await api.client.get(f"/streams/{AREA}/{segs[idx][0]}.ts")).read()
    assert peak_hz(decode_ts(data_before), 24_000) == pytest.approx(440, abs=2)
    assert peak_hz(decode_ts(data_after), 24_000) == pytest.approx(880, abs=2)
    # The TS timestamps carry the gap too.
    with av.open(io.BytesIO(data_before + data_after), "r", format="mpegts") as c:
        pts = [p.pts for p in c.demux(audio=0) if p.pts is not None]
    jumps = [b - a for a, b in zip(pts, pts[1:], strict=False) if b - a > 90_000]
    assert len(jumps) == 1 and jumps[0] >= 2.5 * 90_000

    # Once the tagged segment slides out of the window, the discontinuity sequence counts it.
    more = mp3_packets(880, 4.0, after[-1].end * 2)
    channel.deliver(more)
    pl = parse_playlist(await (await api.client.get(f"/streams/{AREA}/index.m3u8")).text())
    segs = pl["segments"]
    head = pl["head"]
    assert isinstance(segs, list) and isinstance(head, dict)
    assert not any(s[2] for s in segs)
    assert head["DISCONTINUITY-SEQUENCE"] == 1


async def test_unknown_area_and_unknown_segments_are_404(api: Api):
    r = await api.client.get("/streams/NOWHERE/index.m3u8")
    assert r.status == 404
    assert "không có khu vực" in (await r.json())["error"]
    assert "unknown area" in (await r.json())["error"]
    assert (await api.client.get("/streams/NOWHERE/5.ts")).status == 404
    # A known area whose segmenter is not running, then one that runs: unknown numbers are 404.
    assert (await api.client.get(f"/streams/{AREA}/1.ts")).status == 404
    text = await get_playlist(api, drive=2.5)
    last = parse_playlist(text)["segments"][-1][0]  # type: ignore[index]
    assert (await api.client.get(f"/streams/{AREA}/{last + 1}.ts")).status == 404
    assert (await api.client.get(f"/streams/{AREA}/{last}.ts")).status == 200
    assert (await api.client.get(f"/streams/{AREA}/abc.ts")).status == 404
    # Garbage in the channel is dropped and logged; the segmenter keeps going.
    seg = api.node.hls.segmenters[AREA]
    api.node.hub.channel(AREA, "mp3").deliver([Packet("mp3", 0, 0, b"", 24_000)])
    assert seg.ignored == 1
    api.run(1)
    await asyncio.sleep(0)
    assert parse_playlist(await get_playlist(api))["segments"][-1][0] == last + 1  # type: ignore[index]


async def test_segmenter_stops_when_nobody_asks(tmp_path: Path):
    cfg = make_config(tmp_path)
    cfg.hls.segment_seconds = 1.0
    cfg.hls.idle_seconds = 0.3
    async with running_api(cfg) as api:
        await get_playlist(api, drive=2.5)
        hls = api.node.hls
        channel = api.node.hub.channel(AREA, "mp3")
        assert AREA in hls.segmenters and len(channel.subs) == 1
        for _ in range(200):  # no requests: the idle timer stops it
            if AREA not in hls.segmenters:
                break
            await asyncio.sleep(0.05)
        assert AREA not in hls.segmenters and channel.subs == []
        assert hls.stopped == 1
        assert (await api.client.get(f"/streams/{AREA}/1.ts")).status == 404
        # A new request starts it again, numbering after the old segments.
        text = await get_playlist(api, drive=2.5)
        assert parse_playlist(text)["segments"]
        assert hls.started == 2
