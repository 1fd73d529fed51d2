"""Ingest: encoders that push audio to the node (Icecast source clients: BUTT, OBS, Liquidsoap,
ffmpeg's `icecast://`, a Barix Instreamer) become live sources.

A mount (`/ingest/<name>`, a `mount` record) is a place an encoder pushes to. One connection at a
time feeds it: its request body goes through a bounded `Pipe` into PyAV (MP3, Ogg Opus/Vorbis,
AAC, found from the Content-Type or probed) in a thread of its own, decoded to 48 kHz mono and
written into the LivePush of every broadcast that airs the mount (one jitter buffer each: two
broadcasts never steal each other's audio). A new connection to a busy mount takes it over (an
encoder reconnecting after a network cut, while its old TCP connection lingers).

Who airs it: a programme of type `ingest` (scheduled or aired now) and, for a mount bound to
`targets`, the mount itself while an encoder is connected (a live broadcast of the mount's class).
While no encoder is connected the broadcasts airing the mount are held off the air
(`Engine.hold`, cause `input-down`): their areas hear what ranks next. An encoder that drops and
comes back within `grace_s` changes nothing on the air (the jitter buffer runs dry for that
moment); after it the mount's broadcasts are held (an automatic one ends).

Bounds: the pipe holds `pipe_kb` (the HTTP handler stops reading beyond it: TCP pushes back); the
decoder stays at most `max_ahead_s` ahead of real time (a pusher sending faster than real time is
slowed down, not decoded at full speed); `max_bad_packets` undecodable packets in a row end the
connection; nothing of a pusher runs on the event loop or the media clock's thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import av
import numpy as np

from loa.relay.inputs import InputDown, MonoResampler, decoded_audio
from loa.relay.rtp.push import RtpReceiver, rtp_spec
from loa.streamer.broadcast import Broadcast
from loa.streamer.clock import SAMPLE_RATE
from loa.streamer.engine import Engine
from loa.streamer.sources import LivePush

log = logging.getLogger("loa.relay.ingest")

HOLD = "input-down"
PARSED = {"mp3": "mp3float", "aac": "aac"}  # formats decoded frame by frame (no demuxer)
GARBAGE_BYTES = 64 * 1024  # pushed without any audio decoded: not an audio stream
FORMATS = {  # Content-Type (without parameters) -> FFmpeg demuxer; others are probed
    "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/ogg": "ogg", "application/ogg": "ogg",
    "audio/opus": "ogg", "audio/aac": "aac", "audio/aacp": "aac", "audio/x-aac": "aac",
}


@dataclass
class IngestSettings:
    buffer_ms: float = 150.0  # jitter buffer of each broadcast airing a mount (its target delay)
    max_buffer_ms: float = 500.0  # beyond this the oldest audio is dropped (a media clock stall)
    catch_up_ms: float = 100.0  # a buffer steadily this far above buffer_ms is cut back to it
    grace_s: float = 1.0  # an encoder back within this is seamless; after it, fallback
    pipe_kb: int = 256  # pushed bytes waiting for the decoder, at most
    max_ahead_s: float = 1.0  # decoded audio ahead of real time, at most
    read_timeout: float = 10.0  # no byte for this long: the connection is over
    max_bad_packets: int = 50
    probesize: int = 8192
    analyzeduration_ms: int = 200
    max_connections: int = 200  # encoders pushing at once, node-wide
    rtp_address: str = "0.0.0.0"  # where RTP push mounts listen (each on its own port)
    rtp_timeout: float = 0.5  # no RTP packet for this long: the encoder is gone (then grace_s)


class Pipe:
    """Bytes from the event loop to a decoder thread: a bounded buffer that PyAV reads as a file.

    `feed` (loop) appends and says whether there is room for more; `room()` (loop) waits until the
    reader drained it to half; `read` (thread) blocks until data, the end, or `timeout`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int, timeout: float) -> None:
        self.loop = loop
        self.limit = limit
        self.timeout = timeout
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._room: asyncio.Future[None] | None = None
        self.received = 0

    def feed(self, data: bytes) -> bool:
        with self._cond:
            self._buf += data
            self.received += len(data)
            self._cond.notify()
            return len(self._buf) < self.limit

    async def room(self) -> None:
        with self._cond:
            if len(self._buf) < self.limit or self._eof:
                return
            self._room = self.loop.create_future()
            fut = self._room
        await fut

    def end(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify()
            self._wake()

    def _wake(self) -> None:
        fut, self._room = self._room, None
        if fut is not None:
            self.loop.call_soon_threadsafe(_resolve, fut)

    def read(self, n: int = -1) -> bytes:
        with self._cond:
            deadline = time.monotonic() + self.timeout
            while not self._buf and not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise InputDown(f"no data for {self.timeout:g} s")
                self._cond.wait(left)
            n = len(self._buf) if n < 0 else min(n, len(self._buf))
            out = bytes(self._buf[:n])
            del self._buf[:n]
            if self._room is not None and len(self._buf) <= self.limit // 2:
                self._wake()
            return out


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass
class Connection:
    """One encoder's push: its pipe and its decoder thread."""

    mount: Mount
    pipe: Pipe
    fmt: str | None
    remote: str
    stop: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.time)
    samples: int = 0
    bad_packets: int = 0
    ended: str = ""  # why it ended, once it has
    thread: threading.Thread | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Mount:
    """A mount's life on this node: its connection and the jitter buffers that air it."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.id: str = record["id"]
        self.connection: Connection | None = None
        self.pushes: list[LivePush] = []  # one per broadcast airing the mount
        self.auto: str | None = None  # the broadcast the mount airs by itself (its targets)
        self.down_timer: asyncio.TimerHandle | None = None
        self.up = False  # an encoder is connected (or was, within the grace)
        self.connections = 0
        self.last_error = ""
        self.rtp: RtpReceiver | None = None  # an RTP push mount's socket
        self.rtp_last = 0.0  # loop time of its last packet
        self.receiving = False  # RTP packets flow

    def deliver(self, pcm: np.ndarray) -> None:
        for push in list(self.pushes):
            push.write(pcm)

    def stats(self) -> dict[str, Any]:
        c = self.connection
        rtp = self.rtp
        return {"connected": c is not None or self.receiving, "up": self.up,
                "connections": self.connections,
                "rtp": None if rtp is None else {"port": rtp.spec.port, "codec": rtp.spec.codec,
                                                 "receiving": self.receiving,
                                                 **vars(rtp.stats)},
                "remote": c.remote if c else None, "since": c.started if c else None,
                "bytes": c.pipe.received if c else 0, "format": c.fmt if c else None,
                "seconds": round(c.samples / SAMPLE_RATE, 2) if c else 0.0,
                "airing": len(self.pushes), "last_error": self.last_error}


class Ingests:
    """The mounts of one node and the broadcasts that air them."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop,
                 settings: IngestSettings | None = None) -> None:
        self.engine = engine
        self.loop = loop
        self.settings = settings or IngestSettings()
        self.mounts: dict[str, Mount] = {}
        self._watch: asyncio.Task[None] | None = None
        self._of_push: dict[int, Mount] = {}  # id(LivePush) -> its mount
        # Automatic airing of a mount bound to targets (set by the web layer: it persists it).
        self.on_up: Callable[[Mount], Any] | None = None
        self.on_down: Callable[[Mount], Any] | None = None
        engine.started_listeners.append(self._started_thread)
        engine.ended_listeners.append(self._ended_thread)

    # ---- mounts ----------------------------------------------------------------------------------
    def mount(self, record: dict[str, Any]) -> Mount:
        m = self.mounts.get(record["id"])
        if m is None:
            m = self.mounts[record["id"]] = Mount(record)
        m.record = record
        return m

    def forget(self, mount_id: str) -> None:
        """A mount deleted: its encoder is cut, what airs it is held."""
        m = self.mounts.pop(mount_id, None)
        if m is not None and m.connection is not None:
            m.connection.stop.set()
            m.connection.pipe.end()
        if m is not None and m.rtp is not None:
            m.rtp.close()
            m.rtp = None

    def subscribe(self, record: dict[str, Any], name: str) -> LivePush:
        """A jitter buffer for one broadcast airing the mount (the programme's source)."""
        m = self.mount(record)
        s = self.settings
        push = LivePush(target_ms=s.buffer_ms, max_ms=s.max_buffer_ms, name=name,
                        catch_up_ms=s.catch_up_ms)
        m.pushes.append(push)
        self._of_push[id(push)] = m
        return push

    def _started_thread(self, b: Broadcast) -> None:
        """Tick thread: a broadcast airing a mount went on air; no encoder: held at once."""
        m = self._of_push.get(id(b.source))
        if m is not None and not m.up:
            self.engine.hold(b.id, HOLD)

    def _ended_thread(self, b: Broadcast, cause: str) -> None:
        m = self._of_push.pop(id(b.source), None)
        if m is not None:
            try:
                m.pushes.remove(b.source)  # type: ignore[arg-type]
            except ValueError:
                pass
            if m.auto == b.id:
                m.auto = None

    def _airing(self, m: Mount) -> list[str]:
        return [b.id for b in self.engine.active() if self._of_push.get(id(b.source)) is m]

    # ---- connections (event loop) ------------------------------------------------------------
    def connected(self) -> int:
        return sum(m.connection is not None for m in self.mounts.values())

    def open(self, record: dict[str, Any], content_type: str, remote: str) -> Connection:
        """An authenticated encoder starts pushing: its decoder runs; a previous connection to
        the mount is cut (the encoder reconnected)."""
        m = self.mount(record)
        s = self.settings
        old = m.connection
        if old is not None:
            log.info("ingest taken over event=ingest_takeover mount=%s old=%s new=%s",
                     record["name"], old.remote, remote)
            old.stop.set()
            old.pipe.end()
        fmt = FORMATS.get(content_type.split(";")[0].strip().lower())
        conn = Connection(m, Pipe(self.loop, s.pipe_kb * 1024, s.read_timeout), fmt, remote)
        m.connection = conn
        m.connections += 1
        # A connection alone airs nothing (an Ogg encoder's first page can take a second): the
        # mount is up on its first decoded audio. A grace running meanwhile ends in no change
        # while this connection lives (`_gone`).
        conn.thread = threading.Thread(target=self._decode, args=(conn,), daemon=True,
                                       name="loa-ingest")
        conn.thread.start()
        log.info("ingest connected event=ingest_up mount=%s remote=%s format=%s",
                 record["name"], remote, fmt or "probe")
        return conn

    def close(self, conn: Connection, why: str) -> None:
        """The push is over (the encoder hung up, was cut, sent garbage): after the grace, the
        mount's broadcasts are held unless another connection took over."""
        conn.stop.set()
        conn.pipe.end()
        m = conn.mount
        conn.ended = conn.ended or why
        if m.connection is not conn:
            return
        m.connection = None
        m.last_error = conn.ended
        log.info("ingest disconnected event=ingest_down mount=%s remote=%s why=%s seconds=%.1f",
                 m.record["name"], conn.remote, conn.ended, conn.samples / SAMPLE_RATE)
        self._lost(m)

    def _found(self, m: Mount) -> None:
        """Audio comes to the mount (a connection, RTP packets): what airs it is released."""
        if m.down_timer is not None:
            m.down_timer.cancel()
            m.down_timer = None
        if not m.up:
            m.up = True
            for bid in self._airing(m):
                self.engine.hold(bid, HOLD, False)
            if self.on_up is not None:
                self.on_up(m)

    def _heard(self, conn: Connection) -> None:
        """A connection's first audio: the mount is up, unless another took it over."""
        if conn.mount.connection is conn and not conn.stop.is_set():
            self._found(conn.mount)

    def _lost(self, m: Mount) -> None:
        if m.down_timer is None:
            m.down_timer = self.loop.call_later(self.settings.grace_s, self._gone, m)

    def _gone(self, m: Mount) -> None:
        m.down_timer = None
        if m.connection is not None or m.receiving or not m.up:
            return
        m.up = False
        for bid in self._airing(m):
            self.engine.hold(bid, HOLD)
        log.warning("ingest gone, fallback on air event=ingest_gone mount=%s",
                    m.record["name"])
        if self.on_down is not None:
            self.on_down(m)

    # ---- RTP push ------------------------------------------------------------------------------
    async def listen_rtp(self, record: dict[str, Any]) -> None:
        """Open the UDP port of an RTP push mount (RtpSpecError, OSError when it cannot)."""
        spec = rtp_spec(record)
        if spec is None:
            return
        m = self.mount(record)
        if m.rtp is not None:
            m.rtp.close()
            m.rtp = None

        def packet() -> None:
            m.rtp_last = self.loop.time()
            if not m.receiving:
                m.receiving = True
                m.connections += 1
                log.info("rtp push receiving event=ingest_up mount=%s port=%d codec=%s",
                         record["name"], spec.port, spec.codec)
                self._found(m)

        _, proto = await self.loop.create_datagram_endpoint(
            lambda: RtpReceiver(spec, m.deliver, packet),
            local_addr=(self.settings.rtp_address, spec.port))
        m.rtp = proto
        if self._watch is None:
            self._watch = self.loop.create_task(self._watch_rtp())

    async def _watch_rtp(self) -> None:
        """RTP has no hang-up: a mount whose packets stopped for `rtp_timeout` is lost."""
        step = self.settings.rtp_timeout / 2
        while True:
            await asyncio.sleep(step)
            now = self.loop.time()
            for m in list(self.mounts.values()):
                if m.receiving and now - m.rtp_last > self.settings.rtp_timeout:
                    m.receiving = False
                    m.last_error = f"no RTP for {self.settings.rtp_timeout:g} s"
                    log.info("rtp push stopped event=ingest_down mount=%s", m.record["name"])
                    self._lost(m)

    # ---- the decoder thread ------------------------------------------------------------------
    def _decode(self, conn: Connection) -> None:
        s = self.settings
        why = "ended"
        t0 = time.monotonic()
        try:
            for pcm in (self._parsed(conn) if conn.fmt in PARSED else self._demuxed(conn)):
                conn.mount.deliver(pcm)
                if not conn.samples:
                    self.loop.call_soon_threadsafe(self._heard, conn)
                conn.samples += pcm.shape[0]
                ahead = conn.samples / SAMPLE_RATE - (time.monotonic() - t0)
                if ahead > s.max_ahead_s and conn.stop.wait(ahead - s.max_ahead_s):
                    break
        except InputDown as e:
            why = str(e)
        except av.FFmpegError as e:
            why = f"{type(e).__name__}: {e.strerror or e}"
        except Exception as e:  # whatever a pusher sends, the node lives on
            log.exception("ingest decoder failed event=ingest_error mount=%s",
                          conn.mount.record["name"])
            why = f"{type(e).__name__}: {e}"
        conn.ended = conn.ended or ("closed" if conn.stop.is_set() else why)
        conn.pipe.end()
        try:
            self.loop.call_soon_threadsafe(conn.done.set)
        except RuntimeError:  # the loop is closed: shutting down
            pass

    def _demuxed(self, conn: Connection) -> Iterator[np.ndarray]:
        """Any container FFmpeg recognises (Ogg, or a stream without a Content-Type)."""
        s = self.settings
        opts = {"probesize": str(s.probesize),
                "analyzeduration": str(s.analyzeduration_ms * 1000), "fflags": "nobuffer"}
        container = av.open(conn.pipe, "r", format=conn.fmt, options=opts)
        try:

            def bad() -> None:
                conn.bad_packets += 1

            yield from decoded_audio(container, conn.stop.is_set, s.max_bad_packets, bad)
        finally:
            container.close()

    def _parsed(self, conn: Connection) -> Iterator[np.ndarray]:
        """MP3 and ADTS AAC, frame by frame through FFmpeg's parser: its demuxer reads 1 KiB
        packets, 128 ms of a 64 kbit/s stream, before it hands one over."""
        s = self.settings
        cc = cast(av.AudioCodecContext, av.CodecContext.create(PARSED[conn.fmt or ""], "r"))
        mono = MonoResampler()
        bad = 0
        waste = 0  # bytes read since the last decoded audio
        while not conn.stop.is_set():
            data = conn.pipe.read(4096)
            if not data:
                return
            waste += len(data)
            for packet in cc.parse(data):
                try:
                    frames = cc.decode(packet)
                except (av.InvalidDataError, ValueError) as e:
                    bad += 1
                    conn.bad_packets += 1
                    if bad >= s.max_bad_packets:
                        raise InputDown(f"undecodable audio: {e}") from None
                    continue
                bad = 0
                for frame in frames:
                    waste = 0
                    yield from mono(frame)
            if waste > GARBAGE_BYTES:
                raise InputDown(f"no audio in {waste // 1024} KiB")

    async def close_all(self) -> None:
        self.engine.started_listeners[:] = [cb for cb in self.engine.started_listeners
                                            if cb != self._started_thread]
        self.engine.ended_listeners[:] = [cb for cb in self.engine.ended_listeners
                                          if cb != self._ended_thread]
        if self._watch is not None:
            self._watch.cancel()
        for m in self.mounts.values():
            if m.rtp is not None:
                m.rtp.close()
        conns = [m.connection for m in self.mounts.values() if m.connection is not None]
        for c in conns:
            c.stop.set()
            c.pipe.end()
        for m in self.mounts.values():
            if m.down_timer is not None:
                m.down_timer.cancel()

        def join() -> None:
            for c in conns:
                if c.thread is not None:
                    c.thread.join(5.0)

        await asyncio.to_thread(join)
