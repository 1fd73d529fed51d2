"""`loa bench ingest --sources N [--seconds S]`: what encoders pushing to the node cost it.

A real node runs in this process (real media clock, HTTP on 127.0.0.1) with N mounts bound to
its root area. A child process plays N encoders: one Icecast `SOURCE` connection each, sending an
MP3 file (48 kHz mono, 64 kbit/s CBR: 192-byte frames of 24 ms, no padding) frame by frame on
absolute deadlines, as a real-time encoder does. Mount 0 (class priority: it holds the air)
carries silence with a 1 kHz burst every second; the others a tone (class normal: decoded and
buffered, not heard).

- `cpu_per_ingest_percent`: the node process's CPU (every thread: decoders, event loop, media
  clock) over S seconds with N encoders pushing, less the same node idle over S seconds, per
  encoder, in percent of one core; `ingests_per_core` follows from it.
- `push_to_air_ms` p50 / p99: from the moment the encoder child sent the MP3 frame that carries a
  burst's first sample (frame (sample + 576) / 1152 of bare frames) until that sample
  is in the area's mix, the instant every transport encodes it (media time of the sample mapped
  to the wall clock). It holds the pipe, the decoder (MP3's own look-ahead), the mount's jitter
  buffer (`[ingest] buffer_ms`, reported) and the wait for the next 20 ms tick.

One JSON object goes to stdout. Goals: 100 ingests per core; push-to-air within 150 ms plus the
jitter buffer.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

FRAME_BYTES = 192  # MPEG-1 layer III, 64 kbit/s at 48 kHz: 144 * 64000 / 48000, never padded
FRAME_S = 1152 / 48_000
LAME_DELAY = 576  # samples before the input's first sample in the bitstream
BURST_EVERY = 1.0
BURST_FROM = 2.0
PASSWORD = "bench-ingest-secret"


def _encode(path: Path, source: str, seconds: float) -> None:
    """Bare MP3 frames (no ID3 tag, no Info frame): frame j is bytes 192 j to 192 (j + 1)."""
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"{source}:d={seconds}:s=48000" if source.startswith("aevalsrc")
                    else f"{source}:duration={seconds}:sample_rate=48000",
                    "-ac", "1", "-c:a", "libmp3lame", "-b:a", "64k", "-id3v2_version", "0",
                    "-write_xing", "0", str(path)], check=True)


# ---- the encoders (child process) ----------------------------------------------------------------
async def _pusher(port: int, n: int, data: list[bytes], seconds: float) -> dict[str, Any]:
    """N SOURCE connections sending their file in real time; the send time of mount 0's frames."""
    auth = base64.b64encode(f"source:{PASSWORD}".encode()).decode()
    sent: list[float] = []
    loop = asyncio.get_running_loop()

    async def one(i: int, t0: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"SOURCE /ingest/m{i} HTTP/1.0\r\nAuthorization: Basic {auth}\r\n"
                     f"Content-Type: audio/mpeg\r\nIce-Name: bench {i}\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(head.decode(errors="replace"))
        body = data[0] if i == 0 else data[1]
        frames = int(seconds / FRAME_S)
        start = loop.time()
        for j in range(min(frames, len(body) // FRAME_BYTES)):
            await asyncio.sleep(max(0.0, start + j * FRAME_S - loop.time()))
            writer.write(body[j * FRAME_BYTES:(j + 1) * FRAME_BYTES])
            if i == 0:
                sent.append(time.time())
        writer.close()

    t0 = loop.time()
    await asyncio.gather(*(one(i, t0) for i in range(n)))
    return {"sent": sent}


# ---- the node (this process) -----------------------------------------------------------------
def _onsets(frames: list[tuple[int, np.ndarray]]) -> list[int]:
    """Media samples where a burst starts: over 0.1 after at least 0.3 s under it."""
    out: list[int] = []
    last_loud = -10**12
    for pts, f in frames:
        loud = np.flatnonzero(np.abs(f) > 0.1)
        if loud.size:
            if pts + int(loud[0]) - last_loud > 0.3 * 48_000:
                out.append(pts + int(loud[0]))
            last_loud = pts + int(loud[-1])
    return out


def _pct(xs: list[float], p: float) -> float | None:
    return round(float(np.percentile(xs, p)), 1) if xs else None


async def bench(sources: int, seconds: float) -> dict[str, Any]:
    from loa.relay.devices.records import new_id, secret_hash
    from loa.web.config import load_config
    from loa.web.testing import start_node

    with tempfile.TemporaryDirectory(prefix="loa-bench-ingest-") as tmp:
        length = seconds + 15
        await asyncio.to_thread(
            _encode, Path(tmp) / "burst.mp3",
            f"aevalsrc='if(gte(t,{BURST_FROM:g})*lt(mod(t,{BURST_EVERY:g}),0.05),"
            "0.5*sin(2*PI*1000*t),0)'", length)
        await asyncio.to_thread(_encode, Path(tmp) / "tone.mp3", "sine=frequency=440", length)
        cfg = load_config(None, env={}, data=str(Path(tmp) / "data"))
        cfg.ingest.max_connections = max(cfg.ingest.max_connections, sources)
        with contextlib.redirect_stdout(sys.stderr):  # the bootstrap admin line is not JSON
            live = await start_node(cfg, backlog=1024, access_log=None)
        node = live.node
        root = node.tree.roots()[0].code
        try:
            for i in range(sources):
                await node.store.create("mount", {
                    "id": new_id(), "name": f"m{i}", "area": root, "title": f"m{i}",
                    "class": "priority" if i == 0 else "normal", "targets": [root],
                    "user": "source", "secret_hash": secret_hash(PASSWORD), "owner": "bench",
                    "created": time.time()})
            t_idle = time.process_time()
            await asyncio.sleep(seconds)
            idle_cpu = time.process_time() - t_idle
            frames: list[tuple[int, np.ndarray]] = []
            sub = node.hub.subscribe(root, "pcm", maxlen=100_000)

            def keep(packets: list[Any]) -> None:
                frames.extend((p.pts, np.frombuffer(p.data, np.float32)) for p in packets)

            sub.on_packets = keep
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loa.web.bench.ingest", "--push", str(live.port),
                "--sources", str(sources), "--seconds", str(seconds + 4),
                str(Path(tmp) / "burst.mp3"), str(Path(tmp) / "tone.mp3"),
                stdout=asyncio.subprocess.PIPE)
            for _ in range(1200):  # at most a minute for every encoder to connect
                if node.ingests.connected() >= sources:
                    break
                await asyncio.sleep(0.05)
            connected = node.ingests.connected()
            await asyncio.sleep(2.0)  # buffers filled, broadcasts on air
            t_busy = time.process_time()
            w_busy = time.monotonic()
            await asyncio.sleep(seconds)
            busy_cpu = time.process_time() - t_busy
            busy_wall = time.monotonic() - w_busy
            out, _ = await child.communicate()
            sub.close()
            sent = json.loads(out or b"{}").get("sent", [])
            epoch = node.station.media_epoch
            lat: list[float] = []
            for onset in _onsets(frames):
                heard = epoch + onset / 48_000
                # the burst it is: the latest whose frame was sent before it was heard
                for b in range(int(seconds + 6), -1, -1):
                    k = int((BURST_FROM + b * BURST_EVERY) * 48_000)
                    j = (k + LAME_DELAY) // 1152
                    if j < len(sent) and sent[j] <= heard:
                        lat.append((heard - sent[j]) * 1000)
                        break
            per = (busy_cpu * seconds / busy_wall - idle_cpu) / max(sources, 1) / seconds
            return {
                "bench": "ingest", "sources": sources, "connected": connected,
                "seconds": seconds, "format": "mp3 64 kbit/s 48 kHz mono, SOURCE",
                "node_cpu_idle_percent": round(100 * idle_cpu / seconds, 2),
                "node_cpu_busy_percent": round(100 * busy_cpu / busy_wall, 2),
                "cpu_per_ingest_percent": round(100 * per, 3),
                "ingests_per_core": int(1 / per) if per > 0 else None,
                "push_to_air_ms": {"p50": _pct(lat, 50), "p99": _pct(lat, 99),
                                   "max": round(max(lat), 1) if lat else None,
                                   "bursts": len(lat)},
                "jitter_buffer_ms": cfg.ingest.buffer_ms,
                "late_ticks": node.clock.stats.as_dict() if node.clock else None,
            }
        finally:
            await live.stop()


def run(args: argparse.Namespace) -> int:
    print(json.dumps(asyncio.run(bench(args.sources, args.seconds))))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loa.web.bench.ingest")
    ap.add_argument("--sources", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--push", type=int, default=0, help="(child) push to this port")
    ap.add_argument("files", nargs="*")
    args = ap.parse_args(argv)
    if args.push:
        data = [Path(f).read_bytes() for f in args.files]
        print(json.dumps(asyncio.run(_pusher(args.push, args.sources, data, args.seconds))))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
