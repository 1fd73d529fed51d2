"""Mixing: gain envelopes, a soft limiter, and the Mix (one distinct composition).

A Mix is the audio a group of areas hears right now. Its `key` says exactly what is in it:
which playheads at which gains (with ramps), so two areas with the same key hear the same
samples and share one mix and one encoder per codec (encode once). Areas move between mixes
when what they hear diverges; a mix keeps its encoders as long as it keeps listeners.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loa.codecs.encoders import Encoder, EncoderSettings, Packet, encoder_grid, make_encoder
from loa.streamer.clock import FRAME


@dataclass(frozen=True, slots=True)
class Envelope:
    """Gain ramping linearly from g0 at sample `start` to g1 at `start + length`."""

    start: int
    g0: float
    g1: float
    length: int

    @staticmethod
    def const(g: float) -> Envelope:
        return Envelope(0, g, g, 0)

    @property
    def constant(self) -> bool:
        return self.length == 0 or self.g0 == self.g1

    def at(self, s: int) -> float:
        if self.length == 0 or s >= self.start + self.length:
            return self.g1
        if s <= self.start:
            return self.g0
        return self.g0 + (self.g1 - self.g0) * (s - self.start) / self.length

    def settled(self, s: int) -> Envelope:
        """The same envelope seen from sample s: constant once its ramp is over."""
        if not self.constant and s >= self.start + self.length:
            return Envelope.const(self.g1)
        if self.length and self.g0 == self.g1:
            return Envelope.const(self.g1)
        return self

    def gains(self, s: int, n: int = FRAME) -> float | np.ndarray:
        if self.constant or s >= self.start + self.length:
            return self.g1
        if s + n <= self.start:
            return self.g0
        idx = np.arange(s, s + n, dtype=np.float64)
        t = np.clip((idx - self.start) / self.length, 0.0, 1.0)
        return (self.g0 + (self.g1 - self.g0) * t).astype(np.float32)


def ramp(s: int, g0: float, g1: float, length: int) -> Envelope:
    return Envelope(s, g0, g1, length) if g0 != g1 and length > 0 else Envelope.const(g1)


def db(x: float) -> float:
    return 10 ** (x / 20)


class Limiter:
    """Keeps every sample inside full scale without audible distortion on normal levels.

    Peak gain reduction with instant attack (ramped over the first millisecond of the frame),
    slow release, then a soft knee that bends anything left over `knee` below the ceiling.
    """

    def __init__(self, ceiling: float = 0.98, release_s: float = 0.25, knee: float = 0.9) -> None:
        self.ceiling = ceiling
        self.knee = knee
        self.gain = 1.0
        self.release = math.exp(-FRAME / (release_s * 48_000))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._apply(x, float(np.abs(x).max()) if x.size else 0.0)

    @staticmethod
    def rows(limiters: Sequence[Limiter], x: np.ndarray) -> None:
        """Limit row i of `x` (M x n) in place with limiters[i], all of one design.

        One vectorised peak pass; only rows that are loud or still releasing get a gain curve.
        """
        peak = np.abs(x).max(axis=1)
        held = np.fromiter((lim.gain for lim in limiters), dtype=np.float64, count=len(limiters))
        for i in np.flatnonzero((peak > limiters[0].knee) | (held != 1.0)):
            x[i] = limiters[int(i)]._apply(x[i], float(peak[i]))

    def _apply(self, x: np.ndarray, peak: float) -> np.ndarray:
        target = min(1.0, self.knee / peak) if peak > self.knee else 1.0
        g_prev = self.gain
        if target < g_prev:
            g_new = target
        else:
            g_new = target - (target - g_prev) * self.release
        if g_prev != 1.0 or g_new != 1.0:
            if g_new < g_prev:
                env = np.full(x.shape[0], g_new, dtype=np.float32)
                k = min(48, x.shape[0])
                env[:k] = np.linspace(g_prev, g_new, k, dtype=np.float32)
            else:
                env = np.linspace(g_prev, g_new, x.shape[0], dtype=np.float32)
            x = x * env
        self.gain = g_new
        if peak * max(g_prev, g_new) <= self.knee:
            return x  # the usual case: nothing reaches the knee
        # Soft knee above `knee`: maps (knee, inf) smoothly into (knee, ceiling).
        over = np.abs(x) > self.knee
        if over.any():
            a = np.abs(x[over])
            room = self.ceiling - self.knee
            bent = self.knee + room * np.tanh((a - self.knee) / room)
            x = x.copy() if not x.flags.writeable else x
            x[over] = np.sign(x[over]) * bent
        return x


Layer = tuple[int, Envelope]  # (playhead id, gain envelope)
Key = tuple[Layer, ...]


class Mix:
    """One distinct composition: its layers, its areas, its encoders."""

    _ids = 0

    def __init__(self, key: Key, history_ticks: int = 8, parent: Mix | None = None) -> None:
        Mix._ids += 1
        self.id = Mix._ids
        self.key = key
        self.areas: set[str] = set()
        self.encoders: dict[str, Encoder] = {}
        self.history = np.zeros(history_ticks * FRAME, dtype=np.float32)
        self.history_end = 0  # media sample just after the newest history sample
        self.history_valid = 0  # how many of the newest history samples are real audio
        self.limiter = Limiter()
        self.codecs_version = -1
        self.codecs: set[str] = set()
        if parent is not None:
            # The areas leaving `parent` heard its audio until now: start from its state.
            self.history = parent.history.copy()
            self.history_end = parent.history_end
            self.history_valid = parent.history_valid
            self.limiter = copy.copy(parent.limiter)

    def remember(self, s: int, frame: np.ndarray) -> None:
        """Keep the frame aired at media sample s (for priming encoders opened later)."""
        # The history is a ring of whole frames; slot k holds the frame of tick k mod slots.
        slots = self.history.shape[0] // FRAME
        k = (s // FRAME) % slots
        self.history[k * FRAME:(k + 1) * FRAME] = frame
        self.history_end = s + FRAME
        self.history_valid = min(self.history.shape[0], self.history_valid + FRAME)

    def open_encoder(self, codec: str, s: int, settings: EncoderSettings) -> list[Packet]:
        """Open a codec's encoder, primed with this mix's recent audio.

        Priming starts on the codec's grid and covers the encoder's delay, so its packets continue
        exactly where another encoder of the same codec left off; the channels drop the primed
        packets they already sent. Returns those primed packets.
        """
        grid = encoder_grid(codec, settings)
        span = self.history.shape[0] - 2 * FRAME
        start = max(0, -(-(s - span) // grid) * grid)  # media time starts at 0
        enc = make_encoder(codec, start, settings)
        self.encoders[codec] = enc
        if start >= s:
            return []
        return enc.encode(self.recent(start, s))

    def recent(self, start: int, end: int) -> np.ndarray:
        """Mixed audio of media samples [start, end), zeros where the history does not reach."""
        out = np.zeros(end - start, dtype=np.float32)
        size = self.history.shape[0]
        lo = max(start, self.history_end - self.history_valid)
        hi = min(end, self.history_end)
        if hi > lo:
            idx = np.arange(lo, hi) % size
            out[lo - start:hi - start] = self.history[idx]
        return out

    def close(self) -> None:
        self.encoders.clear()


class _Plan:
    """How a tick's mixes are summed; it holds while the mixes and their keys stay the same.

    Constant-gain layers (nearly all of them) are grouped by their position in each mix's key:
    one gather, multiply and add per position across all mixes. Ramping layers (fades, ducking
    ramps) keep a per-mix path, their gains computed each tick.
    """

    def __init__(self, mixes: list[Mix]) -> None:
        self.mixes = mixes
        self.keys = [m.key for m in mixes]
        self.limiters = [m.limiter for m in mixes]
        positions: list[tuple[list[int], list[int], list[float]]] = []
        self.ramped: list[tuple[int, int, Envelope]] = []
        for row, key in enumerate(self.keys):
            j = 0
            for ph, env in key:
                if not env.constant:
                    self.ramped.append((row, ph, env))
                    continue
                if env.g1 == 0.0:
                    continue
                if j == len(positions):
                    positions.append(([], [], []))
                rows, phs, gains = positions[j]
                rows.append(row)
                phs.append(ph)
                gains.append(env.g1)
                j += 1
        # (rows, or None for every row in order; playheads; gains as a column)
        self.positions = [
            (None if rows == list(range(len(mixes))) else np.array(rows), phs,
             np.array(gains, dtype=np.float32)[:, None])
            for rows, phs, gains in positions]

    def holds(self, mixes: list[Mix]) -> bool:
        return self.mixes == mixes and self.keys == [m.key for m in mixes]


class Renderer:
    """Renders all the mixes of a tick at once, keeping its plan between ticks."""

    def __init__(self) -> None:
        self._plan: _Plan | None = None

    def render(self, mixes: list[Mix], s: int, frames: dict[int, np.ndarray]) -> np.ndarray:
        """What every mix airs in the tick starting at media sample s: row i for mixes[i].

        `frames` holds this tick's frame of every playhead the mixes use. Per-mix numpy calls
        would cost more than the arithmetic, and between two of them every encoder evicts the
        caches: so the sum and the limiter's peak pass are done for all mixes at once.
        """
        if not mixes:
            return np.zeros((0, FRAME), dtype=np.float32)
        plan = self._plan
        if plan is None or not plan.holds(mixes):
            plan = self._plan = _Plan(list(mixes))
        out: np.ndarray | None = None
        for rows, phs, gains in plan.positions:
            layer = np.concatenate([frames[ph] for ph in phs]).reshape(-1, FRAME)
            layer *= gains
            if rows is None and out is None:
                out = layer
            elif rows is None:
                out += layer
            else:
                if out is None:
                    out = np.zeros((len(mixes), FRAME), dtype=np.float32)
                out[rows] += layer  # rows are distinct within a position
        if out is None:
            out = np.zeros((len(mixes), FRAME), dtype=np.float32)
        for row, ph, env in plan.ramped:
            out[row] += frames[ph] * env.gains(s)
        Limiter.rows(plan.limiters, out)
        for mix, frame in zip(mixes, out, strict=True):
            mix.remember(s, frame)
        return out
