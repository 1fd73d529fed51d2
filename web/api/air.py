"""Programmes (with the editorial check), schedules and broadcasts over HTTP."""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web

from loa.relay.urlpolicy import RELAY_SCHEMES, UrlRefused, check_url
from loa.streamer.broadcast import BroadcastClass, Policy
from loa.streamer.schedule import ScheduleError, find_conflicts, validate_schedule
from loa.streamer.state.store import Record
from loa.streamer.station import MAX_GAP, MAX_REPEAT, ContentError
from loa.web.api.core import node_of
from loa.web.auth import Principal
from loa.web.http import (
    ApiError,
    audit,
    field,
    ok,
    principal,
    read_json,
    reference,
    str_list,
)

routes = web.RouteTableDef()

PROGRAMME_TYPES = ("file", "playlist", "tts", "relay", "live")


def _class(data: dict[str, Any], p: Principal) -> str:
    value = field(data, "class", str, required=False, default="normal")
    try:
        cls = BroadcastClass.parse(value)
    except ValueError as e:
        raise ApiError(422, str(e), "class") from None
    if cls is BroadcastClass.emergency and not p.emergency:
        raise ApiError(403, "bạn không có quyền phát khẩn cấp / "
                            "you do not hold the emergency right")
    return cls.name


def _targets(request: web.Request, data: dict[str, Any]) -> list[str]:
    p = principal(request)
    tree = node_of(request).tree
    targets = str_list(data, "targets")
    for t in targets:
        if t not in tree:
            raise ApiError(422, f"không có khu vực / unknown area {t}", "targets")
        p.require_area(tree, t)
    return targets


# ---- programmes ----------------------------------------------------------------------------
async def _programme_fields(request: web.Request, data: dict[str, Any],
                            base: Record | None = None) -> Record:
    node = node_of(request)
    merged = {**(base or {}), **{k: v for k, v in data.items() if v is not None}}
    title = field(merged, "title", str)
    if not title.strip() or len(title) > 200:
        raise ApiError(422, "tiêu đề 1-200 ký tự / title must be 1-200 characters", "title")
    kind = field(merged, "type", str)
    if kind not in PROGRAMME_TYPES:
        raise ApiError(422, f"loại không hợp lệ / type must be one of {', '.join(PROGRAMME_TYPES)}",
                       "type")
    volume = field(merged, "volume", int, required=False, default=100)
    if not 0 <= volume <= 150:
        raise ApiError(422, "âm lượng 0-150 / volume must be within 0-150", "volume")
    repeat = field(merged, "repeat", int, required=False, default=1)
    if not 1 <= repeat <= MAX_REPEAT:
        raise ApiError(422, f"số lần lặp 1-{MAX_REPEAT} / repeat must be within 1-{MAX_REPEAT}",
                       "repeat")
    gap = field(merged, "gap", float, required=False, default=0.0)
    if not 0 <= gap <= MAX_GAP:
        raise ApiError(422, "khoảng nghỉ 0-7200 giây / gap must be within 0-7200 s", "gap")
    out: Record = {"title": title.strip(), "type": kind, "volume": volume, "repeat": repeat,
                   "gap": gap}
    if kind == "file":
        out["media"] = field(merged, "media", str)
        ids = [out["media"]]
    elif kind == "playlist":
        out["items"] = str_list(merged, "items")
        ids = out["items"]
    else:
        ids = []
    seconds = 0.0
    for mid in ids:
        m = await reference(request, node.tree, "media", mid,
                            "media" if kind == "file" else "items")
        seconds += float(m.get("duration", 0))
    out["duration"] = seconds or None  # one play; tts/relay/live: known when it airs
    if kind == "tts":
        text = field(merged, "text", str)
        if not text.strip() or len(text) > 5000:
            raise ApiError(422, "văn bản 1-5000 ký tự / text must be 1-5000 characters", "text")
        out["text"] = text
    if kind == "relay":
        url = field(merged, "url", str)
        if len(url) > 2000:
            raise ApiError(422, "địa chỉ tiếp sóng quá dài / url longer than 2000", "url")
        try:
            await check_url(url, RELAY_SCHEMES, node.cfg.fetch)
        except UrlRefused as e:
            raise ApiError(422, str(e), "url") from None
        out["url"] = url
    return out


@routes.post("/api/v1/programmes")
async def programme_create(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("edit")
    node = node_of(request)
    data = await read_json(request)
    area = field(data, "area", str, required=False, default=p.area)
    if area not in node.tree:
        raise ApiError(422, f"không có khu vực / unknown area {area}", "area")
    p.require_area(node.tree, area)
    rec = await _programme_fields(request, data)
    rec.update({"id": uuid.uuid4().hex[:12], "area": area, "owner": p.username,
                "status": "draft", "created": time.time()})
    await node.store.create("programme", rec)
    await audit(request, "programme.create", rec["id"], title=rec["title"])
    return ok(rec, 201)


async def _programme(request: web.Request) -> Record:
    p = principal(request)
    node = node_of(request)
    prog = await node.store.get("programme", request.match_info["id"])
    if prog is None or not p.related(node.tree, prog["area"]):
        raise ApiError(404, "không có chương trình / unknown programme")
    return prog


@routes.get("/api/v1/programmes")
async def programme_list(request: web.Request) -> web.Response:
    p = principal(request)
    node = node_of(request)
    status = request.query.get("status")
    items = await node.store.find("programme", status=status) if status else \
        await node.store.find("programme")
    return ok({"programmes": [x for x in items if p.related(node.tree, x["area"])]})


@routes.get("/api/v1/programmes/{id}")
async def programme_get(request: web.Request) -> web.Response:
    return ok(await _programme(request))


@routes.patch("/api/v1/programmes/{id}")
async def programme_update(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("edit")
    node = node_of(request)
    prog = await _programme(request)
    p.require_area(node.tree, prog["area"])
    data = await read_json(request)
    changes = await _programme_fields(request, data, prog)
    changes["status"] = "draft"  # an edited programme needs a new editorial check
    changes["reason"] = None
    prog = await node.store.update("programme", prog["id"], changes)
    await audit(request, "programme.update", prog["id"])
    return ok(prog)


async def _transition(request: web.Request, action: str) -> web.Response:
    p = principal(request)
    node = node_of(request)
    prog = await _programme(request)
    p.require_area(node.tree, prog["area"])
    changes: Record
    if action == "submit":
        p.require("edit")
        if prog["status"] not in ("draft", "rejected"):
            raise ApiError(409, f"không thể gửi duyệt ở trạng thái {prog['status']} / "
                                f"cannot submit a {prog['status']} programme")
        changes = {"status": "pending", "submitted_by": p.username, "reason": None}
    else:
        p.require("approve")
        if prog["status"] != "pending":
            raise ApiError(409, f"chỉ duyệt chương trình chờ duyệt / only pending programmes "
                                f"can be {action}d (this one is {prog['status']})")
        if action == "approve":
            changes = {"status": "approved", "approved_by": p.username,
                       "approved_at": time.time()}
        else:
            data = await read_json(request)
            reason = field(data, "reason", str)
            if not reason.strip():
                raise ApiError(422, "cần lý do từ chối / a reason is required", "reason")
            changes = {"status": "rejected", "reason": reason.strip(), "rejected_by": p.username}
    prog = await node.store.update("programme", prog["id"], changes)
    await audit(request, f"programme.{action}", prog["id"], reason=changes.get("reason"))
    return ok(prog)


@routes.post("/api/v1/programmes/{id}/submit")
async def programme_submit(request: web.Request) -> web.Response:
    return await _transition(request, "submit")


@routes.post("/api/v1/programmes/{id}/approve")
async def programme_approve(request: web.Request) -> web.Response:
    return await _transition(request, "approve")


@routes.post("/api/v1/programmes/{id}/reject")
async def programme_reject(request: web.Request) -> web.Response:
    return await _transition(request, "reject")


# ---- schedules -----------------------------------------------------------------------------
@routes.post("/api/v1/schedules")
async def schedule_create(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("air")
    node = node_of(request)
    data = await read_json(request)
    targets = _targets(request, data)
    cls = _class(data, p)
    pid = field(data, "programme", str)
    prog = await reference(request, node.tree, "programme", pid, "programme")
    if prog.get("status") != "approved" and not p.can("direct"):
        raise ApiError(409, "chương trình chưa được duyệt / programme is not approved",
                       "programme")
    rec: Record = {k: data.get(k) for k in ("kind", "time", "date", "weekdays", "from", "until",
                                            "tz", "enabled") if k in data}
    rec.update({"id": uuid.uuid4().hex[:12], "programme": pid, "targets": targets,
                "class": cls, "area": p.area, "owner": p.username, "created": time.time()})
    try:
        rec = validate_schedule(rec)
    except ScheduleError as e:
        raise ApiError(422, str(e), e.field) from None
    existing = await node.store.find("schedule")
    durations: dict[str, float] = {}
    for s in existing + [rec]:
        other = await node.store.get("programme", s["programme"])
        durations[s["programme"]] = _programme_seconds(other)
    conflicts = find_conflicts(rec, existing, durations,
                               covers=lambda a, b: a in node.tree and b in node.tree and (
                                   node.tree.contains(a, b) or node.tree.contains(b, a)))
    await node.store.create("schedule", rec)
    await audit(request, "schedule.create", rec["id"], programme=pid)
    return ok({**rec, "conflicts": conflicts}, 201)


def _programme_seconds(prog: Record | None) -> float:
    """Airtime for conflict checks; a programme whose length is known only on air counts 60 s."""
    if prog is None:
        return 0.0
    repeat = int(prog.get("repeat", 1))
    return float(prog.get("duration") or 60.0) * repeat + float(prog.get("gap", 0)) * (repeat - 1)


@routes.get("/api/v1/schedules")
async def schedule_list(request: web.Request) -> web.Response:
    p = principal(request)
    tree = node_of(request).tree
    items = await node_of(request).store.find("schedule")
    return ok({"schedules": [s for s in items if s["area"] in tree
                             and tree.contains(p.area, s["area"])]})


@routes.delete("/api/v1/schedules/{id}")
async def schedule_delete(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("air")
    node = node_of(request)
    s = await node.store.get("schedule", request.match_info["id"])
    if s is None or s["area"] not in node.tree or not node.tree.contains(p.area, s["area"]):
        raise ApiError(404, "không có lịch / unknown schedule")
    await node.store.delete("schedule", s["id"])
    await audit(request, "schedule.delete", s["id"])
    return web.Response(status=204)


# ---- broadcasts ----------------------------------------------------------------------------
@routes.post("/api/v1/broadcasts")
async def broadcast_start(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("air")
    node = node_of(request)
    data = await read_json(request)
    targets = _targets(request, data)
    cls = _class(data, p)
    policy = field(data, "policy", str, required=False, default="resume")
    if policy not in {x.value for x in Policy}:
        raise ApiError(422, "policy: resume | skip | overlay", "policy")
    spec = {k: data[k] for k in ("media", "programme", "text") if data.get(k) is not None}
    for k, v in spec.items():
        if not isinstance(v, str):
            raise ApiError(422, f"sai kiểu dữ liệu / {k} must be a string", k)
        if k != "text" and len(spec) == 1:  # more than one: the station names the mistake
            await reference(request, node.tree, k, v, k, missing=404)
    if "programme" not in spec and not p.can("direct") and cls != "emergency":
        raise ApiError(403, "chỉ phát được chương trình đã duyệt / you may only air approved "
                            "programmes")
    try:
        content = await node.station.content(
            spec, area=p.area, owner=p.username,
            require_approved=not p.can("direct") and cls != "emergency")
    except ContentError as e:
        raise ApiError(e.status, str(e), e.field) from None
    rec = await node.station.air(content, targets=targets, klass=cls, issuer=p.area,
                                 user=p.username, policy=policy, spec=spec)
    await audit(request, "broadcast.start", rec["id"], targets=targets, **{"class": cls})
    return ok(rec, 201)


@routes.get("/api/v1/broadcasts")
async def broadcast_list(request: web.Request) -> web.Response:
    p = principal(request)
    node = node_of(request)
    areas = []
    for code in node.tree.subtree(p.area):
        areas.append(node.engine.on_air(code))
    live = [r for r in await node.store.find("broadcast", status="on-air")
            if any(p.related(node.tree, t) for t in r["targets"])]
    return ok({"areas": areas, "broadcasts": live})


@routes.delete("/api/v1/broadcasts/{id}")
async def broadcast_stop(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("air")
    node = node_of(request)
    bid = request.match_info["id"]
    rec = await node.store.get("broadcast", bid)
    if rec is None or rec.get("status") != "on-air" or node.engine.live_broadcast(bid) is None:
        raise ApiError(404, "không có phát thanh đang phát / no such broadcast on air")
    if rec["class"] == "emergency" and not p.emergency:
        raise ApiError(403, "cần quyền khẩn cấp để dừng / stopping an emergency needs the "
                            "emergency right")
    node.station.stop(bid, by_area=p.area)  # AuthorityError -> 403 below the issuer
    await audit(request, "broadcast.stop", bid)
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    app.add_routes(routes)
