"""`loa bench outages`: what the outage history costs where it runs and what a month's
availability report costs, on the embedded SQLite store.

N devices spread over the communes of a 5,000-area province each change status K times in one
local month (online, offline, fault in turn; coming back from offline is a connection too). The
bench reports the cost of one status change on the device manager's path (the history's
listener: in memory, the write queued), the time for the queue to put every interval in the
store, and, for the month: the availability report of the whole province (read the month,
tally, roll up the tree) and of one district, the same as CSV and as XLSX (one JSON object on
stdout)."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from loa.relay.devices.history import (
    OPEN,
    DeviceHistory,
    month_bounds,
    month_entries,
    roll_up,
    tally_month,
)
from loa.streamer.areas import AreaTree
from loa.streamer.state.store_sqlite import SqliteStore
from loa.web.bench.api import area_rows
from loa.web.bench.errors import BenchError

MONTH = "2026-10"
STATUSES = ("online", "offline", "fault")


async def _bench(devices: int, changes: int, rounds: int) -> dict[str, Any]:
    tree = AreaTree.from_rows([(r["id"], r["name"], r["level"], r["parent"])
                               for r in area_rows()], strict=False)
    communes = [a.code for a in tree if not a.children]
    with tempfile.TemporaryDirectory() as tmp:
        store = await SqliteStore.open(Path(tmp) / "loa.db")
        hist = DeviceHistory(store)
        await hist.start()
        start, end = month_bounds(MONTH)
        step = (end - start) / (changes + 1)
        events = 0
        listener_s = 0.0
        w0 = time.perf_counter()
        for k in range(changes + 1):
            t0 = time.perf_counter()
            for d in range(devices):
                status = STATUSES[k % 3]  # online, offline, fault, online, ...
                prev = STATUSES[(k - 1) % 3] if k else "offline"
                hist.on_status({"device": f"d{d}", "area": communes[d % len(communes)],
                                "status": status, "previous": prev,
                                "reason": "connected" if prev == "offline" else "heartbeat",
                                "faults": ["speaker_open"] if status == "fault" else [],
                                "ts": start + k * step + d * 1e-3})
                events += 1
            listener_s += time.perf_counter() - t0
            await asyncio.sleep(0)  # the writer runs between two rounds, as on a server
        await hist.flush()
        write_s = time.perf_counter() - w0
        entries = len(await month_entries(store, MONTH))
        district = next(a.code for a in tree if a.parent is not None and a.children)

        async def report(area: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            tallies, areas = tally_month(await month_entries(store, MONTH),
                                         await store.find(OPEN), MONTH, end)
            inside = set(tree.subtree(area))
            mine = {d: t for d, t in tallies.items() if areas.get(d) in inside}
            rolled = roll_up(mine, areas, tree, inside)
            rows = [{"area": a, "availability": t.availability(), **t.seconds}
                    for a, t in rolled.items()]
            return rolled, rows

        province_ms, district_ms, csv_ms, xlsx_ms = [], [], [], []
        rows: list[dict[str, Any]] = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            _, rows = await report(tree.roots()[0].code)
            province_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            await report(district)
            district_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            buf = io.StringIO()
            w = csv.DictWriter(buf, list(rows[0]))
            w.writeheader()
            w.writerows(rows)
            csv_ms.append((time.perf_counter() - t0) * 1000)
            from loa.web.api.outages import xlsx

            t0 = time.perf_counter()
            body = await asyncio.to_thread(xlsx, [("Khu vực", list(rows[0]), rows)])
            xlsx_ms.append((time.perf_counter() - t0) * 1000)
        await hist.stop()
        await store.close()
    return {
        "bench": "outages", "store": "sqlite", "areas": len(tree), "devices": devices,
        "changes_per_device": changes, "status_events": events, "log_entries": entries,
        "listener_us_per_event": round(listener_s / events * 1e6, 2),
        "writes_per_s": round(entries / write_s, 1),
        "report_province_ms_median": round(statistics.median(province_ms), 1),
        "report_district_ms_median": round(statistics.median(district_ms), 1),
        "area_rows": len(rows),
        "csv_ms_median": round(statistics.median(csv_ms), 1),
        "xlsx_ms_median": round(statistics.median(xlsx_ms), 1),
        "xlsx_kb": round(len(body) / 1024, 1), "rounds": rounds,
    }


def run(args: argparse.Namespace) -> int:
    if args.devices < 1 or args.changes < 1 or args.rounds < 1:
        raise BenchError("--devices, --changes and --rounds must be >= 1")
    print(json.dumps(asyncio.run(_bench(args.devices, args.changes, args.rounds))))
    return 0
