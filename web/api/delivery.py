"""Proof of delivery over HTTP (the evidence: relay/devices/proof.py).

For an emergency or a broadcast, every loudspeaker of its targets in the caller's subtree:
whether it played it (it reported hearing it while its area aired it), when it acknowledged the
emergency command, and why not when it did not (offline, no ack, silent, not aired there). Read
from the store: the same answer on every node of a cluster and after a restart.

- `delivery` in `GET /api/v1/emergencies/{id}` and `GET /api/v1/broadcasts/{id}` (`summary`):
  `{"played", "total", "text" (say "delivery.played": "47/50" in words), "missing": [...]}`.
- `GET /api/v1/reports/delivery?emergency=ID|broadcast=ID[&format=csv]`: one row per
  loudspeaker; a subject that does not concern the caller's area is `403`.
- `GET /api/v1/reports/shown?area=CODE&from=YYYY-MM-DD&to=YYYY-MM-DD[&format=csv]`: boards'
  proof of play, one row per board, item and day (first and last time on screen, times shown,
  seconds), for the boards of the area's subtree (the caller's area by default).
"""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any

from aiohttp import web

from loa.streamer.messages import say
from loa.streamer.state.store import Record
from loa.web.api.reports import TZ
from loa.web.api.schema import READ, STR, responses
from loa.web.auth import Principal
from loa.web.http import ApiError, ok, principal, scoped_area
from loa.web.node import NODE, Node

routes = web.RouteTableDef()
MAX_MISSING = 500  # loudspeakers named in `missing` (the counts cover them all)
FIELDS = ["device", "name", "area", "area_name", "status", "played", "acked", "state", "reason"]


def concerns(node: Node, p: Principal, rec: Record) -> bool:
    """The caller's area is concerned: a target lies in its subtree, or above it."""
    return p.area in node.tree and any(p.related(node.tree, t) for t in rec.get("targets", []))


def _reason(status: str, proof: Record | None, commanded: bool) -> str | None:
    """Why a loudspeaker did not play it (None: it did)."""
    pr = proof or {}
    if pr.get("played"):
        return None
    if not pr.get("acked") and not pr.get("state"):
        if status == "offline":
            return say("delivery.offline")
        return say("delivery.no_ack") if commanded else say("delivery.no_report")
    state = pr.get("state")
    if state == "playing":  # it played something, while its area aired something else
        return say("delivery.not_aired")
    return say("delivery.silent", state=state) if state else say("delivery.no_report")


async def rows(node: Node, p: Principal, rec: Record,
               proofs: dict[str, Record] | None = None) -> list[Record]:
    """Every loudspeaker of the subject's targets in the caller's subtree, with its proof
    (`proofs`: the subject's records, when the caller has read them already)."""
    tree = node.tree
    covered = {a for a in tree.covered([t for t in rec.get("targets", []) if t in tree])
               if tree.contains(p.area, a)} if p.area in tree else set()
    speakers = [d for d in node.devices.find(covered, kind="loudspeaker")
                if not d.record.get("revoked")]
    speakers.sort(key=lambda d: (d.record["area"], d.record.get("name", ""), d.id))
    if proofs is None:
        proofs = await node.delivery.proofs(rec["id"]) if speakers else {}
    out = []
    for d in speakers:
        pr = proofs.get(d.id)
        area = d.record["area"]
        out.append({"device": d.id, "name": d.record.get("name"), "area": area,
                    "area_name": tree.get(area).name if area in tree else area,
                    "status": d.status, "played": (pr or {}).get("played"),
                    "acked": (pr or {}).get("acked"), "state": (pr or {}).get("state"),
                    "reason": _reason(d.status, pr, "areas" in rec)})
    return out


def summarise(table: list[Record]) -> dict[str, Any]:
    played = sum(1 for r in table if r["played"])
    missing = [r for r in table if not r["played"]]
    return {"played": played, "total": len(table),
            "text": say("delivery.played", n=played, m=len(table)),
            "missing": missing[:MAX_MISSING], "missing_count": len(missing)}


async def summary(node: Node, p: Principal, rec: Record,
                  proofs: dict[str, Record] | None = None) -> dict[str, Any]:
    return summarise(await rows(node, p, rec, proofs))


def _iso(t: float | None) -> str:
    return datetime.fromtimestamp(t, TZ).isoformat(timespec="seconds") if t else ""


@routes.get("/api/v1/reports/delivery")
async def delivery_report(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    p.require("read")
    node = request.app[NODE]
    kind = next((k for k in ("emergency", "broadcast") if request.query.get(k)), None)
    if kind is None:
        raise ApiError(422, say("delivery.subject"), "emergency")
    eid = request.query[kind]
    rec = await node.store.get(kind, eid)
    if rec is None:
        raise ApiError(404, say("emergency.unknown") if kind == "emergency"
                       else say("broadcast.unknown"))
    if not concerns(node, p, rec):
        raise ApiError(403, say("delivery.not_yours"), kind)
    table = await rows(node, p, rec)
    if request.query.get("format") == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in table:
            w.writerow({**r, "played": _iso(r["played"]), "acked": _iso(r["acked"]),
                        "state": r["state"] or "", "reason": r["reason"] or say("delivery.yes")})
        name = f"delivery-{eid}.csv"
        return web.Response(text=buf.getvalue(), content_type="text/csv", charset="utf-8",
                            headers={"Content-Disposition": f'attachment; filename="{name}"'})
    return ok({kind: eid, "title": rec.get("title"), "status": rec.get("status"),
               **summarise(table), "devices": table})


SHOWN_FIELDS = ["device", "name", "area", "area_name", "item", "region", "day", "first", "last",
                "shows", "seconds"]


def _day(request: web.Request, name: str) -> str | None:
    v = request.query.get(name) or None
    if v is not None:
        try:
            return datetime.strptime(v, "%Y-%m-%d").date().isoformat()
        except ValueError:
            raise ApiError(422, say("report.bad_day", name=name), name) from None
    return v


@routes.get("/api/v1/reports/shown")
async def shown_report(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    p.require("read")
    node = request.app[NODE]
    area = scoped_area(p, node.tree, request.query.get("area") or p.area)
    since, until = _day(request, "from"), _day(request, "to")
    inside = set(node.tree.subtree(area))
    rows = []
    for r in await node.delivery.shown():
        if r.get("area") not in inside or (since and r["day"] < since) \
                or (until and r["day"] > until):
            continue
        dev = node.devices.get(r["device"])
        rows.append({**r, "name": dev.record.get("name") if dev else None,
                     "area_name": node.tree.get(r["area"]).name})
    rows.sort(key=lambda r: (r["day"], r["area"], r["device"], r["first"]))
    if request.query.get("format") == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, SHOWN_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "first": _iso(r["first"]), "last": _iso(r["last"])})
        return web.Response(text=buf.getvalue(), content_type="text/csv", charset="utf-8",
                            headers={"Content-Disposition": 'attachment; filename="shown.csv"'})
    return ok({"area": area, "items": [{k: r.get(k) for k in SHOWN_FIELDS} for r in rows]})


def setup(app: web.Application) -> None:
    app.add_routes(routes)


def openapi_paths() -> dict[str, Any]:
    return {"/api/v1/reports/delivery": {"get": {
        "summary": say("openapi.delivery"), "security": [{"bearer": []}],
        "parameters": [{"name": "emergency", "in": "query", "schema": STR},
                       {"name": "broadcast", "in": "query", "schema": STR},
                       {"name": "format", "in": "query",
                        "schema": {"type": "string", "enum": ["json", "csv"]}}],
        "responses": responses(*READ, 404, 422)}},
        "/api/v1/reports/shown": {"get": {
            "summary": say("openapi.shown"), "security": [{"bearer": []}],
            "parameters": [{"name": "area", "in": "query", "schema": STR},
                           {"name": "from", "in": "query", "schema": STR},
                           {"name": "to", "in": "query", "schema": STR},
                           {"name": "format", "in": "query",
                            "schema": {"type": "string", "enum": ["json", "csv"]}}],
            "responses": responses(*READ, 422)}}}
