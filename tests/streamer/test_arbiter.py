"""The priority arbiter on its own: candidates in, a decision out, no engine and no clock."""

from __future__ import annotations

from loa.streamer.arbiter import Candidate, Decision, Switch, decide, switch
from loa.streamer.broadcast import BroadcastClass as C


def cand(id: str, cls: C = C.normal, authority: int = 2, start: int = 0, seq: int = 0,
         overlay: bool = False) -> Candidate:
    return Candidate(id, cls, authority, start, seq, overlay)


def test_nobody_is_silence():
    assert decide([]) == Decision(None, ())
    assert decide([]).audible == set()


def test_the_highest_class_wins_whatever_the_authority_or_start():
    d = decide([cand("music", C.background, authority=0), cand("bulletin", C.normal, authority=3),
                cand("alarm", C.emergency, authority=3, start=99)])
    assert d.main == "alarm"


def test_same_class_the_authority_nearest_the_root_wins():
    d = decide([cand("commune", authority=2), cand("district", authority=1, start=50)])
    assert d.main == "district"


def test_same_class_and_authority_the_earliest_start_then_the_first_accepted_wins():
    assert decide([cand("late", start=10), cand("early", start=5)]).main == "early"
    assert decide([cand("second", seq=2), cand("first", seq=1)]).main == "first"


def test_an_overlay_ranked_above_the_main_is_heard_over_it_best_first():
    d = decide([cand("music", C.background), cand("chime", overlay=True, seq=2),
                cand("alert", C.priority, overlay=True, seq=3)])
    assert d == Decision("music", ("alert", "chime"))
    assert d.audible == {"music", "alert", "chime"}


def test_an_overlay_below_the_main_is_not_heard_and_never_airs_alone_as_main():
    d = decide([cand("speech", C.priority), cand("chime", C.normal, overlay=True)])
    assert d == Decision("speech", ())
    assert decide([cand("chime", overlay=True)]) == Decision(None, ("chime",))


def test_a_start_that_takes_the_air_is_a_preemption_at_the_ticks_first_sample():
    bulletin = decide([cand("music", C.background), cand("bulletin")])
    sw = switch("music", bulletin, 500, "start", by="bulletin")
    assert sw == Switch(500, "music", "bulletin", "preempt")
    assert sw.sample == 480_000
    assert switch(None, bulletin, 0, "start", by="bulletin") == \
        Switch(0, None, "bulletin", "start")  # from silence
    assert switch("music", bulletin, 7, "start", by="other").cause == "start"  # not its start


def test_no_switch_while_the_same_broadcast_stays_and_an_end_keeps_its_cause():
    music = decide([cand("music", C.background)])
    assert switch("music", music, 9, "start", by="chime") is None  # an overlay came, say
    assert switch("bulletin", music, 9, "ended", by="bulletin") == \
        Switch(9, "bulletin", "music", "ended")
    assert switch("music", decide([]), 9, "stopped", by="music") == \
        Switch(9, "music", None, "stopped")
