"""Synchronised playout: RTP time -> wall clock from RTCP sender reports, and the playout thread.

Every loudspeaker of an area must play a given sample at the same instant, or neighbouring horns
echo. The server's RTCP sender reports pair an RTP timestamp with the wall-clock (NTP) instant of
that sample's media position (`station.wall(sample)`), so a receiver can compute, for any packet,
the instant the server assigns to it, and play it a fixed `target_delay` after that instant:

    play_at(ts) = source_wall(ts) + target_delay

Two devices with wall clocks in step (NTP, GNSS; the same clock on one machine) and the same
reports play each sample at the same instant, whatever their network delay, as long as the delay
plus jitter stays under `target_delay`.

`ClockMapping` keeps the last reports of one source and fits a line through them (least squares,
computed relative to the newest point for precision): the slope follows a slow drift between the sender's media
clock and its wall clock; a report far off the line (a restarted sender, a stepped clock) starts
the fit again. Until two reports at least `MIN_SPAN` apart exist the slope is the nominal 1/clock.

`ArrivalTiming` is the fallback for transports without sender reports (HTTP, WebRTC as seen from
here, RTP from a sender that sends no RTCP): the timeline follows the largest lag seen between
arrival and timestamp, so playout is paced and de-jittered but not synchronised across devices.

`Player` is the playout scheduler: one thread per device. Transports push encoded units (stream
timestamp, payload, arrival time) from the event loop into a queue; the thread decodes them
(PyAV releases the GIL), keeps them by timestamp, and hands one frame at a time to the sink at its
absolute deadline on `time.monotonic()`, converted from the wall clock once at start (a stepped
wall clock cannot make playout jump). It waits on the queue until ~1.5 ms before the deadline,
sleeps to 0.3 ms before it, then yields (`sleep(0)`, releasing the GIL) until it passes. For
every frame it records the timestamp it carried, its ideal instant and the instant it was handed
to the sink (`skew` = played - ideal). A unit that arrives after its deadline is dropped
(late); a missing unit is played as silence (missing); after `stall_after` seconds without any
unit the timeline stops and restarts with the next unit.
"""

from __future__ import annotations

import logging
import math
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

log = logging.getLogger("loa.sync")

SAMPLE_RATE = 48_000  # the player's output rate
MIN_SPAN = 1.0  # seconds of reports before the slope is fitted
MAX_PPM = 1000.0  # a fitted slope further than this from nominal is not believed
JUMP = 0.020  # a report this far (s) off the fitted line restarts the fit
WINDOW = 16  # reports kept for the fit


# ---- RTP sequence and timing statistics (the wire format is relay/rtp/wire.py) -------------
def extend(ts32: int, reference: int) -> int:
    """The extended (unwrapped) value of a 32-bit timestamp nearest to `reference`."""
    delta = (ts32 - reference) & 0xFFFFFFFF
    if delta >= 1 << 31:
        delta -= 1 << 32
    return reference + delta


class SeqStats:
    """RFC 3550 A.1/A.3: extended sequence numbers, expected vs received, per interval."""

    def __init__(self) -> None:
        self.base: int | None = None
        self.max_ext = 0
        self.received = 0
        self._prev_expected = 0
        self._prev_received = 0

    def update(self, seq: int) -> None:
        if self.base is None:
            self.base = self.max_ext = seq
        else:
            ext = self._extend16(seq)
            if ext > self.max_ext:
                self.max_ext = ext
        self.received += 1

    def _extend16(self, seq: int) -> int:
        delta = (seq - self.max_ext) & 0xFFFF
        if delta >= 1 << 15:
            delta -= 1 << 16
        return self.max_ext + delta

    @property
    def expected(self) -> int:
        return 0 if self.base is None else self.max_ext - self.base + 1

    def interval_loss(self) -> float:
        """Fraction lost since the previous call (0 when nothing was expected)."""
        expected, received = self.expected, self.received
        exp_i = expected - self._prev_expected
        rec_i = received - self._prev_received
        self._prev_expected, self._prev_received = expected, received
        if exp_i <= 0:
            return 0.0
        return max(0.0, min(1.0, (exp_i - rec_i) / exp_i))


class Jitter:
    """RFC 3550 6.4.1 interarrival jitter, in seconds: J += (|D| - J) / 16."""

    def __init__(self) -> None:
        self.value = 0.0
        self._last: tuple[float, float] | None = None  # (arrival, media seconds)

    def update(self, arrival: float, media_seconds: float) -> None:
        if self._last is not None:
            d = (arrival - self._last[0]) - (media_seconds - self._last[1])
            self.value += (abs(d) - self.value) / 16
        self._last = (arrival, media_seconds)


# ---- timing ----------------------------------------------------------------------------------
class Timing(Protocol):
    """Stream timestamp (extended, codec clock) -> the wall instant the source gives it."""

    @property
    def synced(self) -> bool:
        """True: from the sender's reports (devices agree); False: local arrival."""

    def source_wall(self, ts: int) -> float | None: ...

    def observe(self, ts: int, arrival: float) -> None:
        """A unit with this timestamp arrived (the player calls this for every unit)."""

    def reset(self) -> None:
        """The playout timeline restarts (stall, too many late units)."""


class ClockMapping:
    """RTP timestamps -> wall clock through RTCP sender reports, a line fitted to the last ones.

    Thread-safe for one writer (`add`, on the event loop) and any readers (`source_wall`): the
    fitted line is one tuple replaced atomically."""

    synced = True

    def __init__(self, clock: int, window: int = WINDOW) -> None:
        self.clock = clock
        self.window = window
        self.points: deque[tuple[int, float]] = deque(maxlen=window)
        self.line: tuple[int, float, float] | None = None  # (x0 ts, y0 wall, seconds per tick)
        self.reports = 0
        self.restarts = 0

    @property
    def ready(self) -> bool:
        return self.line is not None

    def add(self, ts_ext: int, ntp: float) -> None:
        if not math.isfinite(ntp):
            return
        self.reports += 1
        line = self.line
        if line is not None:
            predicted = line[1] + (ts_ext - line[0]) * line[2]
            if abs(predicted - ntp) > JUMP:
                log.info("rtcp mapping restarts event=sync_restart off_ms=%.1f",
                         (ntp - predicted) * 1000)
                self.points.clear()
                self.restarts += 1
        if self.points and ts_ext <= self.points[-1][0]:
            if ts_ext == self.points[-1][0]:
                return  # the same report twice (two sockets, a duplicate)
            self.points.clear()  # timestamps went back: a new timeline
        self.points.append((ts_ext, ntp))
        self.line = self._fit()

    def _fit(self) -> tuple[int, float, float]:
        nominal = 1.0 / self.clock
        x0, y0 = self.points[-1]
        pts = list(self.points)
        span = (pts[-1][0] - pts[0][0]) / self.clock
        if len(pts) < 2 or span < MIN_SPAN:
            return x0, y0, nominal
        xs = np.array([p[0] - x0 for p in pts], dtype=np.float64)
        ys = np.array([p[1] - y0 for p in pts], dtype=np.float64)
        xm, ym = xs.mean(), ys.mean()
        var = float(((xs - xm) ** 2).sum())
        slope = float(((xs - xm) * (ys - ym)).sum() / var) if var > 0 else nominal
        if abs(slope / nominal - 1.0) > MAX_PPM * 1e-6:
            slope = nominal
        # the line through the centroid, expressed at the newest point
        return x0, y0 + float(ym - slope * xm), slope

    def source_wall(self, ts: int) -> float | None:
        line = self.line
        if line is None:
            return None
        return line[1] + (ts - line[0]) * line[2]

    def observe(self, ts: int, arrival: float) -> None:
        pass

    def reset(self) -> None:
        pass  # the reports stay right: a playout restart keeps the mapping


class ArrivalTiming:
    """No sender reports: the timeline follows the arrivals. A unit's source instant is its
    timestamp plus the largest lag seen since the (re)start (`arrival - ts / clock`), so a unit
    that comes later than any before moves the timeline later once (a short gap), never earlier:
    batched delivery (HTTP pages and batches) or a jittery path settles after its worst case."""

    synced = False

    def __init__(self, clock: int) -> None:
        self.clock = clock
        self.lag: float | None = None  # max(arrival - ts / clock)

    def observe(self, ts: int, arrival: float) -> None:
        lag = arrival - ts / self.clock
        if self.lag is None or lag > self.lag:
            self.lag = lag

    def source_wall(self, ts: int) -> float | None:
        lag = self.lag
        return None if lag is None else ts / self.clock + lag

    def reset(self) -> None:
        self.lag = None


class RtpTiming:
    """RTCP mapping once a sender report arrived; until then (or for a sender without RTCP after
    `fallback_after` seconds) arrival timing, reported as not synced."""

    def __init__(self, clock: int, fallback_after: float = 12.0) -> None:
        self.mapping = ClockMapping(clock)
        self.arrival = ArrivalTiming(clock)
        self.fallback_after = fallback_after
        self.started = time.monotonic()

    @property
    def synced(self) -> bool:
        return self.mapping.ready

    def source_wall(self, ts: int) -> float | None:
        if self.mapping.ready:
            return self.mapping.source_wall(ts)
        if time.monotonic() - self.started >= self.fallback_after:
            return self.arrival.source_wall(ts)
        return None

    def observe(self, ts: int, arrival: float) -> None:
        self.arrival.observe(ts, arrival)

    def reset(self) -> None:
        self.arrival.reset()


# ---- the player --------------------------------------------------------------------------------
Decoder = Callable[[bytes], np.ndarray]  # payload -> 48 kHz mono float32 (any length)


@dataclass(frozen=True)
class PlayRecord:
    ts: int  # stream timestamp the frame carried (extended, codec clock)
    ideal: float  # wall instant it should play: source_wall(ts) + target delay
    played: float  # wall instant it was handed to the sink
    source: float  # source_wall(ts)
    arrival: float  # when its unit arrived (0: a missing frame played as silence)

    @property
    def skew(self) -> float:
        return self.played - self.ideal


class Sink(Protocol):
    def write(self, pcm: np.ndarray, rec: PlayRecord) -> None:
        """One frame of 48 kHz mono float32, handed over at wall instant `rec.played`."""

    def close(self) -> None: ...


@dataclass
class _Stream:
    gen: int
    clock: int
    timing: Timing
    decode: Decoder


class Player:
    """The playout thread of one device (see the module docstring)."""

    def __init__(self, sink: Sink, *, target_delay: float = 0.3, stall_after: float = 1.0,
                 keep_records: int = 3000, keep_seconds: float = 3.0,
                 max_buffer: float = 5.0, settle: float = 0.5) -> None:
        self.sink = sink
        self.target_delay = target_delay
        # Without sender reports the timeline follows the arrivals: watch them this long before
        # starting, so the first batches of a batching server (HTTP) set the lag, not the burst.
        self.settle = settle
        self.stall_after = stall_after
        self.max_buffer = max_buffer
        self.gain = 1.0  # set from the volume; 0 = mute
        self.records: deque[PlayRecord] = deque(maxlen=keep_records)
        self.recent: deque[np.ndarray] = deque(maxlen=max(1, int(keep_seconds * 50)))
        self.totals = {"frames": 0, "missing": 0, "late": 0, "units": 0, "bad": 0, "stalls": 0}
        self.playing = False  # a timeline is running (audio or concealment)
        self.last_audio = 0.0  # monotonic time of the last frame with real audio
        self._q: queue.SimpleQueue[tuple[int, int, Any, float] | None] = queue.SimpleQueue()
        self._stream: _Stream | None = None
        self._gen = 0
        self._lock = threading.Lock()
        self._interval: list[PlayRecord] = []
        self._interval_counts = {"frames": 0, "missing": 0, "late": 0}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # wall <-> monotonic, measured once: deadlines live on the monotonic clock
        self.wall_offset = time.time() - time.monotonic()

    # ---- control (any thread) ----
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loa-playout", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._q.put(None)
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        try:
            self.sink.close()
        except Exception:  # noqa: BLE001 - closing a broken sink must not hide the shutdown
            log.exception("sink close failed event=sink_error")

    def open_stream(self, clock: int, timing: Timing, decode: Decoder) -> int:
        """A new stream (transport, codec, clock); units of older streams are dropped."""
        with self._lock:
            self._gen += 1
            self._stream = _Stream(self._gen, clock, timing, decode)
            gen = self._gen
        self._q.put((gen, -1, None, 0.0))  # wakes the thread: the timeline restarts
        return gen

    def close_stream(self) -> None:
        with self._lock:
            self._gen += 1
            self._stream = None
        self._q.put((self._gen, -1, None, 0.0))

    def push(self, gen: int, ts: int, data: Any, arrival: float) -> None:
        """One unit (encoded payload, or 48 kHz float32 PCM) with its extended timestamp."""
        self._q.put((gen, ts, data, arrival))

    def now_wall(self) -> float:
        return time.monotonic() + self.wall_offset

    def take_interval(self) -> dict[str, Any]:
        """Playout figures since the previous call (for a heartbeat)."""
        with self._lock:
            recs, self._interval = self._interval, []
            counts = self._interval_counts
            self._interval_counts = {"frames": 0, "missing": 0, "late": 0}
            stream = self._stream
        out: dict[str, Any] = dict(counts)
        synced = bool(stream and stream.timing.synced)
        out["synced"] = synced
        real = [r for r in recs if r.arrival > 0]
        if recs:
            out["skew_ms"] = statistics.median(r.skew for r in recs) * 1000
        if real:
            out["buffer_ms"] = statistics.median(r.played - r.arrival for r in real) * 1000
            if synced:
                out["latency_ms"] = statistics.median(r.played - r.source for r in real) * 1000
            else:
                out["latency_ms"] = out["buffer_ms"]
        return out

    def recent_pcm(self) -> np.ndarray:
        frames = list(self.recent)
        return np.concatenate(frames) if frames else np.zeros(0, dtype=np.float32)

    # ---- the thread ----
    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # the device keeps its control channel; playout is reported down
            log.exception("playout thread failed event=playout_error")
            self.playing = False

    def _loop(self) -> None:
        buf: dict[int, tuple[np.ndarray, float]] = {}
        next_ts: int | None = None
        stream: _Stream | None = None
        missing_run = 0.0
        frame_ticks = 0

        def accept(item: tuple[int, int, Any, float]) -> None:
            nonlocal stream, next_ts, missing_run
            gen, ts, data, arrival = item
            with self._lock:
                current = self._stream
            if current is None or current.gen != gen:
                if current is not stream:  # stream changed or closed: new timeline
                    stream = current
                    buf.clear()
                    next_ts = None
                    self.playing = False
                return
            if stream is not current:
                stream = current
                buf.clear()
                next_ts = None
            if ts < 0:
                return
            self.totals["units"] += 1
            stream.timing.observe(ts, arrival)
            if next_ts is not None and ts < next_ts:
                self.totals["late"] += 1
                self._interval_counts["late"] += 1
                return
            try:
                pcm = data if isinstance(data, np.ndarray) else stream.decode(data)
            except Exception as e:  # noqa: BLE001 - one bad payload is dropped, never fatal
                self.totals["bad"] += 1
                if self.totals["bad"] % 100 == 1:
                    log.warning("undecodable unit event=playout_bad_unit error=%s", e)
                return
            if pcm.size == 0:
                return
            buf[ts] = (pcm.astype(np.float32, copy=False), arrival)
            # bounded: a stream far ahead of its playout (no mapping yet) keeps its newest units
            limit = int(self.max_buffer * 50)
            if len(buf) > limit:
                for k in sorted(buf)[: len(buf) - limit]:
                    del buf[k]

        while not self._stop.is_set():
            if stream is None or next_ts is None:
                try:
                    item = self._q.get(timeout=0.1)
                except queue.Empty:
                    item = (-1, -1, None, 0.0)
                if item is None:
                    return
                if item[0] >= 0:
                    accept(item)
                if stream is None or not buf:
                    continue
                now = self.now_wall()
                if not stream.timing.synced:
                    first = min(a for _, a in buf.values())
                    if now - first < self.settle:
                        continue
                # start: the earliest unit whose instant is still ahead (with 2 ms to spare)
                for ts in sorted(buf):
                    src = stream.timing.source_wall(ts)
                    if src is None:
                        break
                    if src + self.target_delay > now + 0.002:
                        next_ts = ts
                        missing_run = 0.0
                        frame_ticks = buf[ts][0].shape[0] * stream.clock // SAMPLE_RATE
                        self.playing = True
                        log.info("playout starts event=playout_start synced=%s delay_ms=%.0f",
                                 stream.timing.synced, self.target_delay * 1000)
                        break
                    del buf[ts]  # already too late to play
                continue

            src = stream.timing.source_wall(next_ts)
            if src is None:  # mapping lost (cannot happen with the kinds above): restart
                next_ts = None
                continue
            ideal = src + self.target_delay
            deadline = ideal - self.wall_offset
            # wait for the deadline, taking units meanwhile
            while True:
                rem = deadline - time.monotonic()
                if rem <= 0:
                    break
                if rem > 0.002:
                    try:
                        item = self._q.get(timeout=rem - 0.0015)
                    except queue.Empty:
                        continue
                    if item is None:
                        return
                    accept(item)
                    if next_ts is None or stream is None:
                        break  # the stream changed under us
                elif rem > 0.0004:
                    time.sleep(rem - 0.0003)  # oversleeps by ~0.1 ms at most
                else:
                    time.sleep(0)  # the last 0.3 ms: yield (the GIL too) and look again
            if next_ts is None or stream is None:
                continue
            unit = buf.pop(next_ts, None)
            played = time.monotonic() + self.wall_offset
            if unit is not None:
                pcm, arrival = unit
                frame_ticks = max(1, pcm.shape[0] * stream.clock // SAMPLE_RATE)
                missing_run = 0.0
                self.last_audio = time.monotonic()
            else:
                pcm = np.zeros(max(1, frame_ticks * SAMPLE_RATE // stream.clock),
                               dtype=np.float32)
                arrival = 0.0
                missing_run += pcm.shape[0] / SAMPLE_RATE
            out = pcm * self.gain if self.gain != 1.0 else pcm
            rec = PlayRecord(next_ts, ideal, played, src, arrival)
            try:
                self.sink.write(out, rec)
            except Exception:
                log.exception("sink write failed event=sink_error")
            self.records.append(rec)
            self.recent.append(out)
            self.totals["frames"] += 1
            with self._lock:
                self._interval.append(rec)
                self._interval_counts["frames"] += 1
                if unit is None:
                    self._interval_counts["missing"] += 1
            if unit is None:
                self.totals["missing"] += 1
            next_ts += frame_ticks
            # drop what can no longer play
            for k in [k for k in buf if k < next_ts]:
                del buf[k]
            if missing_run >= self.stall_after:
                log.info("playout stalled event=playout_stall after_s=%.1f", missing_run)
                self.totals["stalls"] += 1
                next_ts = None
                self.playing = False
                stream.timing.reset()
                buf.clear()
