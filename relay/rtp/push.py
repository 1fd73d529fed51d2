"""RTP push ingest: a hardware encoder (Barix, a studio codec) sends RTP to a port of the node.

A mount with `rtp` (`{"port", "codec": "opus"|"pcmu"|"l16", "payload_type", "rate", "channels"}`)
or `sdp` (the encoder's own session description: its port and first audio payload are taken)
gets a UDP socket on `[ingest] rtp_address`:port. Packets of another payload type, malformed ones
and, when `source` is set, those from another address are counted and dropped. A small reorder
window (`REORDER` packets) puts reordered packets back in sequence; a packet still missing when
the window is full is concealed (Opus: libopus PLC; G.711 and L16: silence of its length) and
the stream goes on; a late or repeated packet is dropped. The decoded audio (48 kHz mono) goes to
the mount's jitter buffers, which follow the encoder's clock drift (LivePush). Decoding a packet
costs microseconds (libopus through ctypes, numpy for G.711/L16): it runs on the event loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loa.codecs.opus import OpusDecoder
from loa.relay.rtp.sdp import SdpError, parse_session
from loa.relay.rtp.wire import BadPacket, parse_rtp
from loa.streamer.clock import SAMPLE_RATE
from loa.streamer.messages import say

log = logging.getLogger("loa.relay.rtp.push")

REORDER = 4  # packets held to put reordered ones back in sequence (80 ms of 20 ms packets)
MAX_CONCEAL = 10  # a longer gap is a new start, not filled
CODECS = {"opus": 48_000, "pcmu": 8_000, "l16": 48_000}  # codec -> default clock rate


class RtpSpecError(ValueError):
    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class RtpSpec:
    port: int
    codec: str
    payload_type: int
    rate: int
    channels: int = 1
    source: str = ""  # a network (CIDR) the packets must come from; "" any


def _ulaw_table() -> np.ndarray:
    """G.711 mu-law byte -> float (ITU-T G.711 decoding)."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return (np.where(u & 0x80, 0x84 - t, t - 0x84) / 32768.0).astype(np.float32)


ULAW = _ulaw_table()


def rtp_spec(record: dict[str, Any]) -> RtpSpec | None:
    """The RTP push a mount record asks for (None: none); RtpSpecError naming the field."""
    sdp, rtp = record.get("sdp"), record.get("rtp")
    if sdp:
        if not isinstance(sdp, str):
            raise RtpSpecError(say("ingest.rtp_sdp"), "sdp")
        try:
            media = next(m for m in parse_session(sdp).media if m.media == "audio")
        except (SdpError, StopIteration) as e:
            raise RtpSpecError(f"{say('ingest.rtp_sdp')}: {e}", "sdp") from None
        first = int(media.formats[0]) if media.formats and media.formats[0].isdigit() else -1
        rm = media.rtpmap.get(first)
        if rm is None and first == 0:
            name, rate, channels = "pcmu", 8000, 1
        elif rm is not None:
            name, rate, channels = rm.encoding.lower(), rm.clock, rm.channels or 1
        else:
            raise RtpSpecError(say("ingest.rtp_codec"), "sdp")
        rtp = {"port": media.port, "codec": name, "payload_type": first, "rate": rate,
               "channels": channels, "source": (rtp or {}).get("source", "")}
    if not rtp:
        return None
    if not isinstance(rtp, dict):
        raise RtpSpecError(say("ingest.rtp_codec"), "rtp")
    codec = str(rtp.get("codec", "")).lower()
    if codec not in CODECS:
        raise RtpSpecError(say("ingest.rtp_codec"), "rtp")
    port, pt = rtp.get("port"), rtp.get("payload_type", 0 if codec == "pcmu" else None)
    rate, channels = rtp.get("rate", CODECS[codec]), rtp.get("channels", 1)
    ints = (port, pt, rate, channels)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
        raise RtpSpecError(say("ingest.rtp_numbers"), "rtp")
    assert isinstance(port, int) and isinstance(pt, int) and isinstance(rate, int) \
        and isinstance(channels, int)
    if not (1024 <= port <= 65535 and 0 <= pt <= 127 and 8000 <= rate <= 48000
            and 1 <= channels <= 2) or codec == "opus" and rate != 48000 \
            or codec == "pcmu" and (rate != 8000 or channels != 1):
        raise RtpSpecError(say("ingest.rtp_numbers"), "rtp")
    source = str(rtp.get("source") or "")
    if source:
        try:
            ipaddress.ip_network(source, strict=False)
        except ValueError:
            raise RtpSpecError(say("ingest.rtp_source"), "rtp") from None
    return RtpSpec(port, codec, pt, rate, channels, source)


@dataclass
class RtpStats:
    packets: int = 0
    lost: int = 0  # concealed
    reordered: int = 0  # put back in sequence
    late: int = 0  # dropped: behind what was played, or repeated
    refused: int = 0  # another payload type, another source, malformed


@dataclass
class RtpReceiver(asyncio.DatagramProtocol):
    """One mount's RTP: reorder, decode, deliver 48 kHz mono to `deliver`."""

    spec: RtpSpec
    deliver: Callable[[np.ndarray], None]
    on_packet: Callable[[], None] = lambda: None
    stats: RtpStats = field(default_factory=RtpStats)
    transport: asyncio.DatagramTransport | None = None
    _held: dict[int, bytes] = field(default_factory=dict)  # extended seq -> payload
    _next: int | None = None  # the extended seq to play next
    _last_seq: int = 0
    _opus: OpusDecoder | None = None
    _samples: int = 960  # samples (48 kHz) of the last packet: what a lost one conceals
    _net: Any = None

    def __post_init__(self) -> None:
        if self.spec.codec == "opus":
            self._opus = OpusDecoder()
        if self.spec.source:
            self._net = ipaddress.ip_network(self.spec.source, strict=False)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            if self._net is not None and ipaddress.ip_address(addr[0]) not in self._net:
                raise BadPacket("source")
            p = parse_rtp(data)
            if p.pt != self.spec.payload_type or not p.payload:
                raise BadPacket("payload type")
        except (BadPacket, ValueError):
            self.stats.refused += 1
            return
        self.stats.packets += 1
        seq = self._extend(p.seq)
        if self._next is None or seq >= self._next + 1000 or seq < self._next - 1000:
            self._next, self._held = seq, {}  # the first packet, or the encoder restarted
        if seq < self._next or seq in self._held:
            self.stats.late += 1
            return
        if seq != self._next:
            self.stats.reordered += 1  # counted when it arrives ahead of a missing one
        self._held[seq] = p.payload
        self._drain()
        self.on_packet()

    def _extend(self, seq: int) -> int:
        """The 16-bit sequence number extended past its wraps, near the last one."""
        base = self._last_seq
        ext = (base & ~0xFFFF) | seq
        if ext < base - 0x8000:
            ext += 0x10000
        elif ext > base + 0x8000 and ext >= 0x10000:
            ext -= 0x10000
        self._last_seq = ext
        return ext

    def _drain(self) -> None:
        assert self._next is not None
        while self._held:
            payload = self._held.pop(self._next, None)
            if payload is None:
                if len(self._held) < REORDER:
                    return  # wait a little for the missing one
                gap = min(self._held) - self._next
                if gap <= MAX_CONCEAL:
                    for _ in range(gap):
                        self._play(None)
                self.stats.lost += gap
                self._next = min(self._held)
                continue
            self._play(payload)
            self._next += 1

    def _play(self, payload: bytes | None) -> None:
        try:
            pcm = self._decode(payload)
        except ValueError:
            self.stats.refused += 1
            return
        if pcm.size:
            self._samples = pcm.shape[0]
            self.deliver(pcm)

    def _decode(self, payload: bytes | None) -> np.ndarray:
        s = self.spec
        if s.codec == "opus":
            assert self._opus is not None
            return self._opus.decode(payload, self._samples)
        if payload is None:
            return np.zeros(self._samples, dtype=np.float32)
        if s.codec == "pcmu":
            x = ULAW[np.frombuffer(payload, dtype=np.uint8)]
        else:  # l16: big-endian, interleaved
            n = len(payload) // (2 * s.channels) * s.channels
            x = (np.frombuffer(payload[:2 * n], dtype=">i2").astype(np.float32) / 32768.0
                 ).reshape(-1, s.channels).mean(axis=1)
        if s.rate != SAMPLE_RATE:
            m = x.shape[0] * SAMPLE_RATE // s.rate
            x = np.interp(np.arange(m) * (s.rate / SAMPLE_RATE), np.arange(x.shape[0]), x
                          ).astype(np.float32)
        return x.astype(np.float32, copy=False)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
