"""Programmes (with the editorial check), schedules and broadcasts over HTTP."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from loa.relay.urlpolicy import RELAY_SCHEMES, check_url
from loa.streamer import programmes
from loa.streamer.areas import AreaTree
from loa.streamer.broadcast import BroadcastClass, Policy
from loa.streamer.messages import say
from loa.streamer.schedule import (
    DEFAULT_TZ,
    WEEKDAYS,
    ScheduleError,
    find_conflicts,
    occurrences,
    validate_schedule,
)
from loa.streamer.state.store import Record
from loa.streamer.station import ContentError
from loa.web.api import delivery
from loa.web.api.core import node_of
from loa.web.auth import Principal
from loa.web.events import hub_of
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
    status_of,
    str_list,
)
from loa.web.node import Node

routes = web.RouteTableDef()
ZONE = ZoneInfo(DEFAULT_TZ)  # the calendar's days are the province's days


@contextlib.contextmanager
def rule_errors() -> Iterator[None]:
    """A programme or content rule that refuses becomes the status of its kind, same text."""
    try:
        yield
    except ContentError as e:  # programmes.ProgrammeError included
        raise ApiError(status_of(e), str(e), e.field) from None


def _class(data: dict[str, Any], p: Principal) -> str:
    value = field(data, "class", str, required=False, default="normal")
    try:
        cls = BroadcastClass.parse(value)
    except ValueError as e:
        raise ApiError(422, str(e), "class") from None
    if cls is BroadcastClass.emergency and not p.emergency:
        raise ApiError(403, say("emergency.no_right"))
    return cls.name


def _targets(request: web.Request, data: dict[str, Any]) -> list[str]:
    p = principal(request)
    tree = node_of(request).tree
    targets = str_list(data, "targets")
    for t in targets:
        scoped_area(p, tree, t, "targets")
    return targets


# ---- programmes ----------------------------------------------------------------------------
class _Body:
    """The programme rules' typed reads of a JSON body: 422 naming the field."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def value(self, name: str, kind: type, *, required: bool = True, default: Any = None) -> Any:
        return field(self.data, name, kind, required=required, default=default)

    def strings(self, name: str) -> list[str]:
        return str_list(self.data, name)


async def _programme_fields(request: web.Request, data: dict[str, Any],
                            base: Record | None = None) -> Record:
    node = node_of(request)
    merged = {**(base or {}), **{k: v for k, v in data.items() if v is not None}}

    async def media(mid: str, name: str) -> Record:
        return await reference(request, node.tree, "media", mid, name)

    async def relay_url(url: str) -> None:
        await check_url(url, RELAY_SCHEMES, node.cfg.fetch)  # UrlRefused is a ValueError

    async def mount(mid: str) -> Record:
        return await reference(request, node.tree, "mount", mid, "mount")

    with rule_errors():
        return await programmes.programme_fields(_Body(merged), media, relay_url, mount)


@routes.post("/api/v1/programmes")
async def programme_create(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("edit")
    node = node_of(request)
    data = await read_json(request)
    area = field(data, "area", str, required=False, default=p.area)
    scoped_area(p, node.tree, area)
    rec = programmes.new_programme(await _programme_fields(request, data), area, p.username)
    await node.store.create("programme", rec)
    await audit(request, "programme.create", rec["id"], title=rec["title"])
    _programme_event(request, rec)
    return ok(rec, 201)


async def _programme(request: web.Request) -> Record:
    p = principal(request)
    node = node_of(request)
    prog = await node.store.get("programme", request.match_info["id"])
    if prog is None or not p.related(node.tree, prog["area"]):
        raise ApiError(404, say("programme.unknown"))
    return prog


@routes.get("/api/v1/programmes")
async def programme_list(request: web.Request) -> web.Response:
    p = principal(request)
    node = node_of(request)
    status = request.query.get("status")
    items = await node.store.find("programme", status=status) if status else \
        await node.store.find("programme")
    # ?under=CODE: that area's subtree only (an approver's queue: what they may decide on)
    under = request.query.get("under")
    if under is not None:
        scoped_area(p, node.tree, under, "under")
    return ok({"programmes": [x for x in items if p.related(node.tree, x["area"]) and (
        under is None or node.tree.contains(under, x["area"]))]})


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
    changes = programmes.edited(await _programme_fields(request, data, prog))
    prog = await node.store.update("programme", prog["id"], changes)
    await audit(request, "programme.update", prog["id"])
    _programme_event(request, prog)
    return ok(prog)


async def _transition(request: web.Request, action: str) -> web.Response:
    p = principal(request)
    node = node_of(request)
    prog = await _programme(request)
    p.require_area(node.tree, prog["area"])
    changes: Record
    p.require("edit" if action == "submit" else "approve")
    with rule_errors():
        if action == "submit":
            changes = programmes.submission(prog, p.username)
        elif action == "approve":
            changes = programmes.approval(prog, p.username)
        else:
            programmes.check_reviewable(prog, action)  # before reading the reason
            reason = field(await read_json(request), "reason", str)
            changes = programmes.rejection(prog, p.username, reason)
    prog = await node.store.update("programme", prog["id"], changes)
    await audit(request, f"programme.{action}", prog["id"], reason=changes.get("reason"))
    _programme_event(request, prog)
    return ok(prog)


def _programme_event(request: web.Request, prog: Record) -> None:
    """The console's live view (web/events.py) hears of every programme change."""
    hub_of(request).publish("programme", {"id": prog["id"], "area": prog["area"],
                                          "title": prog.get("title"),
                                          "status": prog.get("status")}, [prog["area"]])


def _schedule_event(request: web.Request, rec: Record, action: str) -> None:
    hub_of(request).publish("schedule", {"id": rec["id"], "area": rec["area"],
                                         "action": action}, [rec["area"]])


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
def _covers(tree: AreaTree) -> Callable[[str, str], bool]:
    """Two areas share loudspeakers when one contains the other."""
    return lambda a, b: a in tree and b in tree and (tree.contains(a, b) or tree.contains(b, a))


async def _titles(node: Node, schedules: Iterable[Record]) -> dict[str, str | None]:
    """Programme id -> title, each programme read once."""
    out: dict[str, str | None] = {}
    for s in schedules:
        pid = s.get("programme")
        if isinstance(pid, str) and pid not in out:
            out[pid] = (await node.store.get("programme", pid) or {}).get("title")
    return out


async def _conflicts(request: web.Request, rec: Record) -> list[dict[str, Any]]:
    """find_conflicts with what the console shows of each: the other schedule's title and the
    area that made it (only when that area concerns the caller)."""
    p = principal(request)
    node = node_of(request)
    existing = await node.store.find("schedule")
    durations = await programmes.airtimes(node.store, existing + [rec])
    found = find_conflicts(rec, existing, durations, covers=_covers(node.tree))
    by_id = {s["id"]: s for s in existing}
    titles = await _titles(node, [by_id[c["schedule"]] for c in found])
    for c in found:
        other = by_id[c["schedule"]]
        if p.related(node.tree, other["area"]):
            c.update(title=titles.get(other["programme"]), area=other["area"],
                     area_name=node.tree.get(other["area"]).name)
    return found


@routes.post("/api/v1/schedules")
async def schedule_create(request: web.Request) -> web.Response:
    """Stores a schedule and reports its conflicts; with ?dry_run=1 only checks it (same
    answers, nothing stored): the console shows the conflicts before the operator saves."""
    p = principal(request)
    p.require("air")
    node = node_of(request)
    data = await read_json(request)
    targets = _targets(request, data)
    cls = _class(data, p)
    pid = field(data, "programme", str)
    prog = await reference(request, node.tree, "programme", pid, "programme")
    with rule_errors():
        programmes.check_schedulable(prog, direct=p.can("direct"))
    rec: Record = {k: data.get(k) for k in ("kind", "time", "date", "weekdays", "from", "until",
                                            "tz", "enabled") if k in data}
    rec.update({"programme": pid, "targets": targets, "class": cls, "area": p.area})
    rec, conflicts = await checked_schedule(request, rec)
    if request.query.get("dry_run") in ("1", "true"):
        return ok({**rec, "conflicts": conflicts, "stored": False})
    await store_schedule(request, rec)
    return ok({**rec, "conflicts": conflicts}, 201)


async def checked_schedule(request: web.Request, fields: Record
                           ) -> tuple[Record, list[dict[str, Any]]]:
    """A new schedule of the caller (validated, 422 naming the field) and its conflicts."""
    rec = {**fields, "id": uuid.uuid4().hex[:12], "owner": principal(request).username,
           "created": time.time()}
    try:
        rec = validate_schedule(rec)
    except ScheduleError as e:
        raise ApiError(422, str(e), e.field) from None
    return rec, await _conflicts(request, rec)


async def store_schedule(request: web.Request, rec: Record) -> None:
    await node_of(request).store.create("schedule", rec)
    await audit(request, "schedule.create", rec["id"], programme=rec["programme"])
    _schedule_event(request, rec, "created")


@routes.get("/api/v1/schedules")
async def schedule_list(request: web.Request) -> web.Response:
    p = principal(request)
    tree = node_of(request).tree
    items = await node_of(request).store.find("schedule")
    return ok({"schedules": [s for s in items if s["area"] in tree
                             and tree.contains(p.area, s["area"])]})


CALENDAR_DAYS = 31


def _calendar_range(request: web.Request) -> tuple[dt.date, int]:
    raw = request.query.get("from")
    try:
        first = dt.date.fromisoformat(raw) if raw else dt.datetime.now(ZONE).date()
    except ValueError:
        raise ApiError(422, say("schedule.date", field="from", value=raw), "from") from None
    days = request.query.get("days", "7")
    if not days.isdigit() or not 1 <= int(days) <= CALENDAR_DAYS:
        raise ApiError(422, say("schedule.calendar_days", limit=CALENDAR_DAYS), "days")
    return first, int(days)


@routes.get("/api/v1/schedules/calendar")
async def schedule_calendar(request: web.Request) -> web.Response:
    """What airs in an area day by day (Asia/Ho_Chi_Minh): its own and its subtree's schedules
    and those of the levels above that cover it; `mine` says whether the caller may change one
    (a higher level's is read-only for it)."""
    p = principal(request)
    p.require("read")
    node = node_of(request)
    tree = node.tree
    area = scoped_area(p, tree, request.query.get("area") or p.area)
    first, count = _calendar_range(request)
    days = [first + dt.timedelta(days=i) for i in range(count)]
    start = dt.datetime.combine(first, dt.time(), tzinfo=ZONE).timestamp()
    end = dt.datetime.combine(days[-1] + dt.timedelta(days=1), dt.time(), tzinfo=ZONE).timestamp()
    covers = _covers(tree)
    found: list[tuple[float, Record]] = []
    for s in await node.store.find("schedule"):
        if not p.related(tree, s.get("area")) or not any(
                covers(t, area) for t in s.get("targets") or [] if isinstance(t, str)):
            continue
        try:
            found.extend((at, s) for at in occurrences(s, start, end))
        except ScheduleError:
            continue  # the scheduler logs it; the calendar shows what will air
    found.sort(key=lambda x: x[0])
    titles = await _titles(node, [s for _, s in found])
    may_air = p.can("air")
    by_day: dict[str, list[Record]] = {d.isoformat(): [] for d in days}
    for at, s in found:
        day = dt.datetime.fromtimestamp(at, ZONE).date().isoformat()
        by_day[day].append({
            "schedule": s["id"], "at": at, "programme": s["programme"],
            "title": titles.get(s["programme"]), "kind": s["kind"], "class": s["class"],
            "enabled": s.get("enabled", True), "targets": s["targets"],
            "area": s["area"], "area_name": tree.get(s["area"]).name,
            "mine": may_air and tree.contains(p.area, s["area"])})
    return ok({"area": area, "area_name": tree.get(area).name,
               "days": [{"date": d.isoformat(), "weekday": WEEKDAYS[d.weekday()],
                         "items": by_day[d.isoformat()]} for d in days]})


async def _changeable_schedule(request: web.Request) -> Record:
    """The schedule of the path, for a change: unknown or of another branch is 404; one a
    higher level made for the caller's areas (which it may read) is 403."""
    p = principal(request)
    p.require("air")
    node = node_of(request)
    s = await node.store.get("schedule", request.match_info["id"])
    if s is None or not p.related(node.tree, s.get("area")) or not any(
            p.related(node.tree, t) for t in s.get("targets") or []):
        raise ApiError(404, say("schedule.unknown"))
    if not node.tree.contains(p.area, s["area"]):
        raise ApiError(403, say("schedule.above", area=node.tree.get(s["area"]).name))
    return s


@routes.patch("/api/v1/schedules/{id}")
async def schedule_update(request: web.Request) -> web.Response:
    """Turns a schedule off (and on again) without losing it."""
    s = await _changeable_schedule(request)
    data = await read_json(request)
    refuse_unknown(data, {"enabled"})
    enabled = field(data, "enabled", bool)
    s = await node_of(request).store.update("schedule", s["id"], {"enabled": enabled})
    await audit(request, "schedule.update", s["id"], enabled=enabled)
    _schedule_event(request, s, "changed")
    return ok(s)


@routes.delete("/api/v1/schedules/{id}")
async def schedule_delete(request: web.Request) -> web.Response:
    s = await _changeable_schedule(request)
    await node_of(request).store.delete("schedule", s["id"])
    await audit(request, "schedule.delete", s["id"])
    _schedule_event(request, s, "deleted")
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
            raise ApiError(422, say("broadcast.not_string", field=k), k)
        if k != "text" and len(spec) == 1:  # more than one: the station names the mistake
            await reference(request, node.tree, k, v, k, missing=404)
    if "programme" not in spec and not p.can("direct") and cls != "emergency":
        raise ApiError(403, say("broadcast.approved_only"))
    with rule_errors():
        content = await node.station.content(
            spec, area=p.area, owner=p.username,
            require_approved=not p.can("direct") and cls != "emergency")
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
    # Authority is the issuer's level in this node's tree (what its arbiter ranks by).
    live = [{**r, "authority": node.tree.depth(r["issuer"]) if r["issuer"] in node.tree else None}
            for r in await node.store.find("broadcast", status="on-air")
            if any(p.related(node.tree, t) for t in r["targets"])]
    return ok({"areas": areas, "broadcasts": live})


@routes.get("/api/v1/broadcasts/{id}")
async def broadcast_get(request: web.Request) -> web.Response:
    """One broadcast (on air or ended) of the caller's concern, with its proof of delivery."""
    p = principal(request)
    p.require("read")
    node = node_of(request)
    rec = await node.store.get("broadcast", request.match_info["id"])
    if rec is None or not delivery.concerns(node, p, rec):
        raise ApiError(404, say("broadcast.unknown"))
    return ok({**rec, "delivery": await delivery.summary(node, p, rec)})


@routes.delete("/api/v1/broadcasts/{id}")
async def broadcast_stop(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("air")
    node = node_of(request)
    bid = request.match_info["id"]
    rec = await node.store.get("broadcast", bid)
    if rec is None or rec.get("status") != "on-air" or node.engine.live_broadcast(bid) is None:
        raise ApiError(404, say("broadcast.not_on_air"))
    if rec["class"] == "emergency" and not p.emergency:
        raise ApiError(403, say("broadcast.stop_right"))
    node.station.stop(bid, by_area=p.area)  # AuthorityError -> 403 below the issuer
    await audit(request, "broadcast.stop", bid)
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    app.add_routes(routes)
