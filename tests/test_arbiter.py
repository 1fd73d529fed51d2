"""The priority arbiter on its own: candidates in, a decision out, no engine and no clock."""

from __future__ import annotations

from loa.streamer.arbiter import Candidate, Decision, change_cause, decide
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


def test_a_start_that_takes_the_air_is_a_preemption():
    assert change_cause("start", "music", "bulletin", by="bulletin") == "preempt"
    assert change_cause("start", None, "bulletin", by="bulletin") == "start"  # from silence
    assert change_cause("start", "music", "other", by="bulletin") == "start"
    assert change_cause("ended", "bulletin", "music", by="bulletin") == "ended"
