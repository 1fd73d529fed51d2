"""Outage history: every online / offline / fault interval of every device, kept durably, and
what the availability and device-condition reports compute from it.

The device manager tells `DeviceHistory.on_status` of each status change and of each new
connection (`DeviceManager.status_listeners`); everything else happens here, off the hot path:

- The open interval of each device is a record (`device_interval`, id = the device): status,
  start, cause, faults, and the device's area then.
- A closed interval goes to the log `device_intervals`, cut at local month starts
  (Asia/Ho_Chi_Minh), one entry per piece with `ts` = the piece's start and `id` = device:start:
  `read_log(since=month start, until=month end)` is then exactly one month, and a retried append
  adds nothing. Connections are `connect` entries of the same log (a reboot or a reconnect).
- Signal strength is sampled from the telemetry the manager holds in memory every
  `sample_interval` and folded into one record per device and month (`device_month`).

Writes go through one ordered queue and one task, retried with backoff while the store is
unavailable, so a status change never waits for the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from loa.relay.devices.manager import Device, DeviceManager
from loa.relay.devices.writer import WRITER_STOP_TIMEOUT, Writer
from loa.streamer.alerts import Alert, Alerts
from loa.streamer.areas import AreaTree
from loa.streamer.messages import say
from loa.streamer.state.store import Record, Store

log = logging.getLogger("loa.devices")

TZ = ZoneInfo("Asia/Ho_Chi_Minh")
OPEN = "device_interval"  # store kind: the open interval of a device (id = device)
MONTHS = "device_month"  # store kind: signal per device and month (id = device:YYYY-MM)
LOG = "device_intervals"  # log: closed interval pieces and connections
MAX_QUEUED = 100_000  # writes held while the store is down; the oldest are dropped beyond
MAX_READ = 10_000_000


# ---- local months ---------------------------------------------------------------------------
def month_of(ts: float) -> str:
    # Vietnam's offsets have always been whole hours: a month starts on a UTC hour, so the
    # hour decides (a sample of 10,000 devices asks 10,000 times, mostly for one hour).
    return _month_of_hour(int(ts // 3600))


@lru_cache(maxsize=64)
def _month_of_hour(hour: int) -> str:
    return datetime.fromtimestamp(hour * 3600, TZ).strftime("%Y-%m")


def month_bounds(month: str) -> tuple[float, float]:
    """(start, end) epoch seconds of a local month "YYYY-MM"; ValueError if malformed."""
    if len(month) != 7 or month[4] != "-" or not (month[:4] + month[5:]).isdigit():
        raise ValueError(f"not a month: {month!r}")
    return _bounds(int(month[:4]), int(month[5:]))


def _bounds(year: int, month: int) -> tuple[float, float]:
    start = datetime(year, month, 1, tzinfo=TZ)  # ValueError for month 13
    nxt = datetime(year + 1, 1, 1, tzinfo=TZ) if month == 12 else \
        datetime(year, month + 1, 1, tzinfo=TZ)
    return start.timestamp(), nxt.timestamp()


def pieces(start: float, end: float) -> list[tuple[float, float]]:
    """[start, end) cut at every local month start inside it."""
    out = []
    while True:
        local = datetime.fromtimestamp(start, TZ)
        _, month_end = _bounds(local.year, local.month)
        if end <= month_end:
            out.append((start, end))
            return out
        out.append((start, month_end))
        start = month_end


# ---- recording ------------------------------------------------------------------------------
class DeviceHistory:
    """Records the intervals of the devices this node serves (see the module's docstring)."""

    def __init__(self, store: Store, devices: DeviceManager | None = None,
                 sample_interval: float = 300.0) -> None:
        self.store = store
        self.devices = devices  # the DeviceManager whose telemetry is sampled (None: none)
        self.sample_interval = sample_interval
        self.open: dict[str, Record] = {}
        self.restored: set[str] = set()  # devices whose open interval was stored before start
        self._queue: deque[Record] = deque()
        self._wake = asyncio.Event()
        self._opens = Writer(store, OPEN)
        self._months = Writer(store, MONTHS)
        self._month_recs: dict[str, Record] = {}
        self._task: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.stats = {"intervals": 0, "connects": 0, "dropped": 0, "retries": 0}

    async def start(self) -> None:
        """Load the open intervals; open one for a device that has none (first start) or whose
        status changed while nothing recorded it (a crash between the change and its write)."""
        for rec in await self.store.find(OPEN):
            self.open[rec["id"]] = rec
            self.restored.add(rec["id"])
        now = time.time()
        for dev in self._served():
            cur = self.open.get(dev.id)
            if cur is None and not dev.record.get("last_seen"):
                continue  # never connected yet (not installed): its history starts then
            if cur is None or cur["status"] != dev.status:
                self._switch(dev.id, dev.record["area"], dev.status, "start",
                             list(dev.record.get("faults") or []), now)
        loop = asyncio.get_running_loop()
        self._opens.start()
        self._months.start()
        self._task = loop.create_task(self._run())
        if self.devices is not None:
            self._sampler = loop.create_task(self._sample_every())

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
            self.sample()
        if self._task is not None:
            try:
                await asyncio.wait_for(self.flush(), WRITER_STOP_TIMEOUT)
            except TimeoutError:
                log.error("history writes left at shutdown event=history_store_error "
                          "pending=%d", len(self._queue))
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._opens.stop()
        await self._months.stop()

    def _served(self) -> list[Device]:
        """The devices whose history this node keeps: not those another node of a cluster
        serves (that node records and clears them)."""
        if self.devices is None:
            return []
        return [d for d in self.devices.devices.values() if not self.devices.remote(d)]

    def raise_open(self, alerts: Alerts) -> None:
        """After a restart: the alerts of the outages and faults that were open before it,
        with their start, so notifiers see them (and send nothing twice: same ids)."""
        for dev in self._served():
            cur = self.open.get(dev.id)
            if dev.id in self.restored and cur is not None and cur["status"] != "online":
                raise_device_alert(alerts, dev.id, dev.record.get("name") or dev.id,
                                   cur["area"], cur["status"], cur.get("faults", []),
                                   cur["start"], cur["cause"])

    def on_status(self, ev: dict[str, Any]) -> None:
        """A manager status event ({device, area, status, previous, reason, faults, ts}); one
        whose status equals `previous` is a new connection of a device that stayed online."""
        ts = float(ev.get("ts") or time.time())
        if ev["reason"] == "connected":
            self._connect(ev["device"], ev["area"], ts)
        if ev["status"] != ev.get("previous") or ev["device"] not in self.open:
            self._switch(ev["device"], ev["area"], ev["status"], ev["reason"],
                         list(ev.get("faults") or []), ts)

    def _connect(self, device: str, area: str, ts: float) -> None:
        self.stats["connects"] += 1
        self._put({"id": f"{device}:c:{ts:.6f}", "type": "connect", "device": device,
                   "area": area, "ts": ts})

    def _switch(self, device: str, area: str, status: str, cause: str, faults: list[str],
                ts: float) -> None:
        """Close the device's open interval at `ts` and open one of `status`."""
        cur = self.open.get(device)
        if cur is not None and ts > cur["start"]:
            self.stats["intervals"] += 1
            for a, b in pieces(cur["start"], ts):
                self._put({"id": f"{device}:{a:.6f}", "type": "interval", "device": device,
                           "area": cur["area"], "status": cur["status"], "start": a, "end": b,
                           "ts": a, "cause": cur["cause"] if a == cur["start"] else "month",
                           "end_cause": cause, "faults": cur.get("faults", [])})
        rec = {"id": device, "device": device, "area": area, "status": status, "start": ts,
               "cause": cause, "faults": faults}
        self.open[device] = rec
        self._opens.mark(rec)

    def _put(self, entry: Record) -> None:
        if len(self._queue) >= MAX_QUEUED:
            self._queue.popleft()
            self.stats["dropped"] += 1
        self._queue.append(entry)
        self._idle.clear()
        self._wake.set()

    async def flush(self) -> None:
        """Wait until every queued write is in the store."""
        await self._idle.wait()
        await self._opens.flush()
        await self._months.flush()

    async def _run(self) -> None:
        delay = 0.5
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                try:
                    await self.store.append(LOG, self._queue[0])
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - the store comes back: keep the order
                    self.stats["retries"] += 1
                    log.warning("history write failed event=history_store_error error=%s", e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                delay = 0.5
                self._queue.popleft()
            self._idle.set()

    # ---- signal and faults, sampled from memory ------------------------------------------
    async def _sample_every(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            deadline += self.sample_interval
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            try:
                self.sample()
            except Exception:
                log.exception("history sample failed event=history_sample_error")

    def sample(self) -> None:
        """Fold each served device's latest signal into its month, and the faults it reports
        now into its open interval."""
        for dev in self.devices.devices.values() if self.devices is not None else ():
            tele = dev.telemetry
            if dev.link is None or not tele:
                continue
            cur = self.open.get(dev.id)
            faults = tele.get("faults") or []
            if cur is not None and not set(faults) <= set(cur.get("faults", [])):
                cur["faults"] = list(dict.fromkeys([*cur.get("faults", []), *faults]))
                self._opens.mark(cur)
            dbm = (tele.get("network") or {}).get("signal_dbm")
            if dbm is not None:
                self.add_signal(dev.id, dev.record["area"], float(dbm), float(tele["at"]))

    def add_signal(self, device: str, area: str, dbm: float, ts: float) -> None:
        month = month_of(ts)
        rid = f"{device}:{month}"
        rec = self._month_recs.get(rid)
        if rec is None or rec.get("last_at") == ts:
            if rec is not None:
                return  # the same heartbeat again
            rec = self._month_recs[rid] = {"id": rid, "device": device, "area": area,
                                           "month": month, "n": 0, "sum": 0.0,
                                           "min": dbm, "max": dbm}
        rec.update(n=rec["n"] + 1, sum=rec["sum"] + dbm, min=min(rec["min"], dbm),
                   max=max(rec["max"], dbm), last=dbm, last_at=ts, area=area)
        self._months.mark(dict(rec))
        if len(self._month_recs) > 4 * max(1, len(self.open)):  # old months: stored already
            for k in [k for k, r in self._month_recs.items() if r["month"] != month]:
                del self._month_recs[k]


# ---- alerts -------------------------------------------------------------------------------------
def device_alerts(alerts: Alerts) -> Any:
    """A status listener raising and clearing `device_offline` and `device_fault`."""
    def on_status(ev: dict[str, Any]) -> None:
        if ev["status"] != ev.get("previous"):
            raise_device_alert(alerts, ev["device"], ev.get("name") or ev["device"], ev["area"],
                               ev["status"], list(ev.get("faults") or []),
                               float(ev.get("ts") or time.time()), ev["reason"])
    return on_status


def raise_device_alert(alerts: Alerts, device: str, name: str, area: str, status: str,
                       faults: list[str], since: float, reason: str) -> None:
    if status == "offline":
        alerts.raise_(Alert("device_offline", device, area,
                            say("alert.device_offline", name=name, area=area), "critical",
                            {"reason": reason}, since=since))
    else:
        alerts.clear("device_offline", device)
    if status == "fault":
        alerts.raise_(Alert("device_fault", device, area,
                            say("alert.device_fault", name=name, area=area,
                                faults=", ".join(faults)), "warning",
                            {"faults": faults}, since=since))
    else:
        alerts.clear("device_fault", device)


# ---- the reports ----------------------------------------------------------------------------
STATUSES = ("online", "fault", "offline")


@dataclass
class Tally:
    """One device's (or area's) month: seconds per status, connections, faults seen."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0.0))
    connects: int = 0
    outages: int = 0  # intervals offline
    faults: dict[str, int] = field(default_factory=dict)  # fault -> intervals showing it

    @property
    def known(self) -> float:
        return sum(self.seconds.values())

    def availability(self) -> float | None:
        """Share of the recorded time the device was online (a fault or offline is not)."""
        return round(self.seconds["online"] / self.known, 6) if self.known else None

    def add(self, other: Tally) -> None:
        for s in STATUSES:
            self.seconds[s] += other.seconds[s]
        self.connects += other.connects
        self.outages += other.outages
        for f, n in other.faults.items():
            self.faults[f] = self.faults.get(f, 0) + n


async def month_entries(store: Store, month: str) -> list[Record]:
    start, end = month_bounds(month)
    return await store.read_log(LOG, since=start, until=end, limit=MAX_READ)


def tally_month(entries: Iterable[Record], open_now: Iterable[Record], month: str,
                now: float) -> tuple[dict[str, Tally], dict[str, str]]:
    """Per device: its month's tally from the closed pieces and its open interval (counted up
    to `now` or the month's end); and the area each device was last recorded in."""
    start, end = month_bounds(month)
    out: dict[str, Tally] = {}
    areas: dict[str, str] = {}

    def count(rec: Record, a: float, b: float) -> None:
        t = out.setdefault(rec["device"], Tally())
        areas[rec["device"]] = rec["area"]
        a, b = max(a, start), min(b, end)
        if b > a:
            t.seconds[rec["status"]] += b - a
        if rec["status"] == "offline" and rec.get("cause") != "month":
            t.outages += 1
        if rec["status"] == "fault" and rec.get("cause") != "month":
            for f in rec.get("faults", []):
                t.faults[f] = t.faults.get(f, 0) + 1

    for e in sorted(entries, key=lambda e: e["ts"]):
        if e.get("type") == "connect":
            out.setdefault(e["device"], Tally()).connects += 1
            areas.setdefault(e["device"], e["area"])
        elif e.get("type") == "interval":
            count(e, e["start"], e["end"])
    for rec in open_now:
        if rec["start"] < end and now > start:
            # An interval open since an earlier month is a continuation here.
            count({**rec, "cause": rec["cause"] if rec["start"] >= start else "month"},
                  rec["start"], min(now, end))
    return out, areas


def roll_up(tallies: dict[str, Tally], areas: dict[str, str], tree: AreaTree,
            inside: set[str]) -> dict[str, Tally]:
    """Per area of `inside`: the sum of its subtree's devices."""
    out: dict[str, Tally] = {}
    for dev, t in tallies.items():
        code = areas.get(dev, "")
        if code not in tree:
            continue
        for a in tree.ancestors(code):  # the area itself, then up
            if a in inside:
                out.setdefault(a, Tally()).add(t)
    return out
