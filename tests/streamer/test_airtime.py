"""Quiet hours and time-of-day volume on the virtual clock: the exact tick a boundary takes
effect, the gain heard in the mixer's output, emergencies and priority bulletins exempt, a
commune's own rule replacing the one it inherits."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from loa.streamer.airtime import Airtime, AirtimeError, parse_rule
from loa.streamer.areas import sample_tree
from loa.streamer.broadcast import Broadcast
from loa.streamer.clock import FRAME, VirtualClock
from loa.streamer.engine import PCM, Engine
from loa.streamer.sources import PcmSource, ToneSource
from tests.audio import rms

VN = ZoneInfo("Asia/Ho_Chi_Minh")
FADE = 480
X1, X2 = "T01-H1-X1", "T01-H1-X2"


def at(hh: int, mm: int, ss: float) -> float:
    """The epoch of a local time on 7 Dec 2026."""
    return dt.datetime(2026, 12, 7, hh, mm, int(ss), int(ss % 1 * 1e6), tzinfo=VN).timestamp()


def make(own: dict[str, dict], epoch: float) -> tuple[Engine, VirtualClock]:
    e = Engine(sample_tree())
    e.set_airtime(Airtime.of(e.tree, {k: parse_rule(v) for k, v in own.items()}, epoch))
    return e, VirtualClock(e.tick)


def pcm(sub) -> np.ndarray:
    return np.frombuffer(b"".join(p.data for p in sub.drain()), dtype=np.float32)


def music(seconds: float = 60) -> PcmSource:
    rng = np.random.default_rng(7)
    return PcmSource((rng.standard_normal(int(seconds * 48000)) * 0.1).astype(np.float32), "m")


def test_a_normal_programme_stops_at_the_first_tick_of_quiet_hours_and_resumes_after():
    # From 20:59:50.013: 21:00:00 falls inside tick 499 (20:59:59.993), so tick 500 is the
    # first that starts in quiet hours; they end at 21:01, inside tick 3,499: tick 3,500 airs.
    e, clock = make({"T01": {"hours": [["05:00", "21:00"], ["21:01", "23:59"]]}},
                    at(20, 59, 50.013))
    sub = e.hub.subscribe(X1, PCM, maxlen=200_000)
    src = music()
    m = e.start(Broadcast(src, [X1], issuer=X1, klass="normal", start=0.0))
    clock.run(3600)
    out = pcm(sub)
    changes = [(c.sample, c.before, c.after, c.cause) for c in e.changes if c.area == X1]
    assert changes[0][:3] == (0, None, m)
    assert changes[1:] == [(500 * FRAME, m, None, "quiet_hours"),
                       (3500 * FRAME, None, m, "quiet_hours")], changes
    # music up to sample 480,000, then a 10 ms fade, then silence until the window opens
    np.testing.assert_allclose(out[FADE:500 * FRAME], src.pcm[FADE:500 * FRAME], atol=1e-6)
    assert not out[500 * FRAME + FADE:3500 * FRAME].any()
    # ... and it resumes where it stopped (not from where the clock is)
    s = 3500 * FRAME
    np.testing.assert_allclose(out[s + FADE:s + 48_000], src.pcm[500 * FRAME + FADE:
                                                                 500 * FRAME + 48_000], atol=1e-6)


def test_a_background_programme_starts_at_the_first_tick_the_hours_open():
    e, clock = make({"T01": {"hours": [["05:00", "21:00"]]}}, at(4, 59, 50.013))
    sub = e.hub.subscribe(X1, PCM, maxlen=200_000)
    src = music()
    m = e.start(Broadcast(src, [X1], issuer=X1, klass="background", start=0.0))
    clock.run(1000)
    out = pcm(sub)
    assert [(c.sample, c.after) for c in e.changes if c.area == X1] == [(500 * FRAME, m)]
    assert not out[:500 * FRAME].any()
    np.testing.assert_allclose(out[500 * FRAME + FADE:], src.pcm[FADE:500 * FRAME], atol=1e-6)


def test_the_volume_of_the_hour_is_heard_and_changes_at_its_boundary():
    e, clock = make({"T01": {"volume": [{"from": "05:00", "to": "06:00", "percent": 50},
                                        {"from": "06:00", "to": "21:00", "percent": 80}]}},
                    at(5, 59, 50.013))
    sub = e.hub.subscribe(X1, PCM, maxlen=200_000)
    e.start(Broadcast(ToneSource(440, 0.3), [X1], issuer=X1, klass="normal", start=0.0))
    clock.run(1000)
    out = pcm(sub)
    full = 0.3 / np.sqrt(2)
    assert rms(out[48_000:480_000]) == pytest.approx(0.5 * full, rel=0.01)
    # 200 ms ramp from tick 500, then 80 %
    assert rms(out[500 * FRAME + 9600 + 4800:]) == pytest.approx(0.8 * full, rel=0.01)
    assert rms(out[470_000:480_000]) == pytest.approx(0.5 * full, rel=0.01)


def test_an_emergency_and_a_priority_bulletin_air_in_quiet_hours_at_full_volume():
    rule = {"hours": [["05:00", "21:00"]], "volume": [{"from": "00:00", "to": "24:00",
                                                       "percent": 30}]}
    e, clock = make({"T01": rule}, at(23, 0, 0))
    sub = e.hub.subscribe(X1, PCM, maxlen=200_000)
    src = music()
    e.start(Broadcast(src, [X1], issuer=X1, klass="normal", start=0.0))
    em = e.start(Broadcast(ToneSource(1000, 0.3, seconds=5), ["T01"], issuer="T01",
                           klass="emergency", start=2.0))
    pr = e.start(Broadcast(ToneSource(700, 0.3, seconds=3), ["T01-H1"], issuer="T01-H1",
                           klass="priority", start=8.0))
    clock.run(700)
    out = pcm(sub)
    assert not out[:2 * 48_000].any()  # the normal programme waits for morning
    full = 0.3 / np.sqrt(2)
    assert rms(out[2 * 48_000 + FADE:7 * 48_000 - FADE]) == pytest.approx(full, rel=0.01)
    assert rms(out[8 * 48_000 + FADE:11 * 48_000 - FADE]) == pytest.approx(full, rel=0.01)
    assert not out[11 * 48_000 + FADE:].any()
    assert [c.after for c in e.changes if c.area == X1] == [em, None, pr, None]


def test_a_commune_that_sets_its_own_rule_replaces_the_province_s():
    e, clock = make({"T01": {"hours": [["05:00", "21:00"]]},
                     X1: {"hours": [["05:00", "23:30"]], "volume": []}}, at(22, 0, 0))
    subs = {c: e.hub.subscribe(c, PCM, maxlen=200_000) for c in (X1, X2)}
    for c in (X1, X2):
        e.start(Broadcast(ToneSource(440, 0.3), [c], issuer=c, klass="background", start=0.0))
    clock.run(200)
    assert rms(pcm(subs[X1])[FADE:]) > 0.2  # its own hours: still on air at 22:00
    assert not pcm(subs[X2]).any()  # the province's: quiet


@pytest.mark.parametrize("bad, field", [
    ({"hours": [["5:00", "21:00"]]}, "airtime.hours[0]"),
    ({"hours": [["05:00", "05:00"]]}, "airtime.hours[0]"),
    ({"hours": "05:00-21:00"}, "airtime.hours"),
    ({"volume": [{"from": "05:00", "to": "06:00", "percent": 150}]}, "airtime.volume[0].percent"),
    ({"volume": [{"from": "05:00", "to": "06:00"}]}, "airtime.volume[0]"),
    ({"volume": [{"from": "05:00", "to": "25:00", "percent": 50}]}, "airtime.volume[0].to"),
    ({"quiet": []}, "airtime"),
])
def test_a_bad_rule_is_refused_naming_the_field(bad, field):
    with pytest.raises(AirtimeError) as e:
        parse_rule(bad)
    assert e.value.field == field
