"""The device control channel on the node: sessions, commands, queues, heartbeats.

Devices (IP loudspeaker clusters, LED/LCD boards) hold one WebSocket to the node and speak JSON
messages with `"v": 1` (relay/devices/protocol.py; docs/device-protocol.md is the contract).
This module knows nothing of HTTP: the web layer hands it a `Link` (send bytes, close with a
code) and the raw messages.

Design for thousands of devices on one core:

- The registry lives in memory (`DeviceManager.devices`, one small `Device` per registered device)
  and is written through to the store; every write of a device record goes through the manager,
  so the in-memory record is authoritative and batched writes never lose a REST change. The store
  is read once at start (devices, and commands not yet delivered).
- No task per device: the aiohttp handler coroutine is the only per-connection task. One periodic
  task (`_run`) marks devices offline after two missed heartbeats, re-sends unacknowledged commands
  (one heap of deadlines on `loop.time()`), expires commands and persists telemetry in batches.
- Store writes are coalesced (relay/devices/writer.py): heartbeats update memory and are
  written every `persist_interval` seconds with one `put_many`;
  status changes and command state are written at once, but many of them in one `put_many` when
  they come together (10,000 acks = a few writes).
- A bulk command is serialised once: every device gets the same bytes except its command id,
  spliced in between a pre-encoded prefix and suffix.

Cluster (several nodes on one Redis store and bus): a device's connection, its undelivered
commands, their retries and expiry belong to the node it is connected to, recorded as `node` in
its record. On hello a node takes the device over: it reads the device's undelivered commands from
the store and publishes `device.node` (`{"device", "node", "status", "origin"}`); every other node
then hands the commands it holds for that device to the new node and stops counting the device's
heartbeats. A command issued on any node for a device served by another is written to the store
(`queued`) and sent over the bus's durable stream `devices.<node>` to that node, which delivers,
retries and expires it and records its ack in the store, where every node reads it. Delivery is
idempotent by command id: a command already held, or already settled in the store, is dropped.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

from loa.relay.devices.protocol import (
    CLOSE_ABUSE,
    CLOSE_GOING_AWAY,
    CLOSE_HEARTBEAT,
    CLOSE_MALFORMED_HELLO,
    CLOSE_REPLACED,
    CLOSE_REVOKED,
    CLOSE_UNAUTHORISED,
    COMMAND_STATUSES,
    DEVICE_STATUSES,
    FINAL,
    PROTOCOL_VERSION,
    REPORTS,
    STATEFUL_COMMANDS,
    ProtocolError,
    command_message,
    command_template,
    display_state,
    emergency_state,
    encode,
    error_message,
    parse_ack,
    parse_heartbeat,
    parse_hello,
    parse_message,
    parse_report,
)
from loa.relay.devices.records import new_id, new_key, public_device, same_hash, secret_hash
from loa.relay.devices.streams import StreamOffer, stream_urls
from loa.relay.devices.writer import WRITER_STOP_TIMEOUT, Writer
from loa.streamer.messages import say
from loa.streamer.state.bus import Bus, BusClosed, BusSubscription
from loa.streamer.state.store import NotFound, Record, Store

log = logging.getLogger("loa.devices")

NODE_TOPIC = "device.node"  # bus event: a device is now served by a node ("" = by none)
ROUTE_GROUP = "devices"  # consumer group of the per-node command streams (`route_stream`)


def route_stream(node: str) -> str:
    """The durable bus stream of the commands for the devices a node serves."""
    return f"devices.{node}"


_SLOW_BYTES = 16 * 1024  # unsent bytes above which a link is not written to (see DeviceManager)


@dataclass
class DeviceSettings:
    """Config section [devices] (env LOA_DEVICES_<KEY>)."""

    heartbeat: float = 60.0  # seconds between heartbeats, told to every device in `welcome`
    hello_timeout: float = 10.0  # the first message must arrive within this
    retry_interval: float = 5.0  # an unacknowledged command is sent again after this
    max_tries: int = 5  # sends of a command per connection before it is marked failed
    command_ttl: float = 600.0  # default expiry of a command (seconds after it is issued)
    max_command_ttl: float = 7 * 86400.0
    persist_interval: float = 10.0  # telemetry is written to the store in batches this often
    max_errors: int = 10  # malformed messages on one connection before it is closed (4008)
    max_message_kb: int = 64  # larger messages close the connection (1009)
    provisioning_hours: float = 24.0  # lifetime of a one-time provisioning token
    max_queued: int = 500  # undelivered commands kept per device; the oldest expire first
    default_volume: int = 80

    def __post_init__(self) -> None:
        if self.heartbeat <= 0 or self.retry_interval <= 0 or self.persist_interval <= 0:
            raise ValueError("devices: heartbeat, retry_interval, persist_interval must be > 0")
        if self.max_tries < 1 or self.max_errors < 1 or self.max_queued < 1:
            raise ValueError("devices: max_tries, max_errors, max_queued must be >= 1")



class HelloRejected(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason



# ---- the link a session talks through (implemented by the web layer) ------------------------------
class Link(Protocol):
    errors: int  # malformed messages received on this connection

    def unsent(self) -> int:
        """Bytes written but not yet taken by the kernel."""

    def closing(self) -> bool: ...

    async def send(self, data: bytes) -> None:
        """Queue one text frame. Does not wait when `unsent()` is small (see DeviceManager)."""

    def close(self, code: int, reason: str) -> None:
        """Start closing with this code (non-blocking; idempotent)."""


# ---- in-memory state -----------------------------------------------------------------------------
class Device:
    """One registered device in memory: its record, its connection and its undelivered commands."""

    __slots__ = ("id", "record", "link", "status", "last_seen", "telemetry", "outbox",
                 "ready", "public")

    def __init__(self, record: Record) -> None:
        self.id: str = record["id"]
        self.record = record  # authoritative copy; written through to the store
        self.link: Link | None = None
        self.status: str = record.get("status") or "offline"
        self.last_seen = 0.0  # loop.time() of the last message
        self.telemetry: dict[str, Any] | None = record.get("telemetry")
        self.outbox: dict[str, Record] | None = None  # cid -> queued/sent command, in order
        self.ready = False  # welcome sent and the backlog delivered on this link
        self.public = ""  # base URL the device reached us by

    def view(self) -> Record:
        out = public_device(self.record)
        out["status"] = self.status
        out["connected"] = self.link is not None
        out["telemetry"] = self.telemetry
        out["queued_commands"] = len(self.outbox) if self.outbox else 0
        return out



@dataclass
class Issued:
    """What a command request did."""

    batch: str
    ids: list[str]
    devices: int
    online: int  # sent at once (connected devices)
    routed: int = 0  # handed to the node serving the device (cluster)


@dataclass
class _Tally:
    area: str
    command: str
    created: float
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMMAND_STATUSES, 0))

    def as_dict(self, batch: str) -> Record:
        total = sum(self.counts.values())
        return {"command_batch": batch, "area": self.area, "command": self.command,
                "created": self.created, "devices": total, **self.counts}


Publish = Callable[[str, dict[str, Any]], Awaitable[None]]


class DeviceManager:
    """The device registry and every device connection of this node."""

    MAX_TALLIES = 256
    MAX_SETTLED = 100_000  # ids of settled commands remembered (ahead of the write-behind)

    def __init__(self, store: Store, publish: Publish, settings: DeviceSettings | None = None,
                 offer: StreamOffer | None = None, *, bus: Bus | None = None,
                 node_id: str = "") -> None:
        self.store = store
        self.publish = publish
        self.bus = bus  # with a node id: commands are routed to the node serving a device
        self.node_id = node_id
        self.settings = settings or DeviceSettings()
        self.offer = offer or StreamOffer()
        self.devices: dict[str, Device] = {}
        self.connected = 0
        self.ack_listeners: list[Callable[[Record, float], None]] = []  # (command, loop time)
        # `playing` and `shown` reports (device, parse_report's dict): proof (proof.py)
        self.report_listeners: list[Callable[[Device, dict[str, Any]], None]] = []
        # Device message types served by other modules (e.g. `firmware`: relay/devices/ota.py)
        self.handlers: dict[str, Callable[[Device, dict[str, Any]], Awaitable[None]]] = {}
        # Told of every status change and of every connection (outage history, alerts): the
        # `device.status` event; status == previous for a device that reconnected while online.
        self.status_listeners: list[Callable[[dict[str, Any]], None]] = []
        # Told a device's new key (provisioned) or None (revoked, deleted) before the change is
        # made: a transport with its own accounts (the MQTT broker) follows; raising refuses it.
        self.key_listeners: list[Callable[[str, str | None], Awaitable[None]]] = []
        self._devw = Writer(store, "device")
        self._cmdw = Writer(store, "command")
        self._heap: list[tuple[float, int, str, str]] = []  # due, seq, device, command id
        self._due: dict[str, int] = {}  # command id -> seq of its live heap entry
        self._seq = itertools.count()
        self._tele_dirty: set[str] = set()
        self._with_outbox: set[str] = set()
        self._tallies: OrderedDict[str, _Tally] = OrderedDict()
        self._provision_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._planned = math.inf
        self._task: asyncio.Task[None] | None = None
        self._closers: set[asyncio.Task[None]] = set()
        self._settled: OrderedDict[str, None] = OrderedDict()
        self._stopping = False
        self._nodes: BusSubscription | None = None
        self._bus_tasks: list[asyncio.Task[None]] = []
        self.stats = {"heartbeats": 0, "acks": 0, "sent": 0, "resent": 0, "errors": 0,
                      "routed": 0, "received": 0}

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the registry and the undelivered commands; start the periodic task."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for rec in await self.store.find("device"):
            dev = Device(rec)
            if dev.status != "offline":
                # Online when the node stopped: offline in two heartbeats unless it reconnects.
                dev.last_seen = now
            self.devices[dev.id] = dev
        pending = await self.store.find("command", status="queued")
        pending += await self.store.find("command", status="sent")
        pending.sort(key=lambda r: (r.get("created", 0), r["id"]))
        for rec in pending:
            d = self.devices.get(rec.get("device", ""))
            if d is None:
                continue
            rec["status"] = "queued"
            rec["tries"] = 0
            self._enqueue(d, rec)
        self._devw.start()
        self._cmdw.start()
        self._task = loop.create_task(self._run())
        if self.bus is not None and self.node_id:
            self._nodes = await self.bus.subscribe(NODE_TOPIC)
            self._bus_tasks = [loop.create_task(self._read_nodes(self._nodes)),
                               loop.create_task(self._read_routes())]
        log.info("device registry loaded event=devices_start devices=%d undelivered=%d",
                 len(self.devices), len(pending))

    async def close_all(self, code: int = CLOSE_GOING_AWAY,
                        reason: str = say("device.server_stopping")) -> None:
        for dev in self.devices.values():
            if dev.link is not None:
                dev.link.close(code, reason)
        if self._closers:
            await asyncio.wait(list(self._closers), timeout=5.0)

    async def stop(self) -> None:
        self._stopping = True  # the bus readers end by themselves (within a receive timeout)
        if self._nodes is not None:
            await self._nodes.close()
        if self._bus_tasks:
            _, late = await asyncio.wait(self._bus_tasks, timeout=WRITER_STOP_TIMEOUT)
            for t in late:
                t.cancel()
            self._bus_tasks = []
        if self._task:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._persist_telemetry()
        await self._devw.stop()
        await self._cmdw.stop()

    def track(self, task: asyncio.Task[None]) -> None:
        """Keep a closing task alive until it ends (links call this)."""
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    # ---- registry ----------------------------------------------------------------------------
    def get(self, device_id: str) -> Device | None:
        return self.devices.get(device_id)

    def find(self, areas: set[str] | None = None, *, kind: str | None = None,
             status: str | None = None, group: str | None = None) -> list[Device]:
        out = []
        for d in self.devices.values():
            r = d.record
            if (areas is None or r["area"] in areas) and (kind is None or r["kind"] == kind) \
                    and (status is None or d.status == status) \
                    and (group is None or group in r.get("groups", ())):
                out.append(d)
        return out

    async def create(self, rec: Record) -> Device:
        await self.store.create("device", rec)
        dev = Device(rec)
        self.devices[dev.id] = dev
        return dev

    async def update(self, device_id: str, changes: Record) -> Device:
        """Merge changes (None deletes a field) into the record, write it, push the device's
        configuration when it is connected and something it uses changed."""
        dev = self.devices.get(device_id)
        if dev is not None and self.remote(dev):  # the serving node's record, not ours
            dev = await self._load(device_id, fresh=True)
        if dev is None:
            raise NotFound(f"device {device_id!r}")
        rec = dict(dev.record)
        for k, v in changes.items():
            if k == "id":
                continue
            if v is None:
                rec.pop(k, None)
            else:
                rec[k] = v
        rec["updated"] = time.time()
        dev.record = rec
        self._devw.mark(rec)
        await self._devw.flush()
        if dev.link is not None and dev.ready and changes.keys() & {
                "area", "volume", "power_schedule", "groups", "name", "capabilities"}:
            await self._send(dev, encode({"v": PROTOCOL_VERSION, "type": "config",
                                          "config": self.config_of(dev)}))
        return dev

    async def provision(self, device_id: str, token: str) -> str | None:
        """Exchange a one-time provisioning token for a device key (None: refused)."""
        async with self._provision_lock:  # two exchanges of one token: exactly one wins
            dev = self.devices.get(device_id)
            if dev is None:
                return None
            prov = dev.record.get("provision")
            if not isinstance(prov, dict) or not same_hash(prov.get("hash"), token) \
                    or float(prov.get("expires", 0)) < time.time():
                return None
            key = new_key()
            for fn in self.key_listeners:
                await fn(device_id, key)
            await self.update(device_id, {"key_hash": secret_hash(key), "provision": None,
                                          "revoked": False, "provisioned_at": time.time()})
            return key

    async def revoke(self, device_id: str) -> Device:
        for fn in self.key_listeners:
            await fn(device_id, None)
        dev = await self.update(device_id, {"revoked": True, "revoked_at": time.time()})
        await self._close_session(dev, say("device.key_revoked"))
        return dev

    async def _close_session(self, dev: Device, reason: str) -> None:
        """Close the device's connection with 4003, here or on the node serving it."""
        if self.remote(dev):
            assert self.bus is not None
            with suppress(Exception):  # a bus down: its next hello is refused all the same
                await self.bus.send(route_stream(dev.record["node"]),
                                    {"v": PROTOCOL_VERSION, "close": dev.id, "reason": reason})
        elif dev.link is not None:
            dev.link.close(CLOSE_REVOKED, reason)
            dev.link = None
            dev.ready = False
            self.connected -= 1

    async def remove(self, device_id: str) -> bool:
        if device_id not in self.devices:
            return False
        for fn in self.key_listeners:
            await fn(device_id, None)
        dev = self.devices.pop(device_id)
        await self._close_session(dev, say("device.deleted"))
        self._devw.forget(device_id)
        self._tele_dirty.discard(device_id)
        self._with_outbox.discard(device_id)
        await self._devw.flush()  # a batch already taken may still hold it
        await self.store.delete("device", device_id)
        for rec in list((dev.outbox or {}).values()):
            self._set_status(rec, "expired", error=say("device.deleted"))
        return True

    # ---- connections ---------------------------------------------------------------------------
    def config_of(self, dev: Device) -> dict[str, Any]:
        r = dev.record
        return {"device": dev.id, "name": r["name"], "kind": r["kind"], "area": r["area"],
                "groups": r.get("groups", []),
                "streams": stream_urls(dev.public, r["area"], r.get("capabilities") or {},
                                       self.offer),
                "volume": r.get("volume", self.settings.default_volume),
                "power_schedule": r.get("power_schedule", []),
                "display": r.get("display"), "emergency": r.get("emergency")}

    async def hello(self, link: Link, raw: str | bytes, public: str, *,
                    trusted: bool = False) -> Device:
        """Authenticate the first message of a connection; welcome and deliver the backlog.
        HelloRejected carries the close code. `trusted`: the transport authenticated the device
        (the MQTT broker, by its own account): no key in the hello, revocation still checked."""
        try:
            hello = parse_hello(parse_message(raw), key_required=not trusted)
        except ProtocolError as e:
            raise HelloRejected(CLOSE_MALFORMED_HELLO, say("device.bad_hello", error=e)) from None
        dev = self.devices.get(hello.device)
        if dev is None or (self.bus is not None and dev.link is None):
            # Registered by another node, or changed there (revoked, moved) since: the store's.
            dev = await self._load(hello.device, fresh=True)
        if dev is None or not (trusted or same_hash(dev.record.get("key_hash"), hello.key)):
            raise HelloRejected(CLOSE_UNAUTHORISED,
                                say("device.unknown_or_wrong_key"))
        if dev.record.get("revoked"):
            raise HelloRejected(CLOSE_REVOKED, say("device.key_revoked"))
        loop = asyncio.get_running_loop()
        old = dev.link
        if old is not None:
            old.close(CLOSE_REPLACED, say("device.replaced"))
            log.info("device connection replaced event=device_replaced device=%s", dev.id)
        else:
            self.connected += 1
        dev.link = link
        dev.ready = False
        dev.public = public
        dev.last_seen = loop.time()
        changes: Record = {"last_seen": time.time(), "node": self.node_id}
        if hello.firmware is not None:
            changes["firmware"] = hello.firmware
        if hello.capabilities is not None and hello.capabilities != dev.record.get(
                "capabilities"):
            changes["capabilities"] = hello.capabilities
        rec = {**dev.record, **changes}
        dev.record = rec
        status = "fault" if rec.get("faults") else "online"
        try:
            await self._claim(dev)  # before the welcome: a welcomed device is ready at once
            await self._send(dev, encode({
                "v": PROTOCOL_VERSION, "type": "welcome", "server_time": time.time(),
                "heartbeat": self.settings.heartbeat, "config": self.config_of(dev)}))
            log.info("device connected event=device_connect device=%s area=%s firmware=%s",
                     dev.id, rec["area"], rec.get("firmware"))
            if dev.status != status:
                await self._status(dev, status, "connected")
            else:
                self._devw.mark(rec)
                self._tell(self._event(dev, status, "connected"))
            await self._publish_node(dev)
            await self._deliver_backlog(dev, link)
        except BaseException:  # cancelled (shutdown) or worse: no dead link left behind
            await self.disconnected(dev, link)
            raise
        return dev

    async def _deliver_backlog(self, dev: Device, link: Link) -> None:
        """Undelivered commands in the order they were issued, including those issued while this
        runs (`issue` only queues them until the device is ready)."""
        done: set[str] = set()
        while dev.link is link:
            todo = [r for r in (dev.outbox or {}).values() if r["id"] not in done]
            if not todo:
                dev.ready = True
                return
            now = time.time()
            for rec in todo:
                if dev.link is not link:
                    return
                done.add(rec["id"])
                if rec["status"] in FINAL:
                    continue
                if rec["expires"] <= now:
                    self._set_status(rec, "expired")
                    continue
                rec["tries"] = 0  # tries count per connection
                await self._try_send(dev, rec)

    async def disconnected(self, dev: Device, link: Link) -> None:
        """The link ended. The device stays online until it misses two heartbeats (a quick
        reconnect over a flaky 4G link is not an outage); its commands wait for it."""
        if dev.link is not link:
            return  # replaced or closed by us: already accounted
        dev.link = None
        dev.ready = False
        self.connected -= 1
        log.info("device disconnected event=device_disconnect device=%s", dev.id)

    async def gone(self, dev: Device, link: Link, reason: str) -> None:
        """The transport knows the device is gone (the MQTT broker's last will): offline at once,
        not after two missed heartbeats."""
        if dev.link is not link:
            return  # a newer connection of the device took over
        await self.disconnected(dev, link)
        if dev.status != "offline" and not self.remote(dev):
            dev.record["node"] = ""
            await self._publish_node(dev)
            await self._status(dev, "offline", reason)

    async def receive(self, dev: Device, link: Link, raw: str | bytes) -> None:
        """One message of an authenticated connection."""
        if dev.link is not link:
            return  # a replaced connection still talking
        dev.last_seen = asyncio.get_running_loop().time()
        try:
            msg = parse_message(raw)
            kind = msg["type"]
            if kind == "heartbeat":
                await self._heartbeat(dev, parse_heartbeat(msg))
            elif kind == "ack":
                self._ack(dev, *parse_ack(msg))
            elif kind in REPORTS:
                report = parse_report(msg)
                for fn in self.report_listeners:
                    fn(dev, report)
            elif kind in self.handlers:
                await self.handlers[kind](dev, msg)
            else:
                raise ProtocolError(say("protocol.unknown_type", kind=kind),
                                    "type")
        except ProtocolError as e:
            await self.protocol_error(dev, link, str(e))

    async def protocol_error(self, dev: Device, link: Link, text: str) -> None:
        self.stats["errors"] += 1
        link.errors += 1
        log.info("bad device message event=device_bad_message device=%s errors=%d error=%s",
                 dev.id, link.errors, text[:200])
        if link.errors >= self.settings.max_errors:
            link.close(CLOSE_ABUSE, say("device.too_many_errors"))
            return
        if not link.closing():
            with suppress(Exception):
                await link.send(error_message(text))

    async def _heartbeat(self, dev: Device, telemetry: dict[str, Any]) -> None:
        self.stats["heartbeats"] += 1
        telemetry["at"] = time.time()
        dev.telemetry = telemetry
        self._tele_dirty.add(dev.id)
        faults = telemetry["faults"]
        status = "fault" if faults else "online"
        if faults != dev.record.get("faults") or (
                "firmware" in telemetry and telemetry["firmware"] != dev.record.get("firmware")):
            dev.record["faults"] = faults
            if "firmware" in telemetry:
                dev.record["firmware"] = telemetry["firmware"]
            if status == dev.status:
                self._persist_one(dev)
        if status != dev.status:
            await self._status(dev, status, "faults" if faults else "heartbeat")

    def _persist_one(self, dev: Device) -> None:
        rec = dev.record
        rec["status"] = dev.status
        rec["telemetry"] = dev.telemetry
        if dev.telemetry is not None:
            rec["last_seen"] = dev.telemetry["at"]
        self._tele_dirty.discard(dev.id)
        self._devw.mark(rec)

    async def _status(self, dev: Device, status: str, reason: str) -> None:
        await self._announce([self._change(dev, status, reason)])

    def _change(self, dev: Device, status: str, reason: str) -> dict[str, Any]:
        """Set a status and queue its write; the event to announce once it is written."""
        previous, dev.status = dev.status, status
        self._persist_one(dev)
        log.info("device status event=device_status device=%s status=%s previous=%s reason=%s",
                 dev.id, status, previous, reason)
        ev = self._event(dev, previous, reason)
        self._tell(ev)
        return ev

    def _event(self, dev: Device, previous: str, reason: str) -> dict[str, Any]:
        r = dev.record
        return {"v": PROTOCOL_VERSION, "device": dev.id, "name": r["name"], "kind": r["kind"],
                "area": r["area"], "status": dev.status, "previous": previous, "reason": reason,
                "faults": r.get("faults", []), "ts": time.time()}

    def _tell(self, ev: dict[str, Any]) -> None:
        for fn in self.status_listeners:
            try:
                fn(ev)
            except Exception:  # a listener's bug must not stop the control channel
                log.exception("status listener failed event=device_status_listener_error")

    async def _announce(self, events: list[dict[str, Any]]) -> None:
        """Status events go out once the store has the change: a subscriber that reads the
        device back sees what the event says."""
        await self._devw.flush()
        for ev in events:
            try:
                await self.publish("device.status", ev)
            except Exception:
                log.exception("bus publish failed event=device_status_publish_error device=%s",
                              ev["device"])

    # ---- commands ------------------------------------------------------------------------------
    def _enqueue(self, dev: Device, rec: Record) -> None:
        if dev.outbox is None:
            dev.outbox = {}
        dev.outbox[rec["id"]] = rec
        self._with_outbox.add(dev.id)
        if len(dev.outbox) > self.settings.max_queued:
            oldest = next(iter(dev.outbox.values()))
            self._set_status(oldest, "expired",
                             error=say("outbox.full"))

    def _set_status(self, rec: Record, status: str, **fields: Any) -> None:
        old = rec["status"]
        rec["status"] = status
        rec.update(fields)
        if status in FINAL:
            rec["done"] = time.time()
            self._due.pop(rec["id"], None)
            self._settled[rec["id"]] = None  # a copy routed back here later is dropped
            if len(self._settled) > self.MAX_SETTLED:
                self._settled.popitem(last=False)
            dev = self.devices.get(rec["device"])
            if dev is not None and dev.outbox is not None:
                dev.outbox.pop(rec["id"], None)
                if not dev.outbox:
                    dev.outbox = None
                    self._with_outbox.discard(dev.id)
        tally = self._tallies.get(rec.get("batch") or "")
        if tally is not None and old != status:
            tally.counts[old] -= 1
            tally.counts[status] += 1
        self._cmdw.mark(rec)

    async def _send(self, dev: Device, data: bytes) -> bool:
        """Write to the device's link when it takes it without waiting: a link with more than
        16 KB unsent (a device that does not read) is skipped, so one stuck device never holds up
        a fan-out (aiohttp only waits for drain once the transport is paused, above that)."""
        link = dev.link
        if link is None or link.closing() or link.unsent() > _SLOW_BYTES:
            return False
        try:
            await link.send(data)
        except Exception:  # the connection is going away: its handler will notice
            return False
        return True

    async def tell(self, devices: list[Device], data: bytes) -> int:
        """A notice (no id, no ack, not kept) to those of `devices` connected here: sent."""
        sent = 0
        for dev in devices:
            if dev.link is not None and await self._send(dev, data):
                sent += 1
        return sent

    async def _try_send(self, dev: Device, rec: Record, data: bytes | None = None) -> None:
        """Send a queued/sent command once more and schedule its retry."""
        if await self._send(dev, data or command_message(rec)):
            tries = rec["tries"] + 1
            self.stats["sent" if tries == 1 else "resent"] += 1
            self._set_status(rec, "sent", sent=time.time(), tries=tries)
        else:
            self._cmdw.mark(rec)  # stays queued; the retry tries again
        self._schedule(dev.id, rec)

    def _schedule(self, dev_id: str, rec: Record) -> None:
        due = asyncio.get_running_loop().time() + self.settings.retry_interval
        seq = self._due[rec["id"]] = next(self._seq)
        heapq.heappush(self._heap, (due, seq, dev_id, rec["id"]))
        if due < self._planned:
            self._wake.set()

    def _tally(self, batch: str, area: str, command: str) -> _Tally:
        t = self._tallies[batch] = _Tally(area, command, time.time())
        while len(self._tallies) > self.MAX_TALLIES:
            self._tallies.popitem(last=False)
        return t

    def tally(self, batch: str) -> Record | None:
        t = self._tallies.get(batch)
        return None if t is None else t.as_dict(batch)

    async def issue(self, devices: list[Device], command: str, args: dict[str, Any], *,
                    ttl: float | None = None, issuer: str | None = None,
                    area: str | None = None, single: bool = False) -> Issued:
        """A command (args already validated) to each device: sent at once to the connected ones,
        queued for the others, all persisted before this returns."""
        now = time.time()
        ttl = self.settings.command_ttl if ttl is None else ttl
        expires = round(now + ttl, 3)
        batch = new_id()
        tally = None if single else self._tally(batch, area or "", command)
        prefix, suffix = command_template(command, args, expires)
        shown = display_state(args, now) if command == "display" else None  # one for all
        online = 0
        ids = []
        routed: list[tuple[str, Record]] = []
        for i, dev in enumerate(devices):
            cid = batch if single else f"{batch}.{i}"
            ids.append(cid)
            rec: Record = {"id": cid, "device": dev.id, "command": command, "args": args,
                           "status": "queued", "created": now, "expires": expires, "tries": 0,
                           "batch": None if single else batch, "issuer": issuer}
            if tally is not None:
                tally.counts["queued"] += 1
            if self.remote(dev):  # its node keeps its state, delivers and retries
                self._cmdw.mark(rec)
                routed.append((dev.record["node"], rec))
                continue
            if command in STATEFUL_COMMANDS:
                self._remember(dev, command, args, shown, now)
            online += await self._offer(dev, rec, prefix + cid.encode() + suffix)
        await self._cmdw.flush()
        for node, rec in routed:  # after the store has them: the receiver may read them back
            await self._route(node, rec)
        log.info("device command event=device_command command=%s batch=%s devices=%d "
                 "online=%d routed=%d issuer=%s", command, batch, len(devices), online,
                 len(routed), issuer)
        return Issued(batch, ids, len(devices), online, len(routed))

    async def _offer(self, dev: Device, rec: Record, data: bytes | None = None) -> bool:
        """Queue a new command for a device of this node; send it at once when it is connected
        and nothing older waits. True: sent."""
        waiting = dev.outbox is not None and any(
            r["status"] == "queued" for r in dev.outbox.values())
        self._enqueue(dev, rec)
        if dev.link is not None and dev.ready and not waiting:
            await self._try_send(dev, rec, data)
            return bool(rec["status"] == "sent")
        self._cmdw.mark(rec)  # offline, its backlog is being delivered, or an older one waits
        if dev.link is not None and dev.ready:
            self._schedule(dev.id, rec)
        return False

    # ---- cluster: which node serves a device, commands routed to it -----------------------------
    def remote(self, dev: Device) -> bool:
        """Served by another node of the cluster (its commands go there)."""
        node = dev.record.get("node")
        return dev.link is None and bool(node) and node != self.node_id and self.bus is not None

    async def _load(self, device_id: str, fresh: bool = False) -> Device | None:
        """A device registered by another node since this one started, or (`fresh`) the record
        another node kept while it served the device: read it from the store."""
        if not isinstance(device_id, str) or not device_id:
            return None
        rec = await self.store.get("device", device_id)
        dev = self.devices.get(device_id)  # loaded meanwhile, or known and refreshed
        if rec is None:
            return dev
        if dev is None:
            dev = self.devices[device_id] = Device(rec)
        elif fresh and dev.link is None:
            dev.record = rec
            dev.telemetry = rec.get("telemetry")
        return dev

    async def _publish_node(self, dev: Device) -> None:
        if self.bus is None or not self.node_id:
            return
        try:
            await self.bus.publish(NODE_TOPIC, {"v": PROTOCOL_VERSION, "device": dev.id,
                                                "node": dev.record.get("node") or "",
                                                "status": dev.status, "origin": self.node_id})
        except Exception as e:  # noqa: BLE001 - the device is served here all the same
            log.error("bus publish failed event=device_node_publish_error device=%s error=%s",
                      dev.id, e)

    async def _claim(self, dev: Device) -> None:
        """A device connected here: take over the undelivered commands other nodes issued or
        held for it (from the store), and tell the cluster."""
        if self.bus is None or not self.node_id:
            return
        rows = await self.store.find("command", device=dev.id, status="queued")
        rows += await self.store.find("command", device=dev.id, status="sent")
        rows.sort(key=lambda r: (r.get("created", 0), r["id"]))
        for rec in rows:
            if rec["id"] not in (dev.outbox or {}) and rec["id"] not in self._settled:
                rec["status"] = "queued"
                rec["tries"] = 0
                self._enqueue(dev, rec)

    async def _route(self, node: str, rec: Record) -> None:
        assert self.bus is not None
        try:
            await self.bus.send(route_stream(node), {"v": PROTOCOL_VERSION, "command": rec})
            self.stats["routed"] += 1
        except Exception as e:  # noqa: BLE001 - the bus is down: hold it here instead
            log.error("bus send failed event=device_route_error device=%s node=%s error=%s",
                      rec["device"], node, e)
            dev = self.devices.get(rec["device"])
            if dev is not None:
                self._enqueue(dev, rec)

    async def _read_routes(self) -> None:
        """Commands other nodes issued for the devices of this node (durable: a command read
        before a crash and not acknowledged is read again after the restart)."""
        assert self.bus is not None
        stream = route_stream(self.node_id)
        while not self._stopping:
            try:
                got = await self.bus.receive(stream, ROUTE_GROUP, self.node_id, count=100,
                                             timeout=1.0)
            except BusClosed:
                return
            except Exception as e:  # noqa: BLE001 - the bus comes back: try again
                log.error("bus read failed event=device_route_error error=%s", e)
                await asyncio.sleep(1.0)
                continue
            for mid, body in got:
                try:
                    if "close" in body:  # revoked or deleted on the node that was asked
                        dev = self.devices.get(str(body["close"]))
                        if dev is not None:
                            await self._close_session(dev, str(body.get("reason", ""))[:100])
                            await self._load(dev.id, fresh=True)
                    else:
                        await self._accept(body.get("command"))
                except Exception:
                    log.exception("routed command failed event=device_route_error")
                with suppress(Exception):
                    await self.bus.ack(stream, ROUTE_GROUP, mid)

    async def _accept(self, rec: Any) -> None:
        """A command routed here: idempotent by id, expiry kept, held if the device left."""
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
            return
        dev = self.devices.get(rec.get("device", "")) or await self._load(rec.get("device", ""))
        if dev is None or rec["id"] in (dev.outbox or {}) or rec["id"] in self._settled:
            return
        stored = await self.store.get("command", rec["id"])
        if stored is not None and stored.get("status") in FINAL:
            return
        self.stats["received"] += 1
        rec["status"] = "queued"
        rec["tries"] = 0
        now = time.time()
        if float(rec.get("expires", 0)) <= now:
            rec["done"] = now
            rec["status"] = "expired"
            self._cmdw.mark(rec)
            return
        if self.remote(dev):  # it moved on meanwhile: pass it along
            await self._route(dev.record["node"], rec)
            return
        command, args = rec["command"], rec["args"]
        if command in STATEFUL_COMMANDS:
            shown = display_state(args, now) if command == "display" else None
            self._remember(dev, command, args, shown, now)
        await self._offer(dev, rec)

    async def _read_nodes(self, sub: BusSubscription) -> None:
        """`device.node` events until the subscription closes (at stop)."""
        async for ev in sub:
            try:
                await self._on_node(ev)
            except Exception:
                log.exception("device node event failed event=device_node_error")

    async def _on_node(self, ev: Record) -> None:
        """Another node serves a device now (or none does): hand over what is held for it."""
        if ev.get("origin") == self.node_id:
            return
        dev = self.devices.get(ev.get("device", "")) or await self._load(ev.get("device", ""))
        node = ev.get("node")
        if dev is None or not isinstance(node, str) or dev.link is not None:
            return  # connected here (an older event, or a half-open link its heartbeats end)
        dev.record["node"] = node
        if ev.get("status") in DEVICE_STATUSES:
            dev.status = ev["status"]
        if not node or node == self.node_id:
            return
        held = [r for r in (dev.outbox or {}).values() if r["status"] not in FINAL]
        for rec in held:
            self._due.pop(rec["id"], None)
        dev.outbox = None
        self._with_outbox.discard(dev.id)
        self._tele_dirty.discard(dev.id)
        for rec in held:
            await self._route(node, rec)

    def _remember(self, dev: Device, command: str, args: dict[str, Any],
                  shown: dict[str, Any] | None, now: float) -> None:
        """Keep what a display/emergency command leaves on the device in its record (sent again
        in `config`, so a board that reconnects or reloads shows it at once) and expire the
        older commands of that kind it has not received yet: the state supersedes them, and a
        board coming back must not flash an emergency that has ended since."""
        for rec in list((dev.outbox or {}).values()):
            if rec["command"] == command and (rec["status"] == "queued"
                                              or (rec["status"] == "sent" and dev.link is None)):
                self._set_status(rec, "expired", error=say("outbox.superseded"))
        r = dev.record
        # `shown` (the display state) is shared by every device of a bulk command: never
        # mutated in place, only replaced.
        state = shown if command == "display" else emergency_state(args, r.get("emergency"),
                                                                   now)
        if state is None:
            r.pop(command, None)
        else:
            r[command] = state
        self._devw.mark(r)

    def _ack(self, dev: Device, cid: str, ok: bool, error: str | None) -> None:
        rec = (dev.outbox or {}).get(cid)
        if rec is None:
            return  # a late ack of a command already settled: harmless
        self.stats["acks"] += 1
        if ok:
            self._set_status(rec, "acked", acked=time.time())
        else:
            self._set_status(rec, "failed", acked=time.time(),
                             error=(error or say("outbox.refused"))[:500])
        if self.ack_listeners:
            t = asyncio.get_running_loop().time()
            for fn in self.ack_listeners:
                fn(rec, t)

    # ---- the periodic task ---------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        check_every = min(max(s.heartbeat / 4, 0.05), 5.0)
        expire_every = min(max(s.command_ttl / 10, 0.1), 30.0)
        now = loop.time()
        next_check, next_persist, next_expire = (now + check_every, now + s.persist_interval,
                                                 now + expire_every)
        while True:
            now = loop.time()
            try:
                if now >= next_check:
                    next_check = max(next_check + check_every, now)
                    await self._check_offline(now)
                if now >= next_persist:
                    next_persist = max(next_persist + s.persist_interval, now)
                    self._persist_telemetry()
                if now >= next_expire:
                    next_expire = max(next_expire + expire_every, now)
                    self._expire()
                await self._retries(now)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("device sweep failed event=device_sweep_error")
            self._planned = min(next_check, next_persist, next_expire,
                                self._heap[0][0] if self._heap else math.inf)
            self._wake.clear()
            if self._planned > loop.time():
                with suppress(TimeoutError):
                    async with asyncio.timeout_at(self._planned):
                        await self._wake.wait()

    async def _check_offline(self, now: float) -> None:
        hb = self.settings.heartbeat
        limit = now - (2 * hb + 0.1 * hb)  # two heartbeats missed (plus 10 % for the network)
        late = [d for d in self.devices.values() if d.status != "offline" and d.last_seen < limit
                and not self.remote(d)]
        events = []
        for dev in late:
            dev.record["node"] = ""
            await self._publish_node(dev)
            if dev.link is not None:
                dev.link.close(CLOSE_HEARTBEAT, say("device.missed_heartbeats"))
                dev.link = None
                dev.ready = False
                self.connected -= 1
            events.append(self._change(dev, "offline", "missed_heartbeats"))
        if events:
            await self._announce(events)

    def _persist_telemetry(self) -> None:
        for dev_id in list(self._tele_dirty):
            dev = self.devices.get(dev_id)
            if dev is not None:
                self._persist_one(dev)
        self._tele_dirty.clear()

    def _expire(self) -> None:
        now = time.time()
        for dev_id in list(self._with_outbox):
            dev = self.devices.get(dev_id)
            for rec in list((dev.outbox or {}).values()) if dev else ():
                if rec["expires"] <= now:
                    self._set_status(rec, "expired")

    async def _retries(self, now: float) -> None:
        wall = time.time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, dev_id, cid = heapq.heappop(heap)
            if self._due.get(cid) != seq:
                continue  # settled, or rescheduled since
            del self._due[cid]
            dev = self.devices.get(dev_id)
            rec = (dev.outbox or {}).get(cid) if dev else None
            if dev is None or rec is None:
                continue
            if rec["expires"] <= wall:
                self._set_status(rec, "expired")
            elif dev.link is None:
                continue  # waits for the reconnect
            elif not dev.ready:  # its backlog is being delivered: look again later
                self._schedule(dev.id, rec)
            elif rec["tries"] >= self.settings.max_tries:
                self._set_status(rec, "failed",
                                 error=say("outbox.no_ack", tries=rec["tries"]))
            else:
                await self._try_send(dev, rec)
