"""The TT 39 rules between levels as data: the commune's order of a priority clash in the arbiter
and the engine (sample-exact on the virtual clock), and the inbox's rules (streamer/inbox.py)."""

from __future__ import annotations

import pytest

from loa.streamer import arbiter, inbox
from loa.streamer.areas import sample_tree
from loa.streamer.broadcast import Broadcast, BroadcastClass
from loa.streamer.clock import FRAME, VirtualClock
from loa.streamer.engine import Engine
from loa.streamer.sources import ToneSource

X1, X2 = "T01-H1-X1", "T01-H1-X2"
P, N = BroadcastClass.priority, BroadcastClass.normal


def test_a_bulletin_put_after_the_communes_own_ranks_just_below_it_within_its_class():
    own = arbiter.Candidate("own", P, 2, start_tick=100)
    province = arbiter.Candidate("tinh", P, 0, start_tick=200)
    after = arbiter.Candidate("tinh", P, 2, start_tick=200, yields=True)
    district = arbiter.Candidate("huyen", P, 1, start_tick=300)
    assert arbiter.decide([own, province]).main == "tinh"  # "before": the level rule
    assert arbiter.decide([own, after]).main == "own"  # "after": the commune's own first
    # Yielding to the commune moves it below the district's too, never below a lower class.
    assert arbiter.decide([after, district]).main == "huyen"
    assert arbiter.decide([after, arbiter.Candidate("n", N, 0, start_tick=0)]).main == "tinh"
    # ... and it stays after the commune's own, even one that starts later.
    assert arbiter.decide([after, arbiter.Candidate("own2", P, 2, start_tick=900)]).main \
        == "own2"


def clash(order_after: frozenset[str]) -> tuple[Engine, str, str]:
    """X1's own priority bulletin (4 s) from second 2; the province's priority bulletin (3 s) to
    both X1 and X2 from second 3; music below them."""
    e = Engine(sample_tree())
    clock = VirtualClock(e.tick)
    for code in (X1, X2):
        e.start(Broadcast(ToneSource(300, 0.2), [code], issuer=code, klass="background"))
    own = e.start(Broadcast(ToneSource(500, 0.3, seconds=4.0), [X1], issuer=X1,
                            klass="priority", start=2.0))
    tinh = e.start(Broadcast(ToneSource(800, 0.3, seconds=3.0), [X1, X2], issuer="T01",
                             klass="priority", start=3.0, after_own=order_after))
    clock.run(600)  # 12 s
    return e, own, tinh


def switches(e: Engine, area: str) -> list[tuple[int, str | None, str | None, str]]:
    return [(c.sample, c.before, c.after, c.cause) for c in e.changes if c.area == area][1:]


def test_default_order_the_province_bulletin_goes_first_and_the_communes_own_resumes_after():
    e, own, tinh = clash(frozenset())
    music = e.changes[0].after if e.changes[0].area == X1 else e.changes[1].after
    assert switches(e, X1) == [
        (96_000, music, own, "preempt"),  # 2 s: the commune's own
        (144_000, own, tinh, "preempt"),  # 3 s: the province's takes the air at once
        (288_000, tinh, own, "finished"),  # 6 s: the commune's own resumes where it stopped
        (432_000, own, music, "finished"),  # its 3 s left end at 9 s
    ]
    resumed = [c for c in e.changes if c.area == X1 and c.sample == 288_000][0]
    assert resumed.resumed_at == 48_000  # 1 s of it had aired


def test_order_after_the_commune_airs_its_own_first_and_the_bulletin_starts_at_its_end():
    e, own, tinh = clash(frozenset({X1}))
    assert [s[1:] for s in switches(e, X1)][1:] == [(own, tinh, "finished"),
                                                     (tinh, switches(e, X1)[0][1], "finished")]
    assert [s[0] for s in switches(e, X1)] == [96_000, 288_000, 432_000]  # own 2-6 s, then 3 s
    # X2 has no own bulletin and did not defer: the province's airs there at 3 s.
    assert [s[0] for s in switches(e, X2) if s[2] == tinh] == [144_000]


def test_the_commune_changes_its_order_while_the_bulletin_is_on_air():
    e = Engine(sample_tree())
    clock = VirtualClock(e.tick)
    own = e.start(Broadcast(ToneSource(500, 0.3, seconds=4.0), [X1], issuer=X1,
                            klass="priority", start=0.0))
    tinh = e.start(Broadcast(ToneSource(800, 0.3, seconds=3.0), [X1], issuer="T01",
                             klass="priority", start=1.0))
    clock.run(100)  # 2 s: the province's on air since 1 s
    e.reorder(tinh, frozenset({X1}))  # takes effect at the next tick, 100
    clock.run(500)
    got = [(c.sample, c.after, c.cause) for c in e.changes if c.area == X1]
    assert got[:3] == [(0, own, "start"), (48_000, tinh, "preempt"), (100 * FRAME, own, "reorder")]
    # own: 1 s aired, 3 s left from 2 s -> ends at 5 s; then the province's resumes (2 s left).
    assert got[3] == (240_000, tinh, "finished") and got[4][0] == 336_000


def test_inbox_rules():
    tree = sample_tree()
    with pytest.raises(inbox.InboxError) as err:
        inbox.communes(tree, X1, [X2])  # sideways
    assert err.value.kind == "forbidden" and err.value.field == "targets"
    with pytest.raises(inbox.InboxError):
        inbox.communes(tree, "T01-H1", ["T01"])  # up
    with pytest.raises(inbox.InboxError):
        inbox.communes(tree, "T01-H1", ["T01-H1"])  # its own area
    assert inbox.communes(tree, "T01", ["T01-H1"]) == ["T01-H1-X1", "T01-H1-X2", "T01-H1-X3"]
    b = inbox.new_bulletin("T01", "tinh", {"id": "p1", "title": "Tin"}, "normal", ["T01-H1"])
    entries = inbox.entries(b, [X1, X2])
    assert [(e["area"], e["state"], e["order"]) for e in entries] == [
        (X1, "pending", "before"), (X2, "pending", "before")]
    assert inbox.scheduling(entries[0], "s1", "xa11")["state"] == "scheduled"
    with pytest.raises(inbox.InboxError) as err:
        inbox.declining({**entries[0], "state": "scheduled"}, "Trùng lịch", "xa11")
    assert err.value.kind == "conflict"
    with pytest.raises(inbox.InboxError):
        inbox.declining(entries[0], "  ", "xa11")
    with pytest.raises(inbox.InboxError) as err:
        inbox.ordering(entries[0], "after")  # a normal one is scheduled, not ordered
    assert err.value.kind == "conflict"
    prio = inbox.entries({**b, "class": "priority"}, [X1, X2])
    assert {e["state"] for e in prio} == {"aired"}
    prio[1].update(inbox.ordering(prio[1], "after"))
    assert inbox.after_own(prio) == frozenset({X2})
    with pytest.raises(inbox.InboxError):
        inbox.check_class("urgent")
    with pytest.raises(inbox.InboxError):
        inbox.check_class("background")
