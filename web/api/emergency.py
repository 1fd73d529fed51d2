"""Emergencies and CAP 1.2 alerts over HTTP (the service is streamer/emergency/service.py).

- `POST /api/v1/emergencies` (bearer, the emergency right; targets inside the caller's area):
  `{"targets": [codes], "content": {"media": id} | {"text": "..."} | {"live": true},
  "repeat": 1-10, "gap": s, "attention": {"before", "after", "media"?}, "volume": 0-100,
  "text": board text, "title"?}` -> `201` the emergency (persisted before the answer), with
  `devices` (commands sent / queued) and, for live, `whip`: the URL to publish the voice to.
- `POST /api/v1/emergencies/preview` (same right and body; only `targets` is read): what would be
  interrupted now, without starting anything: the programmes on air in the covered leaf areas of
  the caller's subtree that an emergency of the caller's authority preempts (`programmes`
  distinct broadcasts in `communes` leaf areas), and those it would wait behind (`waits`: an
  emergency of the same or a higher authority).
- `GET /api/v1/emergencies[?status=active|ended|all]`: those the caller's area is concerned by
  (they target its subtree, or an area above it). `GET /api/v1/emergencies/{id}`, with `reach`:
  its leaf areas on air and the loudspeakers and boards that acknowledged it (acked / total), all
  cut down to the caller's subtree. Acknowledgements are told as the live event
  `emergency_status` (`{"id"}`, at most every 0.3 s per emergency) to those it concerns.
- `DELETE /api/v1/emergencies/{id}`: ends it (`200`, the record). Needs the emergency right at the
  issuer's area or above (`403` otherwise, and it stays on air); `409` when it is already over.
- `POST /api/v1/alerts` (`application/cap+xml` or `application/xml`): a CAP 1.2 message.
  Authentication: a bearer token of a user holding the emergency right. A dedicated feed is just
  such a user (e.g. `loa user add cap-feed --role operator --area T01 --emergency`): the same
  tokens, rights, area scope and audit as people, no second credential scheme, and its area
  bounds what the feed may target. `201` aired, `200` already received (same sender, identifier
  and sent) or a Cancel done, `202` accepted without airing (status System/Draft, msgType
  Ack/Error); a bad document `4xx` with the reason, and nothing airs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from loa.relay.devices.protocol import DEVICE_KINDS
from loa.streamer.broadcast import BroadcastClass
from loa.streamer.emergency import cap as capmod
from loa.streamer.emergency.service import (
    DuplicateAlert,
    EmergencyError,
    EmergencyService,
    Request,
)
from loa.streamer.messages import say
from loa.streamer.programmes import MAX_GAP, MAX_REPEAT
from loa.streamer.state.store import Record
from loa.web.api.delivery import concerns, summary
from loa.web.api.schema import CODE, ID_PARAM, READ, STR, WRITE, body, obj, responses
from loa.web.auth import Forbidden, Principal
from loa.web.events import HUB
from loa.web.http import (
    ApiError,
    audit,
    error_response,
    field,
    ok,
    principal,
    read_json,
    reference,
    scoped_area,
    status_of,
)
from loa.web.node import NODE, Node

log = logging.getLogger("loa.emergency")
routes = web.RouteTableDef()

CAP_TYPES = ("application/cap+xml", "application/xml", "text/xml")
MAX_TEXT = 5000
MAX_PREVIEW_ROWS = 200  # areas listed by a preview (the counts cover them all)
STATUS_EVERY = 0.3  # seconds between two `emergency_status` events of one emergency


def service(request: web.Request) -> EmergencyService:
    return request.app[NODE].emergency


def cap_status(e: capmod.CapError) -> int:
    """A refused CAP document: 400 when it is not XML at all, else the status of its kind."""
    return 400 if isinstance(e, capmod.CapNotXml) else status_of(e)


def _require_right(p: Principal) -> None:
    if not p.emergency or not p.can("air"):
        raise ApiError(403, say("emergency.no_right"))


def _public(rec: Record) -> Record:
    return {k: v for k, v in rec.items() if k not in ("cancel_key",)}


# ---- emergencies ---------------------------------------------------------------------------------
def _targets(node: Node, p: Principal, data: dict[str, Any]) -> list[str]:
    raw = field(data, "targets", list)
    if not raw or not all(isinstance(t, str) and t for t in raw):
        raise ApiError(422, say("emergency.targets"), "targets")
    targets = list(dict.fromkeys(raw))
    for t in targets:
        try:
            scoped_area(p, node.tree, t, "targets")
        except Forbidden as e:  # named, so the console shows it under the area picker
            raise ApiError(403, str(e), "targets") from None
    return targets


async def _content(request: web.Request, node: Node, data: dict[str, Any]) -> dict[str, Any]:
    content = field(data, "content", dict)
    given = [k for k in ("media", "text", "live") if content.get(k) not in (None, "", False)]
    if len(given) != 1 or set(content) - {"media", "text", "live"}:
        raise ApiError(422, say("emergency.content"), "content")
    kind = given[0]
    if kind == "media":
        m = await reference(request, node.tree, "media", content["media"], "content.media")
        return {"media": m["id"]}
    if kind == "text":
        text = content["text"]
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            raise ApiError(422, say("text.length", limit=MAX_TEXT), "content.text")
        return {"text": " ".join(text.split())}
    if content["live"] is not True:
        raise ApiError(422, say("emergency.live"), "content.live")
    return {"live": True}


@routes.post("/api/v1/emergencies")
async def emergency_create(request: web.Request) -> web.Response:
    p = principal(request)
    _require_right(p)
    node = request.app[NODE]
    data = await read_json(request)
    targets = _targets(node, p, data)
    content = await _content(request, node, data)
    repeat = field(data, "repeat", int, required=False, default=1)
    if not 1 <= repeat <= MAX_REPEAT:
        raise ApiError(422, say("programme.repeat", limit=MAX_REPEAT), "repeat")
    gap = field(data, "gap", float, required=False, default=0.0)
    if not 0 <= gap <= MAX_GAP:
        raise ApiError(422, say("programme.gap", limit=MAX_GAP), "gap")
    attention = field(data, "attention", dict, required=False, default={})
    unknown = set(attention) - {"before", "after", "media"}
    if unknown:
        raise ApiError(422, say("emergency.attention_fields", fields=", ".join(sorted(unknown))),
                       "attention")
    before = field(attention, "before", bool, required=False)
    after = field(attention, "after", bool, required=False)
    att_media = None
    if attention.get("media") is not None:
        att_media = (await reference(request, node.tree, "media", attention["media"],
                                     "attention.media"))["id"]
    volume = field(data, "volume", int, required=False)
    if volume is not None and not 0 <= volume <= 100:
        raise ApiError(422, say("volume.range", limit=100), "volume")
    text = field(data, "text", str, required=False)
    if text is not None and (not text.strip() or len(text) > 2000):
        raise ApiError(422, say("emergency.board_text", limit=2000), "text")
    title = field(data, "title", str, required=False)
    if title is not None and (not title.strip() or len(title) > 200):
        raise ApiError(422, say("title.length", limit=200), "title")
    req = Request(targets=targets, content=content, issuer=p.area, user=p.username,
                  repeat=repeat, gap=gap, attention_before=before, attention_after=after,
                  attention_media=att_media, volume=volume, text=text, title=title)
    try:
        rec = await service(request).create(req)
    except DuplicateAlert as e:  # not a refusal: answered 200, as before
        raise ApiError(200, str(e)) from None
    except EmergencyError as e:
        raise ApiError(status_of(e), str(e), e.field) from None
    await audit(request, "emergency.start", rec["id"], targets=rec["targets"],
                areas=rec["areas"], broadcast=rec.get("broadcast"), live=rec["live"],
                devices=rec["devices"])
    return ok(_public(rec), 201)


def _preempts(node: Node, depth: int, now: dict[str, Any]) -> bool:
    """An emergency issued at `depth` takes the air from what is on air (streamer/arbiter.py:
    class, then the authority nearest the root; an equal one keeps the air: earlier start)."""
    cls = BroadcastClass.parse(str(now["class"]))
    if cls is not BroadcastClass.emergency:
        return True
    issuer = now.get("issuer")
    return not (isinstance(issuer, str) and issuer in node.tree) or depth < node.tree.depth(issuer)


@routes.post("/api/v1/emergencies/preview")
async def emergency_preview(request: web.Request) -> web.Response:
    p = principal(request)
    _require_right(p)
    node = request.app[NODE]
    targets = _targets(node, p, await read_json(request))
    depth = node.tree.depth(p.area)
    leaves = node.tree.resolve_leaves(targets)
    interrupted: list[dict[str, Any]] = []
    waits: list[dict[str, Any]] = []
    for code in leaves:
        now = node.engine.on_air(code)
        if not now["broadcast"]:
            continue
        row = {"area": code, "name": node.tree.get(code).name,
               **{k: now[k] for k in ("broadcast", "title", "class", "issuer")}}
        (interrupted if _preempts(node, depth, now) else waits).append(row)
    return ok({"areas": len(leaves), "communes": len(interrupted),
               "programmes": len({r["broadcast"] for r in interrupted}),
               "interrupted": interrupted[:MAX_PREVIEW_ROWS], "waits": waits[:MAX_PREVIEW_ROWS]})


@routes.get("/api/v1/emergencies")
async def emergency_list(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("read")
    node = request.app[NODE]
    status = request.query.get("status", "active")
    if status not in ("active", "ended", "all"):
        raise ApiError(422, "status: active | ended | all", "status")
    rows = await service(request).records(None if status == "all" else status)
    rows = [_public(r) for r in rows if concerns(node, p, r)]
    rows.sort(key=lambda r: r.get("created", 0), reverse=True)
    return ok({"emergencies": rows})


async def _visible(request: web.Request, p: Principal) -> Record:
    rec = await service(request).get(request.match_info["id"])
    if rec is None or not concerns(request.app[NODE], p, rec):
        raise ApiError(404, say("emergency.unknown"))
    return rec


@routes.get("/api/v1/emergencies/{id}")
async def emergency_get(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("read")
    rec = await _visible(request, p)
    out = _public(rec)
    node = request.app[NODE]
    out["on_air"] = [node.engine.on_air(a) for a in rec.get("areas", []) if a in node.tree]
    proofs = await node.delivery.proofs(rec["id"])
    out["reach"] = _reach(node, p, rec, {d for d, r in proofs.items() if r.get("acked")})
    out["delivery"] = await summary(node, p, rec, proofs)
    return ok(out)


def _reach(node: Node, p: Principal, rec: Record, acked: set[str]) -> dict[str, Any]:
    """Where the emergency stands in the caller's subtree: its leaf areas on air (this node's
    broadcast of it), loudspeakers and boards that acknowledged it (on any node, kept in the
    store: relay/devices/proof.py) while it is active, of those there."""
    tree = node.tree
    svc = node.emergency
    leaves = [a for a in rec.get("areas", []) if p.inside(tree, a)]
    bids = svc.broadcasts(rec["id"]) if rec.get("status") == "active" else set()
    on_air = [a for a in leaves if bids and node.engine.on_air(a)["broadcast"] in bids]
    covered = {a for a in tree.covered([t for t in rec.get("targets", []) if t in tree])
               if p.inside(tree, a)}
    if rec.get("status") != "active":
        acked = set()
    counts = {kind: {"acked": 0, "total": 0} for kind in DEVICE_KINDS}
    for d in node.devices.find(covered):
        c = counts.get(d.record.get("kind", ""))
        if c is None or d.record.get("revoked"):
            continue
        c["total"] += 1
        c["acked"] += d.id in acked
    return {"areas": len(leaves), "on_air": [{"code": a, "name": tree.get(a).name}
                                             for a in on_air],
            "loudspeakers": counts["loudspeaker"], "boards": counts["board"]}


@routes.delete("/api/v1/emergencies/{id}")
async def emergency_stop(request: web.Request) -> web.Response:
    p = principal(request)
    rec = await _visible(request, p)
    node = request.app[NODE]
    if not p.emergency or not p.can("air"):
        raise ApiError(403, say("emergency.stop_right"))
    issuer = rec["issuer"]
    if issuer in node.tree and not node.tree.contains(p.area, issuer):
        raise ApiError(403, say("emergency.not_yours", area=p.area, issuer=issuer))
    if rec.get("status") != "active":
        raise ApiError(409, say("emergency.over"))
    ended = await service(request).end(rec["id"], "stopped", user=p.username)
    await audit(request, "emergency.stop", rec["id"], areas=rec.get("areas"))
    return ok(_public(ended or rec))


# ---- CAP -----------------------------------------------------------------------------------------
@routes.post("/api/v1/alerts")
async def alert_receive(request: web.Request) -> web.StreamResponse:
    p = principal(request)
    _require_right(p)
    svc = service(request)
    node = request.app[NODE]
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype not in CAP_TYPES:
        return error_response(415, say("cap.content_type"))
    limit = svc.settings.cap_body_limit  # text + one largest inline resource in base64
    if request.content_length is not None and request.content_length > limit:
        return error_response(413, say("cap.too_large"))
    data = await request.content.read(limit + 1)
    if len(data) > limit:
        return error_response(413, say("cap.too_large"))
    try:
        alert = await asyncio.to_thread(capmod.parse, data, svc.settings.cap_resource_bytes)
    except capmod.CapError as e:
        log.info("cap refused event=cap_refused user=%s status=%d reason=%s", p.username,
                 cap_status(e), str(e)[:300])
        await audit(request, "alert.refused", None, reason=str(e)[:500])
        return error_response(cap_status(e), str(e), e.element)
    try:
        status, body = await svc.cap(alert, issuer=p.area, user=p.username,
                                     check_area=lambda code: p.require_area(node.tree, code))
    except capmod.CapError as e:
        await audit(request, "alert.refused", alert.key, reason=str(e)[:500])
        return error_response(cap_status(e), str(e), e.element)
    except EmergencyError as e:
        await audit(request, "alert.refused", alert.key, reason=str(e)[:500])
        code = 200 if isinstance(e, DuplicateAlert) else status_of(e)  # a duplicate: 200
        return error_response(code, str(e), e.field)
    await audit(request, "alert.receive", body.get("id"), cap=alert.key, msgType=alert.msg_type,
                status=alert.status, result=status, areas=body.get("areas"),
                cancelled=body.get("cancelled"))
    log.info("cap alert event=cap_alert user=%s key=%s msgType=%s status=%s result=%d id=%s",
             p.username, alert.key[:200], alert.msg_type, alert.status, status, body.get("id"))
    return ok(_public(body), status)


def _tell_acks(app: web.Application) -> None:
    """Devices acknowledging an emergency or reporting that they play it become
    `emergency_status` events (at most one per emergency every STATUS_EVERY seconds: thousands of
    loudspeakers ack within a second) for the clients its targets concern; they read the counts
    of their own subtree with GET."""
    node = app[NODE]
    waiting: set[str] = set()  # emergencies with news not told yet

    def tell(eid: str) -> None:
        waiting.discard(eid)
        rec = node.emergency.active.get(eid)
        if rec is not None:
            app[HUB].publish("emergency_status", {"id": eid}, list(rec["targets"]))

    def soon(eid: str | None) -> None:
        if eid is not None and eid in node.emergency.active and eid not in waiting:
            waiting.add(eid)
            asyncio.get_running_loop().call_later(STATUS_EVERY, tell, eid)

    def on_ack(cmd: Record, _t: float) -> None:
        batch = cmd.get("batch")
        if cmd.get("command") == "emergency" and cmd.get("status") == "acked" and batch:
            soon(node.emergency.emergency_of(batch))

    def on_report(_dev: Any, report: Record) -> None:
        if report["type"] == "playing":
            soon(report["broadcast"])

    async def start(_app: web.Application) -> None:
        node.devices.ack_listeners.append(on_ack)
        node.devices.report_listeners.append(on_report)

    async def stop(_app: web.Application) -> None:
        if on_ack in node.devices.ack_listeners:
            node.devices.ack_listeners.remove(on_ack)
        if on_report in node.devices.report_listeners:
            node.devices.report_listeners.remove(on_report)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)


def setup(app: web.Application) -> None:
    """Register routes. The service is app[NODE].emergency (started)."""
    app.add_routes(routes)
    _tell_acks(app)


# ---- OpenAPI -------------------------------------------------------------------------------------
def openapi_paths() -> dict[str, Any]:
    """The OpenAPI path items of these routes (merge into loa.web.openapi.document)."""

    secured: dict[str, Any] = {"security": [{"bearer": []}]}
    content = {"oneOf": [obj({"media": STR}, ["media"]), obj({"text": STR}, ["text"]),
                         obj({"live": {"type": "boolean"}}, ["live"])]}
    create = obj({
        "targets": {"type": "array", "items": CODE, "minItems": 1},
        "content": content,
        "repeat": {"type": "integer", "minimum": 1, "maximum": MAX_REPEAT},
        "gap": {"type": "number", "minimum": 0, "maximum": MAX_GAP},
        "attention": obj({"before": {"type": "boolean"}, "after": {"type": "boolean"},
                          "media": STR}),
        "volume": {"type": "integer", "minimum": 0, "maximum": 100},
        "text": STR, "title": STR}, ["targets", "content"])
    preview = {**create, "required": ["targets"]}
    status = {"name": "status", "in": "query",
              "schema": {"type": "string", "enum": ["active", "ended", "all"]}}
    return {
        "/api/v1/emergencies": {
            "get": {"summary": say("openapi.emergencies"),
                    **secured, "parameters": [status], "responses": responses(*READ, 422)},
            "post": {"summary": say("openapi.emergency_start"),
                     **secured, "requestBody": body(create),
                     "responses": responses(201, *WRITE)},
        },
        "/api/v1/emergencies/preview": {
            "post": {"summary": say("openapi.emergency_preview"), **secured,
                     "requestBody": body(preview), "responses": responses(200, *WRITE)},
        },
        "/api/v1/emergencies/{id}": {
            "parameters": [ID_PARAM],
            "get": {"summary": say("openapi.emergency"), **secured, "responses": responses(*READ, 404)},
            "delete": {"summary": say("openapi.emergency_end"), **secured,
                       "responses": responses(200, 401, 403, 404, 409)},
        },
        "/api/v1/alerts": {
            "post": {"summary": say("openapi.alert"),
                     **secured,
                     "requestBody": {"required": True, "content": {
                         "application/cap+xml": {"schema": {"type": "string"}},
                         "application/xml": {"schema": {"type": "string"}}}},
                     "responses": {"201": {"description": "Aired"},
                                   "202": {"description": "Accepted, not aired"},
                                   **responses(200, 400, 401, 403, 404, 409, 413, 415, 422)}},
        },
    }
