"""HLS out: /streams/A/index.m3u8 with short MPEG-TS segments and a sliding window.

Design. A `Segmenter` per area takes the area's MP3 packets from the hub (the same encode that
serves `/streams/A.mp3`: HLS adds no encoder), cuts them into segments on a media-time grid of
`segment_seconds`, wraps each segment in MPEG-TS (loa.codecs.mpegts), and keeps the last
`window` (+ a short grace) segments in memory. Requests are served from memory; nothing touches
the disk. A segmenter runs only while someone asked for its area recently: the first playlist
request starts it, `idle_seconds` without a request stops it (and the hub stops encoding MP3
for the area if nobody else listens). One muxer per area keeps the TS continuity counters and
timestamps continuous across its segments.

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
from typing import Any

from loa.codecs.encoders import Packet
from loa.codecs.mpegts import TsMuxer
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

    async def start(self) -> None:
        """Nothing to open: a segmenter starts with its area's first request."""

    async def close(self) -> None:
        for area in list(self.segmenters):
            self.stop(area, "shutdown")

    def stats(self) -> dict[str, Any]:
        return {"segmenters": len(self.segmenters), "started": self.started,
                "stopped": self.stopped}
