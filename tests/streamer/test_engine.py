"""The on-air engine on the virtual clock: exact samples, priorities, ducking, encode-once."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from loa.streamer.areas import sample_tree
from loa.streamer.broadcast import Broadcast
from loa.streamer.clock import FRAME, VirtualClock
from loa.streamer.engine import PCM, AuthorityError, Engine, EngineSettings
from loa.streamer.mixer import Limiter
from loa.streamer.sources import PcmSource, Source, ToneSource
from tests.audio import decode_packets, peak_hz, rms

COMMUNES = ["T01-H1-X1", "T01-H1-X2", "T01-H1-X3", "T01-H2-X1", "T01-H2-X2", "T01-H2-X3"]
FADE = 480  # 10 ms default crossfade


def make(settings: EngineSettings | None = None) -> tuple[Engine, VirtualClock]:
    e = Engine(sample_tree(), settings)
    return e, VirtualClock(e.tick)


def pcm(sub) -> np.ndarray:
    return np.frombuffer(b"".join(p.data for p in sub.drain()), dtype=np.float32)


def noise(seconds: float, seed: int = 1, level: float = 0.1) -> PcmSource:
    rng = np.random.default_rng(seed)
    return PcmSource((rng.standard_normal(int(seconds * 48000)) * level).astype(np.float32),
                     "music")


def changes_of(e: Engine, area: str) -> list:
    return [c for c in e.changes if c.area == area]


def test_district_bulletin_preempts_music_at_sample_480000_and_music_resumes_where_it_stopped():
    e, clock = make()
    sub = e.hub.subscribe("T01-H1-X1", PCM, maxlen=100_000)
    music = noise(60)
    m = e.start(Broadcast(music, ["T01-H1-X1"], issuer="T01-H1-X1", klass="background",
                          start=0.0))
    bulletin = ToneSource(1000, 0.3, seconds=5.0)
    b = e.start(Broadcast(bulletin, ["T01-H1"], issuer="T01-H1", klass="normal", start=10.0))
    clock.run(1000)  # 20 s
    out = pcm(sub)
    assert out.shape[0] == 1000 * FRAME
    ref = music.pcm
    # Music alone up to sample 480,000 (after its own 10 ms fade-in at t = 0).
    np.testing.assert_allclose(out[FADE:480_000], ref[FADE:480_000], atol=1e-6)
    # The switch starts exactly at 480,000: a 10 ms crossfade, then the bulletin alone.
    k = np.arange(FADE)
    expect = ref[480_000:480_000 + FADE] * (1 - k / FADE) + bulletin.at(0).read(FADE) * (k / FADE)
    np.testing.assert_allclose(out[480_000:480_000 + FADE], expect, atol=1e-5)
    tone = bulletin.at(FADE).read(240_000 - 2 * FADE)
    np.testing.assert_allclose(out[480_000 + FADE:720_000 - FADE], tone, atol=1e-6)
    # Its last 10 ms fade out (a source's end is a switch too), then the music fades back in.
    tail = bulletin.at(240_000 - FADE).read(FADE) * ((FADE - np.arange(FADE)) / FADE)
    np.testing.assert_allclose(out[720_000 - FADE:720_000], tail, atol=1e-6)
    # Bulletin over at 15 s (sample 720,000): music continues from sample 480,000 of its source.
    np.testing.assert_allclose(out[720_000 + FADE:960_000], ref[480_000 + FADE:720_000], atol=1e-6)
    ch = changes_of(e, "T01-H1-X1")
    assert [(c.sample, c.before, c.after, c.cause) for c in ch] == [
        (0, None, m, "start"),
        (480_000, m, b, "preempt"),
        (720_000, b, m, "finished"),
    ]
    assert ch[2].resumed_at == 480_000


def test_province_emergency_preempts_every_commune_in_the_same_tick():
    e, clock = make()
    subs = {c: e.hub.subscribe(c, PCM, maxlen=100_000) for c in COMMUNES}
    for i, c in enumerate(COMMUNES):
        e.start(Broadcast(ToneSource(300 + 50 * i, 0.3), [c], issuer=c, klass="background"))
    e.start(Broadcast(ToneSource(700, 0.3, seconds=20), ["T01-H2"], issuer="T01-H2",
                      klass="priority"))
    em = e.start(Broadcast(ToneSource(1500, 0.4, seconds=3), ["T01"], issuer="T01",
                           klass="emergency", start=2.0))
    clock.run(200)
    switched = {c.area: c.sample for c in e.changes if c.after == em}
    assert {a: switched.get(a) for a in COMMUNES} == {a: 96_000 for a in COMMUNES}
    for c in COMMUNES:
        out = pcm(subs[c])
        assert abs(peak_hz(out[96_000 + FADE:96_000 + FADE + 48_000], 48_000) - 1500) < 2
    assert len(e.consumed_mixes()) == 1  # everyone hears the same emergency: one mix


def test_commune_broadcast_cannot_preempt_a_district_one_and_waits():
    e, clock = make()
    sub = e.hub.subscribe("T01-H1-X1", PCM, maxlen=100_000)
    d = e.start(Broadcast(ToneSource(500, 0.3, seconds=3), ["T01-H1"], issuer="T01-H1"))
    c = e.start(Broadcast(ToneSource(900, 0.3, seconds=2), ["T01-H1-X1"], issuer="T01-H1-X1",
                          start=1.0))
    clock.run(100)
    assert e.on_air("T01-H1-X1")["broadcast"] == d
    clock.run(200)
    out = pcm(sub)
    assert abs(peak_hz(out[60_000:140_000], 48_000) - 500) < 2
    # When the district bulletin ends (3 s), the commune one airs from its beginning.
    after = [x for x in changes_of(e, "T01-H1-X1") if x.after == c]
    assert after and after[0].sample == 144_000 and after[0].cause == "finished"
    assert abs(peak_hz(out[150_000:230_000], 48_000) - 900) < 2


def test_lower_authority_cannot_stop_a_higher_ones_broadcast():
    e, clock = make()
    d = e.start(Broadcast(ToneSource(500, 0.3), ["T01-H1"], issuer="T01-H1"))
    clock.run(5)
    with pytest.raises(AuthorityError):
        e.stop(d, by_area="T01-H1-X1")
    with pytest.raises(AuthorityError):
        e.stop(d, by_area="T01-H2")  # a sibling district is not above it either
    clock.run(5)
    assert e.on_air("T01-H1-X2")["broadcast"] == d
    e.stop(d, by_area="T01")  # the province is
    clock.run(2)
    assert e.on_air("T01-H1-X2")["broadcast"] is None
    assert changes_of(e, "T01-H1-X2")[-1].cause == "stopped"


def test_overlay_ducks_background_by_the_configured_db_with_ramps():
    e, clock = make(EngineSettings(duck_db=-12.0, duck_ramp_ms=200))
    sub = e.hub.subscribe("T01-H1-X1", PCM, maxlen=100_000)
    e.start(Broadcast(ToneSource(440, 0.5), ["T01-H1-X1"], issuer="T01-H1-X1",
                      klass="background"))
    e.start(Broadcast(ToneSource(2000, 0.1, seconds=2), ["T01-H1"], issuer="T01-H1",
                      policy="overlay", start=1.0))
    clock.run(250)
    out = pcm(sub)

    def level_440(x: np.ndarray) -> float:
        spec = np.abs(np.fft.rfft(x * np.hanning(x.shape[0])))
        return float(spec[int(440 * x.shape[0] / 48_000)])

    n = 24_000  # 0.5 s windows (bins land exactly on 440 Hz and 2000 Hz)
    before = level_440(out[12_000:12_000 + n])
    ducked = level_440(out[48_000 + 12_000:48_000 + 12_000 + n])  # after the 200 ms ramp
    after = level_440(out[144_000 + 12_000:144_000 + 12_000 + n])
    assert 20 * np.log10(ducked / before) == pytest.approx(-12.0, abs=0.1)
    assert 20 * np.log10(after / before) == pytest.approx(0.0, abs=0.1)
    # Ramped, not stepped: 100 ms into the ramp the music is about half way down (in gain).
    mid = out[48_000 + 4_800 - 240:48_000 + 4_800 + 240]
    g = rms(mid) / rms(out[12_000:12_000 + 480])
    assert 0.45 < g < 0.8


def test_encode_once_one_mix_and_one_encoder_per_codec_then_split():
    e, clock = make()
    for c in COMMUNES:
        e.hub.subscribe(c, "opus")
        e.hub.subscribe(c, "mp3")
    e.start(Broadcast(ToneSource(440, 0.3), ["T01"], issuer="T01"))
    clock.run(50)
    assert len(e.consumed_mixes()) == 1
    assert e.encoder_count() == 2
    own = e.start(Broadcast(ToneSource(880, 0.3, seconds=1), ["T01-H2-X3"], issuer="T01-H2-X3",
                            klass="priority"))
    clock.run(10)
    assert len(e.consumed_mixes()) == 2
    assert e.encoder_count() == 4
    mixes = {m.id: sorted(m.areas & set(COMMUNES)) for m in e.consumed_mixes()}
    assert sorted(mixes.values()) == [COMMUNES[:5], ["T01-H2-X3"]]
    assert e.on_air("T01-H2-X3")["broadcast"] == own
    # An emergency to everyone brings them back into one mix.
    e.start(Broadcast(ToneSource(1500, 0.3), ["T01"], issuer="T01", klass="emergency"))
    clock.run(5)
    assert len(e.consumed_mixes()) == 1
    assert e.encoder_count() == 2


@pytest.mark.parametrize("codec", ["opus", "mp3", "pcmu", "pcma"])
def test_each_codec_carries_the_tone_across_a_preemption_and_a_split(codec: str):
    e, clock = make()
    subs = {c: e.hub.subscribe(c, codec, maxlen=10_000) for c in ("T01-H1-X1", "T01-H1-X2")}
    e.start(Broadcast(ToneSource(440, 0.4), ["T01-H1"], issuer="T01-H1", klass="background"))
    e.start(Broadcast(ToneSource(1320, 0.4, seconds=2), ["T01-H1-X2"], issuer="T01-H1-X2",
                      start=2.0))
    clock.run(250)
    packets = subs["T01-H1-X2"].drain()
    steps = {b.pts - a.pts for a, b in zip(packets, packets[1:], strict=False)}
    assert steps == {packets[0].duration}, "no gap and no overlap across the split"
    audio, rate = decode_packets(codec, packets)
    sec = rate  # samples per second at the codec's rate
    assert abs(peak_hz(audio[int(0.5 * sec):int(1.5 * sec)], rate) - 440) < 3
    assert abs(peak_hz(audio[int(2.5 * sec):int(3.5 * sec)], rate) - 1320) < 3
    assert abs(peak_hz(audio[int(4.3 * sec):int(4.8 * sec)], rate) - 440) < 3
    other, rate = decode_packets(codec, subs["T01-H1-X1"].drain())
    assert abs(peak_hz(other[int(2.5 * sec):int(3.5 * sec)], rate) - 440) < 3


class Exploding(Source):
    name = "exploding"

    def __init__(self, after: int) -> None:
        self.after = after
        self.position = 0
        self.length = None

    def read(self, n: int = FRAME) -> np.ndarray:
        if self.position >= self.after:
            raise RuntimeError("disk vanished")
        self.position += n
        return np.full(n, 0.25, dtype=np.float32)

    def at(self, position: int) -> Exploding:
        x = Exploding(self.after)
        x.position = position
        return x


def test_failing_source_is_replaced_by_silence_logged_and_the_stream_goes_on(caplog):
    e, clock = make()
    sub = e.hub.subscribe("T01-H1-X1", PCM, maxlen=100_000)
    music = e.start(Broadcast(ToneSource(440, 0.3), ["T01-H1-X1"], issuer="T01-H1-X1",
                              klass="background"))
    bad = e.start(Broadcast(Exploding(after=48_000), ["T01-H1"], issuer="T01-H1", start=1.0))
    with caplog.at_level(logging.ERROR, logger="loa.engine"):
        clock.run(200)
    out = pcm(sub)
    assert out.shape[0] == 200 * FRAME  # not one frame missing
    fail_tick = 50 + 50  # started at tick 50, its 50th read raises
    np.testing.assert_array_equal(out[fail_tick * FRAME:(fail_tick + 1) * FRAME], 0.0)
    assert e.stats["source_errors"] == 1
    assert any("source_error" in r.getMessage() and bad in r.getMessage() for r in caplog.records)
    last = changes_of(e, "T01-H1-X1")[-1]
    assert (last.sample, last.before, last.after, last.cause) == (
        (fail_tick + 1) * FRAME, bad, music, "source-error")
    assert abs(peak_hz(out[(fail_tick + 5) * FRAME:], 48_000) - 440) < 3


def test_every_switch_is_faded_no_click():
    e, clock = make()
    sub = e.hub.subscribe("T01-H1-X1", PCM, maxlen=100_000)
    e.start(Broadcast(PcmSource(np.full(48_000 * 5, 0.8, dtype=np.float32)), ["T01-H1-X1"],
                      issuer="T01-H1-X1", klass="background"))
    e.start(Broadcast(PcmSource(np.full(48_000, -0.8, dtype=np.float32)), ["T01-H1"],
                      issuer="T01-H1", start=1.0))
    clock.run(150)
    out = pcm(sub)
    assert out[47_999] == pytest.approx(0.8) and out[48_000 + FADE] == pytest.approx(-0.8)
    # A 1.6 step spread over >= 10 ms: no sample-to-sample jump above 1.6 / 480 (+ rounding).
    assert np.max(np.abs(np.diff(out))) < 1.6 / FADE + 1e-4


def test_skip_policy_drops_a_preempted_programme_in_that_area():
    e, clock = make()
    skip = e.start(Broadcast(ToneSource(440, 0.3, seconds=10), ["T01-H1-X1"], issuer="T01-H1-X1",
                             policy="skip"))
    e.start(Broadcast(ToneSource(880, 0.3, seconds=1), ["T01-H1"], issuer="T01-H1", start=1.0))
    clock.run(150)
    assert e.on_air("T01-H1-X1")["broadcast"] is None
    assert skip not in e.broadcasts


def test_limiter_never_exceeds_full_scale():
    lim = Limiter()
    rng = np.random.default_rng(3)
    for _ in range(200):
        x = (rng.standard_normal(FRAME) * 2.5).astype(np.float32)  # way over full scale
        y = lim(x)
        assert np.max(np.abs(y)) <= 1.0
    quiet = (np.sin(np.arange(FRAME) / 10) * 0.5).astype(np.float32)
    for _ in range(100):  # after release, normal levels pass untouched
        y = lim(quiet)
    np.testing.assert_allclose(y, quiet, atol=1e-3)


def test_ten_loud_sources_mixed_stay_within_full_scale():
    e, clock = make()
    sub = e.hub.subscribe("T01-H1-X1", PCM, maxlen=100_000)
    for i in range(5):
        e.start(Broadcast(ToneSource(200 + 37 * i, 0.9), ["T01-H1-X1"], issuer="T01-H1-X1",
                          policy="overlay"))
    clock.run(100)
    assert np.max(np.abs(pcm(sub))) <= 1.0


def test_unknown_target_area_is_refused_and_changes_nothing():
    e, clock = make()
    from loa.streamer.areas import AreaError

    with pytest.raises(AreaError):
        e.start(Broadcast(ToneSource(440), ["T01-H9"], issuer="T01"))
    clock.run(3)
    assert e.broadcasts == {}
    assert all(c.after is None for c in e.changes)


def test_a_broadcast_starts_where_its_source_cursor_stands():
    """How a restart resumes a programme: `source.at(offset)` airs from that sample."""
    e, clock = make()
    sub = e.hub.subscribe("T01-H1-X1", PCM, maxlen=100_000)
    music = noise(10)
    e.start(Broadcast(music.at(30_000), ["T01-H1-X1"], issuer="T01-H1-X1"))
    clock.run(50)
    out = pcm(sub)
    np.testing.assert_allclose(out[FADE:48_000], music.pcm[30_000 + FADE:78_000], atol=1e-6)


def test_a_subscriber_that_falls_behind_loses_packets_and_delays_nobody():
    e, clock = make()
    slow = e.hub.subscribe("T01-H1-X1", "opus", maxlen=10)  # never drained
    fast = e.hub.subscribe("T01-H1-X1", "opus", maxlen=10_000)
    e.start(Broadcast(ToneSource(440, 0.3), ["T01-H1"], issuer="T01-H1"))
    clock.run(200)
    got = fast.drain()
    assert len(got) >= 200  # every tick's packet (plus the primed ones)
    assert [b.pts - a.pts for a, b in zip(got, got[1:], strict=False)] == [960] * (len(got) - 1)
    assert len(slow.queue) == 10 and slow.dropped == len(got) - 10
    assert [p.pts for p in slow.queue] == [p.pts for p in got[-10:]]  # it keeps the newest
    assert e.stats["ticks"] == 200


def test_a_live_source_preempted_everywhere_is_heard_again_when_it_resumes():
    """A live input (WHIP, the parent's broadcast on a child node) preempted in every area it
    reaches, then back on top: heard from the sample it resumes at, not left silent."""
    from loa.streamer.sources import LivePush
    from tests.audio import tone_pcm

    e, clock = make()
    sub = e.hub.subscribe("T01-H1-X1", PCM, maxlen=100_000)
    live = LivePush(target_ms=20, max_ms=200)
    e.start(Broadcast(live, ["T01-H1"], issuer="T01-H1", klass="priority", start=0.0))
    feed = tone_pcm(0.02, 650)  # 13 whole periods a frame

    def run(seconds: float) -> np.ndarray:  # the input writes in real time, one frame a tick
        for _ in range(int(seconds * 50)):
            live.write(feed[:FRAME])
            clock.run(1)
        return pcm(sub)

    assert abs(peak_hz(run(1.0)[-24_000:], 48_000) - 650) < 3
    alarm = e.start(Broadcast(ToneSource(1000, 0.3), ["T01"], issuer="T01", klass="emergency"))
    assert abs(peak_hz(run(1.0)[-24_000:], 48_000) - 1000) < 3
    e.stop(alarm)
    back = run(1.0)[-24_000:]
    assert abs(peak_hz(back, 48_000) - 650) < 3 and rms(back) > 0.2
