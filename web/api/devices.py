"""Devices over HTTP: the registry (REST), provisioning, commands and the control WebSocket.

Public paths (no bearer token; see `PUBLIC_PATHS`): the provisioning exchange, where a device
trades its one-time token for a key, and the control WebSocket, where it authenticates with that
key in its first message. Everything else needs a bearer token and acts within the caller's area.
The protocol itself is relay/devices/protocol.py and docs/device-protocol.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import WSMsgType, web

from loa.relay.devices.manager import Device, DeviceManager, HelloRejected
from loa.relay.devices.protocol import (
    CLOSE_MALFORMED_HELLO,
    COMMANDS,
    DEVICE_KINDS,
    DEVICE_STATUSES,
    ProtocolError,
    validate_capabilities,
    validate_command,
    validate_groups,
    validate_name,
    validate_power_schedule,
    validate_volume,
)
from loa.relay.devices.records import (
    has_display,
    new_device_record,
    new_provisioning_token,
    secret_hash,
)
from loa.streamer.messages import say
from loa.streamer.state.store import Record
from loa.web.api.schema import CODE, ID_PARAM, READ, STR, WRITE, body, obj, responses
from loa.web.auth import Principal
from loa.web.http import (
    PUBLIC,
    ApiError,
    audit,
    error_response,
    field,
    ok,
    principal,
    read_json,
    refuse_unknown,
    scoped_area,
)
from loa.web.node import NODE, Node

log = logging.getLogger("loa.devices")
routes = web.RouteTableDef()

# (method, path) pairs outside bearer authentication: add them to loa.web.http.PUBLIC.
PUBLIC_PATHS = {("POST", "/api/v1/devices/provision"), ("GET", "/api/v1/devices/connect")}
PROVISION_FAILURES_PER_IP = 20  # failed exchanges per address per 5 minutes
MAX_LIST = 10_000


def public_base(request: web.Request, node: Node) -> str:
    return node.cfg.server.public_url.rstrip("/") or f"{request.scheme}://{request.host}"


def _reason(text: str) -> bytes:
    """A close reason: at most 123 bytes of UTF-8, cut on a character boundary."""
    data = text.encode()
    if len(data) <= 123:
        return data
    return data[:123].decode("utf-8", "ignore").encode()


class WsLink:
    """The manager's view of one aiohttp WebSocket."""

    __slots__ = ("ws", "transport", "errors", "_mgr", "_closing")

    def __init__(self, ws: web.WebSocketResponse, request: web.Request,
                 mgr: DeviceManager) -> None:
        self.ws = ws
        self.transport = request.transport
        self.errors = 0
        self._mgr = mgr
        self._closing = False

    def unsent(self) -> int:
        tr = self.transport
        return tr.get_write_buffer_size() if tr is not None else 0

    def closing(self) -> bool:
        tr = self.transport
        return self._closing or self.ws.closed or tr is None or tr.is_closing()

    async def send(self, data: bytes) -> None:
        await self.ws.send_frame(data, WSMsgType.TEXT)

    def close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self._mgr.track(asyncio.get_running_loop().create_task(self._close(code, reason)))

    async def _close(self, code: int, reason: str) -> None:
        try:
            await self.ws.close(code=code, message=_reason(reason))
        except Exception:  # noqa: BLE001 - the peer is gone: nothing left to close cleanly
            if self.transport is not None:
                self.transport.close()


# ---- the control WebSocket ---------------------------------------------------------------------
@routes.get("/api/v1/devices/connect")
async def connect(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    mgr = request.app[NODE].devices
    s = mgr.settings
    ws = web.WebSocketResponse(compress=False, max_msg_size=s.max_message_kb * 1024,
                               timeout=5.0, autoping=True)
    if not ws.can_prepare(request).ok:
        return error_response(426, say("device.needs_websocket"),
                              headers={"Upgrade": "websocket"})
    await ws.prepare(request)
    link = WsLink(ws, request, mgr)
    peer = request.remote
    try:
        async with asyncio.timeout(s.hello_timeout):
            msg = await ws.receive()
    except TimeoutError:
        log.info("device without hello event=device_hello_timeout peer=%s", peer)
        await ws.close(code=CLOSE_MALFORMED_HELLO,
                       message=_reason(say("device.no_hello", seconds=s.hello_timeout)))
        return ws
    if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
        if not ws.closed:  # a too-big first message was already closed with 1009 by aiohttp
            await ws.close(code=CLOSE_MALFORMED_HELLO,
                           message=_reason(say("device.hello_needed")))
        return ws
    try:
        dev = await mgr.hello(link, msg.data, public_base(request, node))
    except HelloRejected as e:
        log.info("device refused event=device_refused peer=%s code=%d reason=%s", peer, e.code,
                 e.reason)
        await ws.close(code=e.code, message=_reason(e.reason))
        return ws
    except Exception:
        log.exception("device hello failed event=device_hello_error peer=%s", peer)
        await ws.close(code=1011, message=_reason(say("http.internal_error")))
        return ws
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await mgr.receive(dev, link, msg.data)
            elif msg.type is WSMsgType.BINARY:
                await mgr.protocol_error(dev, link, say("device.binary_frame"))
    finally:
        await mgr.disconnected(dev, link)
    return ws


# ---- helpers -------------------------------------------------------------------------------------
def _mgr(request: web.Request) -> DeviceManager:
    return request.app[NODE].devices


def _device(request: web.Request, p: Principal) -> Device:
    """The device of the path, if it lies in the caller's area (404 otherwise: no probing)."""
    node = request.app[NODE]
    dev = _mgr(request).get(request.match_info["id"])
    if dev is None or not p.inside(node.tree, dev.record["area"]):
        raise ApiError(404, say("device.unknown"))
    return dev


def _checked(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ProtocolError as e:
        raise ApiError(422, str(e), e.field) from None


def _ttl(data: dict[str, Any], mgr: DeviceManager) -> float:
    ttl = field(data, "ttl_s", float, required=False, default=mgr.settings.command_ttl)
    if not 0 < ttl <= mgr.settings.max_command_ttl:
        raise ApiError(422, say("device.bad_ttl", limit=mgr.settings.max_command_ttl), "ttl_s")
    return float(ttl)


def _command(data: dict[str, Any], p: Principal) -> tuple[str, dict[str, Any]]:
    p.require("air")
    command = field(data, "command", str)
    args = _checked(validate_command, command, data.get("args"))
    if command == "emergency" and not p.emergency:
        raise ApiError(403, say("emergency.no_right"))
    return command, args


# ---- registry ------------------------------------------------------------------------------------
@routes.post("/api/v1/devices")
async def device_create(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    mgr = _mgr(request)
    data = await read_json(request)
    area = scoped_area(p, request.app[NODE].tree, field(data, "area", str))
    name = _checked(validate_name, field(data, "name", str))
    kind = field(data, "kind", str)
    if kind not in DEVICE_KINDS:
        raise ApiError(422, say("device.bad_kind", first=", ".join(DEVICE_KINDS[:-1]),
                                last=DEVICE_KINDS[-1], kinds=", ".join(DEVICE_KINDS)), "kind")
    caps = _checked(validate_capabilities, data.get("capabilities") or {})
    groups = _checked(validate_groups, data.get("groups") or [])
    volume = data.get("volume", mgr.settings.default_volume)
    rec = new_device_record(name, kind, area, caps, groups,
                            volume=_checked(validate_volume, volume))
    if data.get("power_schedule") is not None:
        rec["power_schedule"] = _checked(validate_power_schedule, data["power_schedule"])
    token = new_provisioning_token()
    expires = time.time() + mgr.settings.provisioning_hours * 3600
    rec["provision"] = {"hash": secret_hash(token), "expires": expires}
    dev = await mgr.create(rec)
    await audit(request, "device.create", dev.id, name=name, kind=kind, area=area)
    return ok({**dev.view(), "provisioning_token": token}, 201)


@routes.get("/api/v1/devices")
async def device_list(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("read")
    tree = request.app[NODE].tree
    q = request.query
    area = scoped_area(p, request.app[NODE].tree, q.get("area") or p.area)
    status = q.get("status") or None
    if status is not None and status not in DEVICE_STATUSES:
        raise ApiError(422, say("device.status_filter", statuses=", ".join(DEVICE_STATUSES)),
                       "status")
    kind = q.get("kind") or None
    if kind is not None and kind not in DEVICE_KINDS:
        raise ApiError(422, say("device.kind_filter", kinds=", ".join(DEVICE_KINDS)), "kind")
    try:
        limit = int(q.get("limit", 1000))
        offset = int(q.get("offset", 0))
    except ValueError:
        raise ApiError(422, say("device.bad_paging"), "limit") from None
    if not 1 <= limit <= MAX_LIST or offset < 0:
        raise ApiError(422, f"limit 1-{MAX_LIST}, offset >= 0", "limit")
    found = _mgr(request).find(set(tree.subtree(area)), kind=kind, status=status,
                               group=q.get("group") or None)
    found.sort(key=lambda d: d.id)
    return ok({"area": area, "total": len(found),
               "devices": [d.view() for d in found[offset:offset + limit]]})


@routes.post("/api/v1/devices/provision")
async def device_provision(request: web.Request) -> web.Response:
    """Public: a device trades its one-time provisioning token for its key."""
    node = request.app[NODE]
    mgr = _mgr(request)
    data = await read_json(request, 4096)
    device_id = field(data, "device", str)
    token = field(data, "token", str)
    ip = request.remote or "?"
    key = await mgr.provision(device_id, token)
    if key is None:
        if await node.store.hit(f"provision:ip:{ip}", 300.0) > PROVISION_FAILURES_PER_IP:
            raise ApiError(429, say("device.too_many_attempts"),
                           headers={"Retry-After": "300"})
        log.info("provisioning refused event=device_provision_refused device=%s ip=%s",
                 device_id[:64], ip)
        raise ApiError(401, say("device.bad_provisioning_token"))
    await audit(request, "device.provision", device_id)
    ws = public_base(request, node).replace("http", "ws", 1)
    out = {"device": device_id, "key": key, "connect": f"{ws}/api/v1/devices/connect"}
    if node.mqtt is not None:  # the broker the device may log in to instead (its id, its key)
        m = node.cfg.mqtt
        out["mqtt"] = {"url": m.device_url or m.url, "prefix": m.prefix, "username": device_id}
    return ok(out, 201)


@routes.post("/api/v1/devices/commands")
async def device_bulk_command(request: web.Request) -> web.Response:
    p = principal(request)
    mgr = _mgr(request)
    tree = request.app[NODE].tree
    data = await read_json(request)
    command, args = _command(data, p)
    area = scoped_area(p, request.app[NODE].tree, field(data, "area", str))
    kind = field(data, "kind", str, required=False)
    if kind is not None and kind not in DEVICE_KINDS:
        raise ApiError(422, say("device.kind_filter", kinds=", ".join(DEVICE_KINDS)), "kind")
    group = field(data, "group", str, required=False)
    status = field(data, "status", str, required=False)  # the console's list filter
    if status is not None and status not in DEVICE_STATUSES:
        raise ApiError(422, say("device.status_filter", statuses=", ".join(DEVICE_STATUSES)),
                       "status")
    ttl = _ttl(data, mgr)
    devices = [d for d in mgr.find(set(tree.subtree(area)), kind=kind, group=group,
                                   status=status)
               if not d.record.get("revoked")
               and (command != "display" or has_display(d.record))]
    issued = await mgr.issue(devices, command, args, ttl=ttl, issuer=p.username, area=area)
    await audit(request, "device.commands", area, command=command, batch=issued.batch,
                devices=issued.devices, online=issued.online, kind=kind, group=group,
                status=status)
    return ok({"command_batch": issued.batch, "devices": issued.devices,
               "online": issued.online}, 202)


@routes.get("/api/v1/devices/commands/{batch}")
async def device_batch(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("read")
    tree = request.app[NODE].tree
    t = _mgr(request).tally(request.match_info["batch"])
    if t is None or not p.inside(tree, t["area"]):
        raise ApiError(404, say("device.unknown_batch"))
    return ok(t)


@routes.get("/api/v1/devices/{id}")
async def device_get(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("read")
    return ok(_device(request, p).view())


@routes.patch("/api/v1/devices/{id}")
async def device_update(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    dev = _device(request, p)
    data = await read_json(request)
    refuse_unknown(data, {"name", "area", "groups", "volume", "power_schedule", "capabilities"})
    changes: Record = {}
    if data.get("name") is not None:
        changes["name"] = _checked(validate_name, data["name"])
    if data.get("area") is not None:
        changes["area"] = scoped_area(p, request.app[NODE].tree, data["area"])
    if data.get("groups") is not None:
        changes["groups"] = _checked(validate_groups, data["groups"])
    if data.get("volume") is not None:
        changes["volume"] = _checked(validate_volume, data["volume"])
    if data.get("power_schedule") is not None:
        changes["power_schedule"] = _checked(validate_power_schedule, data["power_schedule"])
    if data.get("capabilities") is not None:
        changes["capabilities"] = _checked(validate_capabilities, data["capabilities"])
    dev = await _mgr(request).update(dev.id, changes)
    await audit(request, "device.update", dev.id, fields=sorted(changes))
    return ok(dev.view())


@routes.delete("/api/v1/devices/{id}")
async def device_delete(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    dev = _device(request, p)
    await _mgr(request).remove(dev.id)
    await audit(request, "device.delete", dev.id, name=dev.record["name"])
    return web.Response(status=204)


@routes.post("/api/v1/devices/{id}/revoke")
async def device_revoke(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    dev = await _mgr(request).revoke(_device(request, p).id)
    await audit(request, "device.revoke", dev.id)
    return ok(dev.view())


@routes.post("/api/v1/devices/{id}/provisioning")
async def device_reprovision(request: web.Request) -> web.Response:
    """A new one-time provisioning token (a replaced or reset device). The current key keeps
    working until the new token is exchanged."""
    p = principal(request)
    p.require("admin")
    mgr = _mgr(request)
    dev = _device(request, p)
    token = new_provisioning_token()
    expires = time.time() + mgr.settings.provisioning_hours * 3600
    await mgr.update(dev.id, {"provision": {"hash": secret_hash(token), "expires": expires}})
    await audit(request, "device.provisioning", dev.id)
    return ok({"device": dev.id, "provisioning_token": token, "expires": expires}, 201)


@routes.post("/api/v1/devices/{id}/commands")
async def device_command(request: web.Request) -> web.Response:
    p = principal(request)
    mgr = _mgr(request)
    dev = _device(request, p)
    data = await read_json(request)
    command, args = _command(data, p)
    if command == "display" and not has_display(dev.record):
        raise ApiError(422, say("device.no_display"), "command")
    if dev.record.get("revoked"):
        raise ApiError(409, say("device.revoked"))
    issued = await mgr.issue([dev], command, args, ttl=_ttl(data, mgr), issuer=p.username,
                             area=dev.record["area"], single=True)
    await audit(request, "device.command", dev.id, command=command, id=issued.ids[0])
    return ok({"id": issued.ids[0], "online": bool(issued.online),
               "routed": bool(issued.routed)}, 202)


@routes.get("/api/v1/devices/{id}/commands")
async def device_commands(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("read")
    dev = _device(request, p)
    rows = await request.app[NODE].store.find("command", device=dev.id)
    rows.sort(key=lambda r: (r.get("created", 0), r["id"]), reverse=True)
    return ok({"device": dev.id, "commands": rows[:200]})


# ---- OpenAPI -------------------------------------------------------------------------------------
def openapi_paths() -> dict[str, Any]:
    """The OpenAPI path items of these routes (merged into loa.web.openapi.document)."""

    secured: dict[str, Any] = {"security": [{"bearer": []}]}
    caps = obj({"codecs": {"type": "array", "items": STR},
                "transports": {"type": "array", "items": STR},
                "display": obj({"width": {"type": "integer"}, "height": {"type": "integer"}})})
    volume = {"type": "integer", "minimum": 0, "maximum": 100}
    schedule = {"type": "array", "items": obj({"on": STR, "off": STR,
                                               "days": {"type": "array",
                                                        "items": {"type": "integer"}}})}
    command = {"command": {"type": "string", "enum": list(COMMANDS)},
               "args": {"type": "object"}, "ttl_s": {"type": "number"}}
    batch_param = {"name": "batch", "in": "path", "required": True, "schema": STR}
    return {
        "/api/v1/devices": {
            "get": {"summary": say("openapi.devices"), **secured,
                    "parameters": [{"name": n, "in": "query", "schema": s} for n, s in (
                        ("area", CODE), ("status", {"type": "string",
                                                    "enum": list(DEVICE_STATUSES)}),
                        ("kind", {"type": "string", "enum": list(DEVICE_KINDS)}),
                        ("group", STR), ("limit", {"type": "integer"}),
                        ("offset", {"type": "integer"}))],
                    "responses": responses(*READ, 422)},
            "post": {"summary": say("openapi.device_create"), **secured,
                     "requestBody": body(obj({
                         "name": STR, "kind": {"type": "string", "enum": list(DEVICE_KINDS)},
                         "area": CODE, "capabilities": caps,
                         "groups": {"type": "array", "items": STR}, "volume": volume,
                         "power_schedule": schedule}, ["name", "kind", "area"])),
                     "responses": responses(201, *WRITE)},
        },
        "/api/v1/devices/provision": {
            "post": {"summary": say("openapi.device_provision"), "security": [],
                     "requestBody": body(obj({"device": STR, "token": STR},
                                             ["device", "token"])),
                     "responses": responses(201, 400, 401, 415, 422, 429, 503)},
        },
        "/api/v1/devices/connect": {
            "get": {"summary": say("openapi.device_connect"),
                    "security": [], "responses": {"101": {"description": "Switching Protocols"},
                                                  "426": {"description": "Upgrade Required"}}},
        },
        "/api/v1/devices/commands": {
            "post": {"summary": say("openapi.device_bulk_command"),
                     **secured,
                     "requestBody": body(obj({"area": CODE, **command,
                                              "kind": {"type": "string",
                                                       "enum": list(DEVICE_KINDS)},
                                              "status": {"type": "string",
                                                         "enum": list(DEVICE_STATUSES)},
                                              "group": STR}, ["area", "command"])),
                     "responses": {"202": {"description": "Accepted"},
                                   **responses(*WRITE)}},
        },
        "/api/v1/devices/commands/{batch}": {
            "parameters": [batch_param],
            "get": {"summary": say("openapi.device_batch"), **secured,
                    "responses": responses(*READ, 404)},
        },
        "/api/v1/devices/{id}": {
            "parameters": [ID_PARAM],
            "get": {"summary": say("openapi.device"), **secured,
                    "responses": responses(*READ, 404)},
            "patch": {"summary": say("openapi.device_update"),
                      **secured,
                      "requestBody": body(obj({"name": STR, "area": CODE, "capabilities": caps,
                                               "groups": {"type": "array", "items": STR},
                                               "volume": volume, "power_schedule": schedule})),
                      "responses": responses(200, 404, *WRITE)},
            "delete": {"summary": say("openapi.device_delete"), **secured,
                       "responses": responses(204, 401, 403, 404)},
        },
        "/api/v1/devices/{id}/revoke": {
            "parameters": [ID_PARAM],
            "post": {"summary": say("openapi.device_revoke"),
                     **secured, "responses": responses(200, 401, 403, 404)},
        },
        "/api/v1/devices/{id}/provisioning": {
            "parameters": [ID_PARAM],
            "post": {"summary": say("openapi.device_reprovision"), **secured,
                     "responses": responses(201, 401, 403, 404)},
        },
        "/api/v1/devices/{id}/commands": {
            "parameters": [ID_PARAM],
            "get": {"summary": say("openapi.device_commands"), **secured,
                    "responses": responses(*READ, 404)},
            "post": {"summary": say("openapi.device_command"), **secured,
                     "requestBody": body(obj(command, ["command"])),
                     "responses": {"202": {"description": "Accepted"},
                                   **responses(404, 409, *WRITE)}},
        },
    }


def setup(app: web.Application) -> None:
    """Register routes. The device manager is app[NODE].devices (started)."""
    PUBLIC.update(PUBLIC_PATHS)  # devices authenticate with their own secrets, not bearer tokens
    app.add_routes(routes)
