"""`loa bench uplink --entries N`: an outage's backlog of reports drained up the node link.

Two real nodes in this process on 127.0.0.1, each with its own SQLite data directory (no media
clock: nothing airs, so the CPU measured is the link's and the stores'): a parent (the province)
and a child (a district) linked by a node key. The parent is down while N as-run entries are
queued at the child, through the station's hook (the way each closed segment goes up). Then the
parent starts again on its port; from the child's link coming up until the parent has taken all
N and the child's queue is empty:

- `queue_s`: the time the child took to queue the N (its store writes);
- `drain_s`, `entries_per_s`: the drain;
- `bytes_per_entry`: mean size of one as-run report on the link (JSON text);
- `cpu_ms_per_entry`: this process's CPU (both nodes, every thread) over the drain, per entry.

Only the JSON object goes to stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import secrets
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from loa.relay.devices.records import new_id, secret_hash
from loa.streamer.areas import sample_tree
from loa.web.config import Config, load_config
from loa.web.testing import LiveNode, start_node

AREA = "T01-H1-X1"


def _config(where: Path, areas_csv: Path) -> Config:
    cfg = load_config(None, env={}, data=str(where / "data"))
    cfg.areas.csv = str(areas_csv)
    cfg.http_streams.workers = 0
    cfg.webrtc.workers = 0
    return cfg


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _entry(i: int) -> dict[str, Any]:
    start = time.time() - 86400 + i
    return {"id": uuid.uuid4().hex, "area": AREA, "broadcast": "bench-uplink",
            "title": "Bản tin xã", "class": "normal", "issuer": AREA, "start": start,
            "end": start + 60.0, "seconds": 60.0, "start_cause": "start", "end_cause": "ended",
            "preempted": None, "followed_by": None}


HUNG_S = 600.0  # a wait this long has hung: the bench stops


async def _until(cond: Any, what: str) -> None:
    """Poll; the limit only ends a hung bench."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HUNG_S
    while not cond():
        if loop.time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.01)


async def bench(entries: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="loa-bench-uplink-") as tmp:
        root = Path(tmp)
        csv = root / "areas.csv"
        tree = sample_tree()
        csv.write_text("code,name,level,parent_code\n" + "".join(
            f"{a.code},{a.name},{a.level},{a.parent or ''}\n" for a in tree), encoding="utf-8")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        pcfg = _config(root / "parent", csv)
        parent: LiveNode | None = await start_node(pcfg, realtime=False, port=port)
        assert parent is not None
        secret = secrets.token_urlsafe(32)
        key = {"id": new_id(), "name": "Nút huyện", "area": "T01-H1",
               "key_hash": secret_hash(secret), "revoked": False, "created": time.time()}
        await parent.node.store.create("node_key", key)
        await parent.stop()
        parent = None

        ccfg = _config(root / "child", csv)
        ccfg.upstream.url = f"http://127.0.0.1:{port}"
        ccfg.upstream.key = f"{key['id']}.{secret}"
        ccfg.upstream.areas = ["T01-H1"]
        ccfg.upstream.queue_max = max(entries * 2, 100_000)
        child = await start_node(ccfg, realtime=False)
        try:
            up = child.node.uplink
            assert up is not None and child.node.upstream is not None
            print(f"queueing {entries} as-run entries at the child", file=sys.stderr)
            t0 = time.perf_counter()
            sizes = 0
            for i in range(entries):
                e = _entry(i)
                await up.asrun(e)
                if i < 100:
                    sizes += len(json.dumps({"type": "asrun", "id": f"asrun:{e['id']}",
                                             "entry": e, "origin": [],
                                             "cursor": f"{time.time():.6f}-parent:asrun:"
                                                       f"{e['id']}"}, ensure_ascii=False))
            queue_s = time.perf_counter() - t0
            print("parent back: draining", file=sys.stderr)
            parent = await start_node(pcfg, realtime=False, port=port)
            link = child.node.upstream
            await _until(lambda: link.state == "up", "the link up")
            t1, c1 = time.perf_counter(), _cpu()
            receiver = parent.node.uplink_in
            await _until(lambda: receiver.counts["asrun"] >= entries and up.pending == 0,
                         "the backlog drained")
            drain_s, cpu = time.perf_counter() - t1, _cpu() - c1
            stored = await parent.node.store.read_log("asrun", broadcast="bench-uplink",
                                                      limit=entries + 10)
            assert len(stored) == entries, len(stored)
        finally:
            await child.stop()
            if parent is not None:
                await parent.stop()
    return {"entries": entries, "queue_s": round(queue_s, 3), "drain_s": round(drain_s, 3),
            "entries_per_s": round(entries / drain_s, 1),
            "bytes_per_entry": round(sizes / min(entries, 100)),
            "cpu_ms_per_entry": round(cpu * 1000 / entries, 3)}


def run(args: argparse.Namespace) -> int:
    with contextlib.redirect_stdout(sys.stderr):  # the bootstrap admin notices: not JSON
        out = asyncio.run(bench(args.entries))
    print(json.dumps(out))
    return 0
