"""`loa bench archive --areas N [--seconds S]`: what recording an area costs.

The archive's recorders (relay/archive.py) are fed the way the engine feeds them: N areas, each
a hub channel receiving one real 20 ms Opus packet (32 kbit/s, libopus) per area per tick, for S
seconds of audio, delivered back to back (not paced: the figure is CPU per second of audio); the
writer flushes once per second of audio, as it does on the real clock, to files under a temporary
directory. Figures: process CPU (the paging on the loop and the writer thread both count) per
area per second of audio, as a share of one core (goal: at most 0.1 %), and bytes written per
area per hour. One JSON object goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from loa.codecs.encoders import Packet
from loa.codecs.opus import Opus
from loa.relay.archive import Archive, ArchiveSettings
from loa.streamer.alerts import Alerts
from loa.streamer.areas import AreaTree
from loa.streamer.areasettings import AreaSettings
from loa.streamer.hub import PacketHub
from loa.streamer.state.open import open_store
from loa.web.bench.errors import BenchError

FRAME = 960


def _packets(seconds: float) -> list[bytes]:
    """One second of a 440 Hz tone with a little noise, encoded as a stream does."""
    enc = Opus(32000, 5)
    t = np.arange(int(seconds * 48000)) / 48000
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * np.random.default_rng(1).standard_normal(
        t.size)).astype(np.float32)
    return [enc.encode(pcm[i:i + FRAME]) for i in range(0, pcm.size - FRAME + 1, FRAME)]


async def measure(areas: int, seconds: float, root: Path) -> dict[str, Any]:
    tree = AreaTree()
    tree.add("BA", "Tỉnh đo", "province")
    for i in range(areas):
        tree.add(f"BA-X{i}", f"Xã {i}", "commune", "BA")
    store = await open_store("sqlite", root)
    settings = AreaSettings(store, tree)
    await settings.load()
    await settings.put("BA", "archive", {"enabled": True, "retention_days": 30})
    hub = PacketHub()
    hub.loop = asyncio.get_running_loop()
    archive = Archive(ArchiveSettings(dir=str(root / "archive")), root / "archive", hub, tree,
                      settings, lambda pts: 1.9e9 + pts / 48000, Alerts())
    await archive.start()
    codes = [f"BA-X{i}" for i in range(areas)]
    if len(archive.recorders) != areas + 1:
        raise BenchError(f"{len(archive.recorders)} recorders for {areas + 1} areas")
    data = _packets(1.0)
    channels = [hub.channel(c, "opus") for c in codes]
    ticks = int(seconds * 50)
    cpu0, wall0 = time.process_time(), time.monotonic()
    for n in range(ticks):
        pkt = Packet("opus", n * FRAME, FRAME, data[n % len(data)], 48000)
        for ch in channels:
            ch.deliver([pkt])
        if n % 50 == 49:
            await archive.flush()  # once per second of audio, as on the real clock
    await archive.flush()
    cpu = time.process_time() - cpu0
    wall = time.monotonic() - wall0
    written = archive.stats["bytes"]
    await archive.stop()
    await store.close()
    per_area = cpu / areas / seconds
    return {"bench": "archive", "areas": areas, "audio_seconds": seconds, "cpu_s": round(cpu, 3),
            "wall_s": round(wall, 3),
            "cpu_per_area_share_of_core": round(per_area, 6),
            "cpu_per_area_percent": round(per_area * 100, 4),
            "goal_percent": 0.1,
            "bytes_per_area_hour": int(written / areas / seconds * 3600),
            "areas_per_core": int(1 / per_area) if per_area else None}


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="loa-bench-archive-") as tmp:
        out = asyncio.run(measure(args.areas, args.seconds, Path(tmp)))
    print(json.dumps(out))
    return 0
