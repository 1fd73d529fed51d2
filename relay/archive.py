"""The as-aired archive: what each recording area's stream carried, kept as Ogg Opus segments.

Recording reuses the packets the engine encodes once for the area's Opus stream (a hub
subscription, as a listener): it encodes nothing, so an area costs little more than copying
~4 KB/s. Packets are paged on the loop (cheap) and written by a thread once a second.

Files: `<dir>/<area>/<YYYY-MM-DD>/<start epoch ms>.opus`, one segment per `segment_s` of the
local clock (an hour by default; a restart starts a new one), each a complete Ogg Opus file
whose granule 0 is its start, so any player opens it and a time maps to a position.

Bounded: each area keeps its `retention_days` (area setting `archive`), the whole archive at
most `max_gb` (oldest segments first). Below `min_free_mb` free on its disk, or when a write
fails (disk full, read-only), recording stops with an `archive_disk_full` alert and starts
again, in new segments, once there is room: the streams never wait on this disk.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from loa.codecs.encoders import Packet
from loa.codecs.ogg import OggError, OggOpusMuxer, read_pages
from loa.codecs.opus import packet_samples
from loa.streamer.alerts import Alert, Alerts
from loa.streamer.areas import AreaTree
from loa.streamer.areasettings import AreaSettings, SettingsError, register
from loa.streamer.hub import PacketHub, Subscription
from loa.streamer.messages import say
from loa.streamer.state.store import Record

log = logging.getLogger("loa.archive")

RATE = 48_000
ZONE = ZoneInfo("Asia/Ho_Chi_Minh")
MAX_RETENTION_DAYS = 3650
ALERT_KIND = "archive_disk_full"
RESUME_HEADROOM_MB = 1.0


@dataclass
class ArchiveSettings:
    """Config section [archive] (env LOA_ARCHIVE_<KEY>). What is recorded is an area setting."""

    dir: str = ""  # default: <data>/archive
    max_gb: float = 20.0  # the whole archive; the oldest segments go beyond it
    min_free_mb: int = 512  # recording stops below this much free on the archive's disk
    segment_s: float = 3600.0  # one file per this many seconds of the local clock
    check_s: float = 30.0  # how often retention, size and free space are checked

    def __post_init__(self) -> None:
        if self.segment_s < 1 or self.check_s <= 0 or self.max_gb <= 0 or self.min_free_mb < 0:
            raise ValueError("[archive] segment_s >= 1, check_s > 0, max_gb > 0, "
                             "min_free_mb >= 0")


def check_area_setting(value: Any) -> Record:
    """An area's `archive` setting: {"enabled": bool, "retention_days": 1..3650} (the fields
    refused are named as in the body of PUT /api/v1/areas/{code}/archive)."""
    if not isinstance(value, dict):
        raise SettingsError(say("archive.bad_setting"), field="enabled")
    unknown = sorted(set(value) - {"enabled", "retention_days"})
    if unknown:
        raise SettingsError(say("field.unchangeable", fields=", ".join(unknown)),
                            field=unknown[0])
    enabled = value.get("enabled", False)
    days = value.get("retention_days", 30)
    if not isinstance(enabled, bool):
        raise SettingsError(say("archive.bad_setting"), field="enabled")
    if isinstance(days, bool) or not isinstance(days, int) \
            or not 1 <= days <= MAX_RETENTION_DAYS:
        raise SettingsError(say("archive.bad_retention", limit=MAX_RETENTION_DAYS),
                            field="retention_days")
    return {"enabled": enabled, "retention_days": days}


register("archive", check_area_setting)


@dataclass(frozen=True)
class Segment:
    path: Path
    start: float  # wall-clock epoch of its first sample

    @property
    def area(self) -> str:
        return self.path.parent.parent.name


class Recorder:
    """One area: its Opus packets paged into the current segment, written by `flush`."""

    def __init__(self, area: str, root: Path, wall: Callable[[int], float],
                 segment_s: float) -> None:
        self.area = area
        self.root = root
        self.wall = wall
        self.segment_s = segment_s
        self.sub: Subscription | None = None
        self._mux: OggOpusMuxer | None = None
        self._path: Path | None = None
        self._base = 0  # pts of the segment's first sample (its granule 0)
        self._until = 0.0  # wall clock where the segment ends
        self._pending: list[tuple[Path, bytes]] = []
        self.packets = 0

    def start(self, hub: PacketHub) -> None:
        self.sub = hub.subscribe(self.area, "opus", maxlen=500)
        self.sub.on_packets = self._on_packets

    def close(self) -> None:
        if self.sub is not None:
            self.sub.close()
            self.sub = None
        self._seal()

    def _on_packets(self, packets: list[Packet]) -> None:
        for p in packets:
            at = self.wall(p.pts)
            if self._mux is None or at >= self._until or p.pts < self._base:
                self._open(p.pts, at)
            assert self._mux is not None and self._path is not None
            pages = self._mux.add(p.pts - self._base, p.duration, p.data)
            if pages:
                self._pending.append((self._path, b"".join(pages)))
            self.packets += 1

    def _open(self, pts: int, at: float) -> None:
        self._seal()
        day = datetime.fromtimestamp(at, ZONE).strftime("%Y-%m-%d")
        self._path = self.root / self.area / day / f"{int(round(at * 1000))}.opus"
        self._mux = OggOpusMuxer(comments={"LOA_AREA": self.area})
        self._base = pts
        self._until = (at // self.segment_s + 1) * self.segment_s
        self._pending.append((self._path, self._mux.headers()))

    def _seal(self) -> None:
        if self._mux is not None and self._path is not None:
            tail = self._mux.flush()
            if tail:
                self._pending.append((self._path, b"".join(tail)))
        self._mux = None

    def take(self) -> list[tuple[Path, bytes]]:
        out, self._pending = self._pending, []
        return out


def _write(chunks: list[tuple[Path, bytes]]) -> int:
    """Append each chunk to its file (a thread: never on the loop). Bytes written."""
    done = 0
    for path, data in chunks:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as f:
            f.write(data)
        done += len(data)
    return done


class Archive:
    """The recorders of every area whose effective `archive` setting is enabled."""

    def __init__(self, settings: ArchiveSettings, root: Path, hub: PacketHub, tree: AreaTree,
                 area_settings: AreaSettings, wall: Callable[[int], float],
                 alerts: Alerts) -> None:
        self.settings = settings
        self.root = root
        self.hub = hub
        self.tree = tree
        self.area_settings = area_settings
        self.wall = wall
        self.alerts = alerts
        self.recorders: dict[str, Recorder] = {}
        self.stopped: str | None = None  # why recording is stopped (disk), None while it runs
        self.stats = {"bytes": 0, "pruned": 0, "write_errors": 0}
        self._task: asyncio.Task[None] | None = None
        area_settings.listeners.append(self._setting_changed)

    # ---- which areas record ------------------------------------------------------------------
    def wanted(self) -> set[str]:
        out = set()
        for a in self.tree:
            value, _ = self.area_settings.effective(a.code, "archive")
            if value and value.get("enabled"):
                out.add(a.code)
        return out

    def retention_days(self, area: str) -> int | None:
        value, _ = self.area_settings.effective(area, "archive") if area in self.tree else (
            None, None)
        return int(value["retention_days"]) if value else None

    def reconcile(self) -> None:
        want = set() if self.stopped else self.wanted()
        for area in set(self.recorders) - want:
            self.recorders.pop(area).close()
        for area in sorted(want - set(self.recorders)):
            rec = Recorder(area, self.root, self.wall, self.settings.segment_s)
            rec.start(self.hub)
            self.recorders[area] = rec
        log.debug("archive areas event=archive_reconcile recording=%d", len(self.recorders))

    def _setting_changed(self, _area: str, section: str) -> None:
        if section == "archive":
            self.reconcile()

    # ---- running -----------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        self.reconcile()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for rec in self.recorders.values():
            rec.close()
        await self.flush()
        self.recorders.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        check_at = loop.time()
        deadline = loop.time()
        while True:
            deadline += 1.0
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            try:
                await self.flush()
                if loop.time() >= check_at:
                    check_at = loop.time() + self.settings.check_s
                    await self.check()
            except Exception:  # noqa: BLE001 - the archive must never take the node down
                log.exception("archive round failed event=archive_error")

    async def flush(self) -> None:
        """Write what the recorders paged since the last flush; a failed write stops them."""
        chunks = [c for rec in self.recorders.values() for c in rec.take()]
        if not chunks or self.stopped:
            return
        try:
            self.stats["bytes"] += await asyncio.to_thread(_write, chunks)
        except OSError as e:
            self.stats["write_errors"] += 1
            self._stop_recording(f"{type(e).__name__}: {e.strerror or e}")

    async def check(self, now: float | None = None) -> None:
        """Prune by retention and size; stop below `min_free_mb`, resume above it."""
        now = time.time() if now is None else now
        self.stats["pruned"] += await asyncio.to_thread(self._prune, now)
        free_mb = await asyncio.to_thread(_free_mb, self.root)
        if free_mb < self.settings.min_free_mb:
            if not self.stopped:
                self._stop_recording(say("archive.disk_low", free=round(free_mb),
                                         min=self.settings.min_free_mb))
        elif self.stopped and free_mb >= self.settings.min_free_mb + RESUME_HEADROOM_MB:
            # Some room above the floor first: a disk that just refused a write is not
            # retried (and the alert not cleared and raised again) at every check.
            log.warning("archive recording again event=archive_resumed free_mb=%.0f", free_mb)
            self.stopped = None
            self.alerts.clear(ALERT_KIND, "archive")
            self.reconcile()

    def _stop_recording(self, why: str) -> None:
        log.error("archive recording stopped event=archive_stopped reason=%s", why)
        self.stopped = why
        for rec in self.recorders.values():
            rec.close()
            rec.take()  # what could not be written is lost: the stream is not
        self.recorders.clear()
        root = self.tree.roots()[0].code if self.tree.roots() else ""
        self.alerts.raise_(Alert(ALERT_KIND, "archive", root,
                                 say("archive.stopped_alert", reason=why), "critical",
                                 {"reason": why}))

    # ---- reading -----------------------------------------------------------------------------
    def segments(self, area: str) -> list[Segment]:
        """The area's segments, oldest first (a thread: it lists directories)."""
        out: list[Segment] = []
        base = self.root / area
        if not base.is_dir():
            return out
        for day in base.iterdir():
            if not day.is_dir():
                continue
            for f in day.glob("*.opus"):
                if f.stem.isdigit():
                    out.append(Segment(f, int(f.stem) / 1000))
        out.sort(key=lambda s: s.start)
        return out

    def _prune(self, now: float) -> int:
        pruned = 0
        every: list[tuple[Segment, int]] = []
        if not self.root.is_dir():
            return 0
        for area_dir in self.root.iterdir():
            if not area_dir.is_dir():
                continue
            segs = self.segments(area_dir.name)
            days = self.retention_days(area_dir.name)
            keep_from = now - (days if days else 0) * 86400
            for i, seg in enumerate(segs):
                ends = segs[i + 1].start if i + 1 < len(segs) else now
                if ends < keep_from or days is None and ends < now - MAX_RETENTION_DAYS * 86400:
                    pruned += _unlink(seg.path)
                else:
                    every.append((seg, size_of(seg.path)))
        total = sum(size for _, size in every)
        limit = self.settings.max_gb * 2**30
        current = {r._path for r in self.recorders.values()}
        for seg, size in sorted(every, key=lambda x: x[0].start):
            if total <= limit:
                break
            if seg.path in current:
                continue
            pruned += _unlink(seg.path)
            total -= size
        return pruned

    def read(self, area: str, since: float, until: float) -> tuple[bytes, float, float]:
        """One Ogg Opus file of what the area carried from `since` to `until` (wall clock),
        cut at packet boundaries: (file, first sample's time, seconds). A thread."""
        packets = list(self._packets(area, since, until))
        if not packets:
            return b"", since, 0.0
        mux = OggOpusMuxer(comments={"LOA_AREA": area, "LOA_FROM": f"{packets[0][0]:.3f}"})
        out = [mux.headers()]
        pos = 0
        for _, duration, data in packets:
            out.extend(mux.add(pos, duration, data))
            pos += duration
        out.extend(mux.flush())
        return b"".join(out), packets[0][0], pos / RATE

    def _packets(self, area: str, since: float, until: float
                 ) -> Iterator[tuple[float, int, bytes]]:
        """(start time, samples, Opus packet) of the archived packets whose middle lies in the
        span."""
        segs = self.segments(area)
        for i, seg in enumerate(segs):
            if seg.start >= until or (i + 1 < len(segs) and segs[i + 1].start <= since):
                continue
            # The segment being written may end in a partial page: what parsed is kept.
            for page in _complete_pages(seg.path)[2:]:  # after OpusHead and OpusTags
                parts = page.packets()
                if page.flags & 0x01:
                    parts = parts[1:]  # the end of a packet begun on the page before
                if page.segments and page.segments[-1] == 255:
                    parts = parts[:-1]  # a packet continued on the next page
                if not page.crc_ok or not parts:
                    continue
                durations = [packet_samples(p) for p in parts]
                pos = page.granule - sum(durations)  # the granule is its last packet's end
                for p, d in zip(parts, durations, strict=True):
                    at = seg.start + pos / RATE
                    # By its middle: a span that begins on a packet's edge (as-run times do)
                    # is not moved by the file name's rounding to the millisecond.
                    if since <= at + d / (2 * RATE) < until:
                        yield at, d, p
                    pos += d


def _complete_pages(path: Path) -> list[Any]:
    """The pages of a file that may end in a page still being written."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    pages = []
    try:
        for page in read_pages(data):
            pages.append(page)
    except OggError:
        pass
    return pages


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _unlink(path: Path) -> int:
    try:
        path.unlink()
    except OSError:
        return 0
    try:
        path.parent.rmdir()  # the day's folder, once empty
    except OSError:
        pass
    return 1


def _free_mb(path: Path) -> float:
    try:
        return shutil.disk_usage(path).free / 2**20
    except OSError:
        return 0.0
