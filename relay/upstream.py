"""The link between nodes, child side: the parent's broadcasts enter this node's own arbiter.

A child node (config `[upstream] url, key, areas`) keeps one WebSocket to its parent up
(relay/link.py describes the messages). Each of the parent's broadcasts that reaches the child's
areas starts here as a broadcast with the parent's id, class, issuer and title, so this node's
arbiter ranks it exactly as the parent's would (authority is the issuer's depth in the tree: the
child's tree holds the parent's areas above its own part). Its audio is one Opus stream, decoded
once (libopus) into a `LivePush` whatever the number of areas that hear it.

Control events are idempotent by id, and every (re)connection starts with the parent's `hello`:
what is missing starts, what is gone stops, what is known stays (never started twice).

The parent unreachable: reconnect after 0.25 s, doubling to at most `backoff_max` (0.5 s, so
the parent's audio is back within a second of the network's return, the attempt and the jitter
buffer included; each wait cut by up to a quarter at random so the communes of a restarted
parent do not reconnect in lockstep). What
the parent was airing is held `hold_s` (a reconnect within it changes nothing on the air) and
then let go, so the child's own programmes come back; a parent's emergency is kept until the
parent says it is over. A refused credential is logged and shown with the parent's reason; the
child airs its own programmes meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from loa.codecs.opus import OpusDecoder
from loa.relay.link import CLOSE_AREAS, CLOSE_CREDENTIAL, CLOSE_LOOP, LinkError, decode_frame
from loa.streamer.alerts import Alert, Alerts
from loa.streamer.areas import AreaTree
from loa.streamer.broadcast import BroadcastClass
from loa.streamer.clock import FRAME
from loa.streamer.messages import say
from loa.streamer.sources import LivePush
from loa.streamer.station import Content, Station

if TYPE_CHECKING:
    from loa.relay.uplink import Uplink

log = logging.getLogger("loa.upstream")

ORIGIN = ("issuer", "issuer_path", "authority")  # as the first node issued it, kept in the record
MAX_CONCEAL = 5  # lost frames concealed (Opus PLC); a longer gap resumes without filling it


@dataclass
class UpstreamSettings:
    url: str = ""  # the parent node, e.g. "https://tinh.example.vn"; empty: no parent
    key: str = ""  # the node credential the parent issued (POST /api/v1/nodes)
    areas: list[str] = field(default_factory=list)  # the part of the tree this node serves
    backoff_min: float = 0.25
    backoff_max: float = 0.5
    hold_s: float = 2.0  # after a link loss, the parent's broadcasts (not emergencies) stay
    buffer_ms: float = 60.0  # the jitter buffer of each of the parent's broadcasts
    heartbeat_s: float = 1.0  # a silent dead link is noticed within about this
    queue_max: int = 100_000  # upward messages kept for the parent (relay/uplink.py)
    audit_s: float = 3600.0  # an audit summary goes up this often (0: never)


@dataclass
class Remote:
    """One of the parent's broadcasts, on the air here."""

    event: dict[str, Any]
    push: LivePush
    decoder: OpusDecoder = field(default_factory=OpusDecoder)
    next_pts: int | None = None

    @property
    def emergency(self) -> bool:
        return self.event["class"] == BroadcastClass.emergency.name


class LoopRefused(Exception):
    """This node is in its parent's chain: the link is refused (reason in the message)."""


class UpstreamLink:
    def __init__(self, settings: UpstreamSettings, station: Station, tree: AreaTree,
                 alerts: Alerts | None = None) -> None:
        self.settings = settings
        self.station = station
        self.tree = tree
        self.alerts = alerts
        self.remotes: dict[str, Remote] = {}
        # The parent's chain (its id, its parent's, ...): the loop guard, told by the parent.
        self.path: list[str] = []
        self.path_listeners: list[Callable[[], None]] = []  # this node's children are told
        # Set once this node knows what its parent airs (the first hello, or the first hold
        # over, or a refusal): a middle node says hello to its own children only then, or a
        # child reconnecting after this node's restart would drop what it still holds.
        self.synced = asyncio.Event()
        self.state = "connecting"  # connecting | up | down | refused
        self.reason = ""
        self.since = time.time()
        self.counts = {"connects": 0, "started": 0, "stopped": 0, "frames": 0, "late": 0,
                       "concealed": 0, "bad_frames": 0, "bad_events": 0, "unknown": 0}
        self._task: asyncio.Task[None] | None = None
        self._hold: asyncio.TimerHandle | None = None
        self._released = False  # this outage's hold is over
        self.uplink: Uplink | None = None  # what goes up (relay/uplink.py), sent once greeted
        self.takes_reports = False  # the parent's hello says it takes them
        # a `bulletin` message (the TT 39 inbox, relay/bulletins.py): handed over, never waited
        self.on_bulletin: Callable[[dict[str, Any]], None] | None = None

    @property
    def ws_url(self) -> str:
        base = self.settings.url.rstrip("/").replace("http", "ws", 1)
        return (f"{base}/api/v1/nodes/link?areas={','.join(self.settings.areas)}"
                f"&node={self.station.node_id}")

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._hold is not None:
            self._hold.cancel()

    @property
    def holding(self) -> bool:
        """The link is down and the parent's broadcasts are still held (within `hold_s`)."""
        return self._hold is not None

    def stats(self) -> dict[str, Any]:
        return {"url": self.settings.url, "areas": self.settings.areas, "state": self.state,
                "reason": self.reason, "since": self.since, "broadcasts": sorted(self.remotes),
                **self.counts}

    def _set(self, state: str, reason: str = "") -> None:
        if (state, reason) != (self.state, self.reason):
            level = logging.INFO if state == "up" else logging.WARNING
            log.log(level, "upstream link %s event=upstream_%s url=%s reason=%s", state, state,
                    self.settings.url, reason)
            self.state, self.reason, self.since = state, reason, time.time()

    # ---- the connection ---------------------------------------------------------------------------
    async def _run(self) -> None:
        s = self.settings
        delay = s.backoff_min
        headers = {"Authorization": f"Node {s.key}"}
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.ws_connect(self.ws_url, headers=headers,
                                               heartbeat=s.heartbeat_s, autoping=True,
                                               timeout=aiohttp.ClientWSTimeout(ws_close=1.0),
                                               max_msg_size=1 << 20) as ws:
                        if await self._serve(ws):
                            delay = s.backoff_min
                except (aiohttp.ClientError, OSError, TimeoutError) as e:
                    self._set("down", str(e) or type(e).__name__)
                if self.uplink is not None:
                    await self.uplink.detach()  # what was not acked goes on the next one
                if self.state == "refused":  # no longer this parent's child: its own air only
                    for bid in list(self.remotes):
                        self._stop(bid, "upstream-refused")
                self._lost()
                # A backoff between attempts, not a wait for a condition.
                await asyncio.sleep(delay * (1 - 0.25 * random.random()))
                delay = min(delay * 2, s.backoff_max)

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """Read until the link ends; True when the parent said hello (a healthy connection)."""
        greeted = False
        reason = ""
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                try:
                    greeted = await self._event(msg.data) or greeted
                except LoopRefused as e:  # found here: the parent's chain holds this node
                    await ws.close(code=CLOSE_LOOP,
                                   message=str(e).encode()[:123].decode("utf-8", "ignore").encode())
                    self._set("refused", str(e))
                    self._loop(str(e))
                    return False
                if greeted and self.takes_reports and self.uplink is not None:
                    self.uplink.attach(ws.send_str)  # once per connection
            elif msg.type is aiohttp.WSMsgType.BINARY:
                self._frame(msg.data)
            else:  # CLOSE (with the parent's reason), CLOSED, ERROR
                if msg.type is aiohttp.WSMsgType.CLOSE and msg.extra:
                    reason = str(msg.extra)
                break
        code = ws.close_code
        if not reason:
            exc = ws.exception()
            reason = str(exc) if exc is not None else say("upstream.closed", code=code)
        self._set("refused" if code in (CLOSE_CREDENTIAL, CLOSE_AREAS, CLOSE_LOOP) else "down",
                  reason)
        if code == CLOSE_LOOP:
            self._loop(reason)
        return greeted

    def _lost(self) -> None:
        if self.remotes and self._hold is None and not self._released:
            self._hold = asyncio.get_running_loop().call_later(self.settings.hold_s,
                                                               self._let_go)

    def _loop(self, reason: str) -> None:
        self.synced.set()
        if self.alerts is not None:
            self.alerts.raise_(Alert("link_loop", self.settings.url, self.tree.roots()[0].code,
                                     reason, "critical"))

    def _chain(self, path: Any) -> None:
        """The parent's chain, from hello or `path`: refused when this node is in it."""
        if not isinstance(path, list):
            return
        path = [str(p) for p in path]
        if self.station.node_id in path:
            raise LoopRefused(say("upstream.loop", node=self.station.node_id,
                                  path=" > ".join(path)))
        if path != self.path:
            self.path = path
            for tell in self.path_listeners:
                tell()

    def _let_go(self) -> None:
        """The link stayed down through the hold: the child's own programmes take the air."""
        self.synced.set()
        self._hold = None
        if self.state == "up":
            return
        self._released = True  # once per outage: what is left (emergencies) stays
        for bid, r in list(self.remotes.items()):
            if not r.emergency:
                self._stop(bid, "upstream-lost")

    # ---- control events ---------------------------------------------------------------------------
    async def _event(self, data: str) -> bool:
        try:
            msg = json.loads(data)
            kind = msg["type"]
            if kind == "hello":
                self._chain(msg.get("path"))
                await self._hello(msg["broadcasts"])
                self.takes_reports = bool(msg.get("reports"))  # an older parent does not
                return True
            if kind == "path":
                self._chain(msg["path"])
            elif kind == "start":
                await self._start(msg["broadcast"])
            elif kind == "stop":
                self._stop(str(msg["id"]), str(msg.get("cause") or "upstream-stop"))
            elif kind == "ack" and self.uplink is not None:
                self.uplink.acked(msg)
            elif kind == "bulletin" and self.on_bulletin is not None:
                self.on_bulletin(msg)
            else:
                raise LinkError(say("link.event_unknown", type=kind))
        except (ValueError, KeyError, TypeError, LinkError) as e:
            self.counts["bad_events"] += 1
            log.warning("bad upstream event refused event=upstream_bad_event error=%s", e)
        return False

    async def _hello(self, events: list[dict[str, Any]]) -> None:
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None
        self._released = False
        self.counts["connects"] += 1
        self._set("up")
        wanted = {str(e["id"]) for e in events}
        for bid in list(self.remotes):
            if bid not in wanted:
                self._stop(bid, "upstream-resync")
        for e in events:
            await self._start(e)
        self.synced.set()
        if self.alerts is not None:
            self.alerts.clear("link_loop", self.settings.url)

    def origin(self, bid: str) -> dict[str, Any] | None:
        """The event one of the parent's broadcasts arrived with (a middle node relays it on
        unchanged); None for a broadcast of this node's own."""
        r = self.remotes.get(bid)
        return r.event if r is not None else None

    def issuer_here(self, event: dict[str, Any], targets: list[str]) -> str:
        """The issuer as this node's arbiter knows it: itself, else its nearest ancestor in this
        node's tree, else (an issuer above this tree's root, a national source) the root."""
        path = [str(c) for c in event.get("issuer_path") or [event["issuer"]]]
        known = next((c for c in reversed(path) if c in self.tree), None)
        return known or self.tree.ancestors(targets[0])[-1]

    async def _start(self, event: dict[str, Any]) -> None:
        bid = str(event["id"])
        if bid in self.remotes:
            return  # idempotent: a repeated start, or a hello after a reconnect
        targets = [str(t) for t in event["targets"] if str(t) in self.tree]
        if not targets:
            raise LinkError(say("upstream.outside_tree", id=bid, issuer=event["issuer"]))
        issuer = self.issuer_here(event, targets)
        cls = BroadcastClass.parse(event["class"])
        # A burst (the parent's encoder catching up, a reconnect) beyond 100 ms over the
        # target is dropped at once rather than played late.
        push = LivePush(target_ms=self.settings.buffer_ms,
                        max_ms=self.settings.buffer_ms + 100, name=str(event["title"]))
        self.remotes[bid] = Remote(event, push)
        after = await self._after_own(bid) if cls is BroadcastClass.priority else frozenset()
        # On the air first, stored after: the parent holds the truth and has stored it; the
        # record here is for this node's lists and as-run (a restart ends it: "live").
        rec = await self.station.air(Content(push, str(event["title"]), None),
                                     targets=targets, klass=cls.name, issuer=issuer,
                                     user="upstream", policy=str(event.get("policy", "resume")),
                                     spec={"live": "upstream", "upstream": self.settings.url},
                                     bid=bid, persist=False, after_own=after,
                                     extra={"origin": {k: event.get(k) for k in ORIGIN},
                                            **({"after_own": sorted(after)} if after else {})})
        await self.station.store.put("broadcast", rec)
        self.counts["started"] += 1
        log.info("parent broadcast on event=upstream_start id=%s class=%s issuer=%s "
                 "targets=%s", bid, cls.name, issuer, ",".join(targets))

    async def _after_own(self, bid: str) -> frozenset[str]:
        """The communes here that put this priority bulletin after their own (TT 39; kept on
        its record by the inbox): it airs again in the same order after a link loss."""
        try:
            known = await self.station.store.get("broadcast", bid)
        except Exception:  # noqa: BLE001 - the store down: the default order, on air anyway
            return frozenset()
        return frozenset((known or {}).get("after_own") or [])

    def _stop(self, bid: str, cause: str) -> None:
        r = self.remotes.pop(bid, None)
        if r is None:
            return
        r.push.close()
        try:
            self.station.stop(bid, None, cause)
        except KeyError:
            pass  # already over here
        self.counts["stopped"] += 1

    # ---- media ----------------------------------------------------------------------------------
    def _frame(self, data: bytes) -> None:
        try:
            bid, pts, payload = decode_frame(data)
        except LinkError as e:
            self.counts["bad_frames"] += 1
            if self.counts["bad_frames"] in (1, 10, 100, 1000):
                log.warning("bad upstream frame refused event=upstream_bad_frame count=%d "
                            "error=%s", self.counts["bad_frames"], e)
            return
        r = self.remotes.get(bid)
        if r is None:
            self.counts["unknown"] += 1
            return
        if r.next_pts is not None and pts < r.next_pts:
            self.counts["late"] += 1  # a duplicate or one overtaken: already played or covered
            return
        try:
            if r.next_pts is not None and 0 < pts - r.next_pts <= MAX_CONCEAL * FRAME:
                for _ in range((pts - r.next_pts) // FRAME):
                    r.push.write(r.decoder.decode(None))
                    self.counts["concealed"] += 1
            pcm = r.decoder.decode(payload)
        except ValueError:
            self.counts["bad_frames"] += 1
            return
        r.push.write(pcm)
        r.next_pts = pts + pcm.shape[0]
        self.counts["frames"] += 1
