"""`loa bench preempt --devices N [--rounds R]`: how fast an emergency reaches every transport.

The server is a real node in this process: real media clock, HTTP on 127.0.0.1, RTP multicast on
loopback (interface 127.0.0.1, TTL 0), WebRTC with ICE on 127.0.0.1, music (440 Hz) on air in
every commune of a small province. N receiving clients are spread over four communes and three
transports, in three child processes (one per transport: the clients must not share the
server's event loop, nor wait behind each other's):

- RTP: sockets joined to the communes' multicast groups, half Opus, half PCMU, decoded (PyAV /
  a G.711 table) as each datagram arrives;
- WebRTC: aiortc WHEP peers; every RTP packet is decoded the moment it arrives (aiortc's own
  jitter buffer is bypassed, as in `loa bench fanout --transport webrtc`: a browser's jitter
  buffer comes on top);
- HTTP: `/streams/A.opus` listeners, Ogg pages split into packets and decoded as they arrive;
- plus N/4 loudspeaker control clients (WebSocket, docs/device-protocol.md) that ack commands.

Then R emergencies: `POST /api/v1/emergencies` for the whole province (attention signal first:
800/1000 Hz alternating), 1.5 s on air, `DELETE`, 1.5 s of music. Every figure is measured from
the moment the request is sent (`time.monotonic()`, one clock for all processes of the machine):

- `api_ms`: until the 201 (persisted, on air, devices commanded);
- `server_ms`: until the first packet of the emergency leaves each transport on the server
  (`hub`: the engine's packets handed to the transports on the event loop; `rtp`: sent by the RTP
  sender thread; `webrtc`: sent to every WHEP peer of the area; `http`: the first HTTP batch
  holding it written to the listeners; with fan-out workers: the tick's message holding it sent
  to the workers). "Of the emergency" = its pts is at or after the sample
  where the engine switched the area;
- `rtp_ms`, `webrtc_ms`, `http_ms`: until a client's decoded audio shows the attention signal
  (the first 20 ms frame whose energy is more than half at 800 or 1000 Hz, Goertzel, after at
  least 200 ms without it);
- `device_command_ms`: until a loudspeaker client receives the `emergency` command.

Each as p50 / p99 / max over every client and round. Goals (N = 200, loopback): server <= 60 ms
(three ticks), RTP and WebRTC <= 200 ms, HTTP <= 1 s. One JSON object goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import secrets
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

COMMUNES = 4
AREAS_CSV = "code,name,level,parent_code\nBP,Tỉnh đo,province,\n" + "".join(
    f"BP-X{i},Xã {i},commune,BP\n" for i in range(1, COMMUNES + 1))
PROVINCE = "BP"
MUSIC_HZ = 440.0
ON_SECONDS = 1.5
OFF_SECONDS = 1.5
HOLD_FRAMES = 10  # frames without the signal before a new onset counts (200 ms)
RATIO = 0.5  # share of a frame's energy at one attention tone that counts as the signal
TONES = (800.0, 1000.0)
GOALS = {"server_ms": 60.0, "rtp_ms": 200.0, "webrtc_ms": 200.0, "http_ms": 1000.0}
CONNECT_CONCURRENCY = 8
MESSAGE = "Thông báo khẩn cấp. Đây là bài đo độ trễ."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    v = sorted(values)

    def rank(p: float) -> float:
        return round(v[max(0, math.ceil(p / 100 * len(v)) - 1)], 1)

    return {"n": len(v), "p50": rank(50), "p99": rank(99), "max": round(v[-1], 1)}


# ---- onset detection (children) ------------------------------------------------------------------
_basis: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}


def tone_ratio(pcm: np.ndarray, rate: int) -> float:
    """The largest share of the frame's energy at one attention tone (1.0 = a pure tone)."""
    n = pcm.shape[0]
    if n == 0:
        return 0.0
    key = (n, rate)
    if key not in _basis:
        t = np.arange(n) / rate
        _basis[key] = [(np.cos(2 * np.pi * f * t).astype(np.float32),
                        np.sin(2 * np.pi * f * t).astype(np.float32)) for f in TONES]
    energy = float(np.dot(pcm, pcm))
    if energy < 1e-7:
        return 0.0
    best = max(float(np.dot(pcm, c)) ** 2 + float(np.dot(pcm, s)) ** 2
               for c, s in _basis[key])
    return best / (energy * n / 2)


@dataclass
class Onsets:
    transport: str
    codec: str
    area: str
    quiet: int = HOLD_FRAMES
    frames: int = 0
    onsets: list[float] = field(default_factory=list)
    warm: asyncio.Event = field(default_factory=asyncio.Event)  # a second of audio decoded

    def feed(self, pcm: np.ndarray, rate: int, t: float) -> None:
        step = rate // 50  # 20 ms frames, whatever the decoder hands out
        for i in range(0, max(1, pcm.shape[0] - step + 1), step):
            self.frames += 1
            if self.frames == 50:
                self.warm.set()
            if tone_ratio(pcm[i:i + step], rate) > RATIO:
                if self.quiet >= HOLD_FRAMES:
                    self.onsets.append(t)
                self.quiet = 0
            else:
                self.quiet += 1

    def report(self) -> dict[str, Any]:
        return {"transport": self.transport, "codec": self.codec, "area": self.area,
                "frames": self.frames, "onsets": self.onsets}


_ULAW = None


def ulaw_table() -> np.ndarray:
    global _ULAW
    if _ULAW is None:
        u = ~np.arange(256, dtype=np.int32) & 0xFF
        sign = u & 0x80
        exp = (u >> 4) & 0x07
        mant = u & 0x0F
        mag = (((mant << 3) + 0x84) << exp) - 0x84
        _ULAW = (np.where(sign, -mag, mag) / 32768.0).astype(np.float32)
    return _ULAW


def _opus_decoder() -> Any:
    import av

    dec = av.CodecContext.create("libopus", "r")
    dec.sample_rate = 48_000
    dec.layout = "mono"
    return dec


def _decode_opus(dec: Any, payload: bytes) -> np.ndarray:
    import av

    out = []
    for f in dec.decode(av.Packet(payload)):
        a = f.to_ndarray().reshape(-1)
        out.append(a.astype(np.float32) / 32768 if a.dtype == np.int16 else
                   a.astype(np.float32))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


class _RtpProtocol(asyncio.DatagramProtocol):
    def __init__(self, det: Onsets, codec: str) -> None:
        self.det = det
        self.codec = codec
        self.dec = _opus_decoder() if codec == "opus" else None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        t = time.monotonic()
        if len(data) <= 12 or data[0] >> 6 != 2:
            return
        cc = data[0] & 0x0F
        payload = data[12 + 4 * cc:]
        if self.codec == "opus":
            with contextlib.suppress(Exception):
                self.det.feed(_decode_opus(self.dec, payload), 48_000, t)
        else:
            self.det.feed(ulaw_table()[np.frombuffer(payload, dtype=np.uint8)], 8_000, t)


def _multicast_socket(group: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with contextlib.suppress(AttributeError, OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((group, port))
    mreq = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("127.0.0.1"))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    s.setblocking(False)
    return s


async def _http_listener(http: Any, url: str, det: Onsets) -> None:
    from loa.codecs.ogg import OggReader

    dec = _opus_decoder()
    reader = OggReader()
    async with http.get(url) as r:
        if r.status != 200:
            log(f"http listener refused: {r.status}")
            return
        async for chunk in r.content.iter_any():
            t = time.monotonic()
            for packets, _, _ in reader.feed(chunk):
                for pkt in packets:
                    if pkt and not pkt.startswith((b"OpusHead", b"OpusTags")):
                        with contextlib.suppress(Exception):
                            det.feed(_decode_opus(dec, pkt), 48_000, t)


async def _device(http: Any, base: str, dev_id: str, key: str, got: list[float],
                  ready: asyncio.Event) -> None:
    ws = await http.ws_connect(base.replace("http", "ws", 1) + "/api/v1/devices/connect")
    await ws.send_str(json.dumps({"v": 1, "type": "hello", "device": dev_id, "key": key,
                                  "firmware": "bench", "capabilities": {
                                      "codecs": ["opus"], "transports": ["http"]}}))
    async for msg in ws:
        t = time.monotonic()
        m = json.loads(msg.data)
        if m.get("type") == "welcome":
            ready.set()
        elif m.get("type") == "command":
            await ws.send_str(json.dumps({"v": 1, "type": "ack", "id": m["id"], "ok": True}))
            if m["command"] == "emergency" and m["args"].get("on"):
                got.append(t)


async def _whep_peers(http: Any, base: str, areas: list[str]) -> tuple[list[Any], list[Onsets]]:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription

    from loa.relay.webrtc import use_host_addresses

    use_host_addresses(["127.0.0.1"])
    original = RTCRtpReceiver._handle_rtp_packet

    async def on_packet(self: Any, packet: Any, arrival_time_ms: int) -> None:
        tap = getattr(self, "_loa_tap", None)
        if tap is None:
            await original(self, packet, arrival_time_ms)
            return
        det, dec = tap
        with contextlib.suppress(Exception):
            det.feed(_decode_opus(dec, packet.payload), 48_000, time.monotonic())

    RTCRtpReceiver._handle_rtp_packet = on_packet  # type: ignore[method-assign]
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    pcs: list[Any] = []
    dets: list[Onsets] = []

    async def one(area: str) -> None:
        async with sem:
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            tr = pc.addTransceiver("audio", direction="recvonly")
            det = Onsets("webrtc", "opus", area)
            tr.receiver._loa_tap = (det, _opus_decoder())  # type: ignore[attr-defined]
            await pc.setLocalDescription(await pc.createOffer())
            async with http.post(f"{base}/whep/{area}", data=pc.localDescription.sdp,
                                 headers={"Content-Type": "application/sdp"}) as r:
                body = await r.text()
                if r.status != 201:
                    log(f"whep refused: {r.status} {body[:200]}")
                    await pc.close()
                    return
            await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
            pcs.append(pc)
            dets.append(det)

    await asyncio.gather(*(one(a) for a in areas))
    return pcs, dets


async def _child(spec: dict[str, Any]) -> int:
    import aiohttp

    loop = asyncio.get_running_loop()
    base = spec["base"]
    dets: list[Onsets] = []
    devices: list[list[float]] = []
    tasks: list[asyncio.Task[Any]] = []
    transports: list[Any] = []
    pcs: list[Any] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for r in spec.get("rtp", []):
            det = Onsets("rtp", r["codec"], r["area"])
            sock = _multicast_socket(r["group"], r["port"])
            tr, _ = await loop.create_datagram_endpoint(
                lambda d=det, c=r["codec"]: _RtpProtocol(d, c), sock=sock)  # type: ignore
            transports.append(tr)
            dets.append(det)
        for h in spec.get("http", []):
            det = Onsets("http", "opus", h["area"])
            tasks.append(loop.create_task(_http_listener(http, f"{base}/streams/{h['area']}.opus",
                                                         det)))
            dets.append(det)
        readies = []
        for d in spec.get("devices", []):
            got: list[float] = []
            ready = asyncio.Event()
            devices.append(got)
            readies.append(ready)
            tasks.append(loop.create_task(_device(http, base, d["id"], d["key"], got, ready)))
        if spec.get("webrtc"):
            pcs, wdets = await _whep_peers(http, base, spec["webrtc"])
            dets += wdets
        # Ready when every client has decoded a second of audio and every device is welcomed.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(d.warm.wait() for d in dets),
                                                  *(r.wait() for r in readies)), 90)
        print(f"READY {sum(d.frames >= 50 for d in dets)} of {len(dets)}", flush=True)
        cpu0 = time.process_time()
        t0 = time.monotonic()
        await loop.run_in_executor(None, sys.stdin.readline)
        cpu = (time.process_time() - cpu0) / max(1e-6, time.monotonic() - t0)
        print(json.dumps({"clients": [d.report() for d in dets], "devices": devices,
                          "cpu_fraction": round(cpu, 3)}), flush=True)
        for tr in transports:
            tr.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
    return 0


# ---- the server (this process) ---------------------------------------------------------------------
class Probe:
    """Server-side instants: the first packet of the current emergency per transport and area."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.round = -1  # measured rounds count from 0
        self.switch: dict[str, int] = {}  # area -> sample where the engine switched it
        self.first: dict[tuple[str, str, int], float] = {}  # (where, area, round) -> monotonic

    def on_change(self, c: Any) -> None:  # engine thread, inside the tick
        live = self.engine.broadcasts.get(c.after) if c.after else None
        if self.round >= 0 and live is not None and live.b.cls.name == "emergency":
            self.switch.setdefault(c.area, c.sample)

    def begin(self, r: int) -> None:
        self.switch = {}
        self.round = r

    def is_emergency(self, area: str, packets: list[Any]) -> bool:
        s = self.switch.get(area)
        return s is not None and any(p.pts * 48_000 // p.rate >= s for p in packets)

    def mark(self, where: str, area: str) -> None:
        key = (where, area, self.round)
        if self.round >= 0 and key not in self.first:
            self.first[key] = time.monotonic()

    def seen(self, where: str, area: str) -> bool:
        return (where, area, self.round) in self.first


def _hook(node: Any, probe: Probe, areas: list[str]) -> None:
    node.engine.listeners.append(probe.on_change)
    for area in areas:
        sub = node.hub.subscribe(area, "opus", maxlen=10)

        def hub_tap(packets: list[Any], a: str = area) -> None:
            if not probe.seen("hub", a) and probe.is_emergency(a, packets):
                probe.mark("hub", a)

        sub.on_packets = hub_tap
    out = node.rtp
    for (area, _codec), st in (out.streams.items() if out else []):
        if area not in areas:
            continue
        orig = st.send

        def send(packets: list[Any], queued_at: float, _o: Any = orig, a: str = area) -> None:
            _o(packets, queued_at)
            if not probe.seen("rtp", a) and probe.is_emergency(a, packets):
                probe.mark("rtp", a)

        st.send = send
    relay = node.webrtc
    # The in-process feeds' subscriptions, or those forwarding to the WHEP workers.
    subs = {**{a: f.sub for a, f in relay.feeds.items()}, **(relay.pool.subs if relay.pool else {})}
    for area, sub in subs.items():
        orig_w = sub.on_packets

        def whep(packets: list[Any], _o: Any = orig_w, a: str = area) -> None:
            if _o is not None:
                _o(packets)
            if not probe.seen("webrtc", a) and probe.is_emergency(a, packets):
                probe.mark("webrtc", a)

        sub.on_packets = whep
    streamer = node.http
    for (area, _codec), ch in (streamer.channels.items() if streamer else []):
        state = {"samples": 0}
        orig_p = ch.sub.on_packets
        orig_write = ch.write_all

        def packets_in(packets: list[Any], _o: Any = orig_p, a: str = area,
                       st: dict[str, int] = state) -> None:
            if not probe.seen("http", a) and probe.is_emergency(a, packets):
                st["samples"] += sum(p.duration for p in packets)
            _o(packets)

        def written(listeners: list[Any], _o: Any = orig_write, a: str = area,
                    st: dict[str, int] = state, c: Any = ch) -> None:
            _o(listeners)
            pending = c.muxer.pending_samples if c.muxer is not None else 0
            if st["samples"] and not probe.seen("http", a) and st["samples"] > pending:
                probe.mark("http", a)
                st["samples"] = 0

        ch.sub.on_packets = packets_in
        ch.write_all = written
    pool = node.fanout  # fan-out workers: "sent" is the tick's message to the workers
    for (area, _codec), sub in (pool.subs.items() if pool else []):
        if area not in areas:
            continue
        orig_f = sub.on_packets

        def forwarded(packets: list[Any], _o: Any = orig_f, a: str = area) -> None:
            _o(packets)
            if not probe.seen("http", a) and probe.is_emergency(a, packets):
                probe.mark("http", a)

        sub.on_packets = forwarded


async def _server(n: int, rounds: int) -> dict[str, Any]:
    import aiohttp

    from loa.streamer.broadcast import Broadcast
    from loa.streamer.sources import ToneSource
    from loa.web.auth import add_user
    from loa.web.config import load_config
    from loa.web.node import Node
    from loa.web.testing import start_node

    areas = [f"{PROVINCE}-X{i}" for i in range(1, COMMUNES + 1)]
    n_rtp = n // 3
    n_web = n // 3
    n_http = n - n_rtp - n_web
    n_dev = max(1, n // 4)
    with tempfile.TemporaryDirectory(prefix="loa-bench-preempt-") as tmp:
        csv = Path(tmp) / "areas.csv"
        csv.write_text(AREAS_CSV, encoding="utf-8")
        cfg = load_config(None, env={}, data=str(Path(tmp) / "data"))
        cfg.areas.csv = str(csv)
        cfg.rtp.enabled = True
        cfg.rtp.interface = "127.0.0.1"
        cfg.rtp.ttl = 0
        cfg.rtp.port = random.randrange(20_000, 60_000, 2)
        cfg.rtp.group_base = f"239.255.{random.randrange(0, 200)}.0"
        cfg.rtp.pool_size = 64
        cfg.rtp.codecs = "opus,pcmu"
        cfg.webrtc.ice_addresses = "127.0.0.1"
        cfg.webrtc.max_peers = max(cfg.webrtc.max_peers, n_web + 10)
        cfg.webrtc.whep_burst = max(cfg.webrtc.whep_burst, n_web + 10)  # one address
        cfg.webrtc.max_peers_per_area = max(cfg.webrtc.max_peers_per_area, n_web + 10)
        cfg.webrtc.connect_timeout = 120.0
        password = secrets.token_urlsafe(12)

        async def prepare(node: Node) -> None:
            await add_user(node.store, node.tree, "bench", "operator", PROVINCE, password,
                           emergency=True)
            await add_user(node.store, node.tree, "bench-admin", "admin", PROVINCE, password)
            node.engine.start(Broadcast(ToneSource(MUSIC_HZ, 0.3), [PROVINCE],
                                        issuer=PROVINCE, title="nhạc"))

        with contextlib.redirect_stdout(sys.stderr):  # the bootstrap admin line is not JSON
            live = await start_node(cfg, prepare=prepare, backlog=1024, access_log=None)
        node, base = live.node, live.url
        procs: list[asyncio.subprocess.Process] = []
        probe = Probe(node.engine)
        try:
            async with aiohttp.ClientSession() as http:
                tokens = {}
                for who in ("bench", "bench-admin"):
                    async with http.post(f"{base}/api/v1/auth/token",
                                         json={"username": who, "password": password}) as r:
                        tokens[who] = (await r.json())["token"]
                auth = {"Authorization": f"Bearer {tokens['bench']}"}
                devices = []
                for i in range(n_dev):
                    async with http.post(f"{base}/api/v1/devices", headers={
                            "Authorization": f"Bearer {tokens['bench-admin']}"}, json={
                            "name": f"loa {i}", "kind": "loudspeaker",
                            "area": areas[i % COMMUNES]}) as r:
                        dev = await r.json()
                    async with http.post(f"{base}/api/v1/devices/provision", json={
                            "device": dev["id"], "token": dev["provisioning_token"]}) as r:
                        devices.append({"id": dev["id"], "key": (await r.json())["key"]})
                rtp_out = node.rtp
                assert rtp_out is not None
                rtp = []
                for i in range(n_rtp):
                    area, codec = areas[i % COMMUNES], ("opus", "pcmu")[(i // COMMUNES) % 2]
                    st = rtp_out.stream(area, codec)
                    rtp.append({"area": area, "codec": codec, "group": st.group,
                                "port": st.port})
                specs = [  # one process per transport: no client waits behind another's
                    {"base": base, "rtp": rtp},
                    {"base": base, "http": [{"area": areas[i % COMMUNES]} for i in range(n_http)],
                     "devices": devices},
                    {"base": base, "webrtc": [areas[i % COMMUNES] for i in range(n_web)]},
                ]
                for k, spec in enumerate(specs):
                    path = Path(tmp) / f"child{k}.json"
                    path.write_text(json.dumps(spec), encoding="utf-8")
                    procs.append(await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "loa.web.bench.preempt", "--child", str(path),
                        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE))
                for p in procs:
                    assert p.stdout is not None
                    line = (await p.stdout.readline()).decode().strip()
                    log(f"bench: child {line}")
                _hook(node, probe, areas)
                node.lag.max_ms = 0.0  # from here on: the rounds, not the clients' set-up
                body = {"targets": [PROVINCE], "content": {"text": MESSAGE},
                        "attention": {"after": False}}
                # Warm-up (TTS synthesis, first encodes of the composition): not measured.
                async with http.post(f"{base}/api/v1/emergencies", json=body,
                                     headers=auth) as r:
                    warm = await r.json()
                await asyncio.sleep(ON_SECONDS)
                async with http.delete(f"{base}/api/v1/emergencies/{warm['id']}",
                                       headers=auth) as r:
                    assert r.status == 200, await r.text()
                await asyncio.sleep(OFF_SECONDS)
                sends: list[float] = []
                api: list[float] = []
                cpu0, wall0, busy0 = time.process_time(), time.monotonic(), _machine_busy()
                for r_i in range(rounds):
                    probe.begin(r_i)
                    t_send = time.monotonic()
                    sends.append(t_send)
                    async with http.post(f"{base}/api/v1/emergencies", json=body,
                                         headers=auth) as r:
                        em = await r.json()
                        api.append((time.monotonic() - t_send) * 1000)
                        if r.status != 201:
                            raise RuntimeError(f"emergency refused: {r.status} {em}")
                    await asyncio.sleep(max(0.0, t_send + ON_SECONDS - time.monotonic()))
                    async with http.delete(f"{base}/api/v1/emergencies/{em['id']}",
                                           headers=auth) as r:
                        assert r.status == 200, await r.text()
                    await asyncio.sleep(OFF_SECONDS)
                server_cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
                busy1 = _machine_busy()
                machine = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]) * (os.cpu_count() or 1)
                reports = []
                for p in procs:
                    assert p.stdin is not None and p.stdout is not None
                    p.stdin.write(b"STOP\n")
                    await p.stdin.drain()
                    line = (await p.stdout.readline()).decode().strip()
                    reports.append(json.loads(line) if line.startswith("{") else {})
                for p in procs:
                    await asyncio.wait_for(p.wait(), 30)
        finally:
            for p in procs:
                if p.returncode is None:
                    p.kill()
                    await p.wait()
            with contextlib.suppress(ValueError):
                node.engine.listeners.remove(probe.on_change)
            lag = node.lag.max_ms
            await live.stop()
    # ---- figures ----
    per: dict[str, list[float]] = {"rtp": [], "webrtc": [], "http": []}
    missed: dict[str, int] = {"rtp": 0, "webrtc": 0, "http": 0}
    clients: dict[str, int] = {"rtp": 0, "webrtc": 0, "http": 0}
    for rep in reports:
        for c in rep.get("clients", []):
            clients[c["transport"]] += 1
            for t_send in sends:
                hit = [o for o in c["onsets"] if t_send <= o < t_send + ON_SECONDS + 0.5]
                if hit:
                    per[c["transport"]].append((hit[0] - t_send) * 1000)
                else:
                    missed[c["transport"]] += 1
    for r_i, t_send in enumerate(sends):  # per round, for the log
        row = []
        for tr in ("rtp", "webrtc", "http"):
            vals = [(hit[0] - t_send) * 1000 for rep in reports for c in rep.get("clients", [])
                    if c["transport"] == tr
                    for hit in [[o for o in c["onsets"] if t_send <= o < t_send + ON_SECONDS + 0.5]]
                    if hit]
            row.append(f"{tr} p50={stats(vals)['p50']} max={stats(vals)['max']}")
        srv = {w: round((t - t_send) * 1000, 1) for (w, _a, r), t in probe.first.items()
               if r == r_i and w in ("hub",)}
        log(f"bench: round {r_i} api={api[r_i]:.1f} ms hub={srv} " + " ".join(row))
    dev_ms: list[float] = []
    dev_missed = 0
    for rep in reports:
        for got in rep.get("devices", []):
            for t_send in sends:
                hit = [o for o in got if t_send <= o < t_send + ON_SECONDS]
                if hit:
                    dev_ms.append((hit[0] - t_send) * 1000)
                else:
                    dev_missed += 1
    server: dict[str, Any] = {}
    for where in ("hub", "rtp", "webrtc", "http"):
        vals = [(t - sends[r]) * 1000 for (w, _a, r), t in probe.first.items() if w == where]
        server[where] = stats(vals)
    out: dict[str, Any] = {
        "bench": "preempt",
        "devices": n,
        "rounds": rounds,
        "clients": {**clients, "loudspeaker_control": sum(len(r.get("devices", []))
                                                           for r in reports)},
        "areas": COMMUNES,
        "api_ms": stats(api),
        "server_ms": server,
        "rtp_ms": {**stats(per["rtp"]), "missed": missed["rtp"]},
        "webrtc_ms": {**stats(per["webrtc"]), "missed": missed["webrtc"]},
        "http_ms": {**stats(per["http"]), "missed": missed["http"]},
        "device_command_ms": {**stats(dev_ms), "missed": dev_missed},
        "goals_ms": GOALS,
        "server_loop_lag_max_ms": round(lag, 1),
        "server_cpu_fraction": round(server_cpu, 3),
        "machine_cores_busy": round(machine, 2),
        # Other processes' load during the rounds (a shared machine): figures are only
        # meaningful when this is near 0.
        "other_processes_cores": round(max(0.0, machine - server_cpu - sum(
            r.get("cpu_fraction") or 0.0 for r in reports)), 2),
        "child_cpu_fraction": [r.get("cpu_fraction") for r in reports],
        "measured_from": "request sent (time.monotonic, shared by all processes)",
    }
    # HTTP leaves in batches (relay/icecast.py: >= batch_ms and batch_bytes of audio): its
    # server figure is reported, and judged with the HTTP goal, not the 60 ms one.
    worst_server = max((server[w]["p99"] or math.inf) for w in ("hub", "rtp", "webrtc"))
    out["met"] = {
        "server_ms": worst_server <= GOALS["server_ms"],
        "rtp_ms": (out["rtp_ms"]["p99"] or math.inf) <= GOALS["rtp_ms"],
        "webrtc_ms": (out["webrtc_ms"]["p99"] or math.inf) <= GOALS["webrtc_ms"],
        "http_ms": (out["http_ms"]["p99"] or math.inf) <= GOALS["http_ms"],
    }
    return out


def _machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0, 1
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def run(args: argparse.Namespace) -> int:
    n = int(getattr(args, "devices", 200))
    rounds = int(getattr(args, "rounds", 10))
    if n < 3 or rounds < 1:
        log("--devices must be >= 3 and --rounds >= 1")
        return 2
    result = asyncio.run(_server(n, rounds))
    print(json.dumps(result, ensure_ascii=False), flush=True)
    return 0 if all(result["met"].values()) else 1


def _child_main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    return asyncio.run(_child(spec))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        sys.exit(_child_main(sys.argv[2:]))
    sys.exit(2)
