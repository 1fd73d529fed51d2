"""A broadcast: a source aired to a set of areas with a class, an authority and a policy."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from loa.streamer.messages import say
from loa.streamer.sources import Source


class BroadcastClass(IntEnum):
    """TT 39/2020 bulletin classes, plus background below them. Higher value wins."""

    background = 0
    normal = 1
    priority = 2
    emergency = 3

    @classmethod
    def parse(cls, value: str | int | BroadcastClass) -> BroadcastClass:
        if isinstance(value, BroadcastClass):
            return value
        if isinstance(value, int):
            return cls(value)
        try:
            return cls[str(value).strip().lower()]
        except KeyError:
            raise ValueError(say("class.bad", value=value)) from None


class Policy(StrEnum):
    resume = "resume"  # preempted: pause, then continue at the exact sample where it stopped
    skip = "skip"  # preempted: dropped in that area
    overlay = "overlay"  # ducks what is under it instead of preempting it


_seq = itertools.count()


@dataclass
class Broadcast:
    source: Source
    targets: list[str]
    issuer: str  # area code of the issuing authority (province, district, commune ...)
    klass: BroadcastClass | str = BroadcastClass.normal
    policy: Policy | str = Policy.resume
    start: float | None = None  # media seconds; None = at the next tick
    end: float | None = None  # media seconds; None = when the source ends
    end_cause: str = "ended"  # the as-run's end cause when `end` is reached ("expired": a validity)
    gain: float = 1.0  # programme volume, linear
    duck_db: float | None = None  # overlays: how far to duck what is under them
    title: str = ""
    # Areas (communes) that put this bulletin after their own of its class: in them and below
    # it ranks as theirs, just after theirs (arbiter.Candidate.yields).
    after_own: frozenset[str] = frozenset()
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    seq: int = field(default_factory=lambda: next(_seq))

    @property
    def cls(self) -> BroadcastClass:
        """The class, parsed (the field also accepts its name when constructed)."""
        return BroadcastClass.parse(self.klass)

    def __post_init__(self) -> None:
        self.klass = BroadcastClass.parse(self.klass)
        self.policy = Policy(self.policy)
        if not self.targets:
            raise ValueError(say("broadcast.no_targets"))
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(say("broadcast.end_before_start"))
        if not 0.0 <= self.gain <= 4.0:
            raise ValueError(say("broadcast.gain"))
        if not self.title:
            self.title = self.source.name
