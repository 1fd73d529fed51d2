"""Scheduled capture of an input: a relay programme's stream (the 05:00 national news) recorded
at a set time into the library, to air later (at 06:30, when people are up).

A capture is a store record (kind `capture`) with a state: `scheduled` -> `recording` -> `done`
(its `media` in the library) -> `aired` (its `broadcast`), or `missed` (the node was down for
its whole window), `failed` (the input never gave audio, the library refused it), `cancelled`.
Its task sleeps to an absolute deadline, opens the relay input as a relay broadcast would
(same URL policy), reads 20 ms of it per tick on the real clock for `seconds` (silence where
the input drops: what aired is what was captured) into a WAV file written off the loop, then
hands the file to the library (decoded, loudness-normalised like an upload). With `air`, it
airs at `air.at` to `air.targets`, with the class asked, as the capture's owner. A restart
re-arms what is scheduled or waits to air; a recording cut by a restart records what is
left of its window.
"""

from __future__ import annotations

import asyncio
import logging
import time
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loa.codecs.decode import MediaError
from loa.streamer.clock import FRAME, SAMPLE_RATE
from loa.streamer.state.store import Record, StoreUnavailable
from loa.streamer.station import ContentError

if TYPE_CHECKING:
    from loa.web.node import Node

log = logging.getLogger("loa.captures")
KIND = "capture"
MAX_SECONDS = 4 * 3600
FLUSH_FRAMES = 50  # written to disk once a second
LATE_AIR_S = 600.0  # a capture done more than this after its air time does not air


def _wav(path: Path) -> wave.Wave_write:
    w = wave.open(str(path), "wb")
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(SAMPLE_RATE)
    return w


def _append(w: wave.Wave_write, frames: list[np.ndarray]) -> None:
    pcm = np.clip(np.concatenate(frames), -1.0, 1.0)
    w.writeframes((pcm * 32767).astype("<i2").tobytes())


class Captures:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        for rec in await self.node.store.find(KIND):
            if rec["status"] in ("scheduled", "recording") or (
                    rec["status"] == "done" and rec.get("air")):
                self.arm(rec)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    def arm(self, rec: Record) -> None:
        cid = str(rec["id"])
        if cid not in self._tasks:
            task = asyncio.get_running_loop().create_task(self._run(cid))
            self._tasks[cid] = task
            task.add_done_callback(lambda _t: self._tasks.pop(cid, None))

    async def cancel(self, cid: str) -> Record:
        task = self._tasks.pop(cid, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return await self._set(cid, status="cancelled")

    async def _set(self, cid: str, **changes: Any) -> Record:
        rec = await self.node.store.update(KIND, cid, changes)
        log.info("capture %s event=capture_%s id=%s", rec["status"], rec["status"], cid)
        return rec

    async def _sleep_until(self, epoch: float) -> None:
        await asyncio.sleep(max(0.0, epoch - time.time()))  # one deadline on the loop clock

    async def _run(self, cid: str) -> None:
        try:
            rec = await self.node.store.get(KIND, cid)
            if rec is None:
                return
            if rec["status"] in ("scheduled", "recording"):
                rec = await self._capture(rec)
            if rec["status"] == "done" and rec.get("air"):
                await self._air(rec)
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as e:
            log.error("capture store unavailable event=capture_error id=%s error=%s", cid, e)
        except Exception:  # noqa: BLE001 - one capture's fault is logged, others go on
            log.exception("capture failed event=capture_error id=%s", cid)
            await self._set(cid, status="failed", error="internal error")

    async def _capture(self, rec: Record) -> Record:
        node = self.node
        end = float(rec["start"]) + float(rec["seconds"])
        if time.time() >= end:
            return await self._set(rec["id"], status="missed")
        await self._sleep_until(float(rec["start"]))
        prog = await node.store.get("programme", rec["programme"])
        if prog is None:
            return await self._set(rec["id"], status="failed", error="programme deleted")
        try:
            inp = await node.inputs.open(prog)
        except ContentError as e:
            return await self._set(rec["id"], status="failed", error=str(e))
        await self._set(rec["id"], status="recording", began=time.time())
        path = node.library.temp_path(".wav")
        w = await asyncio.to_thread(_wav, path)
        loop = asyncio.get_running_loop()
        frames = max(1, int(round((end - time.time()) * SAMPLE_RATE / FRAME)))
        pending: list[np.ndarray] = []
        deadline = loop.time()
        try:
            for n in range(frames):
                deadline += FRAME / SAMPLE_RATE
                await asyncio.sleep(max(0.0, deadline - loop.time()))
                pending.append(inp.push.read(FRAME))
                if len(pending) == FLUSH_FRAMES or n == frames - 1:
                    batch, pending = pending, []
                    await asyncio.to_thread(_append, w, batch)
        finally:
            inp.close()
            await asyncio.to_thread(w.close)
        try:
            media = await node.library.ingest(
                path, title=rec["title"], area=rec["area"], owner=rec["owner"],
                filename="capture.wav", extra={"capture": rec["id"]})
        except (MediaError, OSError) as e:
            return await self._set(rec["id"], status="failed", error=str(e)[:300])
        return await self._set(rec["id"], status="done", media=media["id"],
                               recorded=round(frames * FRAME / SAMPLE_RATE, 3))

    async def _air(self, rec: Record) -> Record:
        air = rec["air"]
        at = float(air["at"])
        if time.time() > at + LATE_AIR_S:
            return await self._set(rec["id"], status="done", air_error="late")
        await self._sleep_until(at)
        node = self.node
        content = await node.station.content({"media": rec["media"]}, area=rec["area"],
                                             owner=rec["owner"], require_approved=False)
        b = await node.station.air(content, targets=air["targets"], klass=air["class"],
                                   issuer=rec["area"], user=rec["owner"],
                                   spec={"media": rec["media"], "capture": rec["id"]})
        return await self._set(rec["id"], status="aired", broadcast=b["id"])
