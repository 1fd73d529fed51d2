"""Quiet hours and time-of-day volume of an area over HTTP (streamer/airtime.py is the rule).

`GET /api/v1/areas/{code}/airtime` says what the area follows: its own rule or the one it inherits
(and from where). `PUT` sets its own (operators and above, in their subtree: the people who
schedule are the ones who hear the complaints), `DELETE` returns it to the inherited one. A
change is stored, then applied to the engine at its next tick, and audited.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from loa.streamer.airtime import AirtimeError, parse_rule
from loa.streamer.messages import say
from loa.web.api.core import node_of
from loa.web.api.schema import CODE_PARAM, READ, WRITE, body, obj, responses
from loa.web.http import ApiError, audit, ok, principal, read_json, scoped_area

routes = web.RouteTableDef()
PATH = "/api/v1/areas/{code}/airtime"


async def _view(request: web.Request, code: str) -> dict[str, Any]:
    node = node_of(request)
    own = {r["id"]: r["rule"] for r in await node.store.find("airtime")}
    source = next((c for c in (code, *node.tree.ancestors(code)) if c in own), None)
    return {"area": code, "own": own.get(code), "from": source,
            "effective": own[source] if source else None}


@routes.get(PATH)
async def airtime_get(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("read")
    code = scoped_area(p, node_of(request).tree, request.match_info["code"], None, missing=404)
    return ok(await _view(request, code))


@routes.put(PATH)
async def airtime_put(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("air")
    node = node_of(request)
    code = scoped_area(p, node.tree, request.match_info["code"], None, missing=404)
    data = await read_json(request)
    try:
        rule = parse_rule(data).as_dict()
    except AirtimeError as e:
        raise ApiError(422, str(e), e.field) from None
    await node.store.put("airtime", {"id": code, "rule": rule})
    await node.load_airtime()
    await audit(request, "airtime.set", code, **rule)
    return ok(await _view(request, code))


@routes.delete(PATH)
async def airtime_delete(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("air")
    node = node_of(request)
    code = scoped_area(p, node.tree, request.match_info["code"], None, missing=404)
    await node.store.delete("airtime", code)
    await node.load_airtime()
    await audit(request, "airtime.clear", code)
    return ok(await _view(request, code))


def openapi_paths() -> dict[str, Any]:
    secured: dict[str, Any] = {"security": [{"bearer": []}]}
    hhmm = {"type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$|^24:00$"}
    rule = obj({"hours": {"type": "array", "items": {"type": "array", "items": hhmm,
                                                     "minItems": 2, "maxItems": 2}},
                "volume": {"type": "array", "items": obj({
                    "from": hhmm, "to": hhmm,
                    "percent": {"type": "integer", "minimum": 0, "maximum": 100}},
                    ["from", "to", "percent"])}})
    return {
        PATH: {
            "parameters": [CODE_PARAM],
            "get": {"summary": say("openapi.airtime"), **secured,
                    "responses": responses(*READ, 404)},
            "put": {"summary": say("openapi.airtime_set"), **secured,
                    "requestBody": body(rule),
                    "responses": responses(200, 404, *WRITE)},
            "delete": {"summary": say("openapi.airtime_clear"), **secured,
                       "responses": responses(200, 401, 403, 404)},
        },
    }


def setup(app: web.Application) -> None:
    app.add_routes(routes)

