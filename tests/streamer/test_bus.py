"""One contract suite for every bus backend (in-process and Redis), plus Redis-only node tests.

Redis is real (tests/conftest.py): under CI=1 an unreachable Redis fails these tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from loa.streamer.state.bus import BufferedSubscription, Bus, BusClosed, Event, InProcessBus
from loa.streamer.state.bus_redis import RedisBus, _RedisSubscription
from loa.streamer.state.open import open_bus
from tests.helpers import delete_prefix

VIETNAMESE = {
    "tiêu_đề": "Thông báo khẩn của Ủy ban nhân dân xã Quảng Điền",
    "nội_dung": "Bà con lưu ý: lũ quét có thể xảy ra tối nay, hãy di dời đến nơi an toàn.",
    "khu_vực": ["Thôn Phước Yên", "Thôn Đức Nhuận", "Hải Dương"],
    "mức_độ": 3,
    "ghi_chú": "Đọc lúc 18 giờ 30 — nhắc lại hai lần 🔊",
}


@dataclass
class Backend:
    name: str
    url: str = ""
    prefix: str = ""


MakeBus = Callable[..., Awaitable[Bus]]


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "redis":
        # Only the Redis half asks for Redis, so the in-process half runs without one.
        return Backend("redis", request.getfixturevalue("redis_url"),
                       request.getfixturevalue("redis_prefix"))
    return Backend("memory")


@pytest.fixture
def redis_backend(redis_url: str, redis_prefix: str) -> Backend:
    return Backend("redis", redis_url, redis_prefix)


async def _opener(backend: Backend) -> AsyncIterator[MakeBus]:
    """`make_bus(**kw)` opens one more bus; for Redis each is a separate node (own connections)
    on the same prefix. All are closed, and the Redis keys deleted, at teardown."""
    opened: list[Bus] = []

    async def make(**kw: Any) -> Bus:
        bus: Bus
        if backend.name == "redis":
            bus = await RedisBus.connect(backend.url, backend.prefix, **kw)
        else:
            bus = InProcessBus(**kw)
        opened.append(bus)
        return bus

    try:
        yield make
    finally:
        for bus in opened:
            await bus.close()
        if backend.name == "redis":
            await delete_prefix(backend.url, backend.prefix)


@pytest.fixture
async def make_bus(backend: Backend) -> AsyncIterator[MakeBus]:
    async for make in _opener(backend):
        yield make


@pytest.fixture
async def make_redis_bus(redis_backend: Backend) -> AsyncIterator[MakeBus]:
    async for make in _opener(redis_backend):
        yield make


@pytest.fixture
async def bus(make_bus: MakeBus) -> Bus:
    return await make_bus()


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Test-side wait for something another task or the server does."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# -- events ----------------------------------------------------------------------------------


async def test_two_subscribers_get_every_event_in_order(bus: Bus) -> None:
    a = await bus.subscribe("onair")
    b = await bus.subscribe("onair")
    for i in range(100):
        await bus.publish("onair", {"n": i, "zone": "z1"})
    for sub in (a, b):
        got = [await sub.get(timeout=5) for _ in range(100)]
        assert got == [{"n": i, "zone": "z1"} for i in range(100)]
    with pytest.raises(TimeoutError):
        await a.get(timeout=0.2)


async def test_publish_right_after_subscribe_is_received(bus: Bus) -> None:
    # `subscribe` returns only once subscribed (Redis: the SUBSCRIBE is confirmed).
    for i in range(20):
        sub = await bus.subscribe(f"fresh-{i}")
        await bus.publish(f"fresh-{i}", {"i": i})
        assert await sub.get(timeout=5) == {"i": i}
        await sub.close()


async def test_topics_are_isolated(bus: Bus) -> None:
    devices = await bus.subscribe("devices")
    onair = await bus.subscribe("onair")
    await bus.publish("onair", {"t": "onair"})
    await bus.publish("devices", {"t": "devices"})
    await bus.publish("other", {"t": "other"})
    assert await devices.get(timeout=5) == {"t": "devices"}
    assert await onair.get(timeout=5) == {"t": "onair"}
    with pytest.raises(TimeoutError):
        await devices.get(timeout=0.2)
    with pytest.raises(TimeoutError):
        await onair.get(timeout=0.2)


async def test_async_iteration(bus: Bus) -> None:
    sub = await bus.subscribe("status")
    for i in range(5):
        await bus.publish("status", {"i": i})
    got: list[Event] = []
    async with asyncio.timeout(5):
        async for event in sub:
            got.append(event)
            if len(got) == 5:
                break
    assert got == [{"i": i} for i in range(5)]


async def test_closed_subscription_stops_receiving(bus: Bus) -> None:
    closed = await bus.subscribe("onair")
    open_ = await bus.subscribe("onair")
    await bus.publish("onair", {"n": 1})
    assert await closed.get(timeout=5) == {"n": 1}
    await closed.close()
    await closed.close()  # idempotent
    await bus.publish("onair", {"n": 2})
    assert await open_.get(timeout=5) == {"n": 1}
    assert await open_.get(timeout=5) == {"n": 2}  # the topic itself still works
    with pytest.raises(BusClosed):
        await closed.get(timeout=0.2)
    async with asyncio.timeout(2):
        assert [e async for e in closed] == []  # iteration simply ends


async def test_close_wakes_a_waiting_get(bus: Bus) -> None:
    sub = await bus.subscribe("onair")
    waiter = asyncio.create_task(sub.get())
    await asyncio.sleep(0.05)
    await sub.close()
    async with asyncio.timeout(2):
        with pytest.raises(BusClosed):
            await waiter


async def test_get_times_out_when_idle(bus: Bus) -> None:
    sub = await bus.subscribe("quiet")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await sub.get(timeout=0.2)
    assert 0.15 <= time.monotonic() - t0 < 2.0
    await bus.publish("quiet", {"after": "timeout"})
    assert await sub.get(timeout=5) == {"after": "timeout"}  # still usable after a timeout


async def test_subscribers_get_their_own_copy(bus: Bus) -> None:
    a = await bus.subscribe("onair")
    b = await bus.subscribe("onair")
    event: Event = {"zones": ["z1", "z2"], "meta": {"gain": 1.0}}
    await bus.publish("onair", event)
    event["zones"].append("mutated-by-publisher")
    got_a = await a.get(timeout=5)
    got_a["zones"].append("mutated-by-a")
    got_a["meta"]["gain"] = 0.0
    assert await b.get(timeout=5) == {"zones": ["z1", "z2"], "meta": {"gain": 1.0}}


async def test_events_must_be_json_objects(bus: Bus) -> None:
    with pytest.raises(TypeError):
        await bus.publish("onair", ["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await bus.publish("onair", {"not": object()})


async def test_slow_subscriber_does_not_block_publishers(backend: Backend,
                                                         make_bus: MakeBus) -> None:
    # In-process: the default 10,000-event queue and 20,000 events. Redis: every event is a
    # network round trip, so a smaller queue and fewer events exercise the same overflow.
    queue, total = (10_000, 20_000) if backend.name == "memory" else (500, 2_000)
    bus = await make_bus(queue_size=queue) if backend.name == "redis" else await make_bus()
    slow = await bus.subscribe("levels")  # never read while publishing
    fast = await bus.subscribe("levels")
    assert isinstance(slow, BufferedSubscription) and isinstance(fast, BufferedSubscription)
    fast_got: list[int] = []

    async def read_fast() -> None:
        while len(fast_got) < total:
            fast_got.append((await fast.get())["n"])

    reader = asyncio.create_task(read_fast())
    t0 = time.monotonic()
    async with asyncio.timeout(30):  # a blocked publisher fails here rather than hanging
        for n in range(total):
            await bus.publish("levels", {"n": n})
            if n % 500 == 499:
                await asyncio.sleep(0)  # let the fast reader run (in-process never waits)
    elapsed = time.monotonic() - t0
    if backend.name == "memory":
        assert elapsed < 2.0, f"{total} in-process publishes took {elapsed:.2f}s"

    async with asyncio.timeout(30):
        await reader
    assert fast_got == list(range(total))  # a slow neighbour costs the fast one nothing
    assert fast.dropped == 0

    # The slow one kept the newest `queue` events, in order, and counted the rest as dropped.
    await eventually(lambda: slow.dropped + slow.qsize() == total)
    assert slow.dropped == total - queue
    kept = [(await slow.get(timeout=5))["n"] for _ in range(queue)]
    assert kept == list(range(total - queue, total))
    with pytest.raises(TimeoutError):
        await slow.get(timeout=0.2)


# -- commands --------------------------------------------------------------------------------


async def test_each_command_goes_to_exactly_one_consumer_of_a_group(bus: Bus) -> None:
    total = 60
    for i in range(total):
        await bus.send("device-cmd", {"i": i})

    # Alternating receives: both consumers get work, none of it twice.
    got: dict[str, list[int]] = {"a": [], "b": []}
    async with asyncio.timeout(20):
        while len(got["a"]) + len(got["b"]) < total:
            for consumer in ("a", "b"):
                for id_, cmd in await bus.receive("device-cmd", "workers", consumer, count=7,
                                                  timeout=0.5):
                    got[consumer].append(cmd["i"])
                    await bus.ack("device-cmd", "workers", id_)
    assert got["a"] and got["b"]
    assert not set(got["a"]) & set(got["b"])
    assert sorted(got["a"] + got["b"]) == list(range(total))


async def test_concurrent_consumers_share_without_duplicates(bus: Bus) -> None:
    total = 100
    seen: list[tuple[str, int]] = []

    async def worker(name: str) -> None:
        while len(seen) < total:
            for id_, cmd in await bus.receive("jobs", "workers", name, count=3, timeout=0.2):
                seen.append((name, cmd["i"]))
                await bus.ack("jobs", "workers", id_)

    workers = [asyncio.create_task(worker(n)) for n in ("a", "b")]
    await asyncio.sleep(0.05)  # both are waiting in receive when the commands arrive
    for i in range(total):
        await bus.send("jobs", {"i": i})
    async with asyncio.timeout(20):
        await asyncio.gather(*workers)
    assert sorted(i for _, i in seen) == list(range(total))  # each exactly once


async def test_every_group_gets_every_command(bus: Bus) -> None:
    ids = [await bus.send("emergency", {"i": i}) for i in range(12)]
    assert len(set(ids)) == 12
    for group in ("zone-north", "zone-south"):
        got: list[tuple[str, Event]] = []
        async with asyncio.timeout(10):
            while len(got) < 12:
                batch = await bus.receive("emergency", group, "node-1", count=5, timeout=0.5)
                for id_, _ in batch:
                    await bus.ack("emergency", group, id_)
                got += batch
        assert got == [(ids[i], {"i": i}) for i in range(12)]
        assert await bus.receive("emergency", group, "node-1", timeout=0.1) == []


async def test_unacked_command_is_redelivered_to_its_consumer(bus: Bus) -> None:
    first_id = await bus.send("device-cmd", {"op": "power", "on": True})
    [(id_, cmd)] = await bus.receive("device-cmd", "workers", "a", timeout=2)
    assert (id_, cmd) == (first_id, {"op": "power", "on": True})
    # Not acked: it stays A's; B does not get it ...
    assert await bus.receive("device-cmd", "workers", "b", timeout=0.2) == []
    # ... and A gets it again, before anything new.
    second_id = await bus.send("device-cmd", {"op": "volume", "db": -6})
    again = await bus.receive("device-cmd", "workers", "a", count=1, timeout=2)
    assert again == [(first_id, {"op": "power", "on": True})]
    both = await bus.receive("device-cmd", "workers", "a", count=10, timeout=2)
    assert both == [(first_id, {"op": "power", "on": True}),
                    (second_id, {"op": "volume", "db": -6})]
    await bus.ack("device-cmd", "workers", first_id)
    assert await bus.receive("device-cmd", "workers", "a", timeout=2) == [
        (second_id, {"op": "volume", "db": -6})]


async def test_acked_commands_are_not_redelivered(bus: Bus) -> None:
    for i in range(3):
        await bus.send("device-cmd", {"i": i})
    batch = await bus.receive("device-cmd", "workers", "a", count=10, timeout=2)
    assert [c["i"] for _, c in batch] == [0, 1, 2]
    for id_, _ in batch:
        await bus.ack("device-cmd", "workers", id_)
    await bus.ack("device-cmd", "workers", batch[0][0])  # twice is harmless
    assert await bus.receive("device-cmd", "workers", "a", timeout=0.2) == []
    assert await bus.receive("device-cmd", "workers", "b", timeout=0.2) == []


async def test_receive_waits_up_to_timeout_then_returns_empty(bus: Bus) -> None:
    t0 = time.monotonic()
    assert await bus.receive("idle", "workers", "a", timeout=0.3) == []
    assert 0.25 <= time.monotonic() - t0 < 2.0
    t0 = time.monotonic()
    assert await bus.receive("idle", "workers", "a", timeout=0) == []  # 0: just look
    assert time.monotonic() - t0 < 0.5


async def test_receive_returns_as_soon_as_a_command_arrives(bus: Bus) -> None:
    waiting = asyncio.create_task(bus.receive("urgent", "workers", "a", timeout=10))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    id_ = await bus.send("urgent", {"alarm": "flood"})
    async with asyncio.timeout(3):
        assert await waiting == [(id_, {"alarm": "flood"})]
    assert time.monotonic() - t0 < 2.0


async def test_command_sent_before_group_exists_is_delivered(bus: Bus) -> None:
    early = await bus.send("late-group", {"sent": "before the group existed"})
    got = await bus.receive("late-group", "newcomers", "a", timeout=2)
    assert got == [(early, {"sent": "before the group existed"})]


async def test_commands_are_copies(bus: Bus) -> None:
    cmd: Event = {"zones": ["z1"]}
    await bus.send("device-cmd", cmd)
    cmd["zones"].append("mutated")
    [(_, got)] = await bus.receive("device-cmd", "g1", "a", timeout=2)
    got["zones"].append("mutated-by-g1")
    assert (await bus.receive("device-cmd", "g2", "a", timeout=2))[0][1] == {"zones": ["z1"]}


async def test_vietnamese_unicode_round_trips(bus: Bus) -> None:
    sub = await bus.subscribe("thông-báo")
    await bus.publish("thông-báo", VIETNAMESE)
    assert await sub.get(timeout=5) == VIETNAMESE
    id_ = await bus.send("lệnh-khẩn", VIETNAMESE)
    assert await bus.receive("lệnh-khẩn", "xã-quảng-điền", "loa-01", timeout=2) == [
        (id_, VIETNAMESE)]


async def test_closed_bus_refuses_work(bus: Bus) -> None:
    sub = await bus.subscribe("onair")
    await bus.close()
    await bus.close()  # idempotent
    with pytest.raises(BusClosed):
        await sub.get(timeout=0.2)
    with pytest.raises(BusClosed):
        await bus.publish("onair", {})
    with pytest.raises(BusClosed):
        await bus.send("device-cmd", {})
    with pytest.raises(BusClosed):
        await bus.receive("device-cmd", "workers", "a", timeout=0)
    with pytest.raises(BusClosed):
        await bus.ack("device-cmd", "workers", "1")


async def test_close_wakes_a_waiting_receive(bus: Bus) -> None:
    waiting = asyncio.create_task(bus.receive("device-cmd", "workers", "a", timeout=10))
    await asyncio.sleep(0.1)
    await bus.close()
    async with asyncio.timeout(2):
        with pytest.raises(BusClosed):
            await waiting


# -- Redis: several nodes, restarts, connection loss -----------------------------------------


async def test_redis_event_crosses_nodes(make_redis_bus: MakeBus) -> None:
    node_a = await make_redis_bus()
    node_b = await make_redis_bus()
    on_b = await node_b.subscribe("onair")
    on_a = await node_a.subscribe("onair")
    await node_a.publish("onair", {"from": "a", "text": "Phát thanh xã"})
    await node_b.publish("onair", {"from": "b"})
    for sub in (on_a, on_b):
        assert [await sub.get(timeout=5) for _ in range(2)] == [
            {"from": "a", "text": "Phát thanh xã"}, {"from": "b"}]


async def test_redis_command_crosses_nodes(make_redis_bus: MakeBus) -> None:
    node_a = await make_redis_bus()
    node_b = await make_redis_bus()
    id_ = await node_a.send("device-cmd", {"device": "loa-07", "op": "reboot"})
    got = await node_b.receive("device-cmd", "workers", "node-b", timeout=2)
    assert got == [(id_, {"device": "loa-07", "op": "reboot"})]
    await node_b.ack("device-cmd", "workers", id_)
    assert await node_a.receive("device-cmd", "workers", "node-a", timeout=0.2) == []


async def test_redis_unacked_command_survives_a_crash(make_redis_bus: MakeBus) -> None:
    before = await make_redis_bus()
    id_ = await before.send("device-cmd", {"op": "play", "file": "bản tin sáng.mp3"})
    assert await before.receive("device-cmd", "workers", "node-1", timeout=2) == [
        (id_, {"op": "play", "file": "bản tin sáng.mp3"})]
    # "Crash": that instance is abandoned without acking; a new process comes up with the
    # same consumer name and gets the command again. Another consumer does not.
    after = await make_redis_bus()
    assert await after.receive("device-cmd", "workers", "node-2", timeout=0.2) == []
    assert await after.receive("device-cmd", "workers", "node-1", timeout=2) == [
        (id_, {"op": "play", "file": "bản tin sáng.mp3"})]
    await after.ack("device-cmd", "workers", id_)
    again = await make_redis_bus()
    assert await again.receive("device-cmd", "workers", "node-1", timeout=0.2) == []


async def test_redis_keys_use_the_prefix(make_redis_bus: MakeBus, redis_backend: Backend) -> None:
    import redis.asyncio as aioredis

    bus = await make_redis_bus()
    await bus.send("device-cmd", {"i": 1})
    client = aioredis.from_url(redis_backend.url)
    try:
        key = f"{redis_backend.prefix}cmd:device-cmd"
        assert await client.type(key) == b"stream"
        [(_, fields)] = list(await client.xrange(key) or [])
        assert fields == {b"body": b'{"i":1}'}
    finally:
        await client.aclose()


async def test_redis_trimmed_pending_command_is_dropped(make_redis_bus: MakeBus,
                                                        redis_backend: Backend) -> None:
    import redis.asyncio as aioredis

    bus = await make_redis_bus()
    await bus.send("device-cmd", {"i": 1})
    assert len(await bus.receive("device-cmd", "workers", "a", timeout=2)) == 1
    client = aioredis.from_url(redis_backend.url)
    try:
        await client.xtrim(f"{redis_backend.prefix}cmd:device-cmd", maxlen=0)
    finally:
        await client.aclose()
    # Its body is gone: nothing to deliver, and it must not come back on every receive.
    assert await bus.receive("device-cmd", "workers", "a", timeout=0.2) == []
    id_ = await bus.send("device-cmd", {"i": 2})
    assert await bus.receive("device-cmd", "workers", "a", timeout=2) == [(id_, {"i": 2})]


async def test_redis_subscription_survives_a_dropped_connection(
        make_redis_bus: MakeBus, redis_backend: Backend) -> None:
    import redis.asyncio as aioredis

    bus = await make_redis_bus()
    sub = await bus.subscribe("onair")
    await bus.publish("onair", {"n": 0})
    assert await sub.get(timeout=5) == {"n": 0}

    # Kill exactly this subscription's connection on the server side.
    assert isinstance(sub, _RedisSubscription)
    conn = sub._pubsub.connection
    host, port = conn._writer.get_extra_info("sockname")[:2]
    client = aioredis.from_url(redis_backend.url)
    try:
        assert await client.client_kill_filter(addr=f"{host}:{port}") == 1
        # Events published while it reconnects are lost (at most once); keep publishing until
        # one gets through, then everything after it arrives in order.
        async with asyncio.timeout(15):
            while True:
                await client.publish(f"{redis_backend.prefix}ev:onair", '{"probe":1}')
                try:
                    if await sub.get(timeout=0.1) == {"probe": 1}:
                        break
                except TimeoutError:
                    continue
    finally:
        await client.aclose()
    for i in range(1, 4):
        await bus.publish("onair", {"n": i})
    got: list[Event] = []
    while len(got) < 3:
        event = await sub.get(timeout=5)
        if event != {"probe": 1}:
            got.append(event)
    assert got == [{"n": 1}, {"n": 2}, {"n": 3}]


# -- open_bus --------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["", "memory", "sqlite", "sqlite:///var/lib/loa/loa.db",
                                 " MEMORY "])
async def test_open_bus_in_process(url: str) -> None:
    bus = await open_bus(url)
    try:
        assert isinstance(bus, InProcessBus)
    finally:
        await bus.close()


@pytest.mark.parametrize("url", ["kafka://broker:9092", "http://example.org",
                                 "amqp://user:s3cret@host/", "redis"])
async def test_open_bus_rejects_unknown_urls(url: str) -> None:
    with pytest.raises(ValueError) as err:
        await open_bus(url)
    assert "s3cret" not in str(err.value)


async def test_open_bus_redis(redis_backend: Backend) -> None:
    bus = await open_bus(redis_backend.url, redis_backend.prefix)
    try:
        assert isinstance(bus, RedisBus)
        sub = await bus.subscribe("onair")
        await bus.publish("onair", {"ok": True})
        assert await sub.get(timeout=5) == {"ok": True}
    finally:
        await bus.close()
        await delete_prefix(redis_backend.url, redis_backend.prefix)
