"""GET /api/v1/overview: one level of the area tree with what is on air, device counts, today's
schedule, active emergencies and recent device faults (the console's home screen)."""

from __future__ import annotations

import datetime as dt
import heapq
from collections import Counter
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from loa.streamer.areas import AreaTree
from loa.streamer.schedule import ScheduleError, occurrences
from loa.web.auth import area_out
from loa.web.http import ok, principal, scoped_area
from loa.web.monitor import DEVICE_STATUSES
from loa.web.node import NODE, Node

routes = web.RouteTableDef()
ZONE = ZoneInfo("Asia/Ho_Chi_Minh")
MAX_TODAY = 50
MAX_FAULTS = 20


def _on_air(node: Node, code: str) -> dict[str, Any] | None:
    now = node.engine.on_air(code)
    if not now["broadcast"]:
        return None
    return {k: now[k] for k in ("broadcast", "title", "class", "issuer", "since")}


async def _device_counts(node: Node, rows: set[str]) -> dict[str, dict[str, int]]:
    """Devices by status for each row, over its whole subtree: one pass over the devices, then
    one walk up the tree per (area, status) pair (10,000 devices sit in ~5,000 areas). Those of
    child nodes count too, as they last reported them (relay/uplink.py)."""
    counts = {c: {**dict.fromkeys(DEVICE_STATUSES, 0), "total": 0} for c in rows}
    tree = node.tree
    pairs = Counter((dev.record.get("area"), dev.status) for dev in node.devices.devices.values())
    pairs.update((d.get("area"), str(d.get("status"))) for d in await node.store.find("node_device"))
    for (where, status), n in pairs.items():
        if not isinstance(where, str) or where not in tree:
            continue
        for a in tree.ancestors(where):
            if a in counts:
                counts[a]["total"] += n
                if status in counts[a]:
                    counts[a][status] += n
    return counts


def _row(node: Node, code: str, counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    a = node.tree.get(code)
    return {"code": a.code, "name": a.name, "level": a.level, "children": len(a.children),
            "on_air": _on_air(node, code), "devices": counts[code]}


def _faults(node: Node, tree: AreaTree, root: str) -> list[dict[str, Any]]:
    """The latest offline or faulty devices of the subtree (whether an area is inside is
    decided once per area, not once per device)."""
    inside: dict[object, bool] = {}

    def within(where: object) -> bool:
        if where not in inside:
            inside[where] = isinstance(where, str) and where in tree and tree.contains(root, where)
        return inside[where]

    down = (dev for dev in node.devices.devices.values()
            if dev.status in ("fault", "offline") and within(dev.record.get("area")))
    latest = heapq.nlargest(MAX_FAULTS, down, key=lambda d: d.record.get("last_seen") or 0)
    return [{"device": d.id, "name": d.record.get("name"), "area": d.record["area"],
             "at": d.record.get("last_seen"), "status": d.status} for d in latest]


async def _today(node: Node, root: str) -> list[dict[str, Any]]:
    tree = node.tree
    day = dt.datetime.now(ZONE).date()
    start = dt.datetime.combine(day, dt.time(), tzinfo=ZONE).timestamp()
    found: list[tuple[float, dict[str, Any]]] = []
    for rec in await node.store.find("schedule"):
        area = rec.get("area")
        if not isinstance(area, str) or area not in tree or not tree.contains(root, area):
            continue
        try:
            times = occurrences(rec, start, start + 86400)
        except ScheduleError:
            continue
        found.extend((t, rec) for t in times)
    found.sort(key=lambda x: x[0])
    out = []
    for t, rec in found[:MAX_TODAY]:
        prog = await node.store.get("programme", rec["programme"])
        out.append({"schedule": rec["id"], "area": rec["area"],
                    "area_name": tree.get(rec["area"]).name,
                    "time": dt.datetime.fromtimestamp(t, ZONE).strftime("%H:%M"),
                    "title": (prog or {}).get("title")})
    return out


def _emergencies(node: Node, root: str) -> list[dict[str, Any]]:
    tree = node.tree
    out = []
    for rec in node.emergency.active.values():
        areas = [a for a in rec.get("areas", []) if a in tree and tree.contains(root, a)]
        if areas:
            out.append({"id": rec["id"], "title": rec.get("title"), "areas": areas,
                        "issuer": rec.get("issuer"), "started": rec.get("created")})
    return out


@routes.get("/api/v1/overview")
async def overview(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("read")
    node: Node = request.app[NODE]
    tree = node.tree
    root = scoped_area(p, tree, request.query.get("root") or p.area, "root", missing=404)
    children = list(tree.get(root).children)
    counts = await _device_counts(node, {root, *children})
    return ok({"root": {**_row(node, root, counts), "path": area_out(tree, root)["path"]},
               "children": [_row(node, c, counts) for c in children],
               "emergencies": _emergencies(node, root),
               "today": await _today(node, root),
               "faults": _faults(node, tree, root)})


def setup(app: web.Application) -> None:
    app.add_routes(routes)
