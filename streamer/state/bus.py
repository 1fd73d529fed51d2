"""The bus: events and commands between components and nodes.

- Events (`publish`/`subscribe`): fan-out to every subscriber of a topic on every node, at most
  once; a subscriber that is not listening misses them (on-air changes, device status, ...).
- Commands (`send`/`receive`/`ack`): durable; each command is delivered to one consumer of a group
  and stays pending until acknowledged, so a command is not lost when a consumer dies before it
  acks (emergencies, device commands across nodes).

Backends: `InProcessBus` here (default, one process) and `bus_redis.RedisBus` (pub/sub for events,
streams with consumer groups for commands); `open.open_bus` picks one from the configured URL. Both
pass one contract suite (tests/test_bus.py).
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

Event = dict[str, Any]


class BusSubscription(abc.ABC):
    """An async iterator of events on one topic; `close()` ends it."""

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> Event: ...

    @abc.abstractmethod
    async def get(self, timeout: float | None = None) -> Event:  # noqa: ASYNC109
        """The next event; TimeoutError after `timeout` seconds."""

    @abc.abstractmethod
    async def close(self) -> None: ...


class Bus(abc.ABC):
    shared = False  # True: other nodes (processes) are on this bus too

    @abc.abstractmethod
    async def publish(self, topic: str, event: Event) -> None: ...

    @abc.abstractmethod
    async def subscribe(self, topic: str) -> BusSubscription:
        """Subscribed when this returns: every later publish on `topic` reaches it."""

    @abc.abstractmethod
    async def send(self, stream: str, command: Event) -> str:
        """Append a durable command; returns its id."""

    @abc.abstractmethod
    async def receive(self, stream: str, group: str, consumer: str, *, count: int = 10,
                      timeout: float = 1.0) -> list[tuple[str, Event]]:  # noqa: ASYNC109
        """Up to `count` commands for this consumer: first its own unacknowledged ones (redelivery
        after a restart), then new ones. Waits up to `timeout` s when there are none."""

    @abc.abstractmethod
    async def ack(self, stream: str, group: str, id: str) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------

log = logging.getLogger("loa.bus")

QUEUE_SIZE = 10_000  # events buffered per subscription; beyond that the oldest are dropped
STREAM_MAXLEN = 100_000  # commands kept per stream (approximate for Redis)


class BusClosed(RuntimeError):
    """The bus or the subscription was closed (or its connection failed for good)."""


def encode_event(event: Event) -> str:
    if not isinstance(event, dict):
        raise TypeError(f"bus events and commands are dicts, not {type(event).__name__}")
    # One encoding for both backends: what works in-process also works over Redis, and every
    # receiver decodes its own copy, so nobody sees another subscriber's mutations.
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def decode_event(raw: str | bytes) -> Event | None:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        log.warning("bus: dropping a body that is not JSON (%d bytes)", len(raw))
        return None
    if not isinstance(value, dict):
        log.warning("bus: dropping a body that is not a JSON object")
        return None
    return value


class BufferedSubscription(BusSubscription):
    """What both backends' `subscribe` return: a bounded buffer of encoded events. When it is
    full the oldest event is dropped and counted in `dropped`, so a slow subscriber never holds
    up a publisher (nor, over Redis, gets disconnected by the server)."""

    def __init__(self, topic: str, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("queue_size must be at least 1")
        self.topic = topic
        self.maxsize = maxsize
        self.dropped = 0  # events lost because this subscriber fell more than maxsize behind
        self._items: deque[str | bytes] = deque()
        self._ready = asyncio.Event()
        self._closed = False
        self._error: BaseException | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def qsize(self) -> int:
        return len(self._items)

    def _push(self, raw: str | bytes) -> None:
        if self._closed:
            return
        if len(self._items) >= self.maxsize:
            self._items.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % self.maxsize == 0:
                log.warning("bus: slow subscriber on topic=%s, %d events dropped so far",
                            self.topic, self.dropped)
        self._items.append(raw)
        self._ready.set()

    def _mark_closed(self, error: BaseException | None = None) -> None:
        self._closed = True
        self._error = error
        self._items.clear()
        self._ready.set()  # wakes a pending get()

    async def get(self, timeout: float | None = None) -> Event:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while True:
                while not self._items and not self._closed:
                    self._ready.clear()
                    await self._ready.wait()
                if self._closed:
                    raise BusClosed(f"subscription to {self.topic!r} is closed") from self._error
                event = decode_event(self._items.popleft())
                if event is not None:
                    return event

    async def __anext__(self) -> Event:
        try:
            return await self.get()
        except BusClosed:
            raise StopAsyncIteration from None


# -- in-process ------------------------------------------------------------------------------


class _InProcessSubscription(BufferedSubscription):
    def __init__(self, bus: InProcessBus, topic: str, maxsize: int) -> None:
        super().__init__(topic, maxsize)
        self._bus = bus

    async def close(self) -> None:
        if not self._closed:
            self._mark_closed()
            self._bus._unsubscribe(self)


@dataclass
class _Group:
    next: int  # sequence number of the next command never delivered to this group
    pending: dict[str, dict[int, None]] = field(default_factory=dict)  # consumer -> ids (ordered)
    owner: dict[int, str] = field(default_factory=dict)  # pending id -> consumer


class _Stream:
    def __init__(self, maxlen: int) -> None:
        self.entries: deque[str] = deque()
        self.first = 0  # sequence number of entries[0]
        self.maxlen = maxlen
        self.groups: dict[str, _Group] = {}
        self.cond = asyncio.Condition()

    @property
    def end(self) -> int:
        return self.first + len(self.entries)

    def append(self, raw: str) -> int:
        self.entries.append(raw)
        while len(self.entries) > self.maxlen:
            self.entries.popleft()
            self.first += 1
        return self.end - 1

    def at(self, seq: int) -> str | None:
        if self.first <= seq < self.end:
            return self.entries[seq - self.first]
        return None  # trimmed away (or never existed)

    def group(self, name: str) -> _Group:
        g = self.groups.get(name)
        if g is None:
            # Like Redis `XGROUP CREATE ... 0`: a new group sees every command still kept.
            g = self.groups[name] = _Group(next=self.first)
        return g

    def take(self, g: _Group, consumer: str, count: int) -> list[tuple[str, Event]]:
        out: list[tuple[str, Event]] = []
        mine = g.pending.get(consumer)
        if mine:
            for seq in list(mine):
                if len(out) >= count:
                    break
                raw = self.at(seq)
                event = None if raw is None else decode_event(raw)
                if event is None:  # trimmed: nothing left to deliver
                    del mine[seq]
                    g.owner.pop(seq, None)
                    continue
                out.append((str(seq), event))
        g.next = max(g.next, self.first)
        while len(out) < count and g.next < self.end:
            seq = g.next
            g.next += 1
            event = decode_event(self.entries[seq - self.first])
            if event is None:
                continue
            g.pending.setdefault(consumer, {})[seq] = None
            g.owner[seq] = consumer
            out.append((str(seq), event))
        return out


class InProcessBus(Bus):
    """Events and commands inside one process (one node). Nothing survives the process."""

    def __init__(self, *, queue_size: int = QUEUE_SIZE, stream_maxlen: int = STREAM_MAXLEN) -> None:
        self.queue_size = queue_size
        self.stream_maxlen = stream_maxlen
        self._topics: dict[str, set[_InProcessSubscription]] = {}
        self._streams: dict[str, _Stream] = {}
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed("bus is closed")

    def _stream(self, name: str) -> _Stream:
        st = self._streams.get(name)
        if st is None:
            st = self._streams[name] = _Stream(self.stream_maxlen)
        return st

    def _unsubscribe(self, sub: _InProcessSubscription) -> None:
        subs = self._topics.get(sub.topic)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._topics[sub.topic]

    async def publish(self, topic: str, event: Event) -> None:
        self._check_open()
        raw = encode_event(event)
        for sub in tuple(self._topics.get(topic, ())):
            sub._push(raw)  # never waits: a full queue drops its oldest event

    async def subscribe(self, topic: str) -> BusSubscription:
        self._check_open()
        sub = _InProcessSubscription(self, topic, self.queue_size)
        self._topics.setdefault(topic, set()).add(sub)
        return sub

    async def send(self, stream: str, command: Event) -> str:
        self._check_open()
        st = self._stream(stream)
        seq = st.append(encode_event(command))
        async with st.cond:
            st.cond.notify_all()
        return str(seq)

    async def receive(self, stream: str, group: str, consumer: str, *, count: int = 10,
                      timeout: float = 1.0) -> list[tuple[str, Event]]:  # noqa: ASYNC109
        self._check_open()
        if count < 1:
            raise ValueError("count must be at least 1")
        st = self._stream(stream)
        g = st.group(group)
        out = st.take(g, consumer, count)
        if out or timeout <= 0:
            return out
        async with st.cond:
            try:
                async with asyncio.timeout(timeout):
                    await st.cond.wait_for(lambda: self._closed or g.next < st.end)
            except TimeoutError:
                return []
            self._check_open()
            return st.take(g, consumer, count)

    async def ack(self, stream: str, group: str, id: str) -> None:
        self._check_open()
        st = self._streams.get(stream)
        g = st.groups.get(group) if st is not None else None
        if g is None:
            return
        seq = int(id)
        consumer = g.owner.pop(seq, None)
        if consumer is not None:
            mine = g.pending[consumer]
            mine.pop(seq, None)
            if not mine:
                del g.pending[consumer]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for subs in tuple(self._topics.values()):
            for sub in tuple(subs):
                await sub.close()
        for st in self._streams.values():  # wake receivers so they see the bus is closed
            async with st.cond:
                st.cond.notify_all()
