"""`loa bench fanout --transport webrtc`: what a WHEP listener costs the server, and WHIP->WHEP
latency.

The server is a real node in this process (real media clock, HTTP on 127.0.0.1, an Opus tone on
air in one commune). The listeners are N aiortc peers in a separate process (they are heavy): each
POSTs a WHEP offer and counts the RTP packets it receives without decoding them (aiortc's RTP
receive hook is replaced by a counter). Server CPU (all its threads) is measured over `--seconds`
while every peer receives; the baseline (the same node with the same stream encoded for a
subscriber but no peer) is measured first, so the per-listener cost is the difference.

With `--listeners 1` (or 0) the child also publishes over WHIP: silence with a 200 ms tone burst
every 600 ms, and its WHEP listener decodes each packet as it arrives and notes the burst onsets;
`whip_to_whep_ms` is the time from the publisher handing the onset frame to aiortc to the arrival
of the first packet that carries it (p50/p99). Both ends are in the child process, on loopback, on
the same monotonic clock. aiortc's receive jitter buffer at the listener is bypassed: a browser's
own jitter buffer comes on top of this figure.

`--workers W` overrides `[webrtc] workers` (0: the peers in the node's process). CPU is split:
`node_cpu_*` is the node's own process (the media clock's), `worker_cpu_fraction` the WHEP
workers' (from /proc), `server_cpu_*` both; the media clock figures (`server_clock_*`: late and
skipped ticks, max lateness; `server_loop_lag_max_ms`) cover the measured window and, with the
suffix `_setup`, the connection of the peers before it.

Only one JSON object goes to stdout; diagnostics go to stderr. `LOA_WEBRTC_DIRECT_SEND=0` in the
environment measures aiortc's stock send path instead of the direct one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

AREAS_CSV = "code,name,level,parent_code\nP01,Tỉnh,province,\nP01-X1,Xã 1,commune,P01\n"
AREA = "P01-X1"
BASELINE_SECONDS = 3.0
SETTLE_SECONDS = 1.0
CONNECT_CONCURRENCY = 8
BURST_PERIOD = 30  # frames (600 ms)
BURST_FRAMES = 10  # 200 ms of tone
BURST_LEVEL = 0.05  # onset: a decoded packet's peak above this after silence
SILENT_LEVEL = 0.01


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the server side (this process) -------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    listeners = int(args.listeners)
    seconds = float(args.seconds)
    if listeners < 0 or seconds <= 0:
        log("listeners must be >= 0 and seconds > 0")
        return 2
    result = asyncio.run(_server(listeners, seconds, getattr(args, "workers", None)))
    print(json.dumps(result), flush=True)
    return 0 if result.get("connected", 0) >= max(1, listeners) else 1


async def _server(listeners: int, seconds: float, workers: int | None) -> dict[str, Any]:
    from aiohttp import ClientSession

    from loa.streamer.broadcast import Broadcast
    from loa.streamer.sources import ToneSource
    from loa.web.auth import add_user
    from loa.web.config import load_config
    from loa.web.node import Node
    from loa.web.testing import start_node

    latency = listeners <= 1
    with tempfile.TemporaryDirectory(prefix="loa-bench-webrtc-") as tmp:
        csv = Path(tmp) / "areas.csv"
        csv.write_text(AREAS_CSV, encoding="utf-8")
        cfg = load_config(None, data=str(Path(tmp) / "data"))
        cfg.areas.csv = str(csv)
        cfg.webrtc.ice_addresses = "127.0.0.1"
        cfg.webrtc.stun_server = ""
        cfg.webrtc.max_peers = max(cfg.webrtc.max_peers, listeners + 10)
        cfg.webrtc.whep_burst = max(cfg.webrtc.whep_burst, listeners + 10)  # one address
        cfg.webrtc.max_peers_per_area = max(cfg.webrtc.max_peers_per_area, listeners + 10)
        cfg.webrtc.connect_timeout = max(cfg.webrtc.connect_timeout, 120.0)
        if workers is not None:
            cfg.webrtc.workers = workers
        password = secrets.token_urlsafe(12)

        async def prepare(node: Node) -> None:
            await add_user(node.store, node.tree, "bench", "operator", "P01", password)
            if not latency:
                node.engine.start(Broadcast(ToneSource(440, 0.3), ["P01"], issuer="P01"))

        with contextlib.redirect_stdout(sys.stderr):  # the bootstrap admin notice: not JSON
            live = await start_node(cfg, prepare=prepare, access_log=None)
        node, url = live.node, live.url
        # The stream is encoded for a subscriber in both phases: the difference is the peers.
        keep = node.hub.subscribe(AREA, "opus", maxlen=10)
        keep.on_packets = lambda packets: None
        loop = asyncio.get_running_loop()
        workers_cpu = _workers_cpu(node)
        try:
            await asyncio.sleep(SETTLE_SECONDS)
            w0 = workers_cpu()
            base_cpu = await _cpu_over(BASELINE_SECONDS)
            base_workers = (workers_cpu() - w0) / BASELINE_SECONDS
            clock0 = _ticks(node)
            node.lag.max_ms = 0.0
            async with ClientSession() as http, http.post(
                    f"{url}/api/v1/auth/token",
                    json={"username": "bench", "password": password}) as r:
                token = (await r.json())["token"]
            env = {**os.environ, "LOA_BENCH_TOKEN": token}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loa.web.bench.webrtc", "--child", url, AREA,
                str(max(1, listeners)), str(seconds), "1" if latency else "0",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
            assert proc.stdin is not None and proc.stdout is not None
            ready = (await proc.stdout.readline()).decode().strip()
            if not ready.startswith("READY"):
                raise RuntimeError(f"listener process failed: {ready!r}")
            log(f"bench: {ready}")
            await asyncio.sleep(SETTLE_SECONDS)
            relay_stats = _relay_counters(node)
            clock_before = node.clock.stats.max_lateness_ms if node.clock else 0.0
            clock1 = _ticks(node)
            lag_setup = node.lag.max_ms
            node.lag.max_ms = 0.0
            if node.clock:
                node.clock.stats.max_lateness_ms = 0.0
            proc.stdin.write(b"GO\n")
            await proc.stdin.drain()
            cpu0, t0, wcpu0 = time.process_time(), loop.time(), workers_cpu()
            await asyncio.sleep(max(0.0, t0 + seconds - loop.time()))
            cpu1, t1, wcpu1 = time.process_time(), loop.time(), workers_cpu()
            clock2 = _ticks(node)
            line = (await proc.stdout.readline()).decode().strip()
            child = json.loads(line) if line.startswith("{") else {}
            proc.stdin.close()
            await proc.wait()
            dropped = relay_stats()
            clock_max = node.clock.stats.max_lateness_ms if node.clock else 0.0
        finally:
            keep.close()
            await live.stop()
    frac = (cpu1 - cpu0) / (t1 - t0)
    wfrac = (wcpu1 - wcpu0) / (t1 - t0)
    connected = int(child.get("connected", 0))
    node_per = (frac - base_cpu) / connected if connected else None
    per = (frac + wfrac - base_cpu - base_workers) / connected if connected else None
    expected = connected * seconds * 50
    out: dict[str, Any] = {
        "transport": "webrtc",
        "path": "direct" if cfg.webrtc.direct_send else "stock",
        "listeners": listeners,
        "workers": cfg.webrtc.workers,
        "connected": connected,
        "seconds": seconds,
        "node_cpu_fraction": round(frac, 4),
        "node_cpu_per_listener": None if node_per is None else round(node_per, 6),
        "worker_cpu_fraction": round(wfrac, 4),
        "server_cpu_fraction": round(frac + wfrac, 4),
        "baseline_cpu_fraction": round(base_cpu + base_workers, 4),
        "server_cpu_per_listener": None if per is None else round(per, 6),
        "peers_per_core": None if not per or per <= 0 else round(1.0 / per, 1),
        "delivered_ratio": round(child.get("received", 0) / expected, 4) if expected else 0.0,
        "max_lateness_ms": child.get("max_lateness_ms"),
        "p99_lateness_ms": child.get("p99_lateness_ms"),
        "server_clock_max_lateness_ms": round(max(clock_max, 0.0), 2),
        "server_clock_max_lateness_ms_setup": round(clock_before, 2),
        "server_clock_late_ticks": clock2[0] - clock1[0],
        "server_clock_skipped_ticks": clock2[1] - clock1[1],
        "server_clock_late_ticks_setup": clock1[0] - clock0[0],
        "server_clock_skipped_ticks_setup": clock1[1] - clock0[1],
        "server_loop_lag_max_ms": round(node.lag.max_ms, 2),
        "server_loop_lag_max_ms_setup": round(lag_setup, 2),
        "server_dropped_packets": dropped,
        "child_cpu_fraction": child.get("cpu_fraction"),
    }
    if latency:
        out["whip_to_whep_ms"] = child.get("whip_to_whep_ms")
        out["cpu_includes_whip_input"] = True  # per-listener figures: use --listeners >= 10
        out["whip_target_ms"] = cfg.webrtc.whip_target_ms
    return out


def _relay_counters(node: Any) -> Any:
    relay = node.webrtc

    def dropped() -> int:
        return sum(s.dropped for s in relay.whep.values())

    return dropped


def _workers_cpu(node: Any) -> Any:
    """CPU seconds of the WHEP worker processes (those alive now)."""
    from loa.web.bench.http import proc_cpu_seconds

    pool = node.webrtc.pool

    def cpu() -> float:
        return sum(proc_cpu_seconds(pid) for pid in (pool.worker_pids() if pool else []))

    return cpu


def _ticks(node: Any) -> tuple[int, int]:
    """The media clock's late and skipped ticks so far."""
    st = node.clock.stats if node.clock else None
    return (st.late_ticks, st.skipped_ticks) if st else (0, 0)


async def _cpu_over(seconds: float) -> float:
    loop = asyncio.get_running_loop()
    cpu0, t0 = time.process_time(), loop.time()
    await asyncio.sleep(seconds)
    return (time.process_time() - cpu0) / (loop.time() - t0)


# ---- the listeners (child process) --------------------------------------------------------------
@dataclass
class PeerStat:
    counting: bool = False
    received: int = 0
    min_offset: float | None = None
    lateness: list[float] = field(default_factory=list)
    decoder: Any = None
    in_burst: bool = False
    quiet: int = 0
    onsets: list[float] = field(default_factory=list)
    last_ts: int | None = None
    ext_ts: int = 0

    def on_packet(self, ts: int, payload: bytes) -> None:
        now = time.monotonic()
        if self.decoder is not None:
            self._detect(now, payload)
        if not self.counting:
            return
        self.received += 1
        if self.last_ts is None:
            self.ext_ts = 0
        else:  # RTP timestamps wrap at 2^32 (their origin is random)
            self.ext_ts += (ts - self.last_ts + 2**31) % 2**32 - 2**31
        self.last_ts = ts
        offset = now - self.ext_ts / 48_000
        if self.min_offset is None or offset < self.min_offset:
            self.min_offset = offset
        self.lateness.append(offset)

    def _detect(self, now: float, payload: bytes) -> None:
        import av

        peak = 0.0
        for f in self.decoder.decode(av.Packet(payload)):
            a = f.to_ndarray()
            peak = max(peak, float(np.max(np.abs(a))) / (32768 if a.dtype == np.int16 else 1))
        if not self.in_burst and peak > BURST_LEVEL:
            self.in_burst = True
            self.quiet = 0
            self.onsets.append(now)
        elif self.in_burst:
            self.quiet = self.quiet + 1 if peak < SILENT_LEVEL else 0
            if self.quiet >= 5:
                self.in_burst = False


def _child(argv: list[str]) -> int:
    url, area, n, seconds, latency = argv[0], argv[1], int(argv[2]), float(argv[3]), argv[4] == "1"
    return asyncio.run(_listen(url, area, n, seconds, latency))


async def _listen(url: str, area: str, n: int, seconds: float, latency: bool) -> int:
    import fractions

    import aiohttp
    import av
    from aiortc import (
        RTCConfiguration,
        RTCPeerConnection,
        RTCRtpReceiver,
        RTCSessionDescription,
    )
    from aiortc.mediastreams import MediaStreamTrack

    from loa.relay.webrtc import use_host_addresses

    use_host_addresses(["127.0.0.1"])
    no_stun = RTCConfiguration(iceServers=[])
    sdp = {"Content-Type": "application/sdp"}
    original = RTCRtpReceiver._handle_rtp_packet

    async def counting(self: Any, packet: Any, arrival_time_ms: int) -> None:
        st: PeerStat | None = getattr(self, "_loa_stat", None)
        if st is None:
            await original(self, packet, arrival_time_ms)
            return
        st.on_packet(packet.timestamp, packet.payload)

    RTCRtpReceiver._handle_rtp_packet = counting  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    peers: list[tuple[Any, PeerStat]] = []
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async with aiohttp.ClientSession() as http:
        async def one(decode: bool) -> None:
            async with sem:
                pc = RTCPeerConnection(no_stun)
                tr = pc.addTransceiver("audio", direction="recvonly")
                st = PeerStat()
                if decode:
                    st.decoder = av.CodecContext.create("libopus", "r")
                tr.receiver._loa_stat = st  # type: ignore[attr-defined]
                await pc.setLocalDescription(await pc.createOffer())
                async with http.post(f"{url}/whep/{area}", data=pc.localDescription.sdp,
                                     headers=sdp) as r:
                    body = await r.text()
                    if r.status != 201:
                        log(f"whep refused: {r.status} {body}")
                        await pc.close()
                        return
                await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
                peers.append((pc, st))

        await asyncio.gather(*(one(latency) for _ in range(n)))
        all_up = asyncio.Event()

        def check() -> None:
            if all(pc.connectionState == "connected" for pc, _ in peers):
                all_up.set()

        for pc, _ in peers:
            pc.on("connectionstatechange", check)
        check()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_up.wait(), 60)
        connected = sum(pc.connectionState == "connected" for pc, _ in peers)

        publisher: Any = None
        sent_onsets: list[float] = []
        if latency:
            class Bursts(MediaStreamTrack):
                kind = "audio"

                def __init__(self) -> None:
                    super().__init__()
                    self.n = 0
                    self.t0: float | None = None

                async def recv(self) -> av.AudioFrame:
                    if self.t0 is None:
                        self.t0 = loop.time()
                    await asyncio.sleep(max(0.0, self.t0 + self.n * 0.02 - loop.time()))
                    phase = self.n % BURST_PERIOD
                    pcm = np.zeros(960, dtype=np.int16)
                    if phase < BURST_FRAMES:
                        idx = np.arange(self.n * 960, (self.n + 1) * 960)
                        pcm = (0.4 * 32767 * np.sin(2 * np.pi * 1000 * idx / 48_000)
                               ).astype(np.int16)
                    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16",
                                                       layout="mono")
                    frame.sample_rate = 48_000
                    frame.pts = self.n * 960
                    frame.time_base = fractions.Fraction(1, 48_000)
                    if phase == 0 and self.n > 0:
                        sent_onsets.append(time.monotonic())
                    self.n += 1
                    return frame

            publisher = RTCPeerConnection(no_stun)
            publisher.addTransceiver(Bursts(), direction="sendonly")
            await publisher.setLocalDescription(await publisher.createOffer())
            token = os.environ.get("LOA_BENCH_TOKEN", "")
            async with http.post(f"{url}/whip/P01?title=bench",
                                 data=publisher.localDescription.sdp,
                                 headers={**sdp, "Authorization": f"Bearer {token}"}) as r:
                body = await r.text()
                if r.status != 201:
                    print(f"FAILED whip {r.status} {body}", flush=True)
                    return 1
            await publisher.setRemoteDescription(RTCSessionDescription(body, "answer"))

        print(f"READY connected={connected} of {n}", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        for _, st in peers:
            st.counting = True
        sent_onsets.clear()
        for _, st in peers:
            st.onsets.clear()
        cpu0, t0 = time.process_time(), loop.time()
        await asyncio.sleep(seconds)
        for _, st in peers:
            st.counting = False
        cpu = (time.process_time() - cpu0) / (loop.time() - t0)
        lateness = [(o - st.min_offset) * 1000 for _, st in peers if st.min_offset is not None
                    for o in st.lateness]
        result: dict[str, Any] = {
            "connected": connected,
            "received": sum(st.received for _, st in peers),
            "max_lateness_ms": round(max(lateness), 2) if lateness else None,
            "p99_lateness_ms": round(float(np.percentile(lateness, 99)), 2) if lateness else None,
            "cpu_fraction": round(cpu, 4),
        }
        if latency and peers:
            delays = []
            for rx in peers[0][1].onsets:
                before = [tx for tx in sent_onsets if tx <= rx]
                if before and rx - before[-1] < 0.5:
                    delays.append((rx - before[-1]) * 1000)
            result["whip_to_whep_ms"] = {
                "p50": round(float(np.percentile(delays, 50)), 1) if delays else None,
                "p99": round(float(np.percentile(delays, 99)), 1) if delays else None,
                "min": round(min(delays), 1) if delays else None,
                "max": round(max(delays), 1) if delays else None,
                "bursts": len(delays),
            }
        print(json.dumps(result), flush=True)
        if publisher is not None:
            await publisher.close()
        await asyncio.gather(*(pc.close() for pc, _ in peers), return_exceptions=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2:]))
    sys.exit(2)
