"""GET /api/v1/events: the console's live events (Server-Sent Events), each client seeing only
the areas related to it (Principal.related).

One hub per app fans in the engine's on-air changes, the bus topics "device.status" and
"emergency", device command acknowledgements (`command`: one per single command, a batch's counts
at most every BATCH_EVERY seconds, so a bulk command to 10,000 devices never floods the queues),
and programme/schedule/inbox changes published by the API handlers. Each client has a
bounded queue: on overflow the oldest events go and one `resync` tells it to reload its view.
Engine listeners run on the engine's tick: they only append to queues, never wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from loa.streamer.emergency.service import TOPIC as EMERGENCY_TOPIC
from loa.streamer.engine import OnAirChange
from loa.streamer.hub import DropOldest
from loa.streamer.state.bus import BusSubscription
from loa.web.auth import Principal
from loa.web.http import TOKEN_ID, principal
from loa.web.node import NODE, Node

log = logging.getLogger("loa.events")

QUEUE = 256
PING = 15.0
BATCH_EVERY = 0.3  # seconds between two `command` events of one batch


class Client(DropOldest[tuple[str, dict[str, Any]]]):
    """One stream's queue, the hub's drop-oldest one: `dropped` growing means `resync`."""

    def __init__(self, p: Principal, tid: str) -> None:
        super().__init__(QUEUE)
        self.principal = p
        self.tid = tid
        self.told = 0  # `dropped` when the client was last told to resync

    def put(self, name: str, data: dict[str, Any]) -> None:
        self._enqueue([(name, data)])


class EventHub:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.clients: set[Client] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[BusSubscription] = []
        self._batches: set[str] = set()  # batches with acks not told yet
        self.closing = False

    async def start(self) -> None:
        self.node.engine.listeners.append(self._on_air)
        self.node.devices.ack_listeners.append(self._ack)
        for topic, handle in (("device.status", self._device), (EMERGENCY_TOPIC, self._emergency)):
            sub = await self.node.bus.subscribe(topic)
            self._subs.append(sub)
            self._tasks.append(asyncio.create_task(self._pump(sub, handle)))

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.node.engine.listeners.remove(self._on_air)
        with contextlib.suppress(ValueError):
            self.node.devices.ack_listeners.remove(self._ack)
        for t in self._tasks:
            t.cancel()
        for sub in self._subs:
            await sub.close()

    def publish(self, name: str, data: dict[str, Any], areas: list[str],
                inside: bool = False) -> None:
        """To every client related to one of `areas` (`inside`: only clients whose subtree holds
        it); `data["areas"]`, when present, is cut down to the areas in that client's scope."""
        tree = self.node.tree
        for c in list(self.clients):
            mine = [a for a in areas if (tree.contains(c.principal.area, a) if inside
                                         else c.principal.related(tree, a))]
            if mine:
                c.put(name, {**data, "areas": mine} if "areas" in data else data)

    def _on_air(self, change: OnAirChange) -> None:
        try:
            now = self.node.engine.on_air(change.area)
        except Exception:  # noqa: BLE001 - the tick must go on
            return
        self.publish("onair", {k: now[k] for k in ("area", "broadcast", "title", "class",
                                                   "issuer", "since")} | {"cause": change.cause},
                     [change.area])

    def _ack(self, rec: dict[str, Any], _t: float) -> None:
        """A command acknowledged (or refused) by its device: a single command's outcome goes
        to those who see the device; a batch's counts once per BATCH_EVERY to those who may read
        the batch (its area in their subtree, as GET /devices/commands/{batch})."""
        batch = rec.get("batch")
        if not batch:
            dev = self.node.devices.get(rec["device"])
            if dev is not None:
                self.publish("command", {"id": rec["id"], "device": rec["device"],
                                         "command": rec["command"], "status": rec["status"],
                                         "error": rec.get("error")}, [dev.record["area"]],
                             inside=True)
            return
        if batch not in self._batches:
            self._batches.add(batch)
            asyncio.get_running_loop().call_later(BATCH_EVERY, self._tell_batch, batch)

    def _tell_batch(self, batch: str) -> None:
        self._batches.discard(batch)
        tally = self.node.devices.tally(batch)
        if tally is not None and tally["area"] in self.node.tree:
            self.publish("command", tally, [tally["area"]], inside=True)

    async def _device(self, ev: dict[str, Any]) -> None:
        self.publish("device", {"id": ev.get("device"), "name": ev.get("name"),
                                "area": ev.get("area"), "status": ev.get("status"),
                                "at": ev.get("ts")}, [str(ev.get("area"))])

    async def _emergency(self, ev: dict[str, Any]) -> None:
        start = ev.get("event") == "start"
        eid = str(ev.get("id"))
        # An end carries only the id: the areas and title are the record's.
        rec = ev.get("record") if start else await self.node.store.get("emergency", eid)
        if not isinstance(rec, dict):
            return
        areas = [a for a in rec.get("areas", []) if isinstance(a, str)]
        self.publish("emergency", {"id": eid, "state": "start" if start else "end",
                                   "title": rec.get("title"), "areas": areas,
                                   "issuer": rec.get("issuer")}, areas)

    async def _pump(self, sub: BusSubscription,
                    handle: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        async for ev in sub:
            try:
                await handle(ev)
            except Exception:  # noqa: BLE001 - one odd event must not end the stream
                log.exception("event not relayed event=events_relay_error")

    def close_all(self) -> None:
        self.closing = True
        for c in self.clients:
            c._wake()


HUB: web.AppKey[EventHub] = web.AppKey("events", EventHub)


def hub_of(request: web.Request) -> EventHub:
    return request.app[HUB]


def _frame(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _still_valid(node: Node, tid: str) -> bool:
    tok = await node.store.get("token", tid)
    return tok is not None and tok["expires"] >= time.time()


async def events(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    p.require("read")
    hub = hub_of(request)
    client = Client(p, request[TOKEN_ID])
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    hub.clients.add(client)
    try:
        await resp.write(b"retry: 1000\n\n")
        while True:
            try:
                item = await asyncio.wait_for(client._next(lambda: hub.closing), PING)
            except TimeoutError:
                item = None
            if hub.closing or not await _still_valid(hub.node, client.tid):
                break  # revoked or expired: the client must log in again
            if item is None:
                await resp.write(b": ping\n\n")
                continue
            if client.dropped != client.told:
                client.told = client.dropped
                await resp.write(_frame("resync", {}))
            await resp.write(_frame(*item))
            while client.queue:
                await resp.write(_frame(*client.queue.popleft()))
    except ConnectionResetError:
        pass  # the client left
    finally:
        hub.clients.discard(client)
    return resp


def setup(app: web.Application) -> None:
    node = app[NODE]
    hub = EventHub(node)
    app[HUB] = hub
    app.router.add_get("/api/v1/events", events)

    async def start(_app: web.Application) -> None:
        await hub.start()

    async def stop(_app: web.Application) -> None:
        await hub.stop()

    async def closing(_app: web.Application) -> None:
        hub.close_all()  # before aiohttp waits for the handlers

    app.on_startup.append(start)
    app.on_shutdown.append(closing)
    app.on_cleanup.append(stop)
