"""The station: what the API, the scheduler and alerts use to put things on air.

It turns a content spec (a media item, a programme, a text) into a source, starts it in the
engine, persists it before acknowledging (so a restart puts it back on air at the right offset),
and turns the engine's on-air changes into the as-run log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from loa.streamer.broadcast import Broadcast, BroadcastClass, Policy
from loa.streamer.clock import FRAME, SAMPLE_RATE
from loa.streamer.engine import Engine, OnAirChange
from loa.streamer.errors import Kind, LoaError
from loa.streamer.library import MediaLibrary
from loa.streamer.messages import say
from loa.streamer.sources import Playlist, Silence, Source
from loa.streamer.state.store import Record, Store, StoreUnavailable
from loa.streamer.tts import Speech

log = logging.getLogger("loa.station")

STOP_TIMEOUT = 10.0  # seconds a shutdown waits for the as-run writer, twice at most
HEARTBEAT_S = 2.0  # "still on air" marks of open as-run entries: what a crash can lose
STALE_S = 60.0  # another node's open entry without a mark for this long died with its node
QUEUE_MAX = 10_000  # store writes waiting for the store; beyond that the oldest are dropped
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0  # seconds between retries of a write the store refused


async def node_marks(store: Store) -> dict[str, float]:
    """node id -> its last "still on air" mark (wall-clock epoch)."""
    return {n["id"]: float(n["seen"]) for n in await store.find("node")}


class ContentError(LoaError, ValueError):
    """The content cannot air: unknown media/programme, not approved, bad programme."""

    def __init__(self, message: str, field: str | None = None, *,
                 kind: Kind | None = None) -> None:  # `field` second: callers name it so
        super().__init__(message, kind=kind, field=field)


@dataclass
class Content:
    source: Source
    title: str
    duration: float | None  # seconds, None when endless (live, relay)
    programme: Record | None = None
    gain: float = 1.0  # applied by the engine (sources that have no gain of their own)


LiveFactory = Callable[[Record], Awaitable[Source]]
Write = Callable[[], Awaitable[Any]]


class Station:
    def __init__(self, engine: Engine, store: Store, library: MediaLibrary, speech: Speech,
                 loop: asyncio.AbstractEventLoop, media_epoch: float,
                 node_id: str = "", relay_factory: LiveFactory | None = None,
                 ingest_factory: LiveFactory | None = None) -> None:
        self.engine = engine
        self.store = store
        self.library = library
        self.speech = speech
        self.loop = loop
        self.media_epoch = media_epoch  # wall-clock epoch of media time 0
        self.relay_factory = relay_factory  # opens the input of a relay programme
        self.ingest_factory = ingest_factory  # the jitter buffer of an ingest programme's mount
        self.node_id = node_id  # names this node's open as-run entries in a shared store
        self._open: dict[tuple[str, str], Record] = {}  # (area, broadcast) -> as-run entry
        self._ops: deque[Write | None] = deque()  # None: the writer's stop sentinel
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set while nothing is queued
        self._idle.set()
        self._writer: asyncio.Task[None] | None = None
        self._beat: asyncio.Task[None] | None = None
        self._beat_queued = False
        self._aired: set[str] = set()  # broadcasts this node aired whose end is not written
        self.store_down: str | None = None  # why the last write failed, until one succeeds
        self.dropped = 0  # writes dropped from a full queue
        # Told of every closed as-run entry inside its retried write (the upward queue to a
        # parent node): each must be idempotent by the entry's id.
        self.closed_hooks: list[Callable[[Record], Awaitable[None]]] = []
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
            raise ContentError(say("media.unknown_id", media=media_id), kind="not_found",
                               field="media")
        return self.library.source(media, gain), media

    async def content(self, spec: Record, *, area: str, owner: str,
                      require_approved: bool) -> Content:
        """Resolve `{"media": id}`, `{"programme": id}` or `{"text": "..."}` into a source."""
        given = [k for k in ("media", "programme", "text") if spec.get(k) not in (None, "")]
        if len(given) != 1:
            raise ContentError(say("content.one_of"), field="media")
        if "media" in given:
            src, media = await self.media_source(str(spec["media"]))
            return Content(src, media["title"], media["duration"])
        if "text" in given:
            text = spec["text"]
            if not isinstance(text, str):
                raise ContentError(say("text.not_string"), field="text")
            try:
                media = await self.speech.media_for(text, area=area, owner=owner)
            except ValueError as e:
                raise ContentError(str(e), field="text") from None
            src, media = await self.media_source(media["id"])
            return Content(src, media["title"], media["duration"])
        prog = await self.store.get("programme", str(spec["programme"]))
        if prog is None:
            raise ContentError(say("programme.unknown_id", programme=spec["programme"]),
                               kind="not_found", field="programme")
        if require_approved and prog.get("status") != "approved":
            raise ContentError(say("programme.not_approved"), kind="conflict",
                               field="programme")
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
                raise ContentError(say("programme.relay_unavailable"), field="type")
            src = await self.relay_factory(prog)
            return Content(src, prog["title"], None, prog, gain)
        elif kind == "fm":
            # The receivers air it (web/fm.py tunes them); the stream holds its place, silent,
            # so the arbiter ranks it and a preemption takes it off the receivers too.
            seconds = float(prog["duration"])
            return Content(Silence(seconds), prog["title"], seconds, prog)
        elif kind == "ingest":
            if self.ingest_factory is None:
                raise ContentError(say("programme.ingest_unavailable"), field="type")
            src = await self.ingest_factory(prog)
            return Content(src, prog["title"], None, prog, gain)
        else:
            raise ContentError(say("programme.cannot_air_type", type=kind), field="type")
        if not items:
            raise ContentError(say("programme.empty_playlist"), field="items")
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
                  extra: Record | None = None, persist: bool = True,
                  after_own: frozenset[str] = frozenset(), until: float | None = None) -> Record:
        """Persist, then start. `start` is a wall-clock epoch (None: now); `offset` seconds into
        the content (a restart resuming a broadcast that was on air: its record is stored
        already, `persist=False`, so it airs even when the store refuses writes). `until`, a
        wall-clock epoch, ends it there (`expired`), on the media clock and across restarts."""
        cls = BroadcastClass.parse(klass)
        pol = Policy(policy)
        src = content.source
        if offset > 0 and src.seekable:
            src = src.at(int(offset * SAMPLE_RATE))
        b = Broadcast(src, list(targets), issuer=issuer, klass=cls, policy=pol,
                      start=None if start is None else self.media_seconds(start),
                      title=content.title, gain=content.gain, after_own=after_own,
                      end=None if until is None else self.media_seconds(until),
                      end_cause="expired")
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
            **({} if until is None else {"until": until}),
            **(extra or {}),
        }
        if persist:
            await self.store.put("broadcast", record)  # persisted before it is acknowledged
        self.engine.start(b)
        self._aired.add(b.id)
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
                self._end_record(rec["id"], "restart-live-ended")
                continue
            elapsed = now - rec["started"] + float(rec.get("offset", 0))
            dur = rec.get("duration")
            if dur is not None and elapsed >= dur:
                self._end_record(rec["id"], "restart-over")
                continue
            until = rec.get("until")
            if until is not None and until <= now:
                self._end_record(rec["id"], "expired")
                continue
            try:
                content = await self.content(rec["spec"], area=rec["issuer"], owner=rec["user"],
                                             require_approved=False)
            except (ContentError, ValueError) as e:
                log.error("cannot restore event=restore_failed id=%s error=%s", rec["id"], e)
                self._end_record(rec["id"], "restore-failed")
                continue
            await self.air(content, targets=rec["targets"], klass=rec["class"],
                           issuer=rec["issuer"], user=rec["user"], policy=rec["policy"],
                           spec=rec["spec"], offset=max(0.0, elapsed), bid=rec["id"],
                           persist=False, after_own=frozenset(rec.get("after_own", ())),
                           until=until)
            log.info("restored after restart event=restored id=%s offset=%.2f", rec["id"], elapsed)
            restored.append(rec["id"])
        return restored

    # ---- as-run and other store writes --------------------------------------------------------
    # Every write the engine's changes cause goes through one queue, in order, and is retried
    # while the store is unavailable (Redis down, disk full): a store outage delays the as-run
    # log, it does not lose it. Each write is idempotent (records by id, log entries by id), so
    # a retry after a lost reply changes nothing.
    def _on_change_thread(self, change: OnAirChange) -> None:
        self._post(self._on_change, change)

    def _on_end_thread(self, b: Broadcast, cause: str) -> None:
        self._post(self._on_end, b.id, cause, self.wall(self.engine.n * FRAME))

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed: shutting down
            pass

    def _enqueue(self, op: Write | None) -> None:
        if op is not None and len(self._ops) >= max(QUEUE_MAX, 2):
            del self._ops[1]  # the oldest waiting one; [0] may be in flight
            self.dropped += 1
            log.error("store write queue full, oldest write dropped event=asrun_error "
                      "dropped=%d", self.dropped)
        self._ops.append(op)
        self._idle.clear()
        self._wake.set()

    def start(self) -> None:
        self._writer = self.loop.create_task(self._write_loop())
        self._beat = self.loop.create_task(self._heartbeat())
        self._enqueue(self._recover)

    async def stop_writer(self) -> None:
        """Close what is on air in the log, write what is queued, then stop the writer.

        The writer stops at a sentinel, not by cancellation (a Redis client can swallow it);
        both waits are bounded so a dead store cannot hold up a shutdown.
        """
        if self._writer is None:
            return
        if self._beat:
            self._beat.cancel()
        at = self.wall(self.engine.n * FRAME)
        for key in list(self._open):
            self._close(key, at, "shutdown", None)
        self._enqueue(None)
        done, _ = await asyncio.wait({self._writer}, timeout=STOP_TIMEOUT)
        if not done:
            log.error("store writes not flushed at shutdown event=asrun_error queued=%d",
                      len(self._ops))
            self._writer.cancel()
            await asyncio.wait({self._writer}, timeout=STOP_TIMEOUT)
        self._writer = None

    async def flush(self) -> None:
        """Wait until every change handed over so far is written (tests, shutdown)."""
        await asyncio.sleep(0)  # let call_soon_threadsafe deliveries land first
        await self._idle.wait()

    async def _write_loop(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            if not self._ops:
                self._wake.clear()
                await self._wake.wait()
                continue
            op = self._ops[0]
            if op is None:
                self._ops.popleft()
                self._idle.set()
                return
            try:
                await op()
            except StoreUnavailable as e:
                if self.store_down is None:
                    log.error("store unavailable, writes queued event=store_down error=%s", e)
                self.store_down = str(e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue  # the same write again: order is kept
            except Exception:  # a bad write must neither take the station down nor block others
                log.exception("store write failed event=asrun_error")
            self._ops.popleft()
            if not self._ops:
                self._idle.set()
            if self.store_down is not None:
                log.info("store back, queued writes done event=store_up queued=%d",
                         len(self._ops))
                self.store_down = None
                backoff = BACKOFF_MIN
                self._enqueue(self.reconcile)

    async def _heartbeat(self) -> None:
        """Mark this node "still on air at" now and then: a crash loses at most the time since
        the last mark of the end of its open entries. One small record per node, whatever the
        number of areas on air; skipped while the last mark is still queued."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if self._open and not self._beat_queued:
                self._beat_queued = True
                self._enqueue(self._mark)

    async def _mark(self) -> None:
        self._beat_queued = False
        await self.store.put("node", {"id": self.node_id,
                                      "seen": self.wall(self.engine.n * FRAME)})

    def _on_change(self, c: OnAirChange) -> None:
        at = self.wall(c.sample)
        if c.before is not None:
            self._close((c.area, c.before), at, c.cause, c.after)
        if c.after is not None:
            self._aired.add(c.after)
            live = self.engine.live_broadcast(c.after)
            entry: Record = {
                "id": uuid.uuid4().hex,
                "area": c.area,
                "broadcast": c.after,
                "title": live.title if live else None,
                "class": live.cls.name if live else None,
                "issuer": live.issuer if live else None,
                "start": at,
                "start_cause": c.cause,
                "preempted": c.before,
                "node": self.node_id,
            }
            self._open[(c.area, c.after)] = entry
            self._enqueue(functools.partial(self._write_open, entry))

    async def _write_open(self, entry: Record) -> None:
        if entry["title"] is None:
            info = await self.store.get("broadcast", entry["broadcast"]) or {}
            entry.update({k: info.get(k) for k in ("title", "class", "issuer")})
        if "end" not in entry:  # closed meanwhile (a backlog): its log entry is next in line
            await self.store.put("onair", dict(entry))

    def _close(self, key: tuple[str, str], at: float, cause: str, after: str | None) -> None:
        entry = self._open.pop(key, None)
        if entry is None:
            return
        entry.update(end=at, seconds=round(at - entry["start"], 3), end_cause=cause,
                     followed_by=after)
        self._enqueue(functools.partial(self._write_closed, entry))

    async def _write_closed(self, entry: Record) -> None:
        out = {k: v for k, v in entry.items() if k != "node"}
        # ts (what reports select by): when it ended, not when a retry or a restart wrote it
        await self.store.append("asrun", {**out, "ts": min(out["end"], time.time())})
        for hook in self.closed_hooks:
            await hook(out)
        await self.store.delete("onair", entry["id"])

    def _on_end(self, bid: str, cause: str, at: float) -> None:
        self._enqueue(functools.partial(self._write_end, bid, cause, at))

    def _end_record(self, bid: str, cause: str) -> None:
        """End a record that will not air again (through the queue: retried, never lost)."""
        self._enqueue(functools.partial(self.store.update, "broadcast", bid,
                                        {"status": "ended", "end_cause": cause}))

    async def _write_end(self, bid: str, cause: str, at: float) -> None:
        rec = await self.store.get("broadcast", bid)
        if rec and rec.get("status") == "on-air":
            await self.store.update("broadcast", bid, {"status": "ended", "end_cause": cause,
                                                       "ended": at})
        self._aired.discard(bid)

    async def _recover(self) -> None:
        """At start-up: close the entries a crash left open (this node's, or another node's
        that has not marked itself on air for STALE_S)."""
        now = time.time()
        marks = await node_marks(self.store)
        for e in await self.store.find("onair"):
            seen = marks.get(e.get("node", ""))
            if e.get("node") == self.node_id or seen is None or now - seen >= STALE_S:
                await self._close_stored(e, seen, "crash")

    async def _close_stored(self, e: Record, seen: float | None, cause: str) -> None:
        """Move a stored open entry to the log, ended at its node's last "on air" mark."""
        end = max(seen or e["start"], e["start"])
        e.update(end=end, seconds=round(end - e["start"], 3), end_cause=cause, followed_by=None)
        await self._write_closed(e)
        log.warning("open as-run entry closed event=asrun_recovered id=%s area=%s broadcast=%s "
                    "cause=%s", e["id"], e["area"], e["broadcast"], cause)

    async def reconcile(self) -> list[str]:
        """After the store returns: end the broadcast records this node aired that are "on-air"
        in the store while the engine no longer airs them, and close this node's stored open
        entries that are no longer on air (their writes were dropped from a full queue)."""
        ended = []
        at = self.wall(self.engine.n * FRAME)
        for rec in await self.store.find("broadcast", status="on-air"):
            bid = rec["id"]
            if bid in self._aired and self.engine.live_broadcast(bid) is None:
                await self.store.update("broadcast", bid, {
                    "status": "ended", "end_cause": "reconciled", "ended": at})
                self._aired.discard(bid)
                ended.append(bid)
                log.warning("broadcast record ended, not on air event=reconciled id=%s", bid)
        open_ids = {e["id"] for e in self._open.values()}
        seen = (await node_marks(self.store)).get(self.node_id)
        for e in await self.store.find("onair", node=self.node_id):
            if e["id"] not in open_ids:
                await self._close_stored(e, seen, "reconciled")
        return ended

    @property
    def queued(self) -> int:
        """Store writes waiting (for the store to return, when it is down)."""
        return len(self._ops)

    def open_entries(self) -> list[Record]:
        return list(self._open.values())
