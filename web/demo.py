"""`loa demo`: the engine on a sample province, with generated audio, on the real clock.

Every commune plays its own background music; district bulletins (a chime, then speech from
espeak-ng's Vietnamese voice when installed, tones otherwise) preempt it and the music resumes
where it stopped. Every on-air change is a log line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
from aiohttp import web

from loa.streamer.areas import sample_tree
from loa.streamer.broadcast import Broadcast
from loa.streamer.clock import SAMPLE_RATE, LoopLagMonitor, RealClock
from loa.streamer.engine import Engine
from loa.streamer.hub import PacketHub
from loa.streamer.log import setup_logging
from loa.streamer.sources import PcmSource, Playlist, Source, ToneSource, chime_pcm, load_file
from loa.web.config import load_config

log = logging.getLogger("loa.demo")

BULLETINS = {
    "T01-H1": "Thông báo của Ủy ban nhân dân huyện một. Đề nghị bà con chủ động phòng chống "
              "mưa bão, gia cố nhà cửa và theo dõi bản tin thời tiết.",
    "T01-H2": "Thông báo của huyện hai. Lịch tiêm phòng cho trẻ em sẽ diễn ra vào sáng thứ bảy "
              "tại trạm y tế xã.",
}


def music_pcm(root_hz: float, seconds: float = 32.0) -> np.ndarray:
    """Gentle generated background music: a pentatonic arpeggio over a soft pad."""
    n = int(seconds * SAMPLE_RATE)
    out = np.zeros(n, dtype=np.float64)
    t_note = np.arange(int(0.5 * SAMPLE_RATE)) / SAMPLE_RATE
    env = np.exp(-4.0 * t_note) * np.minimum(1.0, t_note / 0.01)
    scale = [1.0, 9 / 8, 5 / 4, 3 / 2, 5 / 3, 2.0]
    rng = np.random.default_rng(int(root_hz))
    for i in range(int(seconds * 4)):
        f = root_hz * 2 * scale[rng.integers(0, len(scale))]
        start = i * SAMPLE_RATE // 4
        seg = env * np.sin(2 * np.pi * f * t_note) * 0.12
        out[start:start + seg.shape[0]] += seg[: n - start]
    t = np.arange(n) / SAMPLE_RATE
    pad = sum(np.sin(2 * np.pi * root_hz * r * t) for r in (1.0, 5 / 4, 3 / 2)) * 0.03
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.05)
    return ((out + pad) * fade).astype(np.float32)


async def speech(text: str, workdir: Path) -> Source:
    """Vietnamese speech from espeak-ng, or a two-tone stand-in when it is not installed."""
    exe = shutil.which("espeak-ng")
    if exe:
        wav = workdir / f"tts-{abs(hash(text))}.wav"
        proc = await asyncio.create_subprocess_exec(
            exe, "-v", "vi", "-s", "145", "-w", str(wav), text,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        if await proc.wait() == 0:
            return await load_file(wav, gain=0.9)
    log.warning("espeak-ng not installed event=tts_fallback: using tones for speech")
    return Playlist([ToneSource(600, 0.3, seconds=1.5), ToneSource(800, 0.3, seconds=1.5)])


async def _demo(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, http=args.http, data=args.data)
    setup_logging(cfg.log.level, cfg.log.format)
    loop = asyncio.get_running_loop()
    tree = sample_tree()
    hub = PacketHub()
    hub.loop = loop
    engine = Engine(tree, cfg.engine, hub)
    clock = RealClock(engine.tick)
    lag = LoopLagMonitor()
    lag.start()
    workdir = Path(tempfile.mkdtemp(prefix="loa-demo-"))

    communes = [a.code for a in tree if a.level == "commune"]
    for i, code in enumerate(communes):
        music = PcmSource(music_pcm(196.0 * 2 ** (i / 12)), f"nhạc nền {code}")
        engine.start(Broadcast(Playlist([music], repeat=1000), [code], issuer=code,
                               klass="background", gain=0.8, title=f"Nhạc nền {code}"))
    bulletins = {}
    for district, text in BULLETINS.items():
        bulletins[district] = Playlist([PcmSource(chime_pcm(), "chime"), await speech(text, workdir)],
                                       gap=0.3)
    clock.start()

    async def district_bulletins() -> None:
        offsets = {"T01-H1": 5.0, "T01-H2": 20.0}
        period = 45.0
        start = loop.time()
        k = 0
        while True:
            for district, off in offsets.items():
                due = start + k * period + off
                await asyncio.sleep(max(0.0, due - loop.time()))
                engine.start(Broadcast(bulletins[district].at(0), [district], issuer=district,
                                       klass="normal", title=f"Bản tin {district}"))
            k += 1

    async def healthz(_req: web.Request) -> web.Response:
        return web.json_response({
            "status": "ok",
            "media_time": engine.media_time,
            "clock": clock.stats.as_dict(),
            **lag.as_dict(),
            "on_air": [engine.on_air(a.code) for a in tree],
            "mixes": len(engine.mixes),
        })

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = cfg.server.http.rpartition(":")
    site = web.TCPSite(runner, host or "127.0.0.1", int(port))
    await site.start()
    task = asyncio.create_task(district_bulletins())
    print(f"Loa demo đang chạy / running: http://{host}:{port}/healthz  (Ctrl-C để dừng / to stop)",
          flush=True)
    for a in tree:
        print(f"  {a.code:<10} {a.level:<9} {a.name}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), timeout=args.seconds)
    except TimeoutError:
        pass
    task.cancel()
    clock.stop()
    await lag.stop()
    await runner.cleanup()
    shutil.rmtree(workdir, ignore_errors=True)


def run_demo(args: argparse.Namespace) -> int:
    asyncio.run(_demo(args))
    return 0
