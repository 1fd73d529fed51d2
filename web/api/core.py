"""Health, tokens, the caller, users and the audit log."""

from __future__ import annotations

import secrets
import time
from typing import Any

from aiohttp import web

from loa.streamer.messages import say
from loa.streamer.state.store import Record
from loa.web.auth import (
    Forbidden,
    Principal,
    Role,
    add_user,
    hash_password_async,
    login,
    public_user,
    validate_password,
)
from loa.web.http import (
    TOKEN_ID,
    ApiError,
    audit,
    field,
    ok,
    principal,
    read_json,
    refuse_unknown,
    scoped_area,
)
from loa.web.node import NODE, Node

routes = web.RouteTableDef()


def node_of(request: web.Request) -> Node:
    return request.app[NODE]


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process and the media clock run (200 even when the store is degraded: a
    restart would not fix a full disk, and the node still airs). Readiness: /readyz."""
    node = node_of(request)
    clock = node.clock.stats.as_dict() if node.clock else {}
    running = node.clock_running()
    store = node.store_state()
    status = "stopped" if not running else "ok" if store["writable"] else "degraded"
    return ok({"status": status, "uptime": time.time() - node.started,
               "media_time": node.engine.media_time, "clock": clock, "store": store,
               **node.lag.as_dict()}, 200 if running else 503)


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Readiness: the store takes a write and the data directory has room; 503 if not."""
    state = await node_of(request).readiness()
    return ok(state, 200 if state["ready"] else 503)


@routes.post("/api/v1/auth/token")
async def token(request: web.Request) -> web.Response:
    node = node_of(request)
    data = await read_json(request, 16 * 1024)
    username = field(data, "username", str)
    password = field(data, "password", str)
    tok, user = await login(node.store, node.login_guard, username, password, request.remote or "?",
                            ttl=node.cfg.auth.token_ttl_hours * 3600)
    return ok({"token": tok, "expires_in": int(node.cfg.auth.token_ttl_hours * 3600),
               "user": public_user(user)}, 201)


@routes.delete("/api/v1/auth/token")
async def revoke(request: web.Request) -> web.Response:
    await node_of(request).store.delete("token", request[TOKEN_ID])
    await audit(request, "logout")
    return web.Response(status=204)


@routes.get("/api/v1/me")
async def me(request: web.Request) -> web.Response:
    p = principal(request)
    user = await node_of(request).store.get("user", p.id)
    assert user is not None
    return ok(public_user(user))


# ---- users ---------------------------------------------------------------------------------
@routes.get("/api/v1/users")
async def users(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    node = node_of(request)
    inside = set(node.tree.subtree(p.area))
    return ok({"users": [public_user(u) for u in await node.store.find("user")
                         if u["area"] in inside]})


@routes.post("/api/v1/users")
async def user_create(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    node = node_of(request)
    data = await read_json(request)
    username = field(data, "username", str)
    role = field(data, "role", str)
    area = field(data, "area", str)
    password = field(data, "password", str, required=False)
    emergency = field(data, "emergency", bool, required=False, default=False)
    try:
        scoped_area(p, node.tree, area)
    except Forbidden as e:  # named: the console shows it under the area field
        raise ApiError(403, str(e), "area") from None
    if role not in {r.value for r in Role}:
        raise ApiError(422, say("user.unknown_role", role=role), "role")
    if emergency and not p.emergency:
        raise ApiError(403, say("user.cannot_grant_emergency"), "emergency")
    try:
        record, pw = await add_user(node.store, node.tree, username, role, area, password,
                                    emergency)
    except ValueError as e:
        status = 409 if "exists" in str(e) else 422
        raise ApiError(status, str(e), "password" if "password" in str(e) else "username") \
            from None
    await audit(request, "user.create", record["id"], username=username, role=role, area=area)
    out = public_user(record)
    if password is None:
        out["password"] = pw  # generated: shown once to the admin who created it
    return ok(out, 201)


@routes.patch("/api/v1/users/{id}")
async def user_update(request: web.Request) -> web.Response:
    p = principal(request)
    p.require("admin")
    node = node_of(request)
    user = await _user_in_scope(request)
    data = await read_json(request)
    refuse_unknown(data, {"role", "disabled", "emergency", "password"})
    changes: dict[str, Any] = {}
    if (role := field(data, "role", str, required=False)) is not None:
        if role not in {r.value for r in Role}:
            raise ApiError(422, say("user.unknown_role", role=role), "role")
        changes["role"] = role
    if (disabled := field(data, "disabled", bool, required=False)) is not None:
        changes["disabled"] = disabled
    if (emergency := field(data, "emergency", bool, required=False)) is not None:
        if not p.emergency:
            raise ApiError(403, say("user.cannot_grant_emergency"), "emergency")
        changes["emergency"] = emergency
    if (password := field(data, "password", str, required=False)) is not None:
        _may_set_password(p, user)
        try:
            validate_password(password)
        except ValueError as e:
            raise ApiError(422, str(e), "password") from None
        changes["password"] = await hash_password_async(password)
    user = await node.store.update("user", user["id"], changes)
    if changes.get("disabled") or "password" in changes:
        await _end_sessions(node, user["id"])
    await audit(request, "user.update", user["id"], fields=sorted(changes))
    return ok(public_user(user))


@routes.post("/api/v1/users/{id}/password")
async def user_password_reset(request: web.Request) -> web.Response:
    """A new password generated for a user who lost theirs: shown once, to this admin only;
    every token of the user ends."""
    p = principal(request)
    p.require("admin")
    node = node_of(request)
    user = await _user_in_scope(request)
    _may_set_password(p, user)
    password = secrets.token_urlsafe(12)
    await node.store.update("user", user["id"], {"password": await hash_password_async(password)})
    await _end_sessions(node, user["id"])
    await audit(request, "user.password_reset", user["id"], username=user["username"])
    return ok({"id": user["id"], "username": user["username"], "password": password})


async def _user_in_scope(request: web.Request) -> Record:
    """The user the path names: 404 if unknown, 403 outside the caller's subtree."""
    node = node_of(request)
    user = await node.store.get("user", request.match_info["id"])
    if user is None or user["area"] not in node.tree:
        raise ApiError(404, say("user.unknown"))
    principal(request).require_area(node.tree, user["area"])
    return user


def _may_set_password(p: Principal, user: Record) -> None:
    """Setting someone's password is taking over their account: not one holding the emergency
    right when the admin does not (that would grant the right it may not grant)."""
    if user.get("emergency") and not p.emergency:
        raise ApiError(403, say("user.reset_above_rights"), "password")


async def _end_sessions(node: Node, user_id: str) -> None:
    for tok in await node.store.find("token", user=user_id):
        await node.store.delete("token", tok["id"])


AUDIT_DAYS = 30  # the window when `from` is not given
AUDIT_PAGE = 100
AUDIT_MAX_PAGE = 1000


@routes.get("/api/v1/audit")
async def audit_log(request: web.Request) -> web.Response:
    """The audit entries of the caller's subtree, newest first: `from`/`to` (epoch seconds,
    default the last 30 days), `user` and `action` (exact), `limit` a page; `before` (an entry's
    `seq`) the page after the one that ended with it."""
    p = principal(request)
    p.require("admin")
    node = node_of(request)
    inside = set(node.tree.subtree(p.area))
    at_root = p.area == node.tree.roots()[0].code  # entries without an area are the root's
    until = _num(request, "to")
    since = _num(request, "from")
    if since is None:
        since = (until or time.time()) - AUDIT_DAYS * 86400
    limit = _whole(request, "limit", AUDIT_PAGE, 1, AUDIT_MAX_PAGE)
    before = _whole(request, "before", 0, 0, 2**62) or None
    eq = {k: request.query[k] for k in ("user", "action") if request.query.get(k)}
    entries = await node.store.read_log("audit", since=since, until=until, limit=200_000, **eq)
    mine = [e for e in reversed(entries)
            if (e.get("area") in inside or e.get("area") is None and at_root)
            and (before is None or e["seq"] < before)]
    page = mine[:limit]
    return ok({"entries": page, "more": len(mine) > limit,
               "next": page[-1]["seq"] if len(mine) > limit else None})


def _whole(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name, "")
    if raw == "":
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(422, say("field.type", name=name,
                                kind=f"a whole number from {low} to {high}"), name)
    return int(raw)


def _num(request: web.Request, name: str) -> float | None:
    v = request.query.get(name)
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        raise ApiError(422, say("time.not_epoch", name=name), name) from None


def setup(app: web.Application) -> None:
    app.add_routes(routes)
