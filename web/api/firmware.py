"""OTA firmware over HTTP: images (admins upload, signed), rollouts, and the devices' download.

The download (`GET /api/v1/firmware/download?image=ID`) is a device's, not a person's: it
authenticates with `Authorization: Device <id>:<key>` and serves `Range` requests, so a download
cut on a 4G link resumes where it stopped. The rest is scoped like every route: images of the
caller's subtree or above it (shared down), rollouts of its subtree. relay/devices/ota.py is the
logic.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from loa.relay.devices.ota import IMAGE_PATH, Ota, OtaError
from loa.relay.devices.protocol import ProtocolError, split_firmware, valid_version
from loa.relay.devices.records import same_hash
from loa.streamer.messages import say
from loa.streamer.state.store import Record
from loa.web.api.media import disk_full_is_507, read_form
from loa.web.api.schema import CODE, ID_PARAM, READ, STR, WRITE, body, obj, responses
from loa.web.http import (
    PUBLIC,
    ApiError,
    audit,
    field,
    ok,
    principal,
    read_json,
    refuse_unknown,
    scoped_area,
)
from loa.web.node import NODE

routes = web.RouteTableDef()
DOWNLOAD_FAILURES_PER_IP = 20  # refused device credentials per address per 5 minutes
MAX_CANARY = 1000


def _ota(request: web.Request) -> Ota:
    return request.app[NODE].ota


def _checked(name: str, v: Any) -> str:
    try:
        return valid_version(v, name)
    except ProtocolError as e:
        raise ApiError(422, str(e), name) from None


def _refusal(e: OtaError) -> ApiError:
    return ApiError(409 if e.kind == "conflict" else 422, str(e), e.field)


# ---- the devices' download (first: a fixed path before /firmware/{id}) -----------------------------
@routes.get(IMAGE_PATH)
async def firmware_download(request: web.Request) -> web.StreamResponse:
    """Public path: the device's own credential authenticates it; Range requests resume."""
    node = request.app[NODE]
    header = request.headers.get("Authorization", "")
    dev_id, _, key = header[7:].partition(":") if header.startswith("Device ") else ("", "", "")
    dev = node.devices.get(dev_id.strip()) if dev_id else None
    if dev is None or dev.record.get("revoked") or not same_hash(dev.record.get("key_hash"),
                                                                  key.strip()):
        if await node.store.hit(f"firmware:ip:{request.remote}", 300.0) \
                > DOWNLOAD_FAILURES_PER_IP:
            raise ApiError(429, say("device.too_many_attempts"), headers={"Retry-After": "300"})
        raise ApiError(401, say("device.unknown_or_wrong_key"))
    rec = await node.store.get("firmware", request.query.get("image", ""))
    if rec is None or split_firmware(dev.record.get("firmware"))[0] != rec["model"]:
        raise ApiError(404, say("ota.unknown_image"), "image")
    return web.FileResponse(_ota(request).path_of(rec), chunk_size=64 * 1024,
                            headers={"Content-Type": "application/octet-stream",
                                     "Cache-Control": "no-store"})


# ---- images --------------------------------------------------------------------------------------
@routes.post("/api/v1/firmware")
async def firmware_upload(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    node = request.app[NODE]
    ota = _ota(request)
    if not request.content_type.startswith("multipart/"):
        raise ApiError(415, say("media.multipart_required"))
    with disk_full_is_507():
        form = await read_form(request, ota.temp_path, ota.settings.max_mb * 2**20,
                               ("model", "version", "signature", "area"))
        try:
            model = _checked("model", form.get("model"))
            version = _checked("version", form.get("version"))
            signature = form.get("signature") or ""
            if not signature:
                raise ApiError(422, say("field.missing", name="signature"), "signature")
            area = scoped_area(p, node.tree, form.get("area") or p.area)
        except BaseException:
            await asyncio.to_thread(form["file"].unlink, missing_ok=True)
            raise
        try:
            rec = await ota.add_image(form["file"], model=model, version=version,
                                      signature=signature, area=area, uploader=p.username)
        except OtaError as e:
            raise _refusal(e) from None
    await audit(request, "firmware.upload", rec["id"], model=model, version=version,
                size=rec["size"], sha256=rec["sha256"])
    return ok(rec, 201)


async def _image(request: web.Request, rid: Any, name: str = "id", missing: int = 404
                 ) -> Record:
    """An image the caller may see: of its subtree or above it."""
    node = request.app[NODE]
    rec = await node.store.get("firmware", rid) if isinstance(rid, str) and rid else None
    if rec is None or not principal(request).related(node.tree, rec.get("area")):
        raise ApiError(missing, say("ota.unknown_image"), name)
    return rec


@routes.get("/api/v1/firmware")
async def firmware_list(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("read")
    node = request.app[NODE]
    rows = [r for r in await node.store.find("firmware") if p.related(node.tree, r.get("area"))]
    rows.sort(key=lambda r: r["created"], reverse=True)
    return ok({"firmware": rows})


@routes.get("/api/v1/firmware/{id}")
async def firmware_get(request: web.Request) -> web.Response:
    principal(request).require("read")
    return ok(await _image(request, request.match_info["id"]))


# ---- rollouts ------------------------------------------------------------------------------------
def _int(data: dict[str, Any], name: str, lo: int, hi: int, default: int) -> int:
    v = field(data, name, int, required=False, default=default)
    if not lo <= v <= hi:
        raise ApiError(422, say("ota.out_of_range", name=name, lo=lo, hi=hi), name)
    return int(v)


def _stages(v: Any) -> list[int]:
    if v is None:
        return [25, 100]
    if not isinstance(v, list) or not v or len(v) > 10 or not all(
            isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 100 for x in v) \
            or v != sorted(set(v)) or v[-1] != 100:
        raise ApiError(422, say("ota.bad_stages"), "stages")
    return list(v)


@routes.post("/api/v1/rollouts")
async def rollout_create(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    node = request.app[NODE]
    ota = _ota(request)
    data = await read_json(request)
    refuse_unknown(data, {"firmware", "area", "group", "canary", "stages", "max_failures",
                          "come_back_s"})
    fw = await _image(request, field(data, "firmware", str), "firmware", 422)
    area = scoped_area(p, node.tree, field(data, "area", str))
    group = field(data, "group", str, required=False)
    canary = _int(data, "canary", 1, MAX_CANARY, 3)
    stages = _stages(data.get("stages"))
    max_failures = _int(data, "max_failures", 0, 100_000, 0)
    come_back = field(data, "come_back_s", float, required=False,
                      default=ota.settings.come_back_s)
    if not 10 <= come_back <= 7 * 86400:
        raise ApiError(422, say("ota.out_of_range", name="come_back_s", lo=10, hi=7 * 86400),
                       "come_back_s")
    try:
        r = await ota.create(fw, area=area, group=group, canary=canary, stages=stages,
                             max_failures=max_failures, come_back_s=float(come_back),
                             issuer=p.username)
    except OtaError as e:
        raise _refusal(e) from None
    await audit(request, "rollout.create", r["id"], firmware=fw["id"], model=fw["model"],
                version=fw["version"], area=area, devices=len(r["order"]))
    return ok(ota.summary(r), 201)


async def _rollout(request: web.Request) -> Record:
    node = request.app[NODE]
    rid = request.match_info["id"]
    r = _ota(request).rollouts.get(rid) or await node.store.get("rollout", rid)
    p = principal(request)
    if r is None or not p.inside(node.tree, r["area"]):
        raise ApiError(404, say("ota.unknown_rollout"))
    return r


@routes.get("/api/v1/rollouts")
async def rollout_list(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("read")
    node = request.app[NODE]
    rows = [r for r in await node.store.find("rollout")
            if p.inside(node.tree, r["area"])]
    rows.sort(key=lambda r: r["created"], reverse=True)
    ota = _ota(request)
    return ok({"rollouts": [ota.summary(ota.rollouts.get(r["id"], r)) for r in rows]})


@routes.get("/api/v1/rollouts/{id}")
async def rollout_get(request: web.Request) -> web.Response:
    principal(request).require("read")
    return ok(_ota(request).summary(await _rollout(request)))


@routes.post("/api/v1/rollouts/{id}/halt")
async def rollout_halt(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    r = await _rollout(request)
    if r["state"] != "running":
        raise ApiError(409, say("ota.not_running"), "state")
    await _ota(request).halt(r, say("ota.halted_by", user=p.username))
    await audit(request, "rollout.halt", r["id"])
    return ok(_ota(request).summary(r))


@routes.post("/api/v1/rollouts/{id}/resume")
async def rollout_resume(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    r = await _rollout(request)
    try:
        await _ota(request).resume(r)
    except OtaError as e:
        raise _refusal(e) from None
    await audit(request, "rollout.resume", r["id"])
    return ok(_ota(request).summary(r))


# ---- OpenAPI -------------------------------------------------------------------------------------
def openapi_paths() -> dict[str, Any]:
    secured: dict[str, Any] = {"security": [{"bearer": []}]}
    integer = {"type": "integer"}
    return {
        "/api/v1/firmware": {
            "get": {"summary": say("openapi.firmware"), **secured,
                    "responses": responses(*READ)},
            "post": {"summary": say("openapi.firmware_upload"), **secured,
                     "requestBody": body(obj({"file": {"type": "string", "format": "binary"},
                                              "model": STR, "version": STR, "signature": STR,
                                              "area": CODE},
                                             ["file", "model", "version", "signature"]),
                                         "multipart/form-data"),
                     "responses": responses(201, 409, 413, 507, *WRITE)},
        },
        "/api/v1/firmware/{id}": {
            "parameters": [ID_PARAM],
            "get": {"summary": say("openapi.firmware_item"), **secured,
                    "responses": responses(*READ, 404)},
        },
        IMAGE_PATH: {
            "get": {"summary": say("openapi.firmware_download"), "security": [],
                    "parameters": [{"name": "image", "in": "query", "required": True,
                                    "schema": STR},
                                   {"name": "Range", "in": "header", "schema": STR}],
                    "responses": {"200": {"description": "The image"},
                                  "206": {"description": "The range asked"},
                                  **responses(401, 404, 429)}},
        },
        "/api/v1/rollouts": {
            "get": {"summary": say("openapi.rollouts"), **secured,
                    "responses": responses(*READ)},
            "post": {"summary": say("openapi.rollout_create"), **secured,
                     "requestBody": body(obj({
                         "firmware": STR, "area": CODE, "group": STR, "canary": integer,
                         "stages": {"type": "array", "items": integer},
                         "max_failures": integer, "come_back_s": {"type": "number"}},
                         ["firmware", "area"])),
                     "responses": responses(201, *WRITE)},
        },
        "/api/v1/rollouts/{id}": {
            "parameters": [ID_PARAM],
            "get": {"summary": say("openapi.rollout"), **secured,
                    "responses": responses(*READ, 404)},
        },
        "/api/v1/rollouts/{id}/halt": {
            "parameters": [ID_PARAM],
            "post": {"summary": say("openapi.rollout_halt"), **secured,
                     "responses": responses(200, 401, 403, 404, 409)},
        },
        "/api/v1/rollouts/{id}/resume": {
            "parameters": [ID_PARAM],
            "post": {"summary": say("openapi.rollout_resume"), **secured,
                     "responses": responses(200, 401, 403, 404, 409)},
        },
    }


def setup(app: web.Application) -> None:
    PUBLIC.add(("GET", IMAGE_PATH))  # devices authenticate with their own key
    app.add_routes(routes)
