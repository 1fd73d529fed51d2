"""Sources: anything that yields 48 kHz mono float32 audio, 20 ms at a time.

A *seekable* source can hand out an independent cursor at any position (`at`), which is how a
preempted programme resumes at the exact sample where it stopped in one area while it keeps
playing in another. Live sources (`LivePush`) are not seekable: there is only "now".
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections import deque

import numpy as np

from loa.codecs.decode import decode_file
from loa.codecs.loudness import integrated_lufs, normalise_gain
from loa.streamer.clock import FRAME, SAMPLE_RATE
from loa.streamer.messages import say

log = logging.getLogger("loa.sources")

_ZERO = np.zeros(FRAME, dtype=np.float32)


class Source:
    """Base class. `read(n)` always returns exactly n samples (zero-padded past the end)."""

    seekable = True
    name = "source"
    position = 0
    length: int | None = None  # samples, None when endless

    @property
    def finished(self) -> bool:
        return self.length is not None and self.position >= self.length

    def read(self, n: int = FRAME) -> np.ndarray:
        raise NotImplementedError

    def read_stored(self, n: int = FRAME) -> tuple[np.ndarray, float] | None:
        """The next n samples as stored (int16 or float32) and their scale to float, advancing
        like `read`; None when they are not one stored run (then call `read`). The engine
        converts every playhead's frame of a tick in one numpy pass with this."""
        return None

    def skip(self, n: int = FRAME) -> None:
        """Advance without producing audio (nobody listens to this cursor right now)."""
        self.read(n)

    def at(self, position: int) -> Source:
        """An independent cursor on the same audio, at `position`."""
        raise NotImplementedError


class PcmSource(Source):
    """Audio in memory or memory-mapped, float32 or 16-bit, shared by all cursors, never copied."""

    def __init__(self, pcm: np.ndarray, name: str = "pcm", gain: float = 1.0,
                 position: int = 0) -> None:
        self.pcm = pcm
        self.name = name
        self.gain = gain
        self._scale = np.float32(gain / 32768 if pcm.dtype.kind == "i" else gain)
        self.size = int(pcm.shape[0])
        self.length = self.size
        self.position = min(position, self.size)

    def read(self, n: int = FRAME) -> np.ndarray:
        start = self.position
        end = min(start + n, self.size)
        self.position = end
        chunk = self.pcm[start:end]
        if chunk.dtype != np.float32 or self._scale != 1.0:
            chunk = np.multiply(chunk, self._scale, dtype=np.float32)
        if chunk.shape[0] < n:
            chunk = np.concatenate([chunk, np.zeros(n - chunk.shape[0], dtype=np.float32)])
        return chunk

    def read_stored(self, n: int = FRAME) -> tuple[np.ndarray, float] | None:
        start = self.position
        if start + n > self.size:
            return None
        self.position = start + n
        return self.pcm[start:start + n], float(self._scale)

    def skip(self, n: int = FRAME) -> None:
        self.position = min(self.position + n, self.size)

    def at(self, position: int) -> PcmSource:
        return PcmSource(self.pcm, self.name, self.gain, position)

    @property
    def seconds(self) -> float:
        return self.size / SAMPLE_RATE


class ToneSource(Source):
    """A sine tone, phase-exact at any position."""

    def __init__(self, freq: float, amplitude: float = 0.5, seconds: float | None = None,
                 position: int = 0, name: str | None = None) -> None:
        self.freq = freq
        self.amplitude = amplitude
        self.length = None if seconds is None else int(round(seconds * SAMPLE_RATE))
        self.position = position
        self.name = name or f"tone {freq:g} Hz"
        self._w = 2 * math.pi * freq / SAMPLE_RATE
        self._grow(FRAME)

    def _grow(self, n: int) -> None:
        advance = self._w * np.arange(n, dtype=np.float64)
        self._cos = np.cos(advance).astype(np.float32)
        self._sin = np.sin(advance).astype(np.float32)

    def read(self, n: int = FRAME) -> np.ndarray:
        if n > self._cos.shape[0]:
            self._grow(n)
        # sin(p + a) = sin p cos a + cos p sin a: no sine per sample, and the start phase p is
        # reduced modulo 2*pi in float64, so the tone is exact at any position, however late.
        p = math.fmod(self._w * self.position, 2 * math.pi)
        out = self._cos[:n] * np.float32(self.amplitude * math.sin(p))
        out += self._sin[:n] * np.float32(self.amplitude * math.cos(p))
        if self.length is not None and self.position + n > self.length:
            out[max(0, self.length - self.position):] = 0.0
        self.position += n
        if self.length is not None:
            self.position = min(self.position, self.length)
        return out

    def skip(self, n: int = FRAME) -> None:
        self.position += n
        if self.length is not None:
            self.position = min(self.position, self.length)

    def at(self, position: int) -> ToneSource:
        return ToneSource(self.freq, self.amplitude,
                          None if self.length is None else self.length / SAMPLE_RATE,
                          position, self.name)


class Silence(Source):
    def __init__(self, seconds: float | None = None, position: int = 0) -> None:
        self.length = None if seconds is None else int(round(seconds * SAMPLE_RATE))
        self.position = position
        self.name = "silence"

    def read(self, n: int = FRAME) -> np.ndarray:
        self.skip(n)
        return np.zeros(n, dtype=np.float32)

    def skip(self, n: int = FRAME) -> None:
        self.position += n
        if self.length is not None:
            self.position = min(self.position, self.length)

    def at(self, position: int) -> Silence:
        return Silence(None if self.length is None else self.length / SAMPLE_RATE, position)


def chime_pcm(notes: tuple[float, ...] = (659.25, 523.25, 587.33, 392.0),
              note_seconds: float = 0.45, amplitude: float = 0.45) -> np.ndarray:
    """The attention signal: a four-note chime with bell-like decay (no clicks at the edges)."""
    n = int(note_seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    env = np.exp(-3.5 * t / note_seconds) * np.minimum(1.0, t / 0.005)
    parts = []
    for f in notes:
        tone = np.sin(2 * np.pi * f * t) + 0.25 * np.sin(2 * np.pi * 2 * f * t)
        parts.append(amplitude * env * tone / 1.25)
    parts.append(np.zeros(int(0.3 * SAMPLE_RATE)))
    return np.concatenate(parts).astype(np.float32)


def chime() -> PcmSource:
    return PcmSource(chime_pcm(), "chime")


_lufs_cache: dict[tuple[str, int, int], float] = {}


def measure_lufs(path: str | os.PathLike[str], pcm: np.ndarray) -> float:
    """Integrated loudness of a file's audio, measured once per file version."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _lufs_cache:
        if len(_lufs_cache) > 4096:
            _lufs_cache.clear()
        _lufs_cache[key] = integrated_lufs(pcm)
    return _lufs_cache[key]


async def load_file(path: str | os.PathLike[str], *, gain: float = 1.0,
                    max_seconds: float | None = None,
                    loudness_target: float | None = None) -> PcmSource:
    """Decode a file off the event loop (PyAV in a thread) into a seekable source.

    With `loudness_target` (LUFS, EBU R128), the source's gain brings the file to that loudness.
    """

    def work() -> tuple[np.ndarray, float]:
        pcm = decode_file(path, max_seconds=max_seconds)
        if loudness_target is None:
            return pcm, 1.0
        return pcm, normalise_gain(measure_lufs(path, pcm), loudness_target)

    pcm, norm = await asyncio.to_thread(work)
    return PcmSource(pcm, os.path.basename(os.fspath(path)), gain * norm)


class Playlist(Source):
    """A sequence of seekable sources played `repeat` times with `gap` seconds between items."""

    def __init__(self, items: list[Source], repeat: int = 1, gap: float = 0.0,
                 position: int = 0, name: str = "playlist") -> None:
        if not items:
            raise ValueError(say("programme.empty_playlist"))
        if repeat < 1:
            raise ValueError(say("playlist.repeat"))
        for it in items:
            if not it.seekable or it.length is None:
                raise ValueError("playlist items must be finite and seekable")
        self.items = [it.at(0) for it in items]
        self.repeat = repeat
        self.gap = gap
        self.name = name
        gap_n = int(round(gap * SAMPLE_RATE))
        # Flatten into (start, source|None for a gap, length) segments.
        self._segments: list[tuple[int, Source | None, int]] = []
        pos = 0
        for r in range(repeat):
            for i, it in enumerate(self.items):
                assert it.length is not None
                self._segments.append((pos, it, it.length))
                pos += it.length
                last = r == repeat - 1 and i == len(self.items) - 1
                if gap_n and not last:
                    self._segments.append((pos, None, gap_n))
                    pos += gap_n
        self.length = pos
        self.position = 0
        self._seg = 0
        self._cursor: Source | None = None
        self._seek(position)

    def _seek(self, position: int) -> None:
        self.position = min(position, self.length or 0)
        self._seg = 0
        while (self._seg < len(self._segments) - 1
               and self._segments[self._seg + 1][0] <= self.position):
            self._seg += 1
        start, src, _ = self._segments[self._seg]
        self._cursor = src.at(self.position - start) if src is not None else None

    def read(self, n: int = FRAME) -> np.ndarray:
        start, _, length = self._segments[self._seg]
        if self._cursor is not None and self.position + n < start + length:
            self.position += n  # the usual case: inside one item
            return self._cursor.read(n)
        out = np.zeros(n, dtype=np.float32)
        done = 0
        while done < n and not self.finished:
            start, src, length = self._segments[self._seg]
            take = min(n - done, start + length - self.position)
            if src is not None and self._cursor is not None:
                out[done:done + take] = self._cursor.read(take)
            done += take
            self.position += take
            if self.position >= start + length and self._seg < len(self._segments) - 1:
                self._seg += 1
                nxt = self._segments[self._seg][1]
                self._cursor = nxt.at(0) if nxt is not None else None
        return out

    def read_stored(self, n: int = FRAME) -> tuple[np.ndarray, float] | None:
        start, _, length = self._segments[self._seg]
        if self._cursor is None or self.position + n >= start + length:
            return None  # a gap or an item boundary: `read` assembles it
        got = self._cursor.read_stored(n)
        if got is not None:
            self.position += n
        return got

    def skip(self, n: int = FRAME) -> None:
        self._seek(min(self.position + n, self.length or 0))

    def at(self, position: int) -> Playlist:
        p = Playlist.__new__(Playlist)
        p.__dict__.update(self.__dict__)
        p._seek(position)
        return p


class LivePush(Source):
    """A jitter buffer that live inputs (WHIP, RTP, a microphone) write into.

    Reading on the media clock: an underrun plays silence and refills to the target delay before
    playing again; an overrun drops the oldest audio; a sender whose clock runs slightly fast or
    slow is followed by resampling by at most +-0.5 %, steering the fill towards the target.
    """

    seekable = False

    def __init__(self, target_ms: float = 60.0, max_ms: float = 500.0, name: str = "live",
                 catch_up_ms: float | None = None) -> None:
        self.name = name
        self.target = int(target_ms * SAMPLE_RATE / 1000)
        self.max = int(max_ms * SAMPLE_RATE / 1000)
        # When the average fill stays this far above the target (a burst after the sender or
        # the media clock stalled), cut back to the target at once instead of draining at 0.5 %.
        self.catch_up = None if catch_up_ms is None else int(catch_up_ms * SAMPLE_RATE / 1000)
        self.catch_ups = 0
        self.length = None
        self.position = 0
        self._chunks: deque[np.ndarray] = deque()
        self._fill = 0
        self._lock = threading.Lock()
        self._buffering = True
        self._frac = 0.0  # fractional read position into the buffer head
        self._avg_fill = float(self.target)
        self.underruns = 0
        self.overruns = 0
        self.closed = False
        # Levels watched (dBFS) -> the read position after the last 20 ms at or above it: how
        # long the source has been quieter than that (dead air), measured on the media clock.
        self._loud: dict[float, int] = {}

    @property
    def finished(self) -> bool:
        return self.closed and self._fill == 0

    @property
    def fill_ms(self) -> float:
        return self._fill * 1000 / SAMPLE_RATE

    def write(self, pcm: np.ndarray) -> None:
        """Append 48 kHz mono float32 audio (any chunk size; thread-safe)."""
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.size == 0:
            return
        with self._lock:
            self._chunks.append(pcm)
            self._fill += pcm.shape[0]
            if self._fill > self.max:
                self.overruns += 1
                self._drop(self._fill - self.target)

    def close(self) -> None:
        self.closed = True

    def _drop(self, n: int) -> None:
        while n > 0 and self._chunks:
            head = self._chunks[0]
            if head.shape[0] <= n:
                self._chunks.popleft()
                self._fill -= head.shape[0]
                n -= head.shape[0]
            else:
                self._chunks[0] = head[n:]
                self._fill -= n
                n = 0
        self._frac = 0.0

    def _take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0 and self._chunks:
            head = self._chunks[0]
            if head.shape[0] <= n:
                parts.append(self._chunks.popleft())
                n -= head.shape[0]
                self._fill -= head.shape[0]
            else:
                parts.append(head[:n])
                self._chunks[0] = head[n:]
                self._fill -= n
                n = 0
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def watch(self, level_db: float) -> None:
        """Track the last time the audio read reached `level_db` (RMS of a read, dBFS)."""
        self._loud.setdefault(level_db, self.position)

    def loud_at(self, level_db: float) -> int:
        """The read position after the last read at or above a watched level."""
        return self._loud.get(level_db, self.position)

    def read(self, n: int = FRAME) -> np.ndarray:
        out = self._read(n)
        if self._loud:
            power = float(np.dot(out, out)) / max(n, 1)
            level = 10 * math.log10(power) if power > 0 else -math.inf
            for watched in tuple(self._loud):
                if level >= watched:
                    self._loud[watched] = self.position
        return out

    def _read(self, n: int) -> np.ndarray:
        self.position += n
        with self._lock:
            if self._buffering:
                if self._fill < self.target:
                    return np.zeros(n, dtype=np.float32)
                self._buffering = False
            # Drift correction: a slow average steers the consumption rate.
            self._avg_fill += 0.02 * (self._fill - self._avg_fill)
            if self.catch_up is not None and self._avg_fill > self.target + self.catch_up:
                self.catch_ups += 1
                self._drop(self._fill - self.target)
                self._avg_fill = float(self._fill)
            error = (self._avg_fill - self.target) / max(self.target, 1)
            ratio = 1.0 + max(-0.005, min(0.005, 0.05 * error))
            need_f = n * ratio + self._frac
            need = int(need_f)
            if self._fill < need + 1:
                self.underruns += 1
                self._buffering = True
                got = self._take(self._fill)
                out = np.zeros(n, dtype=np.float32)
                out[: min(n, got.shape[0])] = got[:n]
                return out
            src = self._take(need + 1)
            # Put back the sample we only peeked at for interpolation.
            self._chunks.appendleft(src[-1:])
            self._fill += 1
            self._frac = need_f - need
            if need == n:
                return src[:n].copy()
            x = np.linspace(0.0, need, n, endpoint=False)
            return np.interp(x, np.arange(need + 1), src).astype(np.float32)

    def at(self, position: int) -> LivePush:
        return self
