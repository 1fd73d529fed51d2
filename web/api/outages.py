"""Availability and device-condition reports from the outage history (relay/devices/history.py),
as JSON, CSV or XLSX, for the caller's subtree and one local month.

- `GET /api/v1/reports/availability?area=&month=YYYY-MM&by=area|device&format=json|csv|xlsx`:
  seconds online / in fault / offline and availability (online share of the recorded time) per
  area of the subtree that has devices (each area sums its subtree) and per device. CSV holds
  the `by` table; XLSX holds both, one sheet each.
- `GET /api/v1/reports/condition?area=&month=&format=`: per device, connections (reboots and
  reconnects), outages, time in fault and the faults seen, signal (min, mean, max, last dBm).
"""

from __future__ import annotations

import asyncio
import csv
import io
import time
from typing import Any

from aiohttp import web

from loa.relay.devices.history import (
    MONTHS,
    OPEN,
    Tally,
    month_bounds,
    month_entries,
    month_of,
    roll_up,
    tally_month,
)
from loa.streamer.messages import say
from loa.streamer.state.store import Record
from loa.web.api.core import node_of
from loa.web.api.schema import READ, STR, responses
from loa.web.http import ApiError, ok, principal, scoped_area

routes = web.RouteTableDef()
FORMATS = ("json", "csv", "xlsx")
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
AREA_COLUMNS = ["area", "name", "level", "devices", "online_s", "fault_s", "offline_s",
                "availability_pct", "outages", "connects"]
DEVICE_COLUMNS = ["device", "name", "area", "area_name", "online_s", "fault_s", "offline_s",
                  "availability_pct", "outages", "connects", "faults"]
CONDITION_COLUMNS = ["device", "name", "area", "area_name", "firmware", "connects", "outages",
                     "fault_s", "faults", "signal_min", "signal_mean", "signal_max",
                     "signal_last"]
Sheet = tuple[str, list[str], list[Record]]


def _seconds(t: Tally) -> Record:
    a = t.availability()
    return {"online_s": round(t.seconds["online"], 3), "fault_s": round(t.seconds["fault"], 3),
            "offline_s": round(t.seconds["offline"], 3), "availability": a,
            "availability_pct": None if a is None else round(100 * a, 2),
            "outages": t.outages, "connects": t.connects}


async def _month(request: web.Request) -> tuple[str, str, dict[str, Tally], dict[str, str],
                                                 set[str]]:
    """(area, month, tallies of the devices recorded inside the area, their areas, subtree)."""
    p = principal(request)
    node = node_of(request)
    area = scoped_area(p, node.tree, request.query.get("area") or p.area)
    month = request.query.get("month") or month_of(time.time())
    try:
        month_bounds(month)
    except ValueError:
        raise ApiError(422, say("report.bad_month"), "month") from None
    if request.query.get("format", "json") not in FORMATS:
        raise ApiError(422, say("report.bad_format"), "format")
    # From the store, not memory: every node of a cluster records the devices it serves.
    entries = await month_entries(node.store, month)
    # A province's month is ~10 us per interval of work: off the loop.
    tallies, areas = await asyncio.to_thread(tally_month, entries, await node.store.find(OPEN),
                                             month, time.time())
    inside = set(node.tree.subtree(area))
    mine = {d: t for d, t in tallies.items() if areas.get(d) in inside}
    return area, month, mine, areas, inside


def _device_base(request: web.Request, dev: str, area: str) -> Record:
    node = node_of(request)
    d = node.devices.get(dev)
    tree = node.tree
    return {"device": dev, "name": d.record["name"] if d else dev, "area": area,
            "area_name": tree.get(area).name if area in tree else area,
            "firmware": d.record.get("firmware") if d else None}


def _faults(t: Tally) -> str:
    return "; ".join(f"{f}: {n}" for f, n in sorted(t.faults.items()))


@routes.get("/api/v1/reports/availability")
async def availability(request: web.Request) -> web.StreamResponse:
    area, month, tallies, areas, inside = await _month(request)
    tree = node_of(request).tree
    rolled = roll_up(tallies, areas, tree, inside)
    counts: dict[str, int] = {}
    for dev in tallies:
        for a in tree.ancestors(areas[dev]):
            counts[a] = counts.get(a, 0) + 1
    area_rows = [{"area": a, "name": tree.get(a).name, "level": tree.get(a).level,
                  "devices": counts.get(a, 0), **_seconds(rolled[a])}
                 for a in tree.subtree(area) if a in rolled]
    device_rows = sorted(({**_device_base(request, d, areas[d]), **_seconds(t),
                           "faults": _faults(t)} for d, t in tallies.items()),
                         key=lambda r: (r["area"], r["name"], r["device"]))
    by = request.query.get("by", "area")
    if by not in ("area", "device"):
        raise ApiError(422, say("report.bad_by"), "by")
    sheets: list[Sheet] = [(say("report.sheet_areas"), AREA_COLUMNS, area_rows),
                           (say("report.sheet_devices"), DEVICE_COLUMNS, device_rows)]
    if by == "device":
        sheets.reverse()
    return await _answer(request, f"availability-{area}-{month}", sheets, {
        "area": area, "month": month, "areas": area_rows, "devices": device_rows})


@routes.get("/api/v1/reports/condition")
async def condition(request: web.Request) -> web.StreamResponse:
    area, month, tallies, areas, inside = await _month(request)
    node = node_of(request)
    signal = {r["device"]: r for r in await node.store.find(MONTHS, month=month)
              if r.get("area") in inside}
    rows = []
    for dev in sorted(set(tallies) | set(signal)):
        t = tallies.get(dev, Tally())
        s = signal.get(dev)
        rows.append({**_device_base(request, dev, areas.get(dev) or (s["area"] if s else "")),
                     "connects": t.connects, "outages": t.outages,
                     "fault_s": round(t.seconds["fault"], 3), "faults": _faults(t),
                     "fault_counts": t.faults,
                     "signal_min": s["min"] if s else None,
                     "signal_mean": round(s["sum"] / s["n"], 1) if s and s["n"] else None,
                     "signal_max": s["max"] if s else None,
                     "signal_last": s.get("last") if s else None})
    rows.sort(key=lambda r: (r["area"], r["name"], r["device"]))
    return await _answer(request, f"condition-{area}-{month}",
                         [(say("report.sheet_devices"), CONDITION_COLUMNS, rows)],
                         {"area": area, "month": month, "devices": rows})


async def _answer(request: web.Request, name: str, sheets: list[Sheet], data: Record
                  ) -> web.StreamResponse:
    fmt = request.query.get("format", "json")
    if fmt == "json":
        return ok(data)
    if fmt == "csv":
        _, columns, rows = sheets[0]
        buf = io.StringIO()
        w = csv.DictWriter(buf, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        return web.Response(text=buf.getvalue(), content_type="text/csv", charset="utf-8",
                            headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})
    body = await asyncio.to_thread(xlsx, sheets)
    return web.Response(body=body, content_type=XLSX, headers={
        "Content-Disposition": f'attachment; filename="{name}.xlsx"'})


def xlsx(sheets: list[Sheet]) -> bytes:
    """A workbook of one sheet per table (header row, then the rows); blocking: in a thread."""
    from openpyxl import Workbook

    wb = Workbook()
    wb.remove(wb.active)
    for title, columns, rows in sheets:
        ws = wb.create_sheet(title.split(" / ")[0][:31])  # Vietnamese title, Excel's limit
        ws.append(columns)
        for r in rows:
            ws.append([_cell(r.get(c)) for c in columns])
    out = io.BytesIO()
    wb.save(out)
    return out.getvalue()


def _cell(v: Any) -> Any:
    return v if v is None or isinstance(v, str | int | float) else str(v)


def openapi_paths() -> dict[str, Any]:
    secured: dict[str, Any] = {"security": [{"bearer": []}]}
    common = [{"name": "area", "in": "query", "schema": STR},
              {"name": "month", "in": "query", "schema": STR, "description": "YYYY-MM, local"},
              {"name": "format", "in": "query", "schema": {"enum": list(FORMATS)}}]
    return {
        "/api/v1/reports/availability": {"get": {
            "summary": say("openapi.report_availability"), **secured,
            "parameters": [*common, {"name": "by", "in": "query",
                                     "schema": {"enum": ["area", "device"]}}],
            "responses": responses(*READ, 422)}},
        "/api/v1/reports/condition": {"get": {
            "summary": say("openapi.report_condition"), **secured, "parameters": common,
            "responses": responses(*READ, 422)}},
    }


def setup(app: web.Application) -> None:
    app.add_routes(routes)
