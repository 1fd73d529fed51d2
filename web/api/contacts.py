"""Who is told of an area's alerts (relay/notify.py): the admins of an area name the people and
systems responsible for its subtree, each by e-mail or by webhook.

- `GET /api/v1/alert-contacts` (admin): the contacts of the caller's subtree.
- `POST /api/v1/alert-contacts` (admin) `{"area", "name", "email"}` or `{"area", "name",
  "webhook"}`: a webhook contact's HMAC secret is answered once (`secret`), never again.
- `DELETE /api/v1/alert-contacts/{id}` (admin of its area or above).

A contact hears the alerts of its area and of everything below it.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any

from aiohttp import web

from loa.relay.devices.records import new_id
from loa.relay.notify import CONTACTS
from loa.relay.urlpolicy import FETCH_SCHEMES, UrlRefused, check_url
from loa.streamer.messages import say
from loa.streamer.state.store import Record
from loa.web.api.core import node_of
from loa.web.api.schema import CODE, ID_PARAM, READ, STR, WRITE, body, obj, responses
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
EMAIL = re.compile(r"^[^@\s<>,;]{1,64}@[A-Za-z0-9.-]{1,190}\.[A-Za-z]{2,}$")


def public_contact(rec: Record) -> Record:
    return {k: v for k, v in rec.items() if k != "secret"}


@routes.get("/api/v1/alert-contacts")
async def contact_list(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    node = node_of(request)
    mine = [public_contact(c) for c in node.notifier.contacts.by_id.values()
            if p.inside(node.tree, c["area"])]
    return ok({"contacts": sorted(mine, key=lambda c: (c["area"], c["name"], c["id"]))})


@routes.post("/api/v1/alert-contacts")
async def contact_create(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    node = node_of(request)
    data = await read_json(request)
    refuse_unknown(data, {"area", "name", "email", "webhook"})
    area = scoped_area(p, node.tree, field(data, "area", str))
    name = field(data, "name", str).strip()
    if not 0 < len(name) <= 100:
        raise ApiError(422, say("contact.bad_name"), "name")
    email = field(data, "email", str, required=False)
    webhook = field(data, "webhook", str, required=False)
    if (email is None) == (webhook is None):
        raise ApiError(422, say("contact.one_channel"), "email")
    rec: Record = {"id": new_id(), "area": area, "name": name, "created": time.time(),
                   "by": p.username}
    if email is not None:
        if not EMAIL.match(email):
            raise ApiError(422, say("contact.bad_email"), "email")
        rec["email"] = email
    else:
        try:
            await check_url(webhook, FETCH_SCHEMES, node.cfg.fetch)
        except UrlRefused as e:
            raise ApiError(422, str(e), "webhook") from None
        rec["webhook"] = webhook
        rec["secret"] = secrets.token_urlsafe(32)
    await node.store.create(CONTACTS, rec)
    node.notifier.contacts.set(rec)
    await audit(request, "alert_contact.create", rec["id"], area=area, name=name,
                channel="email" if email else "webhook")
    out = public_contact(rec)
    if "secret" in rec:
        out["secret"] = rec["secret"]  # shown once: the receiver checks signatures with it
    return ok(out, 201)


@routes.delete("/api/v1/alert-contacts/{id}")
async def contact_delete(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    node = node_of(request)
    rec = await node.store.get(CONTACTS, request.match_info["id"])
    if rec is None or rec["area"] not in node.tree:
        raise ApiError(404, say("contact.unknown"))
    scoped_area(p, node.tree, rec["area"])
    await node.store.delete(CONTACTS, rec["id"])
    node.notifier.contacts.drop(rec["id"])
    await audit(request, "alert_contact.delete", rec["id"], area=rec["area"])
    return ok(public_contact(rec))


def openapi_paths() -> dict[str, Any]:
    secured: dict[str, Any] = {"security": [{"bearer": []}]}
    return {
        "/api/v1/alert-contacts": {
            "get": {"summary": say("openapi.alert_contacts"), **secured,
                    "responses": responses(*READ)},
            "post": {"summary": say("openapi.alert_contact_create"), **secured,
                     "requestBody": body(obj({"area": CODE, "name": STR, "email": STR,
                                              "webhook": STR}, ["area", "name"])),
                     "responses": responses(201, *WRITE)},
        },
        "/api/v1/alert-contacts/{id}": {
            "parameters": [ID_PARAM],
            "delete": {"summary": say("openapi.alert_contact_delete"), **secured,
                       "responses": responses(200, 401, 403, 404)},
        },
    }


def setup(app: web.Application) -> None:
    app.add_routes(routes)
