"""The bus: events and commands between components and nodes.

- Events (`publish`/`subscribe`): fan-out to every subscriber of a topic on every node, at most
  once; a subscriber that is not listening misses them (on-air changes, device status, ...).
- Commands (`send`/`receive`/`ack`): durable; each command is delivered to one consumer of a group
  and stays pending until acknowledged, so a command is not lost when a consumer dies before it
  acks (emergencies, device commands across nodes).

Backends: `InProcessBus` (default, one process) and `RedisBus` (pub/sub for events, streams with
consumer groups for commands). Both pass one contract suite (tests/test_bus.py).
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

import redis.asyncio as aioredis
import redis.exceptions

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
_SUBSCRIBE_CONFIRM_TIMEOUT = 10.0


class BusClosed(RuntimeError):
    """The bus or the subscription was closed (or its connection failed for good)."""


def _encode(event: Event) -> str:
    if not isinstance(event, dict):
        raise TypeError(f"bus events and commands are dicts, not {type(event).__name__}")
    # One encoding for both backends: what works in-process also works over Redis, and every
    # receiver decodes its own copy, so nobody sees another subscriber's mutations.
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def _decode(raw: str | bytes) -> Event | None:
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
                event = _decode(self._items.popleft())
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
                event = None if raw is None else _decode(raw)
                if event is None:  # trimmed: nothing left to deliver
                    del mine[seq]
                    g.owner.pop(seq, None)
                    continue
                out.append((str(seq), event))
        g.next = max(g.next, self.first)
        while len(out) < count and g.next < self.end:
            seq = g.next
            g.next += 1
            event = _decode(self.entries[seq - self.first])
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
        raw = _encode(event)
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
        seq = st.append(_encode(command))
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


# -- Redis -----------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(reply: Any) -> list[tuple[Any, Any]]:
    """The (id, fields) pairs of a one-stream XREADGROUP reply, RESP2 list or RESP3 map shape."""
    if not reply:
        return []
    if isinstance(reply, dict):
        items = next(iter(reply.values()))
        if isinstance(items, list) and len(items) == 1 and isinstance(items[0], list):
            items = items[0]  # RESP3 unified shape: {stream: [[(id, fields), ...]]}
        return list(items or [])
    return list(reply[0][1] or [])


class _RedisSubscription(BufferedSubscription):
    """One pub/sub connection; a reader task drains it into the bounded queue, so Redis never
    sees a slow client (it would disconnect one past `client-output-buffer-limit pubsub`)."""

    def __init__(self, bus: RedisBus, topic: str, channel: str, maxsize: int) -> None:
        super().__init__(topic, maxsize)
        self._bus = bus
        self._channel = channel
        self._pubsub = bus._client.pubsub()
        self._task: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        # `PubSub.subscribe()` only *sends* SUBSCRIBE; wait for the server's confirmation so a
        # publish made right after `Bus.subscribe()` returns is delivered.
        await self._pubsub.subscribe(self._channel)
        async with asyncio.timeout(_SUBSCRIBE_CONFIRM_TIMEOUT):
            while True:
                msg = await self._pubsub.get_message(timeout=None)
                if msg is None:
                    continue
                if msg["type"] == "subscribe" and _text(msg["channel"]) == self._channel:
                    break
                if msg["type"] == "message":  # cannot precede the confirmation; keep it anyway
                    self._push(msg["data"])
        self._task = asyncio.create_task(self._read(), name=f"loa-bus-sub:{self.topic}")

    async def _read(self) -> None:
        backoff = 0.1
        try:
            while True:
                try:
                    msg = await self._pubsub.get_message(timeout=None)
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                        OSError) as e:
                    # redis-py already retried; drop the connection so the next read reconnects
                    # and re-subscribes (PubSub.on_connect). Events meanwhile are lost.
                    log.warning("bus: pub/sub connection for topic=%s lost (%s); retrying in %.1fs",
                                self.topic, e, backoff)
                    conn = self._pubsub.connection
                    if conn is not None:
                        await conn.disconnect(nowait=True)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.1
                if msg is not None and msg["type"] == "message":
                    self._push(msg["data"])
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("bus: subscription reader for topic=%s failed", self.topic)
            self._mark_closed(e)
            self._bus._subs.discard(self)

    async def close(self) -> None:
        if self._closed and self._task is None:
            return
        self._mark_closed(self._error)
        self._bus._subs.discard(self)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        await self._pubsub.aclose()


class RedisBus(Bus):
    """Events over Redis pub/sub (`{prefix}ev:{topic}`), commands over Redis streams with
    consumer groups (`{prefix}cmd:{stream}`). Bodies are JSON in the field `body`."""

    FIELD = b"body"
    shared = True

    def __init__(self, client: aioredis.Redis, prefix: str = "loa:", *,
                 queue_size: int = QUEUE_SIZE, stream_maxlen: int = STREAM_MAXLEN) -> None:
        self._client = client
        self.prefix = prefix
        self.queue_size = queue_size
        self.stream_maxlen = stream_maxlen
        self._subs: set[_RedisSubscription] = set()
        self._groups: set[tuple[str, str]] = set()  # (key, group) known to exist
        self._closed = False

    @classmethod
    async def connect(cls, url: str, prefix: str = "loa:", *, queue_size: int = QUEUE_SIZE,
                      stream_maxlen: int = STREAM_MAXLEN) -> RedisBus:
        # redis-py 8 caps an asyncio pool at 100 connections (and raises past it); every
        # subscription holds one and so does every blocked `receive`. A `max_connections` in
        # the URL's query string still wins.
        client = aioredis.from_url(url, max_connections=10_000)
        try:
            await client.ping()
        except BaseException:
            await client.aclose()
            raise
        return cls(client, prefix, queue_size=queue_size, stream_maxlen=stream_maxlen)

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed("bus is closed")

    def _channel(self, topic: str) -> str:
        return f"{self.prefix}ev:{topic}"

    def _key(self, stream: str) -> str:
        return f"{self.prefix}cmd:{stream}"

    async def publish(self, topic: str, event: Event) -> None:
        self._check_open()
        await self._client.publish(self._channel(topic), _encode(event))

    async def subscribe(self, topic: str) -> BusSubscription:
        self._check_open()
        sub = _RedisSubscription(self, topic, self._channel(topic), self.queue_size)
        try:
            await sub._start()
        except BaseException:
            await sub.close()
            raise
        self._subs.add(sub)
        return sub

    async def send(self, stream: str, command: Event) -> str:
        self._check_open()
        raw = _encode(command)
        id_ = await self._client.xadd(self._key(stream), {self.FIELD: raw},
                                      maxlen=self.stream_maxlen, approximate=True)
        return _text(id_)

    async def _ensure_group(self, key: str, group: str, *, force: bool = False) -> None:
        if not force and (key, group) in self._groups:
            return
        try:
            # '0': commands sent before the group existed are delivered too.
            await self._client.xgroup_create(key, group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._groups.add((key, group))

    async def _read_group(self, key: str, group: str, consumer: str, id_: str, count: int,
                          block: int | None) -> list[tuple[Any, Any]]:
        for attempt in (1, 2):
            try:
                reply = await self._client.xreadgroup(group, consumer, {key: id_}, count=count,
                                                      block=block)
                return _entries(reply)
            except redis.exceptions.ResponseError as e:
                if "NOGROUP" not in str(e) or attempt == 2:
                    raise
            except redis.exceptions.ConnectionError as e:
                if self._closed:  # close() while blocked: say so, not "connection closed"
                    raise BusClosed("bus is closed") from e
                raise
                await self._ensure_group(key, group, force=True)  # stream deleted meanwhile
        return []

    async def receive(self, stream: str, group: str, consumer: str, *, count: int = 10,
                      timeout: float = 1.0) -> list[tuple[str, Event]]:  # noqa: ASYNC109
        self._check_open()
        if count < 1:
            raise ValueError("count must be at least 1")
        key = self._key(stream)
        await self._ensure_group(key, group)
        out: list[tuple[str, Event]] = []
        # Its own pending entries first ('0'): what it received and did not ack before a crash.
        for id_, fields in await self._read_group(key, group, consumer, "0", count, None):
            await self._collect(key, group, id_, fields, out)
        if len(out) >= count:
            return out
        # Then new ones ('>'), blocking only when there is nothing at all to return. BLOCK 0
        # would mean forever, hence no BLOCK for timeout <= 0 and at least 1 ms otherwise.
        block = None if out or timeout <= 0 else max(1, round(timeout * 1000))
        for id_, fields in await self._read_group(key, group, consumer, ">", count - len(out),
                                                  block):
            await self._collect(key, group, id_, fields, out)
        return out

    async def _collect(self, key: str, group: str, id_: Any, fields: Any,
                       out: list[tuple[str, Event]]) -> None:
        raw = fields.get(self.FIELD) if fields else None
        event = None if raw is None else _decode(raw)
        if event is None:
            # Trimmed by MAXLEN while pending (XREADGROUP returns no fields) or not ours:
            # nothing to deliver, and leaving it pending would return it on every receive.
            log.warning("bus: dropping command %s on %s (trimmed or malformed)", _text(id_), key)
            await self._client.xack(key, group, id_)
            return
        out.append((_text(id_), event))

    async def ack(self, stream: str, group: str, id: str) -> None:
        self._check_open()
        await self._client.xack(self._key(stream), group, id)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        subs = tuple(self._subs)
        if subs:
            await asyncio.gather(*(s.close() for s in subs), return_exceptions=True)
        await self._client.aclose()


async def open_bus(url: str, prefix: str = "loa:") -> Bus:
    """In-process for `""`/`sqlite`/`memory`, Redis for `redis://...`."""
    spec = url.strip()
    if "://" in spec:
        scheme = spec.split("://", 1)[0].lower()
        if scheme in ("memory", "sqlite"):
            return InProcessBus()
        if scheme in ("redis", "rediss"):
            return await RedisBus.connect(spec, prefix)
    else:
        scheme = spec.lower()
        if scheme in ("", "memory", "sqlite"):
            return InProcessBus()
    # Only the scheme: the rest of a URL may carry a password.
    raise ValueError(f"unsupported bus URL scheme {scheme!r}: use '', 'memory', 'sqlite[:///…]', "
                     "'redis://…' or 'rediss://…'")
