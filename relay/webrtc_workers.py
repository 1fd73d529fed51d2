"""WHEP listeners in worker processes (`[webrtc] workers = N`, 0: in-process).

A WebRTC peer costs the process that runs it ICE consent checks, DTLS, SRTP per packet and a
sendto; hundreds of them, or a wave of them connecting, take the GIL from the media clock. With
workers, the node still takes the WHEP POST (auth, rate limit, `check_offer`, the peer limits:
every session is counted here as a `RemoteWhep`), then a worker answers the offer: it runs the
unchanged WHEP path of loa.relay.webrtc (`WebRtcRelay.open_whep`, `AreaFeed`, `DirectSender` or
`PacketTrack`) on its own loop, fed by a local `PacketHub`. The node keeps one hub subscription
per area that a worker has peers in and forwards each tick's Opus packets at once (one message
per worker and 20 ms tick: a WebRTC peer has no send batch to hide a wait in, and 50 small
messages a second cost a worker little next to SRTP for its peers). WHIP inputs stay here.

Messages (pickled tuples over loa.relay.workers' link):
  node -> worker: ("init", WebRtcSettings), ("open", req, session, area, offer), ("close",
                  session, cause), ("stats", req, session), ("tick", [PacketRow, ...]), ("stop",)
  worker -> node: ("reply", req, value), ("connected", session, time), ("ended", session,
                  cause), ("alive", {session: dropped changed}) every STATS_INTERVAL
A session the worker ends (ICE failed, connect timeout, client gone) is reported and forgotten
here, so the limits stay right; a worker that dies ends its sessions (clients reconnect) and is
started again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from loa.codecs.encoders import Packet
from loa.relay.webrtc import (
    LimitError,
    OfferError,
    WebRtcRelay,
    WhepSession,
    peer_stats,
)
from loa.relay.workers import WorkerBase, WorkerHandle, WorkerPool, close_all, worker_main
from loa.streamer.hub import Subscription
from loa.streamer.messages import say

log = logging.getLogger("loa.webrtc")

REPLY_TIMEOUT = 20.0  # seconds for a worker to answer an offer (ICE gathering included)
NO_LIMIT = 1 << 30  # the node holds the limits; a worker takes what it is given


# ---- the worker process -------------------------------------------------------------------
class Worker(WorkerBase):
    def __init__(self, sock: socket.socket) -> None:
        self.relay: WebRtcRelay | None = None
        self._reported: dict[str, int] = {}  # dropped packets last told, per session
        super().__init__(sock)

    def on_message(self, msg: Any, fds: list[int]) -> None:
        close_all(fds)  # the node sends none
        kind = msg[0]
        if kind == "tick":
            self.deliver(msg[1])
        elif kind == "init":
            settings = dataclasses.replace(msg[1], max_peers=NO_LIMIT,
                                           max_peers_per_area=NO_LIMIT, workers=0)
            self.relay = WebRtcRelay(self.hub, settings)
            self.relay.on_whep_change = self.on_change
        elif kind == "open":
            asyncio.get_running_loop().create_task(self.open(*msg[1:]))
        elif kind == "close" and self.relay is not None:
            asyncio.get_running_loop().create_task(self.relay.close_whep(msg[1], msg[2]))
        elif kind == "stats":
            asyncio.get_running_loop().create_task(self.stats(msg[1], msg[2]))
        elif kind == "stop":
            self.stop()

    async def open(self, req: int, sid: str, area: str, offer: str) -> None:
        assert self.relay is not None, "open before init"
        try:
            _s, answer = await self.relay.open_whep(area, offer, sid)
        except OfferError as e:
            self.link.send(("reply", req, ("refused", e.status, str(e))))
        except LimitError as e:
            self.link.send(("reply", req, ("refused", 503, str(e))))
        else:
            self.link.send(("reply", req, ("answer", answer)))

    async def stats(self, req: int, sid: str) -> None:
        s = self.relay.whep.get(sid) if self.relay is not None else None
        self.link.send(("reply", req, None if s is None else await s.stats()))

    def on_change(self, s: WhepSession, what: str) -> None:
        if what == "connected":
            self.link.send(("connected", s.id, s.connected))
        else:
            self._reported.pop(s.id, None)
            self.link.send(("ended", s.id, what))

    def report(self) -> None:
        changed: dict[str, int] = {}
        if self.relay is not None:
            for sid, s in self.relay.whep.items():
                if self._reported.get(sid, 0) != s.dropped:
                    changed[sid] = self._reported[sid] = s.dropped
        self.link.send(("alive", changed))  # also when empty: the node hears it is alive

    async def finish(self) -> None:
        if self.relay is not None:
            await self.relay.close()
        await super().finish()


def main(argv: list[str] | None = None) -> int:
    return worker_main(Worker, "loa.relay.webrtc_workers", argv)


# ---- the node side ------------------------------------------------------------------------
class _Handle(WorkerHandle):
    def __init__(self, slot: int) -> None:
        super().__init__(slot)
        self.sessions: dict[str, RemoteWhep] = {}
        self.areas: dict[str, int] = {}  # sessions per area
        self.waiting: dict[int, asyncio.Future[Any]] = {}  # requests by id


@dataclass
class RemoteWhep:
    """The node's record of a WHEP peer that a worker runs (what the monitor and limits read)."""

    id: str
    area: str
    pool: WhepPool
    worker: _Handle
    created: float = field(default_factory=time.time)
    connected: float | None = None
    dropped: int = 0
    closed: bool = False

    async def stats(self) -> dict[str, Any]:
        """The figures of `WhepSession.stats`, from the worker."""
        if not self.closed:
            try:
                with_stats = await self.pool.request(self.worker, "stats", self.id)
            except (ConnectionError, TimeoutError):  # the worker died meanwhile
                with_stats = None
            if with_stats is not None:
                return dict(with_stats)
        return peer_stats(self.id, self.area, "closed", self.dropped)


class WhepPool(WorkerPool[_Handle]):
    """The node's side: offers to workers, packets to the workers with peers in an area."""

    module = "loa.relay.webrtc_workers"
    event = "whep_worker"

    def __init__(self, relay: WebRtcRelay, workers: int) -> None:
        super().__init__([_Handle(i) for i in range(workers)])
        self.relay = relay
        self.areas: dict[str, int] = {}  # sessions per area, all workers
        self.subs: dict[str, Subscription] = {}
        self.next_req = 0

    def init_message(self) -> Any:
        return ("init", self.relay.settings)

    def load(self, w: _Handle) -> int:
        return len(w.sessions)

    async def open(self, area: str, offer: str) -> tuple[RemoteWhep, str]:
        """A worker's answer to the offer (the caller checked it and the limits)."""
        w = self.pick()
        if w is None:
            raise LimitError(say("webrtc.workers_restarting"), kind="unavailable")
        s = RemoteWhep(secrets.token_urlsafe(16), area, self, w)
        # Counted before the first await, so concurrent offers count against the limits.
        self.relay.whep[s.id] = s
        w.sessions[s.id] = s
        self._count(w, area, 1)
        try:
            reply = await self.request(w, "open", s.id, area, offer)
        except (TimeoutError, ConnectionError) as e:
            await self.relay.close_whep(s.id, "worker-error")
            raise LimitError(say("webrtc.worker_silent"), kind="unavailable") from e
        if reply[0] == "refused":
            self.ended(s, "refused")
            if reply[1] == 503:
                raise LimitError(reply[2])
            raise OfferError(reply[1], reply[2])
        log.info("whep peer opened event=whep_open session=%s area=%s worker=%d peers=%d",
                 s.id, area, w.slot, self.areas.get(area, 0))
        return s, str(reply[1])

    async def request(self, w: _Handle, kind: str, *args: Any) -> Any:
        """Send a request to the worker and wait for its reply."""
        if w.link is None:
            raise ConnectionError("worker gone")
        req = self.next_req = self.next_req + 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        w.waiting[req] = fut
        w.link.send((kind, req, *args))
        try:
            return await asyncio.wait_for(fut, REPLY_TIMEOUT)
        finally:
            w.waiting.pop(req, None)

    def end_session(self, s: RemoteWhep, cause: str) -> None:
        """The node ends a session (DELETE, shutdown): its worker closes the peer."""
        if s.worker.link is not None:
            s.worker.link.send(("close", s.id, cause))
        self.ended(s, cause)

    def ended(self, s: RemoteWhep, cause: str) -> None:
        """Forget a session (it may be forgotten already)."""
        s.closed = True
        if self.relay.whep.get(s.id) is s:
            del self.relay.whep[s.id]
        if s.worker.sessions.pop(s.id, None) is not None:
            self._count(s.worker, s.area, -1)
            log.info("whep peer closed event=whep_close session=%s area=%s cause=%s "
                     "dropped=%d worker=%d", s.id, s.area, cause, s.dropped, s.worker.slot)

    def _count(self, w: _Handle, area: str, delta: int) -> None:
        n = w.areas[area] = w.areas.get(area, 0) + delta
        if n <= 0:
            del w.areas[area]
        total = self.areas[area] = self.areas.get(area, 0) + delta
        if total <= 0:
            del self.areas[area]
            sub = self.subs.pop(area, None)
            if sub is not None:
                sub.close()
        elif area not in self.subs:
            sub = self.subs[area] = self.relay.hub.subscribe(area, "opus",
                                                             maxlen=self.relay.settings.peer_queue)
            sub.on_packets = lambda packets, area=area: self._on_packets(area, packets)

    def on_message(self, w: _Handle, msg: Any, fds: list[int]) -> None:
        close_all(fds)  # workers send none
        kind = msg[0]
        if kind == "reply":
            fut = w.waiting.pop(msg[1], None)
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
        elif kind == "alive":
            for sid, dropped in msg[1].items():
                if sid in w.sessions:
                    w.sessions[sid].dropped = dropped
        elif kind == "connected":
            s = w.sessions.get(msg[1])
            if s is not None:
                s.connected = msg[2]
        elif kind == "ended":
            s = w.sessions.get(msg[1])
            if s is not None:
                self.ended(s, msg[2])

    def lost(self, w: _Handle) -> None:
        """A worker is gone: so are its peers (their clients reconnect)."""
        for fut in w.waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("worker gone"))
        w.waiting.clear()
        for s in list(w.sessions.values()):
            self.ended(s, "worker-died")
        w.packets = []

    def _on_packets(self, area: str, packets: list[Packet]) -> None:
        for w in self.workers:
            if area in w.areas:
                w.forward(area, [p for p in packets if p.codec == "opus"])
        self.flush_soon()  # with the other areas' packets of this tick (same loop turn)

    def flush(self) -> None:
        for w in self.workers:
            if w.packets and w.link is not None:
                w.link.send(("tick", w.packets))
            w.packets = []

    async def close(self) -> None:
        """Stop the workers (they close their peers) and wait for them."""
        await super().close()
        for sub in self.subs.values():
            sub.close()
        self.subs.clear()
        self.areas.clear()


if __name__ == "__main__":
    sys.exit(main())
