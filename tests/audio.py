"""Helpers for tests that listen: decode packets with a real decoder, find the tone in them."""

from __future__ import annotations

import av
import numpy as np

from loa.codecs.encoders import Packet

DECODERS = {"opus": "libopus", "mp3": "mp3", "pcmu": "pcm_mulaw", "pcma": "pcm_alaw"}


def decode_packets(codec: str, packets: list[Packet]) -> tuple[np.ndarray, int]:
    """Decode codec packets with FFmpeg's decoders (PyAV); returns mono float32 and its rate."""
    if codec == "pcm":
        return np.frombuffer(b"".join(p.data for p in packets), dtype=np.float32), 48_000
    rate = packets[0].rate
    cc = av.CodecContext.create(DECODERS[codec], "r")
    cc.sample_rate = rate
    cc.layout = "mono"
    out: list[np.ndarray] = []
    for p in packets:
        for f in cc.decode(av.Packet(p.data)):
            a = f.to_ndarray()
            if a.dtype == np.int16:
                a = a.astype(np.float32) / 32768
            out.append(a.reshape(-1).astype(np.float32))
    return np.concatenate(out), rate


def peak_hz(pcm: np.ndarray, rate: int) -> float:
    """The frequency of the strongest spectral peak."""
    win = pcm * np.hanning(pcm.shape[0])
    spec = np.abs(np.fft.rfft(win))
    spec[:3] = 0
    return float(np.argmax(spec) * rate / pcm.shape[0])


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def tone_pcm(seconds: float, hz: float = 1000.0, amplitude: float = 0.4) -> np.ndarray:
    """A 48 kHz float32 sine, what the encoders take in."""
    t = np.arange(int(seconds * 48_000)) / 48_000
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)
