"""Encoders: 48 kHz mono float32 in, codec packets with media timestamps out.

Every encoder of a codec works on one global sample grid (`grid`, in 48 kHz samples, counted from
media time 0), and a packet's `pts` is the position of the input audio it carries, in the codec's
own clock. So packets of two encoders of the same codec line up exactly, and an area whose
listeners move from one composition to another (a split or a merge upstream) continues without a
gap or an overlap: its channel just skips packets it has already sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import cast

import av
import numpy as np

from loa.codecs.lame import LIB as LAME_LIB
from loa.codecs.lame import Lame

SAMPLE_RATE = 48_000


@dataclass(slots=True)
class Packet:
    codec: str
    pts: int  # in `rate` units, position of the input audio the packet starts with
    duration: int  # in `rate` units
    data: bytes
    rate: int

    @property
    def end(self) -> int:
        return self.pts + self.duration

    @property
    def seconds(self) -> float:
        return self.pts / self.rate


@dataclass
class EncoderSettings:
    opus_bitrate: int = 32_000
    opus_complexity: int = 5  # 0-10; 5 costs ~30 % less than 10 with little audible loss on speech
    mp3_bitrate: int = 32_000
    mp3_rate: int = 24_000  # MPEG-2 layer III: about 5x cheaper than 48 kHz at 32 kbit/s
    mp3_quality: int = 7  # LAME -q: 0 best/slowest .. 9 worst/fastest


def _lowpass(factor: int, taps: int) -> np.ndarray:
    """Windowed-sinc anti-alias filter for decimating 48 kHz by `factor`."""
    cutoff = 0.45 / factor  # of the 48 kHz sample rate: 90 % of the new Nyquist frequency
    n = np.arange(taps) - (taps - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.blackman(taps)
    return (h / h.sum()).astype(np.float32)


class Decimator:
    """48 kHz -> 48/factor kHz, a linear-phase FIR with state carried across chunks."""

    def __init__(self, factor: int, taps: int = 48) -> None:
        self.factor = factor
        self.h = _lowpass(factor, taps) if factor > 1 else np.ones(1, dtype=np.float32)
        self.state = np.zeros(len(self.h) - 1, dtype=np.float32)
        self._h_rev = np.ascontiguousarray(self.h[::-1])  # convolution = correlation reversed

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.factor == 1:
            return x
        if x.shape[0] % self.factor:
            raise ValueError("chunk length must be a multiple of the decimation factor")
        taps = len(self.h)
        buf = np.concatenate([self.state, x])
        self.state = buf[-(taps - 1):]
        # Only the kept outputs are computed: a strided view of windows times the filter.
        n_out = x.shape[0] // self.factor
        windows = np.lib.stride_tricks.as_strided(
            buf, shape=(n_out, taps), strides=(buf.strides[0] * self.factor, buf.strides[0]),
            writeable=False)
        return windows @ self._h_rev


class Encoder:
    codec = ""
    rate = SAMPLE_RATE
    grid = 960  # alignment of the encoder's first input sample, in 48 kHz samples
    frame = 960  # packet duration in `rate` units
    mime = ""

    def __init__(self, start: int, settings: EncoderSettings | None = None) -> None:
        if start % self.grid:
            raise ValueError(f"{self.codec} encoder must start on its {self.grid}-sample grid")
        self.settings = settings or EncoderSettings()
        self.start = start
        self.packets_out = 0
        self.samples_in = 0  # 48 kHz samples fed

    def encode(self, pcm: np.ndarray) -> list[Packet]:
        raise NotImplementedError

    def _stamp(self, data: bytes) -> Packet:
        pts = self.start * self.rate // SAMPLE_RATE + self.packets_out * self.frame
        self.packets_out += 1
        return Packet(self.codec, pts, self.frame, data, self.rate)


class _PyAVEncoder(Encoder):
    av_codec = ""
    av_format = "flt"
    factor = 1

    def __init__(self, start: int, settings: EncoderSettings | None = None) -> None:
        super().__init__(start, settings)
        self.decimate = Decimator(self.factor)
        cc = cast(av.AudioCodecContext, av.CodecContext.create(self.av_codec, "w"))
        cc.sample_rate = self.rate
        cc.layout = "mono"
        cc.format = self.av_format
        self._time_base = Fraction(1, self.rate)
        cc.time_base = self._time_base
        self._configure(cc)
        cc.open()
        self.cc = cc
        self._pts = 0

    def _configure(self, cc: av.AudioCodecContext) -> None:
        raise NotImplementedError

    def encode(self, pcm: np.ndarray) -> list[Packet]:
        self.samples_in += pcm.shape[0]
        x = self.decimate(np.asarray(pcm, dtype=np.float32))
        frame = av.AudioFrame.from_ndarray(x.reshape(1, -1), format=self.av_format, layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._pts
        frame.time_base = self._time_base
        self._pts += x.shape[0]
        return [self._stamp(bytes(p)) for p in self.cc.encode(frame)]


class OpusEncoder(_PyAVEncoder):
    codec = "opus"
    mime = "audio/ogg"
    av_codec = "libopus"
    rate = 48_000
    frame = 960
    grid = 960

    def _configure(self, cc: av.AudioCodecContext) -> None:
        cc.bit_rate = self.settings.opus_bitrate
        cc.options = {
            "application": "audio",
            "frame_duration": "20",
            "compression_level": str(self.settings.opus_complexity),
        }


class Mp3Encoder(_PyAVEncoder):
    codec = "mp3"
    mime = "audio/mpeg"
    av_codec = "libmp3lame"
    av_format = "fltp"

    def __init__(self, start: int, settings: EncoderSettings | None = None) -> None:
        s = settings or EncoderSettings()
        self.rate = s.mp3_rate
        self.factor = SAMPLE_RATE // s.mp3_rate
        # MPEG-1 (32-48 kHz) frames hold 1152 samples, MPEG-2 (16-24 kHz) 576.
        self.frame = 1152 if s.mp3_rate >= 32_000 else 576
        self.grid = self.frame * self.factor
        self.lame: Lame | None = None
        if LAME_LIB is not None:  # the system's optimised LAME: ~4x cheaper than PyAV's
            Encoder.__init__(self, start, s)
            self.decimate = Decimator(self.factor)
            self.lame = Lame(self.rate, s.mp3_bitrate, s.mp3_quality)
        else:
            super().__init__(start, s)

    def encode(self, pcm: np.ndarray) -> list[Packet]:
        if self.lame is None:
            return super().encode(pcm)
        self.samples_in += pcm.shape[0]
        frames = self.lame.encode(self.decimate(np.asarray(pcm, dtype=np.float32)))
        return [self._stamp(f) for f in frames]

    def _configure(self, cc: av.AudioCodecContext) -> None:
        cc.bit_rate = self.settings.mp3_bitrate
        # No bit reservoir: every frame stands alone, so a listener can move between two
        # encoders' frames without the decoder reaching back into bits it never got.
        cc.options = {"reservoir": "0", "compression_level": str(self.settings.mp3_quality)}


def _linear_to_ulaw_table() -> np.ndarray:
    """G.711 mu-law of every 16-bit value (the reference 14-bit algorithm)."""
    x = np.arange(-32768, 32768, dtype=np.int32) >> 2
    mask = np.where(x < 0, 0x7F, 0xFF)
    mag = np.minimum(np.where(x < 0, -x, x), 8159) + 33
    seg = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), mag)
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (seg + 1)) & 0x0F))
    return ((code ^ mask) & 0xFF).astype(np.uint8)


def _linear_to_alaw_table() -> np.ndarray:
    x = np.arange(-32768, 32768, dtype=np.int32) >> 3  # 13-bit
    sign = np.where(x >= 0, 0x80, 0x00)
    mag = np.where(x >= 0, x, -x - 1)
    mag = np.minimum(mag, 0xFFF)
    exp = np.where(mag < 32, 0, np.floor(np.log2(np.maximum(mag, 1))).astype(np.int32) - 4)
    mant = np.where(exp == 0, mag >> 1, mag >> np.maximum(exp, 0)) & 0x0F
    return ((sign | (exp << 4) | mant) ^ 0x55).astype(np.uint8)


class _G711Encoder(Encoder):
    rate = 8000
    frame = 160
    grid = 960
    _table: np.ndarray

    def __init__(self, start: int, settings: EncoderSettings | None = None) -> None:
        super().__init__(start, settings)
        self.decimate = Decimator(6, taps=96)
        self._buf = np.zeros(0, dtype=np.float32)

    def encode(self, pcm: np.ndarray) -> list[Packet]:
        self.samples_in += pcm.shape[0]
        x = np.concatenate([self._buf, self.decimate(np.asarray(pcm, dtype=np.float32))])
        whole = x.shape[0] // self.frame * self.frame
        self._buf = x[whole:]
        s16 = (np.clip(x[:whole], -1.0, 1.0) * 32767).astype(np.int32) + 32768
        codes = self._table[s16]
        return [self._stamp(codes[i:i + self.frame].tobytes())
                for i in range(0, whole, self.frame)]


class PcmuEncoder(_G711Encoder):
    codec = "pcmu"
    mime = "audio/PCMU"
    _table = _linear_to_ulaw_table()


class PcmaEncoder(_G711Encoder):
    codec = "pcma"
    mime = "audio/PCMA"
    _table = _linear_to_alaw_table()


ENCODERS: dict[str, type[Encoder]] = {
    "opus": OpusEncoder,
    "mp3": Mp3Encoder,
    "pcmu": PcmuEncoder,
    "pcma": PcmaEncoder,
}


def encoder_grid(codec: str, settings: EncoderSettings | None = None) -> int:
    if codec == "mp3":
        s = settings or EncoderSettings()
        return (1152 if s.mp3_rate >= 32_000 else 576) * (SAMPLE_RATE // s.mp3_rate)
    return ENCODERS[codec].grid


def make_encoder(codec: str, start: int, settings: EncoderSettings | None = None) -> Encoder:
    try:
        cls = ENCODERS[codec]
    except KeyError:
        raise ValueError(f"unknown codec {codec!r}") from None
    return cls(start, settings)
