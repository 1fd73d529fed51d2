"""Dead air: a live input (relay, ingest, WHIP, a parent's broadcast) on the air that carries
silence for too long gives the air to the area's fallback and calls a person.

Every broadcast whose source is a `LivePush` is watched in each of its target areas at that
area's level (RMS of 20 ms, dBFS) and time: the nearest setting at or above the area
(`DeadAirSettings` per area, stored as `dead_air` records), else the node's `[dead_air]`. Silence
is counted on the media clock (the LivePush's read position), so a virtual clock runs it too.
When a target has been below its level for its time while the broadcast is on the air there, the
broadcast is held off the air in that target's subtree (`Engine.hold`, cause `dead-air`): the
next broadcast below it airs (the area's fallback: its background programme, a lower relay), and
a `dead_air` alert is raised. The held input keeps being read: the first 20 ms at the level again
give it the air back (`dead-air-over`) and clear the alert.

`check()` is pure bookkeeping over the engine's state: the node calls it every `CHECK_S`; tests
call it after ticking a virtual clock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from loa.streamer.alerts import Alert, Alerts
from loa.streamer.areas import AreaTree
from loa.streamer.clock import SAMPLE_RATE
from loa.streamer.engine import Engine
from loa.streamer.messages import say
from loa.streamer.sources import LivePush

log = logging.getLogger("loa.deadair")

CHECK_S = 0.25
REASON = "dead-air"
LEVEL_RANGE = (-90.0, -10.0)  # dBFS: below -90 nothing is silent enough, above -10 all speech is
SECONDS_RANGE = (2.0, 3600.0)


@dataclass
class DeadAirSettings:
    level_db: float = -50.0  # quieter than this (RMS over 20 ms) is silence
    seconds: float = 10.0  # silence this long on the air is dead air
    enabled: bool = True

    def check(self) -> tuple[str, str] | None:
        """(the field out of range, why), or None."""
        if not LEVEL_RANGE[0] <= self.level_db <= LEVEL_RANGE[1]:
            return "level_db", say("deadair.level")
        if not SECONDS_RANGE[0] <= self.seconds <= SECONDS_RANGE[1]:
            return "seconds", say("deadair.seconds")
        return None


class DeadAir:
    def __init__(self, engine: Engine, tree: AreaTree, alerts: Alerts,
                 default: DeadAirSettings | None = None) -> None:
        self.engine = engine
        self.tree = tree
        self.alerts = alerts
        self.default = default or DeadAirSettings()
        self.areas: dict[str, DeadAirSettings] = {}  # area -> its own setting (its subtree's)
        self.held: dict[tuple[str, str], int] = {}  # (broadcast, target) -> position when held
        self.events = 0  # times dead air took a broadcast off the air

    def settings_for(self, area: str) -> DeadAirSettings:
        for code in self.tree.ancestors(area) if area in self.tree else ():  # nearest first
            if code in self.areas:
                return self.areas[code]
        return self.default

    def check(self) -> None:
        seen: set[tuple[str, str]] = set()
        for b in self.engine.active():
            src = b.source
            if not isinstance(src, LivePush):
                continue
            for target in b.targets:
                key = (b.id, target)
                s = self.settings_for(target)
                if not s.enabled:
                    continue
                seen.add(key)
                src.watch(s.level_db)
                loud = src.loud_at(s.level_db)
                if key in self.held:
                    if loud > self.held[key]:
                        self._release(key, "audio back")
                elif (self.engine.main_of(target) == b.id
                      and src.position - loud >= s.seconds * SAMPLE_RATE):
                    self._hold(key, b.title, s, src.position)
        for key in [k for k in self.held if k not in seen]:
            self._release(key, "ended")

    def _subtree(self, target: str) -> list[str]:
        return [c for c in self.tree.subtree(target) if c in self.engine.areas] \
            if target in self.tree else []

    def _hold(self, key: tuple[str, str], title: str, s: DeadAirSettings, at: int) -> None:
        bid, target = key
        try:
            self.engine.hold(bid, REASON, True, self._subtree(target))
        except KeyError:
            return
        self.held[key] = at
        self.events += 1
        log.warning("dead air, fallback on air event=dead_air area=%s broadcast=%s title=%r "
                    "level_db=%g seconds=%g", target, bid, title, s.level_db, s.seconds)
        self.alerts.raise_(Alert(
            "dead_air", f"{target}/{bid}", target,
            say("deadair.alert", title=title, seconds=f"{s.seconds:g}", level=f"{s.level_db:g}"),
            detail={"broadcast": bid, "level_db": s.level_db, "seconds": s.seconds}))

    def _release(self, key: tuple[str, str], why: str) -> None:
        bid, target = key
        self.held.pop(key, None)
        try:
            self.engine.hold(bid, REASON, False, self._subtree(target))
        except KeyError:
            pass  # the broadcast ended: nothing to give back
        log.info("dead air over event=dead_air_over area=%s broadcast=%s why=%s",
                 target, bid, why)
        self.alerts.clear("dead_air", f"{target}/{bid}")
