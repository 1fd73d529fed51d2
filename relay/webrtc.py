"""WebRTC: WHEP listeners (pre-encoded Opus to every peer) and WHIP live input.

WHEP out. The engine encodes an area's Opus once; one hub subscription per area (an `AreaFeed`)
fans every packet out to all the peers listening to that area. Two send paths:

- stock: each peer has a `PacketTrack` whose `recv()` hands the pre-encoded packet to aiortc's
  `RTCRtpSender` as an `av.Packet` (the sender packs it without re-encoding). One `av.Packet` per
  hub packet is shared by all peers of the area. ~120 us per packet per peer.
- direct (`direct_send`, the default): once a peer's DTLS is up, the feed writes the RTP header
  itself (12 bytes, the peer's SSRC, sequence and timestamp offset), protects it with the peer's
  SRTP session and `sendto`s it on the nominated ICE pair's socket. aiortc still runs the
  connection (ICE consent, DTLS, RTCP sender reports, which read the counters this path keeps
  up to date, and receiver reports for `getStats`). ~4x cheaper per packet and peer.

A slow peer never delays the others: the stock path keeps a bounded per-peer queue (oldest
dropped), the direct path drops a packet for a peer whose socket buffer is already full.

WHIP in. A publisher's Opus is decoded by aiortc, resampled to 48 kHz mono float32 and written
into a `LivePush` jitter buffer that the web layer puts on air as a live broadcast. aiortc's own
receive jitter buffer is cut to one frame of look-ahead (the LivePush does the buffering).

ICE: no STUN server unless configured (aiortc would otherwise use a public one), and
`ice_addresses` limits the host candidates to the given local addresses (aioice otherwise offers
every interface except 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import av
from aioice import ice as aioice_ice
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
    clock,
)
from aiortc import sdp as rtc_sdp
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from loa.codecs.encoders import Packet
from loa.streamer.errors import Kind, LoaError
from loa.streamer.hub import DropOldest, PacketHub, Subscription
from loa.streamer.messages import say
from loa.streamer.sources import LivePush

if TYPE_CHECKING:
    from loa.relay.webrtc_workers import RemoteWhep, WhepPool

log = logging.getLogger("loa.webrtc")

OPUS_TIME_BASE = Fraction(1, 48_000)
_RTP_HEADER = struct.Struct("!BBHII")


@dataclass
class WebRtcSettings:
    max_peers: int = 500
    max_peers_per_area: int = 300
    whip_target_ms: float = 80.0  # jitter buffer of a live input
    max_inputs: int = 20  # WHIP live inputs at once
    peer_queue: int = 10  # packets (20 ms each) a slow peer may lag before its oldest drop
    connect_timeout: float = 15.0  # seconds from the answer to a connected peer, else closed
    direct_send: bool = True  # lean RTP path (header + SRTP + sendto) instead of aiortc's
    ice_addresses: str = ""  # comma-separated local IPs for host candidates; "" = all interfaces
    stun_server: str = ""  # "stun:host:port"; "" = none (aiortc's default is a public server)
    max_sdp_bytes: int = 64 * 1024
    # WHEP (listening) is open to anyone: offers per client address, a token bucket (web layer).
    whep_offers_per_s: float = 1.0
    whep_burst: int = 10
    # "AREA=TOKEN": listening to AREA (and below) needs that token or a logged-in user's.
    listen_tokens: list[str] = field(default_factory=list)
    # Processes that run the WHEP peers (ICE, DTLS, SRTP, sending; loa.relay.webrtc_workers);
    # 0: this process. WHIP inputs always run here.
    workers: int = 1


class OfferError(LoaError, ValueError):
    """The SDP offer cannot be answered: 400 (malformed) or 406 (no Opus)."""

    kind = "invalid"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class LimitError(LoaError, RuntimeError):
    """Too many peers, or no peer can be made now (503)."""

    kind = "limit"

    def __init__(self, message: str, *, kind: Kind | None = None) -> None:
        super().__init__(message, kind=kind)


# ---- ICE host addresses ------------------------------------------------------------------------
_original_host_addresses = aioice_ice.get_host_addresses
_host_addresses: list[str] | None = None


def _host_addresses_hook(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    if _host_addresses is not None:
        return list(_host_addresses)
    return _original_host_addresses(use_ipv4, use_ipv6)


def use_host_addresses(addresses: list[str] | None) -> None:
    """Offer only these local addresses as ICE host candidates (None: every interface).

    aioice has no per-connection setting for this, so it applies to the whole process.
    """
    global _host_addresses
    _host_addresses = list(addresses) if addresses else None
    aioice_ice.get_host_addresses = _host_addresses_hook


def rtc_configuration(settings: WebRtcSettings) -> RTCConfiguration:
    servers = [RTCIceServer(settings.stun_server)] if settings.stun_server else []
    return RTCConfiguration(iceServers=servers)


# ---- SDP ---------------------------------------------------------------------------------------
def opus_capabilities() -> list[Any]:
    return [c for c in RTCRtpSender.getCapabilities("audio").codecs
            if c.mimeType.lower() == "audio/opus"]


def check_offer(text: str, *, publish: bool) -> None:
    """Refuse what cannot work before any peer is created. `publish`: a WHIP offer (the client
    sends audio); otherwise WHEP (the client receives audio)."""
    if "v=0" not in text[:200] or "m=" not in text:
        raise OfferError(400, say("webrtc.offer_not_sdp"))
    try:
        desc = rtc_sdp.SessionDescription.parse(text)
    except Exception as e:  # noqa: BLE001 - the parser raises anything on garbage
        raise OfferError(400, say("webrtc.offer_malformed", error=f"{type(e).__name__}: {e}")
                         ) from None
    audio = [m for m in desc.media if m.kind == "audio"]
    if not audio:
        raise OfferError(400, say("webrtc.offer_no_audio"))
    if len(audio) > 1:
        raise OfferError(400, say("webrtc.offer_many_audio"))
    m = audio[0]
    wanted = ("sendonly", "sendrecv") if publish else ("recvonly", "sendrecv")
    direction = m.direction or "sendrecv"  # RFC 4566: sendrecv when absent
    if direction not in wanted:
        raise OfferError(400, say("webrtc.offer_direction", wanted=" or ".join(wanted),
                                  direction=direction))
    if m.ice is None or not m.ice.usernameFragment or not m.ice.password:
        raise OfferError(400, say("webrtc.offer_no_ice"))
    if not m.dtls or not m.dtls.fingerprints:
        raise OfferError(400, say("webrtc.offer_no_fingerprint"))
    if not any(c.mimeType.lower() == "audio/opus" for c in m.rtp.codecs):
        raise OfferError(406, say("webrtc.offer_no_opus"))


# ---- WHEP: the send side -----------------------------------------------------------------------
class PacketTrack(MediaStreamTrack, DropOldest[av.Packet]):
    """An audio track whose `recv()` returns pre-encoded Opus `av.Packet`s (pts at 48 kHz).

    With the direct path the feed sends by itself and nothing is queued: `recv()` then only
    waits for the end of the track (aiortc's sender task stays parked on it).
    """

    kind = "audio"

    def __init__(self, maxlen: int) -> None:
        MediaStreamTrack.__init__(self)  # pyee's emitter does not chain: both, by name
        DropOldest.__init__(self, maxlen)

    def push(self, packets: list[av.Packet]) -> None:
        self._enqueue(packets)

    async def recv(self) -> av.Packet:
        packet = await self._next(lambda: self.readyState != "live")
        if packet is None:
            raise MediaStreamError
        return packet

    def stop(self) -> None:
        super().stop()
        self._wake()


class DirectSender:
    """RTP to one peer without aiortc's per-packet coroutine: header, SRTP, sendto."""

    MAX_BUFFERED = 64 * 1024  # bytes queued in the socket's transport: beyond, the peer drops

    def __init__(self, sender: RTCRtpSender, payload_type: int) -> None:
        self.sender = sender
        self.ssrc = sender._ssrc
        self.payload_type = payload_type
        self.seq = random.randrange(32768)  # as aiortc: far from the 16-bit wrap
        self.ts_origin = random.getrandbits(32)
        self.packets = 0
        self.octets = 0
        self.dropped = 0
        self.errors = 0
        self.last_ts = 0
        self.first = True
        self._srtp: Any = None
        self._connection: Any = None

    def _bind(self) -> bool:
        dtls = self.sender.transport
        if getattr(dtls, "_state", None) is None or dtls.state != "connected":
            return False
        self._srtp = dtls._tx_srtp
        self._connection = dtls.transport._connection
        return self._srtp is not None

    def send(self, packets: list[Packet]) -> None:
        if self._srtp is None and not self._bind():
            return  # not connected yet: nothing to send to
        pair = self._connection._nominated.get(1)
        if pair is None or pair.protocol.transport is None:
            return
        transport = pair.protocol.transport
        if transport.is_closing():
            return
        addr = pair.remote_addr
        protect = self._srtp.protect
        for p in packets:
            if transport.get_write_buffer_size() > self.MAX_BUFFERED:
                self.dropped += 1
                continue
            ts = (self.ts_origin + p.pts) & 0xFFFFFFFF
            marker = 0x80 if self.first else 0
            self.first = False
            header = _RTP_HEADER.pack(0x80, marker | self.payload_type, self.seq, ts, self.ssrc)
            transport.sendto(protect(header + p.data), addr)
            self.seq = (self.seq + 1) & 0xFFFF
            self.packets += 1
            self.octets += len(p.data)
            self.last_ts = ts

    def sync_stats(self, ntp: int) -> None:
        """Keep what aiortc's RTCP sender reports and getStats read in step with what we sent."""
        s = self.sender
        s._RTCRtpSender__packet_count = self.packets  # type: ignore[attr-defined]
        s._RTCRtpSender__octet_count = self.octets  # type: ignore[attr-defined]
        s._RTCRtpSender__rtp_timestamp = self.last_ts  # type: ignore[attr-defined]
        s._RTCRtpSender__ntp_timestamp = ntp  # type: ignore[attr-defined]


def peer_stats(sid: str, area: str, state: str, dropped: int) -> dict[str, Any]:
    """A WHEP peer's figures, those from its receiver reports not known yet."""
    return {"session": sid, "area": area, "state": state, "connected_seconds": None,
            "path": None, "dropped": dropped, "packets_sent": None, "bytes_sent": None,
            "rtt_ms": None, "fraction_lost": None, "packets_lost": None, "jitter_ms": None}


@dataclass
class WhepSession:
    id: str
    area: str
    pc: RTCPeerConnection
    track: PacketTrack
    transceiver: RTCRtpTransceiver
    created: float = field(default_factory=time.time)
    direct: DirectSender | None = None
    connected: float | None = None
    ready: bool = False  # negotiated, send path chosen; false again once closed
    closed: bool = False

    @property
    def state(self) -> str:
        return str(self.pc.connectionState)

    @property
    def dropped(self) -> int:
        return self.track.dropped + (self.direct.dropped if self.direct else 0)

    async def stats(self) -> dict[str, Any]:
        """RTT, loss and jitter from the peer's receiver reports, plus what was sent."""
        out = peer_stats(self.id, self.area, self.state, self.dropped)
        out["connected_seconds"] = (round(time.time() - self.connected, 1)
                                    if self.connected else None)
        out["path"] = "direct" if self.direct else "stock"
        if self.closed:
            return out
        try:
            report = await self.pc.getStats()
        except Exception as e:  # noqa: BLE001 - a peer going away mid-call
            log.debug("stats failed event=whep_stats_error session=%s error=%s", self.id, e)
            return out
        for st in report.values():
            kind = getattr(st, "type", "")
            if kind == "outbound-rtp":
                out["packets_sent"] = st.packetsSent
                out["bytes_sent"] = st.bytesSent
            elif kind == "remote-inbound-rtp":
                rtt = st.roundTripTime
                out["rtt_ms"] = None if rtt is None else round(rtt * 1000, 2)
                out["fraction_lost"] = st.fractionLost
                out["packets_lost"] = st.packetsLost
                out["jitter_ms"] = round(st.jitter * 1000 / 48_000, 2)
        return out


class AreaFeed:
    """One hub subscription for an area, fanned out to every WHEP peer of that area."""

    def __init__(self, hub: PacketHub, area: str, maxlen: int) -> None:
        self.area = area
        self.peers: dict[str, WhepSession] = {}
        self.sub: Subscription = hub.subscribe(area, "opus", maxlen=maxlen)
        self.sub.on_packets = self._on_packets
        self.packets = 0

    def _on_packets(self, packets: list[Packet]) -> None:
        packets = [p for p in packets if p.codec == "opus"]
        if not packets:
            return
        self.packets += len(packets)
        shared: list[av.Packet] | None = None
        ntp = 0
        for s in list(self.peers.values()):
            if not s.ready:
                continue  # still negotiating: its send path is not chosen yet
            d = s.direct
            if d is not None:
                try:
                    d.send(packets)
                except Exception as e:  # noqa: BLE001 - one peer's failure stays its own
                    d.errors += 1
                    if d.errors == 1:
                        log.warning("whep send failed event=whep_send_error session=%s "
                                    "error=%s", s.id, e)
                if d.packets:
                    if not ntp:
                        ntp = clock.current_ntp_time()
                    d.sync_stats(ntp)
                continue
            if shared is None:
                shared = [_av_packet(p) for p in packets]
            s.track.push(shared)

    def close(self) -> None:
        self.sub.on_packets = None
        self.sub.close()


def _av_packet(p: Packet) -> av.Packet:
    pkt = av.Packet(p.data)
    pkt.pts = p.pts * 48_000 // p.rate
    pkt.time_base = OPUS_TIME_BASE
    return pkt


# ---- WHIP: the receive side --------------------------------------------------------------------
@dataclass
class WhipSession:
    id: str
    pc: RTCPeerConnection
    live: LivePush
    targets: list[str]
    created: float = field(default_factory=time.time)
    bid: str | None = None  # the broadcast airing it, set by whoever airs it
    issuer: str = ""
    user: str = ""
    token_id: str = ""
    frames: int = 0
    samples: int = 0
    connected: float | None = None
    closed: bool = False
    task: asyncio.Task[None] | None = None


WhipEnd = Callable[[WhipSession, str], None]
WhepChange = Callable[[WhepSession, str], None]


class WebRtcRelay:
    """WHEP peers by session id, one `AreaFeed` per listened area, WHIP inputs by session id."""

    def __init__(self, hub: PacketHub, settings: WebRtcSettings | None = None) -> None:
        self.hub = hub
        self.settings = settings or WebRtcSettings()
        self.feeds: dict[str, AreaFeed] = {}
        self.whep: dict[str, WhepSession | RemoteWhep] = {}
        self.whip: dict[str, WhipSession] = {}
        self.on_whip_end: WhipEnd | None = None  # the web layer ends the broadcast
        # A WHEP peer "connected" or closed (the cause): a worker tells its node.
        self.on_whep_change: WhepChange | None = None
        self.pool: WhepPool | None = None  # set: WHEP peers run in worker processes
        self.counters = {"whep_opened": 0, "whep_refused": 0, "whip_opened": 0}
        addrs = [a.strip() for a in self.settings.ice_addresses.split(",") if a.strip()]
        if addrs:
            use_host_addresses(addrs)
        self._closing = False

    # ---- WHEP --------------------------------------------------------------------------------
    def area_peers(self, area: str) -> int:
        feed = self.feeds.get(area)
        return (len(feed.peers) if feed else 0) + (self.pool.areas.get(area, 0)
                                                   if self.pool else 0)

    def peers_by_area(self) -> dict[str, int]:
        """WHEP peers per area, in this process and in the workers."""
        out = {area: len(feed.peers) for area, feed in self.feeds.items() if feed.peers}
        for area, n in (self.pool.areas.items() if self.pool else ()):
            out[area] = out.get(area, 0) + n
        return out

    def _check_limits(self, area: str) -> None:
        st = self.settings
        if self._closing:
            raise LimitError(say("server.shutting_down"), kind="unavailable")
        if len(self.whep) >= st.max_peers:
            raise LimitError(say("webrtc.too_many_listeners", limit=st.max_peers))
        if self.area_peers(area) >= st.max_peers_per_area:
            raise LimitError(say("webrtc.too_many_area_listeners", area=area,
                                 limit=st.max_peers_per_area))

    async def open_whep(self, area: str, offer: str, sid: str | None = None
                        ) -> tuple[WhepSession | RemoteWhep, str]:
        """Answer a WHEP offer for `area` (the caller checked the area exists); with workers,
        a worker answers it (`sid`: the id the node gave it)."""
        try:
            self._check_limits(area)
        except LimitError:
            self.counters["whep_refused"] += 1
            raise
        check_offer(offer, publish=False)
        if self.pool is not None:
            remote, answer = await self.pool.open(area, offer)
            self.counters["whep_opened"] += 1
            return remote, answer
        pc = RTCPeerConnection(rtc_configuration(self.settings))
        track = PacketTrack(self.settings.peer_queue)
        tr = pc.addTransceiver(track, direction="sendonly")
        tr.setCodecPreferences(opus_capabilities())
        s = WhepSession(sid or secrets.token_urlsafe(16), area, pc, track, tr)
        # Registered before the first await, so concurrent offers count against the limits.
        self.whep[s.id] = s
        feed = self.feeds.get(area)
        if feed is None:
            feed = self.feeds[area] = AreaFeed(self.hub, area, self.settings.peer_queue)
        feed.peers[s.id] = s
        try:
            await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # noqa: BLE001 - aiortc raises several kinds on a bad offer
            await self.close_whep(s.id, "bad-offer")
            raise OfferError(400, say("webrtc.cannot_negotiate",
                                      error=f"{type(e).__name__}: {e}")) from None
        pt = tr._codecs[0].payloadType if tr._codecs else None
        if self.settings.direct_send and pt is not None:
            s.direct = DirectSender(tr.sender, pt)
        s.ready = True

        @pc.on("connectionstatechange")
        async def _state() -> None:
            state = pc.connectionState
            if state == "connected" and s.connected is None:
                s.connected = time.time()
                log.info("whep peer connected event=whep_connected session=%s area=%s",
                         s.id, area)
                if self.on_whep_change is not None:
                    self.on_whep_change(s, "connected")
            elif state in ("failed", "closed"):
                await self.close_whep(s.id, state)

        asyncio.get_running_loop().call_later(self.settings.connect_timeout,
                                              self._connect_deadline, s.id)
        self.counters["whep_opened"] += 1
        log.info("whep peer opened event=whep_open session=%s area=%s peers=%d path=%s",
                 s.id, area, len(feed.peers), "direct" if s.direct else "stock")
        return s, pc.localDescription.sdp

    def _connect_deadline(self, sid: str) -> None:
        s = self.whep.get(sid)
        if s is not None and s.connected is None:
            log.info("whep peer never connected event=whep_timeout session=%s", sid)
            asyncio.ensure_future(self.close_whep(sid, "timeout"))
        w = self.whip.get(sid)
        if w is not None and w.connected is None:
            log.info("whip peer never connected event=whip_timeout session=%s", sid)
            asyncio.ensure_future(self.close_whip(sid, "timeout"))

    async def close_whep(self, sid: str, cause: str = "closed") -> bool:
        s = self.whep.pop(sid, None)
        if s is None:
            return False
        s.closed = True
        if not isinstance(s, WhepSession):  # its worker closes the peer
            assert self.pool is not None
            self.pool.end_session(s, cause)
            return True
        s.ready = False
        feed = self.feeds.get(s.area)
        if feed is not None:
            feed.peers.pop(sid, None)
            if not feed.peers:
                feed.close()
                del self.feeds[s.area]
        s.track.stop()
        with contextlib.suppress(Exception):
            await s.pc.close()
        log.info("whep peer closed event=whep_close session=%s area=%s cause=%s dropped=%d",
                 sid, s.area, cause, s.dropped)
        if self.on_whep_change is not None:
            self.on_whep_change(s, cause)
        return True

    async def whep_stats(self) -> list[dict[str, Any]]:
        """Per-peer figures for the monitor page."""
        return list(await asyncio.gather(*(s.stats() for s in list(self.whep.values()))))

    # ---- WHIP --------------------------------------------------------------------------------
    async def open_whip(self, offer: str, targets: list[str]) -> tuple[WhipSession, str]:
        """Answer a WHIP offer; the returned session's `live` source is what to air."""
        if self._closing:
            raise LimitError(say("server.shutting_down"), kind="unavailable")
        if len(self.whip) >= self.settings.max_inputs:
            raise LimitError(say("webrtc.too_many_inputs", limit=self.settings.max_inputs))
        check_offer(offer, publish=True)
        pc = RTCPeerConnection(rtc_configuration(self.settings))
        tr = pc.addTransceiver("audio", direction="recvonly")
        tr.setCodecPreferences(opus_capabilities())
        _short_jitter_buffer(tr.receiver)
        live = LivePush(target_ms=self.settings.whip_target_ms, name="whip")
        s = WhipSession(secrets.token_urlsafe(16), pc, live, list(targets))
        self.whip[s.id] = s
        try:
            await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception as e:  # noqa: BLE001
            await self.close_whip(s.id, "bad-offer")
            raise OfferError(400, say("webrtc.cannot_negotiate",
                                      error=f"{type(e).__name__}: {e}")) from None
        track = tr.receiver.track
        s.task = asyncio.ensure_future(self._pump(s, track))

        @pc.on("connectionstatechange")
        async def _state() -> None:
            state = pc.connectionState
            if state == "connected" and s.connected is None:
                s.connected = time.time()
                log.info("whip peer connected event=whip_connected session=%s", s.id)
            elif state in ("failed", "closed"):
                await self.close_whip(s.id, "peer-" + state)

        asyncio.get_running_loop().call_later(self.settings.connect_timeout,
                                              self._connect_deadline, s.id)
        self.counters["whip_opened"] += 1
        log.info("whip input opened event=whip_open session=%s targets=%s", s.id,
                 ",".join(targets))
        return s, pc.localDescription.sdp

    async def _pump(self, s: WhipSession, track: MediaStreamTrack) -> None:
        """Decoded frames (aiortc) -> 48 kHz mono float32 -> the live jitter buffer."""
        resampler = av.AudioResampler(format="flt", layout="mono", rate=48_000)
        cause = "peer-ended"
        try:
            while True:
                frame = await track.recv()
                if not isinstance(frame, av.AudioFrame):
                    continue
                for f in resampler.resample(frame):
                    pcm = f.to_ndarray().reshape(-1)
                    s.live.write(pcm)
                    s.samples += pcm.shape[0]
                s.frames += 1
        except MediaStreamError:
            pass
        except asyncio.CancelledError:
            cause = "closed"
        except Exception as e:  # noqa: BLE001 - bad media ends this input, nothing else
            cause = "bad-media"
            log.warning("whip input failed event=whip_media_error session=%s error=%s",
                        s.id, e)
        if not s.closed:
            await self.close_whip(s.id, cause)

    async def close_whip(self, sid: str, cause: str = "closed") -> bool:
        s = self.whip.pop(sid, None)
        if s is None:
            return False
        s.closed = True
        s.live.close()
        if s.task is not None and s.task is not asyncio.current_task():
            s.task.cancel()
        if self.on_whip_end is not None:
            try:
                self.on_whip_end(s, cause)
            except Exception:  # noqa: BLE001
                log.exception("whip end hook failed event=whip_end_error session=%s", sid)
        with contextlib.suppress(Exception):
            await s.pc.close()
        log.info("whip input closed event=whip_close session=%s cause=%s frames=%d "
                 "underruns=%d overruns=%d", sid, cause, s.frames, s.live.underruns,
                 s.live.overruns)
        return True

    def whip_for_broadcast(self, bid: str) -> WhipSession | None:
        for s in self.whip.values():
            if s.bid == bid:
                return s
        return None

    # ---- all ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Nothing to open: peers and inputs come with their offers."""

    async def close(self) -> None:
        self._closing = True
        await asyncio.gather(*(self.close_whep(sid, "shutdown") for sid in list(self.whep)),
                             *(self.close_whip(sid, "shutdown") for sid in list(self.whip)))

    def stats(self) -> dict[str, Any]:
        return {"peers": len(self.whep), "inputs": len(self.whip), **self.counters}


def _short_jitter_buffer(receiver: RTCRtpReceiver) -> None:
    """aiortc holds 4 audio frames before decoding; the LivePush behind it buffers anyway."""
    name = "_RTCRtpReceiver__jitter_buffer"
    if hasattr(receiver, name):
        setattr(receiver, name, JitterBuffer(capacity=16, prefetch=1))
