"""`loa bench api`: REST API throughput and latency on a province-sized store.

For each store backend (SQLite in a temporary data directory; Redis at 127.0.0.1:6379 under a
unique key prefix, deleted afterwards) the bench seeds 5,000 areas (one province, 50 districts,
4,949 communes, GSO-like codes) and 10,000 loudspeaker devices into the store before the node
starts (so the node loads that tree), starts a real node (real-time media clock: broadcasts really
go on air) with its HTTP app on 127.0.0.1, and measures three operations with a concurrent aiohttp
client running in a separate process (so the client's CPU is not the server's):

- `auth`: POST /api/v1/auth/token with the right password (argon2 with the product's parameters:
  slow on purpose; the login guard counts failures only, so it never throttles this);
- `broadcast_start`: POST /api/v1/broadcasts, class normal, a 0.2 s media item uploaded
  beforehand (so broadcasts end quickly and do not pile up in the engine), one commune per
  request cycling through the communes, as a province operator with the direct right; the number
  of broadcasts the engine holds during the phase is sampled every 50 ms (`on_air` peak/mean),
  and `persisted` counts the broadcast records the phase wrote (warm-up included);
- `broadcast_start_c1`: the same, one request at a time (at most 200): what one operator sees
  when the server is not saturated; at `concurrency` C a closed-loop client measures queueing
  too (p50 is about C / rps);
- `area_tree`: GET /api/v1/areas as the province operator (all 5,000 areas).

Each phase: `concurrency` workers, each sending a fixed number of requests one after the other
(ceil(requests / concurrency)), after a short unmeasured warm-up. Reported per phase: requests/s
over the phase's wall time, latency p50 and p99 (ms, nearest rank), n, non-2xx answers, and the
server's largest event-loop lag during the phase. One JSON object goes to stdout; progress goes
to stderr.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import sys
import tempfile
import time
import uuid
import wave
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

AREAS = 5000
DISTRICTS = 50
DEVICES = 10_000
PROVINCE = "49"  # GSO-like: 2-digit province, 3-digit districts, 5-digit communes
REDIS_URL = "redis://127.0.0.1:6379/0"
MEDIA_SECONDS = 0.2  # each benchmark broadcast airs 10 ticks: few overlap, none piles up
USER = "bench-tinh"
ADMIN = "bench-admin"
PASSWORD = "bench-mat-khau-123"
PHASES = ("auth", "broadcast_start", "broadcast_start_c1", "area_tree")
SERIAL_REQUESTS = 200  # broadcast_start_c1: one request at a time, what one operator sees
GOAL_BROADCAST_START_P99_MS = 20
WARMUP_PER_WORKER = 2
HTTP_TIMEOUT = 120.0


def log(msg: str) -> None:
    print(f"bench-api: {msg}", file=sys.stderr, flush=True)


# ---- the seeded province ----------------------------------------------------------------------
def area_rows() -> list[dict[str, Any]]:
    """1 province, 50 districts, 4,949 communes spread evenly: 5,000 area records."""
    rows: list[dict[str, Any]] = [{"id": PROVINCE, "name": "Tỉnh Quảng Nam (mẫu)",
                                   "level": "province", "parent": None, "lat": None,
                                   "lon": None}]
    districts = [f"{500 + d:03d}" for d in range(DISTRICTS)]
    for d, code in enumerate(districts):
        rows.append({"id": code, "name": f"Huyện {d + 1:02d}", "level": "district",
                     "parent": PROVINCE, "lat": None, "lon": None})
    communes = AREAS - 1 - DISTRICTS
    for c in range(communes):
        rows.append({"id": f"{20000 + c:05d}", "name": f"Xã {c + 1:04d}", "level": "commune",
                     "parent": districts[c % DISTRICTS], "lat": 15.5 + c * 1e-4,
                     "lon": 108.0 + c * 1e-4})
    return rows


def device_rows(communes: list[str]) -> list[dict[str, Any]]:
    """Registered loudspeaker clusters, as the registry writes them (offline until they connect:
    no device session runs during the bench, so none goes stale and gets rewritten)."""
    from loa.relay.devices.records import new_device_record

    out = []
    for i in range(DEVICES):
        rec = new_device_record(f"Cụm loa {i:05d}", "loudspeaker", communes[i % len(communes)],
                                {"codecs": ["opus", "mp3"], "transports": ["http", "hls"]}, [],
                                volume=80)
        rec["id"] = f"loa-{i:05d}"
        out.append(rec)
    return out


def tone_wav(seconds: float = MEDIA_SECONDS, freq: float = 440.0, rate: int = 48000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


# ---- the client (a separate process) ------------------------------------------------------------
def client_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the client process: one measured phase. Returns latencies (s) and statuses."""
    return asyncio.run(_client_phase(spec))


async def _client_phase(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    url: str = spec["url"]
    method: str = spec["method"]
    headers: dict[str, str] = spec.get("headers", {})
    bodies: list[Any] | None = spec.get("bodies")
    workers: int = spec["concurrency"]
    per_worker: int = spec["per_worker"]
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=workers, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int, measured: bool) -> None:
            body = bodies[i % len(bodies)] if bodies else None
            t0 = time.perf_counter()
            async with session.request(method, url, json=body, headers=headers) as r:
                await r.read()
                status = r.status
            if measured:
                latencies.append(time.perf_counter() - t0)
                statuses[str(status)] = statuses.get(str(status), 0) + 1

        async def worker(w: int, count: int, offset: int, measured: bool) -> None:
            for k in range(count):
                await one(offset + w + k * workers, measured)

        warm = spec.get("warmup", WARMUP_PER_WORKER)
        await asyncio.gather(*(worker(w, warm, 0, False) for w in range(workers)))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w, per_worker, warm * workers, True)
                               for w in range(workers)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "statuses": statuses, "wall": wall}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    lat = sorted(result["latencies"])
    n = len(lat)

    def pct(p: float) -> float:
        return round(lat[max(0, math.ceil(p / 100 * n) - 1)] * 1000, 2) if n else float("nan")

    errors = sum(c for s, c in result["statuses"].items() if not s.startswith("2"))
    out: dict[str, Any] = {"rps": round(n / result["wall"], 1) if result["wall"] else None,
                           "p50_ms": pct(50), "p99_ms": pct(99), "n": n}
    if errors:
        out["errors"] = errors
        out["statuses"] = result["statuses"]
    return out


# ---- the server (this process) -------------------------------------------------------------------
class OnAirSampler:
    """How many broadcasts the engine holds, every 50 ms on absolute deadlines."""

    def __init__(self, engine: Any, interval: float = 0.05) -> None:
        self.engine = engine
        self.interval = interval
        self.peak = 0
        self.samples: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            n = len(self.engine.broadcasts)
            self.samples.append(n)
            self.peak = max(self.peak, n)
            deadline += self.interval
            await asyncio.sleep(max(0.0, deadline - loop.time()))

    def __enter__(self) -> OnAirSampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()

    def as_dict(self) -> dict[str, Any]:
        mean = sum(self.samples) / len(self.samples) if self.samples else 0.0
        return {"peak": self.peak, "mean": round(mean, 1)}


async def redis_available(url: str) -> str | None:
    """None when Redis answers PING, else why not."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        await client.ping()
        return None
    except Exception as e:  # noqa: BLE001 - any failure means the same: not measurable
        return f"{type(e).__name__}: {e}"
    finally:
        await client.aclose()


async def redis_cleanup(url: str, prefix: str) -> int:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    removed = 0
    try:
        batch: list[Any] = []
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                removed += await client.unlink(*batch)
                batch = []
        if batch:
            removed += await client.unlink(*batch)
    finally:
        await client.aclose()
    return removed


async def wait_idle(engine: Any, limit: float) -> int:
    """Wait (absolute deadline) until the engine holds no broadcast; returns how many remain."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while loop.time() < deadline:
        if not engine.broadcasts:
            break
        await asyncio.sleep(0.05)
    return len(engine.broadcasts)


async def seed_province(cfg: Any) -> float:
    """The 5,000 areas, 10,000 devices and the bench's users, put in the store before the node
    starts (load_tree() takes the areas from the store); the seconds it took."""
    from loa.streamer.areas import AreaTree
    from loa.streamer.state.open import open_store
    from loa.web.auth import add_user

    t0 = time.perf_counter()
    rows = area_rows()
    communes = [r["id"] for r in rows if r["level"] == "commune"]
    store = await open_store(cfg.store, cfg.data_dir, cfg.store_prefix)
    try:
        await store.put_many("area", rows)
        await store.put_many("device", device_rows(communes))
        tree = AreaTree.from_rows([(r["id"], r["name"], r["level"], r["parent"]) for r in rows])
        # an admin exists, so the node prints no bootstrap password on stdout (JSON only there)
        await add_user(store, tree, ADMIN, "admin", PROVINCE, PASSWORD, emergency=True)
        await add_user(store, tree, USER, "operator", PROVINCE, PASSWORD, direct=True)
        n_areas, n_devices = await store.count("area"), await store.count("device")
    finally:
        await store.close()
    assert n_areas == AREAS and n_devices == DEVICES, (n_areas, n_devices)
    return time.perf_counter() - t0


async def bench_backend(store_url: str, prefix: str, data_dir: Path, requests: int,
                        concurrency: int, pool: ProcessPoolExecutor,
                        only: tuple[str, ...] = PHASES) -> dict[str, Any]:
    from aiohttp import ClientSession, FormData

    from loa.streamer.messages import say
    from loa.web.config import load_config
    from loa.web.testing import start_node

    loop = asyncio.get_running_loop()
    cfg = load_config(None, env={}, data=str(data_dir))
    cfg.store = store_url
    cfg.store_prefix = prefix
    cfg.media.max_seconds = 60

    seed_s = await seed_province(cfg)
    communes = [r["id"] for r in area_rows() if r["level"] == "commune"]

    live = await start_node(cfg, access_log=None)
    node, base = live.node, live.url
    result: dict[str, Any] = {"seed_s": round(seed_s, 2), "areas_loaded": len(list(node.tree))}
    try:
        assert len(list(node.tree)) == AREAS
        async with ClientSession() as s:
            r = await s.post(f"{base}/api/v1/auth/token",
                             json={"username": USER, "password": PASSWORD})
            assert r.status == 201, await r.text()
            token = (await r.json())["token"]
            auth = {"Authorization": f"Bearer {token}"}
            form = FormData()
            form.add_field("title", say("bench.media_title"))
            form.add_field("file", tone_wav(), filename="bench.wav")
            r = await s.post(f"{base}/api/v1/media", data=form, headers=auth)
            assert r.status == 201, await r.text()
            media = (await r.json())["id"]
        per_worker = max(1, math.ceil(requests / concurrency))
        common = {"concurrency": concurrency, "per_worker": per_worker}
        persisted = 0
        phases: list[tuple[str, dict[str, Any]]] = [
            ("auth", {"url": f"{base}/api/v1/auth/token", "method": "POST",
                      "bodies": [{"username": USER, "password": PASSWORD}], "warmup": 1}),
            ("broadcast_start", {"url": f"{base}/api/v1/broadcasts", "method": "POST",
                                 "headers": auth,
                                 "bodies": [{"media": media, "class": "normal",
                                             "targets": [c]} for c in communes]}),
            ("broadcast_start_c1", {"url": f"{base}/api/v1/broadcasts", "method": "POST",
                                    "headers": auth, "concurrency": 1,
                                    "per_worker": min(requests, SERIAL_REQUESTS),
                                    "bodies": [{"media": media, "class": "normal",
                                                "targets": [c]} for c in reversed(communes)]}),
            ("area_tree", {"url": f"{base}/api/v1/areas", "method": "GET", "headers": auth}),
        ]
        for name, phase in phases:
            if name not in only:
                continue
            spec = {**common, **phase}
            log(f"{store_url.split(':')[0]} {name}: {spec['per_worker'] * spec['concurrency']} "
                f"requests, {spec['concurrency']} workers")
            await wait_idle(node.engine, 10 * MEDIA_SECONDS)
            node.lag.max_ms = 0.0
            with OnAirSampler(node.engine) as on_air:
                raw = await loop.run_in_executor(pool, client_phase, spec)
            out = summarize(raw)
            out["loop_lag_max_ms"] = round(node.lag.max_ms, 1)
            if name.startswith("broadcast_start"):
                out["on_air"] = on_air.as_dict()
                out["media_seconds"] = MEDIA_SECONDS
                await node.station.flush()
                out["persisted"] = await node.store.count("broadcast") - persisted
                persisted += out["persisted"]
            result[name] = out
        result["left_on_air"] = await wait_idle(node.engine, 10 * MEDIA_SECONDS)
    finally:
        await live.stop()
    return result


async def main(requests: int, concurrency: int, backends: tuple[str, ...] = ("sqlite", "redis"),
               only: tuple[str, ...] = PHASES) -> dict[str, Any]:
    out: dict[str, Any] = {"bench": "api", "areas": AREAS, "devices": DEVICES,
                           "concurrency": concurrency, "requests": requests, "backends": {}}
    reasons: dict[str, str] = {}
    ctx = get_context("spawn")  # never fork a process that runs threads (media clock, SQLite)
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        await asyncio.get_running_loop().run_in_executor(pool, os.getpid)  # spawn it now
        with tempfile.TemporaryDirectory(prefix="loa-bench-api-") as tmp:
            if "sqlite" in backends:
                log("sqlite: seeding and starting")
                out["backends"]["sqlite"] = await bench_backend(
                    "sqlite", "loa:", Path(tmp) / "sqlite", requests, concurrency, pool, only)
            why = await redis_available(REDIS_URL) if "redis" in backends else None
            if "redis" not in backends:
                pass
            elif why is None:
                prefix = f"loa-bench-{uuid.uuid4().hex[:8]}:"
                log(f"redis: seeding under prefix {prefix}")
                try:
                    out["backends"]["redis"] = await bench_backend(
                        REDIS_URL, prefix, Path(tmp) / "redis", requests, concurrency, pool,
                        only)
                finally:
                    removed = await redis_cleanup(REDIS_URL, prefix)
                    log(f"redis: removed {removed} keys under {prefix}")
            else:
                out["backends"]["redis"] = None
                reasons["redis"] = f"unreachable at {REDIS_URL}: {why}"
    if reasons:
        out["unavailable"] = reasons
    out["goal_broadcast_start_p99_ms"] = GOAL_BROADCAST_START_P99_MS
    return out


def run(args: Any) -> int:
    requests = int(getattr(args, "requests", 500))
    concurrency = int(getattr(args, "concurrency", 16))
    if requests < 1 or concurrency < 1:
        print("requests and concurrency must be >= 1", file=sys.stderr)
        return 2
    result = asyncio.run(main(requests, concurrency))
    print(json.dumps(result, ensure_ascii=False))
    return 0
