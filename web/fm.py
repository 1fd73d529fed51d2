"""FM programmes on the receivers: when an area's winner becomes a broadcast of an `fm`
programme, the loudspeakers there with an FM receiver (capability `fm`) are told to tune its
frequency; when it stops winning (its end, a preemption, a stop) they are told to turn the tuner
off and play the stream again. The arbiter decides as for any programme: an emergency takes the
receivers back at once, and the FM programme resumes after it like any other.

Devices without a receiver hear the area's stream, which holds the programme's place in silence.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from loa.relay.devices.protocol import validate_command
from loa.streamer.engine import OnAirChange
from loa.streamer.state.store import StoreUnavailable

if TYPE_CHECKING:
    from loa.web.node import Node

log = logging.getLogger("loa.fm")
COMMAND_TTL = 60.0  # a receiver offline longer than this gets the area's state at its next start


class FmTuning:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mhz: dict[str, float | None] = {}  # broadcast id -> its FM frequency (None: not FM)
        self._tuned: dict[str, float] = {}  # area -> the frequency its receivers were sent
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # FIFO: an area's changes are followed in their order

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.node.engine.listeners.append(self._on_change_thread)

    async def stop(self) -> None:
        listeners = self.node.engine.listeners
        if self._on_change_thread in listeners:
            listeners.remove(self._on_change_thread)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_change_thread(self, change: OnAirChange) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._spawn, change)

    def _spawn(self, change: OnAirChange) -> None:
        task = asyncio.get_running_loop().create_task(self._follow(change))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _frequency(self, bid: str | None) -> float | None:
        if bid is None:
            return None
        if bid not in self._mhz:
            rec = await self.node.store.get("broadcast", bid)
            pid = (rec or {}).get("spec", {}).get("programme")
            prog = await self.node.store.get("programme", pid) if pid else None
            self._mhz[bid] = float(prog["frequency_mhz"]) if prog and prog.get(
                "type") == "fm" else None
        return self._mhz[bid]

    async def _follow(self, change: OnAirChange) -> None:
        async with self._lock:
            await self._tune(change)

    async def _tune(self, change: OnAirChange) -> None:
        try:
            mhz = await self._frequency(change.after)
        except StoreUnavailable as e:
            log.warning("fm programme unknown event=fm_store error=%s", e)
            return
        area = change.area
        if mhz == self._tuned.get(area):
            return
        args: dict[str, Any] = {"on": False} if mhz is None else {"on": True,
                                                                    "frequency_mhz": mhz}
        if mhz is None:
            self._tuned.pop(area, None)
        else:
            self._tuned[area] = mhz
        mgr = self.node.devices
        receivers = [d for d in mgr.find({area}, kind="loudspeaker")
                     if (d.record.get("capabilities") or {}).get("fm")
                     and not d.record.get("revoked") and not mgr.remote(d)]
        if not receivers:
            return
        await mgr.issue(receivers, "fm", validate_command("fm", args), ttl=COMMAND_TTL,
                        issuer="fm", area=area)
        log.info("fm receivers told event=fm_%s area=%s mhz=%s devices=%d",
                 "on" if args["on"] else "off", area, mhz, len(receivers))
