"""The priority arbiter: who is on air in an area, and what a change is called (DESIGN.md "Priority").

In each area the winner is the highest class, then the highest authority (the issuer nearest the
root), then the earliest start (then the earlier accepted, so ties never flip). A bulletin from
above that a commune put after its own (TT 39: the commune orders a priority clash) takes the
commune's authority and `yields`: it ranks just after the commune's own of its class. Overlays do not
take the air: they duck the winner, and only those ranked above it are heard.

Pure: it sees candidates and names a decision; the engine owns playheads, fades and the clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from loa.streamer.broadcast import BroadcastClass
from loa.streamer.clock import FRAME

Rank = tuple[int, int, bool, int, int]


@dataclass(frozen=True)
class Candidate:
    """A broadcast that may air in an area, as the arbiter sees it."""

    id: str
    cls: BroadcastClass
    authority: int  # depth of the issuing area: 0 is the root, lower outranks
    start_tick: int
    seq: int = 0  # acceptance order, the last tie-break
    overlay: bool = False
    yields: bool = False  # after the broadcasts of its class issued at `authority` itself
    rank: Rank = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Lower sorts first: higher class, then nearer the root, then earlier start.
        object.__setattr__(self, "rank", (-int(self.cls), self.authority, self.yields,
                                          self.start_tick, self.seq))


@dataclass(frozen=True)
class Decision:
    main: str | None  # the broadcast on air; None is silence
    overlays: tuple[str, ...]  # heard over it, best ranked first

    @property
    def audible(self) -> set[str]:
        return ({self.main} if self.main else set()) | set(self.overlays)


def decide(candidates: Iterable[Candidate]) -> Decision:
    ranked = sorted(candidates, key=lambda c: c.rank)
    main = next((c for c in ranked if not c.overlay), None)
    overlays = tuple(c.id for c in ranked
                     if c.overlay and (main is None or c.rank < main.rank))
    return Decision(main.id if main else None, overlays)


@dataclass(frozen=True)
class Switch:
    """Who is on air changed at the start of `tick`: the switch (a crossfade) starts at `sample`."""

    tick: int
    before: str | None
    after: str | None
    cause: str  # the event's cause; "preempt" when a start takes the air from another broadcast

    @property
    def sample(self) -> int:
        return self.tick * FRAME


def switch(before: str | None, decision: Decision, tick: int, cause: str,
           by: str | None) -> Switch | None:
    """The change a decision makes to what was on air, None if the same broadcast stays.

    `cause` and `by` name the event that made the area re-arbitrate (a start, stop, end ...)."""
    after = decision.main
    if after == before:
        return None
    if cause == "start" and before is not None and by == after:
        cause = "preempt"
    return Switch(tick, before, after, cause)
