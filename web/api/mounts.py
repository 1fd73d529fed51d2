"""Ingest mounts (where encoders push, web/streams/ingest.py) and the dead-air settings of areas.

A mount is created by an admin for an area of its subtree (`POST /api/v1/mounts`): its name
(the path `/ingest/<name>`), title, class and optionally `targets` (areas of its subtree it airs
by itself while an encoder is connected); the answer carries its password once (only a hash is
kept). `GET` lists the mounts of the caller's subtree with their connection state; `DELETE`
removes one (its encoder is cut). A programme of type `ingest` names a mount to air it on a
schedule or now.

`GET/PUT /api/v1/areas/{code}/dead-air`: `{"level_db": -50, "seconds": 10, "enabled": true}`,
the silence level and time under which a live input on the air there counts as dead air
(streamer/deadair.py); `DELETE` returns the area to what it inherits.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from aiohttp import web

from loa.relay.devices.records import new_id, secret_hash
from loa.relay.rtp.push import RtpSpec, RtpSpecError, rtp_spec
from loa.streamer.broadcast import BroadcastClass
from loa.streamer.deadair import DeadAirSettings
from loa.streamer.messages import say
from loa.streamer.state.store import Record
from loa.web.api.schema import (
    CODE,
    CODE_PARAM,
    CODES,
    ID_PARAM,
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
    refuse_unknown,
    scoped_area,
    str_list,
)
from loa.web.node import NODE, Node

routes = web.RouteTableDef()

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def public_mount(rec: Record, node: Node) -> Record:
    out = {k: v for k, v in rec.items() if k != "secret_hash"}
    m = node.ingests.mounts.get(rec["id"])
    out["state"] = m.stats() if m is not None else {"connected": False, "up": False}
    out["path"] = f"/ingest/{rec['name']}"
    return out


async def _mount_in_scope(request: web.Request) -> Record:
    node = request.app[NODE]
    rec = await node.store.get("mount", request.match_info["id"])
    if rec is None or rec["area"] not in node.tree \
            or not node.tree.contains(principal(request).area, rec["area"]):
        raise ApiError(404, say("ingest.unknown_mount", mount=request.match_info["id"][:64]))
    return rec


@routes.post("/api/v1/mounts")
async def mount_create(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    node = request.app[NODE]
    data = await read_json(request)
    refuse_unknown(data, {"name", "area", "title", "class", "targets", "user", "rtp", "sdp"})
    area = scoped_area(p, node.tree, field(data, "area", str, required=False, default=p.area))
    name = field(data, "name", str)
    if not NAME.match(name):
        raise ApiError(422, say("ingest.bad_name"), "name")
    if await node.store.find("mount", name=name):
        raise ApiError(409, say("ingest.name_taken", mount=name), "name")
    title = " ".join(field(data, "title", str, required=False, default=name).split())[:200]
    try:
        klass = BroadcastClass.parse(field(data, "class", str, required=False,
                                           default="normal")).name
    except ValueError as e:
        raise ApiError(422, str(e), "class") from None
    if klass == "emergency" and not p.emergency:
        raise ApiError(403, say("emergency.no_right"), "class")
    targets = str_list(data, "targets", required=False)
    for t in targets:
        scoped_area(p, node.tree, t, "targets")  # 422 unknown, 403 outside the caller
        if not node.tree.contains(area, t):
            raise ApiError(422, say("ingest.target_outside", area=t, own=area), "targets")
    user = field(data, "user", str, required=False, default="source")
    if not NAME.match(user):
        raise ApiError(422, say("ingest.bad_name"), "user")
    password = secrets.token_urlsafe(18)
    rec: Record = {"id": new_id(), "name": name, "area": area, "title": title or name,
                   "class": klass, "targets": targets, "user": user,
                   "secret_hash": secret_hash(password), "owner": p.username,
                   "created": time.time()}
    if data.get("rtp") is not None or data.get("sdp") is not None:
        await _rtp(node, rec, data)
    try:
        await node.store.create("mount", rec)
    except BaseException:
        node.ingests.forget(rec["id"])
        raise
    await audit(request, "mount.create", rec["id"], name=name, area=area, klass=klass,
                targets=targets)
    return ok({**public_mount(rec, node), "password": password}, 201)


async def _rtp(node: Node, rec: Record, data: dict[str, Any]) -> None:
    """An RTP push mount: its port (or the encoder's SDP) checked and opened before it is
    stored, so a mount never names a port it cannot listen on."""
    if data.get("sdp") is not None:
        rec["sdp"] = field(data, "sdp", str)
    if data.get("rtp") is not None:
        rec["rtp"] = field(data, "rtp", dict)
    try:
        spec = rtp_spec(rec)
    except RtpSpecError as e:
        raise ApiError(422, str(e), e.field) from None
    if spec is None:  # an empty object or SDP
        raise ApiError(422, say("ingest.rtp_codec"), "rtp")
    taken = [m for m in await node.store.find("mount")
             if (s := _spec_or_none(m)) is not None and s.port == spec.port]
    if taken:
        raise ApiError(409, say("ingest.rtp_port_taken", port=spec.port), "rtp")
    try:
        await node.ingests.listen_rtp(rec)
    except OSError as e:
        raise ApiError(409, say("ingest.rtp_port_taken", port=spec.port) + f" ({e.strerror})",
                       "rtp") from None


def _spec_or_none(rec: Record) -> RtpSpec | None:
    try:
        return rtp_spec(rec)
    except RtpSpecError:
        return None


@routes.get("/api/v1/mounts")
async def mount_list(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("read")
    node = request.app[NODE]
    mine = [r for r in await node.store.find("mount")
            if p.inside(node.tree, r["area"])]
    mine.sort(key=lambda r: r["name"])
    return ok({"mounts": [public_mount(r, node) for r in mine]})


@routes.get("/api/v1/mounts/{id}")
async def mount_get(request: web.Request) -> web.Response:
    principal(request).require("read")
    return ok(public_mount(await _mount_in_scope(request), request.app[NODE]))


@routes.delete("/api/v1/mounts/{id}")
async def mount_delete(request: web.Request) -> web.Response:
    principal(request).require("admin")
    node = request.app[NODE]
    rec = await _mount_in_scope(request)
    await node.store.delete("mount", rec["id"])
    node.ingests.forget(rec["id"])
    await audit(request, "mount.delete", rec["id"], name=rec["name"])
    return web.Response(status=204)


# ---- dead air per area --------------------------------------------------------------------------
def _dead_air_out(node: Node, code: str) -> Record:
    s = node.dead_air.settings_for(code)
    own = code in node.dead_air.areas
    return {"area": code, "level_db": s.level_db, "seconds": s.seconds, "enabled": s.enabled,
            "inherited": not own}


@routes.get("/api/v1/areas/{code}/dead-air")
async def dead_air_get(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("read")
    node = request.app[NODE]
    code = scoped_area(p, node.tree, request.match_info["code"], None, missing=404)
    return ok(_dead_air_out(node, code))


@routes.put("/api/v1/areas/{code}/dead-air")
async def dead_air_put(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("air")
    node = request.app[NODE]
    code = scoped_area(p, node.tree, request.match_info["code"], None, missing=404)
    data = await read_json(request)
    refuse_unknown(data, {"level_db", "seconds", "enabled"})
    base = node.dead_air.settings_for(code)
    s = DeadAirSettings(
        level_db=field(data, "level_db", float, required=False, default=base.level_db),
        seconds=field(data, "seconds", float, required=False, default=base.seconds),
        enabled=field(data, "enabled", bool, required=False, default=base.enabled))
    bad = s.check()
    if bad is not None:
        raise ApiError(422, bad[1], bad[0])
    await node.store.put("dead_air", {"id": code, "level_db": s.level_db, "seconds": s.seconds,
                                      "enabled": s.enabled})
    node.dead_air.areas[code] = s
    await audit(request, "dead_air.update", code, level_db=s.level_db, seconds=s.seconds,
                enabled=s.enabled)
    return ok(_dead_air_out(node, code))


@routes.delete("/api/v1/areas/{code}/dead-air")
async def dead_air_delete(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("air")
    node = request.app[NODE]
    code = scoped_area(p, node.tree, request.match_info["code"], None, missing=404)
    await node.store.delete("dead_air", code)
    node.dead_air.areas.pop(code, None)
    await audit(request, "dead_air.reset", code)
    return ok(_dead_air_out(node, code))


def openapi_paths() -> dict[str, Any]:
    secured: dict[str, Any] = {"security": [{"bearer": []}]}
    dead_air = obj({"level_db": {"type": "number", "minimum": -90, "maximum": -10},
                    "seconds": {"type": "number", "minimum": 2, "maximum": 3600},
                    "enabled": {"type": "boolean"}})
    return {
        "/api/v1/mounts": {
            "get": {"summary": say("openapi.mounts"), **secured, "responses": responses(*READ)},
            "post": {"summary": say("openapi.mount_create"), **secured,
                     "requestBody": body(obj({
                         "name": {"type": "string", "pattern": NAME.pattern}, "area": CODE,
                         "title": STR, "class": {"type": "string", "enum": CODES},
                         "targets": {**TARGETS, "minItems": 0}, "user": STR,
                         "sdp": STR, "rtp": obj({
                             "port": {"type": "integer", "minimum": 1024, "maximum": 65535},
                             "codec": {"type": "string", "enum": ["opus", "pcmu", "l16"]},
                             "payload_type": {"type": "integer", "minimum": 0, "maximum": 127},
                             "rate": {"type": "integer", "minimum": 8000, "maximum": 48000},
                             "channels": {"type": "integer", "minimum": 1, "maximum": 2},
                             "source": STR})}, ["name"])),
                     "responses": responses(201, 409, *WRITE)},
        },
        "/api/v1/mounts/{id}": {
            "parameters": [ID_PARAM],
            "get": {"summary": say("openapi.mount"), **secured,
                    "responses": responses(*READ, 404)},
            "delete": {"summary": say("openapi.mount_delete"), **secured,
                       "responses": responses(204, 401, 403, 404)},
        },
        "/api/v1/areas/{code}/dead-air": {
            "parameters": [CODE_PARAM],
            "get": {"summary": say("openapi.dead_air"), **secured,
                    "responses": responses(*READ, 404)},
            "put": {"summary": say("openapi.dead_air_set"), **secured,
                    "requestBody": body(dead_air), "responses": responses(200, 404, *WRITE)},
            "delete": {"summary": say("openapi.dead_air_reset"), **secured,
                       "responses": responses(200, 401, 403, 404)},
        },
    }


def setup(app: web.Application) -> None:
    app.add_routes(routes)
