"""The area tree over HTTP: list (whole subtree, one level, or a search), one area, create,
rename, CSV import.

The whole subtree of a province is 5,000 areas (about 700 kB of JSON): its rendering is kept per
(root, tree version), gzipped once, with an ETag, so repeating it costs no encoding. The console
asks for one level (`parent=`) or a search (`q=`) instead."""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid
from collections import OrderedDict
from typing import Any

from aiohttp import web

from loa.streamer import areaimport
from loa.streamer.areas import AreaError, AreaTree
from loa.streamer.messages import say
from loa.web.api.core import node_of
from loa.web.auth import area_out
from loa.web.build import area_record
from loa.web.http import (
    ApiError,
    audit,
    field,
    ok,
    principal,
    read_json,
    refuse_unknown,
    scoped_area,
)

routes = web.RouteTableDef()
SEARCH_LIMIT = 50
MAX_SEARCH_LIMIT = 500
CACHED_ROOTS = 32
_SALT = uuid.uuid4().hex[:8]  # a restarted node's version 1 is not the last one's


def _area_out(tree: AreaTree, code: str) -> dict[str, Any]:
    a = tree.get(code)
    return {**a.as_dict(), "children": list(a.children)}


class Rendered:
    """The whole-subtree answer of each root, as JSON and gzipped, for one tree version."""

    def __init__(self) -> None:
        self.bodies: OrderedDict[str, tuple[int, bytes, bytes]] = OrderedDict()

    def get(self, tree: AreaTree, root: str) -> tuple[str, bytes, bytes]:
        kept = self.bodies.get(root)
        if kept is None or kept[0] != tree.version:
            body = json.dumps({"root": root, "areas": [_area_out(tree, c)
                                                       for c in tree.subtree(root)]},
                              ensure_ascii=False).encode()
            kept = (tree.version, body, gzip.compress(body, 6, mtime=0))
            self.bodies[root] = kept
            while len(self.bodies) > CACHED_ROOTS:
                self.bodies.popitem(last=False)
        self.bodies.move_to_end(root)
        return f'"{_SALT}-{kept[0]}-{root}"', kept[1], kept[2]


RENDERED: web.AppKey[Rendered] = web.AppKey("areas_rendered", Rendered)


def _whole(request: web.Request, root: str) -> web.Response:
    tag, body, zipped = request.app[RENDERED].get(node_of(request).tree, root)
    head = {"ETag": tag, "Vary": "Accept-Encoding", "Cache-Control": "private, no-cache"}
    if request.headers.get("If-None-Match") == tag:
        return web.Response(status=304, headers=head)
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        return web.Response(body=zipped, content_type="application/json", charset="utf-8",
                            headers={**head, "Content-Encoding": "gzip"})
    return web.Response(body=body, content_type="application/json", charset="utf-8",
                        headers=head)


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", str(SEARCH_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_SEARCH_LIMIT:
        raise ApiError(422, say("area.bad_limit", limit=MAX_SEARCH_LIMIT), "limit")
    return int(raw)


@routes.get("/api/v1/areas")
async def areas(request: web.Request) -> web.Response:
    """The caller's subtree; `parent=CODE`: the areas just below CODE; `q=TEXT`: a search."""
    p = principal(request)
    tree = node_of(request).tree
    if "parent" in request.query:
        parent = scoped_area(p, tree, request.query["parent"], "parent", missing=404)
        return ok({"root": p.area, "parent": parent,
                   "areas": [_area_out(tree, c) for c in tree.get(parent).children]})
    if "q" in request.query:
        query = request.query["q"].strip()
        if not query or len(query) > 100:
            raise ApiError(422, say("area.bad_query", limit=100), "q")
        found, more = tree.search(p.area, query, _limit(request))
        return ok({"root": p.area, "q": query, "more": more,
                   "areas": [{**_area_out(tree, c), "path": area_out(tree, c)["path"]}
                             for c in found]})
    return _whole(request, p.area)


@routes.get("/api/v1/areas/{code}")
async def area_get(request: web.Request) -> web.Response:
    p = principal(request)
    tree = node_of(request).tree
    code = request.match_info["code"]
    scoped_area(p, tree, code, None, missing=404)
    return ok(_area_out(tree, code))


@routes.post("/api/v1/areas")
async def area_create(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    node = node_of(request)
    data = await read_json(request)
    code = field(data, "code", str)
    name = field(data, "name", str)
    level = field(data, "level", str, required=False, default="")
    parent = field(data, "parent", str)
    if parent not in node.tree:
        raise ApiError(422, say("area.no_parent", parent=parent), "parent")
    p.require_area(node.tree, parent)
    if not name.strip() or len(name) > 200:
        raise ApiError(422, say("area.name_length", limit=200), "name")
    try:
        code = node.tree.add(code, name, level, parent).code
    except AreaError as e:
        raise ApiError(409 if "duplicate" in str(e) else 422, str(e), "code") from None
    try:
        await node.store.put("area", area_record(code, node.tree))
    except BaseException:
        node.tree.remove(code)  # all or nothing: the tree never holds an unstored area
        raise
    node.engine.add_area(code)
    await node.load_airtime()  # it follows the quiet hours of the areas above it
    await audit(request, "area.create", code, parent=parent)
    return ok(_area_out(node.tree, code), 201)


@routes.patch("/api/v1/areas/{code}")
async def area_update(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    node = node_of(request)
    code = request.match_info["code"]
    scoped_area(p, node.tree, code, None, missing=404)
    data = await read_json(request)
    refuse_unknown(data, {"name", "level"})  # code and parent are not changed here
    name = field(data, "name", str, required=False)
    level = field(data, "level", str, required=False)
    if name is not None and not name.strip():
        raise ApiError(422, say("area.name_empty"), "name")
    record = {**area_record(code, node.tree), **{k: v for k, v in (("name", name), ("level", level))
                                                  if v is not None}}
    await node.store.put("area", record)  # stored first: memory follows only a stored change
    node.tree.update(code, name=name, level=level)
    await audit(request, "area.update", code, name=name, level=level)
    return ok(_area_out(node.tree, code))


@routes.post("/api/v1/areas/import")
async def area_import(request: web.Request) -> web.Response:
    """CSV of the official administrative units list (code,name,level,parent_code[,lat,lon]); every new
    area must hang below the caller's area. Every row is checked first and every problem
    reported (line, field, error); `dry_run=1` stops there and tells what would be imported.
    All or nothing."""
    p = principal(request)
    p.require("admin")
    node = node_of(request)
    dry_run = request.query.get("dry_run", "") in {"1", "true"}
    if request.content_length is not None and request.content_length > 8 * 1024 * 1024:
        raise ApiError(413, say("area.csv_too_large", limit=8))
    raw = await request.content.read(8 * 1024 * 1024 + 1)
    if len(raw) > 8 * 1024 * 1024:
        raise ApiError(413, say("area.csv_too_large", limit=8))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(422, say("area.csv_encoding"), "file") from None
    known = {a.code for a in node.tree}
    inside = set(node.tree.subtree(p.area))
    checked = await asyncio.to_thread(areaimport.check, text, known, inside)
    problems = [e.as_dict() for e in checked.problems[:areaimport.MAX_PROBLEMS]]
    rows = [{"line": r.line, "code": r.code, "name": r.name, "level": r.level,
             "parent": r.parent, "lat": r.lat, "lon": r.lon} for r in checked.rows[:1000]]
    if dry_run:
        return ok({"valid": not checked.problems, "count": len(checked.rows), "rows": rows,
                   "problems": len(checked.problems), "errors": problems})
    if checked.problems:
        first = checked.problems[0]
        outside = all(e.kind == "forbidden" for e in checked.problems)
        return ok({"error": first.error, "field": "file", "line": first.line,
                   "problems": len(checked.problems), "errors": problems},
                  403 if outside else 422)
    return ok({"imported": len(await _add_all(request, checked.rows)),
               "codes": [r.code for r in checked.rows[:1000]]}, 201)


async def _add_all(request: web.Request, rows: list[areaimport.Row]) -> list[str]:
    """Into the tree and the store together: if storing fails, the tree is as it was."""
    node = node_of(request)
    added: list[str] = []
    try:
        for r in rows:  # parents first
            added.append(node.tree.add(r.code, r.name, r.level, r.parent, r.lat, r.lon).code)
        await node.store.put_many("area", [area_record(c, node.tree) for c in added])
    except BaseException:
        for code in reversed(added):
            node.tree.remove(code)
        raise
    for code in added:
        node.engine.add_area(code)
    await node.load_airtime()  # they follow the quiet hours of the areas above them
    await audit(request, "area.import", None, count=len(added))
    return added


def setup(app: web.Application) -> None:
    app[RENDERED] = Rendered()
    app.add_routes(routes)
