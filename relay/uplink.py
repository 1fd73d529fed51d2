"""Upward over the node link, store and forward: what a child node reports to its parent.

Child (`Uplink`): every as-run entry it closes, each device's status, the delivery of each of
the parent's broadcasts it aired, and an audit summary every `[upstream] audit_s` are stored
first in the upward queue (the exchange's Outbox on store kind `uplink_out`: it survives a
restart and an outage of any length) and sent over the link as text messages, at most WINDOW
unacknowledged. The parent acks each by its cursor, cumulatively (every message sent before it
on this connection is done too); the child then deletes them. A reconnect resends what was not
acked and the parent deduplicates by (node, message id), so a replay adds nothing. A device's
status and a broadcast's delivery are states: a newer one replaces the queued one. The queue is
bounded (`queue_max`): beyond it a new message is dropped, logged (event=uplink_full), counted
(`loa_uplink_total{event="dropped"}`) and an alert raised; the child's own store still holds it.

Parent (`UplinkReceiver`): each message is validated; one about an area outside the child's key
area (or a broadcast that never reached it) is refused in its ack, counted and not stored. What
is taken is stored scoped to that area: as-run entries in this node's own as-run log tagged with
the node (`node`, `node_name`, `via`: the node names below it), devices as `node_device`
records, deliveries on the broadcast record (`children`: one row per node), audit summaries in the audit log. A
parent that has a parent of its own forwards what it took (same message, `origin` lengthened),
so the province's reports cover its whole tree.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from loa.relay.devices.protocol import DEVICE_KINDS, DEVICE_STATUSES
from loa.relay.exchange import ExchangeSettings, Outbox, cursor_of
from loa.relay.link import LinkError
from loa.relay.upstream import UpstreamSettings
from loa.streamer.alerts import Alert, Alerts
from loa.streamer.areas import AreaTree
from loa.streamer.broadcast import BroadcastClass
from loa.streamer.messages import say
from loa.streamer.state.bus import Bus
from loa.streamer.state.store import Record, Store, StoreUnavailable

log = logging.getLogger("loa.uplink")

KIND = "uplink_out"  # store kind of the child's upward queue
PARENT = "parent"  # its one peer
# Each type's fields besides "type", "id", "cursor" and "origin" (the node names below the sender).
FIELDS = {"asrun": {"entry"}, "device": {"device"},
          "delivery": {"broadcast", "areas", "seconds", "loudspeakers"},
          "audit": {"from", "to", "actions"}}
TYPES = tuple(FIELDS)
WINDOW = 64  # messages sent and not yet acked
MAX_MESSAGE = 16 * 1024  # bytes of one upward message
AUDIT_CATCH_UP = 24  # audit windows summarised again at start (idempotent at the parent)
RETRY_S = 1.0  # the parent's store was unavailable: the window is sent again after this
ASRUN_FIELDS = ("area", "broadcast", "title", "class", "issuer", "start", "end", "seconds",
                "start_cause", "end_cause", "preempted", "followed_by")
SUMMARY = "node.audit_summary"  # the audit action of a child's summary on its parent
_ID = re.compile(r"[0-9A-Za-z_.:-]{1,240}")
_CLASSES = frozenset(BroadcastClass.__members__)

Speakers = Callable[[set[str]], tuple[int, int]]  # leaf areas -> loudspeakers (total, online)


class Refused(Exception):
    """One upward message the parent will not take (bilingual reason); the link stays up."""


# ---- the child ------------------------------------------------------------------------------------
class Uplink:
    def __init__(self, store: Store, settings: UpstreamSettings, tree: AreaTree,
                 alerts: Alerts | None = None) -> None:
        self.store = store
        self.settings = settings
        self.tree = tree
        self.alerts = alerts
        self.queue = Outbox(store, ExchangeSettings(), kind=KIND)  # never pushes: the link sends
        self.counts = {"queued": 0, "sent": 0, "acked": 0, "refused": 0, "dropped": 0,
                       "retries": 0}
        # Messages in the queue: counted in the store once, then kept here (a count per
        # message would cost O(queue)); counted again before anything is dropped.
        self.pending: int | None = None
        self._wake = asyncio.Event()
        self._acks: deque[dict[str, Any]] = deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._full = False
        self._unhook: Callable[[], None] | None = None  # stops following the engine's ends
        # What to send on this connection, oldest first: read from the store once when the
        # link comes up, then fed by put() (a backlog of any size is read once, not per round).
        self._backlog: deque[Record] | None = None
        self._sender: asyncio.Task[None] | None = None  # sends on the connection that is up

    # ---- what goes up -----------------------------------------------------------------------
    async def put(self, kind: str, mid: str, body: Record, replace: bool = False) -> bool:
        """Queue one message (idempotent by id); False when the queue is full and it is dropped."""
        if self.pending is None or self.pending >= self.settings.queue_max:
            self.pending = await self.queue.queued(PARENT)  # counted, not estimated
        if self.pending >= self.settings.queue_max:
            self.counts["dropped"] += 1
            log.error("upward queue full, message dropped event=uplink_full type=%s id=%s "
                      "queued=%d dropped=%d", kind, mid, self.pending, self.counts["dropped"])
            self._alert(True)
            return False
        before = time.time()
        rec = await self.queue.put(PARENT, {"id": mid, "type": kind, **body}, replace=replace)
        if self._backlog is not None:  # connected: the sender takes it from memory
            self._backlog.append(rec)
        if rec["created"] >= before:  # stored now (not one already queued under its id)
            self.pending += 1
        self.counts["queued"] += 1
        self._wake.set()
        return True

    def _alert(self, full: bool) -> None:
        if self.alerts is None or full == self._full:
            return
        self._full = full
        root = self.tree.roots()[0].code
        if full:
            self.alerts.raise_(Alert("uplink_full", "parent", root, say(
                "uplink.full", limit=self.settings.queue_max), severity="critical"))
        else:
            self.alerts.clear("uplink_full", "parent")

    async def asrun(self, entry: Record) -> None:
        """A closed as-run entry of this node (the station's hook, inside its retried write)."""
        await self.put("asrun", f"asrun:{entry['id']}",
                       {"entry": {k: entry.get(k) for k in ASRUN_FIELDS}, "origin": []})

    async def device(self, ev: Record) -> None:
        await self.put("device", f"device:{ev['device']}", {"device": {
            "id": ev["device"], "name": ev.get("name"), "kind": ev.get("kind"),
            "area": ev.get("area"), "status": ev.get("status"),
            "changed": ev.get("ts") or time.time()}, "origin": []}, replace=True)

    async def delivery(self, bid: str, speakers: Speakers | None) -> None:
        """When one of the parent's broadcasts ends here: areas reached, seconds on air and the
        loudspeakers there, from this node's as-run log."""
        rec = await self.store.get("broadcast", bid)
        if not rec or (rec.get("spec") or {}).get("live") != "upstream":
            return
        rows = await self.store.read_log("asrun", broadcast=bid, limit=100_000)
        areas = {r["area"] for r in rows}
        leaves = {a for a in areas if a in self.tree and not self.tree.get(a).children}
        total, online = speakers(leaves) if speakers else (0, 0)
        await self.put("delivery", f"delivery:{bid}", {
            "broadcast": bid, "areas": len(areas),
            "seconds": round(sum(float(r.get("seconds") or 0) for r in rows), 3),
            "loudspeakers": {"total": total, "online": online}, "origin": []}, replace=True)

    async def audit_summary(self, window: int) -> None:
        """The writes of one window of `audit_s` seconds (windows are aligned on the clock, so
        a repeat after a restart is the same message), counted by action; none when empty."""
        every = self.settings.audit_s
        since, until = window * every, (window + 1) * every
        rows = [r for r in await self.store.read_log("audit", since=since, until=until,
                                                     limit=1_000_000)
                if r.get("action") != SUMMARY]  # a child's summaries go up on their own
        if rows:
            actions = Counter(str(r.get("action"))[:64] for r in rows)
            await self.put("audit", f"audit:{int(since)}", {
                "from": since, "to": until, "actions": dict(actions.most_common(200)),
                "origin": []})

    async def forward(self, node: Record, msg: Record) -> None:
        """A message a child of this node sent and this node took: up again, under its id."""
        body = {k: v for k, v in msg.items() if k not in ("id", "type", "cursor")}
        body["origin"] = [node["name"], *msg.get("origin", [])]
        await self.put(msg["type"], f"{node['id']}:{msg['id']}", body,
                       replace=msg["type"] in ("device", "delivery"))

    # ---- watchers --------------------------------------------------------------------------
    def start(self, bus: Bus, ended: list[Callable[..., None]], flush: Callable[[], Awaitable[Any]],
              speakers: Speakers) -> None:
        """Follow device status on the bus, broadcast ends (the engine's tick thread) and the
        audit log's clock."""
        loop = asyncio.get_running_loop()

        def on_end(b: Any, cause: str) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._spawn, self._after_end(b.id, flush, speakers))

        ended.append(on_end)
        self._unhook = lambda: ended.remove(on_end)
        self._spawn(self._devices(bus))
        self._spawn(self._count())
        if self.settings.audit_s > 0:
            self._spawn(self._audits())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _count(self) -> None:
        """What a restart left in the queue, for the figures before the link is up."""
        try:
            if self.pending is None:
                self.pending = await self.queue.queued(PARENT)
        except StoreUnavailable as e:
            log.error("upward queue not counted event=uplink_error error=%s", e)

    async def _after_end(self, bid: str, flush: Callable[[], Awaitable[Any]],
                         speakers: Speakers) -> None:
        try:
            await flush()  # the as-run entries of its last segments first
            await self.delivery(bid, speakers)
        except StoreUnavailable as e:
            log.error("delivery not queued event=uplink_error broadcast=%s error=%s", bid, e)

    async def _devices(self, bus: Bus) -> None:
        sub = await bus.subscribe("device.status")
        try:
            async for ev in sub:
                try:
                    await self.device(ev)
                except StoreUnavailable as e:
                    log.error("device status not queued event=uplink_error error=%s", e)
        finally:
            await sub.close()

    async def _audits(self) -> None:
        """Each window once it is over (and a little: writes of its last instant land), and at
        start the last AUDIT_CATCH_UP windows: those a stop interrupted go up too."""
        loop = asyncio.get_running_loop()
        every = self.settings.audit_s
        settle = min(every / 2, 5.0)
        window = int(time.time() // every)
        todo = list(range(window - AUDIT_CATCH_UP, window))
        deadline = loop.time() + (window + 1) * every + settle - time.time()
        while True:
            for w in todo:
                try:
                    await self.audit_summary(w)
                except StoreUnavailable as e:
                    log.error("audit summary not queued event=uplink_error error=%s", e)
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            deadline += every  # absolute deadlines: no drift
            todo = [window]
            window += 1

    async def close(self) -> None:
        await self.detach()
        if self._unhook is not None:
            self._unhook()
            self._unhook = None
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- the link (relay/upstream.py calls these) ----------------------------------------------
    def attach(self, send: Callable[[str], Awaitable[None]]) -> None:
        """The link is up (the parent said hello): send what is queued, then what comes.
        Called again on the same connection, it changes nothing."""
        if self._sender is not None:
            return
        self._acks.clear()
        self._backlog = None
        self._sender = asyncio.get_running_loop().create_task(self._send(send))

    async def detach(self) -> None:
        """The connection is over."""
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
            self._sender = None
        self._backlog = None

    def acked(self, msg: Record) -> None:
        """The parent's `ack` (text event on the link): applied by the sender task."""
        if not isinstance(msg.get("cursor"), str):
            raise LinkError(say("link.event_unknown", type="ack"))
        self._acks.append(msg)
        self._wake.set()

    async def _send(self, send: Callable[[str], Awaitable[None]]) -> None:
        inflight: deque[tuple[str, Record]] = deque()
        sent: set[str] = set()  # cursors sent on this connection, not yet acked
        while True:
            try:
                await self._round(send, inflight, sent)
            except StoreUnavailable as e:
                log.error("upward queue unreadable event=uplink_error error=%s", e)
                await asyncio.sleep(RETRY_S)  # a backoff, not a wait for a condition
            except (ConnectionError, aiohttp.ClientError):
                return  # the connection is over: the link reconnects, this task is detached

    async def _round(self, send: Callable[[str], Awaitable[None]],
                     inflight: deque[tuple[str, Record]], sent: set[str]) -> None:
        """Apply the acks, fill the window, wait for news (an ack, a message queued)."""
        self._wake.clear()
        if await self._settle(inflight, sent):
            inflight.clear()
            sent.clear()
            self._backlog = None
            self.counts["retries"] += 1
            # A backoff before resending, not a wait for a condition.
            await asyncio.sleep(RETRY_S)
            return
        if self._backlog is None:
            self._backlog = deque()  # what is put while the store is read lands here, after it
            stored = await self.queue.feed(PARENT, None, self.settings.queue_max + WINDOW)
            self.pending = len(stored) + len(self._backlog)  # counted again at each connection
            self._backlog.extendleft(reversed(stored))
        while len(inflight) < WINDOW and self._backlog:
            rec = self._backlog.popleft()
            c = cursor_of(rec)
            if c in sent:  # queued again while on its way (an idempotent put)
                continue
            await send(json.dumps({**rec["message"], "cursor": c}, ensure_ascii=False))
            sent.add(c)
            inflight.append((c, rec))
            self.counts["sent"] += 1
        await self._wake.wait()

    async def _settle(self, inflight: deque[tuple[str, Record]], sent: set[str]) -> bool:
        """Apply the acks received: delete what the parent took. True: resend the window."""
        while self._acks:
            ack = self._acks.popleft()
            if ack.get("retry"):
                return True
            cursor = ack["cursor"]
            if all(c != cursor for c, _ in inflight):
                continue  # not of this window (a reset): harmless
            while inflight:
                c, rec = inflight.popleft()
                if await self.queue.done(rec) and self.pending:
                    self.pending -= 1
                sent.discard(c)
                self.counts["acked"] += 1
                if c == cursor:
                    break
            if ack.get("refused"):
                self.counts["refused"] += 1
                log.warning("parent refused a report event=uplink_refused id=%s reason=%s",
                            ack.get("id"), ack["refused"])
        if self.pending is not None and self.pending < self.settings.queue_max:
            self._alert(False)
        return False

    def stats(self) -> dict[str, Any]:
        return {"queued_now": self.pending or 0, **self.counts}


# ---- the parent ----------------------------------------------------------------------------------
def _text(v: Any, limit: int, name: str, optional: bool = True) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v or len(v) > limit:
        raise Refused(say("uplink.bad_field", field=name))
    return v


def _number(v: Any, name: str, low: float = 0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < low:
        raise Refused(say("uplink.bad_field", field=name))
    return float(v)


def _count(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise Refused(say("uplink.bad_field", field=name))
    return v


class UplinkReceiver:
    """Takes the upward messages of every child linked to this node."""

    def __init__(self, store: Store, tree: AreaTree) -> None:
        self.store = store
        self.tree = tree
        self.forward: Uplink | None = None  # this node's own way up, when it has a parent
        # Told of each message taken, after it is stored: (type, what was stored).
        self.taken: list[Callable[[str, Record], Awaitable[None]]] = []
        self.counts = {t: 0 for t in TYPES} | {"refused": 0}

    def parse(self, data: str) -> Record:
        """An upward message's envelope, or LinkError (not one: the link is refused)."""
        if len(data) > MAX_MESSAGE:
            raise LinkError(say("uplink.too_large", limit=MAX_MESSAGE))
        try:
            msg = json.loads(data)
        except (ValueError, RecursionError):
            raise LinkError(say("link.frame_short")) from None
        if not isinstance(msg, dict) or msg.get("type") not in TYPES:
            kind = msg.get("type") if isinstance(msg, dict) else None
            raise LinkError(say("link.event_unknown", type=str(kind)[:40]))
        if not isinstance(msg.get("cursor"), str) or len(msg["cursor"]) > 300:
            raise LinkError(say("uplink.bad_field", field="cursor"))
        return msg

    async def receive(self, node: Record, data: str) -> Record:
        """One message from the child `node` (its key record): the ack to send back. LinkError
        for what is no upward message at all."""
        msg = self.parse(data)
        ack: Record = {"type": "ack", "cursor": msg["cursor"]}
        try:
            await self.take(node, msg)
        except Refused as e:
            self.counts["refused"] += 1
            log.warning("child report refused event=uplink_refused node=%s type=%s reason=%s",
                        node["id"], msg["type"], e)
            return {**ack, "id": str(msg.get("id"))[:240], "refused": str(e)}
        except StoreUnavailable as e:
            log.error("child report not stored event=uplink_store node=%s error=%s",
                      node["id"], e)
            return {**ack, "retry": True}
        self.counts[msg["type"]] += 1
        return ack

    def _inside(self, node: Record, area: Any, name: str = "area") -> str:
        own = node["area"]
        if not isinstance(area, str) or area not in self.tree \
                or own not in self.tree or not self.tree.contains(own, area):
            raise Refused(say("link.area_outside", area=str(area)[:64], own=own))
        return area

    async def take(self, node: Record, msg: Record) -> None:
        mid = _text(msg.get("id"), 240, "id", optional=False)
        assert mid is not None
        if not _ID.fullmatch(mid):
            raise Refused(say("uplink.bad_field", field="id"))
        extra = sorted(set(msg) - FIELDS[msg["type"]] - {"type", "id", "cursor", "origin"})
        if extra:
            raise Refused(say("uplink.bad_field", field=extra[0][:40]))
        origin = msg.get("origin", [])
        if not isinstance(origin, list) or len(origin) > 8 \
                or not all(isinstance(o, str) and 0 < len(o) <= 100 for o in origin):
            raise Refused(say("uplink.bad_field", field="origin"))
        key = f"{node['id']}:{mid}"
        kind = msg["type"]
        if kind == "asrun":
            stored = await self._asrun(node, key, msg, origin)
        elif kind == "device":
            stored = await self._device(node, key, msg, origin)
        elif kind == "delivery":
            stored = await self._delivery(node, key, msg, origin)
        else:
            stored = await self._audit(node, key, msg, origin)
        if self.forward is not None:
            await self.forward.forward(node, msg)
        for hook in self.taken:
            try:
                await hook(kind, stored)
            except StoreUnavailable:
                raise
            except Exception:  # noqa: BLE001 - a listener's fault must not refuse the report
                log.exception("uplink listener failed event=uplink_error type=%s", kind)

    async def _asrun(self, node: Record, key: str, msg: Record, origin: list[str]) -> Record:
        e = msg.get("entry")
        if not isinstance(e, dict) or set(e) - set(ASRUN_FIELDS):
            raise Refused(say("uplink.bad_field", field="entry"))
        area = self._inside(node, e.get("area"))
        start, end = _number(e.get("start"), "start"), _number(e.get("end"), "end")
        if end < start:
            raise Refused(say("uplink.bad_field", field="end"))
        if e.get("class") is not None and e["class"] not in _CLASSES:
            raise Refused(say("uplink.bad_field", field="class"))
        entry: Record = {
            "id": key, "area": area, "broadcast": _text(e.get("broadcast"), 64, "broadcast",
                                                        optional=False),
            "title": _text(e.get("title"), 500, "title"), "class": e.get("class"),
            **{f: _text(e.get(f), 64, f) for f in ("issuer", "start_cause", "end_cause",
                                                    "preempted", "followed_by")},
            "start": start, "end": end, "seconds": round(end - start, 3),
            "node": node["id"], "node_name": node["name"], "via": origin,
            "ts": min(end, time.time())}
        return await self.store.append("asrun", entry)  # once per id: a replay adds nothing

    async def _device(self, node: Record, key: str, msg: Record, origin: list[str]) -> Record:
        d = msg.get("device")
        if not isinstance(d, dict):
            raise Refused(say("uplink.bad_field", field="device"))
        area = self._inside(node, d.get("area"))
        if d.get("kind") not in DEVICE_KINDS or d.get("status") not in DEVICE_STATUSES:
            raise Refused(say("uplink.bad_field", field="device"))
        rec: Record = {"id": key, "node": node["id"], "via": origin, "area": area,
                       "device": _text(d.get("id"), 64, "device.id", optional=False),
                       "name": _text(d.get("name"), 200, "device.name"), "kind": d["kind"],
                       "status": d["status"], "changed": _number(d.get("changed"), "changed")}
        known = await self.store.get("node_device", key)
        if known is None or known["changed"] <= rec["changed"]:  # a replay of an older state
            await self.store.put("node_device", rec)
        return rec

    async def _delivery(self, node: Record, key: str, msg: Record, origin: list[str]
                        ) -> Record:
        bid = _text(msg.get("broadcast"), 64, "broadcast", optional=False)
        assert bid is not None
        rec = await self.store.get("broadcast", bid)
        own = node["area"]
        if rec is None or not any(t in self.tree and (self.tree.contains(t, own) or
                                                      self.tree.contains(own, t))
                                  for t in rec.get("targets", [])):
            raise Refused(say("uplink.not_reached", id=bid))
        sp = msg.get("loudspeakers")
        if not isinstance(sp, dict):
            raise Refused(say("uplink.bad_field", field="loudspeakers"))
        row = {"node": node["id"], "node_name": node["name"], "via": origin,
               "areas": _count(msg.get("areas"), "areas"),
               "seconds": _number(msg.get("seconds"), "seconds"),
               "loudspeakers": {k: _count(sp.get(k), f"loudspeakers.{k}")
                                for k in ("total", "online")}}
        rows = [r for r in rec.get("children", [])
                if (r.get("node"), r.get("via")) != (node["id"], origin)]
        return await self.store.update("broadcast", bid, {"children": [*rows, row]})

    async def _audit(self, node: Record, key: str, msg: Record, origin: list[str]) -> Record:
        since, until = _number(msg.get("from"), "from"), _number(msg.get("to"), "to")
        actions = msg.get("actions")
        if not isinstance(actions, dict) or len(actions) > 200:
            raise Refused(say("uplink.bad_field", field="actions"))
        counts = {_text(a, 64, "actions") or "": _count(n, "actions") for a, n in actions.items()}
        return await self.store.append("audit", {
            "id": key, "user": f"node:{node['name']}", "area": node["area"],
            "action": SUMMARY, "target": node["id"], "ip": None,
            "ts": min(until, time.time()),
            "details": {"from": since, "to": until, "actions": counts, "via": origin}})
