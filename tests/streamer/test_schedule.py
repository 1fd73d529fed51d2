"""Schedules: validation, local-time occurrences, conflicts, and the scheduler on the virtual clock.

The engine runs on the VirtualClock and skips idle stretches with `jump_to`, so three days of a
daily 05:00 bulletin take seconds and each airing can be checked to the sample.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from loa.streamer.areas import sample_tree
from loa.streamer.broadcast import Broadcast
from loa.streamer.clock import FRAME, SAMPLE_RATE, VirtualClock, tick_of
from loa.streamer.engine import PCM, Engine
from loa.streamer.schedule import (
    ScheduleError,
    Scheduler,
    find_conflicts,
    occurrences,
    validate_schedule,
)
from loa.streamer.sources import PcmSource

HCM = "Asia/Ho_Chi_Minh"
DAY = 86_400
FADE = 480  # the engine's 10 ms fade
BULLETIN_S = 60
N = BULLETIN_S * SAMPLE_RATE


def local(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, tz: str = HCM) -> float:
    """UTC epoch of a local wall-clock time."""
    return dt.datetime(y, mo, d, h, mi, s, tzinfo=ZoneInfo(tz)).timestamp()


def rec(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "s1", "programme": "p1", "area": "T01-H1",
                            "targets": ["T01-H1"], "class": "normal", "kind": "daily",
                            "time": "05:00"}
    base.update(kw)
    return base


def noise(seconds: float, seed: int = 7, level: float = 0.1) -> PcmSource:
    rng = np.random.default_rng(seed)
    return PcmSource((rng.standard_normal(int(seconds * SAMPLE_RATE)) * level)
                     .astype(np.float32), "bulletin")


class Maker:
    """make_broadcast for one programme; counts its calls."""

    def __init__(self, prog: PcmSource) -> None:
        self.prog = prog
        self.calls = 0
        self.fail = 0  # raise this many times first

    async def __call__(self, s: dict[str, Any], occ: float) -> tuple[Broadcast, float] | None:
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise OSError("media store unreachable")
        return (Broadcast(self.prog.at(0), list(s["targets"]), issuer=s["area"],
                          klass=s["class"], title=f"{s['id']}@{occ:.0f}"), self.prog.seconds)


def make_engine() -> tuple[Engine, VirtualClock]:
    e = Engine(sample_tree())
    return e, VirtualClock(e.tick)


def pcm(sub: Any) -> np.ndarray:
    return np.frombuffer(b"".join(p.data for p in sub.drain()), dtype=np.float32)


# ---- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "field"), [
    ({"time": "25:00"}, "time"),
    ({"time": "05:60"}, "time"),
    ({"time": "5h"}, "time"),
    ({"time": None}, "time"),
    ({"kind": "hourly"}, "kind"),
    ({"kind": None}, "kind"),
    ({"kind": "once"}, "date"),
    ({"kind": "once", "date": "2026-13-01"}, "date"),
    ({"kind": "once", "date": "20261201"}, "date"),
    ({"kind": "weekly"}, "weekdays"),
    ({"kind": "weekly", "weekdays": []}, "weekdays"),
    ({"kind": "weekly", "weekdays": ["mon", "funday"]}, "weekdays"),
    ({"kind": "weekly", "weekdays": ["mon", "Monday"]}, "weekdays"),
    ({"from": "2026-12-10", "until": "2026-12-01"}, "until"),
    ({"from": "10/12/2026"}, "from"),
    ({"tz": "Mars/Olympus_Mons"}, "tz"),
    ({"tz": ""}, "tz"),
    ({"targets": []}, "targets"),
    ({"targets": "T01-H1"}, "targets"),
    ({"class": "urgent"}, "class"),
    ({"enabled": "yes"}, "enabled"),
    ({"programme": ""}, "programme"),
])
def test_each_bad_field_is_named_with_a_bilingual_message(change: dict[str, Any], field: str):
    with pytest.raises(ScheduleError) as ei:
        validate_schedule(rec(**change))
    assert ei.value.field == field
    assert isinstance(ei.value, ValueError)
    vi, en = str(ei.value).split(" / ", 1)
    assert vi and en


def test_missing_kind_is_named():
    r = rec()
    del r["kind"]
    with pytest.raises(ScheduleError) as ei:
        validate_schedule(r)
    assert ei.value.field == "kind"


def test_validation_fills_defaults_and_normalises_weekdays_without_touching_the_input():
    raw = rec(kind="weekly", weekdays=["Thu", "MONDAY"], time="5:00:30", **{"class": "Priority"})
    out = validate_schedule(raw)
    assert out["weekdays"] == ["mon", "thu"]
    assert (out["tz"], out["enabled"], out["from"], out["until"]) == (HCM, True, None, None)
    assert (out["time"], out["class"]) == ("05:00:30", "priority")
    assert raw["weekdays"] == ["Thu", "MONDAY"] and "tz" not in raw
    assert validate_schedule(rec(time="05:00"))["time"] == "05:00"


# ---- occurrences ------------------------------------------------------------------------------

def test_daily_0500_over_three_days_is_2200_utc_the_day_before():
    start = local(2026, 12, 1)
    occ = occurrences(rec(), start, start + 3 * DAY)
    assert occ == [local(2026, 12, d, 5) for d in (1, 2, 3)]
    for t in occ:
        assert dt.datetime.fromtimestamp(t, ZoneInfo(HCM)).time() == dt.time(5, 0, 0)
        u = dt.datetime.fromtimestamp(t, dt.UTC)
        assert (u.hour, u.minute, u.second) == (22, 0, 0)
    assert occ[0] == dt.datetime(2026, 11, 30, 22, tzinfo=dt.UTC).timestamp()


def test_window_is_half_open():
    t = local(2026, 12, 1, 5)
    assert occurrences(rec(), t, t + 1) == [t]
    assert occurrences(rec(), t - 1, t) == []


def test_weekly_mon_thu_over_two_weeks_is_four():
    start = local(2026, 11, 30)  # a Monday
    assert dt.date(2026, 11, 30).weekday() == 0
    occ = occurrences(rec(kind="weekly", weekdays=["mon", "thu"], time="19:30"), start,
                      start + 14 * DAY)
    days = [dt.datetime.fromtimestamp(t, ZoneInfo(HCM)) for t in occ]
    assert [d.date() for d in days] == [dt.date(2026, 11, 30), dt.date(2026, 12, 3),
                                        dt.date(2026, 12, 7), dt.date(2026, 12, 10)]
    assert all(d.time() == dt.time(19, 30) for d in days)


def test_once():
    r = rec(kind="once", date="2026-12-05", time="07:30:15")
    assert occurrences(r, local(2026, 12, 1), local(2026, 12, 31)) == [
        local(2026, 12, 5, 7, 30, 15)]
    assert occurrences(r, local(2026, 12, 6), local(2026, 12, 31)) == []
    assert occurrences({**r, "until": "2026-12-04"}, local(2026, 12, 1), local(2026, 12, 31)) == []


def test_from_and_until_are_inclusive_local_dates():
    r = rec(time="23:30", **{"from": "2026-12-02", "until": "2026-12-04"})
    occ = occurrences(r, local(2026, 12, 1), local(2026, 12, 10))
    assert occ == [local(2026, 12, d, 23, 30) for d in (2, 3, 4)]


def test_local_time_holds_across_a_dst_change_and_a_skipped_time_airs_once():
    berlin = "Europe/Berlin"  # CET -> CEST on 2026-03-29 at 01:00 UTC
    r = rec(time="09:00", tz=berlin)
    occ = occurrences(r, local(2026, 3, 27, tz=berlin), local(2026, 4, 1, tz=berlin))
    assert [dt.datetime.fromtimestamp(t, dt.UTC).hour for t in occ] == [8, 8, 7, 7, 7]
    assert all(dt.datetime.fromtimestamp(t, ZoneInfo(berlin)).hour == 9 for t in occ)
    gap = occurrences(rec(time="02:30", tz=berlin), local(2026, 3, 29, tz=berlin),
                      local(2026, 3, 30, tz=berlin))
    assert [dt.datetime.fromtimestamp(t, ZoneInfo(berlin)).time() for t in gap] == [dt.time(3, 30)]
    back = occurrences(rec(time="02:30", tz=berlin), local(2026, 10, 25, tz=berlin),
                       local(2026, 10, 26, tz=berlin))  # 02:30 happens twice: airs once
    assert len(back) == 1


# ---- conflicts --------------------------------------------------------------------------------

NOW = local(2026, 12, 1)
DUR = {"p1": 60.0, "p2": 60.0}


def test_two_daily_0500_normal_schedules_on_one_area_conflict_at_the_first_airing():
    a, b = rec(id="a"), rec(id="b", programme="p2")
    assert find_conflicts(a, [b], DUR, now=NOW) == [{"schedule": "b", "at": local(2026, 12, 1, 5)}]
    assert find_conflicts(a, [b], lambda p: DUR[p], now=NOW)[0]["schedule"] == "b"


@pytest.mark.parametrize("other", [
    rec(id="b", programme="p2", **{"class": "priority"}),
    rec(id="b", programme="p2", time="06:00"),
    rec(id="b", programme="p2", time="05:01"),  # starts as the first ends: adjacent, no overlap
    rec(id="b", programme="p2", targets=["T01-H2"]),
    rec(id="b", programme="p2", enabled=False),
    rec(id="a", programme="p2"),  # the schedule being edited itself
])
def test_no_conflict(other: dict[str, Any]):
    assert find_conflicts(rec(id="a"), [other], DUR, now=NOW) == []


def test_overlap_inside_the_programme_and_area_coverage():
    a = rec(id="a")
    late = rec(id="b", programme="p2", time="05:00:59")
    assert find_conflicts(a, [late], DUR, now=NOW) == [
        {"schedule": "b", "at": local(2026, 12, 1, 5, 0, 59)}]
    commune = rec(id="c", programme="p2", targets=["T01-H1-X2"])
    assert find_conflicts(a, [commune], DUR, now=NOW) == []
    tree = sample_tree()
    found = find_conflicts(a, [commune], DUR, now=NOW, covers=tree.contains)
    assert [c["schedule"] for c in found] == ["c"]
    # Weekly on Thursday against daily: first clash on the first Thursday in the horizon.
    thu = rec(id="w", programme="p2", kind="weekly", weekdays=["thu"])
    assert find_conflicts(a, [thu], DUR, now=NOW) == [
        {"schedule": "w", "at": local(2026, 12, 3, 5)}]
    # Outside the horizon: none.
    once = rec(id="o", programme="p2", kind="once", date="2027-01-20")
    assert find_conflicts(a, [once], DUR, now=NOW, horizon_days=14) == []


# ---- the scheduler on the virtual clock -------------------------------------------------------

async def simulate(e: Engine, clock: VirtualClock, sched: Scheduler, schedules: list[dict],
                   epoch: float, end: float) -> list[str]:
    """Run from the clock's tick to `end`: a round per simulated second, jumps over idle time."""
    ids: list[str] = []
    while (now := epoch + clock.n * FRAME / SAMPLE_RATE) < end:
        ids += await sched.run_once(now, schedules)
        if e.idle():
            nxt = [t for s in schedules for t in occurrences(s, now, end)]
            target = min(nxt, default=end) - sched.lookahead
            if target > now + 1:
                clock.jump_to(tick_of(target - epoch))
                continue
        clock.run(SAMPLE_RATE // FRAME)  # one simulated second
    return ids


async def test_three_days_of_a_daily_0500_bulletin_air_at_the_exact_sample_each_day():
    e, clock = make_engine()
    sub = e.hub.subscribe("T01-H1-X1", PCM, maxlen=20_000)
    epoch = local(2026, 12, 1)  # media time 0 = 2026-12-01 00:00:00 local
    prog = noise(BULLETIN_S)
    sched = Scheduler(e, epoch, Maker(prog))
    s = rec(targets=["T01-H1"])
    t0 = time.perf_counter()
    ids = await simulate(e, clock, sched, [s], epoch, epoch + 3 * DAY)
    elapsed = time.perf_counter() - t0

    occ = occurrences(s, epoch, epoch + 3 * DAY)
    assert len(ids) == 3 and len(set(ids)) == 3
    expected = [(5 * 3600 + d * DAY) * SAMPLE_RATE for d in range(3)]
    assert [round((t - epoch) * SAMPLE_RATE) for t in occ] == expected
    assert all(x % FRAME == 0 for x in expected)
    x1 = [c for c in e.changes if c.area == "T01-H1-X1"]
    assert [(c.sample, c.after, c.cause) for c in x1 if c.after in ids] == [
        (x, b, "start") for x, b in zip(expected, ids, strict=True)]
    assert [(c.sample, c.before, c.after, c.cause) for c in x1 if c.before in ids] == [
        (x + N, b, None, "finished") for x, b in zip(expected, ids, strict=True)]
    assert len(x1) == 6  # nothing else ever went on air there
    # What the loudspeakers got: the bulletin from its first sample, each day.
    packets = {p.pts: p for p in sub.drain()}
    for x in expected:
        heard = np.frombuffer(b"".join(packets[x + k * FRAME].data for k in range(N // FRAME)),
                              dtype=np.float32)
        np.testing.assert_allclose(heard[FADE:N - FADE], prog.pcm[FADE:N - FADE], atol=1e-6)
        assert x - FRAME not in packets or not np.any(
            np.frombuffer(packets[x - FRAME].data, dtype=np.float32))
    assert elapsed < 30, f"three simulated days took {elapsed:.1f} s"
    print(f"three simulated days: {elapsed:.2f} s, {clock.stats.ticks} ticks rendered")


async def test_restart_30_s_into_the_bulletin_resumes_at_the_exact_sample():
    e, clock = make_engine()
    sub = e.hub.subscribe("T01-H1-X1", PCM, maxlen=10_000)
    epoch = local(2026, 12, 2, 5, 0, 30)  # the server came back 30 s into the 05:00 bulletin
    prog = noise(BULLETIN_S)
    sched = Scheduler(e, epoch, Maker(prog))
    ids = await sched.run_once(epoch, [rec()])
    assert len(ids) == 1
    clock.run(1600)  # 32 s
    x1 = [c for c in e.changes if c.area == "T01-H1-X1"]
    assert [(c.sample, c.before, c.after, c.cause) for c in x1] == [
        (0, None, ids[0], "start"), (30 * SAMPLE_RATE, ids[0], None, "finished")]
    out = pcm(sub)
    assert out.shape[0] == 1600 * FRAME
    off = 30 * SAMPLE_RATE
    k = np.arange(FADE)
    np.testing.assert_allclose(out[:FADE], prog.pcm[off:off + FADE] * (k / FADE), atol=1e-5)
    np.testing.assert_allclose(out[FADE:off - FADE], prog.pcm[off + FADE:N - FADE], atol=1e-6)
    assert not np.any(out[off:])


async def test_restart_between_ticks_starts_on_the_next_tick_where_the_audio_would_be():
    e, clock = make_engine()
    sub = e.hub.subscribe("T01-H1-X1", PCM, maxlen=10_000)
    epoch = local(2026, 12, 2, 5, 0, 30)
    prog = noise(BULLETIN_S)
    sched = Scheduler(e, epoch, Maker(prog))
    clock.run(3)  # the engine is already ticking: the first free tick is 3
    assert await sched.run_once(epoch + 0.013, [rec()])  # 13 ms in: next tick is 1, engine's 3
    clock.run(100)
    on = [c for c in e.changes if c.area == "T01-H1-X1" and c.after is not None]
    assert [c.sample for c in on] == [3 * FRAME]
    out = pcm(sub)
    at = 3 * FRAME  # media sample 2880 = 30.06 s into the bulletin
    src = 30 * SAMPLE_RATE + at
    np.testing.assert_allclose(out[at + FADE:at + 48_000], prog.pcm[src + FADE:src + 48_000],
                               atol=1e-6)


async def test_an_occurrence_already_over_at_restart_airs_nothing():
    e, clock = make_engine()
    epoch = local(2026, 12, 2, 5, 2, 0)  # 05:02 for a 60 s bulletin at 05:00
    maker = Maker(noise(BULLETIN_S))
    sched = Scheduler(e, epoch, maker)
    assert await sched.run_once(epoch, [rec()]) == []
    assert await sched.run_once(epoch + 1, [rec()]) == []
    assert maker.calls == 1  # decided once, not every round
    assert e.idle()
    clock.run(100)
    assert all(c.after is None for c in e.changes)


async def test_run_once_twice_in_the_same_second_submits_once():
    e, clock = make_engine()
    epoch = local(2026, 12, 1, 4, 59, 58)
    maker = Maker(noise(BULLETIN_S))
    sched = Scheduler(e, epoch, maker)
    first = await sched.run_once(epoch, [rec()])
    assert len(first) == 1
    assert await sched.run_once(epoch, [rec()]) == []
    assert await sched.run_once(epoch + 0.5, [rec()]) == []
    assert await sched.run_once(epoch + 1, [rec()]) == []
    assert maker.calls == 1
    clock.run(200)
    on = [c for c in e.changes if c.area == "T01-H1-X1" and c.after is not None]
    assert [(c.sample, c.after) for c in on] == [(2 * SAMPLE_RATE, first[0])]


async def test_a_schedule_disabled_before_its_time_is_withdrawn_from_the_engine():
    e, clock = make_engine()
    epoch = local(2026, 12, 1, 4, 59, 57)
    sched = Scheduler(e, epoch, Maker(noise(BULLETIN_S)))
    assert await sched.run_once(epoch, [rec()])
    clock.run(50)
    assert await sched.run_once(epoch + 1, [rec(enabled=False)]) == []
    clock.run(200)
    assert all(c.after is None for c in e.changes)
    assert e.idle()


async def test_a_failing_make_broadcast_is_logged_and_retried_next_round(caplog):
    e, _ = make_engine()
    epoch = local(2026, 12, 1, 4, 59, 57)
    maker = Maker(noise(BULLETIN_S))
    maker.fail = 1
    sched = Scheduler(e, epoch, maker)
    with caplog.at_level(logging.ERROR, logger="loa.schedule"):
        assert await sched.run_once(epoch, [rec()]) == []
    assert any("schedule_error" in r.getMessage() for r in caplog.records)
    assert len(await sched.run_once(epoch + 1, [rec()])) == 1


async def test_invalid_and_disabled_schedules_are_skipped_without_stopping_the_others(caplog):
    e, _ = make_engine()
    epoch = local(2026, 12, 1, 4, 59, 57)
    sched = Scheduler(e, epoch, Maker(noise(BULLETIN_S)))
    bad = rec(id="bad", time="29:00")
    off = rec(id="off", enabled=False)
    with caplog.at_level(logging.WARNING, logger="loa.schedule"):
        ids = await sched.run_once(epoch, [bad, off, rec(id="ok")])
        await sched.run_once(epoch + 1, [bad, off, rec(id="ok")])
    assert len(ids) == 1 and list(sched.handled) == [("ok", local(2026, 12, 1, 5))]
    assert sum("schedule_invalid" in r.getMessage() for r in caplog.records) == 1


async def test_run_survives_a_failing_round_keeps_its_period_and_is_cancellable(caplog):
    e, _ = make_engine()
    epoch = local(2026, 12, 1, 4, 59, 57)
    sched = Scheduler(e, epoch, Maker(noise(BULLETIN_S)))
    calls = 0

    async def store() -> list[dict[str, Any]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("store down")
        return [rec()]

    with caplog.at_level(logging.ERROR, logger="loa.schedule"):
        task = asyncio.create_task(sched.run(store, wall=lambda: epoch, period=0.02))
        await asyncio.sleep(0.21)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert any("schedule_round_error" in r.getMessage() for r in caplog.records)
    assert 3 <= calls <= 13  # ~11 rounds on 20 ms deadlines, never more (no burst)
    assert len(sched.handled) == 1 and all(sched.handled.values())
