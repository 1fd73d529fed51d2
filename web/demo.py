"""`loa demo`: a complete node on a sample province, with generated audio, on the real clock.

The data directory (a fresh temporary one unless --data is given) gets the sample area tree
(province T01, districts T01-H1/T01-H2, communes T01-H1-X1 ... T01-H2-X3) and demo users. Every
commune plays its own background music; district bulletins (a chime, then speech from espeak-ng's
Vietnamese voice, tones when it is missing) preempt it and the music resumes where it stopped.
Every on-air change is a log line; the URLs of every stream are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import tempfile
import wave
from pathlib import Path

import aiohttp
import numpy as np

from loa.streamer.clock import SAMPLE_RATE
from loa.streamer.messages import say
from loa.streamer.sources import Playlist, Source, ToneSource, chime_pcm
from loa.streamer.state.store import Record
from loa.streamer.station import Content
from loa.streamer.tts import TtsError
from loa.web.auth import add_user
from loa.web.config import Config, load_config
from loa.web.node import Node
from loa.web.testing import start_node

log = logging.getLogger("loa.demo")

SAMPLE_CSV = """code,name,level,parent_code
T01,Tỉnh Mẫu,province,
T01-H1,Huyện Một,district,T01
T01-H1-X1,Xã Một A,commune,T01-H1
T01-H1-X2,Xã Một B,commune,T01-H1
T01-H1-X3,Xã Một C,commune,T01-H1
T01-H2,Huyện Hai,district,T01
T01-H2-X1,Xã Hai A,commune,T01-H2
T01-H2-X2,Xã Hai B,commune,T01-H2
T01-H2-X3,Xã Hai C,commune,T01-H2
"""

DEMO_PASSWORD = "loa-demo-2026"
DEMO_USERS = [  # username, role, area, emergency right
    ("tinh", "operator", "T01", True),
    ("huyen1", "operator", "T01-H1", False),
    ("duyet1", "approver", "T01-H1", False),
    ("xa11", "operator", "T01-H1-X1", False),
    ("bientap11", "editor", "T01-H1-X1", False),
    ("quantri", "admin", "T01", True),  # registers the demo's simulated devices
]
DEMO_SPEAKERS, DEMO_BOARDS, DEMO_DECODERS = 20, 2, 1

BULLETINS = {
    "T01-H1": "Thông báo của Ủy ban nhân dân huyện Một. Đề nghị bà con chủ động phòng chống "
              "mưa bão, gia cố nhà cửa và theo dõi bản tin thời tiết.",
    "T01-H2": "Thông báo của huyện Hai. Lịch tiêm phòng cho trẻ em sẽ diễn ra vào sáng thứ bảy "
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


def write_wav(path: Path, pcm: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return path


async def _media(node: Node, pcm: np.ndarray, title: str, area: str) -> Record:
    tmp = node.library.temp_path(".wav")
    await asyncio.to_thread(write_wav, tmp, pcm)
    return await node.library.ingest(tmp, title=title, area=area, owner="demo")


async def _speech(node: Node, district: str) -> Source:
    try:
        media = await node.speech.media_for(BULLETINS[district], area=district, owner="demo")
        return node.library.source(media)
    except TtsError:
        log.warning("espeak-ng not installed event=tts_fallback: tones stand in for speech")
        return Playlist([ToneSource(600, 0.3, seconds=1.5), ToneSource(800, 0.3, seconds=1.5)])


class FleetLines(logging.Filter):
    """The demo's simulated fleet connects all at once and leaves all at once: instead of two
    log lines per device (connected, online; disconnected, offline), one summary line each way.
    Connections and losses in between, and every fault, are logged as usual."""

    ARRIVING = ("event=device_connect ", "online")
    LEAVING = ("event=device_disconnect ", "offline")

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected
        self.seen: set[object] = set()
        self.phase: tuple[str, str] | None = self.ARRIVING

    def leaving(self) -> None:
        self.phase, self.seen = self.LEAVING, set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.phase is None or not isinstance(record.args, tuple):
            return True
        event, status = self.phase
        if event in record.msg:
            self.seen.add(record.args[0])
            if len(self.seen) == self.expected:
                arrived = self.phase == self.ARRIVING
                print(say("demo.fleet_connected", n=self.expected) if arrived
                      else say("demo.fleet_disconnected", n=self.expected), flush=True)
                self.phase = None  # later comings and goings are logged as usual
            return False
        # args of device_status: device, status, previous, reason
        return not ("event=device_status " in record.msg and record.args[1:2] == (status,))


def demo_config(args: argparse.Namespace) -> Config:
    data = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="loa-demo-"))
    data.mkdir(parents=True, exist_ok=True)
    csv = data / "areas.csv"
    csv.write_text(SAMPLE_CSV, encoding="utf-8")
    cfg = load_config(args.config, http=args.http, data=str(data))
    cfg.areas.csv = str(csv)
    cfg.rtp.enabled = True  # on this host only: loopback interface, TTL 0
    cfg.rtp.interface = "127.0.0.1"
    cfg.rtp.ttl = 0
    return cfg


async def _demo(args: argparse.Namespace) -> None:
    from loa.streamer.log import setup_logging

    cfg = demo_config(args)
    setup_logging(cfg.log.level, cfg.log.format)
    async def prepare(node: Node) -> None:
        for name, role, area, emergency in DEMO_USERS:
            if not await node.store.find("user", username=name):
                await add_user(node.store, node.tree, name, role, area, DEMO_PASSWORD,
                               emergency)

    base = f"http://{cfg.server.http}"
    # the console and its logins first: what a visitor opens; the node's own lines follow
    print(f"{say('demo.console', url=f'{base}/')}  ({say('demo.ctrl_c')})")
    print(f"  {say('demo.users')} ({say('demo.password', password=DEMO_PASSWORD)}): "
          + ", ".join(f"{u} ({r} {a})" for u, r, a, _ in DEMO_USERS), flush=True)
    fleet_lines = FleetLines(DEMO_SPEAKERS + DEMO_BOARDS)
    logging.getLogger("loa.devices").addFilter(fleet_lines)
    # the simulated devices' own side (loa sim prints a fleet summary line instead)
    logging.getLogger("loa.device").setLevel(logging.WARNING)

    host, _, port = cfg.server.http.rpartition(":")
    live = await start_node(cfg, prepare=prepare, host=host or "127.0.0.1", port=int(port),
                            header_timeout=True)
    node = live.node

    communes = [a.code for a in node.tree if a.level == "commune"]
    for i, code in enumerate(communes):
        media = await _media(node, music_pcm(196.0 * 2 ** (i / 12)), f"Nhạc nền {code}", code)
        src = Playlist([node.library.source(media, 0.8)], repeat=1000)
        await node.station.air(Content(src, f"Nhạc nền {code}", None), targets=[code],
                               klass="background", issuer=code, user="demo",
                               spec={"media": media["id"]})
    chime = await _media(node, chime_pcm(), "Chuông báo", "T01")
    bulletins = {d: Playlist([node.library.source(chime), await _speech(node, d)], gap=0.3)
                 for d in BULLETINS}

    async def district_bulletins() -> None:
        loop = asyncio.get_running_loop()
        start, period = loop.time(), 45.0
        k = 0
        while True:
            for district, offset in (("T01-H1", 5.0), ("T01-H2", 20.0)):
                await asyncio.sleep(max(0.0, start + k * period + offset - loop.time()))
                b = bulletins[district]
                await node.station.air(Content(b.at(0), f"Bản tin {district}",
                                               (b.length or 0) / SAMPLE_RATE),
                                       targets=[district], klass="normal", issuer=district,
                                       user="demo")
            k += 1

    task = asyncio.create_task(district_bulletins())

    # A small simulated fleet in this process: loudspeakers and boards connect, heartbeat and
    # take commands like real devices (one of them also decodes its commune's stream).
    from loa.relay.agent.sim import run_fleet

    local = base.replace("://0.0.0.0:", "://127.0.0.1:")
    async with aiohttp.ClientSession() as http, http.post(
            f"{local}/api/v1/auth/token",
            json={"username": "quantri", "password": DEMO_PASSWORD}) as r:
        token = (await r.json())["token"]
    fleet_stop = asyncio.Event()
    fleet = asyncio.create_task(run_fleet(
        local, token, DEMO_SPEAKERS, DEMO_BOARDS, DEMO_DECODERS, "T01", fleet_stop,
        fleet_file=cfg.data_dir / "loa-sim-fleet.json", status_every=60.0))
    print(f"\n  {say('demo.data_dir', path=cfg.data_dir)}")
    print(f"  {say('demo.monitor', url=f'{base}/monitor')}   "
          f"{say('demo.health', url=f'{base}/healthz')}")
    print(f"  {say('demo.devices', speakers=DEMO_SPEAKERS, boards=DEMO_BOARDS)} "
          f"({base}/api/v1/devices)")
    print(f"  {say('demo.streams')}:")
    for a in node.tree:
        print(f"    {a.code:<10} {a.name:<12} {base}/streams/{a.code}.mp3  .opus  .sdp  "
              f"{base}/streams/{a.code}/index.m3u8  WHEP: POST {base}/whep/{a.code}")
    print(flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), timeout=args.seconds)
    except TimeoutError:
        pass
    task.cancel()
    fleet_lines.leaving()
    fleet_stop.set()
    await fleet  # every simulated device disconnects before the server stops
    await live.stop()


def run_demo(args: argparse.Namespace) -> int:
    asyncio.run(_demo(args))
    return 0
