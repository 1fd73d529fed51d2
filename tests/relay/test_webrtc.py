"""WebRTC end to end: real aiortc clients against a real node on 127.0.0.1 (real media clock).

WHEP listeners hear the area's programme (tone found by FFT), switch with a preemption, share one
hub subscription per area, with the peers in the node's process (`workers = 0`) or in a worker
(`workers = 1`: the DELETE ends it there, a killed worker ends its peers and is replaced); a WHIP publisher goes live in a district and a commune below hears it;
auth, SDP and limit errors are refused with the right status and change nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc import (
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamTrack

from loa.codecs.encoders import Packet
from loa.relay.webrtc import PacketTrack
from loa.streamer.broadcast import Broadcast
from loa.streamer.sources import ToneSource
from tests.audio import peak_hz
from tests.helpers import get_metrics, until, val
from tests.webrtcpeers import SDP, Server, ToneTrack, offer_pc, start_server


@pytest.fixture(params=[0, 1], ids=["in-process", "worker"])
async def server(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    srv, runner = await start_server(tmp_path, workers=request.param)
    try:
        yield srv
    finally:
        await srv.http.close()
        await runner.cleanup()
        await srv.node.stop()


# ---- clients ---------------------------------------------------------------------------------
class Listener:
    def __init__(self, pc: RTCPeerConnection, track: MediaStreamTrack, location: str) -> None:
        self.pc = pc
        self.track = track
        self.location = location

    async def frames(self, n: int) -> np.ndarray:
        """The next n decoded 20 ms frames as 48 kHz mono float32."""
        out = []
        for _ in range(n):
            f = await asyncio.wait_for(self.track.recv(), 10)
            a = f.to_ndarray().reshape(-1, len(f.layout.channels))[:, 0]
            out.append(a.astype(np.float32) / 32768)
        return np.concatenate(out)

    async def until_tone(self, hz: float, max_frames: int = 250) -> np.ndarray:
        """Read until the last 0.3 s hold `hz`; returns that audio."""
        window: list[np.ndarray] = []
        for _ in range(max_frames):
            window.append(await self.frames(1))
            window = window[-15:]
            if len(window) == 15 and abs(peak_hz(np.concatenate(window), 48_000) - hz) < 5:
                return np.concatenate(window)
        raise AssertionError(f"{hz} Hz never heard")


async def whep(srv: Server, area: str) -> Listener:
    pc = offer_pc("recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    async with srv.http.post(f"{srv.base}/whep/{area}", data=pc.localDescription.sdp,
                             headers=SDP) as r:
        body = await r.text()
        assert r.status == 201, body
        assert r.content_type == "application/sdp"
        location = r.headers["Location"]
    assert location.startswith(f"/whep/{area}/")
    assert "opus" in body.lower() and "pcmu" not in body.lower()
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    track = pc.getTransceivers()[0].receiver.track
    assert track is not None
    return Listener(pc, track, location)


async def whip_offer(hz: float = 700, codec: str | None = None) -> RTCPeerConnection:
    pc = offer_pc("sendonly", codec, ToneTrack(hz))
    await pc.setLocalDescription(await pc.createOffer())
    return pc


async def post_whip(srv: Server, targets: str, pc: RTCPeerConnection,
                    headers: dict[str, str], query: str = "") -> tuple[int, str, str]:
    async with srv.http.post(f"{srv.base}/whip/{targets}{query}", data=pc.localDescription.sdp,
                             headers=headers) as r:
        return r.status, await r.text(), r.headers.get("Location", "")


def pcm_of(packets: list[Packet]) -> np.ndarray:
    return np.frombuffer(b"".join(p.data for p in packets), dtype=np.float32)


# ---- WHEP --------------------------------------------------------------------------------------
async def test_whep_hears_the_area_and_the_preemption(server: Server) -> None:
    node = server.node
    node.engine.start(Broadcast(ToneSource(440, 0.3), ["T01-H1"], issuer="T01-H1"))
    lst = await whep(server, "T01-H1-X1")
    try:
        audio = await lst.until_tone(440)
        assert abs(peak_hz(audio, 48_000) - 440) < 5
        assert np.max(np.abs(audio)) > 0.1  # the tone itself, not noise
        node.engine.start(Broadcast(ToneSource(1000, 0.3), ["T01"], issuer="T01",
                                    klass="priority", title="bản tin"))
        audio = await lst.until_tone(1000)
        assert abs(peak_hz(audio, 48_000) - 1000) < 5
        relay = server.node.webrtc
        (stats,) = await relay.whep_stats()
        assert stats["area"] == "T01-H1-X1" and stats["state"] == "connected"
        assert stats["packets_sent"] > 0
        async with server.http.get(f"{server.base}{lst.location}") as r:
            assert r.status == 200
            assert (await r.json())["session"] == lst.location.rsplit("/", 1)[1]
    finally:
        await lst.pc.close()


async def test_two_peers_share_one_subscription(server: Server) -> None:
    node = server.node
    node.engine.start(Broadcast(ToneSource(440, 0.3), ["T01-H1"], issuer="T01-H1"))
    a = await whep(server, "T01-H1-X1")
    b = await whep(server, "T01-H1-X1")
    try:
        channel = node.hub.channel("T01-H1-X1", "opus")
        assert len(channel.subs) == 1
        await a.until_tone(440)
        await b.until_tone(440)
        assert len(channel.subs) == 1
        relay = server.node.webrtc
        assert relay.area_peers("T01-H1-X1") == 2
        async with server.http.delete(f"{server.base}{a.location}") as r:
            assert r.status in (200, 204)
        assert len(channel.subs) == 1
        await b.until_tone(440)  # the other peer keeps hearing
        async with server.http.delete(f"{server.base}{b.location}") as r:
            assert r.status in (200, 204)
        assert channel.subs == [] and relay.whep == {} and relay.feeds == {}
        async with server.http.delete(f"{server.base}{b.location}") as r:
            assert r.status == 404
    finally:
        await a.pc.close()
        await b.pc.close()


async def test_whep_refusals_change_nothing(server: Server) -> None:
    base = server.base
    async with server.http.options(f"{base}/whep/T01-H1-X1") as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
    for body in ("hello", "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\x00garbage", ""):
        async with server.http.post(f"{base}/whep/T01-H1-X1", data=body, headers=SDP) as r:
            assert r.status == 400, body
            err = (await r.json())["error"]
            assert " / " in err and len(err.split(" / ")[0]) > 3
    async with server.http.post(f"{base}/whep/T01-H1-X1", data="v=0",
                                headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 415
    pcmu = offer_pc("recvonly", "audio/pcmu")
    await pcmu.setLocalDescription(await pcmu.createOffer())
    assert "opus" not in pcmu.localDescription.sdp.lower()
    async with server.http.post(f"{base}/whep/T01-H1-X1", data=pcmu.localDescription.sdp,
                                headers=SDP) as r:
        assert r.status == 406
        assert "Opus" in (await r.json())["error"]
    await pcmu.close()
    ok = offer_pc("recvonly")
    await ok.setLocalDescription(await ok.createOffer())
    async with server.http.post(f"{base}/whep/X99", data=ok.localDescription.sdp,
                                headers=SDP) as r:
        assert r.status == 404
        assert (await r.json())["error"].startswith("không có khu vực / unknown area")
    await ok.close()
    relay = server.node.webrtc
    assert relay.whep == {} and relay.feeds == {}
    assert server.node.hub.channel("T01-H1-X1", "opus").subs == []
    # ... and the server still serves a listener.
    server.node.engine.start(Broadcast(ToneSource(440, 0.3), ["T01"], issuer="T01"))
    lst = await whep(server, "T01-H1-X1")
    await lst.until_tone(440)
    await lst.pc.close()


@pytest.mark.parametrize("workers", [0, 2])
async def test_whep_limits(tmp_path: Path, workers: int) -> None:
    """The limits hold over all the peers, whichever worker runs them."""
    srv, runner = await start_server(tmp_path, max_peers=2, max_peers_per_area=1,
                                     workers=workers)
    peers: list[Listener] = []
    try:
        peers.append(await whep(srv, "T01-H1-X1"))
        extra = offer_pc("recvonly")
        await extra.setLocalDescription(await extra.createOffer())
        async with srv.http.post(f"{srv.base}/whep/T01-H1-X1", data=extra.localDescription.sdp,
                                 headers=SDP) as r:
            assert r.status == 503
            assert "Retry-After" in r.headers
        peers.append(await whep(srv, "T01-H1-X2"))
        async with srv.http.post(f"{srv.base}/whep/T01-H1-X3", data=extra.localDescription.sdp,
                                 headers=SDP) as r:
            assert r.status == 503
        await extra.close()
        assert len(srv.node.webrtc.whep) == 2
        pool = srv.node.webrtc.pool
        if workers:  # one peer in each worker, and still refused beyond the limits
            assert pool is not None and sorted(len(w.sessions) for w in pool.workers) == [1, 1]
    finally:
        for p in peers:
            await p.pc.close()
        await srv.http.close()
        await runner.cleanup()
        await srv.node.stop()
    assert srv.node.webrtc.whep == {}  # shutdown closed every peer


async def test_client_leaving_closes_its_peer(server: Server) -> None:
    lst = await whep(server, "T01-H2-X1")
    await lst.frames(5)
    relay = server.node.webrtc
    assert len(relay.whep) == 1
    await lst.pc.close()
    await until(lambda: not relay.whep, "the server to close the peer")
    assert server.node.hub.channel("T01-H2-X1", "opus").subs == []


@pytest.fixture
async def worker_server(tmp_path: Path) -> AsyncIterator[Server]:
    srv, runner = await start_server(tmp_path, workers=1)
    try:
        yield srv
    finally:
        await srv.http.close()
        await runner.cleanup()
        await srv.node.stop()


async def test_whep_peer_runs_in_the_worker(worker_server: Server) -> None:
    """The worker runs the peer (the node holds no feed of its own, only the one subscription
    that forwards the packets), the monitor and /metrics see it, and DELETE ends it there."""
    srv = worker_server
    relay = srv.node.webrtc
    pool = relay.pool
    assert pool is not None
    srv.node.engine.start(Broadcast(ToneSource(440, 0.3), ["T01-H1"], issuer="T01-H1"))
    lst = await whep(srv, "T01-H1-X1")
    try:
        audio = await lst.until_tone(440)
        assert abs(peak_hz(audio, 48_000) - 440) < 5
        sid = lst.location.rsplit("/", 1)[1]
        [w] = pool.workers
        assert list(w.sessions) == [sid] and relay.feeds == {}
        assert len(srv.node.hub.channel("T01-H1-X1", "opus").subs) == 1
        await until(lambda: relay.whep[sid].connected is not None, "the worker's connected")
        (stats,) = await relay.whep_stats()  # the monitor's per-peer figures, from the worker
        assert stats["session"] == sid and stats["state"] == "connected"
        assert stats["path"] == "direct" and stats["packets_sent"] > 0
        series, _ = await get_metrics(srv.http, srv.base + "/metrics")
        assert val(series, "loa_webrtc_peers") == 1
        assert val(series, "loa_listeners", area="T01-H1-X1", transport="webrtc") == 1
        async with srv.http.delete(f"{srv.base}{lst.location}") as r:
            assert r.status == 204
        assert relay.whep == {} and w.sessions == {}
        assert srv.node.hub.channel("T01-H1-X1", "opus").subs == []
        # The worker closed the peer: it no longer knows the session.
        assert await pool.request(w, "stats", sid) is None
    finally:
        await lst.pc.close()


async def test_concurrent_offers_all_answered_by_the_worker(worker_server: Server) -> None:
    """Each offer gets its own worker's answer (replies matched to their requests)."""
    peers = await asyncio.gather(*(whep(worker_server, "T01-H1-X2") for _ in range(3)))
    try:
        assert len(worker_server.node.webrtc.whep) == 3
    finally:
        for p in peers:
            await p.pc.close()


async def test_killed_worker_ends_its_peers_and_is_replaced(worker_server: Server) -> None:
    srv = worker_server
    relay = srv.node.webrtc
    pool = relay.pool
    assert pool is not None
    srv.node.engine.start(Broadcast(ToneSource(440, 0.3), ["T01"], issuer="T01"))
    first = await whep(srv, "T01-H2-X1")
    await first.until_tone(440)
    [pid] = pool.worker_pids()
    os.kill(pid, signal.SIGKILL)
    await until(lambda: not relay.whep, "the dead worker's session to end")
    assert srv.node.hub.channel("T01-H2-X1", "opus").subs == []
    await first.pc.close()
    await until(lambda: pool.worker_pids() not in ([], [pid]), "a new worker")
    again = await whep(srv, "T01-H2-X1")  # served by the restarted worker
    try:
        audio = await again.until_tone(440)
        assert abs(peak_hz(audio, 48_000) - 440) < 5
        assert pool.restarts == 1 and len(pool.workers[0].sessions) == 1
    finally:
        await again.pc.close()


# ---- WHIP --------------------------------------------------------------------------------------
async def test_whip_goes_live_and_delete_ends_it(server: Server) -> None:
    node = server.node
    sub = node.hub.subscribe("T01-H1-X2", "pcm", maxlen=2000)
    pc = await whip_offer(700)
    status, answer, location = await post_whip(server, "T01-H1", pc, await server.bearer("huyen1"),
                                               "?class=priority&title=Họp%20dân")
    assert status == 201, answer
    assert location.startswith("/whip/session/")
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    try:
        await until(lambda: node.engine.on_air("T01-H1-X2")["broadcast"] is not None,
                    "the live broadcast on air")
        on_air = node.engine.on_air("T01-H1-X2")
        assert on_air["title"] == "Họp dân" and on_air["class"] == "priority"
        assert on_air["issuer"] == "T01-H1"
        bid = on_air["broadcast"]
        rec = await node.store.get("broadcast", str(bid))
        assert rec is not None and rec["spec"] == {"live": "whip"} and rec["user"] == "huyen1"
        heard = False
        sub.drain()
        for _ in range(300):  # 6 s of packets at most
            await until(lambda: len(sub.queue) >= 25, "pcm packets")
            pcm = pcm_of(sub.drain()[-25:])
            if abs(peak_hz(pcm, 48_000) - 700) < 5 and np.max(np.abs(pcm)) > 0.1:
                heard = True
                break
        assert heard, "700 Hz never heard in T01-H1-X2"
        assert node.engine.on_air("T01-H2-X1")["broadcast"] is None  # not its district
        # Someone else's token may not end it; the publisher's may.
        async with server.http.delete(f"{server.base}{location}",
                                      headers=await server.bearer("huyen2")) as r:
            assert r.status == 403
        async with server.http.delete(f"{server.base}{location}") as r:
            assert r.status == 401
        async with server.http.delete(f"{server.base}{location}",
                                      headers=await server.bearer("huyen1")) as r:
            assert r.status in (200, 204)
        await until(lambda: node.engine.on_air("T01-H1-X2")["broadcast"] is None,
                    "the live broadcast to end")
        assert server.node.webrtc.whip == {}
        await until(lambda: pc.connectionState == "closed", "the publisher's peer to close")
    finally:
        sub.close()
        await pc.close()


async def test_whip_publisher_leaving_ends_the_broadcast(server: Server) -> None:
    node = server.node
    pc = await whip_offer(700)
    status, answer, _ = await post_whip(server, "T01-H1-X1", pc, await server.bearer("xa11"))
    assert status == 201, answer
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    await until(lambda: pc.connectionState == "connected", "the publisher to connect")
    await until(lambda: node.engine.on_air("T01-H1-X1")["broadcast"] is not None, "on air")
    assert node.engine.on_air("T01-H1-X1")["title"] == "Trực tiếp"
    await pc.close()
    await until(lambda: node.engine.on_air("T01-H1-X1")["broadcast"] is None,
                "the broadcast to end when the publisher leaves")
    assert server.node.webrtc.whip == {}


async def test_whip_refusals(server: Server) -> None:
    node = server.node
    pc = await whip_offer(700)

    async def refused(targets: str, headers: dict[str, str], query: str = "") -> tuple[int, str]:
        status, body, _ = await post_whip(server, targets, pc, headers, query)
        return status, body

    assert (await refused("T01-H1", SDP))[0] == 401
    status, body = await refused("T01-H1", {"Authorization": "Bearer sai-roi", **SDP})
    assert status == 401 and " / " in body
    status, body = await refused("T01-H1-X2", await server.bearer("xa11"))
    assert status == 403 and "ngoài phạm vi" in body
    status, body = await refused("T01-H1-X1,T01-H1-X2", await server.bearer("xa11"))
    assert status == 403
    status, body = await refused("T01-H1", await server.bearer("huyen1"), "?class=emergency")
    assert status == 403 and "khẩn cấp" in body
    assert (await refused("T01-H1", await server.bearer("xem11")))[0] == 403  # a viewer
    assert (await refused("T01-H1-X1", await server.bearer("xem11")))[0] == 403
    assert (await refused("T01-H9", await server.bearer("huyen1")))[0] == 404
    assert (await refused("T01-H1", await server.bearer("huyen1"), "?class=loud"))[0] == 400
    headers = await server.bearer("huyen1")
    async with server.http.post(f"{server.base}/whip/T01-H1", data="v=0\r\nnonsense",
                                headers=headers) as r:
        assert r.status == 400
    pcmu = await whip_offer(700, "audio/pcmu")
    assert (await post_whip(server, "T01-H1", pcmu, headers))[0] == 406
    await pcmu.close()
    recv = offer_pc("recvonly")  # a WHEP-style offer sent to WHIP
    await recv.setLocalDescription(await recv.createOffer())
    assert (await post_whip(server, "T01-H1", recv, headers))[0] == 400
    await recv.close()
    await pc.close()
    # The province operator with the emergency right may; nothing else went on air.
    assert all(node.engine.on_air(a.code)["broadcast"] is None for a in node.tree)
    assert server.node.webrtc.whip == {}
    assert await node.store.find("broadcast") == []
    ok = await whip_offer(700)
    status, answer, location = await post_whip(server, "T01", ok, await server.bearer("tinh"),
                                               "?class=emergency")
    assert status == 201, answer
    await ok.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    await until(lambda: node.engine.on_air("T01-H2-X3")["class"] == "emergency", "emergency")
    async with server.http.delete(f"{server.base}{location}",
                                  headers=await server.bearer("tinh")) as r:
        assert r.status == 204
    await ok.close()


async def test_stopping_the_broadcast_closes_the_publisher(server: Server) -> None:
    node = server.node
    pc = await whip_offer(700)
    status, answer, _ = await post_whip(server, "T01-H2", pc, await server.bearer("huyen2"))
    assert status == 201, answer
    await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    await until(lambda: node.engine.on_air("T01-H2")["broadcast"] is not None, "on air")
    # Connected first: a peer closed mid-handshake has no DTLS to tell the client it is over.
    await until(lambda: pc.connectionState == "connected", "the publisher to connect")
    bid = str(node.engine.on_air("T01-H2")["broadcast"])
    node.station.stop(bid, by_area="T01")  # e.g. the province stops it from the API
    await until(lambda: not server.node.webrtc.whip, "the WHIP session to close")
    await until(lambda: pc.connectionState == "closed", "the publisher's peer to close")
    await pc.close()


async def test_whep_stock_sender_path(tmp_path: Path) -> None:
    """With direct_send off, aiortc's own sender packs the shared pre-encoded av.Packets."""
    srv, runner = await start_server(tmp_path, direct_send=False)
    try:
        srv.node.engine.start(Broadcast(ToneSource(440, 0.3), ["T01-H2"], issuer="T01-H2"))
        lst = await whep(srv, "T01-H2-X2")
        audio = await lst.until_tone(440)
        assert abs(peak_hz(audio, 48_000) - 440) < 5
        (stats,) = await srv.node.webrtc.whep_stats()
        assert stats["path"] == "stock" and stats["packets_sent"] > 0
        await lst.pc.close()
    finally:
        await srv.http.close()
        await runner.cleanup()
        await srv.node.stop()


async def test_slow_peer_drops_its_oldest_packets() -> None:
    track = PacketTrack(maxlen=3)
    packets = [av.Packet(bytes([i])) for i in range(5)]
    track.push(packets[:2])
    track.push(packets[2:])
    assert track.dropped == 2
    assert [bytes(await track.recv()) for _ in range(3)] == [b"\x02", b"\x03", b"\x04"]
    track.stop()


def test_bench_fanout_webrtc_latency_mode() -> None:
    """`loa bench fanout --transport webrtc --listeners 1` prints one JSON object with the
    figures, including WHIP->WHEP onsets actually detected."""
    out = subprocess.run(
        [sys.executable, "-m", "loa.web.cli", "bench", "fanout", "--transport", "webrtc",
         "--listeners", "1", "--seconds", "2"],
        capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)  # nothing else on stdout
    assert result["transport"] == "webrtc" and result["listeners"] == 1
    assert result["connected"] == 1 and result["delivered_ratio"] > 0
    for key in ("seconds", "server_cpu_fraction", "server_cpu_per_listener", "peers_per_core",
                "max_lateness_ms"):
        assert key in result
    lat = result["whip_to_whep_ms"]
    assert lat["bursts"] >= 1 and lat["p50"] > 0
