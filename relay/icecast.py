"""Icecast-compatible HTTP streams: /streams/A.mp3 and /streams/A.opus (Ogg).

One `HttpChannel` per (area, codec) with at least one listener holds the only hub subscription of
that stream. Its packets become *units* once (MP3 frames as they are; Opus packets muxed into Ogg
pages by one `OggOpusMuxer`), units gather into *batches*, and every listener gets the same batch
bytes, written straight to its asyncio transport: no coroutine, queue or copy per listener.

Why batches: on this machine the cost of HTTP fan-out is the kernel's cost per `send()` (~7 us on
loopback, the same from C or Python), so the number of writes per listener per second decides
it. Like Icecast, which sends 1,400-byte chunks (~3 writes/s at 32 kbit/s), a batch is written
once it holds `batch_bytes` of audio and spans at least `batch_ms`, and at the latest when it
spans `max_batch_ms`. Under load the shortest span grows so that the writes to all listeners
together stay near `write_budget` per second (3,000 listeners, budget 5,000/s: 600 ms batches):
the fan-out's CPU stays bounded and the latency grows gently instead. A new listener gets at once the response head and a burst of the last
`burst_ms` of audio or `burst_kb` KiB, whichever is more (Ogg: the header pages first), so it
starts fast whatever the batch size, and a browser's <audio autoplay> starts at once. A channel
stays subscribed `warm_seconds` after its last listener left, so one who comes back gets the
whole burst. A young channel has less past audio than that (its first listener gets what the
mixer's history primes, 160 ms): a browser's media element, which waits for about 64 KiB before
it plays, gets encoded silence for the rest of its burst (`pad`, see loa.web.streams.http).

Ogg listeners each get a stream of their own numbering, as from a file: header pages 0 and 1,
audio pages from 2, granules from their first audio page. The listeners that joined at the same
page form a `Cohort` that shares one rewrite of each batch (loa.codecs.ogg.renumber): a rewrite
costs about a page's CRC per page, once per cohort, not per listener.

The response is HTTP/1.0-style and close-delimited (no chunked encoding, `Connection: close`),
like Icecast's: the head is written by hand on the transport aiohttp accepted, and aiohttp's own
response writer is never used for the body. ICY metadata (`Icy-MetaData: 1`, MP3 only) inserts a
block every `icy_metaint` bytes of audio: `StreamTitle='<title> (<class>)';` padded to 16 bytes when
what is on air in the area changed since the listener's last block, else a single zero byte.

A listener whose transport buffer grows beyond `high_water_kb` (it does not read) is aborted and
counted as dropped; the others never wait for it. Channels with more than `write_chunk`
listeners are written by a task that yields to the loop between chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loa.codecs import opus
from loa.codecs.encoders import EncoderSettings, Packet, encoder_grid, make_encoder
from loa.codecs.ogg import OggOpusMuxer, pages_for_packets, renumber
from loa.streamer.errors import Kind, LoaError
from loa.streamer.hub import PacketHub, Subscription
from loa.streamer.messages import say

log = logging.getLogger("loa.http_streams")


@dataclass
class HttpStreamSettings:
    # A new listener gets at once the last `burst_ms` of audio or `burst_kb` KiB, whichever is
    # more. Chromium's <audio autoplay> starts on a live stream only after about 64 KiB at once
    # (less stays at readyState 3 for good), like Icecast's 64 KB burst-size; 72 KiB is 18 s at
    # 32 kbit/s. RTP has no burst: its receivers sync on RTCP.
    burst_ms: int = 2000
    burst_kb: int = 72
    warm_seconds: float = 60.0  # a channel keeps encoding this long after its last listener,
    # so a listener who comes back (reload, reconnect, reboot) gets the whole burst at once
    batch_ms: int = 100  # a write to listeners spans at least this much audio ...
    batch_bytes: int = 1400  # ... and waits until it holds this many bytes (one TCP segment) ...
    write_budget: int = 5000  # ... and, under load, spans long enough to keep the writes to all
    # listeners together near this many per second (0: no budget) ...
    max_batch_ms: int = 1000  # ... but never spans more than this
    page_ms: int = 100  # audio per Ogg page
    high_water_kb: int = 256  # a listener whose unsent backlog exceeds this is dropped
    sndbuf_kb: int = 64  # kernel send buffer per listener (0: the kernel's autotuning, which
    # grows to megabytes and would hide a stalled listener for minutes)
    max_listeners: int = 5000
    max_listeners_per_area: int = 2000
    icy_metaint: int = 16000
    retry_after: int = 10  # seconds, in the 503 answer when a limit is reached
    write_chunk: int = 512  # listeners written before yielding to the event loop
    workers: int = 1  # processes that write to listeners (loa.relay.fanout); 0: this process


_LINGER_RESET = struct.pack("ii", 1, 0)

CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg"}
# ICY metadata goes into MP3 only, as with Icecast: an Ogg stream carries its metadata in its
# comment header, and bytes between Ogg pages break demuxers (GStreamer's oggdemux).
ICY_CODECS = {"mp3"}


class LimitReached(LoaError):
    """The server or the area has as many listeners as allowed (or is shutting down)."""

    kind = "limit"

    def __init__(self, message: str, retry_after: int, *, kind: Kind | None = None) -> None:
        super().__init__(message, kind=kind)
        self.retry_after = retry_after


def _header_text(value: str, limit: int = 200) -> str:
    """A header value without control characters (no header injection from area names)."""
    return "".join(c if c >= " " and c != "\x7f" else " " for c in value)[:limit]


def _encode_silence(codec: str, settings: EncoderSettings, n: int,
                    frame_bytes: int) -> list[tuple[bytes, int]]:
    """n packets of steady silence from the stream's encoder (its first packets are skipped:
    they carry its start-up)."""
    warmup = 8
    enc = make_encoder(codec, 0, settings)
    packets: list[Packet] = []
    while len(packets) < n + warmup:
        packets += enc.encode(np.zeros(960, np.float32))
    out = [(p.data, p.duration * 48_000 // p.rate) for p in packets[warmup:warmup + n]]
    if codec == "opus":  # VBR silence is a few bytes a packet: pad it to the bitrate
        out = [(opus.pad(d, frame_bytes), dur) for d, dur in out]
    return out


def icy_block(title: str) -> bytes:
    """An ICY metadata block: length byte (x16) then `StreamTitle='...';` NUL-padded."""
    safe = _header_text(title, 1000).replace("'", "\u2019")
    text = f"StreamTitle='{safe}';".encode()
    while len(text) > 255 * 16:  # the length byte counts 16-byte units
        safe = safe[:-1]
        text = f"StreamTitle='{safe}';".encode()
    n = -(-len(text) // 16)
    return bytes((n,)) + text.ljust(n * 16, b"\0")


class Cohort:
    """Ogg listeners that joined at the same page: their own page numbers and granules.

    Each listener's stream starts at sequence 0 with granules from its join (see
    loa.codecs.ogg); listeners whose first audio page is the same share one rewrite of each
    batch. The channel's first listeners need none (the muxer numbers pages for them)."""

    __slots__ = ("seq_offset", "granule_offset", "members", "cached")

    def __init__(self, seq_offset: int, granule_offset: int) -> None:
        self.seq_offset = seq_offset
        self.granule_offset = granule_offset
        self.members = 0
        self.cached: tuple[object, bytes] = (None, b"")  # (key, rewritten)

    def rewrite(self, key: object, data: bytes) -> bytes:
        """`data` renumbered for this cohort, once per `key` (what identifies those bytes)."""
        k, out = self.cached
        if k != key:
            out = renumber(data, self.seq_offset, self.granule_offset)
            self.cached = (key, out)
        return out


class Listener:
    __slots__ = ("transport", "fd", "channel", "icy", "next", "skip", "meta_left", "title",
                 "bytes", "done", "since", "first_write", "cohort")

    def __init__(self, channel: HttpChannel, transport: asyncio.WriteTransport, icy: bool,
                 metaint: int) -> None:
        self.transport = transport
        # Plain TCP: batches go to the socket with os.write() while asyncio's buffer is empty
        # (~1 us less per write than transport.write); TLS and others: transport.write().
        sock = transport.get_extra_info("socket")
        plain = sock is not None and transport.get_extra_info("sslcontext") is None
        self.fd = sock.fileno() if plain else -1
        self.channel = channel
        self.icy = icy
        self.next = 0  # index of the next batch this listener needs
        self.skip = 0  # bytes of that batch it already got in its burst
        self.meta_left = metaint  # audio bytes until the next ICY metadata block
        self.title: str | None = None  # last StreamTitle sent
        self.bytes = 0
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.since = time.time()
        self.first_write = 0  # bytes of audio in the connect burst
        self.cohort: Cohort | None = None  # Ogg: its page numbering, unless the channel's own


class HttpChannel:
    """The HTTP side of one hub channel: units, batches and the listeners they go to."""

    def __init__(self, streamer: HttpStreamer, area: str, codec: str) -> None:
        self.streamer = streamer
        self.area = area
        self.codec = codec
        s = streamer.settings
        self.listeners: list[Listener] = []
        # (unit, seconds, Ogg: page sequence and the pts its audio starts at)
        self.recent: deque[tuple[bytes, float, int, int]] = deque()
        self.recent_seconds = 0.0
        self.recent_bytes = 0
        self.idle: asyncio.TimerHandle | None = None  # closes the channel once warm_seconds
        # have passed without listeners
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.pending_seconds = 0.0
        self.batches: deque[bytes] = deque(maxlen=32)
        self.sealed = 0  # batches sealed so far: the next one gets this index
        self.hurry = False  # a listener is waiting for its first audio: seal at the next unit
        self.muxer = OggOpusMuxer(page_samples=max(960, s.page_ms * 48)) \
            if codec == "opus" else None
        self._acc = 0  # opus: samples added to the muxer since the last sealed page
        self._base: int | None = None  # opus: pts of the first packet (granule 0 of the channel)
        self.cohorts: dict[tuple[int, int], Cohort] = {}  # by their offsets
        self.units = 0  # units made so far (what a burst ends with)  # by the sequence number of their first audio page
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._title: tuple[int, str] | None = None  # (batch index, StreamTitle) cache
        self.stats = streamer.counters(area, codec)
        self.sub: Subscription = streamer.hub.subscribe(area, codec, maxlen=64)
        self.sub.on_packets = self.on_packets
        self.closed = False

    # ---- units and batches ------------------------------------------------------------------
    def on_packets(self, packets: list[Packet]) -> None:
        if self.closed:
            return
        try:
            self._units(packets)
        except Exception:  # a bad packet is dropped; the stream goes on
            log.exception("packets dropped event=http_packet_error area=%s codec=%s",
                          self.area, self.codec)

    def _units(self, packets: list[Packet]) -> None:
        mux = self.muxer
        if mux is None:
            for p in packets:
                if p.data:
                    self._unit(p.data, p.duration / p.rate, 0, 0)
        else:
            for p in packets:
                if self._base is None:
                    self._base = p.pts
                pages = mux.add(p.pts - self._base, p.duration, p.data)
                self._acc += p.duration
                self._pages(pages)
            if self.hurry and mux.pending_samples:
                self._pages(mux.flush())
        self._maybe_seal()

    def _pages(self, pages: list[bytes]) -> None:
        if not pages:
            return
        mux = self.muxer
        assert mux is not None
        first = mux.seq - len(pages)
        for i, page in enumerate(pages):
            last = i == len(pages) - 1
            self._unit(page, self._acc / 48_000 if last else 0.0, first + i, mux.start)
        self._acc = 0

    def _unit(self, data: bytes, seconds: float, seq: int, start: int) -> None:
        self.pending.append(data)
        self.pending_bytes += len(data)
        self.pending_seconds += seconds
        self.recent.append((data, seconds, seq, start))
        self.units += 1
        self.recent_seconds += seconds
        self.recent_bytes += len(data)
        s = self.streamer.settings
        keep, keep_bytes = s.burst_ms / 1000, s.burst_kb * 1024
        recent = self.recent
        while len(recent) > 1 and self.recent_seconds - recent[0][1] >= keep \
                and self.recent_bytes - len(recent[0][0]) >= keep_bytes:
            unit = recent.popleft()
            self.recent_seconds -= unit[1]
            self.recent_bytes -= len(unit[0])

    def _maybe_seal(self) -> None:
        if not self.pending:
            return
        s = self.streamer.settings
        span = self.pending_seconds * 1000
        if not (self.hurry or span >= s.max_batch_ms
                or (self.pending_bytes >= s.batch_bytes and span >= self.streamer.min_span_ms)):
            return
        self.batches.append(b"".join(self.pending))
        self.sealed += 1
        self.pending = []
        self.pending_bytes = 0
        self.pending_seconds = 0.0
        self.hurry = False
        self.stats["batches"] += 1
        if len(self.listeners) <= s.write_chunk:
            self.write_all(list(self.listeners))
        else:
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._writer())
            self._wake.set()

    async def _writer(self) -> None:
        chunk = max(1, self.streamer.settings.write_chunk)
        while not self.closed:
            await self._wake.wait()
            self._wake.clear()
            snapshot = list(self.listeners)
            for i in range(0, len(snapshot), chunk):
                self.write_all(snapshot[i:i + chunk])
                if i + chunk < len(snapshot):
                    await asyncio.sleep(0)  # let the loop breathe between chunks

    def write_all(self, listeners: list[Listener]) -> None:
        latest = self.sealed
        batches = self.batches
        oldest = latest - len(batches)
        newest = batches[-1] if batches else b""
        joined: dict[int, bytes] = {}
        high_water = self.streamer.settings.high_water_kb * 1024
        for ls in listeners:
            start = ls.next
            if start >= latest or ls.done.done():
                continue
            if start == latest - 1:
                data = newest
            elif start < oldest:
                self.remove(ls, "lagging", drop=True)
                continue
            else:
                data = joined.get(start, b"")
                if not data:
                    data = joined[start] = b"".join(list(batches)[start - oldest:])
            if ls.cohort is not None:
                data = ls.cohort.rewrite((start, latest), data)
            if ls.skip:
                data = data[ls.skip:]
                ls.skip = 0
            ls.next = latest
            if data:
                t = ls.transport
                if t.is_closing():
                    self.remove(ls, "closed")
                    continue
                payload = self.icy(ls, data) if ls.icy else data
                try:
                    if ls.fd >= 0 and not t.get_write_buffer_size():
                        try:
                            n = os.write(ls.fd, payload)
                        except BlockingIOError:
                            n = 0
                        if n < len(payload):
                            t.write(payload[n:])  # asyncio keeps the rest and waits for room
                    else:
                        t.write(payload)
                except ConnectionError:  # the listener went away (reset, broken pipe)
                    self.remove(ls, "closed")
                    continue
                except Exception as e:  # a broken connection ends this listener only
                    log.info("listener write failed event=http_listener_error area=%s "
                             "codec=%s error=%s", self.area, self.codec, e)
                    self.remove(ls, "error")
                    continue
                ls.bytes += len(data)
                self.stats["bytes"] += len(data)
                if t.get_write_buffer_size() > high_water:
                    self.remove(ls, "high-water", drop=True)

    # ---- ICY metadata -----------------------------------------------------------------------
    def current_title(self) -> str:
        cached = self._title
        if cached is not None and cached[0] == self.sealed:
            return cached[1]
        title = self.streamer.title(self.area)
        self._title = (self.sealed, title)
        return title

    def icy(self, ls: Listener, data: bytes) -> bytes:
        n = len(data)
        if n < ls.meta_left:
            ls.meta_left -= n
            return data
        metaint = self.streamer.settings.icy_metaint
        out: list[bytes] = []
        pos = 0
        while n - pos >= ls.meta_left:
            out.append(data[pos:pos + ls.meta_left])
            pos += ls.meta_left
            title = self.current_title()
            if title != ls.title:
                out.append(icy_block(title))
                ls.title = title
            else:
                out.append(b"\0")
            ls.meta_left = metaint
        out.append(data[pos:])
        ls.meta_left -= n - pos
        return b"".join(out)

    # ---- listeners --------------------------------------------------------------------------
    def join(self, transport: asyncio.WriteTransport, icy: bool, head: bytes,
             burst_ms: int | None = None, pad: bool = False) -> Listener:
        """Register a listener and write its response head and connect burst at once (the
        configured one, or exactly `burst_ms` of audio when the listener asked for that),
        filled up with silence when the channel has less audio than that and `pad` is set."""
        s = self.streamer.settings
        ls = Listener(self, transport, icy, s.icy_metaint)
        burst_s = (s.burst_ms if burst_ms is None else burst_ms) / 1000
        burst_bytes = s.burst_kb * 1024 if burst_ms is None else 0
        burst: list[bytes] = []
        have_s = 0.0
        mux = self.muxer
        first: tuple[int, int] | None = (mux.seq, mux.granule) if mux is not None else None
        if (burst_s > 0 or burst_bytes > 0) and self.recent:
            size = 0
            units: list[tuple[bytes, float, int, int]] = []
            for unit in reversed(self.recent):
                if units and have_s >= burst_s - 1e-9 and size >= burst_bytes:
                    break  # enough of both
                units.append(unit)
                have_s += unit[1]
                size += len(unit[0])
            units.reverse()
            if mux is not None:
                while len(units) > 1 and units[0][0][5] & 1:
                    have_s -= units.pop(0)[1]  # never start on a page that continues a packet
                first = units[0][2], units[0][3]
            burst = [u[0] for u in units]
        ls.next = self.sealed
        ls.skip = self.pending_bytes  # the pending units are in the burst or before it
        if not burst:
            self.hurry = True
        audio = b"".join(burst)
        # A young channel has less past audio than the burst: silence stands in for the rest.
        silence = self.streamer.silence(self.codec, burst_s - have_s,
                                        burst_bytes - len(audio)) if pad else []
        if mux is None:
            audio = b"".join(p for p, _ in silence) + audio
        elif first is not None:
            pad_pages, pad_samples = self._silence_pages(silence)
            ls.cohort = self._cohort(*first, len(pad_pages), pad_samples)
            if ls.cohort is not None:
                audio = ls.cohort.rewrite(("burst", self.units, first), audio)
            audio = mux.headers() + b"".join(pad_pages) + audio
        ls.first_write = len(audio)
        if icy and audio:
            audio = self.icy(ls, audio)  # metaint counts every body byte
        transport.write(head + audio)
        ls.bytes += len(audio)
        self.stats["bytes"] += len(audio)
        self.listeners.append(ls)
        self.stats["listeners"] = len(self.listeners)
        self.stats["joined"] += 1
        return ls

    def _cohort(self, first_seq: int, start: int, pad_pages: int = 0,
                pad_samples: int = 0) -> Cohort | None:
        """The cohort of a listener whose first audio page is `first_seq`, starting at `start`
        (pts from the channel's base), after `pad_pages` of silence lasting `pad_samples`; None
        when the channel's own numbering is its."""
        key = (first_seq - 2 - pad_pages, start - pad_samples)
        if key == (0, 0):
            return None
        c = self.cohorts.get(key)
        if c is None:
            c = self.cohorts[key] = Cohort(*key)
        c.members += 1
        return c

    def _silence_pages(self, pad: list[tuple[bytes, int]]) -> tuple[list[bytes], int]:
        """Ogg pages (sequence 2 on, granules from 0) of silence packets, `page_ms` each."""
        mux = self.muxer
        assert mux is not None
        pages: list[bytes] = []
        seq, granule = 2, 0
        step = max(1, mux.page_samples // 960)
        for i in range(0, len(pad), step):
            chunk = pad[i:i + step]
            granules = []
            for _, duration in chunk:
                granule += duration
                granules.append(granule)
            more, seq = pages_for_packets([p for p, _ in chunk], granules, serial=mux.serial,
                                          seq=seq)
            pages += more
        return pages, granule

    def remove(self, ls: Listener, reason: str, drop: bool = False) -> None:
        if ls.done.done():
            return
        try:
            self.listeners.remove(ls)
        except ValueError:
            pass
        c = ls.cohort
        if c is not None:
            c.members -= 1
            if not c.members:
                self.cohorts.pop((c.seq_offset, c.granule_offset), None)
        self.stats["listeners"] = len(self.listeners)
        if drop:
            self.stats["dropped"] += 1
            log.info("listener dropped event=http_listener_drop area=%s codec=%s reason=%s "
                     "backlog=%d", self.area, self.codec, reason,
                     ls.transport.get_write_buffer_size())
            sock = ls.transport.get_extra_info("socket")
            if sock is not None:
                # Reset at once: do not leave the kernel trying to deliver its backlog to a
                # client that does not read.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            ls.transport.abort()
        elif not ls.transport.is_closing():
            ls.transport.close()
        ls.done.set_result(reason)
        self.streamer.listener_left(self, ls)

    def close(self) -> None:
        for ls in list(self.listeners):
            self.remove(ls, "shutdown")
        self.closed = True
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        self.sub.close()
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            self._task = None


@dataclass
class HttpStreamer:
    """All HTTP listeners of a node; channels come and go with their listeners."""

    hub: PacketHub
    settings: HttpStreamSettings = field(default_factory=HttpStreamSettings)
    encoders: EncoderSettings = field(default_factory=EncoderSettings)
    on_air: Callable[[str], dict[str, Any]] | None = None  # engine.on_air
    channels: dict[tuple[str, str], HttpChannel] = field(default_factory=dict)
    per_area: dict[str, int] = field(default_factory=dict)
    total: int = 0
    rejected: int = 0
    closed: bool = False
    _counters: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    _silence: dict[str, list[tuple[bytes, int]]] = field(default_factory=dict)

    @property
    def min_span_ms(self) -> float:
        """The shortest batch now: `batch_ms`, longer when the write budget asks for it."""
        s = self.settings
        if s.write_budget <= 0:
            return float(s.batch_ms)
        return max(float(s.batch_ms), 1000.0 * self.total / s.write_budget)

    def batch_span_ms(self, bytes_per_second: float) -> float:
        """The audio a batch spans for a stream of this byte rate, at the current load."""
        by_bytes = 1000.0 * self.settings.batch_bytes / bytes_per_second
        return min(float(self.settings.max_batch_ms), max(self.min_span_ms, by_bytes))

    def counters(self, area: str, codec: str) -> dict[str, int]:
        c = self._counters.get((area, codec))
        if c is None:
            c = self._counters[(area, codec)] = {"listeners": 0, "bytes": 0, "dropped": 0,
                                                 "joined": 0, "batches": 0}
        return c

    def admit(self, area: str) -> None:
        """Raise LimitReached when one more listener of `area` is over a limit."""
        s = self.settings
        if self.closed:
            raise LimitReached(say("server.shutting_down"), s.retry_after, kind="unavailable")
        if self.total >= s.max_listeners:
            self.rejected += 1
            raise LimitReached(say("listeners.server_full"), s.retry_after)
        if self.per_area.get(area, 0) >= s.max_listeners_per_area:
            self.rejected += 1
            raise LimitReached(say("listeners.area_full", area=area), s.retry_after)

    def silence(self, codec: str, seconds: float, size: int) -> list[tuple[bytes, int]]:
        """Encoded silence (packets and their 48 kHz durations) lasting at least `seconds` and
        holding at least `size` bytes, at the stream's own bitrate (Opus packets padded to it):
        what a young channel's burst lacks. Encoded once per codec, longer when asked."""
        if seconds <= 0 and size <= 0:
            return []
        bitrate = self.encoders.mp3_bitrate if codec == "mp3" else self.encoders.opus_bitrate
        frame = encoder_grid(codec, self.encoders)
        frame_bytes = max(1, bitrate * frame // (8 * 48_000))
        n = max(math.ceil(seconds * 48_000 / frame - 1e-9), -(-size // frame_bytes))
        have = self._silence.get(codec, [])
        if len(have) < n:
            have = self._silence[codec] = _encode_silence(codec, self.encoders, n,
                                                           frame_bytes)
        return have[len(have) - n:]

    def bitrate_kbps(self, codec: str) -> int:
        e = self.encoders
        return (e.mp3_bitrate if codec == "mp3" else e.opus_bitrate) // 1000

    def sample_rate(self, codec: str) -> int:
        return self.encoders.mp3_rate if codec == "mp3" else 48_000

    def head(self, area: str, area_name: str, codec: str, icy: bool) -> bytes:
        """The response head, HTTP/1.0 and close-delimited like Icecast's."""
        name = _header_text(area_name)
        lines = [
            "HTTP/1.0 200 OK",
            f"Content-Type: {CONTENT_TYPES[codec]}",
            "Cache-Control: no-cache, no-store",
            "Pragma: no-cache",
            "Expires: Mon, 26 Jul 1997 05:00:00 GMT",
            "Connection: close",
            "Server: loa",
            "Access-Control-Allow-Origin: *",
            "X-Content-Type-Options: nosniff",
            f"icy-name: {name}",
            f"icy-description: {_header_text(say('icy.description', area=area))}",
            f"icy-br: {self.bitrate_kbps(codec)}",
            f"icy-sr: {self.sample_rate(codec)}",
            "icy-pub: 0",
        ]
        if icy:
            lines.append(f"icy-metaint: {self.settings.icy_metaint}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def title(self, area: str) -> str:
        if self.on_air is None:
            return ""
        try:
            now = self.on_air(area)
        except Exception:  # an area being added or removed: no title this time
            return ""
        title = now.get("title")
        if not title:
            return ""
        klass = now.get("class")
        return f"{title} ({klass})" if klass else str(title)

    def attach(self, area: str, codec: str, transport: asyncio.WriteTransport, icy: bool,
               head: bytes, burst_ms: int | None = None, pad: bool = False) -> Listener:
        """Start streaming to an accepted connection (after `admit`)."""
        if codec not in CONTENT_TYPES:
            raise ValueError(f"unknown stream codec {codec!r}")
        if self.settings.sndbuf_kb > 0:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                    self.settings.sndbuf_kb * 1024)
                except OSError as e:
                    log.debug("sndbuf not set event=http_sndbuf error=%s", e)
        ch = self.channels.get((area, codec))
        if ch is None:
            ch = self.channels[(area, codec)] = HttpChannel(self, area, codec)
            log.info("channel open event=http_channel_open area=%s codec=%s", area, codec)
        elif ch.idle is not None:
            ch.idle.cancel()
            ch.idle = None
        ls = ch.join(transport, icy, head, burst_ms, pad)
        self.total += 1
        self.per_area[area] = self.per_area.get(area, 0) + 1
        return ls

    def listener_left(self, ch: HttpChannel, ls: Listener) -> None:
        self.total -= 1
        left = self.per_area.get(ch.area, 1) - 1
        if left > 0:
            self.per_area[ch.area] = left
        else:
            self.per_area.pop(ch.area, None)
        if ch.listeners or ch.closed or ch.idle is not None:
            return
        warm = self.settings.warm_seconds
        if warm > 0 and not self.closed:
            ch.idle = asyncio.get_running_loop().call_later(warm, self._expire, ch)
        else:
            self._expire(ch)

    def _expire(self, ch: HttpChannel) -> None:
        """Close a channel that has no listener (its encoders stop when nobody else listens)."""
        ch.idle = None
        if ch.listeners or ch.closed or self.channels.get((ch.area, ch.codec)) is not ch:
            return
        del self.channels[(ch.area, ch.codec)]
        ch.close()
        log.info("channel closed event=http_channel_close area=%s codec=%s", ch.area, ch.codec)

    def stats(self) -> dict[str, Any]:
        streams = [{"area": a, "codec": c, **v} for (a, c), v in sorted(self._counters.items())]
        return {
            "listeners": self.total,
            "dropped": sum(v["dropped"] for v in self._counters.values()),
            "rejected": self.rejected,
            "streams": streams,
        }

    async def start(self) -> None:
        """Nothing to open: a channel opens with its first listener."""

    async def close(self) -> None:
        """End every stream (the transports flush what they hold, then close)."""
        self.closed = True
        for ch in list(self.channels.values()):
            ch.close()
        self.channels.clear()
