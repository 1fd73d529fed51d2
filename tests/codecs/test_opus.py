"""Opus through the system's libopus, and the PyAV fallback when it is missing."""

from __future__ import annotations

import numpy as np
import pytest

from loa.codecs import encoders, opus
from loa.codecs.encoders import EncoderSettings, OpusEncoder
from tests.audio import decode_packets, peak_hz, tone_pcm


@pytest.mark.parametrize("use_system_opus", [True, False])
def test_opus_encoder_packet_per_frame_holds_the_tone(monkeypatch, use_system_opus):
    if use_system_opus:
        assert opus.LIB is not None, "Debian's libopus0 comes with ffmpeg (make sysdeps)"
    else:
        monkeypatch.setattr(encoders, "OPUS_LIB", None)
    enc = OpusEncoder(0, EncoderSettings())
    assert (enc.opus is not None) is use_system_opus
    x = tone_pcm(3.0, 1234.0)
    packets = [p for i in range(0, x.shape[0], 1920) for p in enc.encode(x[i:i + 1920])]
    assert len(packets) == 150  # one packet per 20 ms, from the first frame on
    assert [p.pts for p in packets] == [960 * i for i in range(150)]
    kbps = sum(len(p.data) for p in packets) * 8 / 3.0 / 1000
    assert 20 < kbps < 45  # 32 kbit/s VBR
    audio, rate = decode_packets("opus", packets)
    assert rate == 48_000 and abs(peak_hz(audio[24_000:120_000], rate) - 1234) < 2


def test_system_opus_matches_the_settings_and_refuses_partial_frames():
    o = opus.Opus(32_000, 5)
    assert o.lookahead == 312  # the pre-skip codecs/ogg.py writes into OpusHead
    with pytest.raises(ValueError):
        o.encode(np.zeros(480, dtype=np.float32))
    enc = OpusEncoder(0, EncoderSettings())
    with pytest.raises(ValueError):
        enc.encode(np.zeros(1000, dtype=np.float32))


def test_packet_samples_reads_the_toc_byte() -> None:
    """RFC 6716 3.1: config (5 bits) gives the frame size, code (2 bits) the frame count."""
    assert opus.packet_samples(b"") == 0
    assert opus.packet_samples(bytes([(1 << 3) | 0])) == 960  # SILK NB 20 ms, one frame
    assert opus.packet_samples(bytes([(3 << 3) | 1])) == 2 * 2880  # SILK 60 ms, two frames
    assert opus.packet_samples(bytes([(13 << 3) | 2])) == 2 * 960  # hybrid 20 ms, two frames
    assert opus.packet_samples(bytes([(16 << 3) | 0])) == 120  # CELT 2.5 ms
    assert opus.packet_samples(bytes([(31 << 3) | 3, 5])) == 5 * 960  # CELT 20 ms, code 3
    assert opus.packet_samples(bytes([(31 << 3) | 3])) == 0  # code 3 without its count byte
    enc = OpusEncoder(0, EncoderSettings())
    packets = enc.encode(tone_pcm(0.2, 440))
    assert packets and all(opus.packet_samples(p.data) == 960 for p in packets)
