"""Child nodes over HTTP: their link credentials (REST) and the link WebSocket itself.

A parent's admin registers a child node for an area of its subtree (`POST /api/v1/nodes`) and
gets its key once (`<id>.<secret>`, only the secret's hash is stored); revoking it ends the
child's link at once and refuses it from then on. The child connects to `GET /api/v1/nodes/link`
with `Authorization: Node <key>` and `?areas=` the part of the tree it serves, each inside the
credential's area. A refusal is a WebSocket close with code 4401 (credential) or 4403 (areas)
and the reason as its text, so the child can show why. The messages: relay/link.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from typing import Any

from aiohttp import WSMsgType, web

from loa.relay.devices.protocol import DEVICE_STATUSES
from loa.relay.devices.records import new_id, same_hash, secret_hash
from loa.relay.link import CLOSE_AREAS, CLOSE_CREDENTIAL, CLOSE_LOOP, Feed, LinkError
from loa.relay.uplink import MAX_MESSAGE
from loa.streamer.messages import say
from loa.streamer.state.store import Record
from loa.web.api.devices import _reason
from loa.web.api.schema import CODE, ID_PARAM, READ, STR, WRITE, body, obj, responses
from loa.web.http import (
    PUBLIC,
    ApiError,
    audit,
    error_response,
    field,
    ok,
    principal,
    read_json,
    scoped_area,
)
from loa.web.node import NODE, Node

log = logging.getLogger("loa.nodes")
routes = web.RouteTableDef()

LINK_PATH = "/api/v1/nodes/link"
CLOSE_PROTOCOL = 1003  # the child sends its reports up and pongs: anything else is refused


def public_node(rec: Record, node: Node) -> Record:
    out = {k: v for k, v in rec.items() if k != "key_hash"}
    out["connected"] = any(f.node == rec["id"] for f in node.links.feeds)
    return out


async def _credential(node: Node, header: str) -> Record:
    """The node credential of `Authorization: Node <id>.<secret>`, or ApiError(401)."""
    key = header[5:].strip() if header.startswith("Node ") else ""
    nid, _, secret = key.partition(".")
    rec = await node.store.get("node_key", nid) if nid and secret else None
    if rec is None or not same_hash(rec.get("key_hash"), secret):
        raise ApiError(CLOSE_CREDENTIAL, say("link.bad_credential"))
    if rec.get("revoked"):
        raise ApiError(CLOSE_CREDENTIAL, say("link.revoked"))
    return rec


def _areas(node: Node, rec: Record, query: str) -> list[str]:
    """The areas the child asks for, each inside its credential's area (its own by default)."""
    areas = list(dict.fromkeys(a for a in query.split(",") if a)) or [rec["area"]]
    for a in areas:
        if a not in node.tree or not node.tree.contains(rec["area"], a):
            raise ApiError(CLOSE_AREAS, say("link.area_outside", area=a[:64], own=rec["area"]))
    return areas


@routes.get(LINK_PATH)
async def link(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    ws = web.WebSocketResponse(compress=False, max_msg_size=MAX_MESSAGE, heartbeat=2.0)
    if not ws.can_prepare(request).ok:
        return error_response(426, say("link.needs_websocket"), headers={"Upgrade": "websocket"})
    await ws.prepare(request)
    child = request.query.get("node", "")[:64]  # the child's node id (loop guard)
    try:
        rec = await _credential(node, request.headers.get("Authorization", ""))
        areas = _areas(node, rec, request.query.get("areas", ""))
        if (loop := node.links.loop_reason(child)) is not None:
            raise ApiError(CLOSE_LOOP, loop)
    except ApiError as e:
        log.warning("child node refused event=link_refused peer=%s node=%s code=%d reason=%s",
                    request.remote, child, e.status, e)
        node.links.refused(child, e.status, str(e))
        await ws.close(code=e.status, message=_reason(str(e)))
        return ws
    if node.upstream is not None:  # a middle node: hello once it knows what its parent airs
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(node.upstream.synced.wait(), node.upstream.settings.hold_s)

    tasks: set[asyncio.Task[bool]] = set()

    def end(code: int, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(ws.close(code=code,
                                                               message=_reason(reason)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    feed = Feed(rec["id"], areas, ws.send_str, ws.send_bytes, end=end)
    node.links.attach(feed)
    await node.downlink.resend(feed)  # the bulletins it has not reported receiving
    pump = asyncio.get_running_loop().create_task(feed.pump())
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:  # the child's reports up (relay/uplink.py)
                try:
                    feed.queue_text(await node.uplink_in.receive(rec, msg.data))
                    continue
                except LinkError as e:
                    why = str(e)
            elif msg.type is WSMsgType.BINARY:
                why = say("link.child_sends")
            else:
                continue
            log.info("child node sent what is no upward report event=link_protocol_error "
                     "node=%s reason=%s", rec["id"], why)
            await ws.close(code=CLOSE_PROTOCOL, message=_reason(why))
            break
    finally:
        node.links.detach(feed)
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
    return ws


@routes.post("/api/v1/nodes")
async def node_create(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    node = request.app[NODE]
    data = await read_json(request)
    area = scoped_area(p, node.tree, field(data, "area", str))
    name = field(data, "name", str).strip()
    if not 0 < len(name) <= 100:
        raise ApiError(422, say("link.bad_name"), "name")
    secret = secrets.token_urlsafe(32)
    rec: Record = {"id": new_id(), "name": name, "area": area, "key_hash": secret_hash(secret),
                   "revoked": False, "created": time.time()}
    await node.store.create("node_key", rec)
    await audit(request, "node.create", rec["id"], name=name, area=area)
    return ok({**public_node(rec, node), "key": f"{rec['id']}.{secret}"}, 201)


@routes.get("/api/v1/nodes")
async def node_list(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("read")
    node = request.app[NODE]
    mine = [r for r in await node.store.find("node_key")
            if p.inside(node.tree, r["area"])]
    mine.sort(key=lambda r: r["id"])
    # The devices each child reported (relay/uplink.py), by status, its own children's included.
    devices: dict[str, Counter[str]] = {r["id"]: Counter() for r in mine}
    for d in await node.store.find("node_device"):
        if d.get("node") in devices:
            devices[d["node"]][d["status"]] += 1
    return ok({"nodes": [{**public_node(r, node), "devices": {
                   s: devices[r["id"]][s] for s in DEVICE_STATUSES}} for r in mine],
               "links": node.links.stats(),
               "upstream": node.upstream.stats() if node.upstream else None,
               "uplink": node.uplink.stats() if node.uplink else None,
               "reports": node.uplink_in.counts})


@routes.post("/api/v1/nodes/{id}/revoke")
async def node_revoke(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    node = request.app[NODE]
    rec = await node.store.get("node_key", request.match_info["id"])
    if rec is None or not p.inside(node.tree, rec["area"]):
        raise ApiError(404, say("link.unknown_node"))
    rec = await node.store.update("node_key", rec["id"], {"revoked": True})
    ended = node.links.revoke(rec["id"], say("link.revoked"))
    await audit(request, "node.revoke", rec["id"], links_ended=ended)
    return ok(public_node(rec, node))


def openapi_paths() -> dict[str, Any]:
    secured: dict[str, Any] = {"security": [{"bearer": []}]}
    return {
        "/api/v1/nodes": {
            "get": {"summary": say("openapi.nodes"), **secured, "responses": responses(*READ)},
            "post": {"summary": say("openapi.node_create"), **secured,
                     "requestBody": body(obj({"name": STR, "area": CODE}, ["name", "area"])),
                     "responses": responses(201, *WRITE)},
        },
        "/api/v1/nodes/{id}/revoke": {
            "parameters": [ID_PARAM],
            "post": {"summary": say("openapi.node_revoke"), **secured,
                     "responses": responses(200, 401, 403, 404)},
        },
        LINK_PATH: {
            "get": {"summary": say("openapi.node_link"), "security": [],
                    "parameters": [{"name": "areas", "in": "query", "schema": STR},
                                   {"name": "node", "in": "query", "schema": STR}],
                    "responses": {"101": {"description": "Switching Protocols"},
                                  "426": {"description": "Upgrade Required"}}},
        },
    }


def setup(app: web.Application) -> None:
    PUBLIC.add(("GET", LINK_PATH))  # a child authenticates with its node credential
    app.add_routes(routes)
