"""RTP out from the outside: ffmpeg plays the multicast groups from the served SDP, plain UDP
sockets check the wire format, RTCP and SAP; all on loopback (interface 127.0.0.1, TTL 0)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time
import wave
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import ClientSession

from loa.codecs.encoders import Packet
from loa.relay.rtp import wire
from loa.relay.rtp.groups import GroupAllocator, PoolExhausted, node_pool
from loa.relay.rtp.out import RtpConfigError, RtpSettings, check_settings
from loa.relay.rtp.sap import sap_packet
from loa.relay.rtp.sdp import SdpError, parse_sdp
from loa.relay.rtp.wire import NTP_EPOCH_OFFSET
from loa.streamer.broadcast import Broadcast
from loa.streamer.sources import ToneSource
from loa.web.cli import main as cli_main
from loa.web.config import Config, ConfigError, load_config
from loa.web.node import Node
from loa.web.streams.rtp import rtp_stats
from loa.web.testing import LiveNode, start_node
from tests.apiclient import make_config, running_api
from tests.audio import decode_packets, peak_hz
from tests.helpers import until

LOCAL = "127.0.0.1"
AREA = "T01-H1"
WAIT = 15.0  # seconds a test waits for something that should take well under one


# ---- helpers ---------------------------------------------------------------------------------
def udp_pair() -> tuple[socket.socket, socket.socket]:
    """Bound sockets on an even port and port + 1 (RTP, RTCP) of 127.0.0.1."""
    for _ in range(200):
        port = random.randrange(20_000, 60_000, 2)
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            a.bind((LOCAL, port))
            b.bind((LOCAL, port + 1))
        except OSError:
            a.close()
            b.close()
            continue
        return a, b
    raise RuntimeError("no free UDP port pair")


def rtp_settings(cfg: Any, **kw: Any) -> None:
    """Loopback-only RTP on a port and group block of its own (runs may overlap)."""
    cfg.rtp.enabled = True
    cfg.rtp.interface = LOCAL
    cfg.rtp.ttl = 0
    cfg.rtp.port = random.randrange(20_000, 60_000, 2)
    cfg.rtp.group_base = f"239.255.{random.randrange(0, 200)}.0"
    cfg.rtp.pool_size = 64
    for k, v in kw.items():
        setattr(cfg.rtp, k, v)


def parse_rtp(data: bytes) -> wire.RtpHeader:
    assert data[0] == 0x80, f"RTP v2 without padding/extension/CSRC, got {data[0]:#x}"
    return wire.parse_rtp(data)


@dataclass
class SenderReport:
    ssrc: int
    ntp: float  # Unix epoch seconds
    rtp: int
    packets: int
    octets: int
    cname: str
    bye: bool


def parse_rtcp(data: bytes) -> SenderReport:
    """A compound packet that must start with an SR and carry an SDES CNAME."""
    off = 0
    sr: dict[str, Any] = {}
    cname = ""
    bye = False
    while off < len(data):
        b0, pt, length = struct.unpack_from("!BBH", data, off)
        assert b0 >> 6 == 2
        end = off + 4 * (length + 1)
        assert end <= len(data)
        if pt == 200:
            assert off == 0, "a compound RTCP packet starts with the SR"
            ssrc, sec, frac, rtp, packets, octets = struct.unpack_from("!IIIIII", data, off + 4)
            sr = {"ssrc": ssrc, "ntp": sec - NTP_EPOCH_OFFSET + frac / 2**32, "rtp": rtp,
                  "packets": packets, "octets": octets}
        elif pt == 202:
            pos = off + 8
            assert struct.unpack_from("!I", data, off + 4)[0] == sr["ssrc"]
            while data[pos] != 0:
                kind, n = data[pos], data[pos + 1]
                if kind == 1:
                    cname = data[pos + 2:pos + 2 + n].decode()
                pos += 2 + n
        elif pt == 203:
            bye = True
        off = end
    assert sr, "no sender report"
    return SenderReport(cname=cname, bye=bye, **sr)


class Collector(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.items: list[tuple[float, bytes]] = []  # (wall arrival, datagram)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.items.append((time.time(), data))


async def collect(sock: socket.socket) -> tuple[asyncio.DatagramTransport, Collector]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Collector, sock=sock)
    return transport, proto


class Server(LiveNode):
    @property
    def out(self) -> Any:
        return self.node.rtp


async def start_server(tmp_path: Path, configure: Callable[[Config], None] | None = None,
                       **rtp: Any) -> Server:
    cfg = make_config(tmp_path)
    rtp_settings(cfg, **rtp)
    live = await start_node(cfg, configure=configure, host=LOCAL, access_log=None)
    return Server(live.node, live.app, live.runner, live.url, live.port)


@asynccontextmanager
async def serving(tmp_path: Path, configure: Callable[[Config], None] | None = None,
                  **rtp: Any) -> AsyncIterator[Server]:
    srv = await start_server(tmp_path, configure, **rtp)
    try:
        yield srv
    finally:
        await srv.stop()


def tone(node: Node, hz: float, targets: list[str], issuer: str) -> str:
    return node.engine.start(Broadcast(ToneSource(hz, 0.3), targets, issuer=issuer,
                                       title=f"{hz:g} Hz"))


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return data.astype(np.float32) / 32768, w.getframerate()


# ---- ffmpeg plays the groups -----------------------------------------------------------------
async def test_ffmpeg_plays_multicast_and_follows_preemption(tmp_path: Path) -> None:
    async with serving(tmp_path, codecs="opus,pcmu,mp3") as server:
        tone(server.node, 440, [AREA], AREA)
        seconds = 4.0
        procs: dict[str, asyncio.subprocess.Process] = {}
        progress: dict[str, float] = {}
        async with ClientSession() as http:
            for codec in ("opus", "pcmu", "mp3"):
                r = await http.get(f"{server.url}/streams/{AREA}.sdp", params={"codec": codec})
                assert r.status == 200
                sdp = tmp_path / f"{codec}.sdp"
                sdp.write_bytes(await r.read())
                # -localaddr joins the group on loopback (this host also has a default route)
                procs[codec] = await asyncio.create_subprocess_exec(
                    "ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error",
                    "-protocol_whitelist", "file,udp,rtp", "-localaddr", LOCAL,
                    "-i", str(sdp), "-t", str(seconds), "-ac", "1", "-progress", "pipe:1",
                    "-stats_period", "0.1", "-y", str(tmp_path / f"{codec}.wav"),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

        async def follow(codec: str) -> None:
            out = procs[codec].stdout
            assert out is not None
            async for line in out:
                if line.startswith(b"out_time_us="):
                    try:
                        progress[codec] = int(line.split(b"=")[1]) / 1e6
                    except ValueError:
                        pass

        async def errors(codec: str) -> bytes:
            err = procs[codec].stderr
            assert err is not None
            return await err.read()

        readers = [asyncio.create_task(follow(c)) for c in procs]
        stderr = {c: asyncio.create_task(errors(c)) for c in procs}
        try:
            await until(lambda: len(progress) == 3 and min(progress.values()) >= 1.0,
                        "ffmpeg to decode a second of every stream")
            # The province preempts: the district moves to the province's composition.
            tone(server.node, 880, ["T01"], "T01")
            for codec, p in procs.items():
                await asyncio.wait_for(p.wait(), WAIT)
                err = await stderr[codec]
                assert p.returncode == 0, f"ffmpeg {codec}: {err.decode()[-500:]}"
        finally:
            for p in procs.values():
                if p.returncode is None:
                    p.kill()
                    await p.wait()
            for t in [*readers, *stderr.values()]:
                t.cancel()
        for codec in procs:
            pcm, rate = read_wav(tmp_path / f"{codec}.wav")
            assert pcm.shape[0] >= int(rate * (seconds - 0.1)), codec
            before = pcm[int(0.2 * rate):int(0.9 * rate)]
            after = pcm[int(3.0 * rate):int(3.9 * rate)]
            assert abs(peak_hz(before, rate) - 440) < 5, codec
            assert abs(peak_hz(after, rate) - 880) < 5, codec


# ---- unicast: the wire format across a preemption ---------------------------------------------
async def test_unicast_sequence_and_timestamps_continue_across_preemption(
        tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        out = server.out
        tone(server.node, 440, [AREA], AREA)
        socks = {c: udp_pair() for c in ("opus", "pcmu")}
        got: dict[str, Collector] = {}
        transports = []
        for codec, (data, rtcp) in socks.items():
            rtcp.close()
            tr, got[codec] = await collect(data)
            transports.append(tr)
            out.add_receiver(AREA, codec, LOCAL, data.getsockname()[1])
        try:
            await until(lambda: min(len(c.items) for c in got.values()) >= 40, "packets")
            before = server.node.engine.on_air(AREA)["broadcast"]
            tone(server.node, 880, ["T01"], "T01")
            await until(lambda: server.node.engine.on_air(AREA)["broadcast"] != before, "preempt")
            mark = {c: len(got[c].items) for c in got}
            await until(lambda: min(len(got[c].items) - mark[c] for c in got) >= 40, "more")
        finally:
            for tr in transports:
                tr.close()
        for codec, step, pt in (("opus", 960, 111), ("pcmu", 160, 0)):
            pkts = [parse_rtp(d) for _, d in got[codec].items]
            assert {p.pt for p in pkts} == {pt}
            assert len({p.ssrc for p in pkts}) == 1
            for a, b in zip(pkts, pkts[1:], strict=False):
                assert b.seq == (a.seq + 1) & 0xFFFF, (codec, a.seq, b.seq)
                assert b.ts == (a.ts + step) & 0xFFFFFFFF, (codec, a.ts, b.ts)
            # the payload is the audio: the tone before, the province's tone after
            rate = 48_000 if codec == "opus" else 8_000
            packets = [Packet(codec, i * step, step, p.payload, rate) for i, p in enumerate(pkts)]
            pcm, r = decode_packets(codec, packets)
            per = pcm.shape[0] // len(pkts)
            assert abs(peak_hz(pcm[5 * per:30 * per], r) - 440) < 5, codec
            assert abs(peak_hz(pcm[-30 * per:], r) - 880) < 5, codec
            # the marker bit: never after the first packet, preemption included (whether the
            # first packet we got is the stream's first is a race with the stream's start)
            assert not any(p.marker for p in pkts[1:]), codec
        # the socket: EF, TTL 0, loopback interface, multicast loop on
        sock = out.stream(AREA, "opus").sock
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == 46 << 2
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL) == 0
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP) == 1
        assert socket.inet_ntoa(sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, 4)) \
            == LOCAL
        stats = {(s["area"], s["codec"]): s for s in rtp_stats(server.app)["streams"]}
        assert stats[(AREA, "opus")]["receivers"] == 1
        assert stats[(AREA, "opus")]["errors"] == 0


async def test_pcma_and_unicast_only_streams_start_with_the_first_receiver(
        tmp_path: Path) -> None:
    async with serving(tmp_path, codecs="pcmu,pcma", multicast=False) as server:
        out = server.out
        tone(server.node, 1000, [AREA], AREA)
        await asyncio.sleep(0.2)
        assert not any(s["active"] for s in rtp_stats(server.app)["streams"])  # nobody: no encode
        data, rtcp = udp_pair()
        rtcp.close()
        tr, col = await collect(data)
        try:
            out.add_receiver(AREA, "pcma", LOCAL, data.getsockname()[1])
            await until(lambda: len(col.items) >= 30, "pcma packets")
            assert out.remove_receiver(AREA, "pcma", LOCAL, data.getsockname()[1])
        finally:
            tr.close()
        pkts = [parse_rtp(d) for _, d in col.items]
        assert {p.pt for p in pkts} == {8}
        pcm, r = decode_packets("pcma", [Packet("pcma", 0, 160, p.payload, 8000) for p in pkts])
        assert abs(peak_hz(pcm[800:], r) - 1000) < 10
        st = {(s["area"], s["codec"]): s for s in rtp_stats(server.app)["streams"]}
        assert st[(AREA, "pcma")]["active"] is False  # the last receiver left: unsubscribed


async def test_mp3_frames_larger_than_a_packet_are_fragmented(tmp_path: Path) -> None:
    def bigger_frames(cfg: Config) -> None:
        cfg.encoders.mp3_bitrate = 64_000  # 192-byte frames at 24 kHz

    async with serving(tmp_path, bigger_frames, codecs="mp3", multicast=False,
                       max_payload=120) as server:
        tone(server.node, 440, [AREA], AREA)
        data, rtcp = udp_pair()
        rtcp.close()
        tr, col = await collect(data)
        try:
            server.out.add_receiver(AREA, "mp3", LOCAL, data.getsockname()[1])
            await until(lambda: len(col.items) >= 120, "mp3 fragments")
        finally:
            tr.close()
    pkts = [parse_rtp(d) for _, d in col.items]
    assert {p.pt for p in pkts} == {14}
    frames: list[bytes] = []
    stamps: list[int] = []
    for p in pkts:
        mbz, offset = struct.unpack_from("!HH", p.payload)
        assert mbz == 0 and len(p.payload) <= 120
        if offset == 0:
            frames.append(p.payload[4:])
            stamps.append(p.ts)
        else:
            assert p.ts == stamps[-1] and offset == len(frames[-1])  # same frame, next bytes
            frames[-1] += p.payload[4:]
    assert len(frames) < len(pkts)  # fragmented indeed
    for t0, t1 in zip(stamps, stamps[1:], strict=False):
        assert (t1 - t0) & 0xFFFFFFFF == 2160  # 576 samples at 24 kHz on the 90 kHz clock
    for a, b in zip(pkts, pkts[1:], strict=False):
        assert b.seq == (a.seq + 1) & 0xFFFF
    pcm, r = decode_packets("mp3", [Packet("mp3", 0, 576, f, 24_000) for f in frames[1:]])
    assert abs(peak_hz(pcm[2400:], r) - 440) < 5


# ---- RTCP ------------------------------------------------------------------------------------
async def test_rtcp_sender_reports_map_ntp_to_rtp(tmp_path: Path) -> None:
    async with serving(tmp_path, codecs="opus", multicast=False, rtcp_interval=0.3) as server:
        out = server.out
        tone(server.node, 440, [AREA], AREA)
        data, rtcp = udp_pair()
        port = data.getsockname()[1]
        tr1, pkts = await collect(data)
        tr2, reports = await collect(rtcp)
        try:
            out.add_receiver(AREA, "opus", LOCAL, port)
            await until(lambda: len(reports.items) >= 4, "four sender reports")
            rtp = [parse_rtp(d) for _, d in pkts.items]
            srs = [(t, parse_rtcp(d)) for t, d in reports.items[:4]]
            info = next(s for s in rtp_stats(server.app)["streams"] if s["codec"] == "opus"
                        and s["area"] == AREA)
            await server.stop()  # the stream says goodbye
            await until(lambda: parse_rtcp(reports.items[-1][1]).bye, "an RTCP BYE")
        finally:
            tr1.close()
            tr2.close()
        for arrival, sr in srs:
            assert sr.ssrc == rtp[0].ssrc == info["ssrc"]
            assert sr.cname.startswith("loa@")
            assert not sr.bye
            # the SR follows the data packet whose timestamp it carries: the mapping is exact
            idx = [i for i, p in enumerate(rtp) if p.ts == sr.rtp]
            assert len(idx) == 1, "SR timestamp is one of the packets'"
            sent = rtp[:idx[0] + 1]
            assert sr.packets == len(sent)  # the stream started with this receiver
            assert sr.octets == sum(len(p.payload) for p in sent)
            # NTP = wall clock of that packet's media position (the engine's epoch mapping)
            sample = (sr.rtp - info["ts_offset"]) & 0xFFFFFFFF  # Opus: 48 kHz clock = samples
            assert abs(sr.ntp - server.node.station.wall(sample)) < 1e-6
            assert abs(arrival - sr.ntp) < 2.0  # NTP era and epoch are right
        # successive reports lie on one line: 48,000 RTP units per NTP second
        for (_, a), (_, b) in zip(srs, srs[1:], strict=False):
            assert abs(((b.rtp - a.rtp) & 0xFFFFFFFF) - (b.ntp - a.ntp) * 48_000) < 1.0
        # the first report comes with the stream's first batch (the hub may hand over a few
        # buffered packets at once), not an interval (15 packets) later
        assert srs[0][1].packets <= 8, [s.packets for _, s in srs]


# ---- failures stay with their receiver -------------------------------------------------------
async def test_dead_receivers_do_not_disturb_a_live_one(tmp_path: Path) -> None:
    async with serving(tmp_path, codecs="opus") as server:
        out = server.out
        tone(server.node, 440, [AREA], AREA)
        closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closed.bind((LOCAL, 0))
        closed_port = closed.getsockname()[1]
        closed.close()  # nothing listens: every packet draws an ICMP port unreachable
        out.add_receiver(AREA, "opus", LOCAL, closed_port)
        # a broadcast address without SO_BROADCAST: every send fails at once (EACCES), locally
        out.add_receiver(AREA, "opus", "127.255.255.255", 40_000)
        data, rtcp = udp_pair()
        rtcp.close()
        tr, col = await collect(data)
        try:
            out.add_receiver(AREA, "opus", LOCAL, data.getsockname()[1])
            await until(lambda: len(col.items) >= 50, "50 packets")
        finally:
            tr.close()
        pkts = [parse_rtp(d) for _, d in col.items]
        for a, b in zip(pkts, pkts[1:], strict=False):
            assert b.seq == (a.seq + 1) & 0xFFFF
            assert b.ts == (a.ts + 960) & 0xFFFFFFFF
        bad = {(r.host, r.port): r for r in out.receivers(AREA, "opus")}
        assert bad[("127.255.255.255", 40_000)].errors >= 50
        assert bad[("127.255.255.255", 40_000)].as_dict()["last_error"] == "EACCES"
        assert bad[(LOCAL, closed_port)].errors == 0  # ICMP is never read back as a send error
        assert bad[(LOCAL, data.getsockname()[1])].errors == 0


async def test_bad_receivers_are_refused(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    rtp_settings(cfg)
    async with running_api(cfg) as api:
        out = api.node.rtp
        with pytest.raises(ValueError, match="IPv4"):
            out.add_receiver(AREA, "opus", "speaker.example", 5004)
        with pytest.raises(ValueError, match="1-65534"):
            out.add_receiver(AREA, "opus", LOCAL, 70_000)
        with pytest.raises(KeyError, match="unknown area"):
            out.add_receiver("NOPE", "opus", LOCAL, 5004)
        with pytest.raises(KeyError, match="codec mp3"):
            out.add_receiver(AREA, "mp3", LOCAL, 5004)
        assert not out.remove_receiver(AREA, "opus", LOCAL, 5004)
        assert rtp_stats(api.client.app)["receivers"] == 0  # type: ignore[arg-type]


async def test_a_starved_sender_skips_stale_packets_and_stays_continuous(
        tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    rtp_settings(cfg, codecs="pcmu", multicast=False)
    async with running_api(cfg) as api:  # virtual clock: the test hands packets itself
        out = api.node.rtp
        data, rtcp = udp_pair()
        rtcp.close()
        tr, col = await collect(data)
        try:
            out.add_receiver(AREA, "pcmu", LOCAL, data.getsockname()[1])
            st = out.stream(AREA, "pcmu")
            silence = bytes([0xFF]) * 160
            st.send([Packet("pcmu", 0, 160, silence, 8000)], time.monotonic())
            st.send([Packet("pcmu", 160, 160, silence, 8000)], time.monotonic() - 1.0)
            st.send([Packet("pcmu", 320, 160, silence, 8000)], time.monotonic())
            await until(lambda: len(col.items) >= 2, "two packets")
        finally:
            tr.close()
        a, b = (parse_rtp(d) for _, d in col.items)
        assert b.seq == (a.seq + 1) & 0xFFFF  # nothing was sent for the stale packet
        assert (b.ts - a.ts) & 0xFFFFFFFF == 320  # and the timestamps show the gap
        assert rtp_stats(api.client.app)["dropped"] == 1  # type: ignore[arg-type]


# ---- SDP over HTTP ---------------------------------------------------------------------------
async def test_sdp_served_for_known_area_404_otherwise(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    rtp_settings(cfg, codecs="opus,pcmu,pcma,mp3")
    async with running_api(cfg) as api:
        streams = {(s["area"], s["codec"]): s for s in rtp_stats(api.client.app)["streams"]}  # type: ignore[arg-type]
        assert len(streams) == 9 * 4
        assert len({s["group"] for s in streams.values()}) == 36  # every stream its own group
        status, text = await api.call(None, "GET", f"/streams/{AREA}.sdp")
        assert status == 200
        sdp = parse_sdp(text)
        assert sdp["name"] == "Huyện 1 (Opus)"
        m = sdp["media"][0]
        assert sdp["connection"] == {"address": streams[(AREA, "opus")]["group"], "ttl": 0,
                                     "nettype": "IN", "addrtype": "IP4"}
        assert (m["media"], m["port"], m["proto"], m["formats"]) == \
            ("audio", cfg.rtp.port, "RTP/AVP", ["111"])
        assert m["rtpmap"][111] == {"encoding": "opus", "clock": 48_000, "channels": 2}
        assert "sprop-stereo=0" in m["fmtp"][111]
        want = {"pcmu": (0, "PCMU", 8000), "pcma": (8, "PCMA", 8000), "mp3": (14, "MPA", 90000)}
        for codec, (pt, enc, clock) in want.items():
            r = await api.client.get(f"/streams/{AREA}.sdp", params={"codec": codec})
            assert r.status == 200
            assert r.content_type == "application/sdp"
            m = parse_sdp(await r.text())["media"][0]
            assert m["formats"] == [str(pt)]
            assert parse_sdp(await r.text())["name"] == f"Huyện 1 ({enc.replace('MPA', 'MP3')})"
            assert m["rtpmap"][pt]["encoding"] == enc and m["rtpmap"][pt]["clock"] == clock
        status, body = await api.call(None, "GET", "/streams/NOPE.sdp")
        assert status == 404 and body["error"] == "không có khu vực / unknown area NOPE"
        status, body = await api.call(None, "GET", f"/streams/{AREA}.sdp?codec=aac")
        assert status == 404 and "codec aac" in body["error"] and body["field"] == "codec"


async def test_sdp_404_when_rtp_is_off(tmp_path: Path) -> None:
    async with running_api(make_config(tmp_path)) as api:
        status, body = await api.call(None, "GET", f"/streams/{AREA}.sdp")
        assert status == 404
        assert body["error"].startswith("RTP chưa bật") and "not enabled" in body["error"]
        assert rtp_stats(api.client.app)["enabled"] is False  # type: ignore[arg-type]


# ---- groups stay put --------------------------------------------------------------------------
async def test_groups_are_stable_across_restart_and_new_areas(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    rtp_settings(cfg)

    async def groups(api: Any) -> dict[tuple[str, str], str]:
        return {(s["area"], s["codec"]): s["group"]
                for s in rtp_stats(api.client.app)["streams"]}

    async with running_api(cfg) as api:
        first = await groups(api)
        status, _ = await api.call("qtv1", "POST", "/api/v1/areas", json={
            "code": "T01-H1-X9", "name": "Xã mới", "level": "commune", "parent": AREA})
        assert status == 201
        status, text = await api.call(None, "GET", "/streams/T01-H1-X9.sdp")
        assert status == 200  # a new area has its streams at once
        added = (await groups(api))[("T01-H1-X9", "opus")]
        assert parse_sdp(text)["connection"]["address"] == added
    async with running_api(cfg) as api:  # restarted node, same data directory
        again = await groups(api)
    assert {k: again[k] for k in first} == first
    assert again[("T01-H1-X9", "opus")] == added
    saved = json.loads((cfg.data_dir / "rtp-groups.json").read_text())
    assert set(saved["blocks"]) == {k[0] for k in again}


def test_allocator_collisions_and_exhaustion(tmp_path: Path) -> None:
    import ipaddress

    base = ipaddress.IPv4Address("239.72.0.0")
    a = GroupAllocator(base, 4, tmp_path / "g.json")
    codes = [f"A{i}" for i in range(4)]
    blocks = {c: a.block(c) for c in codes}
    assert sorted(blocks.values()) == [0, 1, 2, 3]  # collisions took the next free block
    assert a.group("A0", "pcmu") == str(base + blocks["A0"] * 4 + 1)
    with pytest.raises(PoolExhausted):
        a.block("A4")
    a.save()
    # another order of arrival, same recorded result; a bigger pool keeps every block
    b = GroupAllocator(base, 8, tmp_path / "g.json")
    b.load()
    assert {c: b.block(c) for c in reversed(codes)} == blocks
    # a shrunk pool moves only the areas beyond it
    c = GroupAllocator(base, 2, tmp_path / "g.json")
    c.load()
    assert set(c.slots) == {k for k, v in blocks.items() if v < 2}
    (tmp_path / "g.json").write_text("{garbage")
    d = GroupAllocator(base, 4, tmp_path / "g.json")
    d.load()  # unreadable: logged, allocated afresh, never a crash
    assert d.slots == {} and d.dirty


# ---- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize(("env", "message"), [
    ({"LOA_RTP_GROUP_BASE": "300.1.2.3"}, "[rtp] group_base"),
    ({"LOA_RTP_GROUP_BASE": "10.0.0.1"}, "không phải địa chỉ multicast"),
    ({"LOA_RTP_GROUP_BASE": "239.255.255.250"}, "runs past the multicast range"),
    ({"LOA_RTP_CODECS": "opus,aac"}, "[rtp] codecs"),
    ({"LOA_RTP_TTL": "300"}, "[rtp] ttl"),
    ({"LOA_RTP_INTERFACE": "eth0"}, "[rtp] interface"),
])
async def test_garbage_config_fails_clearly_at_start(tmp_path: Path, env: dict[str, str],
                                                     message: str) -> None:
    cfg = load_config(None, env={"LOA_RTP_ENABLED": "1", **env}, data=str(tmp_path / "d"))
    node = Node(cfg, realtime=False)
    try:
        with pytest.raises(ConfigError) as e:
            await node.start()
        assert message in str(e.value)
    finally:
        await node.stop()


async def test_interface_not_on_this_host_fails_at_start(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    rtp_settings(cfg, interface="192.0.2.254")  # TEST-NET-1: never a local address here
    node = Node(cfg, realtime=False)
    try:
        with pytest.raises(ConfigError, match="not an address of this host"):
            await node.start()
    finally:
        await node.stop()


def test_check_settings_accepts_defaults() -> None:
    checked = check_settings(RtpSettings())
    assert checked.codecs == ("opus", "pcmu")
    assert checked.blocks == 1024
    with pytest.raises(RtpConfigError):
        check_settings(RtpSettings(port=65535))


# ---- SAP -------------------------------------------------------------------------------------
async def test_sap_announces_and_deletes_the_sessions(tmp_path: Path) -> None:
    sap_port = random.randrange(20_000, 60_000)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("224.2.127.254", sap_port))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                    socket.inet_aton("224.2.127.254") + socket.inet_aton(LOCAL))
    tr, col = await collect(sock)
    srv = await start_server(tmp_path, sap=True, sap_port=sap_port, sap_interval=0.5,
                             sap_bandwidth=1_000_000, codecs="opus,pcmu")
    try:
        await until(lambda: len(col.items) >= 18, "an announcement of every stream")
        groups = {(s["area"], s["codec"]): s["group"] for s in rtp_stats(srv.app)["streams"]}
        names = {a.code: a.name for a in srv.node.tree}
    finally:
        await srv.stop()
    await until(lambda: any(d[0] & 0x04 for _, d in col.items), "deletions")
    tr.close()
    seen: dict[tuple[str, str], str] = {}
    named: dict[tuple[str, str], str] = {}
    deleted = set()
    for _, d in col.items:
        flags, auth_len, _hash = struct.unpack_from("!BBH", d)
        assert flags >> 5 == 1 and auth_len == 0 and not flags & 0x10  # v1, IPv4 origin
        assert socket.inet_ntoa(d[4:8]) == LOCAL
        mime, _, body = d[8:].partition(b"\x00")
        assert mime == b"application/sdp"
        sdp = parse_sdp(body)
        area = next(v for k, v in sdp["attributes"] if k == "x-loa-area")
        codec = {"opus": "opus", "PCMU": "pcmu"}[sdp["media"][0]["rtpmap"][
            int(sdp["media"][0]["formats"][0])]["encoding"]]
        if flags & 0x04:
            deleted.add((area, codec))
        else:
            seen[(area, codec)] = sdp["connection"]["address"]
            named[(area, codec)] = sdp["name"]
    assert seen == groups
    assert deleted == set(groups)
    # A player (VLC's SAP list) shows s=: an area's two sessions are named apart, by codec.
    assert len(set(named.values())) == len(named) == 18
    assert named[(AREA, "opus")] == f"{names[AREA]} (Opus)"
    assert named[(AREA, "pcmu")] == f"{names[AREA]} (PCMU)"


# ---- SDP parsing -----------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "message"), [
    ("", "empty SDP"),
    ("hello", "line 1"),
    ("v=1\r\n", "v=0"),
    ("v=0\r\no=- x 1 IN IP4 1.2.3.4\r\ns=a\r\nt=0 0\r\n", "session id"),
    ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=a\r\n", "missing t="),
    ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=a\r\nt=0 0\r\nm=audio 5004 RTP/AVP 0\r\n",
     "no c= address"),
    ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=a\r\nc=IN IP4 239.1.1.1/999\r\nt=0 0\r\n", "TTL"),
    ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=a\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\n"
     "m=audio 99999 RTP/AVP 0\r\n", "port"),
    ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=a\r\nc=IN IP4 1.2.3.4\r\nt=0 0\r\n"
     "m=audio 5004 RTP/AVP 96\r\na=rtpmap:96 opus\r\n", "rtpmap"),
])
def test_parse_sdp_rejects_malformed(text: str, message: str) -> None:
    with pytest.raises(SdpError, match=message):
        parse_sdp(text)


def test_parse_rtp_reads_any_rfc3550_header_and_refuses_garbage() -> None:
    """The receiver side of the wire format (what a device's RTP input parses)."""
    for bad in (b"", b"\x80", b"\x40" + bytes(11), b"\xa0\x6f" + bytes(10) + b"\x00",
                b"\x81" + bytes(11), b"\x90\x00" + bytes(10) + b"\x00\x00\x00\x05"):
        with pytest.raises(wire.BadPacket):
            wire.parse_rtp(bad)
    # marker, PT 111, one CSRC, a one-word header extension, 3 bytes of padding
    h = wire.parse_rtp(b"\xb1\xef\x00\x07" + (1234).to_bytes(4, "big") + (9).to_bytes(4, "big")
                       + b"\x00\x00\x00\x42" + b"\xbe\xde\x00\x01" + b"\xaa\xbb\xcc\xdd"
                       + b"payload" + b"\x00\x00\x03")
    assert (h.marker, h.pt, h.seq, h.ts, h.ssrc, h.payload) == (True, 111, 7, 1234, 9,
                                                                b"payload")
    buf = bytearray(16)
    wire.pack_rtp_header_into(buf, False, 0, 65535, 0xFFFFFFFF, 0xDEADBEEF)
    buf[12:] = b"\xff\x7f\x00\x01"
    h = wire.parse_rtp(bytes(buf))
    assert (h.marker, h.pt, h.seq, h.ts, h.ssrc, h.payload) == (
        False, 0, 65535, 0xFFFFFFFF, 0xDEADBEEF, b"\xff\x7f\x00\x01")


def test_parse_sdp_reads_a_foreign_description() -> None:
    text = ("v=0\no=alice 2890844526 2890842807 IN IP4 10.47.16.5\ns=SDP Seminar\n"
            "i=A Seminar\nu=http://www.example.com/seminars/sdp.pdf\nc=IN IP4 224.2.17.12/127\n"
            "t=2873397496 2873404696\na=recvonly\nm=audio 49170 RTP/AVP 0 96\n"
            "a=rtpmap:96 opus/48000/2\na=fmtp:96 minptime=10;useinbandfec=1\na=ptime:20\n")
    sdp = parse_sdp(text)
    assert sdp["connection"]["ttl"] == 127
    assert sdp["attributes"] == [("recvonly", None)]
    m = sdp["media"][0]
    assert m["formats"] == ["0", "96"] and m["fmtp"][96] == "minptime=10;useinbandfec=1"
    assert ("ptime", "20") in m["attributes"]


# ---- the benchmark runs ----------------------------------------------------------------------
def test_bench_fanout_rtp_small(capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("loa.web.bench.rtp.WARMUP_SECONDS", 0.3)
    monkeypatch.setattr("loa.web.bench.rtp.BASELINE_SECONDS", 0.5)
    rc = cli_main(["bench", "fanout", "--transport", "rtp", "--listeners", "20",
                   "--seconds", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert len(out) == 1
    r = json.loads(out[0])
    assert (r["transport"], r["listeners"]) == ("rtp", 20)
    assert r["delivered_ratio"] == 1.0
    assert r["packets_received"] == r["packets_expected"] > 0
    assert r["send_errors"] == 0
    for k in ("server_cpu_fraction", "receivers_per_core", "max_lateness_ms", "seconds"):
        assert r[k] is not None and r[k] > 0
    # The fan-out cost is a difference of two noisy CPU figures: on a busy machine it can round
    # to zero for 20 receivers, never below.
    assert r["server_cpu_per_listener"] is not None and r["server_cpu_per_listener"] >= 0


# ---- RTCP timing of a new session (virtual RTCP clock) ---------------------------------------
async def test_sender_reports_come_at_once_and_fast_at_first(tmp_path: Path) -> None:
    """A device that joins waits for one SR to synchronise: the first comes with the first
    packets, the next few a second apart, then every rtcp_interval; a new receiver restarts it."""
    async with serving(tmp_path, codecs="opus", multicast=False, rtcp_interval=5.0) as server:
        out = server.out
        now = [1000.0]  # the RTCP schedule's clock, moved by the test
        out.clock = lambda: now[0]
        tone(server.node, 440, [AREA], AREA)
        data, rtcp = udp_pair()
        tr1, pkts = await collect(data)
        tr2, reports = await collect(rtcp)
        data2, rtcp2 = udp_pair()
        tr3, _ = await collect(data2)
        tr4, reports2 = await collect(rtcp2)
        try:
            out.add_receiver(AREA, "opus", LOCAL, data.getsockname()[1])
            st = out.stream(AREA, "opus")
            await until(lambda: len(reports.items) >= 1, "the first sender report")
            assert parse_rtcp(reports.items[0][1]).packets <= 8  # with the first packets
            gaps = []
            for k in range(6):
                gaps.append(st.next_sr - st.last_sr)
                now[0] = st.next_sr  # that much later
                await until(lambda k=k: len(reports.items) >= k + 2, f"sender report {k + 2}")
            assert gaps == [1.0, 1.0, 1.0, 1.0, 5.0, 5.0]
            # A receiver joins in the middle of a 5 s interval: a report at once, fast again.
            now[0] += 2.0
            out.add_receiver(AREA, "opus", LOCAL, data2.getsockname()[1])
            await until(lambda: len(reports2.items) >= 1, "a report for the new receiver")
            assert st.next_sr - st.last_sr == 1.0
            assert all(not parse_rtcp(d).bye for _, d in reports.items)
            # Back to 5 s; then a listener unknown so far (of a group) sends its first RR.
            while st.next_sr - st.last_sr != 5.0:
                n = len(reports.items)
                now[0] = st.next_sr
                await until(lambda n=n: len(reports.items) > n, "a sender report")
            n = len(reports.items)
            now[0] += 1.0
            rr = receiver_report(0xC0FFEE, st.ssrc, 0, 0, 1, 0)
            data2.sendto(rr, (LOCAL, out.settings.port + 1))
            await until(lambda: len(reports.items) > n, "a report for the new listener")
            assert st.next_sr - st.last_sr == 1.0  # and the fast series again
        finally:
            for tr in (tr1, tr2, tr3, tr4):
                tr.close()


# ---- receiver reports ---------------------------------------------------------------------------
def receiver_report(reporter: int, source: int, fraction: int, lost: int, seq: int,
                    jitter: int) -> bytes:
    """An RTCP RR with one report block, plus an SDES CNAME, as a device sends it."""
    block = struct.pack("!IIIIII", source, (fraction << 24) | (lost & 0xFFFFFF), seq, jitter,
                        0, 0)
    rr = struct.pack("!BBHI", 0x81, 201, 7, reporter) + block
    cname = b"device@x"
    chunk = struct.pack("!IBB", reporter, 1, len(cname)) + cname + b"\x00"
    chunk += b"\x00" * (-len(chunk) % 4)
    return rr + struct.pack("!BBH", 0x81, 202, len(chunk) // 4) + chunk


async def test_receiver_reports_show_in_the_monitor(tmp_path: Path) -> None:
    """RRs from real sockets, to the group's RTCP port (multicast) and to the node's (unicast),
    show up per receiver in /api/v1/monitor and /metrics; malformed RTCP is counted, ignored."""
    cfg = make_config(tmp_path)
    rtp_settings(cfg, codecs="opus,pcmu")
    async with running_api(cfg) as api:
        out = api.node.rtp
        opus, pcmu = out.stream(AREA, "opus"), out.stream(AREA, "pcmu")
        mc = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        mc.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LOCAL))
        mc.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
        uc = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        uc.bind((LOCAL, 0))
        rtcp_port = cfg.rtp.port + 1
        try:
            # A listener of the multicast group: 25 % lost lately, 12 in all, 480/48 kHz jitter.
            mc.sendto(receiver_report(0xD00D, opus.ssrc, 64, 12, 70_000, 480),
                      (opus.group, rtcp_port))
            # A unicast device on PCMU: RTCP back to the node's own address.
            uc.sendto(receiver_report(0xBEEF, pcmu.ssrc, 0, 0, 5_000, 80), (LOCAL, rtcp_port))
            for junk in (b"\x00" * 3, b"\x81\xc9\x00\x07" + b"\x00" * 8, b"hello world, not rtcp",
                         struct.pack("!BBHI", 0x9F, 201, 1, 1)):  # 31 blocks claimed, none there
                uc.sendto(junk, (LOCAL, rtcp_port))
            await until(lambda: out.rtcp_reports >= 2 and out.rtcp_malformed >= 4, "the reports")
        finally:
            mc.close()
        status, body = await api.call("huyen1", "GET", f"/api/v1/monitor?area={AREA}")
        assert status == 200, body
        area = next(a for a in body["areas"] if a["code"] == AREA)
        rtp = {s["codec"]: s for s in area["rtp"]}
        [mrep] = rtp["opus"]["reports"]
        assert mrep["ssrc"] == 0xD00D and mrep["fraction_lost"] == 0.25 and mrep["lost"] == 12
        assert mrep["jitter_ms"] == 10.0 and mrep["highest_seq"] == 70_000
        assert abs(mrep["last_seen"] - time.time()) < 60
        [urep] = rtp["pcmu"]["reports"]
        assert urep["ssrc"] == 0xBEEF and urep["host"] == LOCAL
        assert urep["port"] == uc.getsockname()[1] and urep["jitter_ms"] == 10.0
        assert body["node"]["transports"]["rtp"]["rtcp_malformed"] == 4
        uc.close()
        status, text = await api.call(None, "GET", "/metrics")
        assert status == 200
        assert f'loa_rtp_receiver_loss_max{{area="{AREA}",codec="opus"}} 0.25' in text
        assert "loa_rtcp_malformed_total 4" in text


# ---- groups unique per deployment --------------------------------------------------------------
def groups_of(server: Server) -> dict[tuple[str, str], str]:
    return {(s["area"], s["codec"]): s["group"] for s in rtp_stats(server.app)["streams"]}


async def test_lone_nodes_take_pools_of_their_own_and_keep_them(tmp_path: Path) -> None:
    """Two nodes with the same areas on one network, group_base left empty: disjoint groups
    (each node's pool from its id), kept across a restart in rtp-groups.json."""
    got = {}
    for name in ("node-a", "node-b"):
        data = tmp_path / name / "data"
        data.mkdir(parents=True)
        (data / "node-id").write_text(name + "\n")
        async with serving(tmp_path / name, group_base="") as server:
            got[name] = groups_of(server)
            assert server.out.alloc.base == node_pool(name, 64)
    assert set(got["node-a"]) == set(got["node-b"])
    assert not set(got["node-a"].values()) & set(got["node-b"].values())
    saved = json.loads((tmp_path / "node-a" / "data" / "rtp-groups.json").read_text())
    assert saved["group_base"] == str(node_pool("node-a", 64))
    (tmp_path / "node-a" / "data" / "node-id").write_text("renamed\n")  # the file wins
    async with serving(tmp_path / "node-a", group_base="") as server:
        assert groups_of(server) == got["node-a"]


async def test_clustered_nodes_share_one_allocation(tmp_path: Path, redis_url: str,
                                                    redis_prefix: str) -> None:
    def clustered(cfg: Config) -> None:
        cfg.store = redis_url
        cfg.store_prefix = redis_prefix

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = await asyncio.gather(start_server(tmp_path / "a", clustered, group_base=""),
                                start_server(tmp_path / "b", clustered, group_base=""))
    try:
        assert a.out.node_id != b.out.node_id
        ga, gb = groups_of(a), groups_of(b)
        assert ga == gb and len(set(ga.values())) == len(ga) == 9 * 2
        rows = await a.node.store.find("rtp_group")
        assert {r["id"] for r in rows} == {k[0] for k in ga}
        assert len({r["block"] for r in rows}) == len(rows)  # one block per area in the store
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_rival_allocators_on_one_store_never_share_a_block(tmp_path: Path, redis_url: str,
                                                                 redis_prefix: str) -> None:
    import ipaddress

    from loa.streamer.state.open import open_store

    store = await open_store(redis_url, tmp_path, redis_prefix)
    try:
        base = ipaddress.IPv4Address("239.72.0.0")
        areas = [f"A{i}" for i in range(40)]
        one, two = GroupAllocator(base, 64, None), GroupAllocator(base, 64, None)
        two.slots = {"A0": 5, "A1": 5 + 1}  # what a node had before it joined the cluster
        got = await asyncio.gather(one.claim(store, areas), two.claim(store, list(reversed(areas))))
        assert got[0] == got[1] == set(areas)
        assert one.slots == two.slots and len(set(one.slots.values())) == len(areas)
    finally:
        await store.close()


async def test_another_origin_announcing_our_group_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sap_port = random.randrange(20_000, 60_000)
    async with serving(tmp_path, sap=True, sap_port=sap_port, sap_interval=0.2,
                       sap_bandwidth=1_000_000, codecs="opus") as server:
        st = server.out.stream(AREA, "opus")
        await asyncio.sleep(0.5)  # our own announcements come back: no collision
        assert server.out.collisions == 0
        foreign = ("v=0\r\no=- 1 1 IN IP4 127.0.0.2\r\ns=Đài khác\r\n"
                   f"c=IN IP4 {st.group}/0\r\nt=0 0\r\nm=audio {st.port} RTP/AVP 0\r\n")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LOCAL))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
        try:
            s.sendto(b"\x20\x00\x00\x01" + b"garbage", ("224.2.127.254", sap_port))
            s.sendto(sap_packet(foreign, "127.0.0.2"), ("224.2.127.254", sap_port))
            await until(lambda: server.out.collisions >= 1, "the collision")
            s.sendto(sap_packet(foreign, "127.0.0.2"), ("224.2.127.254", sap_port))
            await until(lambda: server.out.collisions >= 2, "the second announcement")
        finally:
            s.close()
    logged = [r for r in caplog.records if "event=rtp_group_collision" in r.getMessage()]
    assert len(logged) == 1  # logged once, counted every time
    msg = logged[0].getMessage()
    assert f"group={st.group}" in msg and f"area={AREA}" in msg and "other_origin=127.0.0.2" in msg
