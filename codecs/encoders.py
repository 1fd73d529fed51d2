"""Encoders: 48 kHz mono float32 in, codec packets with media timestamps out.

Every encoder of a codec works on one global sample grid (`grid`, in 48 kHz samples, counted from
media time 0), and a packet's `pts` is the position of the input audio it carries, in the codec's
own clock. So packets of two encoders of the same codec line up exactly, and an area whose
listeners move from one composition to another (a split or a merge upstream) continues without a
gap or an overlap: its channel just skips packets it has already sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import cast

import av
import numpy as np
from threadpoolctl import threadpool_limits

from loa.codecs.lame import LIB as LAME_LIB
from loa.codecs.lame import Lame
from loa.codecs.opus import LIB as OPUS_LIB
from loa.codecs.opus import Opus

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


# One BLAS thread for the process: a tick's filter product is small, and OpenBLAS's other threads
# spin at full CPU after every call (the mix bench's CPU per zone doubled with them).
threadpool_limits(limits=1, user_api="blas")


class Decimator:
    """48 kHz -> 48/factor kHz, a linear-phase FIR with state carried across chunks.

    Only the kept outputs are computed, `BLOCK` at a time as one matrix product: output
    `BLOCK*b + r` is window b of the input (stride factor*BLOCK) times column r of a banded
    Toeplitz matrix of the filter. That is one BLAS call instead of a strided gather per output,
    and it batches across encoders (`rows`).
    """

    BLOCK = 8  # divides the outputs of a 20 ms tick at 24 kHz (480) and 8 kHz (160)

    def __init__(self, factor: int, taps: int = 48) -> None:
        self.factor = factor
        self.h = _lowpass(factor, taps) if factor > 1 else np.ones(1, dtype=np.float32)
        self.state = np.zeros(len(self.h) - 1, dtype=np.float32)
        self._h_rev = np.ascontiguousarray(self.h[::-1])  # convolution = correlation reversed
        span = factor * (self.BLOCK - 1) + len(self.h)
        self._toeplitz = np.zeros((span, self.BLOCK), dtype=np.float32)
        for r in range(self.BLOCK):
            self._toeplitz[factor * r:factor * r + len(self.h), r] = self._h_rev

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.rows([self], x.reshape(1, -1))[0]

    @staticmethod
    def rows(decimators: Sequence[Decimator], x: np.ndarray) -> np.ndarray:
        """Decimate row i of `x` (K x n, float32) with decimators[i], all of one design."""
        d = decimators[0]
        f, keep = d.factor, len(d.state)
        if f == 1:
            return x
        k, n = x.shape
        if n % f:
            raise ValueError("chunk length must be a multiple of the decimation factor")
        buf = np.empty((k, keep + n), dtype=np.float32)
        buf[:, :keep] = np.concatenate([dec.state for dec in decimators]).reshape(k, keep)
        buf[:, keep:] = x
        tails = buf[:, n:].copy()  # the last `keep` input samples: the next call's state
        for dec, tail in zip(decimators, tails, strict=True):
            dec.state = tail
        n_out = n // f
        step = buf.strides[1]
        if n_out % d.BLOCK:  # an odd length (priming): one strided window per output
            win = np.ndarray((k, n_out, keep + 1), np.float32, buf, 0,
                             (buf.strides[0], step * f, step))
            return win @ d._h_rev
        blocks = n_out // d.BLOCK
        span = d._toeplitz.shape[0]
        win = np.ndarray((k, blocks, span), np.float32, buf, 0,
                         (buf.strides[0], step * f * d.BLOCK, step))
        return (win.reshape(k * blocks, span) @ d._toeplitz).reshape(k, n_out)


class Encoder:
    codec = ""
    rate = SAMPLE_RATE
    factor = 1  # SAMPLE_RATE // rate: the encoder's input is decimated by this
    taps = 48  # anti-alias filter length when factor > 1
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
        self.decimate = Decimator(self.factor, self.taps)

    def encode(self, pcm: np.ndarray) -> list[Packet]:
        pcm = np.asarray(pcm, dtype=np.float32)
        return self.encode_rows([self], pcm.reshape(1, -1))[0]

    @staticmethod
    def encode_rows(encoders: Sequence[Encoder], pcm: np.ndarray) -> list[list[Packet]]:
        """Encode row i of `pcm` (K x n, 48 kHz float32) with encoders[i], all of one codec.

        The anti-alias filtering of all rows is one matrix product (a tick's MP3 encoders cost
        one BLAS call, not one strided gather each); only the codec itself runs per encoder.
        """
        resampled = Decimator.rows([e.decimate for e in encoders], pcm)
        out = []
        for enc, x in zip(encoders, resampled, strict=True):
            enc.samples_in += pcm.shape[1]
            out.append(enc._encode(x))
        return out

    def _encode(self, x: np.ndarray) -> list[Packet]:
        """Packets for `x`, audio already at the encoder's own rate."""
        raise NotImplementedError

    def _stamp(self, data: bytes) -> Packet:
        pts = self.start * self.rate // SAMPLE_RATE + self.packets_out * self.frame
        self.packets_out += 1
        return Packet(self.codec, pts, self.frame, data, self.rate)


class _PyAVEncoder(Encoder):
    av_codec = ""
    av_format = "flt"

    def __init__(self, start: int, settings: EncoderSettings | None = None) -> None:
        super().__init__(start, settings)
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

    def _encode(self, x: np.ndarray) -> list[Packet]:
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

    def __init__(self, start: int, settings: EncoderSettings | None = None) -> None:
        s = settings or EncoderSettings()
        self.opus: Opus | None = None
        if OPUS_LIB is not None:  # the system's libopus: ~2.5x cheaper than going through PyAV
            Encoder.__init__(self, start, s)
            self.opus = Opus(s.opus_bitrate, s.opus_complexity)
        else:
            super().__init__(start, s)

    def _encode(self, x: np.ndarray) -> list[Packet]:
        if self.opus is None:
            return super()._encode(x)
        if x.shape[0] % self.frame:
            raise ValueError(f"opus input must be whole {self.frame}-sample frames")
        return [self._stamp(self.opus.encode(x[i:i + self.frame]))
                for i in range(0, x.shape[0], self.frame)]

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
            self.lame = Lame(self.rate, s.mp3_bitrate, s.mp3_quality)
        else:
            super().__init__(start, s)

    def _encode(self, x: np.ndarray) -> list[Packet]:
        if self.lame is None:
            return super()._encode(x)
        return [self._stamp(f) for f in self.lame.encode(x)]

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

    factor = 6
    taps = 96

    def __init__(self, start: int, settings: EncoderSettings | None = None) -> None:
        super().__init__(start, settings)
        self._buf = np.zeros(0, dtype=np.float32)

    def _encode(self, x: np.ndarray) -> list[Packet]:
        x = np.concatenate([self._buf, x])
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
