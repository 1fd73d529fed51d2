"""The link between nodes, parent side: what a child node hears of its parent's broadcasts.

One WebSocket per child (web/api/nodes.py authenticates it). Text messages are control events,
JSON, idempotent by broadcast id: `hello` (everything on the air now that reaches the child's
areas: the resync after every reconnect), `start` and `stop`. Binary messages are media: one Opus
packet of 20 ms per message, tagged with its broadcast id and its media timestamp (`frame`).

Encode once: the link sends no audio of its own. For each broadcast it subscribes to the Opus
channels of the areas of the child's that the broadcast reaches (`Follow`): the engine already
encodes each composition once for every listener of it, and a second child, or a loudspeaker
listening there, shares the same packets. Each frame goes once, from an area that hears the
broadcast (alone when one can), so a broadcast the parent preempts in one of those areas and not
in another still reaches the child whole; while it is preempted in all of them it sends nothing
(the preempting one, also sent, is what the child airs).

A child that reads too slowly loses its oldest media frames (never control events): the link is
live, not a download. TCP keeps order within a connection; the timestamps let the child drop
what is late after a reconnect and conceal what was lost.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loa.codecs.encoders import Packet
from loa.codecs.opus import packet_samples
from loa.streamer.areas import AreaTree
from loa.streamer.broadcast import Broadcast
from loa.streamer.engine import Engine
from loa.streamer.hub import PacketHub, Subscription
from loa.streamer.messages import say

log = logging.getLogger("loa.link")

VERSION = 1
_HEAD = struct.Struct(">BB")  # version, length of the broadcast id
_PTS = struct.Struct(">q")  # media timestamp, samples at 48 kHz
_ID = re.compile(rb"[0-9A-Za-z_.:-]{1,64}")
MAX_OPUS = 1275 * 3  # RFC 6716: a packet never exceeds 120 ms of 1275-byte frames
CLOSE_CREDENTIAL = 4401  # WebSocket close codes of a refusal, with the reason as close text
CLOSE_AREAS = 4403
CLOSE_LOOP = 4508  # the child is already in this node's chain of parents (HTTP 508's number)
CLOSE_GOING_AWAY = 1001
REPORTS_VERSION = 1  # the hello says the parent takes reports up (relay/uplink.py)
MAX_FRAMES_QUEUED = 250  # 5 s of 20 ms frames per child; beyond, the oldest are dropped


class LinkError(ValueError):
    """A message on the link that is not one: refused with its reason, nothing changes."""


def encode_frame(bid: str, pts: int, payload: bytes) -> bytes:
    raw = bid.encode("ascii")
    return _HEAD.pack(VERSION, len(raw)) + raw + _PTS.pack(pts) + payload


def decode_frame(data: bytes) -> tuple[str, int, bytes]:
    """(broadcast id, media timestamp, Opus packet) of a binary message, or LinkError."""
    if len(data) < _HEAD.size:
        raise LinkError(say("link.frame_short"))
    version, n = _HEAD.unpack_from(data)
    if version != VERSION:
        raise LinkError(say("link.frame_version", version=version))
    end = _HEAD.size + n
    raw = data[_HEAD.size:end]
    if len(data) < end + _PTS.size + 1 or not _ID.fullmatch(raw):
        raise LinkError(say("link.frame_short"))
    (pts,) = _PTS.unpack_from(data, end)
    payload = data[end + _PTS.size:]
    if len(payload) > MAX_OPUS or packet_samples(payload) == 0 or pts < 0:
        raise LinkError(say("link.frame_not_opus"))
    return raw.decode("ascii"), pts, payload


def cut_targets(tree: AreaTree, targets: list[str], areas: list[str]) -> list[str]:
    """The part of a broadcast's targets that lies in the child's areas: a child area under a
    target is reached whole; a target under a child area is reached as itself."""
    out: dict[str, None] = {}
    for a in areas:
        for t in targets:
            if t not in tree or a not in tree:
                continue
            if tree.contains(t, a):
                out.setdefault(a, None)
            elif tree.contains(a, t):
                out.setdefault(t, None)
    return list(out)


def event_of(tree: AreaTree, b: Broadcast, targets: list[str],
             origin: dict[str, Any] | None = None) -> dict[str, Any]:
    """A broadcast as a child receives it: what its arbiter needs, and the issuer's path from
    the root so a child whose tree lacks the issuer can map it to the nearest area it knows.
    A broadcast this node relays from its own parent (`origin`, the event it arrived with) goes
    on with its original issuer, path and authority: a middle node that maps an issuer it lacks
    to an ancestor must not hand the mapped one further down."""
    event = {"id": b.id, "class": b.cls.name, "authority": tree.depth(b.issuer),
             "issuer": b.issuer, "issuer_path": list(reversed(tree.ancestors(b.issuer))),
             "title": b.title, "policy": str(b.policy), "targets": targets}
    if origin is not None:
        event.update({k: origin[k] for k in ("issuer", "issuer_path", "authority")
                      if k in origin})
    return event


class Follow:
    """One broadcast's media for one child, taken from the Opus channels of every area of the
    child's it reaches: each 20 ms frame is sent once (by media timestamp), from an area where
    the broadcast is what is heard, alone if one such area has no overlay over it.

    Why every area and not one representative: the parent's arbiter may preempt the broadcast in
    one of them (another broadcast on that commune alone) and not in another. The child ranks
    the same broadcasts itself (the preempting one reaches it too), so it needs the broadcast's
    own audio for as long as any of its areas may hear it; one area's composition would carry
    the preempting audio under this broadcast's id, or nothing. Encode once still holds: areas
    hearing the same composition share one encoder, and every packet comes from the encoders
    the parent runs for that audio anyway."""

    def __init__(self, engine: Engine, hub: PacketHub, feed: Feed, bid: str,
                 areas: list[str]) -> None:
        self.engine = engine
        self.feed = feed
        self.bid = bid
        self.areas = areas
        self.sent_end = -1  # media timestamp just past the last frame sent
        self.subs: list[Subscription] = []
        for area in areas:
            sub = hub.subscribe(area, "opus", maxlen=50)
            sub.on_packets = functools.partial(self._packets, area)
            self.subs.append(sub)

    def _heard(self, area: str) -> tuple[bool, bool]:
        """(the broadcast is what `area` hears, with nothing mixed over it)."""
        if self.engine.main_of(area) != self.bid:
            return False, False
        return True, not self.engine.overlays_of(area)

    def _packets(self, area: str, batch: list[Packet]) -> None:
        heard, alone = self._heard(area)
        if not heard or not alone and any(self._heard(a)[1] for a in self.areas if a != area):
            return
        for p in batch:
            if p.pts >= self.sent_end:
                self.feed.queue_frame(encode_frame(self.bid, p.pts, p.data))
                self.sent_end = p.end

    def close(self) -> None:
        for sub in self.subs:
            sub.close()


@dataclass
class Feed:
    """One connected child: its areas, its outgoing messages, a subscription per broadcast."""

    node: str  # the node credential's id
    areas: list[str]
    send_text: Callable[[str], Awaitable[None]]
    send_bytes: Callable[[bytes], Awaitable[None]]
    subs: dict[str, Follow] = field(default_factory=dict)  # by broadcast id
    control: deque[str] = field(default_factory=deque)
    frames: deque[bytes] = field(default_factory=lambda: deque(maxlen=MAX_FRAMES_QUEUED))
    sent_frames: int = 0
    dropped_frames: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    end: Callable[[int, str], None] | None = None  # closes the connection: code, reason

    def queue_text(self, message: dict[str, Any]) -> None:
        self.control.append(json.dumps(message, ensure_ascii=False))
        self.wake.set()

    def queue_frame(self, data: bytes) -> None:
        if len(self.frames) == self.frames.maxlen:
            self.dropped_frames += 1
        self.frames.append(data)
        self.wake.set()

    async def pump(self) -> None:
        """Send until closed: control events first, then media in order."""
        while not self.closed:
            await self.wake.wait()
            self.wake.clear()
            while self.control or self.frames:
                if self.control:
                    await self.send_text(self.control.popleft())
                else:
                    await self.send_bytes(self.frames.popleft())
                    self.sent_frames += 1


class LinkServer:
    """The parent's side of every link: follows the engine's starts and ends and tells each
    connected child about the broadcasts that reach its areas."""

    def __init__(self, engine: Engine, tree: AreaTree, hub: PacketHub,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.tree = tree
        self.hub = hub
        self.loop = loop
        self.feeds: list[Feed] = []
        # The event a broadcast relayed from this node's own parent arrived with (None: ours).
        self.origin: Callable[[str], dict[str, Any] | None] = lambda bid: None
        # This node's id, then its parent's, and so on up: the loop guard's path. A child whose
        # id is in it is refused; every child learns it (hello, then `path` when it changes).
        self.chain: Callable[[], list[str]] = lambda: []
        self.refusals: deque[dict[str, Any]] = deque(maxlen=20)  # the latest, for the monitor
        engine.started_listeners.append(self._started_thread)
        engine.ended_listeners.append(self._ended_thread)

    # ---- engine events (tick thread) -> the loop ----------------------------------------------
    def _started_thread(self, b: Broadcast) -> None:
        self._post(self._started, b)

    def _ended_thread(self, b: Broadcast, cause: str) -> None:
        self._post(self._ended, b, cause)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        if self.feeds and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, *args)

    def _started(self, b: Broadcast) -> None:
        for feed in list(self.feeds):
            event = self._follow(feed, b)
            if event is not None:
                feed.queue_text({"type": "start", "broadcast": event})

    def _ended(self, b: Broadcast, cause: str) -> None:
        for feed in list(self.feeds):
            sub = feed.subs.pop(b.id, None)
            if sub is not None:
                sub.close()
                feed.queue_text({"type": "stop", "id": b.id, "cause": cause})

    # ---- feeds ----------------------------------------------------------------------------------
    def _follow(self, feed: Feed, b: Broadcast) -> dict[str, Any] | None:
        """Subscribe the feed to a broadcast that reaches its areas; its event, else None."""
        if b.id in feed.subs or b.issuer not in self.tree:
            return None
        targets = cut_targets(self.tree, b.targets, feed.areas)
        if not targets:
            return None
        feed.subs[b.id] = Follow(self.engine, self.hub, feed, b.id, targets)
        return event_of(self.tree, b, targets, self.origin(b.id))

    def attach(self, feed: Feed) -> None:
        """A child connected: its hello lists what is on the air for it now."""
        self.feeds.append(feed)
        events = [e for b in self.engine.active() if (e := self._follow(feed, b)) is not None]
        feed.queue_text({"type": "hello", "areas": feed.areas, "path": self.chain(),
                         "broadcasts": events, "reports": REPORTS_VERSION})
        log.info("child linked event=link_up node=%s areas=%s broadcasts=%d", feed.node,
                 ",".join(feed.areas), len(events))

    def loop_reason(self, child: str) -> str | None:
        """Why a child node with this id must be refused (it is in our chain), or None."""
        return say("link.loop", node=child) if child in self.chain() else None

    def refused(self, node: str, code: int, reason: str) -> None:
        self.refusals.append({"node": node, "code": code, "reason": reason,
                              "path": self.chain(), "at": time.time()})

    def path_changed(self) -> None:
        """This node's own parents changed: every child learns the new path (loop guard)."""
        path = self.chain()
        for feed in self.feeds:
            feed.queue_text({"type": "path", "path": path})

    def detach(self, feed: Feed) -> None:
        feed.closed = True
        feed.wake.set()
        for sub in feed.subs.values():
            sub.close()
        feed.subs.clear()
        if feed in self.feeds:
            self.feeds.remove(feed)
        log.info("child unlinked event=link_down node=%s sent=%d dropped=%d", feed.node,
                 feed.sent_frames, feed.dropped_frames)

    def revoke(self, node: str, reason: str) -> int:
        """End the links of a revoked node credential; how many were connected."""
        ended = [f for f in self.feeds if f.node == node]
        for f in ended:
            if f.end is not None:
                f.end(CLOSE_CREDENTIAL, reason)
        return len(ended)

    async def close(self) -> None:
        """Shutdown: every child is told the parent is going away (it reconnects to it)."""
        for f in list(self.feeds):
            if f.end is not None:
                f.end(CLOSE_GOING_AWAY, say("link.going_away"))
        self.engine.started_listeners.remove(self._started_thread)
        self.engine.ended_listeners.remove(self._ended_thread)

    def stats(self) -> list[dict[str, Any]]:
        return [{"node": f.node, "areas": f.areas, "broadcasts": sorted(f.subs),
                 "frames_sent": f.sent_frames, "frames_dropped": f.dropped_frames}
                for f in self.feeds]
