"""HLS out: /streams/A/index.m3u8 with short MPEG-TS segments and a sliding window.

Design. A `Segmenter` per area takes the area's MP3 packets from the hub (the same encode that
serves `/streams/A.mp3`: HLS adds no encoder), cuts them into segments on a media-time grid of
`segment_seconds`, wraps each segment in MPEG-TS with the small muxer below, and keeps the last
`window` (+ a short grace) segments in memory. Requests are served from memory; nothing touches
the disk. A segmenter runs only while someone asked for its area recently: the first playlist
request starts it, `idle_seconds` without a request stops it (and the hub stops encoding MP3
for the area if nobody else listens).

Why a hand-written TS muxer rather than PyAV's "mpegts" muxer: the packets are already encoded,
so muxing is pure framing (PAT, PMT, PES with a PTS, 188-byte packets). Written here it keeps the
continuity counters and the 90 kHz timestamps continuous from one segment to the next (a muxer
opened per segment restarts both, which demuxers that read segments back to back, like FFmpeg's
HLS demuxer, report as corrupt), marks discontinuities in the stream itself, costs no container
set-up per segment, and is cheap enough to run on the event loop (see `python -m loa.web.bench.hls --segmenter`:
about 1 ms of CPU for a 2 s segment), so no thread hop is needed.

Timestamps: a packet's pts is continuous per area (hub.py). A jump (a gap in the channel, packets
lost by a stalled loop, a restart of the media clock) closes the current segment early, and the
next one carries `#EXT-X-DISCONTINUITY` (and the TS discontinuity indicator);
`#EXT-X-DISCONTINUITY-SEQUENCE` counts the tags that slid out of the window, as RFC 8216 requires.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from loa.codecs.encoders import Packet
from loa.streamer.hub import PacketHub, Subscription

log = logging.getLogger("loa.hls")


@dataclass
class HlsSettings:
    enabled: bool = True
    segment_seconds: float = 2.0
    window: int = 6  # segments listed in the playlist
    codec: str = "mp3"
    idle_seconds: float = 60.0  # a segmenter without requests for this long stops

    def check(self) -> None:
        if not 0.5 <= self.segment_seconds <= 10.0:
            raise ValueError("[hls] segment_seconds must be within 0.5-10")
        if not 2 <= self.window <= 100:
            raise ValueError("[hls] window must be within 2-100")
        if self.codec != "mp3":
            raise ValueError("[hls] codec: only mp3 is carried in MPEG-TS segments")
        if self.idle_seconds <= 0:
            raise ValueError("[hls] idle_seconds must be positive")


# ---- MPEG-TS -----------------------------------------------------------------------------------
TS = 188
PMT_PID = 0x1000
AUDIO_PID = 0x100
STREAM_MPEG1_AUDIO = 0x03
STREAM_MPEG2_AUDIO = 0x04  # MPEG-2 (LSF, 16-24 kHz) layer I-III
PTS_MASK = (1 << 33) - 1
PTS_OFFSET = 126_000  # 1.4 s: the first PTS, so that the PCR (0.7 s earlier) never goes negative
PCR_LEAD = 63_000  # the PCR runs 0.7 s ahead of the PTS (FFmpeg's default mux delay)
PES_MAX_SECONDS = 0.2  # a PES carries at most this much audio (a PCR in each one)
PES_MAX_BYTES = 2930


def _crc32_table() -> list[int]:
    table = []
    for i in range(256):
        c = i << 24
        for _ in range(8):
            c = ((c << 1) ^ 0x04C11DB7) if c & 0x80000000 else (c << 1)
        table.append(c & 0xFFFFFFFF)
    return table


_CRC = _crc32_table()


def crc32_mpeg(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC[((crc >> 24) ^ b) & 0xFF]
    return crc


def _section(table_id: int, ext: int, body: bytes) -> bytes:
    """A PSI section with the syntax header, version 0, current, one section, and its CRC."""
    length = 5 + len(body) + 4
    head = bytes([table_id, 0xB0 | (length >> 8), length & 0xFF, ext >> 8, ext & 0xFF,
                  0xC1, 0x00, 0x00])
    sec = head + body
    return sec + crc32_mpeg(sec).to_bytes(4, "big")


def _pes_header(pts90: int, payload_len: int) -> bytes:
    pts = pts90 & PTS_MASK
    length = 3 + 5 + payload_len  # flags, header length, PTS, then the payload
    return bytes([
        0x00, 0x00, 0x01, 0xC0, (length >> 8) & 0xFF, length & 0xFF,
        0x84,  # '10', not scrambled, data aligned
        0x80,  # PTS only
        0x05,
        0x21 | ((pts >> 29) & 0x0E),
        (pts >> 22) & 0xFF, 0x01 | ((pts >> 14) & 0xFE),
        (pts >> 7) & 0xFF, 0x01 | ((pts << 1) & 0xFE),
    ])


class TsMuxer:
    """MPEG-TS for one audio elementary stream, continuous across the segments it writes."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        stream_type = STREAM_MPEG2_AUDIO if rate < 32_000 else STREAM_MPEG1_AUDIO
        pat = _section(0x00, 1, bytes([0x00, 0x01, 0xE0 | (PMT_PID >> 8), PMT_PID & 0xFF]))
        pmt = _section(0x02, 1, bytes([
            0xE0 | (AUDIO_PID >> 8), AUDIO_PID & 0xFF,  # PCR PID
            0xF0, 0x00,  # no program descriptors
            stream_type, 0xE0 | (AUDIO_PID >> 8), AUDIO_PID & 0xFF, 0xF0, 0x00,
        ]))
        self._psi = {0: b"\x00" + pat, PMT_PID: b"\x00" + pmt}  # pointer field, then section
        self._cc = {0: 0, PMT_PID: 0, AUDIO_PID: 0}

    def _next_cc(self, pid: int) -> int:
        cc = self._cc[pid]
        self._cc[pid] = (cc + 1) & 0x0F
        return cc

    def _psi_packet(self, pid: int) -> bytes:
        payload = self._psi[pid]
        head = bytes([0x47, 0x40 | (pid >> 8), pid & 0xFF, 0x10 | self._next_cc(pid)])
        return head + payload + b"\xff" * (TS - 4 - len(payload))

    def _pes_packets(self, pes: bytes, pcr90: int, discontinuity: bool,
                     out: list[bytes]) -> None:
        pos = 0
        first = True
        while pos < len(pes):
            af: bytes | None = None  # adaptation field after its length byte; None: none
            if first:
                # A PCR, random access (every MP3 frame stands alone), maybe a discontinuity.
                flags = 0x50 | (0x80 if discontinuity else 0)
                base = pcr90 & PTS_MASK
                af = bytes([flags, (base >> 25) & 0xFF, (base >> 17) & 0xFF, (base >> 9) & 0xFF,
                            (base >> 1) & 0xFF, ((base & 1) << 7) | 0x7E, 0x00])
            room = TS - 4 - (0 if af is None else 1 + len(af))
            chunk = pes[pos:pos + room]
            stuff = room - len(chunk)
            if stuff:  # the last packet of the PES: stuffing in the adaptation field
                if af is not None:
                    af += b"\xff" * stuff
                else:
                    af = b"" if stuff == 1 else b"\x00" + b"\xff" * (stuff - 2)
            cc = self._next_cc(AUDIO_PID)
            head = bytes([0x47, (0x40 if first else 0x00) | (AUDIO_PID >> 8), AUDIO_PID & 0xFF])
            if af is None:
                out.append(head + bytes([0x10 | cc]) + chunk)
            else:
                out.append(head + bytes([0x30 | cc, len(af)]) + af + chunk)
            pos += len(chunk)
            first = False

    def segment(self, packets: list[Packet], discontinuity: bool = False) -> bytes:
        """PAT, PMT, then the packets in PES packets of at most PES_MAX_SECONDS."""
        out = [self._psi_packet(0), self._psi_packet(PMT_PID)]
        max_dur = int(PES_MAX_SECONDS * self.rate)
        i = 0
        while i < len(packets):
            j = i
            size = 0
            dur = 0
            while j < len(packets) and (j == i or (size + len(packets[j].data) <= PES_MAX_BYTES
                                                   and dur + packets[j].duration <= max_dur)):
                size += len(packets[j].data)
                dur += packets[j].duration
                j += 1
            payload = b"".join(p.data for p in packets[i:j])
            pts90 = packets[i].pts * 90_000 // self.rate + PTS_OFFSET
            pes = _pes_header(pts90, len(payload)) + payload
            self._pes_packets(pes, pts90 - PCR_LEAD, discontinuity and i == 0, out)
            i = j
        return b"".join(out)


# ---- segments and playlists --------------------------------------------------------------------
@dataclass(slots=True)
class Segment:
    seq: int
    data: bytes
    duration: float  # seconds
    pts: int  # of its first packet, codec clock
    discontinuity: bool
    created: float  # loop time


class Segmenter:
    """One area's HLS: packets in, a sliding window of TS segments and the playlist out."""

    GRACE = 2  # segments kept after they leave the playlist (RFC 8216 6.2.2)

    def __init__(self, area: str, settings: HlsSettings, first_seq: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.area = area
        self.settings = settings
        self.clock = clock
        self.next_seq = first_seq
        self.segments: deque[Segment] = deque()
        self.discontinuity_seq = 0
        self.discontinuities = 0
        self.packets_in = 0
        self.ignored = 0
        self._rate = 0
        self._mux: TsMuxer | None = None
        self._pending: list[Packet] = []
        self._boundary = 0  # pts where the pending segment ends
        self._expected: int | None = None  # pts the next packet should have
        self._gap_before_next = False
        self._playlist: bytes | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self.sub: Subscription | None = None
        self.last_request = clock()

    # ---- input -------------------------------------------------------------------------------
    def attach(self, hub: PacketHub) -> None:
        self.sub = hub.subscribe(self.area, self.settings.codec, maxlen=1)
        self.sub.on_packets = self.on_packets

    def detach(self) -> None:
        if self.sub is not None:
            self.sub.close()
            self.sub = None
        for w in self._waiters:
            if not w.done():
                w.set_result(None)
        self._waiters.clear()

    def on_packets(self, packets: list[Packet]) -> None:
        """Hub callback (event loop). Never raises: a bad packet must not stop delivery."""
        try:
            self.feed(packets)
        except Exception:
            log.exception("segmenter failed event=hls_error area=%s", self.area)
            self._pending = []
            self._expected = None
            self._gap_before_next = True

    def feed(self, packets: list[Packet]) -> None:
        for p in packets:
            if p.codec != self.settings.codec or p.rate <= 0 or p.duration <= 0 or not p.data:
                self.ignored += 1
                continue
            self.packets_in += 1
            if self._mux is None or p.rate != self._rate:
                if self._pending:
                    self._close_segment()
                if self._mux is not None:
                    self._gap_before_next = True
                self._rate = p.rate
                self._mux = TsMuxer(p.rate)
                self._expected = None
            if self._expected is not None and p.pts != self._expected:
                log.info("timestamp jump event=hls_discontinuity area=%s gap_ms=%.0f",
                         self.area, (p.pts - self._expected) * 1000 / p.rate)
                if self._pending:
                    self._close_segment()
                self._gap_before_next = True
            if self._pending and p.pts >= self._boundary:
                self._close_segment()
            if not self._pending:
                grid = max(1, round(self.settings.segment_seconds * p.rate))
                self._boundary = (p.pts // grid + 1) * grid
            self._pending.append(p)
            self._expected = p.end

    def _close_segment(self) -> None:
        assert self._mux is not None
        packets, self._pending = self._pending, []
        disc = self._gap_before_next
        self._gap_before_next = False
        data = self._mux.segment(packets, disc)
        dur = sum(p.duration for p in packets) / self._rate
        seg = Segment(self.next_seq, data, dur, packets[0].pts, disc, self.clock())
        self.next_seq += 1
        if disc:
            self.discontinuities += 1
        self.segments.append(seg)
        window = self.settings.window
        if len(self.segments) > window and self.segments[-window - 1].discontinuity:
            self.discontinuity_seq += 1  # its tag just left the playlist
        while len(self.segments) > window + self.GRACE:
            self.segments.popleft()
        self._playlist = None
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # ---- output ------------------------------------------------------------------------------
    def listed(self) -> list[Segment]:
        return list(self.segments)[-self.settings.window:]

    def target_duration(self) -> int:
        # Fixed for the life of the playlist (RFC 8216 6.2.1). Segments end on the first frame
        # boundary after the grid, so they last at most segment_seconds + one frame (24 ms), which
        # rounds to at most ceil(segment_seconds).
        return max(1, math.ceil(self.settings.segment_seconds))

    def playlist(self) -> bytes:
        if self._playlist is None:
            listed = self.listed()
            lines = ["#EXTM3U", "#EXT-X-VERSION:3",
                     f"#EXT-X-TARGETDURATION:{self.target_duration()}",
                     f"#EXT-X-MEDIA-SEQUENCE:{listed[0].seq if listed else self.next_seq}",
                     f"#EXT-X-DISCONTINUITY-SEQUENCE:{self.discontinuity_seq}"]
            for s in listed:
                if s.discontinuity:
                    lines.append("#EXT-X-DISCONTINUITY")
                lines.append(f"#EXTINF:{s.duration:.3f},")
                lines.append(f"{s.seq}.ts")
            self._playlist = ("\n".join(lines) + "\n").encode()
        return self._playlist

    def segment(self, seq: int) -> Segment | None:
        if not self.segments:
            return None
        i = seq - self.segments[0].seq
        if 0 <= i < len(self.segments):
            return self.segments[i]
        return None

    async def wait_segments(self, limit: float) -> bool:
        """Wait until at least one segment exists (a fresh segmenter); False on timeout."""
        if self.segments:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(fut, limit)
        except TimeoutError:
            return False
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
        return bool(self.segments)


class HlsService:
    """The segmenters of one node: started on demand, stopped when nobody asks any more."""

    def __init__(self, hub: PacketHub, settings: HlsSettings) -> None:
        settings.check()
        self.hub = hub
        self.settings = settings
        self.segmenters: dict[str, Segmenter] = {}
        self._next_seq: dict[str, int] = {}  # survives a stop: numbers are never reused
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.started = 0
        self.stopped = 0

    def touch(self, area: str) -> Segmenter:
        """The area's segmenter (started if needed); counts as a request."""
        loop = asyncio.get_running_loop()
        seg = self.segmenters.get(area)
        if seg is None:
            # Sequence numbers from the wall clock: a node restart does not reuse numbers that a
            # player may still hold.
            first = self._next_seq.get(area, int(time.time() / self.settings.segment_seconds))
            seg = Segmenter(area, self.settings, first, loop.time)
            seg.attach(self.hub)
            self.segmenters[area] = seg
            self.started += 1
            log.info("hls segmenter started event=hls_start area=%s first_seq=%d", area, first)
            self._arm(area, loop.time() + self.settings.idle_seconds)
        seg.last_request = loop.time()
        return seg

    def get(self, area: str) -> Segmenter | None:
        seg = self.segmenters.get(area)
        if seg is not None:
            seg.last_request = asyncio.get_running_loop().time()
        return seg

    def _arm(self, area: str, when: float) -> None:
        loop = asyncio.get_running_loop()
        self._timers[area] = loop.call_at(when, self._check_idle, area)

    def _check_idle(self, area: str) -> None:
        seg = self.segmenters.get(area)
        if seg is None:
            return
        loop = asyncio.get_running_loop()
        deadline = seg.last_request + self.settings.idle_seconds
        if loop.time() < deadline:
            self._arm(area, deadline)
            return
        self.stop(area, "idle")

    def stop(self, area: str, cause: str = "stopped") -> None:
        seg = self.segmenters.pop(area, None)
        timer = self._timers.pop(area, None)
        if timer is not None:
            timer.cancel()
        if seg is None:
            return
        seg.detach()
        self._next_seq[area] = seg.next_seq
        self.stopped += 1
        log.info("hls segmenter stopped event=hls_stop area=%s cause=%s segments=%d", area, cause,
                 seg.next_seq - (seg.segments[0].seq if seg.segments else seg.next_seq))

    def close(self) -> None:
        for area in list(self.segmenters):
            self.stop(area, "shutdown")
