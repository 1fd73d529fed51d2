"""The exchange API with the central source system, `/api/exchange/v1` (docs/exchange.md).

Peers are programs, not people: no bearer token, every request signed with the peer's shared
secret (relay/exchange.py; `[exchange] peers`). Its own OpenAPI document is served at
`/api/exchange/v1/openapi.json` (the one public route).

- `POST /bulletins`: a bulletin down (or an update or cancel of earlier ones); `201` on air
  (cancelled), `404` a cancel of nothing known, `200` a replay (the first answer, with
  `"duplicate": true`), `409` the same id with other content, `401` unsigned, badly signed or
  stale, `422` naming the field (unknown area, digest mismatch, ...), nothing stored then.
- `GET /bulletins/{id}`: the answer given to one of the caller's bulletins (pull acknowledgement).
- `GET /messages?since=CURSOR&limit=N&type=T`: our messages to the caller (ack, delivery,
  statistics) after the cursor, oldest first, with `cursor` to pass next time; `ETag` and
  `If-None-Match` answer `304` when nothing is new.
"""

from __future__ import annotations

import hashlib

from aiohttp import web

from loa.relay.exchange import (
    PEER,
    SIGNATURE,
    TIMESTAMP,
    SignatureRefused,
    claimed_peer,
    cursor_of,
    verified_peer,
)
from loa.streamer.messages import say
from loa.web.api.schema import ERROR, ID_PARAM, STR, S, body, obj, responses
from loa.web.exchange import KIND, ExchangeService, Refused
from loa.web.http import ApiError, audit, error_response, ok
from loa.web.node import NODE

PREFIX = "/api/exchange/v1"
BULLETINS = f"{PREFIX}/bulletins"
MAX_PAGE = 500
routes = web.RouteTableDef()


def service(request: web.Request) -> ExchangeService:
    return request.app[NODE].exchange


async def _peer(request: web.Request, raw: bytes | None) -> str:
    """The peer that signed the request, or 401 with the reason (audited for writes by the
    refusal middleware, without the signature or the secret). `raw` None: only who it claims
    to be and when (before a body is read)."""
    settings = service(request).settings
    try:
        if raw is None:
            return claimed_peer(settings, request.headers)
        return verified_peer(settings, request.headers, request.method, request.raw_path, raw)
    except SignatureRefused as e:
        raise ApiError(401, str(e), headers={"WWW-Authenticate": "HMAC-SHA256"}) from None


@routes.post(BULLETINS)
async def bulletin_receive(request: web.Request) -> web.Response:
    svc = service(request)
    await _peer(request, None)  # a stranger is refused before its body is read
    limit = svc.body_limit
    if request.content_length is not None and request.content_length > limit:
        return error_response(413, say("http.body_too_large"))
    raw = bytearray()
    while chunk := await request.content.read(64 * 1024):  # read(n) gives what has come
        raw += chunk
        if len(raw) > limit:
            return error_response(413, say("http.body_too_large"))
    peer = await _peer(request, bytes(raw))  # before the body is even parsed
    if not request.headers.get("Content-Type", "").startswith("application/json"):
        raise ApiError(415, say("http.json_required"))
    try:
        status, answer = await svc.receive(peer, bytes(raw))
    except Refused as e:
        await audit(request, "exchange.refused", peer, status=e.status, reason=str(e)[:300],
                    field=e.field)
        raise ApiError(e.status, str(e), e.field) from None
    if status == 201:
        await audit(request, "exchange.bulletin", f"{peer}:{answer['id']}", peer=peer,
                    areas=len(answer["areas"]), type=answer["type"],
                    ended=answer.get("ended", []), **{"class": answer.get("class")})
    return ok(answer, status)


@routes.get(BULLETINS + "/{id}")
async def bulletin_get(request: web.Request) -> web.Response:
    peer = await _peer(request, b"")
    rec = await request.app[NODE].store.get(KIND, f"{peer}:{request.match_info['id']}")
    if rec is None:
        raise ApiError(404, say("exchange.unknown_bulletin"))
    return ok(rec["answer"])


@routes.get(f"{PREFIX}/messages")
async def messages(request: web.Request) -> web.Response:
    peer = await _peer(request, b"")
    since = request.query.get("since") or None
    kind = request.query.get("type") or None
    raw_limit = request.query.get("limit", "100")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
        raise ApiError(422, say("exchange.bad_limit", limit=MAX_PAGE), "limit")
    limit = int(raw_limit)
    rows = await service(request).outbox.feed(peer, since, limit + 1)
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = cursor_of(rows[-1]) if rows else since
    tag = '"' + hashlib.sha256(f"{peer}\0{since}\0{kind}\0{cursor}\0{len(rows)}".encode()
                               ).hexdigest()[:32] + '"'
    headers = {"ETag": tag, "Cache-Control": "no-cache"}
    if request.headers.get("If-None-Match") == tag:
        return web.Response(status=304, headers=headers)
    out = [r["message"] for r in rows if kind is None or r["type"] == kind]
    resp = ok({"messages": out, "cursor": cursor, "more": more})
    resp.headers.update(headers)
    return resp


# ---- OpenAPI -------------------------------------------------------------------------------
SIGNED: list[S] = [{"name": h, "in": "header", "required": True, "schema": STR}
                   for h in (PEER, TIMESTAMP, SIGNATURE)]
ATTACHMENT: S = obj({"uri": STR, "data": {"type": "string", "format": "byte"},
                     "sha256": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"},
                     "mime": STR, "size": {"type": "integer"}}, ["sha256", "mime"])
TIME: S = {"type": "string", "format": "date-time"}
BULLETIN: S = obj({
    "id": {"type": "string", "pattern": "^[A-Za-z0-9._:@-]{1,128}$"}, "sender": STR,
    "sent": TIME, "class": {"type": "string", "enum": ["normal", "priority", "emergency"]},
    "title": STR, "text": {"type": "string", "maxLength": 5000},
    "attachments": {"type": "array", "items": ATTACHMENT},
    "targets": {"type": "array", "items": STR, "minItems": 1},
    "valid_from": TIME, "valid_until": TIME,
    "type": {"type": "string", "enum": ["alert", "update", "cancel"], "default": "alert"},
    "references": {"type": "array", "maxItems": 100, "items": STR}},
    ["id", "sender", "sent"])  # class, title, targets too, except in a cancel
MESSAGE: S = obj({"id": STR, "type": {"type": "string",
                                      "enum": ["ack", "delivery", "statistics"]},
                  "version": {"type": "integer"}, "sender": STR, "sent": TIME}, ["id", "type"])


def _answers(*codes: int) -> S:
    out = responses(*codes)
    out["401"] = {"description": "Unsigned, badly signed or stale",
                  "content": {"application/json": {"schema": ERROR}}}
    return out


def document() -> S:
    return {
        "openapi": "3.0.3",
        "info": {"title": "Loa exchange API", "version": "1",
                 "description": "Bulletins down, acknowledgements, delivery reports and "
                                "statistics up (docs/exchange.md). Every call is signed: "
                                "HMAC-SHA256 of `timestamp\\nMETHOD\\npath\\nbody`."},
        "servers": [{"url": "/"}],
        "paths": {
            BULLETINS: {"post": {
                "summary": say("openapi.exchange_bulletin"), "parameters": SIGNED,
                "requestBody": body(BULLETIN),
                "responses": {"201": {"description": "On air, or cancelled"},
                              **_answers(200, 400, 404, 409, 413, 415, 422)}}},
            BULLETINS + "/{id}": {"get": {
                "summary": say("openapi.exchange_bulletin_status"),
                "parameters": [ID_PARAM, *SIGNED], "responses": _answers(200, 404)}},
            f"{PREFIX}/messages": {"get": {
                "summary": say("openapi.exchange_messages"),
                "parameters": [*SIGNED,
                               {"name": "since", "in": "query", "schema": STR},
                               {"name": "type", "in": "query", "schema": MESSAGE[
                                   "properties"]["type"]},
                               {"name": "limit", "in": "query", "schema": {
                                   "type": "integer", "minimum": 1, "maximum": MAX_PAGE}}],
                "responses": {**_answers(200, 304, 422), "200": {
                    "description": "OK", "content": {"application/json": {"schema": obj({
                        "messages": {"type": "array", "items": MESSAGE}, "cursor": STR,
                        "more": {"type": "boolean"}})}}}}}},
            f"{PREFIX}/openapi.json": {"get": {"summary": "This document", "security": [],
                                               "responses": responses(200)}},
        },
    }


async def openapi(_request: web.Request) -> web.Response:
    return web.json_response(document())


def setup(app: web.Application) -> None:
    app.add_routes(routes)
    app.router.add_get(f"{PREFIX}/openapi.json", openapi)
