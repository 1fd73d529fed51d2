"""Schedules: when a programme airs, and the loop that hands each occurrence to the engine.

A schedule is a plain dict (it lives in the store). Times are local wall-clock times in the
schedule's zone: "05:00" means 05:00 on the loudspeakers' clocks whatever the server's zone is, so
occurrences are computed from local dates with `zoneinfo` and only then turned into UTC epochs.

The `Scheduler` submits each occurrence a few seconds ahead with an exact media start, so it goes
on air at the exact tick of its time. After a restart in the middle of a programme it submits the
programme at once, cut to the sample where it would be had there been no restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from loa.streamer.broadcast import Broadcast, BroadcastClass
from loa.streamer.clock import FRAME, SAMPLE_RATE, tick_of
from loa.streamer.engine import Engine
from loa.streamer.errors import LoaError
from loa.streamer.messages import say

log = logging.getLogger("loa.schedule")

Schedule = dict[str, Any]
DEFAULT_TZ = "Asia/Ho_Chi_Minh"
KINDS = ("once", "daily", "weekly")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = date.weekday()
_FULL_DAYS = {d: d[:3] for d in ("monday", "tuesday", "wednesday", "thursday", "friday",
                                 "saturday", "sunday")}
_TIME = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
DAY = 86_400.0

Durations = Mapping[str, float] | Callable[[str], float]
Covers = Callable[[str, str], bool]
MakeBroadcast = Callable[[Schedule, float], Awaitable[tuple[Broadcast, float] | None]]


class ScheduleError(LoaError, ValueError):
    """An invalid schedule; `field` names the offending field so a form can point at it."""

    field: str

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, field=field)


def _time(value: object) -> dt.time:
    m = _TIME.fullmatch(value) if isinstance(value, str) else None
    if m is None:
        raise ScheduleError("time", say("schedule.time_format", value=value))
    h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    if h > 23 or mi > 59 or s > 59:
        raise ScheduleError("time", say("schedule.time", value=value))
    return dt.time(h, mi, s)


def _date(field: str, value: object) -> dt.date:
    # fullmatch first: Python 3.11's fromisoformat also takes "20261201" and week dates.
    if isinstance(value, str) and _DATE.fullmatch(value):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    raise ScheduleError(field, say("schedule.date", field=field, value=value))


def _zone(value: object) -> ZoneInfo:
    try:
        if isinstance(value, str) and value:
            return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        pass
    raise ScheduleError("tz", say("schedule.tz", value=value))


def _nonempty_str(rec: Mapping[str, Any], field: str, message: str) -> str:
    value = rec.get(field)
    if not isinstance(value, str) or not value.strip():
        raise ScheduleError(field, message)
    return value.strip()


def validate_schedule(rec: Mapping[str, Any]) -> Schedule:
    """A normalised copy (defaults filled, weekdays as mon..sun) or ScheduleError naming the field.

    Unknown keys are kept: the store may add its own (version, timestamps).
    """
    out: Schedule = dict(rec)
    out["programme"] = _nonempty_str(rec, "programme", say("schedule.no_programme"))
    out["area"] = _nonempty_str(rec, "area", say("schedule.no_area"))

    targets = rec.get("targets")
    if (not isinstance(targets, list | tuple) or not targets
            or not all(isinstance(t, str) and t.strip() for t in targets)):
        raise ScheduleError("targets", say("schedule.targets"))
    out["targets"] = list(dict.fromkeys(t.strip() for t in targets))

    klass = rec.get("class", "normal")
    try:
        if not isinstance(klass, str | int) or isinstance(klass, bool):
            raise ValueError(klass)
        out["class"] = BroadcastClass.parse(klass).name
    except ValueError:
        raise ScheduleError("class", say("class.bad", value=klass)) from None

    kind = rec.get("kind")
    if kind not in KINDS:
        raise ScheduleError("kind", say("schedule.kind", value=kind))
    t = _time(rec.get("time"))
    out["time"] = t.strftime("%H:%M:%S" if t.second else "%H:%M")

    if kind == "once":
        if rec.get("date") is None:
            raise ScheduleError("date", say("schedule.once_date"))
        out["date"] = _date("date", rec["date"]).isoformat()
    if kind == "weekly":
        days = rec.get("weekdays")
        if not isinstance(days, list | tuple) or not days:
            raise ScheduleError("weekdays", say("schedule.weekly_days"))
        norm: list[str] = []
        for d in days:
            key = d.strip().lower() if isinstance(d, str) else ""
            key = _FULL_DAYS.get(key, key)
            if key not in WEEKDAYS:
                raise ScheduleError("weekdays", say("schedule.weekday", value=d))
            if key in norm:
                raise ScheduleError("weekdays", say("schedule.weekday_repeated", value=d))
            norm.append(key)
        out["weekdays"] = sorted(norm, key=WEEKDAYS.index)

    bounds: dict[str, dt.date | None] = {}
    for f in ("from", "until"):
        v = rec.get(f)
        d = None if v is None else _date(f, v)
        bounds[f] = d
        out[f] = None if d is None else d.isoformat()
    lo, hi = bounds["from"], bounds["until"]
    if lo is not None and hi is not None and hi < lo:
        raise ScheduleError("until", say("schedule.until_before_from"))

    tz = rec.get("tz")
    out["tz"] = DEFAULT_TZ if tz is None else tz
    _zone(out["tz"])
    enabled = rec.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ScheduleError("enabled", say("schedule.enabled", value=enabled))
    out["enabled"] = enabled
    return out


def _airs_on(rec: Schedule, day: dt.date) -> bool:
    lo, hi = rec.get("from"), rec.get("until")
    if lo is not None and day < dt.date.fromisoformat(lo):
        return False
    if hi is not None and day > dt.date.fromisoformat(hi):
        return False
    kind = rec["kind"]
    if kind == "once":
        return day == dt.date.fromisoformat(rec["date"])
    if kind == "weekly":
        return WEEKDAYS[day.weekday()] in rec["weekdays"]
    return True


def occurrences(rec: Mapping[str, Any], start: float, end: float) -> list[float]:
    """UTC epoch seconds of every occurrence in [start, end), ascending.

    Each candidate local date is combined with the local time in the schedule's zone: across a
    DST change "09:00" stays 09:00 local. A time skipped by a spring-forward gap airs at the same
    distance after the gap (zoneinfo's fold=0); a repeated one airs once, at its first instance.
    """
    r = validate_schedule(rec)
    if end <= start:
        return []
    zone = _zone(r["tz"])
    at = _time(r["time"])
    if r["kind"] == "once":
        days: Iterable[dt.date] = [dt.date.fromisoformat(r["date"])]
    else:
        # One day of slack each side covers any UTC offset.
        first = dt.datetime.fromtimestamp(start, zone).date() - dt.timedelta(days=1)
        last = dt.datetime.fromtimestamp(end, zone).date() + dt.timedelta(days=1)
        days = (first + dt.timedelta(days=i) for i in range((last - first).days + 1))
    out = []
    for day in days:
        if not _airs_on(r, day):
            continue
        ts = dt.datetime.combine(day, at, tzinfo=zone).timestamp()
        if start <= ts < end:
            out.append(ts)
    return sorted(set(out))


def _duration_of(durations: Durations, programme: str) -> float:
    if callable(durations):
        return float(durations(programme))
    return float(durations.get(programme, 0.0))


def _overlap(a: float, da: float, b: float, db: float) -> bool:
    # Two starts at the same instant always clash, whatever the (possibly unknown) durations.
    return a == b or (a < b + db and b < a + da)


def find_conflicts(new: Mapping[str, Any], existing: Iterable[Mapping[str, Any]],
                   durations: Durations, horizon_days: float = 14, now: float | None = None,
                   covers: Covers | None = None) -> list[dict[str, Any]]:
    """Enabled schedules of the same class on a shared area whose airings overlap `new`'s.

    Within [now, now + horizon_days). Equal classes are what collide: a higher class simply
    preempts a lower one, which is the engine's job, not a conflict. `durations` maps a programme
    id to seconds (missing: 0). `covers(a, b)` says area a contains area b (default: equality).
    Returns `{"schedule": id, "at": epoch of the first overlap}`, earliest first. `new` itself
    (same id) is skipped, so an edited schedule does not clash with its old version.
    """
    n = validate_schedule(new)
    if not n["enabled"]:
        return []
    t0 = time.time() if now is None else now
    t1 = t0 + horizon_days * DAY

    def shared(a: list[str], b: list[str]) -> bool:
        return any(x == y or (covers is not None and (covers(x, y) or covers(y, x)))
                   for x in a for y in b)

    dn = _duration_of(durations, n["programme"])
    mine = occurrences(n, t0, t1)
    out: list[dict[str, Any]] = []
    for raw in existing:
        try:
            e = validate_schedule(raw)
        except ScheduleError as err:
            log.warning("invalid schedule skipped event=schedule_invalid id=%s field=%s",
                        raw.get("id"), err.field)
            continue
        if (not e["enabled"] or (n.get("id") is not None and e.get("id") == n.get("id"))
                or e["class"] != n["class"] or not shared(n["targets"], e["targets"])):
            continue
        de = _duration_of(durations, e["programme"])
        # Theirs may have begun before the horizon and still be on air inside it.
        theirs = occurrences(e, t0 - de, t1)
        first = min((max(a, b) for a in mine for b in theirs if _overlap(a, dn, b, de)),
                    default=None)
        if first is not None:
            out.append({"schedule": e.get("id"), "at": first})
    return sorted(out, key=lambda c: c["at"])


class Scheduler:
    """Drives the engine from schedules, one idempotent round at a time.

    `media_epoch` is the UTC epoch second of media time 0 (the clock's tick 0). Each round looks
    at occurrences in [now - max_lookback, now + lookahead): a coming one is submitted with its
    exact media start; one that began before `now` (a restart) and is not over yet is submitted
    at the next tick, its source cut to where it would be at that tick. `make_broadcast` returns
    the Broadcast (its source at its beginning) and the programme's duration in seconds, or None
    when the programme cannot air. Each (schedule id, occurrence) is handled once.
    """

    def __init__(self, engine: Engine, media_epoch: float, make_broadcast: MakeBroadcast,
                 lookahead: float = 5.0, max_lookback: float = 6 * 3600) -> None:
        self.engine = engine
        self.media_epoch = media_epoch
        self.make_broadcast = make_broadcast
        self.lookahead = lookahead
        self.max_lookback = max_lookback
        # (schedule id, occurrence) -> engine broadcast id, or None when it was skipped.
        self.handled: dict[tuple[str, float], str | None] = {}
        self._invalid: dict[str, str] = {}  # schedule id -> field last reported as invalid

    def _next_tick(self) -> int:
        return self.engine.next_tick

    async def run_once(self, now: float, schedules: Iterable[Mapping[str, Any]], *,
                       margin: float = 0.0) -> list[str]:
        """One round at wall time `now`. Returns the engine ids submitted.

        `margin` (seconds) pushes a resumed start that much past the engine's next tick: with a
        real clock ticking in its own thread the engine may move on before it sees the command.
        """
        lo, hi = now - self.max_lookback, now + self.lookahead
        wanted: set[tuple[str, float]] = set()
        submitted: list[str] = []
        for raw in schedules:
            sid = str(raw.get("id"))
            try:
                rec = validate_schedule(raw)
            except ScheduleError as err:
                if self._invalid.get(sid) != err.field:  # say it once, not every second
                    self._invalid[sid] = err.field
                    log.warning("invalid schedule skipped event=schedule_invalid id=%s field=%s "
                                "error=%s", sid, err.field, err)
                continue
            self._invalid.pop(sid, None)
            if not rec["enabled"]:
                continue
            for occ in occurrences(rec, lo, hi):
                key = (sid, occ)
                wanted.add(key)
                if key in self.handled:
                    continue
                try:
                    bid = await self._submit(rec, occ, now, margin)
                except Exception:  # one bad programme must not hold up the others
                    log.exception("schedule submit failed event=schedule_error id=%s at=%s",
                                  sid, occ)
                    continue  # not marked handled: retried next round
                self.handled[key] = bid
                if bid is not None:
                    submitted.append(bid)
        self._withdraw(now, wanted)
        self._prune(now)
        return submitted

    async def _submit(self, rec: Schedule, occ: float, now: float, margin: float) -> str | None:
        made = await self.make_broadcast(rec, occ)
        if made is None:
            log.info("programme cannot air event=schedule_skip id=%s programme=%s at=%s",
                     rec.get("id"), rec["programme"], occ)
            return None
        b, duration = made
        if b.source.length is None and duration <= 0:
            log.warning("endless source without a duration event=schedule_skip id=%s "
                        "programme=%s", rec.get("id"), rec["programme"])
            return None
        rel = occ - self.media_epoch  # media seconds of the occurrence
        if occ >= now:
            start, offset = rel, 0
        else:
            if now >= occ + duration:
                log.info("occurrence already over event=schedule_missed id=%s at=%s", rec.get("id"),
                         occ)
                return None
            # Resume: start on a known tick and cut the source to where it is at that tick.
            tick = max(tick_of(now - self.media_epoch), self._next_tick() + tick_of(margin))
            start = tick * FRAME / SAMPLE_RATE
            offset = tick * FRAME - round(rel * SAMPLE_RATE)
            length = b.source.length
            if offset >= duration * SAMPLE_RATE or (length is not None and offset >= length):
                return None
        source = b.source.at(offset) if offset and b.source.seekable else b.source
        # A finite source ends by itself; an endless one (a relay) is bounded by the duration.
        end = start + duration - offset / SAMPLE_RATE if source.length is None else None
        b = dataclasses.replace(b, source=source, start=start, end=end)
        bid = str(self.engine.start(b))
        log.info("schedule submitted event=schedule_submit id=%s programme=%s broadcast=%s at=%s "
                 "media_start=%.2f offset=%d", rec.get("id"), rec["programme"], bid, occ, start,
                 offset)
        return bid

    def _withdraw(self, now: float, wanted: set[tuple[str, float]]) -> None:
        """Stop submitted-but-not-yet-aired occurrences whose schedule changed or went away."""
        for key, bid in list(self.handled.items()):
            if key[1] <= now or key in wanted:
                continue
            del self.handled[key]
            if bid is None:
                continue
            try:
                self.engine.stop(bid, cause="withdrawn")
                log.info("schedule withdrawn event=schedule_withdraw id=%s broadcast=%s at=%s",
                         key[0], bid, key[1])
            except KeyError:
                pass

    def _prune(self, now: float) -> None:
        # Margin of a day: a wall clock stepped back must not resubmit what already aired.
        old = now - self.max_lookback - DAY
        for key in [k for k in self.handled if k[1] < old]:
            del self.handled[key]

    async def run(self, store_schedules: Callable[[], Awaitable[Iterable[Mapping[str, Any]]]],
                  wall: Callable[[], float] = time.time, period: float = 1.0, *,
                  margin: float = 0.1) -> None:
        """The real-time loop: a round every `period` on absolute `loop.time()` deadlines.

        A failed round is logged and the next one runs on time; rounds missed behind a slow store
        are skipped, not run in a burst. Ends only when cancelled.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            try:
                schedules = await store_schedules()
                await self.run_once(wall(), schedules, margin=margin)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("schedule round failed event=schedule_round_error")
            deadline += period
            late = loop.time() - deadline
            if late > 0:
                deadline += period * (int(late // period) + 1)
            await asyncio.sleep(max(0.0, deadline - loop.time()))
