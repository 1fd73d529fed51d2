"""Integrated loudness (loa.codecs.loudness) against ffmpeg's ebur128 filter and BS.1770 itself."""

from __future__ import annotations

import math
import re
import subprocess
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from loa.codecs.loudness import integrated_lufs, normalise_gain

RATE = 48_000
FFMPEG_TOLERANCE_LU = 0.3

Signal = npt.NDArray[np.float32]


def _seconds(s: float) -> npt.NDArray[np.float64]:
    return np.arange(round(s * RATE)) / RATE


def _sine(freq: float, amplitude: float, seconds: float) -> Signal:
    return (amplitude * np.sin(2 * np.pi * freq * _seconds(seconds))).astype(np.float32)


def _pink_noise(seconds: float, rms_dbfs: float = -20.0, seed: int = 7) -> Signal:
    """White Gaussian noise shaped to 1/f power in the frequency domain, 20 Hz .. Nyquist."""
    n = round(seconds * RATE)
    spectrum = np.fft.rfft(np.random.default_rng(seed).standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / RATE)
    spectrum[f < 20] = 0
    spectrum[f >= 20] /= np.sqrt(f[f >= 20])
    x = np.fft.irfft(spectrum, n)
    x *= 10 ** (rms_dbfs / 20) / np.sqrt(np.mean(x**2))
    return x.astype(np.float32)


def _bursts(seconds: float = 20.0, floor_dbfs: float | None = None) -> Signal:
    """Speech-like: 0.5 s tone bursts cycling 300 / 800 / 2000 Hz, each followed by 0.5 s of
    silence (or of a noise floor at `floor_dbfs`, which the relative gate has to remove)."""
    x = np.zeros(round(seconds * RATE), dtype=np.float64)
    burst = round(0.5 * RATE)
    for i, start in enumerate(range(0, x.size - burst + 1, 2 * burst)):
        freq = (300.0, 800.0, 2000.0)[i % 3]
        x[start : start + burst] = 0.3 * np.sin(2 * np.pi * freq * np.arange(burst) / RATE)
    if floor_dbfs is not None:
        noise = np.random.default_rng(3).standard_normal(x.size) * 10 ** (floor_dbfs / 20)
        x[x == 0] = noise[x == 0]
    return x.astype(np.float32)


def _as_16_bit(x: Signal) -> npt.NDArray[np.int16]:
    return np.clip(np.round(x.astype(np.float64) * 32767), -32768, 32767).astype(np.int16)


def _write_wav(path: Path, x: Signal) -> Signal:
    """Write `x` as 16-bit mono PCM; return exactly what the file holds, as float32."""
    samples = _as_16_bit(x)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(samples.astype("<i2").tobytes())
    return (samples.astype(np.float32) / 32767).astype(np.float32)


def _ffmpeg_integrated(path: Path) -> float:
    """ffmpeg's ebur128 integrated loudness: the "I:" line of the Summary it prints last."""
    proc = subprocess.run(
        [
            "ffmpeg",
            "-hide_banner",
            "-nostats",
            "-i",
            str(path),
            "-af",
            "ebur128",
            "-f",
            "null",
            "-",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    summary = proc.stderr.rsplit("Summary:", 1)
    assert len(summary) == 2, proc.stderr[-2000:]
    match = re.search(r"^\s*I:\s*(-?inf|-?[\d.]+)\s+LUFS", summary[1], re.MULTILINE)
    assert match is not None, summary[1]
    return float(match.group(1))


SIGNALS: dict[str, Callable[[], Signal]] = {
    # -20 dBFS RMS, i.e. amplitude 0.1 * sqrt(2): reads about -20 LUFS.
    "sine_1k_-20dBFS_rms": lambda: _sine(1000.0, 0.1 * math.sqrt(2), 10.0),
    # -20 dBFS peak (AES17), amplitude 0.1: reads about -23 LUFS.
    "sine_1k_-20dBFS_peak": lambda: _sine(1000.0, 0.1, 10.0),
    "pink_noise": lambda: _pink_noise(10.0),
    "speech_like_bursts": lambda: _bursts(20.0),
    "bursts_over_noise_floor": lambda: _bursts(20.0, floor_dbfs=-45.0),
    "sine_60hz": lambda: _sine(60.0, 0.5, 10.0),
    "quiet_sine_near_abs_gate": lambda: _sine(1000.0, 10 ** (-62 / 20), 10.0),
}


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_agrees_with_ffmpeg_ebur128(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.wav"
    pcm = _write_wav(path, SIGNALS[name]())
    ours = integrated_lufs(pcm, RATE)
    theirs = _ffmpeg_integrated(path)
    assert math.isfinite(theirs), f"ffmpeg measured {theirs} for {name}"
    assert ours == pytest.approx(theirs, abs=FFMPEG_TOLERANCE_LU), (name, ours, theirs)


def test_k_weighting_changes_the_reading() -> None:
    """Equal-RMS sines read differently: the RLB high-pass cuts 60 Hz, the shelf lifts 4 kHz."""
    at_1k = integrated_lufs(_sine(1000.0, 0.5, 5.0))
    at_60 = integrated_lufs(_sine(60.0, 0.5, 5.0))
    at_4k = integrated_lufs(_sine(4000.0, 0.5, 5.0))
    assert at_1k - at_60 > 0.5
    assert 2.5 < at_4k - at_1k < 4.5


def test_full_scale_997hz_sine_reads_minus_3_01_lufs() -> None:
    """BS.1770-4: a 0 dBFS 997 Hz sine reads -3.01 LKFS (in any one channel, weight 1)."""
    assert integrated_lufs(_sine(997.0, 1.0, 10.0)) == pytest.approx(-3.01, abs=0.1)
    # and loudness scales with level: -20 dB of amplitude is -20 LU.
    assert integrated_lufs(_sine(997.0, 0.1, 10.0)) == pytest.approx(-23.01, abs=0.1)
    assert integrated_lufs(_sine(997.0, math.sqrt(2) / 10, 10.0)) == pytest.approx(-20.0, abs=0.1)


def test_other_sample_rates_redesign_the_filters() -> None:
    """At 44.1 kHz the K-weighting is redesigned, so the same tones read the same loudness."""
    for freq, amplitude in ((1000.0, 0.5), (60.0, 0.5), (8000.0, 0.1)):
        t = np.arange(5 * 44_100) / 44_100
        at_44k1 = integrated_lufs(
            (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32), 44_100
        )
        at_48k = integrated_lufs(_sine(freq, amplitude, 5.0))
        assert at_44k1 == pytest.approx(at_48k, abs=0.05), freq


def test_relative_gate_ignores_quiet_passages() -> None:
    """Loud bursts separated by a -45 dBFS floor read about what the bursts alone read."""
    alone = integrated_lufs(_bursts(20.0))
    with_floor = integrated_lufs(_bursts(20.0, floor_dbfs=-45.0))
    # Two blocks per gap lie wholly in the floor: counted, they would pull the reading ~1 LU down.
    assert with_floor == pytest.approx(alone, abs=0.1)


def test_silence_and_too_short_input_read_minus_inf() -> None:
    assert integrated_lufs(np.zeros(10 * RATE, dtype=np.float32)) == float("-inf")
    assert integrated_lufs(np.zeros(0, dtype=np.float32)) == float("-inf")
    # 399 ms of a loud tone: no complete 400 ms block.
    assert integrated_lufs(_sine(1000.0, 0.5, 0.399)) == float("-inf")
    assert math.isfinite(integrated_lufs(_sine(1000.0, 0.5, 0.4)))
    # Below the -70 LUFS absolute gate everything is gated out.
    assert integrated_lufs(_sine(1000.0, 10 ** (-75 / 20), 5.0)) == float("-inf")


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        integrated_lufs(np.zeros((RATE, 2), dtype=np.float32))
    with pytest.raises(ValueError):
        integrated_lufs(_as_16_bit(_sine(1000.0, 0.5, 2.0)))  # integers: scale unknown
    bad = _sine(1000.0, 0.5, 2.0)
    bad[RATE] = np.nan
    with pytest.raises(ValueError):
        integrated_lufs(bad)


def test_ten_minutes_read_the_same_as_ten_seconds_of_the_same_noise() -> None:
    ten_s = _pink_noise(10.0, rms_dbfs=-23.0)
    ten_min = np.tile(ten_s, 60)  # processed in several FFT chunks: chunk edges must not show
    assert integrated_lufs(ten_min) == pytest.approx(integrated_lufs(ten_s), abs=0.05)


def test_normalise_gain() -> None:
    assert normalise_gain(-16.0) == pytest.approx(1.0)
    assert normalise_gain(-26.0) == pytest.approx(10 ** (10 / 20))  # +10 dB
    assert normalise_gain(-10.0) == pytest.approx(10 ** (-6 / 20))  # -6 dB, cuts are not capped
    assert normalise_gain(0.0, target=-23.0) == pytest.approx(10 ** (-23 / 20))
    assert normalise_gain(-40.0) == pytest.approx(10 ** (12 / 20))  # +24 dB wanted, capped at 12
    assert normalise_gain(-40.0, max_gain_db=6.0) == pytest.approx(10 ** (6 / 20))
    assert normalise_gain(float("-inf")) == 1.0
    # Applying the gain lands the programme on the target.
    x = _pink_noise(10.0, rms_dbfs=-26.0)
    gain = normalise_gain(integrated_lufs(x), target=-16.0)
    assert integrated_lufs(x * np.float32(gain)) == pytest.approx(-16.0, abs=0.01)
