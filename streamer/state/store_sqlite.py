"""SQLite backend of the store: the embedded default, one file under the data directory.

One worker thread owns the connection, so no call blocks the event loop and calls are serialised
without locks. WAL, `synchronous=NORMAL` and a 5 s `busy_timeout` let a second process (the
`loa user add` CLI) write while `loa serve` runs on the same file; every multi-statement write
takes the write lock up front (`BEGIN IMMEDIATE`) so two processes queue for it instead of one
failing with "database is locked" halfway through a transaction.

The JSON helpers at the top are shared with `store_redis` so both backends agree on what "equal"
means in `find`/`read_log` (canonical JSON; a missing field equals None).
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from loa.streamer import errors
from loa.streamer.errors import LoaError
from loa.streamer.state.store import (
    KINDS,
    READ_ONLY,
    Conflict,
    Kind,
    NotFound,
    Record,
    Store,
    StoreError,
    StoreUnavailable,
    check_filter,
    check_kind,
    check_log,
    check_record,
    check_window,
    dumps,
    entry_matches,
    index_entries,
    kind_signature,
    load,
    log_entry,
    log_filters,
    merge,
)

T = TypeVar("T")

BUSY_TIMEOUT_S = 5.0
PURGE_EVERY = 1000  # hits between purges of expired counters


# ---- schema --------------------------------------------------------------------------------------
Migration = Callable[[sqlite3.Connection], None]


def _sql(*statements: str) -> Migration:
    def run(db: sqlite3.Connection) -> None:
        for s in statements:  # not executescript(): it would COMMIT the migration transaction
            db.execute(s)

    return run


# Append only: each entry upgrades version i to i+1. Never edit a released one.
MIGRATIONS: tuple[Migration, ...] = (
    _sql(
        """CREATE TABLE records (
            kind TEXT NOT NULL, id TEXT NOT NULL, data TEXT NOT NULL,
            PRIMARY KEY (kind, id)) WITHOUT ROWID""",
        # One row per (record, indexed field); uniq = 1 where the value may not repeat.
        """CREATE TABLE idx (
            kind TEXT NOT NULL, field TEXT NOT NULL, value TEXT NOT NULL, id TEXT NOT NULL,
            uniq INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (kind, field, value, id)) WITHOUT ROWID""",
        "CREATE UNIQUE INDEX idx_unique ON idx (kind, field, value) WHERE uniq = 1",
        "CREATE INDEX idx_record ON idx (kind, id)",
        """CREATE TABLE logs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, log TEXT NOT NULL, ts REAL NOT NULL,
            data TEXT NOT NULL)""",
        "CREATE INDEX logs_time ON logs (log, ts)",
        """CREATE TABLE counters (
            key TEXT PRIMARY KEY, window_start REAL NOT NULL, n INTEGER NOT NULL,
            expires REAL NOT NULL)""",
        "CREATE INDEX counters_expires ON counters (expires)",
        # index:<kind> -> kind_signature() the idx rows were built with
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    # Log entries with an id are appended once (a writer retrying after a lost reply).
    _sql("ALTER TABLE logs ADD COLUMN eid TEXT",
         "CREATE UNIQUE INDEX logs_eid ON logs (log, eid) WHERE eid IS NOT NULL"),
)
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(StoreError, LoaError):
    """The file was migrated by a newer Loa; an older one must not write to it (the operator
    reads it at start-up: a conflict of versions)."""

    kind: errors.Kind = "conflict"


def _schema_version(db: sqlite3.Connection) -> int:
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
                  ).fetchone() is None:
        return 0
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def _stale_kinds(db: sqlite3.Connection) -> dict[str, str]:
    """Kinds whose index rows were built with a different declaration than KINDS now has."""
    stored = dict(db.execute("SELECT key, value FROM meta WHERE key LIKE 'index:%'").fetchall())
    out = {}
    for name, spec in KINDS.items():
        sig = kind_signature(spec)
        if stored.get(f"index:{name}") != sig:
            out[name] = sig
    return out


def _reindex(db: sqlite3.Connection, kind: str, spec: Kind) -> None:
    db.execute("DELETE FROM idx WHERE kind = ?", (kind,))
    rows = db.execute("SELECT id, data FROM records WHERE kind = ?", (kind,)).fetchall()
    try:
        db.executemany(
            "INSERT INTO idx (kind, field, value, id, uniq) VALUES (?, ?, ?, ?, ?)",
            ((kind, f, v, rid, int(u)) for rid, data in rows
             for f, v, u in index_entries(spec, load(data))))
    except sqlite3.IntegrityError as e:
        raise Conflict(f"cannot index {kind} as {spec}: existing records repeat a unique value"
                       ) from e


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the file to SCHEMA_VERSION and the index rows to KINDS, in one transaction.

    Checked read-only first, so opening an up-to-date file writes nothing and takes no lock.
    """
    version = _schema_version(db)
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(f"{path} has store schema version {version}, newer than this Loa "
                           f"understands ({SCHEMA_VERSION}); upgrade Loa to open it")
    if version == SCHEMA_VERSION and not _stale_kinds(db):
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                   "version INTEGER PRIMARY KEY, applied REAL NOT NULL)")
        version = _schema_version(db)  # again, under the write lock: another process may have won
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(f"{path} has store schema version {version}, newer than this Loa "
                               f"understands ({SCHEMA_VERSION}); upgrade Loa to open it")
        for v in range(version, SCHEMA_VERSION):
            MIGRATIONS[v](db)
            db.execute("INSERT INTO schema_version (version, applied) VALUES (?, ?)",
                       (v + 1, time.time()))
        for kind, sig in _stale_kinds(db).items():
            _reindex(db, kind, KINDS[kind])
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                       (f"index:{kind}", sig))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; writes say BEGIN IMMEDIATE themselves.
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: cannot use WAL journal mode (got {mode})")
        db.execute("PRAGMA synchronous = NORMAL")
        _migrate(db, path)
    except BaseException:
        db.close()
        raise
    return db


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """The file as it is, for a node that must air what is stored on a read-only or full disk.

    `mode=ro` reads a WAL left by a crash when its -shm exists; where it cannot be opened that
    way (no -shm and none can be created), `immutable` reads the file alone. Every write then
    fails as read-only."""
    err: sqlite3.Error | None = None
    for mode in ("mode=ro", "immutable=1"):
        db = sqlite3.connect(f"{path.resolve().as_uri()}?{mode}", uri=True,
                             isolation_level=None, check_same_thread=False)
        try:
            version = _schema_version(db)
        except sqlite3.Error as e:
            db.close()
            err = e
            continue
        if version != SCHEMA_VERSION:
            db.close()
            raise StoreError(f"{path}: store schema version {version}, this Loa needs "
                             f"{SCHEMA_VERSION} and cannot migrate a read-only file")
        return db
    assert err is not None
    raise err


# What SQLite says when the disk, not the request, is the problem.
_UNAVAILABLE = ("disk is full", "readonly", "read-only", "disk i/o error", "unable to open",
                "database is locked")


def _unavailable(e: BaseException) -> StoreUnavailable | None:
    if isinstance(e, OSError) or (isinstance(e, sqlite3.OperationalError) and any(
            m in str(e).lower() for m in _UNAVAILABLE)):
        return StoreUnavailable(f"{READ_ONLY} ({e})")
    return None


def _tx(db: sqlite3.Connection, fn: Callable[[], T]) -> T:
    """Run fn in a write transaction; any exception rolls everything back."""
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return result


def _unique_error(kind: str, e: sqlite3.IntegrityError) -> Conflict:
    return Conflict(f"{kind}: a unique field value already exists ({e})")


class SqliteStore(Store):
    """The store in one SQLite file. Use `await SqliteStore.open(path)`."""

    def __init__(self, path: Path, db: sqlite3.Connection, executor: ThreadPoolExecutor,
                 read_only: str | None = None) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = db
        self._ex = executor
        self._hits = 0
        self.read_only = read_only

    @classmethod
    async def open(cls, path: Path, *, degraded: bool = False) -> SqliteStore:
        """Open (creating the file and its parent directories) and migrate.

        `degraded`: when the disk refuses writes (full, read-only) and the file exists, open it
        read-only instead of failing, so the node can still air what is stored."""
        path = Path(path)
        loop = asyncio.get_running_loop()
        # One thread owns the connection: calls are serialised and never run on the loop.
        ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loa-sqlite")
        try:
            try:
                await loop.run_in_executor(
                    ex, functools.partial(path.parent.mkdir, parents=True, exist_ok=True))
                db = await loop.run_in_executor(ex, _connect, path)
                return cls(path, db, ex)
            except (OSError, sqlite3.Error) as e:
                unavailable = _unavailable(e)
                if unavailable is None:
                    raise
                if not degraded or not path.exists():
                    raise unavailable from e
                db = await loop.run_in_executor(ex, _connect_read_only, path)
                return cls(path, db, ex, read_only=str(unavailable))
        except BaseException:
            ex.shutdown(wait=False)
            raise

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._db is None:
            raise StoreError("store is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._ex, functools.partial(fn, self._db, *args))
        except (OSError, sqlite3.OperationalError) as e:
            unavailable = _unavailable(e)
            if unavailable is None:
                raise
            raise unavailable from e

    # ---- records -------------------------------------------------------------------------------
    async def get(self, kind: str, id: str) -> Record | None:
        check_kind(kind)
        return await self._run(_get, kind, id)

    async def create(self, kind: str, record: Record) -> Record:
        spec = check_kind(kind)
        rid, data = check_record(record)
        await self._run(_write_one, kind, spec, rid, data, index_entries(spec, record), "create")
        return load(data)

    async def put(self, kind: str, record: Record) -> Record:
        spec = check_kind(kind)
        rid, data = check_record(record)
        await self._run(_write_one, kind, spec, rid, data, index_entries(spec, record), "put")
        return load(data)

    async def update(self, kind: str, id: str, changes: Record) -> Record:
        spec = check_kind(kind)
        return await self._run(_update, kind, spec, id, dict(changes))

    async def delete(self, kind: str, id: str) -> bool:
        check_kind(kind)
        return await self._run(_delete, kind, id)

    # `kind` is positional-only: device records have an indexed field named "kind", and
    # find("device", kind="speaker") cannot bind under Store's signature (see store.py).
    async def find(self, kind: str, /, **eq: Any) -> list[Record]:
        filters = check_filter(kind, check_kind(kind), eq)
        return await self._run(_find, kind, filters)

    async def count(self, kind: str, /, **eq: Any) -> int:
        filters = check_filter(kind, check_kind(kind), eq)
        return await self._run(_count, kind, filters)

    async def put_many(self, kind: str, records: list[Record]) -> None:
        spec = check_kind(kind)
        # Encoding 10,000 records is work too: done in the worker thread, not on the loop.
        await self._run(_put_many, kind, spec, list(records))

    # ---- logs ----------------------------------------------------------------------------------
    async def append(self, log: str, entry: Record) -> Record:
        check_log(log)
        ts, out = log_entry(entry)
        eid = out.get("id") if isinstance(out.get("id"), str) else None
        return await self._run(_append, log, ts, out, eid)

    async def read_log(self, log: str, *, since: float | None = None, until: float | None = None,
                       limit: int = 1000, **eq: Any) -> list[Record]:
        filters = log_filters(log, limit, eq)
        if filters is None:
            return []
        return await self._run(_read_log, log, since, until, limit, filters)

    # ---- counters ------------------------------------------------------------------------------
    async def hit(self, key: str, window: float) -> int:
        check_window(window)
        self._hits += 1
        return await self._run(_hit, key, window, self._hits % PURGE_EVERY == 0)

    async def close(self) -> None:
        if self._db is None:
            return
        db, self._db = self._db, None
        await asyncio.get_running_loop().run_in_executor(self._ex, db.close)
        self._ex.shutdown(wait=False)


# ---- the worker-thread side: plain functions of the connection -----------------------------------
def _get(db: sqlite3.Connection, kind: str, id: str) -> Record | None:
    row = db.execute("SELECT data FROM records WHERE kind = ? AND id = ?", (kind, id)).fetchone()
    return None if row is None else load(row[0])


def _check_unique(db: sqlite3.Connection, kind: str, rid: str,
                  entries: list[tuple[str, str, bool]]) -> None:
    """Name the clash; the partial unique index is the backstop that makes it race-free."""
    for field, value, unique in entries:
        if not unique:
            continue
        row = db.execute("SELECT id FROM idx WHERE kind = ? AND field = ? AND value = ? "
                         "AND uniq = 1 AND id <> ?", (kind, field, value, rid)).fetchone()
        if row is not None:
            raise Conflict(f"{kind} {field}={value} already belongs to {row[0]!r}")


def _set_record(db: sqlite3.Connection, kind: str, rid: str, data: str,
                entries: list[tuple[str, str, bool]]) -> None:
    db.execute("INSERT OR REPLACE INTO records (kind, id, data) VALUES (?, ?, ?)",
               (kind, rid, data))
    db.execute("DELETE FROM idx WHERE kind = ? AND id = ?", (kind, rid))
    try:
        db.executemany("INSERT INTO idx (kind, field, value, id, uniq) VALUES (?, ?, ?, ?, ?)",
                       [(kind, f, v, rid, int(u)) for f, v, u in entries])
    except sqlite3.IntegrityError as e:
        raise _unique_error(kind, e) from e


def _write_one(db: sqlite3.Connection, kind: str, spec: Kind, rid: str, data: str,
               entries: list[tuple[str, str, bool]], mode: str) -> None:
    def run() -> None:
        if mode == "create" and db.execute(
                "SELECT 1 FROM records WHERE kind = ? AND id = ?", (kind, rid)).fetchone():
            raise Conflict(f"{kind} {rid!r} already exists")
        _check_unique(db, kind, rid, entries)
        _set_record(db, kind, rid, data, entries)

    _tx(db, run)


def _update(db: sqlite3.Connection, kind: str, spec: Kind, id: str, changes: Record) -> Record:
    def run() -> Record:
        old = _get(db, kind, id)
        if old is None:
            raise NotFound(f"{kind} {id!r}")
        new = merge(id, old, changes)
        entries = index_entries(spec, new)
        _check_unique(db, kind, id, entries)
        _set_record(db, kind, id, dumps(new), entries)
        return new

    return _tx(db, run)


def _delete(db: sqlite3.Connection, kind: str, id: str) -> bool:
    def run() -> bool:
        n = db.execute("DELETE FROM records WHERE kind = ? AND id = ?", (kind, id)).rowcount
        db.execute("DELETE FROM idx WHERE kind = ? AND id = ?", (kind, id))
        return n > 0

    return _tx(db, run)


def _select(what: str, kind: str, filters: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """A query driven from the index when there are filters: the first filter's index rows pick
    the records (CROSS JOIN keeps SQLite from scanning every record of the kind first), each
    further filter is a join on the idx primary key (kind, field, value, id)."""
    if not filters:
        return f"SELECT {what} FROM records r WHERE r.kind = ?", [kind]
    more = "".join(f" JOIN idx i{n} ON i{n}.kind = r.kind AND i{n}.id = r.id"
                   f" AND i{n}.field = ? AND i{n}.value = ?" for n in range(1, len(filters)))
    sql = (f"SELECT {what} FROM idx i0 CROSS JOIN records r ON r.kind = i0.kind AND r.id = i0.id"
           f"{more} WHERE i0.kind = ? AND i0.field = ? AND i0.value = ?")
    params = [x for pair in filters[1:] for x in pair] + [kind, *filters[0]]
    return sql, params


def _find(db: sqlite3.Connection, kind: str, filters: list[tuple[str, str]]) -> list[Record]:
    sql, params = _select("r.data", kind, filters)
    rows = db.execute(sql + " ORDER BY r.id", params).fetchall()
    return [load(data) for (data,) in rows]


def _count(db: sqlite3.Connection, kind: str, filters: list[tuple[str, str]]) -> int:
    sql, params = _select("COUNT(*)", kind, filters)
    row = db.execute(sql, params).fetchone()
    return int(row[0])


def _put_many(db: sqlite3.Connection, kind: str, spec: Kind, records: list[Record]) -> None:
    rows: dict[str, tuple[str, list[tuple[str, str, bool]]]] = {}
    for record in records:  # a repeated id: the last one wins, as with put() in a loop
        rid, data = check_record(record)
        rows[rid] = (data, index_entries(spec, record))

    def run() -> None:
        db.executemany("DELETE FROM idx WHERE kind = ? AND id = ?", ((kind, r) for r in rows))
        db.executemany("INSERT OR REPLACE INTO records (kind, id, data) VALUES (?, ?, ?)",
                       ((kind, r, d) for r, (d, _) in rows.items()))
        try:
            db.executemany(
                "INSERT INTO idx (kind, field, value, id, uniq) VALUES (?, ?, ?, ?, ?)",
                ((kind, f, v, r, int(u)) for r, (_, es) in rows.items() for f, v, u in es))
        except sqlite3.IntegrityError as e:
            raise _unique_error(kind, e) from e

    _tx(db, run)


def _append(db: sqlite3.Connection, log: str, ts: float, entry: Record, eid: str | None
            ) -> Record:
    if eid is not None:
        row = db.execute("SELECT seq, data FROM logs WHERE log = ? AND eid = ?",
                         (log, eid)).fetchone()
        if row is not None:
            return {**load(row[1]), "seq": row[0]}
    cur = db.execute("INSERT INTO logs (log, ts, data, eid) VALUES (?, ?, ?, ?)",
                     (log, ts, dumps(entry), eid))
    assert cur.lastrowid is not None
    return {**entry, "seq": cur.lastrowid}


def _read_log(db: sqlite3.Connection, log: str, since: float | None, until: float | None,
              limit: int, filters: list[tuple[str, str]]) -> list[Record]:
    sql = "SELECT seq, data FROM logs WHERE log = ?"
    params: list[Any] = [log]
    if since is not None:
        sql += " AND ts >= ?"
        params.append(since)
    if until is not None:
        sql += " AND ts < ?"
        params.append(until)
    sql += " ORDER BY ts, seq"
    if not filters:
        sql += " LIMIT ?"
        params.append(limit)
    out: list[Record] = []
    cur = db.execute(sql, params)
    try:
        for seq, data in _rows(cur):  # filtered here; stop reading once `limit` matched
            entry = load(data)
            entry["seq"] = seq
            if entry_matches(entry, filters):
                out.append(entry)
                if len(out) >= limit:
                    break
    finally:
        cur.close()
    return out


def _rows(cur: sqlite3.Cursor) -> Iterable[tuple[int, str]]:
    while batch := cur.fetchmany(500):
        yield from batch


def _hit(db: sqlite3.Connection, key: str, window: float, purge: bool) -> int:
    """Fixed window: the first hit after `expires` starts a new window at n = 1."""
    now = time.time()
    if purge:
        db.execute("DELETE FROM counters WHERE expires <= ?", (now,))
    rows = db.execute(
        """INSERT INTO counters (key, window_start, n, expires) VALUES (?1, ?2, 1, ?2 + ?3)
           ON CONFLICT (key) DO UPDATE SET
             n = CASE WHEN ?2 >= counters.expires THEN 1 ELSE counters.n + 1 END,
             window_start = CASE WHEN ?2 >= counters.expires THEN ?2
                                 ELSE counters.window_start END,
             expires = CASE WHEN ?2 >= counters.expires THEN ?2 + ?3 ELSE counters.expires END
           RETURNING n""", (key, now, window)).fetchall()  # fetch all: ends the statement
    return int(rows[0][0])
