"""The streams a device agent receives into its player: RTP with RTCP (synchronised), Ogg Opus
over HTTP and WebRTC (WHEP), both paced by arrival. An input ends with InputError when its
stream fails or goes quiet; the pipeline (relay/agent/pipeline.py) then tries the next."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, cast
from urllib.parse import urljoin, urlsplit

import aiohttp
import av
import yarl

from loa.codecs.ogg import OggError, OggReader
from loa.codecs.opus import packet_samples
from loa.relay.agent.decoders import make_decoder, mono_float
from loa.relay.agent.errors import InputError
from loa.relay.agent.firmware import FIRMWARE
from loa.relay.agent.impair import Impairment
from loa.relay.agent.playout import (
    ArrivalTiming,
    Jitter,
    Player,
    RtpTiming,
    SeqStats,
    extend,
)
from loa.relay.rtp.sdp import SdpError, parse_session
from loa.relay.rtp.wire import BadPacket, parse_rtcp, parse_rtp
from loa.streamer.messages import say

log = logging.getLogger("loa.agent")
NO_DATA_TIMEOUT = 10.0  # seconds without media: the stream counts as failed
# Arrival timing plays an HTTP burst from its start: ask the server for a short one (Loa's
# default suits browsers, ~18 s at 32 kbit/s), so the loudspeaker stays near live.
HTTP_BURST_MS = 200
IP_MULTICAST_ALL = 49  # Linux: only groups this socket joined


# ---- network helpers ---------------------------------------------------------------------------
async def local_address(host: str) -> str:
    """The local IPv4 address facing `host` (127.0.0.1 for a loopback server). No packet sent."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_DGRAM)
    if not infos:
        raise InputError(say("agent.cannot_resolve", host=host))
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
                raise InputError(say("agent.no_media", seconds=NO_DATA_TIMEOUT))


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
            raise InputError(say("agent.sdp_fetch_failed", error=e)) from None
        try:
            sess = parse_session(text)
        except SdpError as e:
            raise InputError(say("webrtc.offer_malformed", error=e)) from None
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
        raise InputError(say("agent.sdp_no_audio"))

    async def run(self) -> None:
        address, port, self.pt, self.codec, self.clock = await self._sdp()
        host = urlsplit(self.url).hostname or "127.0.0.1"
        iface = await local_address(host)
        try:
            rtp_sock = open_udp(address, port, iface)
        except (OSError, ValueError) as e:
            raise InputError(say("agent.rtp_port_failed", address=address, port=port,
                                 error=e)) from None
        try:
            rtcp_sock = open_udp(address, port + 1, iface)
        except (OSError, ValueError) as e:
            rtp_sock.close()
            raise InputError(say("agent.rtcp_port_failed", address=address,
                                 port=port + 1, error=e)) from None
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
            raise InputError(say("agent.http_failed", kind=type(e).__name__,
                                 error=e)) from None
        raise InputError(say("agent.http_ended"))

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
                raise InputError(say("agent.whep_failed", error=e)) from None
            await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
            track = tr.receiver.track
            gen = self.player.open_stream(48_000, ArrivalTiming(48_000), make_decoder("opus"))
            log.info("webrtc connected event=agent_webrtc_open url=%s", self.url)
            while True:
                try:
                    frame = await asyncio.wait_for(track.recv(), NO_DATA_TIMEOUT)
                except TimeoutError:
                    raise InputError(say("agent.webrtc_no_media")) from None
                except Exception as e:  # MediaStreamError: the peer closed
                    raise InputError(say("agent.webrtc_ended",
                                         kind=type(e).__name__)) from None
                arrival = self.player.now_wall()
                self.last_data = time.monotonic()
                self.packets += 1
                pts = int(frame.pts or 0)
                self.player.push(gen, pts + (1 << 32), mono_float(cast(av.AudioFrame, frame)),
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
