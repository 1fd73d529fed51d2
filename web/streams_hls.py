"""Routes and wiring for the hls transport.

`GET /streams/{area}/index.m3u8` (starts the area's segmenter on the first request and waits for
its first segment) and `GET /streams/{area}/{seq}.ts`, served from memory. Streams are public like
the other `/streams` paths: loudspeakers pull them without a token.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from loa.relay.hls import HlsService
from loa.web.app import NODE
from loa.web.http import error_response

HLS: web.AppKey[HlsService] = web.AppKey("hls", HlsService)

PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
SEGMENT_TYPE = "video/mp2t"
FIRST_SEGMENT_WAIT = 3.0  # extra seconds beyond one segment a first request waits


def _unknown_area(area: str) -> web.Response:
    return error_response(404, f"không có khu vực / unknown area {area}")


async def playlist(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    area = request.match_info["area"]
    if area not in node.tree:
        return _unknown_area(area)
    hls = request.app[HLS]
    seg = hls.touch(area)
    if not seg.segments and not await seg.wait_segments(
            hls.settings.segment_seconds * 2 + FIRST_SEGMENT_WAIT):
        return error_response(503, "luồng HLS chưa sẵn sàng / HLS stream not ready yet",
                              headers={"Retry-After": "1"})
    return web.Response(body=seg.playlist(), headers={
        "Content-Type": PLAYLIST_TYPE, "Cache-Control": "no-cache",
        "Access-Control-Allow-Origin": "*"})


async def segment(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    area = request.match_info["area"]
    if area not in node.tree:
        return _unknown_area(area)
    seg = request.app[HLS].get(area)
    found = seg.segment(int(request.match_info["seq"])) if seg is not None else None
    if found is None:
        return error_response(404, "không có đoạn này (đã hết hạn?) / unknown or expired segment")
    max_age = int(request.app[HLS].settings.segment_seconds * (seg.settings.window + 1)) \
        if seg is not None else 0
    return web.Response(body=found.data, headers={
        "Content-Type": SEGMENT_TYPE, "Cache-Control": f"public, max-age={max_age}",
        "Access-Control-Allow-Origin": "*"})


def setup(app: web.Application) -> None:
    """Register routes and start/stop hooks. The node is app[NODE] (started)."""
    node = app[NODE]
    settings = node.cfg.hls
    if not settings.enabled:
        return
    service = HlsService(node.hub, settings)
    app[HLS] = service
    app.router.add_get(r"/streams/{area}/index.m3u8", playlist)
    app.router.add_get(r"/streams/{area}/{seq:\d{1,18}}.ts", segment)

    async def close(_app: web.Application) -> None:
        service.close()

    app.on_cleanup.append(close)


# ---- benchmark: `python -m loa.web.streams_hls [--clients N] [--seconds S]` ---------------------
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
    from loa.web.app import Node, create_app
    from loa.web.config import load_config
    from loa.web.streams_hls import HLS as hls_key  # this module may run as __main__

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, env={}, data=str(Path(tmp) / "data"))
        node = Node(cfg, realtime=False)
        with contextlib.redirect_stdout(sys.stderr):  # the bootstrap password is not the result
            await node.start()
        app = create_app(node)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        area = node.tree.roots()[0].code
        seg = app[hls_key].touch(area)
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
        await runner.cleanup()
        await node.stop()
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
    import json

    ap = argparse.ArgumentParser(description="HLS serving cost (server CPU per request)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(_bench(a.clients, a.seconds))))
