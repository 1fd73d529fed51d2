"""EBU R128 / ITU-R BS.1770-4 integrated loudness of mono PCM, in numpy only (no scipy).

K-weighting is an exact linear convolution done with FFTs: the two biquads' impulse response is
sampled from H(z) on a dense FFT grid, cut at 1/3 s (the tail holds < 1e-25 of its energy), and
run over the signal by batched overlap-save FFTs; no per-sample loop, same result as the IIR.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["LoudnessMeter", "integrated_lufs", "normalise_gain"]

_OFFSET = -0.691  # BS.1770: loudness = -0.691 + 10 log10(weighted mean square)
_ABS_GATE_LUFS = -70.0
_REL_GATE_LU = -10.0
_BLOCK_SEGMENTS = 4  # a 400 ms gating block is 4 segments of 100 ms (75 % overlap)

# BS.1770-4 Tables 1 and 2: the K-weighting stages at 48 kHz, as (b, a) with a[0] == 1.
_SHELF_48K = (
    (1.53512485958697, -2.69169618940638, 1.19839281085285),
    (1.0, -1.69065929318241, 0.73248077421585),
)
_RLB_48K = (
    (1.0, -2.0, 1.0),
    (1.0, -1.99004745483398, 0.99007225036621),
)

_Biquad = tuple[tuple[float, float, float], tuple[float, float, float]]


def _k_weighting(rate: int) -> tuple[_Biquad, _Biquad]:
    """The two K-weighting biquads: the published constants at 48 kHz, else redesigned for
    `rate` from the analogue prototypes (the libebur128 / ffmpeg formulas)."""
    if rate == 48_000:
        return _SHELF_48K, _RLB_48K
    # Stage 1: high shelf, +4 dB above ~1.5 kHz.
    f0, gain_db, q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
    k = math.tan(math.pi * f0 / rate)
    vh = 10.0 ** (gain_db / 20.0)
    vb = vh**0.4996667741545416
    a0 = 1.0 + k / q + k * k
    shelf: _Biquad = (
        (
            (vh + vb * k / q + k * k) / a0,
            2.0 * (k * k - vh) / a0,
            (vh - vb * k / q + k * k) / a0,
        ),
        (1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0),
    )
    # Stage 2: RLB high-pass at ~38 Hz.
    f0, q = 38.13547087602444, 0.5003270373238773
    k = math.tan(math.pi * f0 / rate)
    a0 = 1.0 + k / q + k * k
    rlb: _Biquad = (
        (1.0, -2.0, 1.0),
        (1.0, 2.0 * (k * k - 1.0) / a0, (1.0 - k / q + k * k) / a0),
    )
    return shelf, rlb


def _impulse_response(rate: int, taps: int) -> npt.NDArray[np.float64]:
    """The first `taps` samples of the cascade's impulse response.

    H(z) is evaluated on a grid of `grid` >= 4 * taps points; its inverse FFT is the impulse
    response aliased modulo `grid`, and the poles (|p| < 0.9951 at 48 kHz) make that aliasing
    astronomically small, so this is the IIR's response to double precision.
    """
    grid = 1 << max(4 * taps - 1, 1).bit_length()
    response = np.ones(grid // 2 + 1, dtype=np.complex128)
    for b, a in _k_weighting(rate):
        response *= np.fft.rfft(np.asarray(b), grid) / np.fft.rfft(np.asarray(a), grid)
    return np.fft.irfft(response, grid)[:taps]


class LoudnessMeter:
    """Integrated loudness of mono float PCM fed in chunks of any size, in bounded memory: it
    keeps the filter's last 1/3 s of input and one float per 100 ms segment (a 4-hour file is
    1.2 MB of them). Feeding a signal in pieces gives what `integrated_lufs` gives for it whole."""

    def __init__(self, rate: int = 48_000) -> None:
        if rate <= 0:
            raise ValueError(f"sample rate must be positive, got {rate}")
        self.rate = rate
        self.segment = round(rate / 10)
        self.taps = max(rate // 3, 64)  # 1/3 s: the tail beyond holds < 1e-25 of the energy
        self.hop = 10 * self.segment  # each overlap-save frame yields 10 whole segments
        self.nfft = 1 << (self.hop + self.taps - 2).bit_length()  # >= hop + taps - 1
        self.h_f = np.fft.rfft(_impulse_response(rate, self.taps), self.nfft)
        self.batch = max(1, (1 << 21) // self.nfft)  # ~2 M samples a batch: small working set
        self.samples = 0
        # Input not yet filtered, after the taps - 1 samples before it (zeros at the start: the
        # filter starts from rest); filtered a batch of frames at a time.
        self._held: list[npt.NDArray[np.floating]] = [np.zeros(self.taps - 1, np.float32)]
        self._held_samples = self.taps - 1
        self._energies: list[npt.NDArray[np.float64]] = []

    def add(self, pcm: npt.NDArray[np.floating]) -> None:
        x = np.asarray(pcm)
        if x.ndim != 1:
            raise ValueError(f"mono PCM must be 1-D, got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"PCM must be floating point (full scale 1.0), got {x.dtype}")
        step = self.batch * self.hop
        for i in range(0, x.shape[0], step):  # a whole file in batches: no copy of all of it
            part = x[i : i + step]
            self.samples += part.shape[0]
            self._held.append(part)
            self._held_samples += part.shape[0]
            whole = (self._held_samples - self.nfft) // self.hop + 1  # frames with all input
            if whole >= self.batch:
                self._filter(whole)

    def _filter(self, frames: int) -> None:
        """K-weighted energies of the segments of the next `frames` frames of held input (zeros
        after it: the end of the signal); the input they no longer need is dropped."""
        buf = np.concatenate(self._held)
        need = (frames - 1) * self.hop + self.nfft
        if buf.shape[0] < need:
            buf = np.concatenate([buf, np.zeros(need - buf.shape[0], buf.dtype)])
        for f0 in range(0, frames, self.batch):
            f1 = min(f0 + self.batch, frames)
            part = buf[f0 * self.hop : (f1 - 1) * self.hop + self.nfft].astype(np.float64)
            windows = np.lib.stride_tricks.sliding_window_view(part, self.nfft)[:: self.hop]
            y = np.fft.irfft(np.fft.rfft(windows, axis=-1) * self.h_f, self.nfft, axis=-1)
            valid = y[:, self.taps - 1 : self.taps - 1 + self.hop]  # the non-wrapped part
            segs = valid.reshape(f1 - f0, 10, self.segment)
            self._energies.append(np.einsum("fsk,fsk->fs", segs, segs).ravel())
        rest = buf[frames * self.hop :]
        self._held = [rest]
        self._held_samples = rest.shape[0]

    def lufs(self) -> float:
        """K-weighted mean square over 400 ms blocks stepped by 100 ms, gated at -70 LUFS
        (absolute) and then at -10 LU below the absolute-gated loudness (relative); -inf for input
        shorter than one block or with no block above the absolute gate (e.g. silence)."""
        n_segments = self.samples // self.segment
        if n_segments < _BLOCK_SEGMENTS:
            return float("-inf")
        left = self._held_samples - (self.taps - 1)
        if left > 0:
            self._filter(-(-left // self.hop))
        energies = np.concatenate(self._energies)[:n_segments]
        self._energies = [energies]
        if not np.all(np.isfinite(energies)):
            raise ValueError("PCM contains non-finite samples")
        windows = np.lib.stride_tricks.sliding_window_view(energies, _BLOCK_SEGMENTS)
        power = windows.sum(axis=1) / (_BLOCK_SEGMENTS * self.segment)  # mean square per block
        abs_gate = 10.0 ** ((_ABS_GATE_LUFS - _OFFSET) / 10.0)
        gated = power[power > abs_gate]
        if gated.size == 0:
            return float("-inf")
        rel_gate = float(np.mean(gated)) * 10.0 ** (_REL_GATE_LU / 10.0)
        gated = gated[gated > rel_gate]
        return _OFFSET + 10.0 * math.log10(float(np.mean(gated)))


def integrated_lufs(pcm: npt.NDArray[np.floating], rate: int = 48_000) -> float:
    """Integrated loudness (LUFS) of mono float PCM (full scale 1.0) per BS.1770-4 / EBU R128;
    see LoudnessMeter.lufs."""
    meter = LoudnessMeter(rate)
    meter.add(pcm)
    return meter.lufs()


def normalise_gain(lufs: float, target: float = -16.0, max_gain_db: float = 12.0) -> float:
    """Linear gain that brings a programme measured at `lufs` to `target` LUFS.

    Boost is capped at `max_gain_db` (cutting is never capped); -inf or another non-finite
    measurement (silence, too short) gets unity gain.
    """
    if not math.isfinite(lufs):
        return 1.0
    gain_db = min(target - lufs, max_gain_db)
    return float(10.0 ** (gain_db / 20.0))
