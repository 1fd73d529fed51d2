"""The store: durable records and append-only logs, behind one interface with two backends.

- SQLite under the data directory (`store_sqlite.SqliteStore`): the embedded default, WAL, versioned
  migrations, so `loa serve` needs nothing else. Blocking SQLite calls run in a thread.
- Redis (`store_redis.RedisStore`): for several nodes.

Records are JSON objects of a declared kind with a string `id`. Each kind declares the fields it is
looked up by (`find(kind, field=value)`) and which of them are unique. Logs (audit, as-run) are
append-only, time-ordered entries. Both backends pass one contract suite (tests/test_store.py).
"""

from __future__ import annotations

import abc
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loa.streamer import errors
from loa.streamer.errors import LoaError
from loa.streamer.messages import say

Record = dict[str, Any]


class StoreError(Exception):
    """A store failure. Not a LoaError itself: a closed store or an unusable file is a bug or a
    set-up fault (500, or no start), not a refusal; its subclasses below are refusals."""


class NotFound(StoreError, LoaError, KeyError):
    kind: errors.Kind = "not_found"


class Conflict(StoreError, LoaError):
    """An id or a unique field value that already exists, or a stale version."""

    kind: errors.Kind = "conflict"


class StoreUnavailable(StoreError, LoaError):
    """The store cannot be reached or written now (Redis down or slow, disk full, read-only
    data directory). Transient: the HTTP layer answers 503 with Retry-After, writers retry."""

    kind: errors.Kind = "unavailable"

    retry_after = 5  # seconds an HTTP client is told to wait


UNREACHABLE = say("store.unreachable")
READ_ONLY = say("store.read_only")


@dataclass(frozen=True)
class Kind:
    indexed: tuple[str, ...] = ()  # fields `find` can filter on (equality)
    unique: tuple[str, ...] = ()  # subset of `indexed` whose values may not repeat


KINDS: Mapping[str, Kind] = {
    "area": Kind(indexed=("parent",)),
    "user": Kind(indexed=("username", "area"), unique=("username",)),
    "token": Kind(indexed=("user",)),  # id = sha256 of the bearer token, never the token itself
    "media": Kind(indexed=("sha256", "area")),  # records of the same bytes share their audio
    "tts": Kind(),  # id = hash of (engine, voice, area, text) -> media id
    "programme": Kind(indexed=("area", "status")),
    "schedule": Kind(indexed=("area", "programme")),
    "broadcast": Kind(indexed=("status", "issuer")),  # persisted on-air broadcasts (restart)
    "device": Kind(indexed=("area", "kind")),
    "command": Kind(indexed=("device", "status")),
    "emergency": Kind(indexed=("status", "issuer", "cap_key", "cancel_key"), unique=("cap_key",)),
    # As-run entries of segments still on air (the log gets them when they close; a crash
    # leaves them here, closed at the next start at their node's last "still on air" mark).
    "onair": Kind(indexed=("area", "node")),
    "node": Kind(),  # id = node id, `seen` = its last "still on air" mark
    "bulletin": Kind(indexed=("area",)),  # sent down by a province or district (inbox.py)
    "inbox": Kind(indexed=("area", "bulletin", "schedule")),  # one per commune a bulletin reaches
    # The exchange with the central system: its bulletins received (id = "peer:bulletin id", the
    # first answer kept for replays) and our messages to peers (the pull feed and push outbox).
    "exchange_in": Kind(indexed=("peer", "broadcast")),
    "exchange_out": Kind(indexed=("peer", "push")),
    "exchange_cursor": Kind(),  # id = peer: where we stand in its bulletin feed
    "node_key": Kind(indexed=("area",)),  # a child node's link credential (only its hash)
    # Upward over the node link (relay/uplink.py): the child's queue of reports not yet acked
    # by its parent, and on the parent the devices its children reported (id = "node:device").
    "uplink_out": Kind(indexed=("peer", "push")),
    "node_device": Kind(indexed=("node", "area", "kind")),
    "rtp_group": Kind(indexed=("block",), unique=("block",)),  # id = area: its multicast block
    "capture": Kind(indexed=("area", "status")),  # scheduled captures of inputs (web/captures.py)
    "area_settings": Kind(),  # id = area: the sections its people set (streamer/areasettings.py)
    # proof of delivery (relay/devices/proof.py): id = "<emergency>.<device>", what it played
    "delivery": Kind(indexed=("subject",)),
    "shown": Kind(indexed=("area", "day")),  # boards' proof of play: per board, item and day
    "firmware": Kind(indexed=("model",)),  # an OTA image (relay/devices/ota.py)
    "rollout": Kind(indexed=("state", "area")),  # its staged rollout, device by device
    "airtime": Kind(),  # id = area: its own quiet hours and volume table (streamer/airtime.py)
    # Outage history (relay/devices/history.py): each device's open interval (id = device), its
    # signal per month (id = device:YYYY-MM); closed intervals are the log `device_intervals`.
    "device_interval": Kind(indexed=("area",)),
    "device_month": Kind(indexed=("month",)),
    # Alerts to people (relay/notify.py): who is told of an area's alerts, and the outbox of
    # signed webhook pushes (relay/exchange.py's Outbox, of its own kind).
    "alert_contact": Kind(indexed=("area",)),
    "alert_out": Kind(indexed=("peer", "push")),
    "mount": Kind(indexed=("name", "area"), unique=("name",)),  # ingest: only its password's hash
    "dead_air": Kind(),  # id = area: its own dead-air level and time
}

LOGS = ("audit", "asrun", "device_intervals")


class Store(abc.ABC):
    """Async interface. Every method may raise StoreError subclasses (StoreUnavailable when the
    backend cannot be reached or written); none blocks the loop."""

    read_only: str | None = None  # why it was opened read-only (a degraded start), or None

    # ---- records -----------------------------------------------------------------------------
    @abc.abstractmethod
    async def get(self, kind: str, id: str) -> Record | None: ...

    @abc.abstractmethod
    async def create(self, kind: str, record: Record) -> Record:
        """Insert; Conflict if the id or a unique field value exists. Returns the record."""

    @abc.abstractmethod
    async def put(self, kind: str, record: Record) -> Record:
        """Insert or replace by id (unique fields still enforced against other records)."""

    @abc.abstractmethod
    async def update(self, kind: str, id: str, changes: Record) -> Record:
        """Merge `changes` into the record (a value of None deletes the field); NotFound."""

    @abc.abstractmethod
    async def delete(self, kind: str, id: str) -> bool: ...

    @abc.abstractmethod
    async def find(self, kind: str, /, **eq: Any) -> list[Record]:
        """Records whose indexed fields equal the given values (all records if none given),
        ordered by id. Filtering on a field that is not indexed is a ValueError."""

    @abc.abstractmethod
    async def count(self, kind: str, /, **eq: Any) -> int: ...

    @abc.abstractmethod
    async def put_many(self, kind: str, records: list[Record]) -> None:
        """Bulk insert-or-replace in one transaction (imports, seeding)."""

    # ---- logs --------------------------------------------------------------------------------
    @abc.abstractmethod
    async def append(self, log: str, entry: Record) -> Record:
        """Append to an append-only log; sets `ts` (epoch seconds) if missing and `seq`.

        An entry with a string `id` is appended once: appending the same id again (a retry
        after a lost reply) returns the stored entry and adds nothing."""

    @abc.abstractmethod
    async def read_log(self, log: str, *, since: float | None = None, until: float | None = None,
                       limit: int = 1000, **eq: Any) -> list[Record]:
        """Entries with since <= ts < until whose top-level fields equal `eq`, oldest first."""

    # ---- counters (rate limits shared by every process on the store) -------------------------
    @abc.abstractmethod
    async def hit(self, key: str, window: float) -> int:
        """Count one event for `key`; returns the events in the current window of `window` s."""

    @abc.abstractmethod
    async def close(self) -> None: ...


def check_kind(kind: str) -> Kind:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown record kind {kind!r}") from None


def check_log(log: str) -> None:
    if log not in LOGS:
        raise ValueError(f"unknown log {log!r}")


def log_filters(log: str, limit: int, eq: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    """A `read_log` query checked: its field filters, or None when `limit` asks for nothing."""
    check_log(log)
    if limit <= 0:
        return None
    return [(f, canon(v)) for f, v in eq.items()]


def check_window(window: float) -> None:
    if window <= 0:
        raise ValueError(f"hit window must be > 0 s, got {window}")


# ---- JSON helpers shared by both backends (canonical values, index entries, logs) ------------------------------------------------------
def dumps(value: Any) -> str:
    """Stored form: compact, key order kept, real JSON (NaN/inf refused rather than stored)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def load(data: str) -> Record:
    """A stored record or log entry back as a dict."""
    out: Record = json.loads(data)
    return out


def canon(value: Any) -> str:
    """Comparison form of a field value: equal JSON values give equal strings (1 != "1" != 1.5)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True,
                      allow_nan=False)


def check_record(record: Record) -> tuple[str, str]:
    """(id, stored JSON); a record is a JSON object with a non-empty string id."""
    if not isinstance(record, dict):
        raise ValueError(f"a record is a dict, not {type(record).__name__}")
    rid = record.get("id")
    if not isinstance(rid, str) or not rid:
        raise ValueError(f"a record needs a non-empty string id, got {rid!r}")
    return rid, dumps(record)


def index_entries(spec: Kind, record: Record) -> list[tuple[str, str, bool]]:
    """(field, canonical value, enforce uniqueness) for every indexed field of the record.

    A missing field is indexed as null so `find(field=None)` finds it; null is never unique (like
    SQL NULL), so many users may lack a username-like field without clashing.
    """
    out = []
    for field in spec.indexed:
        value = record.get(field)
        out.append((field, canon(value), field in spec.unique and value is not None))
    return out


def check_filter(kind: str, spec: Kind, eq: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(field, canonical value) pairs; only indexed fields may be filtered on."""
    bad = [f for f in eq if f not in spec.indexed]
    if bad:
        raise ValueError(f"{kind}: cannot filter on {', '.join(bad)} (indexed: {spec.indexed})")
    return [(f, canon(v)) for f, v in eq.items()]


def merge(id: str, record: Record, changes: Record) -> Record:
    """Shallow merge; None deletes a field; the id is the record's name and never changes."""
    if "id" in changes and changes["id"] != id:
        raise ValueError(f"update cannot change the id ({id!r} -> {changes['id']!r})")
    out = dict(record)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    out["id"] = id
    return out


def log_entry(entry: Record) -> tuple[float, Record]:
    """(ts, entry with ts set, seq dropped): the backend assigns seq."""
    if not isinstance(entry, dict):
        raise ValueError(f"a log entry is a dict, not {type(entry).__name__}")
    out = {k: v for k, v in entry.items() if k != "seq"}
    ts = out.get("ts")
    if ts is None:
        ts = out["ts"] = time.time()
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise ValueError(f"log entry ts must be epoch seconds, got {ts!r}")
    return float(ts), out


def entry_matches(entry: Record, eq: list[tuple[str, str]]) -> bool:
    return all(canon(entry.get(f)) == v for f, v in eq)


def kind_signature(spec: Kind) -> str:
    """What the stored index entries of a kind were built from; a change means reindex."""
    return canon({"indexed": list(spec.indexed), "unique": list(spec.unique)})
