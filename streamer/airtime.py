"""Quiet hours and time-of-day volume per area (noise complaints remove loudspeakers).

An area may set `airtime`: `{"hours": [["05:00", "21:30"], ...], "volume": [{"from": "05:00",
"to": "06:00", "percent": 60}, ...]}` in local time (Asia/Ho_Chi_Minh, as schedules). `hours` are
the windows in which `normal` and `background` broadcasts may air (none given: all day); outside
them the arbiter does not see those broadcasts, so they pause (and resume where they stopped) or
are skipped as their policy says, like a preemption by silence. `volume` scales them by time of
day (the first row that holds the time; none: 100 %). An area without `airtime` inherits its
nearest ancestor's; a commune that sets its own replaces it whole.

`priority` and `emergency` are exempt from both: an emergency must be heard at once and loud,
and a priority bulletin (TT 39: "played with priority") is an official notice the levels above
send for now, not the daily programming the complaints are about.

The engine asks every tick what each distinct rule says (`state`: a handful of rules, not one
check per area) and re-arbitrates the areas of a rule whose answer changed, at exactly that tick:
a boundary at hh:mm falls on the first tick that starts at or after it.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from loa.streamer.areas import AreaTree
from loa.streamer.broadcast import BroadcastClass
from loa.streamer.clock import FRAME, SAMPLE_RATE
from loa.streamer.errors import LoaError
from loa.streamer.messages import say

DAY = 86400
RESTRICTED = frozenset({BroadcastClass.normal, BroadcastClass.background})
MAX_ROWS = 24
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
TICKS_PER_S = SAMPLE_RATE // FRAME
LOCAL = ZoneInfo("Asia/Ho_Chi_Minh")  # the loudspeakers' clocks (schedule.DEFAULT_TZ)


class AirtimeError(LoaError):
    kind = "invalid"


def _seconds(v: Any, name: str, end: bool = False) -> int:
    if end and v == "24:00":
        return DAY
    m = _HHMM.match(v) if isinstance(v, str) else None
    if m is None:
        raise AirtimeError(say("airtime.bad_time", name=name), field=name)
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60


def _hm(s: int) -> str:
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}"


@dataclass(frozen=True)
class Rule:
    """One area's own setting, in seconds of the local day."""

    hours: tuple[tuple[int, int], ...]  # [from, to); to < from runs over midnight
    volume: tuple[tuple[int, int, int], ...]  # (from, to, percent)

    def allows(self, tod: float) -> bool:
        return not self.hours or any(_within(tod, a, b) for a, b in self.hours)

    def percent(self, tod: float) -> int:
        return next((p for a, b, p in self.volume if _within(tod, a, b)), 100)

    def as_dict(self) -> dict[str, Any]:
        return {"hours": [[_hm(a), _hm(b) if b < DAY else "24:00"] for a, b in self.hours],
                "volume": [{"from": _hm(a), "to": _hm(b) if b < DAY else "24:00", "percent": p}
                           for a, b, p in self.volume]}


def _within(tod: float, a: int, b: int) -> bool:
    return a <= tod < b if a < b else (tod >= a or tod < b)


def parse_rule(v: Any) -> Rule:
    """An area's `airtime` from the API (AirtimeError naming the field)."""
    if not isinstance(v, dict) or set(v) - {"hours", "volume"}:
        raise AirtimeError(say("airtime.bad_object"), field="airtime")
    hours = v.get("hours") or []
    volume = v.get("volume") or []
    if not isinstance(hours, list) or len(hours) > MAX_ROWS:
        raise AirtimeError(say("airtime.bad_rows", name="airtime.hours", limit=MAX_ROWS),
                           field="airtime.hours")
    if not isinstance(volume, list) or len(volume) > MAX_ROWS:
        raise AirtimeError(say("airtime.bad_rows", name="airtime.volume", limit=MAX_ROWS),
                           field="airtime.volume")
    windows = []
    for i, w in enumerate(hours):
        name = f"airtime.hours[{i}]"
        if not isinstance(w, list) or len(w) != 2:
            raise AirtimeError(say("airtime.bad_window", name=name), field=name)
        a, b = _seconds(w[0], name), _seconds(w[1], name, end=True)
        if a == b:
            raise AirtimeError(say("airtime.bad_window", name=name), field=name)
        windows.append((a, b))
    rows = []
    for i, row in enumerate(volume):
        name = f"airtime.volume[{i}]"
        if not isinstance(row, dict) or set(row) != {"from", "to", "percent"}:
            raise AirtimeError(say("airtime.bad_volume_row", name=name), field=name)
        a, b = _seconds(row["from"], f"{name}.from"), _seconds(row["to"], f"{name}.to", True)
        p = row["percent"]
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 100:
            raise AirtimeError(say("airtime.bad_percent", name=f"{name}.percent"),
                               field=f"{name}.percent")
        if a == b:
            raise AirtimeError(say("airtime.bad_window", name=name), field=name)
        rows.append((a, b, p))
    return Rule(tuple(windows), tuple(rows))


class Airtime:
    """The rules in force per area (inherited down the tree) on the media clock: tick n starts
    at wall time `epoch + n * 20 ms`."""

    def __init__(self, rules: Mapping[str, Rule], epoch: float,
                 tz: dt.tzinfo = LOCAL) -> None:
        self.rules = dict(rules)  # area -> the rule it follows (its own or inherited)
        self.epoch = epoch
        self.tz = tz
        self._distinct = set(self.rules.values())
        self._tod: tuple[int, float] = (-1, 0.0)  # the last tick asked and its local time

    @classmethod
    def of(cls, tree: AreaTree, own: Mapping[str, Rule], epoch: float,
           tz: dt.tzinfo = LOCAL) -> Airtime:
        rules = {}
        for area in tree:
            for code in (area.code, *tree.ancestors(area.code)):
                if code in own:
                    rules[area.code] = own[code]
                    break
        return cls(rules, epoch, tz)

    def local(self, n: int) -> float:
        """Seconds into the local day at the start of tick n (one computation per tick)."""
        if self._tod[0] != n:
            t = self.epoch + n / TICKS_PER_S
            offset = self.tz.utcoffset(dt.datetime.fromtimestamp(t, self.tz))
            self._tod = (n, (t + (offset.total_seconds() if offset else 0.0)) % DAY)
        return self._tod[1]

    def allows(self, code: str, cls: BroadcastClass, n: int) -> bool:
        rule = self.rules.get(code)
        return rule is None or cls not in RESTRICTED or rule.allows(self.local(n))

    def gain(self, code: str, cls: BroadcastClass, n: int) -> float:
        rule = self.rules.get(code)
        if rule is None or cls not in RESTRICTED or not rule.volume:
            return 1.0
        return rule.percent(self.local(n)) / 100

    def by_rule(self) -> dict[Rule, list[str]]:
        out: dict[Rule, list[str]] = {}
        for code, rule in self.rules.items():
            out.setdefault(rule, []).append(code)
        return out

    def state(self, n: int) -> dict[Rule, tuple[bool, int]]:
        """What each distinct rule says at tick n: the engine re-arbitrates the areas of a rule
        whose answer changed since the previous tick, so a boundary takes effect on the first
        tick that starts at or after it, exactly where `allows` and `gain` change."""
        tod = self.local(n)
        return {r: (r.allows(tod), r.percent(tod)) for r in self._distinct}
