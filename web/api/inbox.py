"""Bulletins sent down and the commune inbox over HTTP (the rules: streamer/inbox.py).

A province or district sends a bulletin (POST /api/v1/bulletins); each commune it covers reads it
in GET /api/v1/inbox and schedules or declines a normal one, or orders a priority one against its
own; the sender follows the states in GET /api/v1/bulletins/{id}. Every change is audited and
told to `Node.inbox_changed` (the event stream's `inbox`, the exchange's delivery report, the
report up to a parent node). A child node, with its node key, fetches a bulletin's audio
(GET /api/v1/nodes/media) and reports its communes' answers (POST /api/v1/nodes/inbox).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web

from loa.relay.bulletins import MEDIA_PATH, REPORT_PATH, BulletinRefused
from loa.streamer import inbox, programmes
from loa.streamer.engine import OnAirChange
from loa.streamer.messages import say
from loa.streamer.state.store import Record
from loa.web.api.air import checked_schedule, rule_errors, store_schedule
from loa.web.api.core import node_of
from loa.web.api.nodes import _credential
from loa.web.api.schema import ID_PARAM, READ, STR, TARGETS, WRITE, S, body, obj, responses
from loa.web.events import HUB, EventHub
from loa.web.http import (
    PUBLIC,
    ApiError,
    audit,
    field,
    ok,
    principal,
    read_json,
    reference,
    refuse_unknown,
    str_list,
)
from loa.web.node import NODE, Node

log = logging.getLogger("loa.inbox")
routes = web.RouteTableDef()
SCHEDULE_FIELDS = {"kind", "time", "date", "weekdays", "from", "until", "tz"}


def publisher(hub: EventHub) -> Callable[[Record], None]:
    """The `inbox` event: to the commune's users, the levels above it (the sender among them)
    and no other."""
    def publish(entry: Record) -> None:
        hub.publish("inbox", {k: entry.get(k) for k in (
            "id", "bulletin", "area", "from", "class", "title", "state", "order", "reason",
            "node")}, [entry["area"]])
    return publish


@routes.post("/api/v1/bulletins")
async def bulletin_send(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("air")
    node = node_of(request)
    if not node.tree.get(p.area).children:
        raise ApiError(403, say("bulletin.no_right"))
    data = await read_json(request)
    refuse_unknown(data, {"programme", "media", "targets", "class"})
    targets = str_list(data, "targets")
    for t in targets:
        if t not in node.tree:
            raise ApiError(422, say("area.unknown", area=t), "targets")
    with rule_errors():
        klass = inbox.check_class(field(data, "class", str, required=False, default="normal"))
        inbox.communes(node.tree, p.area, targets)  # below the sender only
    if klass == "emergency" and not p.emergency:
        raise ApiError(403, say("emergency.no_right"))
    if (data.get("media") is None) == (data.get("programme") is None):
        raise ApiError(422, say("inbox.media_or_programme"), "programme")
    direct = p.can("direct") or klass == "emergency"
    if data.get("media") is not None:  # a media item, aired directly: as POST /broadcasts
        media = await reference(request, node.tree, "media", data["media"], "media")
        if not direct:
            raise ApiError(403, say("broadcast.approved_only"), "media")
        prog = inbox.media_programme(media["title"], p.area, p.username, media=media)
    else:
        prog = await reference(request, node.tree, "programme", data["programme"], "programme")
    bulletin = inbox.new_bulletin(p.area, p.username, prog, klass, targets,
                                  **({"media": data["media"]} if data.get("media") else {}))
    with rule_errors():
        programmes.check_schedulable(prog, direct=direct)
        entries = await inbox.deliver(node.store, node.station, node.tree, bulletin, prog,
                                      emergency=node.emergency)
    await audit(request, "bulletin.send", bulletin["id"], targets=targets, **{"class": klass})
    await node.downlink.send(bulletin, entries)
    for e in entries:
        node.inbox_changed(e)
    return ok({**bulletin, "entries": entries}, 201)


async def _bulletin(request: web.Request) -> Record:
    """A bulletin its sender's level (or one above it) reads; anyone else: 404."""
    p = principal(request)
    node = node_of(request)
    b = await node.store.get("bulletin", request.match_info["id"])
    if b is None or b["area"] not in node.tree or not node.tree.contains(p.area, b["area"]):
        raise ApiError(404, say("bulletin.unknown"))
    return b


@routes.get("/api/v1/bulletins")
async def bulletin_list(request: web.Request) -> web.Response:
    p = principal(request)
    tree = node_of(request).tree
    found = await node_of(request).store.find("bulletin")
    return ok({"bulletins": [b for b in found
                             if b["area"] in tree and tree.contains(p.area, b["area"])]})


@routes.get("/api/v1/bulletins/{id}")
async def bulletin_get(request: web.Request) -> web.Response:
    b = await _bulletin(request)
    tree = node_of(request).tree
    found = sorted(await node_of(request).store.find("inbox", bulletin=b["id"]),
                   key=lambda e: e["area"])
    return ok({**b, "entries": [{**e, "area_name": tree.get(e["area"]).name
                                 if e["area"] in tree else e["area"]} for e in found]})


@routes.get("/api/v1/inbox")
async def inbox_list(request: web.Request) -> web.Response:
    """The entries of the caller's area and below (a commune's own inbox; a district sees its
    communes'), newest first; ?state= filters."""
    p = principal(request)
    node = node_of(request)
    state = request.query.get("state")
    if state is not None and state not in inbox.STATES:
        raise ApiError(422, say("field.type", name="state", kind=" | ".join(inbox.STATES)),
                       "state")
    progs: dict[str, Record | None] = {}
    found = await node.store.find("inbox", area=p.area) if not node.tree.get(p.area).children \
        else [e for e in await node.store.find("inbox")
              if e["area"] in node.tree and node.tree.contains(p.area, e["area"])]
    found = [e for e in found if state is None or e["state"] == state]
    return ok({"entries": [{**e, **await _shown(node, e, progs)}
                           for e in sorted(found, key=lambda e: -e["created"])]})


async def _shown(node: Node, entry: Record, progs: dict[str, Record | None]) -> Record:
    """What a person needs beside an entry: the sender's name, what to listen to (the media
    of its programme) or read (a spoken one's text)."""
    pid = entry.get("programme") or ""
    if pid not in progs:
        progs[pid] = await node.store.get("programme", pid) if pid else None
    prog = progs[pid] or {}
    listen = [prog["media"]] if prog.get("type") == "file" else list(prog.get("items") or [])
    sender = entry.get("from") or ""
    area = entry["area"]
    return {"from_name": node.tree.get(sender).name if sender in node.tree else sender,
            "area_name": node.tree.get(area).name if area in node.tree else area,
            "listen": listen, "text": prog.get("text") if prog.get("type") == "tts" else None}


async def _entry(request: web.Request) -> Record:
    """An entry of the caller's subtree that it acts on: another commune's is 404."""
    p = principal(request)
    p.require("air")
    node = node_of(request)
    e = await node.store.get("inbox", request.match_info["id"])
    if e is None or e["area"] not in node.tree or not node.tree.contains(p.area, e["area"]):
        raise ApiError(404, say("inbox.unknown"))
    with rule_errors():
        inbox.require_here(e)
    return e


async def _changed(request: web.Request, entry: Record, changes: Record, action: str) -> Record:
    entry = await node_of(request).store.update("inbox", entry["id"], changes)
    await audit(request, f"inbox.{action}", entry["id"], bulletin=entry["bulletin"],
                **{k: v for k, v in changes.items() if k != "by"})
    node_of(request).inbox_changed(entry)
    return entry


@routes.post("/api/v1/inbox/{id}/schedule")
async def inbox_schedule(request: web.Request) -> web.Response:
    """Schedules a normal bulletin in the commune (kind "once" unless given): a schedule like
    POST /api/v1/schedules makes, issued by the commune."""
    entry = await _entry(request)
    with rule_errors():
        inbox.require_pending(entry, "schedule")  # before reading the body
    data = await read_json(request)
    refuse_unknown(data, SCHEDULE_FIELDS)
    sched, conflicts = await checked_schedule(request, {
        "kind": "once", **data, "programme": entry["programme"], "targets": [entry["area"]],
        "class": entry["class"], "area": entry["area"], "inbox": entry["id"]})
    with rule_errors():
        inbox.check_validity(await node_of(request).store.get("bulletin", entry["bulletin"]),
                             sched)
    await store_schedule(request, sched)
    entry = await _changed(request, entry, inbox.scheduling(
        entry, sched["id"], principal(request).username), "schedule")
    return ok({**entry, "conflicts": conflicts})


@routes.post("/api/v1/inbox/{id}/decline")
async def inbox_decline(request: web.Request) -> web.Response:
    entry = await _entry(request)
    with rule_errors():
        inbox.require_pending(entry, "decline")
        changes = inbox.declining(entry, field(await read_json(request), "reason", str),
                                  principal(request).username)
    return ok(await _changed(request, entry, changes, "decline"))


@routes.post("/api/v1/inbox/{id}/order")
async def inbox_order(request: web.Request) -> web.Response:
    """Orders a priority bulletin against the commune's own: "before" (default) or "after".
    On air now: the engine re-ranks it in that commune at the next tick."""
    entry = await _entry(request)
    data = await read_json(request)
    refuse_unknown(data, {"order"})
    with rule_errors():
        changes = inbox.ordering(entry, field(data, "order", str))
    entry = await _changed(request, entry, changes, "order")
    node = node_of(request)
    await inbox.apply_order(node.store, node.engine, entry["bulletin"])
    return ok(entry)


async def _node_key(request: web.Request) -> Record:
    """The child node's credential (`Authorization: Node <key>`, checked where the link
    checks it), or 401 with the reason."""
    try:
        return await _credential(node_of(request), request.headers.get("Authorization", ""))
    except ApiError as e:
        raise ApiError(401, str(e)) from None


@routes.get(MEDIA_PATH)
async def node_media(request: web.Request) -> web.StreamResponse:
    """A child node fetches the audio of a bulletin to its communes (the original upload; the
    child checks its SHA-256 and decodes it into its own library)."""
    key = await _node_key(request)
    node = node_of(request)
    try:
        media = await node.downlink.media_for(key, request.query.get("id", ""))
    except BulletinRefused as e:
        raise ApiError(404, str(e), "id") from None
    path = node.library.original_path(media["sha256"])
    if not await asyncio.to_thread(path.exists):
        raise ApiError(404, say("media.file_missing", media=media["id"]), "id")
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


@routes.post(REPORT_PATH)
async def node_report(request: web.Request) -> web.Response:
    """A child node reports what its communes did with bulletins from here: received,
    scheduled, declined (with the reason), aired, ordered. Idempotent: a replay changes
    nothing; an entry that is not the child's is refused by itself, the rest applied."""
    key = await _node_key(request)
    node = node_of(request)
    data = await read_json(request)
    refuse_unknown(data, {"entries"})
    try:
        changed, refused = await node.downlink.report(key, data.get("entries"))
    except BulletinRefused as err:
        raise ApiError(422, str(err), "entries") from None
    for e in changed:
        await audit(request, "inbox.report", e["id"], node=key["id"], bulletin=e["bulletin"],
                    state=e["state"], reason=e.get("reason"), order=e.get("order"))
        node.inbox_changed(e)
    if refused:
        log.warning("child's inbox report refused in part event=inbox_report_refused node=%s "
                    "refused=%d", key["id"], len(refused))
    return ok({"changed": [e["id"] for e in changed], "refused": refused})


class _Airing:
    """Marks a scheduled inbox entry aired when its broadcast first goes on air."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()

    def on_air(self, change: OnAirChange) -> None:  # the engine's tick: hand over, never wait
        eid = self.node.inbox_airing.pop(change.after, None) if change.after else None
        if eid is not None:
            self.loop.call_soon_threadsafe(self._spawn, eid)

    def _spawn(self, eid: str) -> None:
        task = self.loop.create_task(self._aired(eid))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _aired(self, eid: str) -> None:
        self.node.inbox_changed(await self.node.store.update("inbox", eid, {
            "state": "aired", "changed": time.time()}))


def setup(app: web.Application) -> None:
    PUBLIC.update({("GET", MEDIA_PATH), ("POST", REPORT_PATH)})  # a child's node key
    app.add_routes(routes)
    node = app[NODE]
    node.inbox_listeners.append(publisher(app[HUB]))

    async def start(_app: web.Application) -> None:
        node.engine.listeners.append(_Airing(node).on_air)

    app.on_startup.append(start)


def openapi_paths() -> S:
    secured: S = {"security": [{"bearer": []}]}
    bulletin: S = obj({"programme": STR, "media": STR, "targets": TARGETS,
                       "class": {"type": "string", "enum": list(inbox.FLOW)}}, ["targets"])
    when: S = obj({"kind": {"type": "string", "enum": ["once", "daily", "weekly"]},
                   "time": {"type": "string", "example": "05:00"},
                   "date": {"type": "string", "example": "2026-12-01"},
                   "weekdays": {"type": "array", "items": STR},
                   "from": STR, "until": STR, "tz": STR}, ["time"])

    def action(summary: str, schema: S) -> S:
        return {"parameters": [ID_PARAM], "post": {
            "summary": summary, **secured, "requestBody": body(schema),
            "responses": responses(200, 404, 409, *WRITE)}}

    return {
        "/api/v1/bulletins": {
            "get": {"summary": say("openapi.bulletins"), **secured,
                    "responses": responses(*READ)},
            "post": {"summary": say("openapi.bulletin_send"), **secured,
                     "requestBody": body(bulletin), "responses": responses(201, 409, *WRITE)},
        },
        "/api/v1/bulletins/{id}": {"parameters": [ID_PARAM], "get": {
            "summary": say("openapi.bulletin"), **secured, "responses": responses(*READ, 404)}},
        "/api/v1/inbox": {"get": {
            "summary": say("openapi.inbox"), **secured,
            "parameters": [{"name": "state", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": list(inbox.STATES)}}],
            "responses": responses(*READ, 422)}},
        "/api/v1/inbox/{id}/schedule": action(say("openapi.inbox_schedule"), when),
        "/api/v1/inbox/{id}/decline": action(say("openapi.inbox_decline"),
                                             obj({"reason": STR}, ["reason"])),
        "/api/v1/inbox/{id}/order": action(say("openapi.inbox_order"), obj(
            {"order": {"type": "string", "enum": list(inbox.ORDERS)}}, ["order"])),
        MEDIA_PATH: {"get": {
            "summary": say("openapi.node_media"), "security": [],
            "parameters": [{"name": "id", "in": "query", "required": True, "schema": STR}],
            "responses": {"200": {"description": "audio/*",
                                  "content": {"application/octet-stream": {}}},
                          **responses(401, 404)}}},
        REPORT_PATH: {"post": {
            "summary": say("openapi.node_inbox_report"), "security": [],
            "requestBody": body(obj({"entries": {"type": "array", "items": obj({
                "id": STR, "state": {"type": "string", "enum": list(inbox.STATES)},
                "order": {"type": "string", "enum": list(inbox.ORDERS)},
                "reason": {"type": ["string", "null"]}}, ["id", "state", "order"])}},
                ["entries"])),
            "responses": responses(200, 401, 422)}},
    }
