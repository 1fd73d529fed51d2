"""The node: one Loa server process. It builds every service from the Config (web/build.py) in
dependency order, hands each its collaborators, starts them in that order and stops them in
reverse; the HTTP routes only read them (`app[NODE].rtp`, `.http`, `.devices`, ...)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from loa.relay.archive import Archive
from loa.relay.bulletins import Downlink, ParentBulletins
from loa.relay.devices.history import DeviceHistory, device_alerts
from loa.relay.devices.manager import DeviceManager
from loa.relay.devices.mqtt import MqttBinding
from loa.relay.devices.ota import Ota
from loa.relay.devices.proof import DeliveryLog
from loa.relay.fanout import FanoutPool
from loa.relay.hls import HlsService
from loa.relay.icecast import HttpStreamer
from loa.relay.ingest import Ingests
from loa.relay.link import LinkServer
from loa.relay.notify import Notifier
from loa.relay.rtp.out import RtpConfigError, RtpOut
from loa.relay.uplink import Uplink, UplinkReceiver
from loa.relay.upstream import UpstreamLink
from loa.relay.webrtc import WebRtcRelay
from loa.streamer.airtime import Airtime, AirtimeError, parse_rule
from loa.streamer.alerts import Alerts
from loa.streamer.areas import AreaTree
from loa.streamer.areasettings import AreaSettings
from loa.streamer.broadcast import Broadcast
from loa.streamer.clock import TICK, LoopLagMonitor, RealClock
from loa.streamer.deadair import CHECK_S, DeadAir, DeadAirSettings
from loa.streamer.emergency.service import EmergencyService, node_identity
from loa.streamer.engine import Engine, OnAirChange
from loa.streamer.hub import PacketHub
from loa.streamer.library import LibrarySettings, MediaLibrary
from loa.streamer.messages import say
from loa.streamer.schedule import Scheduler
from loa.streamer.sources import Source
from loa.streamer.state.bus import Bus
from loa.streamer.state.open import open_bus, open_store
from loa.streamer.state.store import Record, Store, StoreUnavailable
from loa.streamer.station import ContentError, Station
from loa.streamer.tts import Speech
from loa.web import build
from loa.web.auth import LoginGuard, Role, add_user
from loa.web.cap_fetch import cap_fetcher
from loa.web.captures import Captures
from loa.web.config import Config, ConfigError
from loa.web.emergency_devices import EmergencyDeviceCommands
from loa.web.exchange import ExchangeService
from loa.web.fm import FmTuning
from loa.web.offer_buckets import OfferBuckets
from loa.web.relay_inputs import RelayInputs

log = logging.getLogger("loa.node")

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
        self.alerts = Alerts()  # what needs a person; notifiers subscribe
        self.engine: Engine
        self.clock: RealClock | None = None
        self.lag = LoopLagMonitor()
        self.library: MediaLibrary
        self.speech: Speech
        self.station: Station
        self.started = time.time()
        self.media_epoch = 0.0  # wall clock of media time 0 (set at start)
        self.bootstrap_password: str | None = None
        self.node_id = ""  # stable across restarts: emergencies, devices, as-run, RTP groups
        self.scheduler: Scheduler
        # The services (web/build.py), started in this order by start().
        self.inputs: RelayInputs
        self.ingests: Ingests  # encoders pushing to /ingest/<mount>
        self.dead_air: DeadAir
        self.login_guard: LoginGuard
        self.devices: DeviceManager
        self.ota: Ota  # firmware images and staged rollouts
        self.history: DeviceHistory  # every device's online/offline/fault intervals
        self.notifier: Notifier  # alerts to the people responsible (webhooks, e-mail)
        self.mqtt: MqttBinding | None = None  # [mqtt] enabled: devices over the broker
        self.emergency: EmergencyService
        self.delivery: DeliveryLog  # proof of delivery: what each loudspeaker played
        self.exchange: ExchangeService  # with the central source system
        self.http: HttpStreamer
        self.fanout: FanoutPool | None = None  # `[http_streams] workers` > 0
        self.rtp: RtpOut | None = None  # [rtp] enabled
        self.hls: HlsService | None = None  # [hls] enabled
        self.webrtc: WebRtcRelay
        self.whep_offers: OfferBuckets
        self.links: LinkServer  # children linked to this node
        self.upstream: UpstreamLink | None = None  # [upstream] url: this node's parent
        self.area_settings: AreaSettings  # what each area's people chose (archive, ...)
        self.archive: Archive  # the as-aired recordings of the areas that chose them
        self.captures: Captures  # relay inputs recorded at a set time, aired later
        self.fm: FmTuning  # receivers tuned while an FM programme wins their area
        self.uplink: Uplink | None = None  # what this node reports to its parent
        self.uplink_in: UplinkReceiver  # what its children report to it
        self.downlink: Downlink  # bulletins to the children (relay/bulletins.py)
        self.parent_bulletins: ParentBulletins | None = None  # bulletins from above, answers up
        self._tasks: list[asyncio.Task[None]] = []
        self._known_schedules: list[Record] = []
        # broadcast id -> inbox entry it airs (a scheduled bulletin from above): marked aired
        # when it goes on air (web/api/inbox.py listens to the engine)
        self.inbox_airing: dict[str, str] = {}
        # told of every inbox entry once it is stored changed: the event stream, the
        # exchange's delivery report, the report up to this node's parent (web/api/inbox.py)
        self.inbox_listeners: list[Callable[[Record], None]] = []
        self._stops: list[Callable[[], Awaitable[None]]] = []  # of what started, in order
        self._closes: list[Callable[[], Awaitable[None]]] = []  # client connections
        self._clients_closed = False

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
        self.tree = await build.load_tree(self.store, cfg)
        self.area_settings = AreaSettings(self.store, self.tree)
        await self.area_settings.load()
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
        self.inputs = RelayInputs(self.engine, loop, cfg.fetch, build.relay_input_settings(cfg))
        self._stops.append(self.inputs.close)
        self.ingests = Ingests(self.engine, loop, cfg.ingest)
        self._stops.append(self.ingests.close_all)
        self.station = Station(self.engine, self.store, self.library, self.speech, loop,
                               media_epoch, node_id=self.node_id,
                               relay_factory=self.inputs.factory,
                               ingest_factory=self._ingest_source)
        self.uplink_in = UplinkReceiver(self.store, self.tree)
        if cfg.upstream.url:  # before the station's start: what a crash left open goes up too
            self.uplink = self.uplink_in.forward = Uplink(self.store, cfg.upstream, self.tree,
                                                          self.alerts)
            self.station.closed_hooks.append(self.uplink.asrun)
        self.station.start()
        self.dead_air = DeadAir(self.engine, self.tree, self.alerts, cfg.dead_air)
        try:
            for rec in await self.store.find("dead_air"):
                self.dead_air.areas[rec["id"]] = DeadAirSettings(
                    float(rec["level_db"]), float(rec["seconds"]), bool(rec["enabled"]))
        except StoreUnavailable as e:
            log.error("dead-air settings not loaded event=store_degraded reason=%s", e)
        self._tasks.append(loop.create_task(self._watch_dead_air()))
        await self._listen_rtp_mounts()
        try:
            await self._bootstrap_admin()
        except StoreUnavailable as e:
            log.error("no admin created event=store_degraded reason=%s", e)
        self.media_epoch = media_epoch
        try:
            await self.load_airtime()
        except StoreUnavailable as e:
            log.error("quiet hours not loaded event=store_degraded reason=%s", e)
        self.scheduler = Scheduler(self.engine, media_epoch, self._scheduled_broadcast)
        if self.realtime:
            self.lag.start()
            self._tasks.append(loop.create_task(self.scheduler.run(self._schedules)))
        await self._start_services(loop)
        # Last, once every transport and input is up: a relay broadcast needs its input.
        await self.station.restore()
        if cfg.upstream.url:  # the parent's broadcasts join what this node airs of its own
            self.upstream = UpstreamLink(cfg.upstream, self.station, self.tree, self.alerts)
            self.links.origin = self.upstream.origin  # relayed on to children as it came
            self.upstream.path_listeners.append(self.links.path_changed)
            self._stops.append(self.upstream.close)
            if self.uplink is not None:
                self.upstream.uplink = self.uplink
                self._stops.append(self.uplink.close)
                self.uplink.start(self.bus, self.engine.ended_listeners, self.station.flush,
                                  self._speakers)
            self.parent_bulletins = ParentBulletins(cfg.upstream.url, cfg.upstream.key, self.upstream.settings.areas
                                 or [self.tree.roots()[0].code], self.store, self.tree,
                                 self.library, self.inbox_changed, self.downlink.send)
            self.upstream.on_bulletin = self.parent_bulletins.on_message
            self.inbox_listeners.append(self.parent_bulletins.wake)
            self._stops.append(self.parent_bulletins.close)
            await self.parent_bulletins.start()
            await self.upstream.start()

    async def load_airtime(self) -> None:
        """Quiet hours and volumes of every area (their own, from the store) into the engine,
        each inherited down the tree (streamer/airtime.py)."""
        own = {}
        for r in await self.store.find("airtime"):
            try:
                if r["id"] in self.tree:
                    own[r["id"]] = parse_rule(r.get("rule"))
            except AirtimeError as e:  # a record spoiled by hand must not keep a node down
                log.error("quiet hours ignored event=airtime_invalid area=%s error=%s",
                          r["id"], e)
        self.engine.set_airtime(Airtime.of(self.tree, own, self.media_epoch) if own else None)

    def _speakers(self, areas: set[str]) -> tuple[int, int]:
        """Loudspeakers of these areas: (total, online), for the parent's delivery counts."""
        found = [d for d in self.devices.find(areas, kind="loudspeaker")
                 if not d.record.get("revoked")]
        return len(found), sum(d.status != "offline" for d in found)

    async def _ingest_source(self, prog: Record) -> Source:
        """The source of an ingest programme: a jitter buffer fed by its mount's encoder."""
        rec = await self.store.get("mount", str(prog.get("mount")))
        if rec is None:
            raise ContentError(say("ingest.unknown_mount", mount=str(prog.get("mount"))[:64]),
                               "mount")
        return self.ingests.subscribe(rec, str(prog.get("title") or rec["name"]))

    async def _listen_rtp_mounts(self) -> None:
        """RTP push mounts listen from the start: a hardware encoder just sends."""
        try:
            mounts = await self.store.find("mount")
        except StoreUnavailable as e:
            log.error("mounts not loaded event=store_degraded reason=%s", e)
            return
        for rec in mounts:
            if rec.get("rtp") or rec.get("sdp"):
                try:
                    await self.ingests.listen_rtp(rec)
                except (OSError, ValueError) as e:
                    log.error("rtp push mount cannot listen event=ingest_error mount=%s "
                              "error=%s", rec["name"], e)

    async def _watch_dead_air(self) -> None:
        loop = asyncio.get_running_loop()
        at = loop.time()
        while True:
            at += CHECK_S
            await asyncio.sleep(max(0.0, at - loop.time()))
            try:
                self.dead_air.check()
            except Exception:  # the watch must outlive a bug in one check
                log.exception("dead-air check failed event=dead_air_error")

    async def _start_services(self, loop: asyncio.AbstractEventLoop) -> None:
        cfg = self.cfg
        self.login_guard = LoginGuard(self.store, cfg.auth.max_failed_logins)
        self.devices = build.device_manager(cfg, self.store, self.bus, self.node_id)
        # Each stop is registered before its start: a start that fails half-way is undone too.
        self._stops.append(self.devices.stop)
        self._closes.append(self.devices.close_all)
        await self.devices.start()
        self.ota = Ota(self.store, self.devices, self.alerts, self.tree, cfg.firmware,
                       cfg.data_dir)
        self._stops.append(self.ota.stop)
        await self.ota.start()
        await self._start_alerting()
        self.mqtt = build.mqtt_binding(cfg, self.devices, self.node_id)
        if self.mqtt is not None:
            self._stops.append(self.mqtt.close)
            await self.mqtt.start()
        settings = build.emergency_settings(cfg)
        self.emergency = EmergencyService(
            engine=self.engine, station=self.station, store=self.store, bus=self.bus,
            tree=self.tree, library=self.library, speech=self.speech, settings=settings,
            devices=EmergencyDeviceCommands(self.devices),
            fetch=cap_fetcher(settings, cfg.fetch), node_id=self.node_id)
        await self._start_emergency()  # before the Station's generic restore
        self.fm = FmTuning(self)
        self._stops.append(self.fm.stop)
        self.fm.start()
        self.delivery = DeliveryLog(self.store, self.devices, self.airs, self._on_air,
                                    self.node_id)
        self._stops.append(self.delivery.stop)
        await self.delivery.start()
        delivery = self.delivery

        def stream_changed(c: OnAirChange) -> None:  # engine thread: hop to the loop, no more
            with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
                loop.call_soon_threadsafe(delivery.area_changed, c.area)

        self.engine.listeners.append(stream_changed)

        async def unhook() -> None:
            if stream_changed in self.engine.listeners:
                self.engine.listeners.remove(stream_changed)

        self._stops.append(unhook)
        self.exchange = ExchangeService(self)
        self.uplink_in.taken.append(self.exchange.child_report)  # children in its reports
        self._stops.append(self.exchange.stop)
        await self.exchange.start()
        self.http = build.http_streamer(cfg, self.hub, self.engine.on_air)
        self.fanout = build.fanout_pool(cfg, self.http)
        if self.fanout is not None:
            self._closes.append(self.fanout.close)
            await self.fanout.start()

        self._closes.append(self.http.close)  # every listener's handler returns
        self._stops.append(self.http.close)
        await self.http.start()
        self.rtp = build.rtp_out(cfg, self.hub, self.tree, self.station, self.store, self.bus,
                                 self.node_id)
        if self.rtp is not None:
            self._stops.append(self.rtp.close)
            try:
                await self.rtp.start()
            except RtpConfigError as e:
                raise ConfigError(str(e)) from None
        self.hls = build.hls_service(cfg, self.hub)
        if self.hls is not None:
            self._stops.append(self.hls.close)
            await self.hls.start()
        self.webrtc = build.webrtc_relay(cfg, self.hub, self.tree, self.station)
        self.whep_offers = OfferBuckets(cfg.webrtc.whep_offers_per_s, cfg.webrtc.whep_burst)
        await self._start_webrtc(loop)
        self.links = LinkServer(self.engine, self.tree, self.hub, loop)
        self.links.chain = lambda: [self.node_id, *(self.upstream.path if self.upstream else [])]
        self._closes.append(self.links.close)
        self.downlink = Downlink(self.links, self.store, self.tree, self.station)
        self.archive = Archive(cfg.archive, build.archive_dir(cfg), self.hub, self.tree,
                               self.area_settings, self.station.wall, self.alerts)
        self._stops.append(self.archive.stop)
        await self.archive.start()
        self.captures = Captures(self)
        self._stops.append(self.captures.stop)
        await self.captures.start()

    def airs(self, subject: str, area: str) -> bool:
        """This node airs `subject` (an emergency, or a broadcast id) in `area` now."""
        on = self.engine.main_of(area)
        return on is not None and (on == subject or on in self.emergency.broadcasts(subject))

    def _on_air(self, area: str) -> tuple[str | None, str | None]:
        if area not in self.tree:
            return None, None
        now = self.engine.on_air(area)
        return now["broadcast"], now["title"]  # type: ignore[return-value]

    async def _start_alerting(self) -> None:
        """Outage history and device alerts from the device manager; the notifier telling the
        people; then the alerts of outages open before a restart (sent once: same ids)."""
        # Signal sampled every 5 minutes (or heartbeat): a month's mean needs no more, and each
        # sample writes one record per served device (10,000 a minute was a tenth of a core).
        self.history = DeviceHistory(self.store, self.devices, sample_interval=max(
            300.0, self.devices.settings.heartbeat))
        self._stops.append(self.history.stop)
        await self.history.start()
        self.devices.status_listeners += [self.history.on_status, device_alerts(self.alerts)]
        self.notifier = Notifier(self.store, self.tree, self.alerts, self.cfg.alerts)
        self._stops.append(self.notifier.stop)
        await self.notifier.start()
        self.history.raise_open(self.alerts)

    async def _start_emergency(self) -> None:
        svc = self.emergency
        t0 = time.monotonic()
        self._stops.append(svc.stop)
        await svc.start()
        log.info("emergency service started event=emergency_service_start node=%s active=%d "
                 "restored=%d ms=%.1f", svc.node_id, len(svc.active), svc.stats["restored"],
                 (time.monotonic() - t0) * 1000)

    async def _start_webrtc(self, loop: asyncio.AbstractEventLoop) -> None:
        relay = self.webrtc
        closer = build.whip_closer(relay, loop)
        self.engine.ended_listeners.append(closer)

        async def close_peers() -> None:
            if closer in self.engine.ended_listeners:
                self.engine.ended_listeners.remove(closer)
            await relay.close()
            if relay.pool is not None:
                await relay.pool.close()

        self._closes.append(close_peers)
        if relay.pool is not None:
            await relay.pool.start()

    async def close_clients(self) -> None:
        """Close every client connection the services hold (device links, HTTP listeners,
        WebRTC peers): the HTTP server's shutdown calls it before it waits for its handlers."""
        if self._clients_closed:
            return
        self._clients_closed = True
        for close in self._closes:
            await close()

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

    def inbox_changed(self, entry: Record) -> None:
        """An inbox entry changed (stored): every listener hears of it."""
        for listener in list(self.inbox_listeners):
            listener(entry)

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
        if sched.get("inbox"):
            self.inbox_airing[b.id] = sched["inbox"]
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
        print(f"{say('node.bootstrap_admin', name=name)} / {password} "
              f"({say('node.bootstrap_area', area=root)})", flush=True)

    async def stop(self) -> None:
        """Stop what start() started, in reverse order (also after a start that failed)."""
        await self.close_clients()
        for stop in reversed(self._stops):
            await stop()
        self._stops.clear()
        for t in self._tasks:
            t.cancel()
        if self.clock:
            self.clock.stop()
        await self.lag.stop()
        await self.station.stop_writer()
        await self.bus.close()
        await self.store.close()


NODE: web.AppKey[Node] = web.AppKey("node", Node)
