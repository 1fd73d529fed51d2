"""Redis backend of the store: shared by several Loa nodes.

Keys, all under the prefix (default `loa:`):

- `rec:{kind}` hash id -> record JSON
- `idx:{kind}:{field}:{canonical JSON value}` set of ids (every indexed field, null when missing)
- `uniq:{kind}:{field}` hash canonical JSON value -> id (unique fields, non-null values)
- `log:{log}` sorted set, score ts, member `{seq:020d}:{entry JSON}`; `seq:{log}` its INCR counter;
  `logid:{log}` hash entry id -> seq (entries with an id are appended once)
- `hit:{key}` fixed-window counter (SET NX PX + INCR in one MULTI)
- `meta` hash: `schema` version and `index:{kind}` declarations the index keys were built with

Every record write is one Lua script (`APPLY`) that checks, then applies: the record still has
the value the client read (compare-and-set, retried on a race), no unique value is owned by
another record, and only then moves the index entries. Index key names are computed in Python
(one canonical-JSON implementation for both backends), so the script never parses JSON. A script
runs atomically, so two nodes creating the same username cannot both succeed, and `put_many` is
all-or-nothing. The scripts name keys in ARGV, so this targets one Redis (or a replica set), not
Redis Cluster.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar, cast
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from loa.streamer.state.store import (
    KINDS,
    UNREACHABLE,
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

SCHEMA_VERSION = 1
RETRIES = 100  # compare-and-set attempts before giving up on a record written that often
LOG_PAGE = 500
# A black-holed Redis must not hold every request (5 s and 3 retries by default): override with
# `?socket_timeout=...&socket_connect_timeout=...` in the store URL.
TIMEOUT_S = 1.0

# ARGV: rec_key, n_ops, then per op: id, expected old JSON ('' = absent), new JSON ('' = delete),
# n_old_sets, n_old_uniq, n_new_sets, n_new_uniq, old set keys, old (uniq key, value) pairs,
# new set keys, new (uniq key, value) pairs.
# Returns {'ok'} | {'changed', id} | {'conflict', uniq key, value, owner}.
APPLY = """
local rec = ARGV[1]
local ops = {}
local p = 3
for i = 1, tonumber(ARGV[2]) do
  local op = {id = ARGV[p], expected = ARGV[p + 1], new = ARGV[p + 2],
              os = {}, ou = {}, ns = {}, nu = {}}
  local nos, nou = tonumber(ARGV[p + 3]), tonumber(ARGV[p + 4])
  local nns, nnu = tonumber(ARGV[p + 5]), tonumber(ARGV[p + 6])
  p = p + 7
  for j = 1, nos do op.os[j] = ARGV[p]; p = p + 1 end
  for j = 1, nou do op.ou[j] = {ARGV[p], ARGV[p + 1]}; p = p + 2 end
  for j = 1, nns do op.ns[j] = ARGV[p]; p = p + 1 end
  for j = 1, nnu do op.nu[j] = {ARGV[p], ARGV[p + 1]}; p = p + 2 end
  ops[i] = op
end
for _, op in ipairs(ops) do
  if (redis.call('HGET', rec, op.id) or '') ~= op.expected then
    return {'changed', op.id}
  end
end
local released, claimed = {}, {}
for _, op in ipairs(ops) do
  for _, u in ipairs(op.ou) do released[u[1] .. '\\0' .. u[2]] = op.id end
end
for _, op in ipairs(ops) do
  for _, u in ipairs(op.nu) do
    local k = u[1] .. '\\0' .. u[2]
    if claimed[k] and claimed[k] ~= op.id then return {'conflict', u[1], u[2], claimed[k]} end
    claimed[k] = op.id
    local owner = redis.call('HGET', u[1], u[2])
    if owner and owner ~= op.id and released[k] ~= owner then
      return {'conflict', u[1], u[2], owner}
    end
  end
end
for _, op in ipairs(ops) do
  for _, s in ipairs(op.os) do redis.call('SREM', s, op.id) end
  for _, u in ipairs(op.ou) do
    if redis.call('HGET', u[1], u[2]) == op.id then redis.call('HDEL', u[1], u[2]) end
  end
end
for _, op in ipairs(ops) do
  if op.new == '' then
    redis.call('HDEL', rec, op.id)
  else
    redis.call('HSET', rec, op.id, op.new)
  end
  for _, s in ipairs(op.ns) do redis.call('SADD', s, op.id) end
  for _, u in ipairs(op.nu) do redis.call('HSET', u[1], u[2], op.id) end
end
return {'ok'}
"""

# ARGV: seq key, log key, ts, entry JSON, ids key, entry id ('' if none). Returns seq.
APPEND = """
if ARGV[6] ~= '' then
  local old = redis.call('HGET', ARGV[5], ARGV[6])
  if old then return tonumber(old) end
end
local seq = redis.call('INCR', ARGV[1])
redis.call('ZADD', ARGV[2], ARGV[3], string.format('%020d', seq) .. ':' .. ARGV[4])
if ARGV[6] ~= '' then redis.call('HSET', ARGV[5], ARGV[6], seq) end
return seq
"""

P = ParamSpec("P")
T = TypeVar("T")


def _mapped(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Redis down, slow or gone: StoreUnavailable, which callers answer 503 to or retry."""
    @functools.wraps(fn)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except _DOWN as e:
            raise _unavailable(e) from e
    return run


_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, TimeoutError)


def _unavailable(e: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"{UNREACHABLE} ({type(e).__name__}: {e})")


def _client_options(url: str) -> dict[str, Any]:
    """Short timeouts and one reconnect attempt, unless the URL sets them."""
    given = parse_qs(urlsplit(url).query)
    # One reconnect for a connection dropped while idle; a timeout is not retried (it would
    # only double the wait on a black-holed network).
    opts: dict[str, Any] = {"retry": Retry(NoBackoff(), 1, supported_errors=(
        redis.exceptions.ConnectionError,))}
    for key in ("socket_timeout", "socket_connect_timeout"):
        if key not in given:
            opts[key] = TIMEOUT_S
    return opts

Op = tuple[str, str | None, Record | None, str | None, Record | None]  # id, old, old rec, new, rec


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


class RedisStore(Store):
    """The store in Redis under a key prefix. Use `await RedisStore.connect(url, prefix)`."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.prefix = prefix
        self._client: aioredis.Redis | None = client
        self._apply = client.register_script(APPLY)
        self._append = client.register_script(APPEND)

    @classmethod
    async def connect(cls, url: str, prefix: str = "loa:") -> RedisStore:
        """Connect, refuse a newer schema, rebuild index keys whose declaration changed."""
        client = aioredis.from_url(url, decode_responses=True, **_client_options(url))
        try:
            await client.ping()
            store = cls(client, prefix)
            await store._check_schema()
        except _DOWN as e:
            await client.aclose()
            raise _unavailable(e) from e
        except BaseException:
            await client.aclose()
            raise
        return store

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r})"

    @property
    def _r(self) -> aioredis.Redis:
        if self._client is None:
            raise StoreError("store is closed")
        return self._client

    # ---- keys ----------------------------------------------------------------------------------
    def _rec(self, kind: str) -> str:
        return f"{self.prefix}rec:{kind}"

    def _idx(self, kind: str, field: str, value: str) -> str:
        return f"{self.prefix}idx:{kind}:{field}:{value}"

    def _uniq(self, kind: str, field: str) -> str:
        return f"{self.prefix}uniq:{kind}:{field}"

    # ---- schema --------------------------------------------------------------------------------
    async def _check_schema(self) -> None:
        meta_key = f"{self.prefix}meta"
        meta = cast(dict[str, str], await self._r.hgetall(meta_key))
        version = int(meta.get("schema", 0))
        if version > SCHEMA_VERSION:
            raise StoreError(f"Redis prefix {self.prefix!r} has store schema version {version}, "
                             f"newer than this Loa understands ({SCHEMA_VERSION}); upgrade Loa")
        stale = {kind: kind_signature(spec) for kind, spec in KINDS.items()
                 if meta.get(f"index:{kind}") != kind_signature(spec)}
        if stale:
            async with self._r.pipeline(transaction=False) as pipe:
                for kind in stale:
                    pipe.hlen(self._rec(kind))
                sizes = await pipe.execute()
            for kind, size in zip(stale, sizes, strict=True):
                if size:  # no records means no index keys (deletes remove them): nothing to do
                    await self._reindex(kind, KINDS[kind])
        if stale or version < SCHEMA_VERSION:
            await self._r.hset(meta_key, mapping={
                "schema": str(SCHEMA_VERSION), **{f"index:{k}": v for k, v in stale.items()}})

    async def _reindex(self, kind: str, spec: Kind) -> None:
        """Rebuild a kind's index keys after its declaration in KINDS changed (deploy time)."""
        raw = cast(dict[str, str], await self._r.hgetall(self._rec(kind)))
        sets: dict[str, list[str]] = {}
        uniq: dict[str, dict[str, str]] = {}
        for rid, data in raw.items():
            for field, value, unique in index_entries(spec, load(data)):
                sets.setdefault(self._idx(kind, field, value), []).append(rid)
                if unique:
                    owners = uniq.setdefault(self._uniq(kind, field), {})
                    if value in owners:
                        raise Conflict(f"cannot index {kind} as {spec}: {field}={value} repeats "
                                       f"({owners[value]!r}, {rid!r})")
                    owners[value] = rid
        stale = [k async for k in self._r.scan_iter(
            match=_glob_escape(f"{self.prefix}idx:{kind}:") + "*", count=1000)]
        stale += [k async for k in self._r.scan_iter(
            match=_glob_escape(f"{self.prefix}uniq:{kind}:") + "*", count=1000)]
        async with self._r.pipeline(transaction=True) as pipe:
            if stale:
                pipe.delete(*stale)
            for key, ids in sets.items():
                pipe.sadd(key, *ids)
            for key, owners in uniq.items():
                pipe.hset(key, mapping=cast(Mapping[Any, Any], owners))
            await pipe.execute()

    # ---- record writes -------------------------------------------------------------------------
    def _op_args(self, kind: str, spec: Kind, op: Op) -> list[str]:
        rid, old, old_rec, new, new_rec = op
        old_e = index_entries(spec, old_rec) if old_rec is not None else []
        new_e = index_entries(spec, new_rec) if new_rec is not None else []
        args = [rid, old or "", new or "",
                str(len(old_e)), str(sum(u for _, _, u in old_e)),
                str(len(new_e)), str(sum(u for _, _, u in new_e))]
        for entries in (old_e, new_e):
            args += [self._idx(kind, f, v) for f, v, _ in entries]
            for f, v, u in entries:
                if u:
                    args += [self._uniq(kind, f), v]
        return args

    async def _write(self, kind: str, spec: Kind, ops: Sequence[Op]) -> str | None:
        """Apply ops atomically: None if done, the id of a record that changed under us (the
        caller re-reads and retries), or Conflict on a unique clash."""
        args = [self._rec(kind), str(len(ops))]
        for op in ops:
            args += self._op_args(kind, spec, op)
        res = await self._apply(keys=[], args=args)
        if res[0] == "ok":
            return None
        if res[0] == "changed":
            return str(res[1])
        field = str(res[1]).rsplit(":", 1)[-1]
        raise Conflict(f"{kind} {field}={res[2]} already belongs to {res[3]!r}")

    async def _read(self, kind: str, id: str) -> tuple[str | None, Record | None]:
        data = cast(str | None, await self._r.hget(self._rec(kind), id))
        return data, None if data is None else load(data)

    # ---- records -------------------------------------------------------------------------------
    @_mapped
    async def get(self, kind: str, id: str) -> Record | None:
        check_kind(kind)
        return (await self._read(kind, id))[1]

    @_mapped
    async def create(self, kind: str, record: Record) -> Record:
        spec = check_kind(kind)
        rid, data = check_record(record)
        new = load(data)
        # Expecting "absent" makes the existence check part of the atomic script: one round trip.
        if await self._write(kind, spec, [(rid, None, None, data, new)]) is not None:
            raise Conflict(f"{kind} {rid!r} already exists")
        return new

    @_mapped
    async def put(self, kind: str, record: Record) -> Record:
        spec = check_kind(kind)
        rid, data = check_record(record)
        new = load(data)
        for _ in range(RETRIES):
            old, old_rec = await self._read(kind, rid)
            if await self._write(kind, spec, [(rid, old, old_rec, data, new)]) is None:
                return new
        raise Conflict(f"{kind} {rid!r} kept changing during put; gave up")

    @_mapped
    async def update(self, kind: str, id: str, changes: Record) -> Record:
        spec = check_kind(kind)
        for _ in range(RETRIES):
            old, old_rec = await self._read(kind, id)
            if old is None or old_rec is None:
                raise NotFound(f"{kind} {id!r}")
            new = merge(id, old_rec, changes)
            if await self._write(kind, spec, [(id, old, old_rec, dumps(new), new)]) is None:
                return new
        raise Conflict(f"{kind} {id!r} kept changing during update; gave up")

    @_mapped
    async def delete(self, kind: str, id: str) -> bool:
        spec = check_kind(kind)
        for _ in range(RETRIES):
            old, old_rec = await self._read(kind, id)
            if old is None:
                return False
            if await self._write(kind, spec, [(id, old, old_rec, None, None)]) is None:
                return True
        raise Conflict(f"{kind} {id!r} kept changing during delete; gave up")

    @_mapped
    async def put_many(self, kind: str, records: list[Record]) -> None:
        spec = check_kind(kind)
        new: dict[str, tuple[str, Record]] = {}
        for record in records:  # a repeated id: the last one wins, as with put() in a loop
            rid, data = check_record(record)
            new[rid] = (data, load(data))
        if not new:
            return
        ids = list(new)
        for _ in range(RETRIES):
            olds = cast(list[str | None], await self._r.hmget(self._rec(kind), ids))
            ops = [(rid, old, None if old is None else load(old), *new[rid])
                   for rid, old in zip(ids, olds, strict=True)]
            if await self._write(kind, spec, ops) is None:
                return
        raise Conflict(f"{kind}: records kept changing during put_many; gave up")

    # ---- record reads --------------------------------------------------------------------------
    # `kind` is positional-only: device records have an indexed field named "kind", and
    # find("device", kind="speaker") cannot bind under Store's signature (see store.py).
    @_mapped
    async def find(self, kind: str, /, **eq: Any) -> list[Record]:
        filters = check_filter(kind, check_kind(kind), eq)
        if not filters:
            raw = cast(dict[str, str], await self._r.hgetall(self._rec(kind)))
            return [load(raw[rid]) for rid in sorted(raw)]
        ids = sorted(await self._r.sinter([self._idx(kind, f, v) for f, v in filters]))
        if not ids:
            return []
        datas = cast(list[str | None], await self._r.hmget(self._rec(kind), ids))
        out = []
        for data in datas:
            if data is None:  # deleted between the two calls
                continue
            record = load(data)
            if entry_matches(record, filters):  # or changed between them
                out.append(record)
        return out

    @_mapped
    async def count(self, kind: str, /, **eq: Any) -> int:
        filters = check_filter(kind, check_kind(kind), eq)
        if not filters:
            return int(await self._r.hlen(self._rec(kind)))
        keys = [self._idx(kind, f, v) for f, v in filters]
        if len(keys) == 1:
            return int(await self._r.scard(keys[0]))
        return len(await self._r.sinter(keys))

    # ---- logs ----------------------------------------------------------------------------------
    @_mapped
    async def append(self, log: str, entry: Record) -> Record:
        check_log(log)
        ts, out = log_entry(entry)
        eid = out["id"] if isinstance(out.get("id"), str) else ""
        seq = await self._append(
            keys=[], args=[f"{self.prefix}seq:{log}", f"{self.prefix}log:{log}", repr(ts),
                           dumps(out), f"{self.prefix}logid:{log}", eid])
        out["seq"] = int(seq)
        return out

    @_mapped
    async def read_log(self, log: str, *, since: float | None = None, until: float | None = None,
                       limit: int = 1000, **eq: Any) -> list[Record]:
        filters = log_filters(log, limit, eq)
        if filters is None:
            return []
        lo = "-inf" if since is None else repr(float(since))
        hi = "+inf" if until is None else "(" + repr(float(until))
        page = limit if not filters else max(limit, LOG_PAGE)
        out: list[Record] = []
        offset = 0
        while len(out) < limit:
            members = cast(list[str], await self._r.zrangebyscore(
                f"{self.prefix}log:{log}", lo, hi, start=offset, num=page))
            for member in members:
                seq, _, data = member.partition(":")
                entry = load(data)
                entry["seq"] = int(seq)
                if entry_matches(entry, filters):
                    out.append(entry)
                    if len(out) >= limit:
                        break
            if len(members) < page:
                break
            offset += page
        return out

    # ---- counters ------------------------------------------------------------------------------
    @_mapped
    async def hit(self, key: str, window: float) -> int:
        check_window(window)
        k = f"{self.prefix}hit:{key}"
        # SET NX PX and INCR in one MULTI: a crash cannot leave a counter without its expiry.
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.set(k, 0, nx=True, px=max(1, round(window * 1000)))
            pipe.incr(k)
            res = await pipe.execute()
        return int(res[1])

    async def close(self) -> None:
        if self._client is None:
            return
        client, self._client = self._client, None
        await client.aclose()
