"""MP3 through the system's libmp3lame (Debian `libmp3lame0`), called directly with ctypes.

Why: the LAME inside PyAV's wheel is built without its optimised routines and costs ~4x more CPU
than Debian's library for the same frames (600 s of 24 kHz mono at 32 kbit/s, q7: 2.63 CPU-s
through PyAV, 0.67 CPU-s with Debian's ffmpeg). Loa encodes MP3 once per composition, so this is
most of the per-station MP3 cost. When the library is missing, encoders.py falls back to PyAV.
"""

from __future__ import annotations

import ctypes

import numpy as np

from loa.codecs.native import load_library

_MONO = 3


def _load() -> ctypes.CDLL | None:
    lib = load_library("mp3lame", "libmp3lame.so.0")
    if lib is None:
        return None
    lib.lame_init.restype = ctypes.c_void_p
    lib.lame_close.argtypes = [ctypes.c_void_p]
    lib.lame_init_params.argtypes = [ctypes.c_void_p]
    for fn in ("lame_set_in_samplerate", "lame_set_out_samplerate", "lame_set_num_channels",
               "lame_set_mode", "lame_set_brate", "lame_set_quality",
               "lame_set_disable_reservoir", "lame_set_bWriteVbrTag"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.lame_encode_buffer_ieee_float.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_int]
    return lib


LIB = _load()

_BITRATES_MPEG2 = [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 0]
_BITRATES_MPEG1 = [0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 0]
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def frame_length(header: bytes) -> int:
    """Length in bytes of the layer III frame starting with this 4-byte header (0 if invalid)."""
    if len(header) < 4 or header[0] != 0xFF or (header[1] & 0xE0) != 0xE0:
        return 0
    version = (header[1] >> 3) & 3  # 3 MPEG-1, 2 MPEG-2, 0 MPEG-2.5
    if version == 1 or ((header[1] >> 1) & 3) != 1:  # reserved version, or not layer III
        return 0
    br_index, sr_index = header[2] >> 4, (header[2] >> 2) & 3
    if sr_index == 3:
        return 0
    rate = _RATES[version][sr_index]
    pad = (header[2] >> 1) & 1
    if version == 3:
        bitrate = _BITRATES_MPEG1[br_index] * 1000
        return 144 * bitrate // rate + pad if bitrate else 0
    bitrate = _BITRATES_MPEG2[br_index] * 1000
    return 72 * bitrate // rate + pad if bitrate else 0


class Lame:
    """One LAME encoder: mono float32 in, whole MP3 frames out."""

    def __init__(self, rate: int, bitrate: int, quality: int) -> None:
        if LIB is None:
            raise RuntimeError("libmp3lame not found")
        g = ctypes.c_void_p(LIB.lame_init())
        self.gfp: ctypes.c_void_p | None = g
        LIB.lame_set_in_samplerate(g, rate)
        LIB.lame_set_out_samplerate(g, rate)
        LIB.lame_set_num_channels(g, 1)
        LIB.lame_set_mode(g, _MONO)
        LIB.lame_set_brate(g, bitrate // 1000)
        LIB.lame_set_quality(g, quality)
        # No bit reservoir: every frame stands alone (listeners move between encoders).
        LIB.lame_set_disable_reservoir(g, 1)
        LIB.lame_set_bWriteVbrTag(g, 0)
        if LIB.lame_init_params(g) < 0:
            raise RuntimeError("lame_init_params failed")
        self._out = ctypes.create_string_buffer(1 << 16)
        self._pending = b""

    def encode(self, pcm: np.ndarray) -> list[bytes]:
        x = np.ascontiguousarray(pcm, dtype=np.float32)
        ptr = x.ctypes.data  # mono: the right channel is ignored
        n = LIB.lame_encode_buffer_ieee_float(  # type: ignore[union-attr]
            self.gfp, ptr, ptr, x.shape[0], self._out, len(self._out))
        if n < 0:
            raise RuntimeError(f"lame_encode_buffer_ieee_float failed: {n}")
        data = self._pending + ctypes.string_at(self._out, n)  # not .raw: that copies 64 KiB
        frames = []
        pos = 0
        while pos + 4 <= len(data):
            size = frame_length(data[pos:pos + 4])
            if size == 0:
                raise RuntimeError("libmp3lame produced an invalid frame header")
            if pos + size > len(data):
                break
            frames.append(data[pos:pos + size])
            pos += size
        self._pending = data[pos:]
        return frames

    def __del__(self) -> None:
        gfp = getattr(self, "gfp", None)
        if LIB is not None and gfp is not None:
            LIB.lame_close(gfp)
            self.gfp = None
