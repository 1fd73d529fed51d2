"""HLS benchmarks: `python -m loa.web.bench.hls [--clients N] [--seconds S]` (server CPU per
request of real players) and `--segmenter` (CPU to segment and mux one area's MP3 stream)."""

from __future__ import annotations

import asyncio
import json
import time

from loa.codecs.encoders import Packet
from loa.relay.hls import HlsSettings, Segmenter


def bench(seconds: float = 120.0, segment_seconds: float = 2.0) -> dict[str, object]:
    """CPU to segment and mux the MP3 stream of one area, per segment and per audio second."""
    import numpy as np

    from loa.codecs.encoders import Mp3Encoder

    enc = Mp3Encoder(0)
    t = np.arange(int(seconds * 48_000)) / 48_000
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    packets: list[Packet] = []
    for i in range(0, pcm.shape[0] - 960 + 1, 960):
        packets.extend(enc.encode(pcm[i:i + 960]))
    settings = HlsSettings(segment_seconds=segment_seconds, window=6)
    seg = Segmenter("B", settings, 0)
    made = 0
    t0 = time.process_time()
    for i in range(0, len(packets), 2):  # about one hub delivery (20 ms) at a time
        before = seg.next_seq
        seg.feed(packets[i:i + 2])
        made += seg.next_seq - before
    cpu = time.process_time() - t0
    t1 = time.process_time()
    n_pl = 10_000
    for _ in range(n_pl):
        seg._playlist = None
        seg.playlist()
    pl_cpu = time.process_time() - t1
    audio_bytes = sum(len(p.data) for p in packets)
    ts_bytes = sum(len(s.data) for s in seg.segments)
    ts_audio = sum(s.duration for s in seg.segments)
    return {
        "bench": "hls_segmenter",
        "audio_seconds": round(seconds, 1),
        "segment_seconds": segment_seconds,
        "segments": made,
        "cpu_ms_per_segment": round(cpu * 1000 / max(made, 1), 3),
        "cpu_percent_of_core_per_area": round(100 * cpu / seconds, 4),
        "areas_per_core": int(seconds / cpu) if cpu else None,
        "playlist_render_us": round(pl_cpu * 1e6 / n_pl, 2),
        "mp3_kbit_s": round(audio_bytes * 8 / seconds / 1000, 2),
        "ts_kbit_s": round(ts_bytes * 8 / ts_audio / 1000, 2) if ts_audio else None,
    }




_CLIENT = r"""
import asyncio, sys, time
import aiohttp

async def main(url, clients, seconds):
    done = 0
    errors = 0
    async def one(session):
        nonlocal done, errors
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            async with session.get(url + "/index.m3u8") as r:
                text = await r.text()
            last = [ln for ln in text.splitlines() if ln.endswith(".ts")][-1]
            async with session.get(url + "/" + last) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
            done += 2
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(one(session) for _ in range(clients)))
    print(done, errors)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
"""


async def _bench(clients: int, seconds: float) -> dict[str, object]:
    import contextlib
    import sys
    import tempfile
    import time
    from pathlib import Path

    import numpy as np

    from loa.codecs.encoders import Mp3Encoder
    from loa.web.config import load_config
    from loa.web.testing import start_node

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, env={}, data=str(Path(tmp) / "data"))
        with contextlib.redirect_stdout(sys.stderr):  # the bootstrap password is not the result
            live = await start_node(cfg, realtime=False, access_log=None)
        node, port = live.node, live.port
        area = node.tree.roots()[0].code
        assert node.hls is not None
        seg = node.hls.touch(area)
        enc = Mp3Encoder(0)
        t = np.arange(48_000 * 20) / 48_000
        pcm = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for i in range(0, pcm.shape[0] - 959, 960):
            node.hub.channel(area, "mp3").deliver(enc.encode(pcm[i:i + 960]))
        seg_bytes = len(seg.segments[-1].data)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CLIENT, f"http://127.0.0.1:{port}/streams/{area}",
            str(clients), str(seconds), stdout=asyncio.subprocess.PIPE)
        cpu0 = time.process_time()
        out, _ = await proc.communicate()
        cpu = time.process_time() - cpu0
        done, errors = (int(x) for x in out.split())
        await live.stop()
    per_req = cpu / max(done, 1)
    polls = 2 / cfg.hls.segment_seconds  # a player: playlist + segment per segment
    return {
        "bench": "hls_serving",
        "clients": clients,
        "seconds": seconds,
        "requests": done,
        "errors": errors,
        "segment_bytes": seg_bytes,
        "server_cpu_s": round(cpu, 3),
        "server_cpu_us_per_request": round(per_req * 1e6, 1),
        "requests_per_core_s": int(1 / per_req) if per_req else None,
        "players_per_core": int(1 / (per_req * polls)) if per_req else None,
    }


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="HLS cost: server CPU per request of real players, "
                                 "or (--segmenter) CPU to segment one area's stream")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--segmenter", action="store_true")
    a = ap.parse_args()
    print(json.dumps(bench() if a.segmenter else asyncio.run(_bench(a.clients, a.seconds))))
