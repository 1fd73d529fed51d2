"""The packet hub: transports subscribe to an area's stream in one codec.

A channel is the stable stream of one area in one codec (what `/streams/A.opus` serves); the
engine fills it from whichever composition the area hears now. A subscriber that falls behind
loses its oldest packets; it never delays the clock or another subscriber.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from loa.codecs.encoders import Packet

T = TypeVar("T")


class DropOldest(Generic[T]):
    """A bounded queue read by one task: when full it drops its oldest items (counted in
    `dropped`), so a slow reader never holds up the writer. Hub subscriptions and the WebRTC
    send track (relay/webrtc.py) are both one."""

    def __init__(self, maxlen: int) -> None:
        self.queue: deque[T] = deque(maxlen=maxlen)
        self.dropped = 0
        self._waiter: asyncio.Future[None] | None = None

    def _enqueue(self, items: list[T]) -> None:
        overflow = len(self.queue) + len(items) - (self.queue.maxlen or 0)
        if overflow > 0:
            self.dropped += overflow
        self.queue.extend(items)
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _next(self, ended: Callable[[], bool]) -> T | None:
        """The oldest item, waiting for one; None once `ended()` and nothing is left."""
        while not self.queue:
            if ended():
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.queue.popleft()


class Subscription(DropOldest[Packet]):
    def __init__(self, channel: Channel, maxlen: int) -> None:
        super().__init__(maxlen)
        self.channel = channel
        self.received = 0
        self.on_packets: Callable[[list[Packet]], None] | None = None
        self.closed = False

    def _push(self, packets: list[Packet]) -> None:
        self.received += len(packets)
        if self.on_packets is not None:
            self.on_packets(packets)
            return
        self._enqueue(packets)

    def drain(self) -> list[Packet]:
        out = list(self.queue)
        self.queue.clear()
        return out

    async def get(self) -> Packet:
        packet = await self._next(lambda: self.closed)
        if packet is None:
            raise EOFError("subscription closed")
        return packet

    def close(self) -> None:
        self.channel.unsubscribe(self)
        self.closed = True
        self._wake()


class Channel:
    def __init__(self, hub: PacketHub, area: str, codec: str) -> None:
        self.hub = hub
        self.area = area
        self.codec = codec
        self.subs: list[Subscription] = []
        self.last_end: int | None = None  # pts end of the last packet sent (engine thread only)
        self.packets = 0
        self.bytes = 0
        self.header: bytes | None = None  # for container streams (Ogg headers ...), transports' use

    def subscribe(self, maxlen: int = 500) -> Subscription:
        sub = Subscription(self, maxlen)
        with self.hub.lock:
            self.subs = [*self.subs, sub]
            self.hub.version += 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self.hub.lock:
            if sub in self.subs:
                self.subs = [s for s in self.subs if s is not sub]
                self.hub.version += 1

    def admit(self, packets: list[Packet]) -> list[Packet]:
        """Keep the packets this area has not had yet (after a move between compositions)."""
        last = self.last_end
        if last is not None:
            packets = [p for p in packets if p.pts >= last]
        if packets:
            self.last_end = packets[-1].end
            self.packets += len(packets)
            self.bytes += sum(len(p.data) for p in packets)
        return packets

    def deliver(self, packets: list[Packet]) -> None:
        for s in self.subs:
            s._push(packets)


Key = tuple[str, str]  # (area, codec)


@dataclass(frozen=True)
class ChannelStats:
    subscribers: int
    packets: int
    bytes: int


class PacketHub:
    """Channels by (area, codec). `version` changes whenever the set of subscribers changes.

    The engine publishes into it and flushes once a tick; transports subscribe; the monitor reads
    counters. Those three go through the methods below, not through the channels themselves.
    """

    def __init__(self) -> None:
        self.channels: dict[Key, Channel] = {}
        self.lock = threading.Lock()
        self.version = 0
        self.loop: asyncio.AbstractEventLoop | None = None  # set: deliveries hop to this loop
        self._batch: list[tuple[Channel, list[Packet]]] = []  # published, not yet flushed

    def channel(self, area: str, codec: str) -> Channel:
        key = (area, codec)
        ch = self.channels.get(key)
        if ch is None:
            with self.lock:
                ch = self.channels.setdefault(key, Channel(self, area, codec))
        return ch

    def subscribe(self, area: str, codec: str, maxlen: int = 500) -> Subscription:
        return self.channel(area, codec).subscribe(maxlen)

    def counters(self) -> dict[Key, tuple[int, int]]:
        """(bytes, packets) sent so far, per channel."""
        return {key: (ch.bytes, ch.packets) for key, ch in list(self.channels.items())}

    def channel_count(self) -> int:
        return len(self.channels)

    def channel_stats(self, keys: Iterable[Key] | None = None) -> list[tuple[Key, ChannelStats]]:
        """Figures of the given channels that exist (of every channel without `keys`)."""
        channels = self.channels
        found = (list(channels.items()) if keys is None
                 else [(k, channels[k]) for k in keys if k in channels])
        return [(k, ChannelStats(len(ch.subs), ch.packets, ch.bytes)) for k, ch in found]

    def codecs_wanted(self, area: str) -> set[str]:
        return {c for (a, c), ch in list(self.channels.items()) if a == area and ch.subs}

    def wanted(self) -> dict[str, set[str]]:
        """area -> codecs that have at least one subscriber."""
        out: dict[str, set[str]] = {}
        for (a, c), ch in list(self.channels.items()):
            if ch.subs:
                out.setdefault(a, set()).add(c)
        return out

    def publish(self, area: str, codec: str, packets: list[Packet]) -> list[Packet]:
        """Queue a tick's packets for the area's subscribers (engine thread); returns those
        admitted (none without subscribers, or the ones it had before a move between mixes)."""
        ch = self.channels.get((area, codec))
        if ch is None or not ch.subs:
            return []
        admitted = ch.admit(packets)
        if admitted:
            self._batch.append((ch, admitted))
        return admitted

    def deliver(self, area: str, codec: str, packets: list[Packet]) -> None:
        """Hand packets straight to the channel's subscribers, on the caller's thread (the local
        hub of a worker process, fed by the node's)."""
        self.channel(area, codec).deliver(packets)

    def flush(self) -> None:
        """Hand the tick's published packets to subscribers, on the event loop when there is one."""
        batch = self._batch
        if not batch:
            return
        self._batch = []
        loop = self.loop
        if loop is None:
            _deliver(batch)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[Channel, list[Packet]]]) -> None:
    for ch, packets in batch:
        ch.deliver(packets)
