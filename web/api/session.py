"""The console's session: cookie login/logout, the caller with its area and rights, password."""

from __future__ import annotations

from aiohttp import web

from loa.web.auth import (
    Forbidden,
    Principal,
    area_out,
    change_password,
    login,
    new_csrf,
    public_user,
    rights,
    validate_password,
)
from loa.web.http import (
    CSRF,
    SESSION_COOKIE,
    TOKEN_ID,
    ApiError,
    audit,
    field,
    ok,
    principal,
    read_json,
)
from loa.web.node import NODE

routes = web.RouteTableDef()


@routes.post("/api/v1/auth/session")
async def session_start(request: web.Request) -> web.Response:
    node = request.app[NODE]
    data = await read_json(request, 16 * 1024)
    ttl = node.cfg.auth.token_ttl_hours * 3600
    csrf = new_csrf()
    tok, user = await login(node.store, node.login_guard, field(data, "username", str),
                            field(data, "password", str), request.remote or "?", ttl=ttl,
                            csrf=csrf)
    resp = ok({"user": public_user(user), "area": area_out(node.tree, user["area"]),
               "rights": rights(Principal.of(user)), "csrf": csrf})
    resp.set_cookie(SESSION_COOKIE, tok, max_age=int(ttl), path="/", httponly=True,
                    samesite="Strict", secure=request.secure)
    return resp


@routes.get("/api/v1/auth/me")
async def auth_me(request: web.Request) -> web.Response:
    p = principal(request)
    node = request.app[NODE]
    user = await node.store.get("user", p.id)
    assert user is not None  # authenticate just read it
    return ok({"user": public_user(user), "area": area_out(node.tree, p.area),
               "rights": rights(p), "csrf": request.get(CSRF)})


@routes.delete("/api/v1/auth/session")
async def session_end(request: web.Request) -> web.Response:
    await request.app[NODE].store.delete("token", request[TOKEN_ID])
    await audit(request, "logout")
    resp = web.Response(status=204)
    resp.set_cookie(SESSION_COOKIE, "", max_age=0, path="/", httponly=True, samesite="Strict",
                    secure=request.secure)
    return resp


@routes.post("/api/v1/auth/password")
async def password(request: web.Request) -> web.Response:
    data = await read_json(request, 16 * 1024)
    current = field(data, "current", str)
    new = field(data, "new", str)
    try:
        validate_password(new)
    except ValueError as e:
        raise ApiError(422, str(e), "new") from None
    p = principal(request)
    try:
        await change_password(request.app[NODE].store, p, request[TOKEN_ID], current, new)
    except Forbidden as e:
        raise ApiError(403, str(e), "current") from None
    await audit(request, "password.change", p.id)
    return web.Response(status=204)


def setup(app: web.Application) -> None:
    app.add_routes(routes)
