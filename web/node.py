"""The node: one Loa server process, which wires store, bus, engine, clock, media and station."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from aiohttp import web

from loa.streamer.areas import AreaTree
from loa.streamer.broadcast import Broadcast
from loa.streamer.clock import TICK, LoopLagMonitor, RealClock
from loa.streamer.emergency.service import node_identity
from loa.streamer.engine import Engine
from loa.streamer.hub import PacketHub
from loa.streamer.library import LibrarySettings, MediaLibrary
from loa.streamer.schedule import Scheduler
from loa.streamer.state.bus import Bus
from loa.streamer.state.open import open_bus, open_store
from loa.streamer.state.store import Record, Store, StoreUnavailable
from loa.streamer.station import Station
from loa.streamer.tts import Speech
from loa.web.auth import Role, add_user
from loa.web.config import Config

log = logging.getLogger("loa.node")



MAX_UPLOAD_OVERHEAD = 1024 * 1024


async def load_tree(store: Store, cfg: Config) -> AreaTree:
    """The area tree from the store; on first start from the configured official list."""
    rows = await store.find("area")
    if rows:
        # Not strict: a tree stored before the code alphabet (streamer/areas.py) still loads.
        return AreaTree.from_rows([(r["id"], r["name"], r.get("level", ""), r.get("parent"))
                                   for r in rows], strict=False)
    if cfg.areas.csv:
        text = await asyncio.to_thread(Path(cfg.areas.csv).read_text, encoding="utf-8")
        tree = AreaTree.from_csv(text)
    else:
        tree = AreaTree()
        tree.add(cfg.areas.root_code, cfg.areas.root_name, cfg.areas.root_level)
    await store.put_many("area", [area_record(a.code, tree) for a in tree])
    return tree


def area_record(code: str, tree: AreaTree) -> dict[str, object]:
    a = tree.get(code)
    return {"id": a.code, "name": a.name, "level": a.level, "parent": a.parent,
            "lat": a.lat, "lon": a.lon}


READY_TIMEOUT_S = 2.0
CLOCK_STALL_S = 5.0
MIN_FREE_MB = 64  # below this the data directory is reported not ready (uploads, the log)


def _disk(path: Path) -> tuple[bool, float]:
    """(writable, MB free) of the data directory; access(2) says EROFS on a read-only mount."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return False, 0.0
    return os.access(path, os.W_OK), round(free / 2**20, 1)


class Node:
    """One Loa server process."""

    def __init__(self, cfg: Config, *, realtime: bool = True) -> None:
        self.cfg = cfg
        self.realtime = realtime
        self.store: Store
        self.bus: Bus
        self.tree: AreaTree
        self.hub = PacketHub()
        self.engine: Engine
        self.clock: RealClock | None = None
        self.lag = LoopLagMonitor()
        self.library: MediaLibrary
        self.speech: Speech
        self.station: Station
        self.started = time.time()
        self.bootstrap_password: str | None = None
        self.node_id = ""  # stable across restarts: emergencies, devices, as-run, RTP groups
        self.scheduler: Scheduler
        self._tasks: list[asyncio.Task[None]] = []
        self._known_schedules: list[Record] = []

    async def start(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        data = cfg.data_dir
        await asyncio.to_thread(data.mkdir, parents=True, exist_ok=True)
        try:
            self.node_id = await asyncio.to_thread(node_identity, data)
        except OSError:  # a full or read-only data directory that holds no id yet
            self.node_id = f"{socket.gethostname()}:{data.resolve()}"
        # A full disk or a read-only data directory must not keep a node off the air: it
        # starts degraded, airs what is stored and refuses writes (503) until the disk is fixed.
        self.store = await open_store(cfg.store, data, cfg.store_prefix, degraded=True)
        if self.store.read_only:
            log.error("store opened read-only, starting degraded event=store_degraded "
                      "reason=%s", self.store.read_only)
        self.bus = await open_bus(cfg.store, cfg.store_prefix)
        self.tree = await load_tree(self.store, cfg)
        self.hub.loop = loop
        self.engine = Engine(self.tree, cfg.engine, self.hub)
        self.library = MediaLibrary(data / "media", self.store, LibrarySettings(
            max_bytes=cfg.media.max_mb * 1024 * 1024, max_seconds=cfg.media.max_seconds,
            loudness_target=cfg.media.loudness_target))
        self.speech = Speech(self.library, voice=cfg.media.tts_voice)
        if self.realtime:
            self.clock = RealClock(self.engine.tick)
            self.clock.start()
            # Media time 0 is the clock's t0; map it to the wall clock once, precisely.
            media_epoch = time.time() - (time.monotonic() - self.clock.t0)
        else:
            media_epoch = time.time()
        self.station = Station(self.engine, self.store, self.library, self.speech, loop,
                               media_epoch, node_id=self.node_id)
        self.station.start()
        try:
            await self._bootstrap_admin()
        except StoreUnavailable as e:
            log.error("no admin created event=store_degraded reason=%s", e)
        self.scheduler = Scheduler(self.engine, media_epoch, self._scheduled_broadcast)
        if self.realtime:
            self.lag.start()
            self._tasks.append(loop.create_task(self.scheduler.run(self._schedules)))

    async def _schedules(self) -> list[Record]:
        """The schedules for the scheduler's round; the last known ones while the store is
        unavailable, so what is planned still airs through an outage."""
        try:
            self._known_schedules = await self.store.find("schedule")
        except StoreUnavailable as e:
            log.warning("store unavailable, last known schedules used event=schedule_stale "
                        "error=%s", e)
        return self._known_schedules

    def clock_running(self) -> bool:
        """The media clock ticks: it is at most CLOCK_STALL_S behind its schedule (a dead or
        stuck tick thread falls behind; a virtual clock in tests always counts as running)."""
        c = self.clock
        return c is None or c.clock() - (c.t0 + c.n * TICK) < CLOCK_STALL_S

    def store_state(self) -> dict[str, object]:
        """What /healthz, /readyz and the monitor say about the store, without asking it:
        `writable` false while it was opened read-only or its last write failed."""
        reason = self.store.read_only or self.station.store_down
        return {"writable": reason is None, "reason": reason, "queued": self.station.queued,
                "dropped": self.station.dropped}

    async def readiness(self) -> dict[str, object]:
        """Whether this node can take writes now: the store answers a write within its timeout
        and the data directory is writable with MIN_FREE_MB free. `ready` false means 503."""
        store: dict[str, object] = dict(self.store_state())
        try:
            await asyncio.wait_for(self.store.hit("readyz", 1.0), READY_TIMEOUT_S)
        except (StoreUnavailable, TimeoutError) as e:
            store.update(writable=False, reason=str(e) or "timeout")
        writable, free_mb = await asyncio.to_thread(_disk, self.cfg.data_dir)
        ready = bool(store["writable"]) and writable and free_mb >= MIN_FREE_MB
        return {"ready": ready, "store": store, "disk": {
            "writable": writable, "free_mb": free_mb, "min_free_mb": MIN_FREE_MB}}

    async def _scheduled_broadcast(self, sched: Record, occurrence: float
                                   ) -> tuple[Broadcast, float] | None:
        """What a schedule airs: its programme (approved, or scheduled by someone who may air it
        directly), persisted like any broadcast so the as-run log names it."""
        prog = await self.store.get("programme", sched["programme"])
        if prog is None:
            log.warning("schedule without programme event=schedule_skip schedule=%s",
                        sched["id"])
            return None
        content = await self.station.programme_content(prog)
        b = Broadcast(content.source, list(sched["targets"]), issuer=sched["area"],
                      klass=sched.get("class", "normal"), title=content.title)
        await self.store.put("broadcast", {
            "id": b.id, "status": "on-air", "title": content.title, "targets": b.targets,
            "class": b.cls.name, "policy": "resume", "issuer": sched["area"],
            "user": sched.get("owner", ""), "spec": {"programme": prog["id"]},
            "schedule": sched["id"], "started": occurrence, "offset": 0.0,
            "duration": content.duration})
        return b, content.duration or 0.0

    async def _bootstrap_admin(self) -> None:
        """First start with no admin: create one and print its one-time password once."""
        users = await self.store.find("user")
        if any(u["role"] == Role.admin.value for u in users):
            return
        root = self.tree.roots()[0].code
        name = "admin" if not any(u["username"] == "admin" for u in users) else "loa-admin"
        try:
            _, password = await add_user(self.store, self.tree, name, "admin", root,
                                         emergency=True)
        except ValueError:
            # Nodes of a cluster starting together on a new store: one of them made the admin.
            if any(u["role"] == Role.admin.value for u in await self.store.find("user")):
                return
            raise
        self.bootstrap_password = password
        # Printed, not logged: logs are kept and shipped, this must be seen once and changed.
        print(f"Tài khoản quản trị đầu tiên / bootstrap admin: {name} / {password} "
              f"(khu vực / area {root})", flush=True)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.clock:
            self.clock.stop()
        await self.lag.stop()
        await self.station.stop_writer()
        await self.bus.close()
        await self.store.close()


NODE: web.AppKey[Node] = web.AppKey("node", Node)
