"""Sources: files through PyAV, tones, playlists, the live jitter buffer."""

from __future__ import annotations

import struct
import subprocess

import numpy as np
import pytest

from loa.codecs.decode import MediaError, decode_file
from loa.streamer.clock import FRAME
from loa.streamer.sources import LivePush, PcmSource, Playlist, Silence, ToneSource, load_file
from tests.audio import peak_hz


def ffmpeg_tone(path, freq=440, seconds=3, rate=44100, extra=()):
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency={freq}:duration={seconds}:sample_rate={rate}",
                    "-ac", "2", *extra, str(path)], check=True)


@pytest.mark.parametrize("ext,extra", [("mp3", ()), ("ogg", ("-c:a", "libopus")),
                                       ("wav", ()), ("m4a", ("-c:a", "aac")), ("flac", ())])
async def test_files_decode_off_loop_to_48k_mono_with_the_right_tone(tmp_path, ext, extra):
    f = tmp_path / f"tone.{ext}"
    ffmpeg_tone(f, 523, 3, 44100, extra)
    src = await load_file(f)
    assert src.pcm.dtype == np.float32 and src.pcm.ndim == 1
    assert abs(src.seconds - 3.0) < 0.1
    assert abs(peak_hz(src.pcm[24_000:120_000], 48_000) - 523) < 1


@pytest.fixture
def good_mp3(tmp_path):
    f = tmp_path / "good.mp3"
    ffmpeg_tone(f, 440, 3)
    return f


def test_bad_files_give_a_typed_error(tmp_path, good_mp3):
    data = good_mp3.read_bytes()
    cases = {
        "truncated.mp3": data[: len(data) * 2 // 3],
        "random.mp3": np.random.default_rng(5).integers(0, 256, 40_000, dtype=np.uint8).tobytes(),
        "empty.mp3": b"",
        "garbage-inside.mp3": data[:8000] + bytes(range(256)) * 40 + data[8000:],
        # WAV header promising 10 MB of audio, holding 1,000 bytes.
        "lying.wav": b"RIFF" + struct.pack("<I", 36 + 10_000_000) + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, 48000, 96000, 2, 16) + b"data"
        + struct.pack("<I", 10_000_000) + b"\x01\x02" * 500,
        "text.mp3": "Xin chào, đây không phải âm thanh".encode() * 100,
    }
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(MediaError):
            decode_file(p)
    with pytest.raises(MediaError):
        decode_file(tmp_path / "missing.mp3")


async def test_a_bad_file_never_reaches_the_engine(tmp_path):
    from loa.streamer.areas import sample_tree
    from loa.streamer.engine import Engine

    p = tmp_path / "bad.mp3"
    p.write_bytes(b"\xff\xfb" + b"\x00" * 5000)
    e = Engine(sample_tree())
    with pytest.raises(MediaError):
        await load_file(p)
    e.tick(0)
    assert e.broadcasts == {}


def test_too_long_is_refused(good_mp3):
    with pytest.raises(MediaError, match="too long"):
        decode_file(good_mp3, max_seconds=1.0)


def test_pcm_cursors_are_independent_and_exact():
    pcm = np.arange(10_000, dtype=np.float32)
    a = PcmSource(pcm)
    a.read(1000)
    b = a.at(500)
    np.testing.assert_array_equal(b.read(10), pcm[500:510])
    np.testing.assert_array_equal(a.read(10), pcm[1000:1010])
    tail = PcmSource(pcm, position=9_990).read(20)
    assert tail.shape == (20,) and (tail[10:] == 0).all()


def test_tone_is_phase_exact_at_any_position():
    t = ToneSource(997, 0.5)
    whole = t.read(5000)
    np.testing.assert_allclose(ToneSource(997, 0.5).at(1234).read(100), whole[1234:1334],
                               atol=1e-6)


def test_playlist_repeats_with_gaps_and_seeks():
    a = PcmSource(np.full(1000, 0.1, dtype=np.float32))
    b = PcmSource(np.full(500, 0.2, dtype=np.float32))
    pl = Playlist([a, b], repeat=2, gap=0.01)  # 480-sample gaps
    assert pl.length == 2 * 1500 + 3 * 480
    out = pl.read(pl.length + 100)
    expect = np.concatenate([np.full(1000, 0.1), np.zeros(480), np.full(500, 0.2), np.zeros(480),
                             np.full(1000, 0.1), np.zeros(480), np.full(500, 0.2),
                             np.zeros(100)]).astype(np.float32)
    np.testing.assert_allclose(out, expect)
    assert pl.finished
    np.testing.assert_allclose(pl.at(1500).read(600), expect[1500:2100])
    with pytest.raises(ValueError):
        Playlist([], repeat=1)
    with pytest.raises(ValueError):
        Playlist([Silence()])  # endless items cannot be in a playlist


def test_live_push_underrun_gives_silence_overrun_drops_oldest():
    live = LivePush(target_ms=40, max_ms=200)
    assert (live.read(FRAME) == 0).all()  # nothing yet: silence, buffering
    live.write(np.full(3 * FRAME, 0.5, dtype=np.float32))
    assert (live.read(FRAME) == 0.5).all()
    live.read(FRAME)
    live.read(FRAME)
    out = live.read(FRAME)  # ran dry
    assert live.underruns == 1 and np.abs(out).max() <= 0.5
    live2 = LivePush(target_ms=40, max_ms=100)
    live2.write(np.arange(48_000, dtype=np.float32))  # 1 s into a 100 ms buffer
    assert live2.overruns == 1 and live2.fill_ms <= 100
    first = live2.read(FRAME)
    assert first[0] == 48_000 - 1_920  # oldest dropped, the newest 40 ms (target) kept


@pytest.mark.parametrize("sender_ppm", [-3000, 0, 3000])
def test_live_push_follows_a_drifting_sender_clock(sender_ppm):
    """A sender 0.3 % fast or slow: the buffer stays near its target instead of running away."""
    live = LivePush(target_ms=60, max_ms=1000)
    per_tick = FRAME * (1 + sender_ppm / 1e6)
    sent = 0.0
    written = 0
    fills = []
    for _ in range(3000):  # 60 s
        sent += per_tick
        n = int(sent) - written
        live.write(np.full(n, 0.1, dtype=np.float32))
        written += n
        fills.append(live.fill_ms)  # what the tick finds when it pulls
        live.read(FRAME)
    late = np.array(fills[-500:])
    assert live.underruns == 0 and live.overruns == 0
    assert 45 < late.mean() < 80, late.mean()  # without correction 0.3 % drifts by 180 ms/min


async def test_files_are_normalised_to_the_target_loudness(tmp_path):
    from loa.codecs.loudness import integrated_lufs

    quiet, loud = tmp_path / "quiet.wav", tmp_path / "loud.wav"
    ffmpeg_tone(quiet, 700, 4, 48000, ("-af", "volume=-8dB"))  # about -29 LUFS
    ffmpeg_tone(loud, 700, 4, 48000, ("-af", "volume=15dB"))  # about -6 LUFS
    for f in (quiet, loud):
        src = await load_file(f, loudness_target=-20.0)
        aired = src.read(src.length)
        assert integrated_lufs(aired) == pytest.approx(-20.0, abs=0.3)
    whisper = tmp_path / "whisper.wav"
    ffmpeg_tone(whisper, 700, 4, 48000, ("-af", "volume=-40dB"))  # about -61 LUFS
    src = await load_file(whisper, loudness_target=-20.0)
    assert src.gain == pytest.approx(10 ** (12 / 20))  # boost capped at +12 dB: no noise pumping


def test_live_push_catch_up_cuts_a_lasting_excess_back_to_the_target_once():
    """After a stall (400 ms arrive at once on top of a steady stream) an ingest's buffer is cut
    back to its target within about a second of reads, instead of draining at 0.5 %; a buffer
    without catch_up keeps the excess (drift correction only)."""
    fills = {}
    for catch_up in (None, 100.0):
        push = LivePush(target_ms=150, max_ms=1000, catch_up_ms=catch_up)
        push.write(np.zeros(int(0.15 * 48_000), np.float32))
        push.write(np.ones(int(0.4 * 48_000), np.float32) * 0.1)  # the burst after a stall
        for _ in range(100):  # 2 s: one frame in, one frame out
            push.write(np.ones(FRAME, np.float32) * 0.1)
            push.read(FRAME)
        fills[catch_up] = (push.fill_ms, push.catch_ups)
    assert fills[None][0] > 500 and fills[None][1] == 0
    assert 100 <= fills[100.0][0] <= 260 and fills[100.0][1] == 1, fills
