"""HTTP listener fan-out in worker processes (`[http_streams] workers = N`, 0: in-process).

A reconnect storm of thousands of listeners costs seconds of CPU in accepts, heads, bursts and
writes; in the node's process that time is taken from the media clock (the GIL). With workers,
the node's aiohttp still parses each request and applies the limits, then hands the connected
socket to a worker (SCM_RIGHTS over a Unix SOCK_SEQPACKET pair) together with the response head
it would have written. The worker runs the unchanged `HttpStreamer` of loa.relay.icecast on its
own event loop, fed by a local `PacketHub` whose channels receive the node's encoded packets:
the node keeps one hub subscription per (area, codec) that any worker has listeners for and sends
each worker one message every FORWARD_SECONDS (100 ms, the shortest HTTP batch anyway: a message
per 20 ms tick cost a worker 1 % of a core in wake-ups alone) with those ticks' packets and the
ICY title when it changed.

Messages are pickled tuples, one per datagram (the link and the supervision: loa.relay.workers):
  node -> worker: ("init", HttpStreamSettings, EncoderSettings), ("attach", [(id, area, codec,
                  icy, head, burst_ms, pad), ...]) with one socket per entry, ("tick", [PacketRow, ...],
                  {area: title changed}), ("stop",)
  worker -> node: ("left", id), ("stats", {(area, codec): counters changed}) every
                  STATS_INTERVAL (a worker silent for STUCK_SECONDS is killed and replaced)
The node counts listeners (limits hold there) and adds the workers' counters into its own
`HttpStreamer` counters, so the monitor and /metrics read the same numbers as without workers.
A worker that dies is started again (its listeners reconnect by themselves).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from loa.codecs.encoders import Packet
from loa.relay.icecast import HttpStreamer
from loa.relay.workers import MAX_FDS, WorkerBase, WorkerHandle, WorkerPool, close_all, worker_main
from loa.streamer.hub import Subscription

log = logging.getLogger("loa.http_streams")

FORWARD_SECONDS = 0.1  # packets go to the workers this often (batch_ms: no batch waits longer)


# ---- the worker process -------------------------------------------------------------------
class _Discard(asyncio.Protocol):
    """A listener's connection: what it sends is ignored; its end closes the stream."""

    def __init__(self) -> None:
        self.on_lost: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_lost is not None:
            self.on_lost()


class Worker(WorkerBase):
    def __init__(self, sock: socket.socket) -> None:
        self.titles: dict[str, str] = {}
        self.streamer: HttpStreamer | None = None
        self._reported: dict[tuple[str, str], dict[str, int]] = {}
        self._stats_due = False
        super().__init__(sock)

    async def finish(self) -> None:
        if self.streamer is not None:
            await self.streamer.close()
        await super().finish()

    def on_message(self, msg: Any, fds: list[int]) -> None:
        kind = msg[0]
        if kind == "tick":
            self.titles.update(msg[2])
            self.deliver(msg[1])
        elif kind == "attach":  # one entry per socket passed, in order
            for (lid, area, codec, icy, head, burst_ms, pad), fd in zip(msg[1], fds,
                                                                         strict=True):
                asyncio.get_running_loop().create_task(self.attach(lid, area, codec, icy,
                                                                   head, burst_ms, pad, fd))
        elif kind == "init":
            self.streamer = HttpStreamer(self.hub, msg[1], msg[2], on_air=self.on_air)
        elif kind == "stop":
            self.stop()

    def on_air(self, area: str) -> dict[str, Any]:
        return {"title": self.titles.get(area)}  # the node's title, "(class)" included

    async def attach(self, lid: int, area: str, codec: str, icy: bool, head: bytes,
                     burst_ms: int | None, pad: bool, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        streamer = self.streamer
        try:
            assert streamer is not None, "attach before init"
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            transport, proto = await loop.connect_accepted_socket(_Discard, sock)
        except Exception as e:
            log.info("listener not taken event=http_fanout_attach_error error=%s", e)
            sock.close()
            self.link.send(("left", lid))
            return
        if transport.is_closing():  # the listener left while we set it up
            self.link.send(("left", lid))
            return
        ls = streamer.attach(area, codec, transport, icy, head,  # type: ignore[arg-type]
                             burst_ms, pad)
        ls.done.add_done_callback(lambda _f: self.link.send(("left", lid)))
        proto.on_lost = lambda: ls.channel.remove(ls, "closed")
        if not self._stats_due:  # its head and burst count at once (one report a loop turn)
            self._stats_due = True
            asyncio.get_running_loop().call_soon(self.send_stats)

    def send_stats(self) -> None:
        self._stats_due = False
        s = self.streamer
        if s is None:
            return
        changed = {k: dict(v) for k, v in s._counters.items() if self._reported.get(k) != v}
        self._reported.update(changed)
        self.link.send(("stats", changed))  # also when empty: the node hears it is alive

    def report(self) -> None:
        self.send_stats()


def main(argv: list[str] | None = None) -> int:
    return worker_main(Worker, "loa.relay.fanout", argv)


# ---- the node side ------------------------------------------------------------------------
class _WorkerHandle(WorkerHandle):
    def __init__(self, slot: int) -> None:
        super().__init__(slot)
        self.listeners: dict[int, tuple[str, str]] = {}  # id -> (area, codec)
        self.channels: dict[tuple[str, str], int] = {}  # listeners per channel
        self.counters: dict[tuple[str, str], dict[str, int]] = {}  # last report
        self.titles: dict[str, str] = {}  # last title sent per area
        self.attaching: list[tuple[tuple[int, str, str, bool, bytes, int | None, bool], int]] = []
        # (entry, fd)


class FanoutPool(WorkerPool[_WorkerHandle]):
    """The node's side: hands listeners to workers and feeds the workers the packets."""

    module = "loa.relay.fanout"
    event = "http_fanout"

    def __init__(self, streamer: HttpStreamer, workers: int) -> None:
        super().__init__([_WorkerHandle(i) for i in range(workers)])
        self.streamer = streamer
        self.subs: dict[tuple[str, str], Subscription] = {}
        # Subscriptions kept warm_seconds after their last listener, as the in-process channels
        # are: the workers' channels keep their burst fresh for whoever comes back.
        self.cooling: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self.next_id = 0

    def init_message(self) -> Any:
        return ("init", self.streamer.settings, self.streamer.encoders)

    def load(self, w: _WorkerHandle) -> int:
        return len(w.listeners)

    def lost(self, w: _WorkerHandle) -> None:
        """A worker is gone: its listeners no longer count (their sockets closed with it)."""
        for lid in list(w.listeners):
            self._left(w, lid)
        w.channels = {}  # warm ones included: the next worker in this slot starts empty
        w.counters = {}  # the next worker in this slot counts from zero
        w.titles = {}
        w.packets = []

    def on_message(self, w: _WorkerHandle, msg: Any, fds: list[int]) -> None:
        close_all(fds)  # workers send none
        if msg[0] == "left":
            self._left(w, msg[1])
        elif msg[0] == "stats":
            for key, new in msg[1].items():
                old = w.counters.get(key, {})
                total = self.streamer.counters(*key)
                for name, value in new.items():
                    if name != "listeners":  # counted here, at once (see hand_off, _left)
                        total[name] = total.get(name, 0) + value - old.get(name, 0)
                w.counters[key] = new

    def hand_off(self, w: _WorkerHandle, area: str, codec: str, transport: asyncio.BaseTransport,
                 icy: bool, head: bytes, burst_ms: int | None = None, pad: bool = False) -> None:
        """Give an accepted connection (after `admit`) to a worker; this process forgets it."""
        sock = transport.get_extra_info("socket")
        assert w.link is not None
        fd = os.dup(sock.fileno())  # the worker's copy; closed here once passed
        transport.close()  # stops reading, closes this process's descriptor only: no FIN
        lid = self.next_id = self.next_id + 1
        w.listeners[lid] = (area, codec)
        w.channels[(area, codec)] = w.channels.get((area, codec), 0) + 1
        s = self.streamer
        s.total += 1
        s.per_area[area] = s.per_area.get(area, 0) + 1
        s.counters(area, codec)["listeners"] += 1
        cooling = self.cooling.pop((area, codec), None)
        if cooling is not None:
            cooling.cancel()
        if (area, codec) not in self.subs:
            sub = self.subs[(area, codec)] = s.hub.subscribe(area, codec, maxlen=64)
            sub.on_packets = lambda packets, key=(area, codec): self._on_packets(key, packets)
        title = s.title(area)
        if w.titles.get(area) != title:  # the first ICY block names what is on air now
            w.titles[area] = title
            w.link.send(("tick", [], {area: title}))
        w.attaching.append(((lid, area, codec, icy, head, burst_ms, pad), fd))
        if len(w.attaching) == 1:  # with the other connections accepted in this loop turn
            asyncio.get_running_loop().call_soon(self._send_attaches, w)

    def _send_attaches(self, w: _WorkerHandle) -> None:
        todo, w.attaching = w.attaching, []
        for i in range(0, len(todo), MAX_FDS):
            chunk = todo[i:i + MAX_FDS]
            fds = [fd for _e, fd in chunk]
            if w.link is None:
                close_all(fds)  # the worker died meanwhile: these listeners reconnect
            else:
                w.link.send(("attach", [e for e, _fd in chunk]), fds)

    def _left(self, w: _WorkerHandle, lid: int) -> None:
        key = w.listeners.pop(lid, None)
        if key is None:
            return
        s = self.streamer
        s.total -= 1
        left = s.per_area.get(key[0], 1) - 1
        if left > 0:
            s.per_area[key[0]] = left
        else:
            s.per_area.pop(key[0], None)
        s.counters(*key)["listeners"] -= 1
        # Down to 0 the entry stays while the subscription is warm: the worker's channel is
        # warm too and keeps getting packets.
        w.channels[key] = max(0, w.channels.get(key, 1) - 1)
        if not any(x.channels.get(key) for x in self.workers) and key not in self.cooling:
            warm = self.streamer.settings.warm_seconds
            if warm > 0:
                self.cooling[key] = asyncio.get_running_loop().call_later(
                    warm, self._unsubscribe, key)
            else:
                self._unsubscribe(key)

    def _unsubscribe(self, key: tuple[str, str]) -> None:
        self.cooling.pop(key, None)
        for w in self.workers:
            if not w.channels.get(key, 1):
                del w.channels[key]
        sub = self.subs.pop(key, None)
        if sub is not None:
            sub.close()

    def _on_packets(self, key: tuple[str, str], packets: list[Packet]) -> None:
        for w in self.workers:
            if key in w.channels:
                w.forward(key[0], packets)
        self.flush_soon(FORWARD_SECONDS)  # with the next ticks' packets

    def flush(self) -> None:
        for w in self.workers:
            if not w.packets or w.link is None:
                continue
            titles: dict[str, str] = {}
            for area in {a for a, _c in w.channels}:
                title = self.streamer.title(area)
                if w.titles.get(area) != title:
                    titles[area] = w.titles[area] = title
            w.link.send(("tick", w.packets, titles))
            w.packets = []

    async def close(self) -> None:
        """Stop the workers (they end their listeners' streams) and wait for them."""
        await super().close()
        for timer in self.cooling.values():
            timer.cancel()
        self.cooling.clear()
        for sub in self.subs.values():
            sub.close()
        self.subs.clear()


if __name__ == "__main__":
    sys.exit(main())
