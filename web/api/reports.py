"""As-run log and reports: what aired where, from when to when, preempted by what."""

from __future__ import annotations

import csv
import io
import time
from collections import defaultdict
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from loa.streamer.areas import AreaTree
from loa.streamer.asrun import asrun_rows, counted_once, hours_per_area
from loa.streamer.broadcast import BroadcastClass
from loa.streamer.messages import say
from loa.streamer.state.store import Record
from loa.web.api.core import node_of
from loa.web.http import ApiError, ok, principal, scoped_area

routes = web.RouteTableDef()
TZ = ZoneInfo("Asia/Ho_Chi_Minh")
ASRUN_FIELDS = ["area", "broadcast", "title", "class", "issuer", "start", "end", "seconds",
                "start_cause", "end_cause", "preempted", "followed_by"]
ON_AIR = say("asrun.on_air")  # the end cause a CSV shows for a segment still on air


def _epoch(request: web.Request, name: str, default: float) -> float:
    v = request.query.get(name)
    if v is None or v == "":
        return default
    try:
        return float(v)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(v)
    except ValueError:
        raise ApiError(422, say("report.bad_time", name=name), name) from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=TZ)).timestamp()


async def _entries(request: web.Request) -> tuple[list[Record], float, float]:
    p = principal(request)
    node = node_of(request)
    until = _epoch(request, "to", time.time())
    since = _epoch(request, "from", until - 7 * 86400)
    if until <= since:
        raise ApiError(422, say("report.to_before_from"), "to")
    area = scoped_area(p, node.tree, request.query.get("area") or p.area)
    inside = set(node.tree.subtree(area))
    klass = request.query.get("class") or None
    if klass is not None and klass not in BroadcastClass.__members__:
        raise ApiError(422, say("class.bad", value=klass), "class")
    rows = await asrun_rows(node.store, since, until)
    out = [r for r in rows if r.get("area") in inside and (klass is None or
                                                           r.get("class") == klass)]
    return out, since, until


@routes.get("/api/v1/reports/asrun")
async def asrun(request: web.Request) -> web.StreamResponse:
    rows, _, _ = await _entries(request)
    if request.query.get("format") == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, ASRUN_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            closed = r.get("end") is not None
            w.writerow({**r, "start": _iso(r["start"]), "end": _iso(r["end"]) if closed else "",
                        "end_cause": r.get("end_cause") if closed else ON_AIR})
        return web.Response(text=buf.getvalue(), content_type="text/csv", charset="utf-8",
                            headers={"Content-Disposition": 'attachment; filename="asrun.csv"'})
    tree = node_of(request).tree
    return ok({"entries": [{**r, "area_name": _name(tree, r["area"])} for r in rows]})


@routes.get("/api/v1/reports/summary")
async def summary(request: web.Request) -> web.Response:
    """Hours on air per area and class, and bulletins per local day."""
    rows, since, until = await _entries(request)
    hours = hours_per_area(counted_once(rows), since, until)
    per_day: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r.get("class") != "background":
            per_day[datetime.fromtimestamp(r["start"], TZ).date().isoformat()].add(r["broadcast"])
    out: dict[str, Any] = {
        "from": since,
        "to": until,
        "hours": hours,
        "bulletins_per_day": {d: len(ids) for d, ids in sorted(per_day.items())},
        "names": {a: _name(node_of(request).tree, a) for a in sorted(hours)},
    }
    return ok(out)


def _name(tree: AreaTree, code: str) -> str:
    return tree.get(code).name if code in tree else code


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, TZ).isoformat(timespec="seconds")


def setup(app: web.Application) -> None:
    app.add_routes(routes)
