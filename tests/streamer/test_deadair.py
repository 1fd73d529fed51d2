"""Dead air on the virtual clock: a relay's input goes silent on the air, the area's fallback
(its background programme) airs at the tick the silence reaches the area's time, the alert is
raised; the audio returns and the relay has the air back, the alert cleared."""

from __future__ import annotations

import numpy as np

from loa.streamer.alerts import Alerts
from loa.streamer.areas import sample_tree
from loa.streamer.broadcast import Broadcast
from loa.streamer.clock import FRAME, SAMPLE_RATE, VirtualClock
from loa.streamer.deadair import CHECK_S, DeadAir, DeadAirSettings
from loa.streamer.engine import PCM, Engine
from loa.streamer.sources import LivePush, ToneSource
from tests.audio import peak_hz, rms

X1 = "T01-H1-X1"
X2 = "T01-H1-X2"
CHECK_TICKS = int(CHECK_S * SAMPLE_RATE / FRAME)


class Rig:
    def __init__(self) -> None:
        self.engine = Engine(sample_tree())
        self.clock = VirtualClock(self.engine.tick)
        self.alerts = Alerts()
        self.dead = DeadAir(self.engine, self.engine.tree, self.alerts)
        self.input = LivePush(target_ms=60, max_ms=500, name="VOV1")
        self.tone = ToneSource(1000, 0.3)
        self.taps = {a: self.engine.hub.subscribe(a, PCM, maxlen=100_000) for a in (X1, X2)}
        self.engine.start(Broadcast(ToneSource(440, 0.3), [X1], issuer=X1, klass="background",
                                    title="Nhạc nền"))
        self.engine.start(Broadcast(ToneSource(550, 0.3), [X2], issuer=X2, klass="background",
                                    title="Nhạc nền X2"))
        self.relay = self.engine.start(Broadcast(self.input, ["T01-H1"], issuer="T01-H1",
                                                 title="Tiếp sóng VOV1"))

    def run(self, seconds: float, audio: bool) -> None:
        """The input delivers `audio` (a 1 kHz tone) or silence, 20 ms per tick, in real time;
        the detector checks every CHECK_S as the node does."""
        for _ in range(int(round(seconds * SAMPLE_RATE / FRAME))):
            self.input.write(self.tone.read(FRAME) if audio else np.zeros(FRAME, np.float32))
            self.clock.run(1)
            if self.clock.n % CHECK_TICKS == 0:
                self.dead.check()

    def heard(self, area: str, seconds: float = 0.5) -> np.ndarray:
        pcm = np.frombuffer(b"".join(p.data for p in self.taps[area].drain()), np.float32)
        return pcm[-int(seconds * SAMPLE_RATE):]

    def changes(self, area: str, cause: str) -> list:
        return [c for c in self.engine.changes if c.area == area and c.cause == cause]


def test_silence_for_its_time_airs_the_fallback_and_alerts_then_audio_gives_the_air_back():
    r = Rig()
    r.run(3, audio=True)
    assert r.engine.main_of(X1) == r.relay and abs(peak_hz(r.heard(X1), SAMPLE_RATE) - 1000) < 5
    silent_from = r.clock.n
    r.run(9.5, audio=False)  # the default time is 10 s: not yet
    assert r.engine.main_of(X1) == r.relay and not r.alerts.active
    assert rms(r.heard(X1)) < 1e-3
    r.run(1.5, audio=False)
    [held] = r.changes(X1, "dead-air")
    # The input read silence from the jitter buffer's end: 10 s of it, then at most one check.
    silent_s = (held.tick - silent_from) * FRAME / SAMPLE_RATE
    assert 10.0 <= silent_s <= 10.0 + 0.06 + CHECK_S + 0.02, silent_s
    assert r.engine.main_of(X1) != r.relay
    assert abs(peak_hz(r.heard(X1, 0.4), SAMPLE_RATE) - 440) < 5  # the fallback airs
    [alert] = r.alerts.active.values()
    assert alert.kind == "dead_air" and alert.area == "T01-H1"
    assert alert.detail["broadcast"] == r.relay and "Tiếp sóng VOV1" in alert.text
    # Every commune the relay covers falls back to its own: X2 hears its 550 Hz.
    assert r.engine.main_of(X2) != r.relay
    r.run(1, audio=False)
    assert abs(peak_hz(r.heard(X2), SAMPLE_RATE) - 550) < 5
    # Audio returns: at the next check the relay is back, the alert cleared.
    back_from = r.clock.n
    r.run(1, audio=True)
    [back] = r.changes(X1, "dead-air-over")
    assert (back.tick - back_from) * FRAME / SAMPLE_RATE <= 0.06 + CHECK_S + 0.02
    assert r.engine.main_of(X1) == r.relay and not r.alerts.active
    r.run(0.5, audio=True)
    assert abs(peak_hz(r.heard(X1, 0.4), SAMPLE_RATE) - 1000) < 5
    assert r.dead.events == 1


def test_an_areas_own_level_and_time_apply_below_it_and_quiet_audio_above_the_level_is_not_dead():
    r = Rig()
    r.dead.areas["T01-H1"] = DeadAirSettings(level_db=-30.0, seconds=3.0)
    r.run(2, audio=True)
    r.tone.amplitude = 0.01  # -43 dBFS: audio for -50, silence for -30
    r.run(2.5, audio=True)
    assert r.engine.main_of(X1) == r.relay
    r.run(1.0, audio=True)
    assert r.changes(X1, "dead-air") and r.engine.main_of(X1) != r.relay
    # Set back to the default: quiet audio is over -50 dBFS, so the relay returns.
    del r.dead.areas["T01-H1"]
    r.run(0.5, audio=True)
    assert r.engine.main_of(X1) == r.relay and not r.alerts.active


def test_a_stopped_broadcast_clears_its_alert_and_a_preempted_input_is_not_dead_air():
    r = Rig()
    r.run(1, audio=True)
    r.run(11, audio=False)
    assert r.alerts.active
    r.engine.stop(r.relay)
    r.run(0.5, audio=False)
    assert not r.alerts.active and not r.dead.held
    # A relay under an emergency is not on the air: its silence is nobody's dead air.
    inp = LivePush(name="VOV2")
    r.input = inp
    relay = r.engine.start(Broadcast(inp, [X1], issuer="T01-H1"))
    r.engine.start(Broadcast(ToneSource(800, 0.3), ["T01"], issuer="T01", klass="emergency"))
    r.run(12, audio=False)
    assert r.engine.live_broadcast(relay) is not None and not r.alerts.active
