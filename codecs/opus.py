"""Opus through the system's libopus (Debian `libopus0`), called directly with ctypes.

Why: PyAV wraps every 20 ms frame in an AudioFrame, runs it through FFmpeg's encoder API and
hands back Packet objects; for one small frame that costs more than the Opus encoding itself
(32 kbit/s mono at complexity 5: ~160 us per frame through PyAV, ~65 us calling libopus). Loa
encodes Opus once per composition and tick, so this is most of the per-composition Opus cost.
The settings are FFmpeg's libopus defaults that encoders.py used through PyAV (application
"audio", unconstrained VBR, 20 ms frames). When the library is missing, encoders.py falls back
to PyAV.

`packet_samples` reads a packet's duration from its TOC byte, for receivers that time packets.
"""

from __future__ import annotations

import ctypes

import numpy as np

from loa.codecs.native import load_library

APPLICATION_AUDIO = 2049
_SET_BITRATE = 4002
_SET_COMPLEXITY = 4010
_GET_LOOKAHEAD = 4027
MAX_PACKET = 4000  # bytes: libopus' recommended output buffer for one packet


def _load() -> ctypes.CDLL | None:
    lib = load_library("opus", "libopus.so.0")
    if lib is None:
        return None
    lib.opus_encoder_create.restype = ctypes.c_void_p
    lib.opus_encoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.c_int,
                                        ctypes.POINTER(ctypes.c_int)]
    lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_encode_float.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                      ctypes.c_void_p, ctypes.c_int32]
    lib.opus_packet_pad.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
    lib.opus_decoder_create.restype = ctypes.c_void_p
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_decode_float.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32,
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.opus_strerror.restype = ctypes.c_char_p
    lib.opus_strerror.argtypes = [ctypes.c_int]
    return lib


LIB = _load()


def _error(code: int) -> str:
    assert LIB is not None
    return (LIB.opus_strerror(code) or b"?").decode("ascii", "replace")


def pad(packet: bytes, size: int) -> bytes:
    """The same packet grown to `size` bytes with Opus padding (RFC 6716 3.2.5): a decoder
    hears exactly what it would have heard from `packet`."""
    if size <= len(packet):
        return packet
    if LIB is None:
        raise RuntimeError("libopus not found")
    buf = ctypes.create_string_buffer(packet, size)
    rc = LIB.opus_packet_pad(buf, len(packet), size)
    if rc != 0:
        raise ValueError(f"opus_packet_pad failed: {_error(rc)}")
    return buf.raw


class Opus:
    """One mono Opus encoder at 48 kHz: one 20 ms frame of float32 in, one packet out."""

    rate = 48_000
    frame = 960

    def __init__(self, bitrate: int, complexity: int) -> None:
        if LIB is None:
            raise RuntimeError("libopus not found")
        err = ctypes.c_int()
        self.enc: int | None = LIB.opus_encoder_create(self.rate, 1, APPLICATION_AUDIO,
                                                       ctypes.byref(err))
        if err.value != 0 or not self.enc:
            raise RuntimeError(f"opus_encoder_create failed: {_error(err.value)}")
        # opus_encoder_ctl is variadic: every request here takes one int.
        ctl = LIB.opus_encoder_ctl
        for request, value in ((_SET_BITRATE, bitrate), (_SET_COMPLEXITY, complexity)):
            rc = ctl(ctypes.c_void_p(self.enc), ctypes.c_int(request), ctypes.c_int(value))
            if rc != 0:
                raise RuntimeError(f"opus_encoder_ctl({request}, {value}) failed: {_error(rc)}")
        lookahead = ctypes.c_int()
        ctl(ctypes.c_void_p(self.enc), ctypes.c_int(_GET_LOOKAHEAD), ctypes.byref(lookahead))
        self.lookahead = lookahead.value  # the pre-skip a decoder drops (312 at 48 kHz)
        self._out = ctypes.create_string_buffer(MAX_PACKET)

    def encode(self, pcm: np.ndarray) -> bytes:
        x = np.ascontiguousarray(pcm, dtype=np.float32)
        if x.shape[0] != self.frame:
            raise ValueError(f"Opus frames are {self.frame} samples, got {x.shape[0]}")
        n = LIB.opus_encode_float(  # type: ignore[union-attr]
            self.enc, x.ctypes.data, self.frame, self._out, MAX_PACKET)
        if n < 0:
            raise RuntimeError(f"opus_encode_float failed: {_error(n)}")
        return ctypes.string_at(self._out, n)

    def __del__(self) -> None:
        enc = getattr(self, "enc", None)
        if LIB is not None and enc:
            LIB.opus_encoder_destroy(enc)
            self.enc = None


class OpusDecoder:
    """One mono Opus decoder at 48 kHz: a packet in, its float32 samples out (~20 us for 20 ms,
    cheap enough for the event loop). `None` conceals one lost frame (libopus' PLC)."""

    rate = 48_000
    max_samples = 5760  # 120 ms, the longest Opus packet

    def __init__(self) -> None:
        if LIB is None:
            raise RuntimeError("libopus not found")
        err = ctypes.c_int()
        self.dec: int | None = LIB.opus_decoder_create(self.rate, 1, ctypes.byref(err))
        if err.value != 0 or not self.dec:
            raise RuntimeError(f"opus_decoder_create failed: {_error(err.value)}")
        self._out = np.zeros(self.max_samples, dtype=np.float32)

    def decode(self, packet: bytes | None, lost_samples: int = 960) -> np.ndarray:
        """Raises ValueError for a packet libopus cannot decode (the decoder stays usable)."""
        size = lost_samples if packet is None else self.max_samples
        n = LIB.opus_decode_float(  # type: ignore[union-attr]
            self.dec, packet, 0 if packet is None else len(packet), self._out.ctypes.data,
            min(size, self.max_samples), 0)
        if n < 0:
            raise ValueError(f"opus_decode_float failed: {_error(n)}")
        return self._out[:n].copy()

    def __del__(self) -> None:
        dec = getattr(self, "dec", None)
        if LIB is not None and dec:
            LIB.opus_decoder_destroy(dec)
            self.dec = None


def packet_samples(packet: bytes) -> int:
    """Samples (48 kHz) in an Opus packet, from its TOC byte (RFC 6716 3.1); 0 if malformed."""
    if not packet:
        return 0
    toc = packet[0]
    config = toc >> 3
    if config < 12:
        size = (480, 960, 1920, 2880)[config & 3]
    elif config < 16:
        size = (480, 960)[config & 1]
    else:
        size = (120, 240, 480, 960)[config & 3]
    code = toc & 3
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        if len(packet) < 2:
            return 0
        frames = packet[1] & 0x3F
    return frames * size
