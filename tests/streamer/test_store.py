"""The store contract: every test here runs against SQLite and Redis, so the backends agree.

A few tests at the end are about one backend only: SQLite's migrations and a second process on
the same file (the `loa user add` CLI while `loa serve` runs), Redis' key layout and prefixes.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
import redis.asyncio as aioredis

from loa.streamer.state import store as store_mod
from loa.streamer.state.open import open_store
from loa.streamer.state.store import (
    Conflict,
    Kind,
    NotFound,
    Store,
    StoreError,
    StoreUnavailable,
)
from loa.streamer.state.store_redis import RedisStore
from loa.streamer.state.store_sqlite import SCHEMA_VERSION, SchemaTooNew, SqliteStore
from tests.faults import TcpProxy, fill, tmpfs
from tests.helpers import delete_prefix

VIETNAMESE = "Thông báo khẩn cấp: nước lũ dâng cao ở xã Đồng Tâm, đề nghị sơ tán"


@dataclass
class Backend:
    """Opens stores of one backend on the same data, so a test can reopen or run two 'nodes'."""

    name: str
    db_path: Path
    redis_url: str = ""
    prefix: str = ""
    opened: list[Store] = field(default_factory=list)

    async def open(self) -> Store:
        s: Store
        if self.name == "sqlite":
            s = await SqliteStore.open(self.db_path)
        else:
            s = await RedisStore.connect(self.redis_url, prefix=self.prefix)
        self.opened.append(s)
        return s


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, redis_prefix: str) -> Backend:
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")  # fails under CI=1 when Redis is down
        return Backend("redis", tmp_path / "loa.db", url, redis_prefix)
    return Backend("sqlite", tmp_path / "loa.db")


# The concrete classes, not Store: their find/count take `kind` positionally only, so the
# device field "kind" can be filtered on (Store's signature cannot bind it).
AnyStore = SqliteStore | RedisStore


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[AnyStore]:
    s = await backend.open()
    assert isinstance(s, SqliteStore | RedisStore)
    try:
        yield s
    finally:
        for opened in backend.opened:
            await opened.close()
        if backend.name == "redis":
            await delete_prefix(backend.redis_url, backend.prefix)


def user(id: str, username: str, **more: object) -> dict[str, object]:
    return {"id": id, "username": username, **more}


@dataclass
class Sick:
    """A store whose backend the test can break for real and heal: a full disk under SQLite,
    a black-holed network to Redis."""

    store: AnyStore
    sick: Callable[[bool], None]


@pytest.fixture(params=["sqlite", "redis"])
def sick_backend(request: pytest.FixtureRequest) -> str:
    """"sqlite" or the Redis URL (failing under CI=1 when Redis is down)."""
    return "sqlite" if request.param == "sqlite" else str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def sick(sick_backend: str, redis_prefix: str) -> AsyncIterator[Sick]:
    if sick_backend == "sqlite":
        with tmpfs("2m") as disk:
            s: AnyStore = await SqliteStore.open(disk / "loa.db")
            filler: list[Path] = []

            def sqlite_sick(on: bool) -> None:
                if on:
                    filler.append(fill(disk))
                else:
                    filler.pop().unlink()

            try:
                yield Sick(s, sqlite_sick)
            finally:
                await s.close()
        return
    url = sick_backend
    proxy = await TcpProxy.redis(url)
    s = await RedisStore.connect(proxy.url(), prefix=redis_prefix)
    try:
        yield Sick(s, lambda on: proxy.set("blackhole" if on else "pass"))
    finally:
        await s.close()
        await proxy.close()
        await delete_prefix(url, redis_prefix)


async def test_a_store_that_cannot_write_says_unavailable_and_recovers(sick: Sick) -> None:
    s = sick.store
    await s.put("broadcast", {"id": "b1", "status": "on-air"})
    sick.sick(True)
    with pytest.raises(StoreUnavailable):  # a full WAL page or a timeout, never a hang
        for i in range(1000):
            await s.append("asrun", {"id": f"x{i}", "pad": "x" * 65536})
    with pytest.raises(StoreUnavailable):
        for i in range(1000):
            await s.put("broadcast", {"id": f"b{i}", "status": "ended", "pad": "y" * 65536})
    sick.sick(False)
    await s.update("broadcast", "b1", {"status": "ended"})
    assert (await s.get("broadcast", "b1")) == {"id": "b1", "status": "ended"}
    await s.append("asrun", {"id": "after", "area": "A"})
    assert [e for e in await s.read_log("asrun") if e["id"] == "after"]


# ---- records: round trip -------------------------------------------------------------------------
async def test_create_then_get_round_trips_json_exactly(store: AnyStore) -> None:
    rec = {
        "id": "u1", "username": "lan", "area": "T01-H1", "display": VIETNAMESE,
        "gain": 0.1 + 0.2, "tiny": 1e-300, "big": 2**53 + 1, "neg": -7, "ok": True,
        "nothing": None, "tags": ["tin tức", "khẩn cấp", 3, 2.5, None, False],
        "nested": {"a": {"b": [{"c": "đ"}, []]}, "empty": {}}, "emoji": "📢",
    }
    returned = await store.create("user", rec)
    assert returned == rec
    got = await store.get("user", "u1")
    assert got == rec
    assert got is not None and got["gain"] == 0.30000000000000004 and got["big"] == 2**53 + 1
    assert isinstance(got["big"], int) and isinstance(got["gain"], float)
    assert got["display"] == VIETNAMESE
    assert await store.get("user", "nobody") is None


async def test_a_record_needs_a_string_id(store: AnyStore) -> None:
    for bad in ({}, {"id": 5}, {"id": ""}, {"id": None}):
        with pytest.raises(ValueError):
            await store.create("area", bad)
        with pytest.raises(ValueError):
            await store.put("area", bad)
    with pytest.raises(ValueError):
        await store.put_many("area", [{"id": "ok"}, {"id": 3}])
    assert await store.count("area") == 0


async def test_unknown_kind_or_log_is_a_value_error(store: AnyStore) -> None:
    calls = [
        store.get("nope", "x"), store.create("nope", {"id": "x"}), store.put("nope", {"id": "x"}),
        store.update("nope", "x", {}), store.delete("nope", "x"), store.find("nope"),
        store.count("nope"), store.put_many("nope", [{"id": "x"}]),
        store.append("nope", {"a": 1}), store.read_log("nope"),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            await call


# ---- create ------------------------------------------------------------------------------------
async def test_create_an_existing_id_conflicts_and_stores_nothing(store: AnyStore) -> None:
    await store.create("user", user("u1", "lan", area="A"))
    with pytest.raises(Conflict):
        await store.create("user", user("u1", "minh", area="B"))
    assert await store.get("user", "u1") == user("u1", "lan", area="A")
    assert await store.find("user", username="minh") == []
    assert await store.find("user", area="B") == []


async def test_create_a_duplicate_unique_value_conflicts_and_stores_nothing(store: AnyStore) -> None:
    await store.create("user", user("u1", "lan"))
    with pytest.raises(Conflict, match="username"):
        await store.create("user", user("u2", "lan", area="B"))
    assert await store.get("user", "u2") is None
    assert await store.count("user") == 1
    assert await store.find("user", area="B") == []
    # A missing unique field is null, and null never clashes.
    await store.create("user", {"id": "u3"})
    await store.create("user", {"id": "u4", "username": None})
    assert [r["id"] for r in await store.find("user", username=None)] == ["u3", "u4"]


async def test_concurrent_creates_of_one_username_exactly_one_wins(backend: Backend,
                                                                   store: AnyStore) -> None:
    other = await backend.open()  # a second node / process on the same data
    stores = [store, other]
    results = await asyncio.gather(
        *(stores[i % 2].create("user", user(f"u{i:02d}", "admin")) for i in range(20)),
        return_exceptions=True)
    wins = [r for r in results if isinstance(r, dict)]
    assert len(wins) == 1, results
    assert all(isinstance(r, Conflict) for r in results if not isinstance(r, dict)), results
    assert await store.count("user", username="admin") == 1
    assert await other.count("user") == 1
    assert await store.find("user", username="admin") == wins


async def test_concurrent_creates_of_one_id_exactly_one_wins(store: AnyStore) -> None:
    results = await asyncio.gather(
        *(store.create("area", {"id": "T01", "n": i}) for i in range(10)),
        return_exceptions=True)
    assert sum(isinstance(r, dict) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 9


# ---- put ---------------------------------------------------------------------------------------
async def test_put_inserts_then_replaces_the_whole_record(store: AnyStore) -> None:
    assert await store.put("device", {"id": "d1", "area": "A", "kind": "speaker", "vol": 3}) == {
        "id": "d1", "area": "A", "kind": "speaker", "vol": 3}
    await store.put("device", {"id": "d1", "area": "B"})
    assert await store.get("device", "d1") == {"id": "d1", "area": "B"}
    assert await store.find("device", area="A") == []
    assert await store.find("device", kind="speaker") == []
    assert await store.find("device", area="B", kind=None) == [{"id": "d1", "area": "B"}]
    assert await store.count("device") == 1


async def test_put_enforces_unique_values_against_other_records_only(store: AnyStore) -> None:
    await store.create("user", user("u1", "lan", area="A"))
    await store.create("user", user("u2", "minh", area="A"))
    await store.put("user", user("u1", "lan", area="C"))  # its own value: fine
    with pytest.raises(Conflict, match="username"):
        await store.put("user", user("u2", "lan", area="B"))
    with pytest.raises(Conflict):
        await store.put("user", user("u3", "lan"))
    assert await store.get("user", "u2") == user("u2", "minh", area="A")
    assert await store.get("user", "u3") is None
    assert [r["id"] for r in await store.find("user", username="lan")] == ["u1"]
    assert [r["id"] for r in await store.find("user", area="A")] == ["u2"]
    assert await store.find("user", area="B") == []


# ---- update ------------------------------------------------------------------------------------
async def test_update_merges_and_none_removes_a_field(store: AnyStore) -> None:
    await store.create("programme", {"id": "p1", "area": "A", "status": "draft", "title": "x",
                                     "meta": {"a": 1}})
    new = await store.update("programme", "p1", {"status": "approved", "title": None,
                                                 "meta": {"b": 2}, "by": VIETNAMESE})
    expect = {"id": "p1", "area": "A", "status": "approved", "meta": {"b": 2}, "by": VIETNAMESE}
    assert new == expect
    assert await store.get("programme", "p1") == expect
    assert await store.update("programme", "p1", {}) == expect
    assert await store.update("programme", "p1", {"id": "p1"}) == expect


async def test_update_of_a_missing_record_is_not_found(store: AnyStore) -> None:
    with pytest.raises(NotFound):
        await store.update("user", "ghost", {"area": "A"})
    with pytest.raises(KeyError):  # NotFound is a KeyError too
        await store.update("user", "ghost", {"area": "A"})
    assert await store.count("user") == 0


async def test_update_cannot_change_the_id(store: AnyStore) -> None:
    await store.create("area", {"id": "T01", "parent": None})
    with pytest.raises(ValueError):
        await store.update("area", "T01", {"id": "T02"})
    with pytest.raises(ValueError):
        await store.update("area", "T01", {"id": None})
    assert await store.get("area", "T01") == {"id": "T01", "parent": None}
    assert await store.get("area", "T02") is None


async def test_update_rechecks_uniqueness(store: AnyStore) -> None:
    await store.create("user", user("u1", "lan", area="A"))
    await store.create("user", user("u2", "minh", area="A"))
    with pytest.raises(Conflict, match="username"):
        await store.update("user", "u2", {"username": "lan", "area": "B"})
    assert await store.get("user", "u2") == user("u2", "minh", area="A")  # nothing changed
    assert await store.find("user", area="B") == []
    # Renaming frees the old value for someone else.
    await store.update("user", "u1", {"username": "lan2"})
    await store.update("user", "u2", {"username": "lan"})
    assert [r["id"] for r in await store.find("user", username="lan")] == ["u2"]
    assert [r["id"] for r in await store.find("user", username="lan2")] == ["u1"]
    assert await store.find("user", username="minh") == []
    await store.create("user", user("u3", "minh"))
    # Removing the unique value frees it as well.
    await store.update("user", "u3", {"username": None})
    await store.create("user", user("u4", "minh"))


async def test_update_moves_index_entries(store: AnyStore) -> None:
    await store.create("command", {"id": "c1", "device": "d1", "status": "queued"})
    await store.create("command", {"id": "c2", "device": "d1", "status": "queued"})
    await store.update("command", "c1", {"status": "done"})
    assert [r["id"] for r in await store.find("command", status="queued")] == ["c2"]
    assert [r["id"] for r in await store.find("command", status="done")] == ["c1"]
    assert await store.count("command", device="d1", status="queued") == 1
    await store.update("command", "c2", {"device": None})
    assert [r["id"] for r in await store.find("command", device=None)] == ["c2"]
    assert [r["id"] for r in await store.find("command", device="d1")] == ["c1"]


# ---- delete ------------------------------------------------------------------------------------
async def test_delete_returns_whether_it_existed_and_removes_index_entries(store: AnyStore) -> None:
    await store.create("user", user("u1", "lan", area="A"))
    await store.create("user", user("u2", "minh", area="A"))
    assert await store.delete("user", "u1") is True
    assert await store.delete("user", "u1") is False
    assert await store.delete("user", "never") is False
    assert await store.get("user", "u1") is None
    assert [r["id"] for r in await store.find("user", area="A")] == ["u2"]
    assert await store.find("user", username="lan") == []
    assert await store.count("user", area="A") == 1
    await store.create("user", user("u3", "lan"))  # the unique value is free again


# ---- find / count ------------------------------------------------------------------------------
async def test_find_filters_on_indexed_fields_ordered_by_id(store: AnyStore) -> None:
    await store.put_many("schedule", [
        {"id": "s3", "area": "T01", "programme": "p1"},
        {"id": "s1", "area": "T01", "programme": "p2"},
        {"id": "s2", "area": "T02", "programme": "p1"},
        {"id": "s10", "area": "T01", "programme": "p1"},
        {"id": "s0"},
    ])
    assert [r["id"] for r in await store.find("schedule")] == ["s0", "s1", "s10", "s2", "s3"]
    assert [r["id"] for r in await store.find("schedule", area="T01")] == ["s1", "s10", "s3"]
    assert [r["id"] for r in await store.find("schedule", area="T01", programme="p1")] == [
        "s10", "s3"]
    assert [r["id"] for r in await store.find("schedule", area=None)] == ["s0"]
    assert await store.find("schedule", area="T03") == []
    assert await store.find("schedule", area="T02", programme="p2") == []
    assert await store.count("schedule") == 5
    assert await store.count("schedule", area="T01") == 3
    assert await store.count("schedule", area="T01", programme="p1") == 2
    assert await store.count("schedule", area="nowhere") == 0
    assert await store.find("schedule", area="T02") == [
        {"id": "s2", "area": "T02", "programme": "p1"}]


async def test_inbox_entries_are_found_by_commune_bulletin_and_schedule(store: AnyStore) -> None:
    """What web/api/inbox.py reads: a commune's inbox, a bulletin's entries, the entry a
    schedule airs; an entry's state moves by update and its schedule index follows."""
    await store.create("bulletin", {"id": "b1", "area": "T01", "targets": ["T01-H1"]})
    await store.put_many("inbox", [
        {"id": f"e{i}", "bulletin": "b1", "area": code, "state": "pending"}
        for i, code in enumerate(("T01-H1-X1", "T01-H1-X2"))])
    await store.update("inbox", "e0", {"state": "scheduled", "schedule": "s9"})
    assert [r["id"] for r in await store.find("inbox", bulletin="b1")] == ["e0", "e1"]
    assert [r["id"] for r in await store.find("inbox", area="T01-H1-X2")] == ["e1"]
    assert (await store.find("inbox", schedule="s9"))[0]["state"] == "scheduled"
    assert [r["id"] for r in await store.find("bulletin", area="T01")] == ["b1"]


async def test_find_compares_values_as_json(store: AnyStore) -> None:
    await store.put_many("area", [
        {"id": "a", "parent": 1}, {"id": "b", "parent": "1"}, {"id": "c", "parent": 1.5},
        {"id": "d", "parent": None}, {"id": "e"}, {"id": "f", "parent": True},
        {"id": "g", "parent": {"y": 1, "x": [1, "đ"]}}, {"id": "h", "parent": VIETNAMESE},
    ])
    assert [r["id"] for r in await store.find("area", parent=1)] == ["a"]
    assert [r["id"] for r in await store.find("area", parent="1")] == ["b"]
    assert [r["id"] for r in await store.find("area", parent=1.5)] == ["c"]
    assert [r["id"] for r in await store.find("area", parent=None)] == ["d", "e"]
    assert [r["id"] for r in await store.find("area", parent=True)] == ["f"]
    assert [r["id"] for r in await store.find("area", parent={"x": [1, "đ"], "y": 1})] == ["g"]
    assert [r["id"] for r in await store.find("area", parent=VIETNAMESE)] == ["h"]


async def test_find_or_count_on_a_field_that_is_not_indexed_is_a_value_error(
        store: AnyStore) -> None:
    await store.create("user", user("u1", "lan", role="admin"))
    with pytest.raises(ValueError, match="role"):
        await store.find("user", role="admin")
    with pytest.raises(ValueError):
        await store.count("user", role="admin")
    with pytest.raises(ValueError):
        await store.find("tts", id="u1")  # tts has no indexed fields at all


# ---- put_many ----------------------------------------------------------------------------------
async def test_put_many_10000_devices_then_find_and_count(store: AnyStore) -> None:
    devices = [{"id": f"dev{i:05d}", "area": f"T{i % 20:02d}", "kind": ("speaker", "radio")[i % 2],
                "name": f"Loa xã {i}", "gain": i / 7} for i in range(10_000)]
    t0 = time.perf_counter()
    await store.put_many("device", devices)
    elapsed = time.perf_counter() - t0
    assert elapsed < 3.0, f"put_many(10,000) took {elapsed:.2f} s"
    assert await store.count("device") == 10_000
    assert await store.count("device", area="T07") == 500
    assert await store.count("device", area="T07", kind="radio") == 500
    assert await store.count("device", area="T07", kind="speaker") == 0
    t07 = await store.find("device", area="T07")
    assert [r["id"] for r in t07] == [f"dev{i:05d}" for i in range(7, 10_000, 20)]
    assert t07[1] == devices[27]
    assert len(await store.find("device")) == 10_000
    # Again, as an upsert that moves every device: old index entries go.
    await store.put_many("device", [{**d, "area": "ALL"} for d in devices[:5000]])
    assert await store.count("device") == 10_000
    assert await store.count("device", area="ALL") == 5000
    assert await store.count("device", area="T07") == 250


async def test_put_many_is_all_or_nothing(store: AnyStore) -> None:
    await store.create("user", user("u1", "lan"))
    with pytest.raises(Conflict):  # clashes with a stored record
        await store.put_many("user", [user("u2", "minh"), user("u3", "lan")])
    with pytest.raises(Conflict):  # clashes within the batch
        await store.put_many("user", [user("u4", "hoa"), user("u5", "hoa")])
    assert [r["id"] for r in await store.find("user")] == ["u1"]
    assert await store.find("user", username="minh") == []
    await store.put_many("user", [])  # an empty batch is fine


async def test_put_many_may_swap_unique_values_and_last_of_a_repeated_id_wins(
        store: AnyStore) -> None:
    await store.put_many("user", [user("u1", "lan"), user("u2", "minh")])
    await store.put_many("user", [user("u1", "minh"), user("u2", "lan")])
    assert (await store.find("user", username="lan"))[0]["id"] == "u2"
    assert (await store.find("user", username="minh"))[0]["id"] == "u1"
    await store.put_many("media", [{"id": "m1", "sha256": "aa", "area": "A"},
                                   {"id": "m1", "sha256": "bb", "area": "B"}])
    assert await store.get("media", "m1") == {"id": "m1", "sha256": "bb", "area": "B"}
    assert await store.find("media", sha256="aa") == []
    assert await store.find("media", area="A") == []
    await store.create("media", {"id": "m2", "sha256": "aa"})


# ---- logs --------------------------------------------------------------------------------------
async def test_append_sets_ts_and_an_increasing_seq(store: AnyStore) -> None:
    before = time.time()
    e1 = await store.append("audit", {"action": "login", "user": "lan", "note": VIETNAMESE})
    e2 = await store.append("audit", {"action": "logout", "user": "lan", "seq": -5})
    e3 = await store.append("audit", {"action": "old", "ts": 1000.5})
    assert before <= e1["ts"] <= e2["ts"] <= time.time()
    assert isinstance(e1["seq"], int) and e1["seq"] < e2["seq"] < e3["seq"]
    assert e3["ts"] == 1000.5
    assert e1 == {"action": "login", "user": "lan", "note": VIETNAMESE, "ts": e1["ts"],
                  "seq": e1["seq"]}
    assert await store.read_log("audit") == [e3, e1, e2]  # by ts, oldest first
    seqs = [(await store.append("asrun", {"i": i}))["seq"] for i in range(50)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 50
    with pytest.raises(ValueError):
        await store.append("audit", {"ts": "yesterday"})


async def test_an_entry_with_an_id_is_appended_once(store: AnyStore) -> None:
    first = await store.append("asrun", {"id": "e1", "area": "A", "ts": 10.0})
    again = await store.append("asrun", {"id": "e1", "area": "A", "ts": 10.0})  # a retry
    other = await store.append("asrun", {"id": "e2", "area": "A", "ts": 11.0})
    await store.append("audit", {"id": "e1", "ts": 12.0})  # ids are per log
    assert again == first and other["seq"] > first["seq"]
    assert [e["id"] for e in await store.read_log("asrun")] == ["e1", "e2"]
    assert len(await store.read_log("audit")) == 1


async def test_concurrent_appends_get_distinct_seqs(store: AnyStore) -> None:
    entries = await asyncio.gather(*(store.append("asrun", {"i": i}) for i in range(100)))
    assert len({e["seq"] for e in entries}) == 100
    read = await store.read_log("asrun")
    assert len(read) == 100
    assert sorted(e["seq"] for e in read) == sorted(e["seq"] for e in entries)


async def test_read_log_ranges_are_since_inclusive_until_exclusive(store: AnyStore) -> None:
    for ts in (30.0, 10.0, 20.0, 20.0, 40.25):  # out of order on purpose
        await store.append("asrun", {"ts": ts, "programme": f"p{ts}"})
    ts_of = [e["ts"] for e in await store.read_log("asrun")]
    assert ts_of == [10.0, 20.0, 20.0, 30.0, 40.25]
    same = await store.read_log("asrun", since=20.0, until=20.0001)
    assert len(same) == 2 and same[0]["seq"] < same[1]["seq"]  # ties: append order
    assert [e["ts"] for e in await store.read_log("asrun", since=20.0)] == [
        20.0, 20.0, 30.0, 40.25]
    assert [e["ts"] for e in await store.read_log("asrun", until=30.0)] == [10.0, 20.0, 20.0]
    assert [e["ts"] for e in await store.read_log("asrun", since=10.0, until=40.25)] == [
        10.0, 20.0, 20.0, 30.0]
    assert [e["ts"] for e in await store.read_log("asrun", limit=2)] == [10.0, 20.0]
    assert await store.read_log("asrun", since=41.0) == []
    assert await store.read_log("asrun", limit=0) == []
    assert await store.read_log("audit") == []  # logs are separate


async def test_read_log_filters_on_top_level_fields_before_the_limit(store: AnyStore) -> None:
    for i in range(1200):
        await store.append("audit", {"ts": 100.0 + i, "user": ("lan", "minh")[i % 3 == 0],
                                     "action": ("login", "air")[i % 2], "n": i})
    minh = await store.read_log("audit", user="minh")
    assert len(minh) == 400 and [e["n"] for e in minh] == list(range(0, 1200, 3))
    both = await store.read_log("audit", user="minh", action="air", limit=5)
    assert [e["n"] for e in both] == [3, 9, 15, 21, 27]
    ranged = await store.read_log("audit", since=1100.0, until=1200.0, user="minh")
    assert [e["n"] for e in ranged] == list(range(1002, 1100, 3))
    assert await store.read_log("audit", user="nobody") == []
    assert len(await store.read_log("audit", user=None)) == 0
    await store.append("audit", {"ts": 5.0, "action": "boot"})
    assert [e["action"] for e in await store.read_log("audit", user=None)] == ["boot"]
    assert [e["n"] for e in await store.read_log("audit", n=7)] == [7]
    assert len(await store.read_log("audit")) == 1000  # the default limit


# ---- counters ----------------------------------------------------------------------------------
async def test_hit_counts_within_a_window_and_resets_after_it(store: AnyStore) -> None:
    assert [await store.hit("login:1.2.3.4", 0.3) for _ in range(4)] == [1, 2, 3, 4]
    assert await store.hit("login:5.6.7.8", 0.3) == 1  # keys are independent
    await asyncio.sleep(0.4)
    assert await store.hit("login:1.2.3.4", 0.3) == 1
    assert await store.hit("login:1.2.3.4", 0.3) == 2
    counts = await asyncio.gather(*(store.hit("burst", 5.0) for _ in range(20)))
    assert sorted(counts) == list(range(1, 21))


# ---- lifecycle ---------------------------------------------------------------------------------
async def test_reopening_keeps_the_data(backend: Backend, store: AnyStore) -> None:
    await store.create("user", user("u1", "lan", area="A", display=VIETNAMESE))
    entry = await store.append("audit", {"action": "create", "user": "u1"})
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreError):
        await store.get("user", "u1")
    again = await backend.open()
    assert await again.get("user", "u1") == user("u1", "lan", area="A", display=VIETNAMESE)
    assert await again.find("user", area="A") == [user("u1", "lan", area="A",
                                                       display=VIETNAMESE)]
    with pytest.raises(Conflict):
        await again.create("user", user("u2", "lan"))
    assert await again.read_log("audit") == [entry]
    assert (await again.append("audit", {"action": "x"}))["seq"] > entry["seq"]


async def test_a_new_indexed_field_is_indexed_for_existing_records(
        backend: Backend, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    kinds = cast(dict[str, Kind], store_mod.KINDS)
    await store.put_many("tts", [{"id": "t1", "voice": "vi-north", "lang": "vi"}, {"id": "t2"},
                                 {"id": "t3", "voice": "vi-south", "lang": "vi"}])
    await store.close()
    monkeypatch.setitem(kinds, "tts", Kind(indexed=("voice",), unique=("voice",)))
    again = await backend.open()
    assert [r["id"] for r in await again.find("tts", voice="vi-north")] == ["t1"]
    assert [r["id"] for r in await again.find("tts", voice=None)] == ["t2"]
    with pytest.raises(Conflict):
        await again.create("tts", {"id": "t4", "voice": "vi-south"})
    await again.close()
    # A declaration the data violates is refused at open, and nothing is half-applied.
    monkeypatch.setitem(kinds, "tts", Kind(indexed=("lang",), unique=("lang",)))
    with pytest.raises(Conflict, match="tts"):
        await backend.open()
    monkeypatch.setitem(kinds, "tts", Kind(indexed=("voice",), unique=("voice",)))
    again = await backend.open()
    assert [r["id"] for r in await again.find("tts", voice="vi-south")] == ["t3"]
    with pytest.raises(Conflict):
        await again.create("tts", {"id": "t4", "voice": "vi-north"})


async def test_open_store_picks_the_backend(tmp_path: Path, redis_url: str,
                                            redis_prefix: str) -> None:
    s = await open_store("sqlite", tmp_path / "data")
    assert isinstance(s, SqliteStore) and s.path == tmp_path / "data" / "loa.db"
    await s.close()
    s = await open_store("", tmp_path / "data2")
    assert isinstance(s, SqliteStore)
    await s.close()
    s = await open_store(f"sqlite:///{tmp_path / 'x' / 'y.db'}", tmp_path)
    assert isinstance(s, SqliteStore) and (tmp_path / "x" / "y.db").exists()
    await s.close()
    r = await open_store(redis_url, tmp_path, prefix=redis_prefix)
    try:
        assert isinstance(r, RedisStore) and r.prefix == redis_prefix
        await r.create("area", {"id": "T01"})
        assert await r.get("area", "T01") == {"id": "T01"}
    finally:
        await r.close()
        await delete_prefix(redis_url, redis_prefix)
    with pytest.raises(ValueError):
        await open_store("postgres://x", tmp_path)


# ---- SQLite only -------------------------------------------------------------------------------
async def test_sqlite_open_creates_directories_wal_and_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "loa.db"
    s = await SqliteStore.open(path)
    await s.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = [v for (v,) in db.execute("SELECT version FROM schema_version")]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"records", "idx", "logs", "counters", "schema_version", "meta"} <= tables
    finally:
        db.close()


async def test_sqlite_reopening_a_migrated_file_is_a_no_op(tmp_path: Path) -> None:
    path = tmp_path / "loa.db"
    s = await SqliteStore.open(path)
    await s.create("user", user("u1", "lan"))
    await s.close()
    db = sqlite3.connect(path)
    before = db.execute("SELECT version, applied FROM schema_version").fetchall()
    changes = db.execute("PRAGMA data_version").fetchone()[0]
    s = await SqliteStore.open(path)
    assert await s.get("user", "u1") == user("u1", "lan")
    # Another connection's commit would bump data_version; opening committed nothing.
    assert db.execute("PRAGMA data_version").fetchone()[0] == changes
    await s.close()
    assert db.execute("SELECT version, applied FROM schema_version").fetchall() == before
    db.close()


async def test_sqlite_refuses_a_file_from_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "loa.db"
    s = await SqliteStore.open(path)
    await s.create("user", user("u1", "lan"))
    await s.close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_version (version, applied) VALUES (?, 0)",
                   (SCHEMA_VERSION + 1,))
    db.close()
    with pytest.raises(SchemaTooNew, match="newer") as err:
        await SqliteStore.open(path)
    assert isinstance(err.value, StoreError)
    with sqlite3.connect(path) as db:  # refused, and left alone
        assert db.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 1
    db.close()


async def test_sqlite_a_failed_migration_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loa.streamer.state import store_sqlite

    path = tmp_path / "loa.db"
    await (await SqliteStore.open(path)).close()

    def broken(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE extra (x)")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(store_sqlite, "MIGRATIONS", (*store_sqlite.MIGRATIONS, broken))
    monkeypatch.setattr(store_sqlite, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(RuntimeError, match="migration bug"):
        await SqliteStore.open(path)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == (
            SCHEMA_VERSION)
        assert db.execute("SELECT name FROM sqlite_master WHERE name='extra'").fetchone() is None
    db.close()


CLI = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from loa.streamer.state.store_sqlite import SqliteStore

    async def main():
        s = await SqliteStore.open(Path(sys.argv[1]))
        seen = await s.get("user", "server-made")
        for i in range(int(sys.argv[2])):
            await s.create("user", {"id": f"cli{i}", "username": f"cli{i}"})
        await s.close()
        return 0 if seen else 3  # 3: the server's write was not visible

    sys.exit(asyncio.run(main()))
""")


async def test_sqlite_a_second_process_writes_while_the_server_runs(tmp_path: Path) -> None:
    path = tmp_path / "loa.db"
    server = await SqliteStore.open(path)
    try:
        await server.create("user", user("server-made", "server"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLI, str(path), "200",
            stderr=asyncio.subprocess.PIPE)
        # Both write at once: the busy timeout makes them queue, nobody gets "locked".
        for i in range(200):
            await server.create("user", user(f"srv{i}", f"srv{i}"))
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, (proc.returncode, err.decode())
        assert await server.get("user", "cli199") == {"id": "cli199", "username": "cli199"}
        assert (await server.find("user", username="cli7"))[0]["id"] == "cli7"
        assert await server.count("user") == 401
        with pytest.raises(Conflict):
            await server.create("user", user("dup", "cli0"))
    finally:
        await server.close()


async def test_sqlite_a_store_in_another_thread_sees_the_writes(tmp_path: Path) -> None:
    path = tmp_path / "loa.db"
    server = await SqliteStore.open(path)

    async def cli() -> dict[str, object] | None:
        s = await SqliteStore.open(path)
        try:
            await s.create("user", user("from-thread", "thread"))
            return await s.get("user", "from-server")
        finally:
            await s.close()

    try:
        await server.create("user", user("from-server", "server"))
        seen = await asyncio.to_thread(asyncio.run, cli())
        assert seen == user("from-server", "server")
        assert await server.get("user", "from-thread") == user("from-thread", "thread")
        with pytest.raises(Conflict):
            await server.create("user", user("x", "thread"))
    finally:
        await server.close()


# ---- Redis only --------------------------------------------------------------------------------
async def test_redis_keeps_every_key_under_its_prefix(redis_url: str, redis_prefix: str) -> None:
    a = await RedisStore.connect(redis_url, prefix=redis_prefix)
    b = await RedisStore.connect(redis_url, prefix=redis_prefix + "other:")
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        await a.create("user", user("u1", "lan", area="A"))
        await a.append("audit", {"action": "x"})
        await a.hit("k", 10)
        assert await b.get("user", "u1") is None and await b.count("user") == 0
        assert await b.read_log("audit") == []
        keys = {k async for k in client.scan_iter(match=redis_prefix + "*")}
        mine = {k for k in keys if not k.startswith(redis_prefix + "other:")}
        p = redis_prefix
        assert {f"{p}rec:user", f"{p}uniq:user:username", f'{p}idx:user:username:"lan"',
                f'{p}idx:user:area:"A"', f"{p}log:audit", f"{p}seq:audit", f"{p}hit:k",
                f"{p}meta"} <= mine
        assert await client.hget(f"{p}uniq:user:username", '"lan"') == "u1"
        assert await client.pttl(f"{p}hit:k") > 0
    finally:
        await a.close()
        await b.close()
        await client.aclose()
        await delete_prefix(redis_url, redis_prefix)


async def test_redis_refuses_a_newer_schema(redis_url: str, redis_prefix: str) -> None:
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        await client.hset(f"{redis_prefix}meta", "schema", "999")
        with pytest.raises(StoreError, match="newer"):
            await RedisStore.connect(redis_url, prefix=redis_prefix)
    finally:
        await client.aclose()
        await delete_prefix(redis_url, redis_prefix)
