"""The as-aired archive (relay/archive.py), replay and scheduled captures.

- `GET /api/v1/areas/{code}/archive`: whether the area records, its own setting or the one it
  inherits (and from where); `PUT` sets its own, `DELETE` inherits again.
- `GET /api/v1/archive/{code}/segments?from=&to=`: the recorded files of an area.
- `GET /api/v1/archive/{code}/audio?from=&to=`: what the area carried in a span, as one Ogg
  Opus file to keep as evidence (audited).
- `POST /api/v1/archive/replay`: the archived audio of an as-run entry (or of a span) becomes a
  library item, aired again at once when `targets` are given.
- `/api/v1/captures` (POST, GET), `/api/v1/captures/{id}` (GET, DELETE): a relay programme's
  input recorded at a set time into the library, aired later (web/captures.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime
from typing import Any

from aiohttp import web

from loa.codecs.decode import MediaError
from loa.relay.archive import size_of
from loa.streamer.areasettings import SettingsError
from loa.streamer.messages import say
from loa.streamer.state.store import Record
from loa.web import captures
from loa.web.api.air import _class, _targets
from loa.web.api.core import node_of
from loa.web.api.reports import TZ, _epoch
from loa.web.api.schema import (
    CODE_PARAM,
    ID_PARAM,
    RANGE_PARAMS,
    READ,
    STR,
    TARGETS,
    WRITE,
    body,
    obj,
    responses,
)
from loa.web.http import (
    ApiError,
    audit,
    field,
    ok,
    principal,
    read_json,
    reference,
    refuse_unknown,
    scoped_area,
)

routes = web.RouteTableDef()
MAX_SPAN_S = 3 * 3600  # one download or replay: ~50 MB of 32 kbit/s Opus, built in memory


ARCHIVE_PATH = "/api/v1/areas/{code}/archive"


def _archive_out(request: web.Request, code: str) -> Record:
    node = node_of(request)
    value, source = node.area_settings.effective(code, "archive")
    return {"area": code, "own": node.area_settings.own(code).get("archive"), "from": source,
            "effective": value, "recording": code in node.archive.recorders,
            "stopped": node.archive.stopped}


@routes.get(ARCHIVE_PATH)
async def archive_get(request: web.Request) -> web.Response:
    p = principal(request)
    code = scoped_area(p, node_of(request).tree, request.match_info["code"], None, missing=404)
    return ok(_archive_out(request, code))


async def _archive_set(request: web.Request, value: Record | None) -> web.Response:
    p = principal(request)
    p.require("air")  # the area's operator chooses (a commune for itself)
    node = node_of(request)
    code = scoped_area(p, node.tree, request.match_info["code"], None, missing=404)
    try:
        stored = await node.area_settings.put(code, "archive", value)
    except SettingsError as e:
        raise ApiError(422, str(e), e.field) from None
    await audit(request, "area.archive", code, setting=stored)
    return ok(_archive_out(request, code))


@routes.put(ARCHIVE_PATH)
async def archive_put(request: web.Request) -> web.Response:
    return await _archive_set(request, await read_json(request))


@routes.delete(ARCHIVE_PATH)
async def archive_delete(request: web.Request) -> web.Response:
    return await _archive_set(request, None)  # the area follows what is above it again


def _span(request: web.Request) -> tuple[float, float]:
    until = _epoch(request, "to", time.time())
    since = _epoch(request, "from", until - 3600)
    if until <= since:
        raise ApiError(422, say("report.to_before_from"), "to")
    if until - since > MAX_SPAN_S:
        raise ApiError(422, say("archive.span_too_long", hours=MAX_SPAN_S // 3600), "to")
    return since, until


@routes.get("/api/v1/archive/{code}/segments")
async def segments(request: web.Request) -> web.Response:
    p = principal(request)
    node = node_of(request)
    code = scoped_area(p, node.tree, request.match_info["code"], None, missing=404)
    until = _epoch(request, "to", time.time())
    since = _epoch(request, "from", until - 86400)
    segs = await asyncio.to_thread(node.archive.segments, code)
    sizes = await asyncio.to_thread(lambda: [size_of(s.path) for s in segs])
    out = []
    for i, s in enumerate(segs):
        end = segs[i + 1].start if i + 1 < len(segs) else None
        if s.start < until and (end is None or end > since):
            out.append({"start": s.start, "next": end, "bytes": sizes[i]})
    return ok({"area": code, "recording": code in node.archive.recorders,
               "stopped": node.archive.stopped, "segments": out})


@routes.get("/api/v1/archive/{code}/audio")
async def audio(request: web.Request) -> web.Response:
    p = principal(request)
    node = node_of(request)
    code = scoped_area(p, node.tree, request.match_info["code"], None, missing=404)
    since, until = _span(request)
    await node.archive.flush()  # what the recorder holds in memory belongs to the span too
    data, first, seconds = await asyncio.to_thread(node.archive.read, code, since, until)
    if not data:
        raise ApiError(404, say("archive.nothing"), "from")
    await audit(request, "archive.download", code, **{"from": since, "to": until,
                                                      "seconds": round(seconds, 3)})
    name = f"loa-{code}-{int(first)}.opus"
    return web.Response(body=data, content_type="audio/ogg", headers={
        "Content-Disposition": f'attachment; filename="{name}"',
        "Loa-Archive-From": f"{first:.3f}", "Loa-Archive-Seconds": f"{seconds:.3f}"})


async def _asrun_entry(request: web.Request, eid: str) -> Record:
    node = node_of(request)
    found = await node.store.read_log("asrun", id=eid, limit=1)
    if not found:
        raise ApiError(404, say("archive.unknown_asrun"), "asrun")
    entry = found[0]
    scoped_area(principal(request), node.tree, entry.get("area"), "asrun")
    if entry.get("end") is None:
        raise ApiError(422, say("archive.asrun_on_air"), "asrun")
    return entry


@routes.post("/api/v1/archive/replay")
async def replay(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("edit")
    node = node_of(request)
    data = await read_json(request)
    refuse_unknown(data, {"asrun", "area", "from", "to", "title", "targets", "class"})
    eid = field(data, "asrun", str, required=False)
    if eid is not None:
        entry = await _asrun_entry(request, eid)
        area, since, until = entry["area"], float(entry["start"]), float(entry["end"])
        title = entry.get("title") or area
    else:
        area = scoped_area(p, node.tree, field(data, "area", str))
        since = float(field(data, "from", (int, float)))
        until = float(field(data, "to", (int, float)))
        if not 0 < until - since <= MAX_SPAN_S:
            raise ApiError(422, say("archive.span_too_long", hours=MAX_SPAN_S // 3600), "to")
        title = area
    # A library item's name, not a message: in the operators' language only.
    title = field(data, "title", str, required=False) or f"Phát lại: {title}"
    airing = data.get("targets") is not None
    if airing:
        p.require("air")
        targets, cls = _targets(request, data), _class(data, p)
    await node.archive.flush()
    ogg, first, seconds = await asyncio.to_thread(node.archive.read, area, since, until)
    if not ogg:
        raise ApiError(404, say("archive.nothing"), "asrun" if eid else "from")
    tmp = node.library.temp_path(".opus")
    await asyncio.to_thread(tmp.write_bytes, ogg)
    try:
        media = await node.library.ingest(tmp, title=title[:200], area=p.area, owner=p.username,
                                          filename="archive.opus", extra={
                                              "archive": {"area": area, "from": first,
                                                          "seconds": round(seconds, 3),
                                                          "asrun": eid}})
    except MediaError as e:
        raise ApiError(422, str(e), "asrun") from None
    out: dict[str, Any] = {"media": media}
    if airing:
        # It aired already in the caller's subtree: airing it again needs no new approval.
        content = await node.station.content({"media": media["id"]}, area=p.area,
                                             owner=p.username, require_approved=False)
        out["broadcast"] = await node.station.air(
            content, targets=targets, klass=cls, issuer=p.area, user=p.username,
            spec={"media": media["id"], "replay": eid or area})
    await audit(request, "archive.replay", media["id"], area=area, asrun=eid,
                broadcast=out.get("broadcast", {}).get("id"))
    return ok(out, 201)


def _when(data: dict[str, Any], name: str) -> float:
    """An instant of a JSON body: epoch seconds or ISO 8601 (local time when no offset)."""
    value = field(data, name, (int, float, str))
    if isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise ApiError(422, say("report.bad_time", name=name), name) from None
        return (dt if dt.tzinfo else dt.replace(tzinfo=TZ)).timestamp()
    return float(value)


def _capture_of(request: web.Request, rec: Record | None) -> Record:
    node = node_of(request)
    if rec is None or not principal(request).inside(node.tree, rec["area"]):
        raise ApiError(404, say("capture.unknown"))
    return rec


@routes.post("/api/v1/captures")
async def capture_create(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("edit")
    node = node_of(request)
    data = await read_json(request)
    refuse_unknown(data, {"programme", "start", "seconds", "title", "air"})
    prog = await reference(request, node.tree, "programme", data.get("programme"), "programme")
    if prog.get("type") != "relay":
        raise ApiError(422, say("capture.not_relay"), "programme")
    if prog.get("status") != "approved" and not p.can("direct"):
        raise ApiError(403, say("broadcast.approved_only"), "programme")
    start = _when(data, "start")
    seconds = field(data, "seconds", (int, float))
    if not 1 <= seconds <= captures.MAX_SECONDS:
        raise ApiError(422, say("capture.bad_seconds", limit=captures.MAX_SECONDS), "seconds")
    if start + seconds <= time.time():
        raise ApiError(422, say("capture.past"), "start")
    title = field(data, "title", str, required=False) or prog["title"]
    rec: Record = {"id": uuid.uuid4().hex[:12], "area": p.area, "owner": p.username,
                   "programme": prog["id"], "title": title[:200], "start": start,
                   "seconds": float(seconds), "status": "scheduled", "created": time.time()}
    air = data.get("air")
    if air is not None:
        if not isinstance(air, dict):
            raise ApiError(422, say("field.type", name="air", kind="object"), "air")
        refuse_unknown(air, {"targets", "class", "at"})
        p.require("air")
        at = _when(air, "at")
        if at < start + seconds:
            raise ApiError(422, say("capture.air_before_end"), "air.at")
        rec["air"] = {"targets": _targets(request, air), "class": _class(air, p), "at": at}
    await node.store.create(captures.KIND, rec)
    node.captures.arm(rec)
    await audit(request, "capture.create", rec["id"], programme=prog["id"], start=start,
                seconds=rec["seconds"], air=rec.get("air"))
    return ok(rec, 201)


@routes.get("/api/v1/captures")
async def capture_list(request: web.Request) -> web.Response:
    p = principal(request)
    node = node_of(request)
    mine = [r for r in await node.store.find(captures.KIND)
            if p.inside(node.tree, r["area"])]
    mine.sort(key=lambda r: r["start"], reverse=True)
    return ok({"captures": mine[:500]})


@routes.get("/api/v1/captures/{id}")
async def capture_get(request: web.Request) -> web.Response:
    node = node_of(request)
    return ok(_capture_of(request, await node.store.get(captures.KIND, request.match_info["id"])))


@routes.delete("/api/v1/captures/{id}")
async def capture_cancel(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("edit")
    node = node_of(request)
    rec = _capture_of(request, await node.store.get(captures.KIND, request.match_info["id"]))
    if rec["status"] in ("aired", "failed", "missed", "cancelled"):
        raise ApiError(409, say("capture.over", status=rec["status"]), "id")
    rec = await node.captures.cancel(rec["id"])
    await audit(request, "capture.cancel", rec["id"])
    return ok(rec)


def openapi_paths() -> dict[str, Any]:
    secured: dict[str, Any] = {"security": [{"bearer": []}]}
    span = [p for p in RANGE_PARAMS if p["name"] != "area"]
    return {
        ARCHIVE_PATH: {
            "parameters": [CODE_PARAM],
            "get": {"summary": say("openapi.area_archive"), **secured,
                    "responses": responses(*READ, 404)},
            "put": {"summary": say("openapi.area_archive_put"), **secured,
                    "requestBody": body(obj({
                        "enabled": {"type": "boolean"},
                        "retention_days": {"type": "integer", "minimum": 1, "maximum": 3650}})),
                    "responses": responses(200, *WRITE, 404)},
            "delete": {"summary": say("openapi.area_archive_delete"), **secured,
                       "responses": responses(200, 401, 403, 404)},
        },
        "/api/v1/archive/{code}/segments": {
            "parameters": [CODE_PARAM, *span],
            "get": {"summary": say("openapi.archive_segments"), **secured,
                    "responses": responses(*READ, 404, 422)},
        },
        "/api/v1/archive/{code}/audio": {
            "parameters": [CODE_PARAM, *span],
            "get": {"summary": say("openapi.archive_audio"), **secured,
                    "responses": {**responses(*READ, 404, 422), "200": {
                        "description": "Ogg Opus",
                        "content": {"audio/ogg": {"schema": {"type": "string",
                                                             "format": "binary"}}}}}},
        },
        "/api/v1/captures": {
            "get": {"summary": say("openapi.captures"), **secured, "responses": responses(*READ)},
            "post": {"summary": say("openapi.capture_create"), **secured,
                     "requestBody": body(obj({
                         "programme": STR, "start": {"type": ["number", "string"]},
                         "seconds": {"type": "number", "minimum": 1,
                                     "maximum": captures.MAX_SECONDS},
                         "title": STR, "air": obj({"targets": TARGETS, "class": STR,
                                                   "at": {"type": ["number", "string"]}},
                                                  ["targets", "at"])},
                         ["programme", "start", "seconds"])),
                     "responses": responses(201, *WRITE)},
        },
        "/api/v1/captures/{id}": {
            "parameters": [ID_PARAM],
            "get": {"summary": say("openapi.capture"), **secured,
                    "responses": responses(*READ, 404)},
            "delete": {"summary": say("openapi.capture_cancel"), **secured,
                       "responses": responses(200, 401, 403, 404, 409)},
        },
        "/api/v1/archive/replay": {
            "post": {"summary": say("openapi.archive_replay"), **secured,
                     "requestBody": body(obj({
                         "asrun": STR, "area": STR, "from": {"type": "number"},
                         "to": {"type": "number"}, "title": STR, "targets": TARGETS,
                         "class": STR})),
                     "responses": responses(201, *WRITE, 404)},
        },
    }


def setup(app: web.Application) -> None:
    app.add_routes(routes)
