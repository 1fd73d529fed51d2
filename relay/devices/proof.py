"""Proof of delivery: which loudspeaker acknowledged and actually played a broadcast or emergency.

What a loudspeaker hears is told to it: the `emergency` command names its emergency, and an
`onair` notice names the broadcast its stream carries (to a device that reports what it plays:
after its first `playing` report on this node or one that names nothing, then whenever its
area's stream changes), so its `playing` reports can name it back.

Evidence comes from the device (relay/devices/protocol.py, "proof of delivery"): the ack of the
`emergency` command that names it, and `playing` reports (the broadcast the device hears and its
stream state). A device counts as having played a subject when it reported `playing` it while
this node aired that subject in the device's area (`airs`, the node's own as-run view): a device
that claims an emergency its area does not hear proves nothing.

One record per subject and device (store kind `delivery`, id `<subject>.<device>`): `subject`,
`device`, `area`, `acked` (epoch of its ack), `played` (epoch it first played it), `state` (its
last report), `node`. Written behind (relay/devices/writer.py: thousands of reports in a few
`put_many`), read back from the store, so the proof survives a restart and every node of a
cluster reads what the node serving each device recorded.

Boards' proof of play (`shown` reports): one record per board, item and local day (store kind
`shown`, id `<device>.<item>.<YYYY-MM-DD>`): `first` and `last` time on screen, `shows` (times it
came on), `seconds` on screen, `area`, `day`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from loa.relay.devices.manager import Device, DeviceManager
from loa.relay.devices.protocol import onair_message
from loa.relay.devices.writer import Writer
from loa.streamer.schedule import DEFAULT_TZ
from loa.streamer.state.store import Record, Store

log = logging.getLogger("loa.devices")

KIND = "delivery"
SHOWN = "shown"
TZ = ZoneInfo(DEFAULT_TZ)  # a board's day is the local day
MAX_CACHED = 100_000  # records kept in memory to merge reports into (the rest: read back)
RECHECK = 0.1  # seconds between two looks at a `playing` report its area did not air yet
RECHECK_FOR = 10.0  # ... for this long: a device hears an emergency before the node's next tick
SETTLE_WAIT = 1.0  # seconds a reader waits for the reports received before it to be merged

Airs = Callable[[str, str], bool]  # (subject, area) -> this node airs the subject there now
OnAir = Callable[[str], tuple[str | None, str | None]]  # area -> (broadcast, title) on air now


def proof_id(subject: str, device: str) -> str:
    return f"{subject}.{device}"


class DeliveryLog:
    """Records acks, `playing` and `shown` reports of this node's devices, tells loudspeakers
    what their stream carries; answers per subject (and boards' proof of play)."""

    def __init__(self, store: Store, devices: DeviceManager, airs: Airs, on_air: OnAir,
                 node_id: str = "") -> None:
        self.store = store
        self.devices = devices
        self.airs = airs
        self.on_air = on_air
        self._changed: set[str] = set()  # areas whose stream changed, told at the next turn
        self._reporting: set[str] = set()  # devices that report what they play: told `onair`
        self._telling: set[asyncio.Task[int]] = set()
        self.node_id = node_id
        self._writer = Writer(store, KIND)
        self._shown = Writer(store, SHOWN)
        self._cache: OrderedDict[str, Record] = OrderedDict()
        self._todo: list[tuple[str, Device, dict[str, Any]]] = []
        # "playing" reports of a subject not (yet) on air in the device's area: looked at again
        self._unproven: dict[str, tuple[str, Device, float]] = {}  # proof id -> (.., deadline)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        self._writer.start()
        self._shown.start()
        self._task = asyncio.get_running_loop().create_task(self._run())
        self.devices.report_listeners.append(self._on_report)
        self.devices.ack_listeners.append(self._on_ack)

    async def stop(self) -> None:
        if self._on_report in self.devices.report_listeners:
            self.devices.report_listeners.remove(self._on_report)
        if self._on_ack in self.devices.ack_listeners:
            self.devices.ack_listeners.remove(self._on_ack)
        for t in list(self._telling):
            t.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=5.0)
        await self._writer.stop()
        await self._shown.stop()

    # ---- what the loudspeakers hear (`onair`) ----------------------------------------------------
    def _tell(self, devices: list[Device], area: str) -> None:
        t = asyncio.get_running_loop().create_task(
            self.devices.tell(devices, onair_message(*self.on_air(area))))
        self._telling.add(t)
        t.add_done_callback(self._telling.discard)

    def area_changed(self, area: str) -> None:
        """An area's stream carries another broadcast (on the loop): its connected loudspeakers
        are told at the next turn of the loop, every area changed by then in one pass."""
        if not self._changed:
            asyncio.get_running_loop().call_soon(self._tell_changed)
        self._changed.add(area)

    def _tell_changed(self) -> None:
        changed, self._changed = self._changed, set()
        by_area: dict[str, list[Device]] = {}
        for dev in self.devices.devices.values():
            area = dev.record["area"]
            if dev.link is not None and area in changed and dev.id in self._reporting:
                by_area.setdefault(area, []).append(dev)
        for area, devs in by_area.items():
            self._tell(devs, area)

    # ---- evidence (manager callbacks, on the loop: never block, never raise) -------------------
    def _on_ack(self, cmd: Record, _t: float) -> None:
        args = cmd.get("args") or {}
        subject = args.get("broadcast") if cmd.get("command") == "emergency" else None
        dev = self.devices.get(str(cmd.get("device")))
        if cmd.get("status") == "acked" and isinstance(subject, str) and dev is not None:
            self._queue(subject, dev, {"acked": cmd.get("acked") or time.time()})

    def _on_report(self, dev: Device, report: dict[str, Any]) -> None:
        if report["type"] == "playing":
            self._on_playing(dev, report["broadcast"], report["state"])
        else:
            self._queue("", dev, report)  # shown: merged in order with the store read

    def _on_playing(self, dev: Device, subject: str | None, state: str) -> None:
        if dev.id not in self._reporting or subject is None:
            # it speaks proof of delivery and does not know what it hears (it just connected)
            self._reporting.add(dev.id)
            self._tell([dev], dev.record["area"])
        if subject is None:  # nothing named: nothing to prove
            return
        change: dict[str, Any] = {"state": state, "reported": time.time()}
        pid = proof_id(subject, dev.id)
        self._unproven.pop(pid, None)
        if state == "playing":
            if self.airs(subject, dev.record["area"]):
                change["played"] = change["reported"]
            else:  # the command can outrun the engine's next tick: look again shortly
                self._unproven[pid] = (subject, dev, time.monotonic() + RECHECK_FOR)
        self._queue(subject, dev, change)

    def _recheck(self) -> None:
        now = time.monotonic()
        for pid, (subject, dev, deadline) in list(self._unproven.items()):
            if self.airs(subject, dev.record["area"]):
                del self._unproven[pid]
                self._queue(subject, dev, {"played": time.time()})
            elif now > deadline:
                del self._unproven[pid]

    def _queue(self, subject: str, dev: Device, change: dict[str, Any]) -> None:
        self._todo.append((subject, dev, change))
        self._idle.clear()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            if self._unproven:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), RECHECK)
                self._recheck()
            else:
                await self._wake.wait()
            self._wake.clear()
            while self._todo:
                todo, self._todo = self._todo, []
                for subject, dev, change in todo:
                    try:
                        if change.get("type") == "shown":
                            await self._merge_shown(dev, change)
                        else:
                            await self._merge(subject, dev, change)
                    except Exception:  # a store read failing: this report is lost, logged
                        log.exception("delivery proof failed event=delivery_error subject=%s "
                                      "device=%s", subject, dev.id)
            self._idle.set()

    async def _merge(self, subject: str, dev: Device, change: dict[str, Any]) -> None:
        pid = proof_id(subject, dev.id)
        rec = self._cache.get(pid)
        if rec is None:  # after a restart, or first served by another node: the store's
            rec = await self.store.get(KIND, pid) or {
                "id": pid, "subject": subject, "device": dev.id, "acked": None, "played": None,
                "state": None}
            self._cache[pid] = rec
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        rec["area"] = dev.record["area"]
        rec["node"] = self.node_id
        for k, v in change.items():
            if k in ("acked", "played"):
                rec[k] = rec.get(k) or v  # the first time is the proof
            else:
                rec[k] = v
        self._writer.mark(rec)

    async def _merge_shown(self, dev: Device, r: dict[str, Any]) -> None:
        day = datetime.fromtimestamp(r["since"], TZ).date().isoformat()
        pid = f"{dev.id}.{r['item']}.{day}"
        rec = self._cache.get(pid)
        if rec is None:
            rec = await self.store.get(SHOWN, pid) or {
                "id": pid, "device": dev.id, "item": r["item"], "day": day, "first": r["since"],
                "last": r["since"], "shows": 0, "seconds": 0.0, "since": None}
            self._cache[pid] = rec
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        if rec["since"] != r["since"]:  # it came on screen (again)
            rec["shows"] += 1
            rec["since"] = r["since"]
            rec["last"] = max(rec["last"], r["since"])
        rec["seconds"] = round(rec["seconds"] + max(0.0, r["at"] - rec["last"]), 3)
        rec["last"] = max(rec["last"], r["at"])
        rec["area"] = dev.record["area"]
        rec["region"] = r["region"]
        self._shown.mark(rec)

    # ---- queries ---------------------------------------------------------------------------------
    async def _settled(self) -> None:
        """Reports received so far merged (bounded: a steady stream of reports never holds a
        reader back for long)."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), SETTLE_WAIT)

    async def proofs(self, subject: str) -> dict[str, Record]:
        """Device id -> its record for a subject, as every node recorded it."""
        await self._settled()
        await self._writer.flush()
        return {r["device"]: r for r in await self.store.find(KIND, subject=subject)}

    async def shown(self, area: str | None = None) -> list[Record]:
        """Boards' proof of play records (of one area, or all), as every node recorded them."""
        await self._settled()
        await self._shown.flush()
        return await (self.store.find(SHOWN, area=area) if area else self.store.find(SHOWN))
