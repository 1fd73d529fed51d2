"""The station: what the API, the scheduler and alerts use to put things on air.

It turns a content spec (a media item, a programme, a text) into a source, starts it in the
engine, persists it before acknowledging (so a restart puts it back on air at the right offset),
and turns the engine's on-air changes into the as-run log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from loa.streamer.broadcast import Broadcast, BroadcastClass, Policy
from loa.streamer.clock import FRAME, SAMPLE_RATE
from loa.streamer.engine import Engine, OnAirChange
from loa.streamer.library import MediaLibrary
from loa.streamer.sources import Playlist, Source
from loa.streamer.store import Record, Store
from loa.streamer.tts import Speech

log = logging.getLogger("loa.station")

STOP_TIMEOUT = 10.0  # seconds a shutdown waits for the as-run writer, twice at most

MAX_REPEAT = 10
MAX_GAP = 7200.0


class ContentError(ValueError):
    """The content cannot air: unknown media/programme, not approved, bad programme."""

    def __init__(self, message: str, field: str | None = None, status: int = 422) -> None:
        super().__init__(message)
        self.field = field
        self.status = status


@dataclass
class Content:
    source: Source
    title: str
    duration: float | None  # seconds, None when endless (live, relay)
    programme: Record | None = None
    gain: float = 1.0  # applied by the engine (sources that have no gain of their own)


LiveFactory = Callable[[Record], Awaitable[Source]]


class Station:
    def __init__(self, engine: Engine, store: Store, library: MediaLibrary, speech: Speech,
                 loop: asyncio.AbstractEventLoop, media_epoch: float) -> None:
        self.engine = engine
        self.store = store
        self.library = library
        self.speech = speech
        self.loop = loop
        self.media_epoch = media_epoch  # wall-clock epoch of media time 0
        self.relay_factory: LiveFactory | None = None  # set by the streams layer
        self._open: dict[tuple[str, str], Record] = {}  # (area, broadcast) -> as-run entry
        self._writes: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        engine.listeners.append(self._on_change_thread)
        engine.ended_listeners.append(self._on_end_thread)

    # ---- time -------------------------------------------------------------------------------
    def wall(self, sample: int) -> float:
        return self.media_epoch + sample / SAMPLE_RATE

    def media_seconds(self, epoch: float) -> float:
        return epoch - self.media_epoch

    # ---- content ----------------------------------------------------------------------------
    async def media_source(self, media_id: str, gain: float = 1.0) -> tuple[Source, Record]:
        media = await self.store.get("media", media_id)
        if media is None:
            raise ContentError(f"không có tệp âm thanh / unknown media {media_id}", "media", 404)
        return self.library.source(media, gain), media

    async def content(self, spec: Record, *, area: str, owner: str,
                      require_approved: bool) -> Content:
        """Resolve `{"media": id}`, `{"programme": id}` or `{"text": "..."}` into a source."""
        given = [k for k in ("media", "programme", "text") if spec.get(k) not in (None, "")]
        if len(given) != 1:
            raise ContentError("cần đúng một trong media, programme, text / "
                               "give exactly one of media, programme, text", "media")
        if "media" in given:
            src, media = await self.media_source(str(spec["media"]))
            return Content(src, media["title"], media["duration"])
        if "text" in given:
            text = spec["text"]
            if not isinstance(text, str):
                raise ContentError("văn bản phải là chuỗi / text must be a string", "text")
            try:
                media = await self.speech.media_for(text, area=area, owner=owner)
            except ValueError as e:
                raise ContentError(str(e), "text") from None
            src, media = await self.media_source(media["id"])
            return Content(src, media["title"], media["duration"])
        prog = await self.store.get("programme", str(spec["programme"]))
        if prog is None:
            raise ContentError(f"không có chương trình / unknown programme {spec['programme']}",
                               "programme", 404)
        if require_approved and prog.get("status") != "approved":
            raise ContentError("chương trình chưa được duyệt / programme is not approved",
                               "programme", 409)
        return await self.programme_content(prog)

    async def programme_content(self, prog: Record) -> Content:
        gain = float(prog.get("volume", 100)) / 100.0
        kind = prog.get("type")
        items: list[Source] = []
        if kind == "file":
            items.append((await self.media_source(prog["media"], gain))[0])
        elif kind == "playlist":
            for mid in prog.get("items", []):
                items.append((await self.media_source(mid, gain))[0])
        elif kind == "tts":
            media = await self.speech.media_for(prog["text"], area=prog["area"],
                                                owner=prog.get("owner", ""))
            items.append((await self.media_source(media["id"], gain))[0])
        elif kind == "relay":
            if self.relay_factory is None:
                raise ContentError("tiếp sóng chưa sẵn sàng / relay input is not available", "type")
            src = await self.relay_factory(prog)
            return Content(src, prog["title"], None, prog, gain)
        else:
            raise ContentError(f"loại chương trình không phát được / cannot air type {kind}",
                               "type")
        if not items:
            raise ContentError("danh sách phát rỗng / empty playlist", "items")
        repeat = int(prog.get("repeat", 1))
        gap = float(prog.get("gap", 0))
        source: Source = items[0] if len(items) == 1 and repeat == 1 else Playlist(
            items, repeat=repeat, gap=gap, name=prog["title"])
        assert source.length is not None
        return Content(source, prog["title"], source.length / SAMPLE_RATE, prog)

    # ---- airing -----------------------------------------------------------------------------
    async def air(self, content: Content, *, targets: list[str], klass: str, issuer: str,
                  user: str, policy: str = "resume", spec: Record | None = None,
                  start: float | None = None, offset: float = 0.0, bid: str | None = None,
                  extra: Record | None = None) -> Record:
        """Persist, then start. `start` is a wall-clock epoch (None: now); `offset` seconds into
        the content (a restart resuming a broadcast that was on air)."""
        cls = BroadcastClass.parse(klass)
        pol = Policy(policy)
        src = content.source
        if offset > 0 and src.seekable:
            src = src.at(int(offset * SAMPLE_RATE))
        b = Broadcast(src, list(targets), issuer=issuer, klass=cls, policy=pol,
                      start=None if start is None else self.media_seconds(start),
                      title=content.title, gain=content.gain)
        if bid:
            b.id = bid
        now = time.time()
        record: Record = {
            "id": b.id,
            "status": "on-air",
            "title": content.title,
            "targets": list(targets),
            "class": cls.name,
            "policy": pol.value,
            "issuer": issuer,
            "user": user,
            "spec": spec or {},
            "started": start if start is not None else now,
            "offset": offset,
            "duration": content.duration,
            **(extra or {}),
        }
        await self.store.put("broadcast", record)  # persisted before it is acknowledged
        self.engine.start(b)
        return record

    def stop(self, bid: str, by_area: str | None, cause: str = "stopped") -> None:
        self.engine.stop(bid, by_area=by_area, cause=cause)

    async def restore(self, now: float | None = None) -> list[str]:
        """After a restart: put back what was on air, at the offset it would have reached."""
        now = time.time() if now is None else now
        restored = []
        for rec in await self.store.find("broadcast", status="on-air"):
            if rec.get("schedule") or rec.get("restored_by"):
                continue  # its owner (the scheduler, emergencies) puts it back at the right offset
            if "live" in rec.get("spec", {}):
                # A live input (WHIP, microphone) died with the process: nothing to resume.
                await self.store.update("broadcast", rec["id"], {
                    "status": "ended", "end_cause": "restart-live-ended"})
                continue
            elapsed = now - rec["started"] + float(rec.get("offset", 0))
            dur = rec.get("duration")
            if dur is not None and elapsed >= dur:
                await self.store.update("broadcast", rec["id"], {"status": "ended",
                                                                 "end_cause": "restart-over"})
                continue
            try:
                content = await self.content(rec["spec"], area=rec["issuer"], owner=rec["user"],
                                             require_approved=False)
            except (ContentError, ValueError) as e:
                log.error("cannot restore event=restore_failed id=%s error=%s", rec["id"], e)
                await self.store.update("broadcast", rec["id"], {"status": "ended",
                                                                 "end_cause": "restore-failed"})
                continue
            keep = {k: v for k, v in rec.items() if k not in {
                "id", "status", "title", "targets", "class", "policy", "issuer", "user", "spec",
                "started", "offset", "duration"}}
            await self.air(content, targets=rec["targets"], klass=rec["class"],
                           issuer=rec["issuer"], user=rec["user"], policy=rec["policy"],
                           spec=rec["spec"], offset=max(0.0, elapsed), bid=rec["id"], extra=keep)
            log.info("restored after restart event=restored id=%s offset=%.2f", rec["id"], elapsed)
            restored.append(rec["id"])
        return restored

    # ---- as-run -------------------------------------------------------------------------------
    def _on_change_thread(self, change: OnAirChange) -> None:
        self._post(("change", change))

    def _on_end_thread(self, b: Broadcast, cause: str) -> None:
        self._post(("end", (b.id, cause, self.engine.n)))

    def _post(self, item: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self._writes.put_nowait, item)
        except RuntimeError:  # loop closed: shutting down
            pass

    def start(self) -> None:
        self._writer = self.loop.create_task(self._write_loop())

    async def stop_writer(self) -> None:
        """Write what is already queued (the as-run log of the last seconds on air), then stop.

        Both waits are bounded: a dead store, or a client library that swallows the
        cancellation, must not hold up a shutdown.
        """
        if self._writer is None:
            return
        try:
            await asyncio.wait_for(self.flush(), STOP_TIMEOUT)
        except TimeoutError:
            log.error("as-run writes not flushed at shutdown event=asrun_error queued=%d",
                      self._writes.qsize())
        self._writer.cancel()
        await asyncio.wait({self._writer}, timeout=STOP_TIMEOUT)
        self._writer = None

    async def flush(self) -> None:
        """Wait until every change handed over so far is written (tests, shutdown)."""
        await asyncio.sleep(0)  # let call_soon_threadsafe deliveries land first
        await self._writes.join()

    async def _write_loop(self) -> None:
        while True:
            kind, item = await self._writes.get()
            try:
                if kind == "change":
                    await self._record_change(item)
                else:
                    bid, cause, n = item
                    if await self.store.get("broadcast", bid):
                        await self.store.update("broadcast", bid, {
                            "status": "ended", "end_cause": cause,
                            "ended": self.wall(n * FRAME)})
            except Exception:  # the as-run log must never take the station down
                log.exception("as-run write failed event=asrun_error")
            finally:
                self._writes.task_done()

    async def _record_change(self, c: OnAirChange) -> None:
        at = self.wall(c.sample)
        if c.before is not None:
            entry = self._open.pop((c.area, c.before), None)
            if entry is not None:
                entry["end"] = at
                entry["seconds"] = round(at - entry["start"], 3)
                entry["end_cause"] = c.cause
                entry["followed_by"] = c.after
                await self.store.append("asrun", entry)
        if c.after is not None:
            info = await self.store.get("broadcast", c.after) or {}
            self._open[(c.area, c.after)] = {
                "area": c.area,
                "broadcast": c.after,
                "title": info.get("title"),
                "class": info.get("class"),
                "issuer": info.get("issuer"),
                "start": at,
                "start_cause": c.cause,
                "preempted": c.before,
            }

    def open_entries(self) -> list[Record]:
        return list(self._open.values())
