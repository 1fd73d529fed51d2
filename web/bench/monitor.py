"""`python -m loa.web.bench.monitor [--areas N] [--devices N] [--rounds R]`: the monitor's cost
on a big province (JSON document and /metrics)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from loa.web.node import Node


async def _bench(areas: int, devices: int, rounds: int) -> dict[str, object]:
    """The monitor's cost on a big province: every area on air and listened to (one Opus hub
    subscription each), `devices` registered devices. Per operation, over real HTTP from a
    client thread: the event loop thread's CPU (ms, p50 and max over the rounds; the metrics
    text is built in a worker thread, not counted) and the longest the loop was held meanwhile
    (a probe task measures the loop thread's CPU time between two of its turns: what every
    socket of the node waits behind; garbage collections included)."""
    import contextlib as _contextlib
    import statistics
    import sys
    import tempfile
    import urllib.request

    import aiohttp

    from loa.streamer.broadcast import Broadcast
    from loa.streamer.clock import VirtualClock
    from loa.streamer.sources import ToneSource
    from loa.streamer.state.open import open_store
    from loa.web.auth import add_user
    from loa.web.config import load_config
    from loa.web.monitor import SAMPLER as sampler_key
    from loa.web.testing import start_node

    districts = max(1, areas // 100)
    communes = areas - 1 - districts
    lines = ["code,name,level,parent_code", "49,Tỉnh mẫu,province,"]
    lines += [f"{500 + d:03d},Huyện {d + 1:02d},district,49" for d in range(districts)]
    codes = [f"{20000 + c:05d}" for c in range(communes)]
    lines += [f"{code},Xã {c + 1:04d},commune,{500 + c % districts:03d}"
              for c, code in enumerate(codes)]
    res: dict[str, list[float]] = {}
    stall: dict[str, float] = {}
    size: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "areas.csv"
        csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
        cfg = load_config(None, env={}, data=str(Path(tmp) / "data"))
        cfg.areas.csv = str(csv)
        # Seeded before the node starts: its device manager loads the registry at start.
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        store = await open_store(cfg.store, cfg.data_dir, cfg.store_prefix)
        try:
            await store.put_many("device", [
                {"id": f"loa-{i:05d}", "area": codes[i % len(codes)], "kind": "loudspeaker",
                 "name": f"Cụm loa {i:05d}", "status": "offline", "volume": 80}
                for i in range(devices)])
        finally:
            await store.close()

        async def prepare(node: Node) -> None:
            await add_user(node.store, node.tree, "bench-tinh", "viewer", "49", "mat-khau-123")
            await add_user(node.store, node.tree, "bench-xa", "viewer", codes[0],
                           "mat-khau-123")

        with _contextlib.redirect_stdout(sys.stderr):  # the bootstrap password is not the result
            live = await start_node(cfg, realtime=False, prepare=prepare)
        node, app, base = live.node, live.app, live.url
        client = aiohttp.ClientSession(base_url=base)
        tokens = {}
        for who in ("bench-tinh", "bench-xa"):
            r = await client.post("/api/v1/auth/token",
                                  json={"username": who, "password": "mat-khau-123"})
            tokens[who] = {"Authorization": "Bearer " + (await r.json())["token"]}
        node.engine.start(Broadcast(ToneSource(440, 0.3), ["49"], issuer="49", title="Thử"))
        subs = [node.hub.subscribe(a.code, "opus") for a in node.tree]
        for sub in subs:
            sub.on_packets = lambda packets: None  # consumed at once, like a transport
        clock = VirtualClock(node.engine.tick)
        app[sampler_key].sample()

        async def probe(gaps: list[float]) -> None:
            # CPU time of the loop thread between two turns of this task: the work that held
            # the loop (not time the OS gave to other processes of a busy machine).
            last = time.thread_time()
            while True:
                await asyncio.sleep(0.001)
                now = time.thread_time()
                gaps.append(now - last)
                last = now

        async def measure(name: str, path: str, who: str | None) -> bytes:
            gaps: list[float] = []
            task = asyncio.get_running_loop().create_task(probe(gaps))
            await asyncio.sleep(0.005)
            gaps.clear()
            t0 = time.thread_time()
            # The client runs in a thread: its reading must not hold the server's loop.
            body = await asyncio.to_thread(fetch, path, tokens[who] if who else {})
            res.setdefault(name, []).append((time.thread_time() - t0) * 1000)
            task.cancel()
            stall[name] = max(stall.get(name, 0.0), max(gaps, default=0.0) * 1000)
            size[name.replace("_ms", "_bytes")] = len(body)
            return body

        def fetch(path: str, headers: dict[str, str]) -> bytes:
            req = urllib.request.Request(f"{base}{path}", headers=headers)
            with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 - 127.0.0.1
                return bytes(r.read())

        for _ in range(rounds):
            clock.run(50)
            await asyncio.sleep(0)  # the hub's deliveries of those ticks run now, not below
            await measure("monitor_province_all_ms", "/api/v1/monitor", "bench-tinh")
            await measure("monitor_province_depth1_ms", "/api/v1/monitor?depth=1", "bench-tinh")
            await measure("monitor_commune_ms", "/api/v1/monitor", "bench-xa")
            text = await measure("metrics_ms", "/metrics", None)
            size["metrics_series"] = sum(1 for ln in text.splitlines()
                                         if not ln.startswith(b"#"))
            t0 = time.thread_time()
            app[sampler_key].sample(force=True)
            res.setdefault("sample_ms", []).append((time.thread_time() - t0) * 1000)
        for sub in subs:
            sub.close()
        await client.close()
        await live.stop()
    out: dict[str, object] = {"bench": "monitor", "areas": areas, "devices": devices,
                              "channels": len(subs), "rounds": rounds}
    for k, v in res.items():
        out[k.replace("_ms", "_cpu_p50_ms")] = round(statistics.median(v), 2)
        out[k.replace("_ms", "_cpu_max_ms")] = round(max(v), 2)
        if k in stall:
            out[k.replace("_ms", "_loop_stall_max_ms")] = round(stall[k], 2)
    out.update(size)
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Monitor cost: JSON and /metrics on a big province")
    ap.add_argument("--areas", type=int, default=5000)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(_bench(a.areas, a.devices, a.rounds))))
