"""The map as GeoJSON (RFC 7946): areas with coordinates (their centre, from the area list's
optional lat, lon columns) and devices with a GPS fix (from their heartbeats), of the caller's
subtree. The console's map draws it; any GIS tool reads it.

`GET /api/v1/map.geojson?area=CODE[&depth=N][&status=][&kind=]`: a FeatureCollection of Points
(`[lon, lat]`): areas of `area`'s subtree down to `depth` levels below it (default: all) with
`properties` {"kind": "area", "code", "name", "level", "parent"}, and the devices of the whole
subtree (filtered by status and kind as the device list is) with {"kind": "loudspeaker" |
"board", "id", "name", "area", "status"}. `area` outside the caller's subtree: `403`.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from loa.relay.devices.protocol import DEVICE_KINDS, DEVICE_STATUSES
from loa.streamer.messages import say
from loa.web.api.core import node_of
from loa.web.api.schema import CODE, READ, STR, responses
from loa.web.http import ApiError, principal, scoped_area

routes = web.RouteTableDef()
MAX_DEPTH = 16


def _point(lat: float, lon: float, props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [lon, lat]},
            "properties": props}


def _choice(request: web.Request, name: str, allowed: tuple[str, ...]) -> str | None:
    v = request.query.get(name) or None
    if v is not None and v not in allowed:
        raise ApiError(422, say("geo.bad_choice", name=name, allowed=", ".join(allowed)), name)
    return v


@routes.get("/api/v1/map.geojson")
async def map_geojson(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("read")
    node = node_of(request)
    tree = node.tree
    area = scoped_area(p, tree, request.query.get("area") or p.area)
    raw = request.query.get("depth")
    if raw is not None and not (raw.isdigit() and int(raw) <= MAX_DEPTH):
        raise ApiError(422, say("geo.bad_depth", limit=MAX_DEPTH), "depth")
    status = _choice(request, "status", DEVICE_STATUSES)
    kind = _choice(request, "kind", DEVICE_KINDS)
    top = tree.depth(area)
    inside = tree.subtree(area)
    features = []
    for code in inside:
        a = tree.get(code)
        if a.lat is not None and a.lon is not None and (
                raw is None or tree.depth(code) - top <= int(raw)):
            features.append(_point(a.lat, a.lon, {"kind": "area", "code": code, "name": a.name,
                                                  "level": a.level, "parent": a.parent}))
    for d in node.devices.find(set(inside), kind=kind, status=status):
        gps = (d.telemetry or {}).get("gps")
        if gps and not d.record.get("revoked"):
            features.append(_point(gps[0], gps[1], {
                "kind": d.record["kind"], "id": d.id, "name": d.record.get("name"),
                "area": d.record["area"], "status": d.status}))
    return web.json_response({"type": "FeatureCollection", "features": features},
                             content_type="application/geo+json",
                             dumps=lambda o: json.dumps(o, ensure_ascii=False))


def setup(app: web.Application) -> None:
    app.add_routes(routes)


def openapi_paths() -> dict[str, Any]:
    return {"/api/v1/map.geojson": {"get": {
        "summary": say("openapi.map"), "security": [{"bearer": []}],
        "parameters": [{"name": "area", "in": "query", "schema": CODE},
                       {"name": "depth", "in": "query", "schema": {"type": "integer",
                                                                   "minimum": 0,
                                                                   "maximum": MAX_DEPTH}},
                       {"name": "status", "in": "query",
                        "schema": {"type": "string", "enum": list(DEVICE_STATUSES)}},
                       {"name": "kind", "in": "query",
                        "schema": {"type": "string", "enum": list(DEVICE_KINDS)}}],
        "responses": {**responses(*READ, 422), "200": {
            "description": "GeoJSON FeatureCollection",
            "content": {"application/geo+json": {"schema": {"type": "object",
                                                             "properties": {"type": STR}}}}}}}}}
