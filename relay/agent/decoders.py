"""Payload decoders of the device agent: Opus and G.711 to 48 kHz mono float32 (PyAV)."""

from __future__ import annotations

import av
import numpy as np

from loa.relay.agent.errors import InputError
from loa.relay.agent.playout import Decoder
from loa.streamer.messages import say


def mono_float(frame: av.AudioFrame) -> np.ndarray:
    a = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if a.ndim == 2 and a.shape[0] == channels and channels > 1:  # planar
        a = a[0]
    else:
        a = a.reshape(-1, channels)[:, 0]
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768
    if a.dtype == np.int32:
        return a.astype(np.float32) / 2147483648
    return a.astype(np.float32)


def make_decoder(codec: str) -> Decoder:
    """A payload -> 48 kHz mono float32 decoder (PyAV's Opus/G.711 decoders); one per stream,
    used from the playout thread only."""
    if codec == "opus":
        cc = av.CodecContext.create("libopus", "r")
        cc.sample_rate = 48_000
        cc.layout = "mono"

        def opus(payload: bytes) -> np.ndarray:
            out = [mono_float(f) for f in cc.decode(av.Packet(payload))]
            return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

        return opus
    if codec in ("pcmu", "pcma"):
        g711 = av.CodecContext.create("pcm_mulaw" if codec == "pcmu" else "pcm_alaw", "r")
        g711.sample_rate = 8_000
        g711.layout = "mono"
        prev = np.zeros(1, dtype=np.float32)
        steps = (np.arange(1, 7, dtype=np.float32) / 6)[None, :]

        def pcm8k(payload: bytes) -> np.ndarray:
            nonlocal prev
            out = [mono_float(f) for f in g711.decode(av.Packet(payload))]
            if not out:
                return np.zeros(0, dtype=np.float32)
            x = np.concatenate(out)
            xs = np.concatenate([prev, x])
            prev = x[-1:]
            # 8 -> 48 kHz, linear interpolation carried across packets: 6 samples per input
            up = xs[:-1, None] + (xs[1:, None] - xs[:-1, None]) * steps
            return up.reshape(-1).astype(np.float32)

        return pcm8k
    raise InputError(say("agent.unsupported_codec", codec=codec))
