"""The Redis bus backend: pub/sub for events, streams with consumer groups for commands.

Several nodes of one level share it (DESIGN.md "State"); it passes the same contract suite as the
in-process bus (tests/test_bus.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from loa.streamer.state.bus import (
    QUEUE_SIZE,
    STREAM_MAXLEN,
    BufferedSubscription,
    Bus,
    BusClosed,
    BusSubscription,
    Event,
    decode_event,
    encode_event,
)

log = logging.getLogger("loa.bus")

_SUBSCRIBE_CONFIRM_TIMEOUT = 10.0


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
        await self._client.publish(self._channel(topic), encode_event(event))

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
        raw = encode_event(command)
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
        event = None if raw is None else decode_event(raw)
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
