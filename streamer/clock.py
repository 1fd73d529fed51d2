"""The media clock: one tick every 20 ms on absolute deadlines (t0 + n x 20 ms).

`RealClock` drives a tick function from a dedicated thread so that mixing and encoding never wait
behind a busy event loop; deadlines are on `time.monotonic()`, the clock `loop.time()` uses.
`VirtualClock` runs the same tick function as fast as the CPU allows, for tests and benchmarks: an
hour of schedule renders in seconds and a test can name the exact sample where something happens.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

SAMPLE_RATE = 48_000
FRAME = 960  # samples per tick (20 ms at 48 kHz)
TICK = FRAME / SAMPLE_RATE

log = logging.getLogger("loa.clock")

TickFn = Callable[[int], None]


@dataclass
class ClockStats:
    ticks: int = 0
    late_ticks: int = 0  # ticks that started more than `late_threshold` after their deadline
    max_lateness_ms: float = 0.0
    skipped_ticks: int = 0  # ticks given up after a stall longer than `max_catchup`
    last_lateness_ms: float = 0.0

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def tick_of(seconds: float) -> int:
    """The first tick at or after `seconds` of media time."""
    return -int(-round(seconds * SAMPLE_RATE) // FRAME)


class VirtualClock:
    """Runs ticks back to back; media time is whatever tick the engine is on."""

    def __init__(self, tick_fn: TickFn, start_tick: int = 0) -> None:
        self.tick_fn = tick_fn
        self.n = start_tick
        self.stats = ClockStats()

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.tick_fn(self.n)
            self.n += 1
            self.stats.ticks += 1

    def run_until(self, seconds: float) -> None:
        self.run(max(0, tick_of(seconds) - self.n))

    def jump_to(self, tick: int) -> None:
        """Skip ahead without rendering (only when nothing is on air: see Engine.idle)."""
        if tick < self.n:
            raise ValueError("the media clock only moves forward")
        self.n = tick


class RealClock:
    """Calls `tick_fn(n)` at t0 + n x TICK from its own thread.

    A tick that starts late is counted; after a stall longer than `max_catchup` ticks the clock
    jumps forward instead of racing to catch up (a burst of catch-up ticks would only pile audio
    into listeners' buffers and starve the CPU, Liquidsoap's "we must catchup" problem).
    """

    def __init__(
        self,
        tick_fn: TickFn,
        *,
        late_threshold: float = 0.005,
        max_catchup: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tick_fn = tick_fn
        self.late_threshold = late_threshold
        self.max_catchup = max_catchup
        self.clock = clock
        self.stats = ClockStats()
        self.n = 0
        self.t0 = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tick_times: list[float] | None = None  # set to [] to record start times (tests)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self.t0 = self.clock()  # set before the thread runs: callers map wall time to it at once
        self._thread = threading.Thread(target=self._run, name="loa-media-clock", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def media_time(self) -> float:
        return self.n * TICK

    def _run(self) -> None:
        base_tick = self.n
        while not self._stop.is_set():
            deadline = self.t0 + (self.n - base_tick) * TICK
            now = self.clock()
            if deadline > now:
                # One timed wait: Linux wakes a thread ~0.1 ms late, well inside a tick, and
                # polling the last half millisecond costs more CPU than all of that is worth.
                if self._stop.wait(deadline - now):
                    break
                now = self.clock()
            lateness = now - deadline
            if lateness > self.max_catchup * TICK:
                behind = int(lateness / TICK)
                self.stats.skipped_ticks += behind
                log.warning("clock stalled event=clock_jump behind_ticks=%d", behind)
                self.t0 += behind * TICK
                lateness -= behind * TICK
            self.stats.last_lateness_ms = lateness * 1000
            if lateness > self.late_threshold:
                self.stats.late_ticks += 1
            self.stats.max_lateness_ms = max(self.stats.max_lateness_ms, lateness * 1000)
            if self.tick_times is not None:
                self.tick_times.append(now)
            try:
                self.tick_fn(self.n)
            except Exception:  # the clock must survive any tick failure
                log.exception("tick failed event=tick_error n=%d", self.n)
            self.n += 1
            self.stats.ticks += 1


class LoopLagMonitor:
    """Measures how late the asyncio event loop runs a timer (what every socket waits on)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.last_ms = 0.0
        self.max_ms = 0.0
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            deadline += self.interval
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            lag = max(0.0, loop.time() - deadline)
            self.last_ms = lag * 1000
            self.max_ms = max(self.max_ms, self.last_ms)
            self.samples += 1
            if lag > self.interval:
                deadline = loop.time()

    def as_dict(self) -> dict[str, float]:
        return {"loop_lag_ms": self.last_ms, "loop_lag_max_ms": self.max_ms}
