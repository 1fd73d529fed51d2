"""MP3 through the system's libmp3lame, and the PyAV fallback when it is missing."""

from __future__ import annotations

import pytest

from loa.codecs import encoders, lame
from loa.codecs.encoders import EncoderSettings, Mp3Encoder
from tests.audio import decode_packets, peak_hz, tone_pcm


@pytest.mark.parametrize("use_system_lame", [True, False])
def test_mp3_encoder_frames_are_whole_and_hold_the_tone(monkeypatch, use_system_lame):
    if use_system_lame:
        assert lame.LIB is not None, "Debian's libmp3lame0 comes with ffmpeg (make sysdeps)"
    else:
        monkeypatch.setattr(encoders, "LAME_LIB", None)
    enc = Mp3Encoder(0, EncoderSettings())
    assert (enc.lame is not None) is use_system_lame
    x = tone_pcm(3.0)
    packets = [p for i in range(0, x.shape[0], 960) for p in enc.encode(x[i:i + 960])]
    assert all(lame.frame_length(p.data[:4]) == len(p.data) for p in packets)
    assert [b.pts - a.pts for a, b in zip(packets, packets[1:], strict=False)] == \
        [576] * (len(packets) - 1)
    assert len(packets) >= 3 * 24_000 // 576 - 5  # one frame per 576 input samples, minus delay
    audio, rate = decode_packets("mp3", packets)
    assert rate == 24_000 and abs(peak_hz(audio[12_000:60_000], rate) - 1000) < 2


def test_frame_header_parser_rejects_garbage():
    assert lame.frame_length(b"\x00\x00\x00\x00") == 0
    assert lame.frame_length(b"\xff\xf3\x44") == 0  # too short
    assert lame.frame_length(bytes([0xFF, 0xF3, 0x44, 0xC4])) == 72 * 32_000 // 24_000
