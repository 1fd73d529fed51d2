"""`loa device`: the reference loudspeaker agent (a complete IP loudspeaker cluster in software).

    loa device --server URL --key DEVICE_ID:KEY [--sink null|wav:FILE|default]
               [--transport http|rtp|webrtc] [--target-delay-ms 300] [--seconds S]

Control. One `DeviceClient` (relay/agent/client.py) holds the WebSocket: hello (capabilities:
Opus and G.711, transports http, rtp, webrtc with `--transport` first), welcome, commands acked
and executed once in order, heartbeats at the server's interval with telemetry (state, volume,
stream figures, network, power relays, faults, firmware "loa-agent/<version>"), reconnects with
back-off. Audio does not depend on the control channel: a device that loses its connection keeps
playing its area's stream.

Audio. The device plays the first stream of `welcome.config.streams` it supports (the server lists
them in the device's order of preference), falling back to the next after a failure:

- http/opus: Ogg Opus over HTTP (`/streams/A.opus`), read with aiohttp on the loop; Ogg pages are
  split into Opus packets here (timestamps from the granule positions: gaps are loss) and decoded
  with PyAV in the playout thread. Timing by arrival (no sender reports over HTTP).
- rtp: the SDP (`/streams/A.sdp`) names the multicast group and port; the agent joins it on the
  interface that faces the server (127.0.0.1 when the server is on loopback), reads RTP and RTCP
  (port + 1), decodes Opus/PCMU/PCMA with PyAV, measures loss (sequence numbers) and RFC 3550
  interarrival jitter, and plays synchronised: every sample at `ntp(sample) + target_delay`
  through the sender reports (relay/agent/playout.py).
- webrtc/opus: WHEP with aiortc (host candidates limited to the interface facing the server,
  relay/webrtc.py's helper); decoded frames are paced by arrival.

Sinks: `null` (discards; the playout records keep the instants), `wav:FILE` (48 kHz mono 16-bit,
plus `FILE.timing.csv`: per frame the stream timestamp, the ideal and the actual playout instant,
the source instant and the arrival), `default` (ALSA through `aplay` when it exists; refused with a
clear message otherwise).

Commands: play (area stream or an http(s) `url`), stop, volume, power (relays switched in order
with their delays, simulated and logged), reboot (the audio and the connection restart),
emergency (volume override and power on; off restores; `config.emergency` in a welcome or config
re-applies it), display (refused: a loudspeaker has no display). The configured volume applies
when it is new or changed, so a reconnect does not undo a `volume` command.

Network impairment for tests and demonstrations: `LOA_AGENT_IMPAIR="delay_ms=40,jitter_ms=20,
loss=0.01"` delays (and drops) RTP/RTCP datagrams on arrival, as a longer network path would.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import ipaddress
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO, TypeGuard, cast
from urllib.parse import urljoin, urlsplit

import aiohttp
import av
import numpy as np
import yarl

from loa.codecs.ogg import OggError, OggReader
from loa.codecs.opus import packet_samples
from loa.relay.agent.client import Command, DeviceClient, Outcome
from loa.relay.agent.playout import (
    SAMPLE_RATE,
    ArrivalTiming,
    BadPacket,
    Decoder,
    Jitter,
    Player,
    PlayRecord,
    RtpTiming,
    SeqStats,
    extend,
    parse_rtcp,
    parse_rtp,
)
from loa.relay.rtp.sdp import SdpError, parse_session

log = logging.getLogger("loa.agent")

CODECS = ["opus", "pcmu", "pcma"]
TRANSPORTS = ["http", "rtp", "webrtc"]
SUPPORTED = {("http", "opus"), ("rtp", "opus"), ("rtp", "pcmu"), ("rtp", "pcma"),
             ("webrtc", "opus")}
NO_DATA_TIMEOUT = 10.0  # seconds without media: the stream counts as failed
# Arrival timing plays an HTTP burst from its start: ask the server for a short one (Loa's
# default suits browsers, ~18 s at 32 kbit/s), so the loudspeaker stays near live.
HTTP_BURST_MS = 200
STALLED_AFTER = 10.0  # seconds playing without audio before the `stream_stalled` fault
IP_MULTICAST_ALL = 49  # Linux: only groups this socket joined


def version() -> str:
    try:
        return metadata.version("loa")
    except metadata.PackageNotFoundError:
        return "0"


FIRMWARE = f"loa-agent/{version()}"


class InputError(RuntimeError):
    """A stream that cannot be played (bad URL, refused, unsupported, no data)."""


# ---- sinks -------------------------------------------------------------------------------------
class NullSink:
    """Discards the audio; the player's records keep when each frame was played."""

    def write(self, pcm: np.ndarray, rec: PlayRecord) -> None:
        pass

    def close(self) -> None:
        pass


def to_s16(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2").tobytes()


class WavSink:
    """48 kHz mono 16-bit WAV, and FILE.timing.csv with each frame's instants."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._wav = wave.open(str(path), "wb")  # noqa: SIM115 - closed in close()
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(SAMPLE_RATE)
        self._timing: TextIO = open(f"{path}.timing.csv", "w", newline="",  # noqa: SIM115
                                    encoding="ascii")
        self._csv = csv.writer(self._timing)
        self._csv.writerow(["ts", "ideal", "played", "source", "arrival", "samples"])
        self.samples = 0

    def write(self, pcm: np.ndarray, rec: PlayRecord) -> None:
        self._wav.writeframes(to_s16(pcm))
        self._csv.writerow([rec.ts, f"{rec.ideal:.6f}", f"{rec.played:.6f}",
                            f"{rec.source:.6f}", f"{rec.arrival:.6f}", pcm.shape[0]])
        self.samples += pcm.shape[0]

    def close(self) -> None:
        self._wav.close()
        self._timing.close()


class AplaySink:
    """The sound card through ALSA's `aplay` (raw s16le 48 kHz mono on its stdin)."""

    def __init__(self) -> None:
        exe = shutil.which("aplay")
        if exe is None:
            raise SinkError("không có thiết bị âm thanh: cần 'aplay' (ALSA) / no sound device: "
                            "'default' needs ALSA's aplay; use --sink null or --sink wav:FILE")
        self._proc = subprocess.Popen([exe, "-q", "-t", "raw", "-f", "S16_LE", "-r",
                                       str(SAMPLE_RATE), "-c", "1", "-B", "100000"],
                                      stdin=subprocess.PIPE)

    def write(self, pcm: np.ndarray, rec: PlayRecord) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(to_s16(pcm))

    def close(self) -> None:
        if self._proc.stdin is not None:
            with suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(2.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()


class SinkError(ValueError):
    pass


def make_sink(spec: str) -> NullSink | WavSink | AplaySink:
    """`null`, `wav:FILE` or `default`; SinkError with a bilingual reason otherwise."""
    if spec == "null":
        return NullSink()
    if spec.startswith("wav:") and len(spec) > 4:
        path = Path(spec[4:]).expanduser()
        if not path.parent.is_dir():
            raise SinkError(f"không có thư mục / no such directory: {path.parent}")
        return WavSink(path)
    if spec == "default":
        return AplaySink()
    raise SinkError(f"sink không hợp lệ / unknown sink {spec!r}: null | wav:FILE | default")


# ---- decoders ------------------------------------------------------------------------------------
def _mono_float(frame: av.AudioFrame) -> np.ndarray:
    a = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if a.ndim == 2 and a.shape[0] == channels and channels > 1:  # planar
        a = a[0]
    else:
        a = a.reshape(-1, channels)[:, 0]
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768
    if a.dtype == np.int32:
        return a.astype(np.float32) / 2147483648
    return a.astype(np.float32)


def make_decoder(codec: str) -> Decoder:
    """A payload -> 48 kHz mono float32 decoder (PyAV's Opus/G.711 decoders); one per stream,
    used from the playout thread only."""
    if codec == "opus":
        cc = av.CodecContext.create("libopus", "r")
        cc.sample_rate = 48_000
        cc.layout = "mono"

        def opus(payload: bytes) -> np.ndarray:
            out = [_mono_float(f) for f in cc.decode(av.Packet(payload))]
            return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

        return opus
    if codec in ("pcmu", "pcma"):
        g711 = av.CodecContext.create("pcm_mulaw" if codec == "pcmu" else "pcm_alaw", "r")
        g711.sample_rate = 8_000
        g711.layout = "mono"
        prev = np.zeros(1, dtype=np.float32)
        steps = (np.arange(1, 7, dtype=np.float32) / 6)[None, :]

        def pcm8k(payload: bytes) -> np.ndarray:
            nonlocal prev
            out = [_mono_float(f) for f in g711.decode(av.Packet(payload))]
            if not out:
                return np.zeros(0, dtype=np.float32)
            x = np.concatenate(out)
            xs = np.concatenate([prev, x])
            prev = x[-1:]
            # 8 -> 48 kHz, linear interpolation carried across packets: 6 samples per input
            up = xs[:-1, None] + (xs[1:, None] - xs[:-1, None]) * steps
            return up.reshape(-1).astype(np.float32)

        return pcm8k
    raise InputError(f"mã hóa không hỗ trợ / unsupported codec {codec}")


# ---- network helpers ---------------------------------------------------------------------------
async def local_address(host: str) -> str:
    """The local IPv4 address facing `host` (127.0.0.1 for a loopback server). No packet sent."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_DGRAM)
    if not infos:
        raise InputError(f"không phân giải được / cannot resolve {host}")
    ip = str(infos[0][4][0])
    if ipaddress.ip_address(ip).is_loopback:
        return "127.0.0.1"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((ip, 9))
        return str(s.getsockname()[0])
    except OSError:
        return "0.0.0.0"
    finally:
        s.close()


@dataclass
class Impairment:
    """A simulated longer network path for RTP/RTCP: extra delay, jitter and loss."""

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0

    @property
    def active(self) -> bool:
        return self.delay > 0 or self.jitter > 0 or self.loss > 0

    @classmethod
    def parse(cls, text: str | None) -> Impairment:
        """"delay_ms=40,jitter_ms=20,loss=0.01" (ValueError when malformed)."""
        imp = cls()
        for part in (text or "").split(","):
            if not part.strip():
                continue
            k, sep, v = part.partition("=")
            if not sep:
                raise ValueError(f"impairment needs key=value, got {part!r}")
            x = float(v)
            if not 0 <= x <= (1 if k.strip() == "loss" else 10_000):
                raise ValueError(f"impairment {k} out of range: {v}")
            if k.strip() == "delay_ms":
                imp.delay = x / 1000
            elif k.strip() == "jitter_ms":
                imp.jitter = x / 1000
            elif k.strip() == "loss":
                imp.loss = x
            else:
                raise ValueError(f"unknown impairment {k!r} (delay_ms, jitter_ms, loss)")
        return imp


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, fn: Callable[[bytes], None]) -> None:
        self.fn = fn

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.fn(data)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error event=rtp_socket_error error=%s", exc)


def open_udp(address: str, port: int, iface: str) -> socket.socket:
    """A socket receiving `address:port`: a multicast group joined on `iface` (shared by every
    receiver of the group on this host), or a unicast port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ip = ipaddress.IPv4Address(address)
        if ip.is_multicast:
            s.bind((address, port))  # only this group's datagrams, not the host's other joins
            with suppress(OSError):
                s.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
            join = iface if iface and iface != "0.0.0.0" else "0.0.0.0"
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                         socket.inet_aton(address) + socket.inet_aton(join))
        else:
            s.bind(("0.0.0.0", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.setblocking(False)
    except (OSError, ValueError):
        s.close()
        raise
    return s


# ---- inputs ------------------------------------------------------------------------------------
class Input:
    """One stream being received into the player."""

    transport = ""

    def __init__(self, url: str, codec: str, player: Player,
                 session: aiohttp.ClientSession) -> None:
        self.url = url
        self.codec = codec
        self.player = player
        self.session = session
        self.last_data = time.monotonic()
        self.packets = 0

    async def run(self) -> None:
        raise NotImplementedError

    def interval(self) -> dict[str, float]:
        """loss (0-1) and jitter_ms since the previous call."""
        return {}

    async def _watch(self) -> None:
        """Return when no data came for NO_DATA_TIMEOUT (the caller treats it as failure)."""
        while True:
            await asyncio.sleep(1.0)
            if time.monotonic() - self.last_data > NO_DATA_TIMEOUT:
                raise InputError(f"không có dữ liệu {NO_DATA_TIMEOUT:g} giây / no media for "
                                 f"{NO_DATA_TIMEOUT:g} s")


RTP_STATIC = {0: ("pcmu", 8000), 8: ("pcma", 8000)}


class RtpInput(Input):
    """RTP (multicast group from the SDP) with RTCP sender reports: synchronised playout."""

    transport = "rtp"

    def __init__(self, url: str, codec: str, player: Player, session: aiohttp.ClientSession,
                 impair: Impairment | None = None) -> None:
        super().__init__(url, codec, player, session)
        self.impair = impair or Impairment()
        self.ssrc: int | None = None
        self.seq = SeqStats()
        self.jitter = Jitter()
        self.timing: RtpTiming | None = None
        self.gen = 0
        self.clock = 48_000
        self.pt = -1
        self.last_ext: int | None = None
        self.last_seen = 0.0  # monotonic time of the current SSRC's last packet
        self.bad = 0
        self.foreign = 0
        self.reports = 0
        self._decoder_codec = codec
        self._byes: set[int] = set()

    async def _sdp(self) -> tuple[str, int, int, str, int]:
        """(address, port, payload type, codec, clock) from the SDP URL."""
        try:
            async with self.session.get(self.url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                if r.status != 200:
                    raise InputError(f"SDP {r.status}: {(await r.text())[:200]}")
                text = await r.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            raise InputError(f"không tải được SDP / cannot fetch the SDP: {e}") from None
        try:
            sess = parse_session(text)
        except SdpError as e:
            raise InputError(f"SDP không hợp lệ / malformed SDP: {e}") from None
        for m in sess.media:
            if m.media != "audio" or not m.proto.startswith("RTP/AVP") or not m.formats:
                continue
            conn = m.connection or sess.connection
            if conn is None:
                continue
            for fmt in m.formats:
                try:
                    pt = int(fmt)
                except ValueError:
                    continue
                rm = m.rtpmap.get(pt)
                if rm is not None:
                    name, clock = rm.encoding.lower(), rm.clock
                elif pt in RTP_STATIC:
                    name, clock = RTP_STATIC[pt]
                else:
                    continue
                if name in ("opus", "pcmu", "pcma"):
                    return conn.address, m.port, pt, name, clock
        raise InputError("SDP không có luồng Opus/PCMU/PCMA / the SDP has no Opus, PCMU or "
                         "PCMA audio")

    async def run(self) -> None:
        address, port, self.pt, self.codec, self.clock = await self._sdp()
        host = urlsplit(self.url).hostname or "127.0.0.1"
        iface = await local_address(host)
        try:
            rtp_sock = open_udp(address, port, iface)
        except (OSError, ValueError) as e:
            raise InputError(f"không mở được cổng RTP / cannot receive {address}:{port}: {e}"
                             ) from None
        try:
            rtcp_sock = open_udp(address, port + 1, iface)
        except (OSError, ValueError) as e:
            rtp_sock.close()
            raise InputError(f"không mở được cổng RTCP / cannot receive {address}:{port + 1}: "
                             f"{e}") from None
        loop = asyncio.get_running_loop()
        tr1, _ = await loop.create_datagram_endpoint(lambda: _Udp(self._rtp), sock=rtp_sock)
        tr2, _ = await loop.create_datagram_endpoint(lambda: _Udp(self._rtcp), sock=rtcp_sock)
        log.info("rtp joined event=agent_rtp_join group=%s port=%d interface=%s codec=%s",
                 address, port, iface, self.codec)
        self.last_data = time.monotonic()
        try:
            await self._watch()
        finally:
            tr1.close()
            tr2.close()

    def _new_source(self, ssrc: int) -> None:
        self.ssrc = ssrc
        self.seq = SeqStats()
        self.jitter = Jitter()
        self.timing = RtpTiming(self.clock)
        self.last_ext = None
        self.gen = self.player.open_stream(self.clock, self.timing, make_decoder(self.codec))
        log.info("rtp source event=agent_rtp_source ssrc=%08x codec=%s", ssrc, self.codec)

    def _delayed(self, fn: Callable[[bytes, float], None], data: bytes) -> None:
        imp = self.impair
        if imp.loss and random.random() < imp.loss:
            return
        if imp.delay or imp.jitter:
            d = imp.delay + random.uniform(0, imp.jitter)
            asyncio.get_running_loop().call_later(
                d, lambda: fn(data, self.player.now_wall()))
        else:
            fn(data, self.player.now_wall())

    def _rtp(self, data: bytes) -> None:
        self._delayed(self._on_rtp, data)

    def _rtcp(self, data: bytes) -> None:
        self._delayed(self._on_rtcp, data)

    def _bad(self, what: str) -> None:
        self.bad += 1
        if self.bad % 100 == 1:  # logged, not per packet: garbage must not flood the log
            log.warning("bad datagram dropped event=agent_rtp_bad what=%s count=%d", what,
                        self.bad)

    def _on_rtp(self, data: bytes, arrival: float) -> None:
        try:
            h = parse_rtp(data)
        except BadPacket as e:
            self._bad(str(e))
            return
        if h.pt != self.pt:
            self._bad(f"payload type {h.pt}")
            return
        now = time.monotonic()
        if h.ssrc != self.ssrc:
            # a new sender (restarted server): take it when the old one is gone
            if self.ssrc is not None and now - self.last_seen < 0.5 \
                    and self.ssrc not in self._byes:
                self.foreign += 1
                return
            self._new_source(h.ssrc)
        assert self.timing is not None
        self.last_seen = now
        self.last_data = now
        self.packets += 1
        ref = self.last_ext if self.last_ext is not None else h.ts + (1 << 32)
        ext = extend(h.ts, ref)
        if self.last_ext is None or ext > self.last_ext:
            self.last_ext = ext
        self.seq.update(h.seq)
        self.jitter.update(arrival, ext / self.clock)
        self.player.push(self.gen, ext, h.payload, arrival)

    def _on_rtcp(self, data: bytes, arrival: float) -> None:
        try:
            reports, bye = parse_rtcp(data)
        except BadPacket as e:
            self._bad(str(e))
            return
        self._byes |= bye
        for sr in reports:
            if sr.ssrc != self.ssrc or self.timing is None:
                continue
            ref = self.last_ext if self.last_ext is not None else sr.rtp + (1 << 32)
            self.timing.mapping.add(extend(sr.rtp, ref), sr.ntp)
            self.reports += 1

    def interval(self) -> dict[str, float]:
        return {"loss": self.seq.interval_loss(), "jitter_ms": self.jitter.value * 1000}


class HttpOpusInput(Input):
    """Ogg Opus over HTTP, paced by arrival."""

    transport = "http"

    def __init__(self, url: str, codec: str, player: Player, session: aiohttp.ClientSession
                 ) -> None:
        super().__init__(url, codec, player, session)
        self.jitter = Jitter()
        self.gen = 0
        self.lost = 0
        self.received = 0
        self._prev = (0, 0)
        self.next_ts: int | None = None

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=NO_DATA_TIMEOUT)
        try:
            url = yarl.URL(self.url)
            if "burst_ms" not in url.query:
                url = url.update_query(burst_ms=HTTP_BURST_MS)
            async with self.session.get(url, timeout=timeout,
                                        headers={"User-Agent": FIRMWARE}) as r:
                if r.status != 200:
                    raise InputError(f"HTTP {r.status}: {(await r.text())[:200]}")
                log.info("http stream open event=agent_http_open url=%s type=%s", self.url,
                         r.headers.get("Content-Type", ""))
                reader = OggReader()
                head_seen = False
                async for chunk in r.content.iter_any():
                    arrival = self.player.now_wall()
                    self.last_data = time.monotonic()
                    try:
                        pages = reader.feed(chunk)
                    except OggError as e:
                        raise InputError(str(e)) from None
                    for packets, granule, bos in pages:
                        if bos:
                            head_seen = False
                        head_seen = self._page(packets, granule, arrival, head_seen)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise InputError(f"luồng HTTP lỗi / HTTP stream failed: {type(e).__name__} {e}"
                             ) from None
        raise InputError("luồng HTTP kết thúc / HTTP stream ended")

    def _page(self, packets: list[bytes], granule: int | None, arrival: float,
              head_seen: bool) -> bool:
        audio = []
        for p in packets:
            if p.startswith(b"OpusHead"):
                self.gen = self.player.open_stream(48_000, ArrivalTiming(48_000),
                                                   make_decoder("opus"))
                self.next_ts = None
                head_seen = True
            elif p.startswith(b"OpusTags"):
                continue
            elif head_seen:
                audio.append(p)
        if not audio or granule is None:
            return head_seen
        # positions: the page's last packet ends at its granule
        end = granule
        starts = []
        for p in reversed(audio):
            end -= packet_samples(p)
            starts.append(end)
        starts.reverse()
        for p, ts in zip(audio, starts, strict=True):
            n = packet_samples(p)
            if self.next_ts is not None and ts > self.next_ts:
                self.lost += ts - self.next_ts
            self.received += n
            self.next_ts = ts + n
            self.packets += 1
            self.jitter.update(arrival, ts / 48_000)
            self.player.push(self.gen, ts, p, arrival)
        return head_seen

    def interval(self) -> dict[str, float]:
        lost, received = self.lost - self._prev[0], self.received - self._prev[1]
        self._prev = (self.lost, self.received)
        total = lost + received
        return {"loss": lost / total if total > 0 else 0.0, "jitter_ms": self.jitter.value * 1000}


class WebRtcInput(Input):
    """WHEP with aiortc: decoded Opus frames paced by arrival."""

    transport = "webrtc"

    def __init__(self, url: str, codec: str, player: Player, session: aiohttp.ClientSession
                 ) -> None:
        super().__init__(url, codec, player, session)
        self.pc: Any = None
        self._stats: dict[str, float] = {}
        self._prev = (0, 0)

    async def run(self) -> None:
        from aiortc import (
            RTCConfiguration,
            RTCPeerConnection,
            RTCRtpSender,
            RTCSessionDescription,
        )

        from loa.relay.webrtc import use_host_addresses

        host = urlsplit(self.url).hostname or "127.0.0.1"
        local = await local_address(host)
        if local != "0.0.0.0":
            use_host_addresses([local])  # the interface facing the server, nothing else
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc = pc
        location: str | None = None
        try:
            tr = pc.addTransceiver("audio", direction="recvonly")
            tr.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                    if c.mimeType.lower() == "audio/opus"])
            await pc.setLocalDescription(await pc.createOffer())
            try:
                async with self.session.post(
                        self.url, data=pc.localDescription.sdp,
                        headers={"Content-Type": "application/sdp"},
                        timeout=aiohttp.ClientTimeout(total=15)) as r:
                    body = await r.text()
                    if r.status != 201:
                        raise InputError(f"WHEP {r.status}: {body[:200]}")
                    if r.headers.get("Location"):
                        location = urljoin(self.url, r.headers["Location"])
            except (aiohttp.ClientError, TimeoutError) as e:
                raise InputError(f"WHEP lỗi / WHEP failed: {e}") from None
            await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
            track = tr.receiver.track
            gen = self.player.open_stream(48_000, ArrivalTiming(48_000), make_decoder("opus"))
            log.info("webrtc connected event=agent_webrtc_open url=%s", self.url)
            while True:
                try:
                    frame = await asyncio.wait_for(track.recv(), NO_DATA_TIMEOUT)
                except TimeoutError:
                    raise InputError("WebRTC không có dữ liệu / no WebRTC media") from None
                except Exception as e:  # MediaStreamError: the peer closed
                    raise InputError(f"WebRTC kết thúc / WebRTC ended: {type(e).__name__}"
                                     ) from None
                arrival = self.player.now_wall()
                self.last_data = time.monotonic()
                self.packets += 1
                pts = int(frame.pts or 0)
                self.player.push(gen, pts + (1 << 32), _mono_float(cast(av.AudioFrame, frame)),
                                 arrival)
        finally:
            await pc.close()
            if location:
                with suppress(aiohttp.ClientError, TimeoutError):
                    async with self.session.delete(location,
                                                   timeout=aiohttp.ClientTimeout(total=5)):
                        pass

    async def refresh_stats(self) -> None:
        pc = self.pc
        if pc is None:
            return
        try:
            report = await pc.getStats()
        except Exception:  # noqa: BLE001 - a closing peer
            return
        for s in report.values():
            if getattr(s, "type", "") == "inbound-rtp":
                received, lost = int(s.packetsReceived or 0), int(s.packetsLost or 0)
                dr, dl = received - self._prev[0], lost - self._prev[1]
                self._prev = (received, lost)
                self._stats = {"loss": max(0.0, min(1.0, dl / (dr + dl))) if dr + dl > 0
                               else 0.0, "jitter_ms": float(s.jitter or 0) / 48}

    def interval(self) -> dict[str, float]:
        return dict(self._stats)


# ---- the stream supervisor ---------------------------------------------------------------------
def candidates(streams: list[dict[str, Any]], prefer: str | None) -> list[dict[str, str]]:
    """The streams this agent can play, in the server's order, `prefer`'s transport first."""
    ok = [s for s in streams if isinstance(s, dict)
          and (s.get("transport"), s.get("codec")) in SUPPORTED and isinstance(s.get("url"), str)]
    if prefer:
        ok.sort(key=lambda s: s["transport"] != prefer)  # stable: server order otherwise
    return ok


class Pipeline:
    """Keeps the device's stream playing: tries the candidates in order, falls back, retries."""

    def __init__(self, player: Player, session: aiohttp.ClientSession, *,
                 prefer: str | None = None, impair: Impairment | None = None) -> None:
        self.player = player
        self.session = session
        self.prefer = prefer
        self.impair = impair or Impairment()
        self.streams: list[dict[str, str]] = []
        self.url_override: str | None = None
        self.input: Input | None = None
        self.started_at = 0.0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def set_streams(self, streams: list[dict[str, Any]]) -> bool:
        new = candidates(streams, self.prefer)
        changed = new != self.streams
        self.streams = new
        if changed and self.prefer and not any(s["transport"] == self.prefer for s in new):
            log.warning("preferred transport not offered event=agent_transport_unavailable "
                        "transport=%s offered=%s", self.prefer,
                        ",".join(f"{s['transport']}/{s['codec']}" for s in new) or "none")
        return changed

    def start(self, url: str | None = None) -> None:
        self.url_override = url
        self._cancel()
        self.started_at = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        self.player.close_stream()
        self.input = None

    def _targets(self) -> list[dict[str, str]]:
        url = self.url_override
        if url is None:
            return self.streams
        path = urlsplit(url).path
        if path.endswith(".sdp"):
            return [{"transport": "rtp", "codec": "opus", "url": url}]
        if "/whep/" in path:
            return [{"transport": "webrtc", "codec": "opus", "url": url}]
        return [{"transport": "http", "codec": "opus", "url": url}]

    def _make(self, s: dict[str, str]) -> Input:
        if s["transport"] == "rtp":
            return RtpInput(s["url"], s["codec"], self.player, self.session, self.impair)
        if s["transport"] == "webrtc":
            return WebRtcInput(s["url"], s["codec"], self.player, self.session)
        return HttpOpusInput(s["url"], s["codec"], self.player, self.session)

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            targets = self._targets()
            if not targets:
                log.warning("no playable stream event=agent_no_stream streams=%d",
                            len(self.streams))
            for s in targets:
                inp = self._make(s)
                self.input = inp
                began = time.monotonic()
                try:
                    log.info("stream start event=agent_stream transport=%s codec=%s url=%s",
                             s["transport"], s["codec"], s["url"])
                    await inp.run()
                except InputError as e:
                    self.failures += 1
                    log.warning("stream failed event=agent_stream_error transport=%s url=%s "
                                "error=%s", s["transport"], s["url"], e)
                except (OSError, ValueError) as e:
                    self.failures += 1
                    log.warning("stream failed event=agent_stream_error transport=%s url=%s "
                                "error=%s: %s", s["transport"], s["url"], type(e).__name__, e)
                finally:
                    self.player.close_stream()
                if time.monotonic() - began > 30:
                    backoff = 1.0
            self.input = None
            delay = backoff * random.uniform(0.8, 1.2)
            backoff = min(backoff * 2, 30.0)
            await asyncio.sleep(delay)


# ---- the agent ---------------------------------------------------------------------------------
@dataclass
class AgentOptions:
    server: str
    device: str
    key: str
    sink: str = "null"
    transport: str | None = None
    target_delay_ms: float = 300.0
    seconds: float | None = None
    impair: Impairment = field(default_factory=Impairment)


def gain_of(volume: int) -> float:
    """0-100 -> linear gain (a squared curve: 50 is about -12 dB)."""
    return (max(0, min(100, volume)) / 100) ** 2


class Agent:
    """A reference loudspeaker: control channel, stream pipeline, playout, commands."""

    def __init__(self, opts: AgentOptions, sink: Any | None = None) -> None:
        self.opts = opts
        self.sink = sink if sink is not None else make_sink(opts.sink)
        self.player = Player(self.sink, target_delay=opts.target_delay_ms / 1000)
        self.volume = 80
        self.saved_volume: int | None = None  # while an emergency overrides it
        self.emergency = False
        self.playing = True  # the operator's intent: play / stop
        self.power_on = True
        self.relays = [True, True]
        self.session: aiohttp.ClientSession | None = None
        self.pipeline: Pipeline | None = None
        self.client: DeviceClient | None = None
        self.executed: list[Command] = []  # every command run once, in order (tests, logs)
        self._tasks: set[asyncio.Task[None]] = set()
        self._power_gen = 0
        self._config_volume: int | None = None

    # ---- lifecycle ----
    def capabilities(self) -> dict[str, Any]:
        transports = list(TRANSPORTS)
        if self.opts.transport in transports:
            transports.remove(self.opts.transport)
            transports.insert(0, self.opts.transport)
        return {"codecs": list(CODECS), "transports": transports}

    async def run(self, stop: asyncio.Event | None = None) -> int:
        stop = stop or asyncio.Event()
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.player.start()
        self.pipeline = Pipeline(self.player, self.session, prefer=self.opts.transport,
                                 impair=self.opts.impair)
        self.client = DeviceClient(self.opts.server, self.opts.device, self.opts.key,
                                   session=self.session, firmware=FIRMWARE,
                                   telemetry=self.telemetry, on_command=self.on_command,
                                   on_config=self.on_config, capabilities=self.capabilities())
        self._apply_gain()
        client_task = asyncio.get_running_loop().create_task(self.client.run())
        stop_task = asyncio.get_running_loop().create_task(stop.wait())
        code = 0
        try:
            done, _ = await asyncio.wait({client_task, stop_task},
                                         timeout=self.opts.seconds,
                                         return_when=asyncio.FIRST_COMPLETED)
            if client_task in done:
                code = client_task.result()
        finally:
            self.client.stop()
            stop_task.cancel()
            if not client_task.done():
                with suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(client_task, 5.0)
            for t in list(self._tasks):
                t.cancel()
            await self.pipeline.stop()
            await asyncio.to_thread(self.player.stop)
            await self.session.close()
        return code

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---- configuration ----
    async def on_config(self, config: dict[str, Any]) -> None:
        assert self.pipeline is not None
        vol = config.get("volume")
        if _is_volume(vol) and vol != self._config_volume:
            # the configured volume when it is new or changed (an operator's PATCH); a volume
            # command since then is not undone by a reconnect's welcome
            self._config_volume = vol
            if self.emergency:
                self.saved_volume = vol
            else:
                self.volume = vol
        if "emergency" in config:  # the emergency the device is in (null: none)
            em = config["emergency"]
            if isinstance(em, dict) and em.get("on"):
                self._emergency(True, em.get("volume"))
            elif em is None and self.emergency:
                self._emergency(False, None)
        streams = config.get("streams")
        changed = self.pipeline.set_streams(streams if isinstance(streams, list) else [])
        if self.playing and (changed or not self.pipeline.running) \
                and self.pipeline.url_override is None:
            self.pipeline.start()
        self._apply_gain()

    def _apply_gain(self) -> None:
        self.player.gain = gain_of(self.volume) if self.power_on and self.relays \
            and all(self.relays) else 0.0

    # ---- commands ----
    async def on_command(self, cmd: Command) -> Outcome:
        assert self.pipeline is not None
        a = cmd.args
        name = cmd.command
        if name == "volume":
            v = a.get("volume")
            if not _is_volume(v):
                return False, "âm lượng 0-100 / volume must be 0-100"
            if self.emergency:
                self.saved_volume = v  # applies when the emergency ends
            else:
                self.volume = v
        elif name == "play":
            url = a.get("url")
            if url is not None and not (isinstance(url, str)
                                        and url.startswith(("http://", "https://"))):
                return False, "chỉ phát được URL http(s) / only http(s) URLs can be played"
            if "volume" in a:
                if not _is_volume(a["volume"]):
                    return False, "âm lượng 0-100 / volume must be 0-100"
                self.volume = a["volume"]
            self.playing = True
            self.pipeline.start(url)
        elif name == "stop":
            self.playing = False
            await self.pipeline.stop()
        elif name == "power":
            on = a.get("on")
            steps = a.get("steps") or []
            if not isinstance(on, bool) or not isinstance(steps, list):
                return False, "tham số power sai / bad power arguments"
            self._power(on, steps)
        elif name == "reboot":
            delay = a.get("delay_s", 0)
            self._spawn(self._reboot(float(delay) if isinstance(delay, int | float) else 0.0))
        elif name == "emergency":
            on = a.get("on")
            if not isinstance(on, bool):
                return False, "thiếu on / missing on"
            self._emergency(on, a.get("volume"))
        elif name == "display":
            return False, "loa không có màn hình / a loudspeaker has no display"
        else:
            return False, f"lệnh không hỗ trợ / unsupported command {name}"
        self.executed.append(cmd)
        self._apply_gain()
        return True, None

    def _power(self, on: bool, steps: list[Any]) -> None:
        relays = sorted({int(s["relay"]) for s in steps if isinstance(s, dict)
                         and isinstance(s.get("relay"), int)}) or [1, 2]
        n = max(max(relays), len(self.relays))
        if len(self.relays) < n:
            self.relays += [self.relays[-1] if self.relays else False] * (n - len(self.relays))
        self._power_gen += 1
        gen = self._power_gen
        self.power_on = on
        if not on:
            for r in reversed(relays):  # reverse order, at once
                self.relays[r - 1] = False
                log.info("relay off event=agent_relay relay=%d on=false", r)
            return
        for r in relays:
            self.relays[r - 1] = False

        async def warm_up() -> None:
            for s in steps or [{"relay": r, "delay_s": 0} for r in relays]:
                delay = float(s.get("delay_s", 0))
                if delay:
                    await asyncio.sleep(delay)
                if gen != self._power_gen:
                    return  # a newer power command took over
                self.relays[int(s["relay"]) - 1] = True
                log.info("relay on event=agent_relay relay=%d on=true", int(s["relay"]))
                self._apply_gain()

        self._spawn(warm_up())

    def _emergency(self, on: bool, volume: Any) -> None:
        if on:
            if not self.emergency:
                self.saved_volume = self.volume
            self.emergency = True
            self.volume = volume if _is_volume(volume) else 100
            if not (self.power_on and all(self.relays)):
                self._power(True, [{"relay": i + 1, "delay_s": 0}
                                   for i in range(len(self.relays))])
            if not self.playing:
                self.playing = True
                assert self.pipeline is not None
                self.pipeline.start()
        elif self.emergency:
            self.emergency = False
            if self.saved_volume is not None:
                self.volume = self.saved_volume
            self.saved_volume = None

    async def _reboot(self, delay: float) -> None:
        await asyncio.sleep(delay)
        log.info("rebooting event=agent_reboot")
        assert self.pipeline is not None and self.client is not None
        await self.pipeline.stop()
        self.playing = True
        await self.client.reconnect()  # the welcome of the new connection restarts the stream

    # ---- telemetry ----
    def state(self) -> str:
        if not self.power_on:
            return "off"
        if self.playing and self.pipeline is not None and self.pipeline.running \
                and self.player.playing:
            return "playing"
        return "idle"

    def stream_figures(self) -> dict[str, Any]:
        pipe = self.pipeline
        inp = pipe.input if pipe else None
        play = self.player.take_interval()
        out: dict[str, Any] = {}
        if inp is None:
            return out
        out["url"] = inp.url[:2000]
        fig = inp.interval()
        if "loss" in fig:
            out["loss"] = round(max(0.0, min(1.0, fig["loss"])), 4)
        if "jitter_ms" in fig:
            out["jitter_ms"] = round(max(0.0, fig["jitter_ms"]), 2)
        if "latency_ms" in play:
            out["latency_ms"] = round(max(0.0, play["latency_ms"]), 1)
        if play.get("synced") and "skew_ms" in play:
            out["skew_ms"] = round(play["skew_ms"], 3)
        return out

    def faults(self) -> list[str]:
        pipe = self.pipeline
        if self.playing and self.power_on and pipe is not None and pipe.running:
            quiet_since = max(pipe.started_at, self.player.last_audio)
            if time.monotonic() - quiet_since > STALLED_AFTER:
                return ["stream_stalled"]
        return []

    def telemetry(self) -> dict[str, Any]:
        pipe = self.pipeline
        if pipe is not None and isinstance(pipe.input, WebRtcInput):
            self._spawn(pipe.input.refresh_stats())  # figures for the next heartbeat
        return {"state": self.state(), "volume": self.volume, "stream": self.stream_figures(),
                "network": {"type": "ethernet"}, "firmware": FIRMWARE,
                "power": {"amp": self.power_on and all(self.relays),
                          "relays": list(self.relays[:8])},
                "faults": self.faults()}


def _is_volume(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 100


# ---- command line ------------------------------------------------------------------------------
def options_from_args(args: argparse.Namespace) -> AgentOptions:
    device, sep, key = str(args.key).partition(":")
    if not sep or not device or not key:
        raise ValueError("--key cần dạng DEVICE_ID:KEY / --key must be DEVICE_ID:KEY")
    transport = getattr(args, "transport", None)
    if transport is not None and transport not in TRANSPORTS:
        raise ValueError(f"--transport: {', '.join(TRANSPORTS)}")
    delay = float(getattr(args, "target_delay_ms", 300.0))
    if not 20 <= delay <= 10_000:
        raise ValueError("--target-delay-ms cần 20-10000 / must be within 20-10000")
    seconds = getattr(args, "seconds", None)
    return AgentOptions(server=str(args.server), device=device, key=key,
                        sink=str(getattr(args, "sink", "null") or "null"), transport=transport,
                        target_delay_ms=delay, seconds=float(seconds) if seconds else None,
                        impair=Impairment.parse(os.environ.get("LOA_AGENT_IMPAIR")))


async def _main(opts: AgentOptions, sink: Any) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    agent = Agent(opts, sink)
    code = await agent.run(stop)
    t = agent.player.totals
    log.info("agent stopped event=agent_stop frames=%d missing=%d late=%d code=%d",
             t["frames"], t["missing"], t["late"], code)
    return code


def main(args: argparse.Namespace) -> int:
    """`loa device`: 0 after --seconds or Ctrl-C; 2 bad arguments or sink; 3 refused by the
    server (unknown device, wrong or revoked key, replaced)."""
    from loa.streamer.log import setup_logging

    setup_logging(os.environ.get("LOA_LOG_LEVEL", "info"), "kv")
    try:
        opts = options_from_args(args)
        from loa.relay.agent.client import ws_url

        ws_url(opts.server)
        sink = make_sink(opts.sink)
    except (ValueError, OSError) as e:
        print(f"loa device: {e}", file=sys.stderr)
        return 2
    # Playout threads wake on deadlines: a short GIL switch interval keeps their wake-up from
    # waiting behind the event loop (the default is 5 ms).
    sys.setswitchinterval(0.0005)
    # What is loaded now lives as long as the process: keep it out of the collector's full
    # passes, which would otherwise pause playout for tens of milliseconds now and then.
    gc.collect()
    gc.freeze()
    code = asyncio.run(_main(opts, sink))
    if code:
        print(f"loa device: máy chủ từ chối thiết bị / the server refused this device "
              f"(close code {code})", file=sys.stderr)
        return 3
    return 0
