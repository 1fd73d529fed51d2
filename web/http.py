"""HTTP plumbing shared by the API modules: errors, JSON bodies, auth and audit middleware."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from loa.codecs.decode import MediaError
from loa.streamer.areas import AreaError, AreaTree
from loa.streamer.engine import AuthorityError
from loa.streamer.errors import Kind, LoaError
from loa.streamer.messages import say
from loa.streamer.state.store import Conflict, NotFound, Record, Store, StoreUnavailable
from loa.web.auth import (
    AuthError,
    Forbidden,
    Principal,
    RateLimited,
    authenticate,
    authenticate_token,
    csrf_matches,
)

log = logging.getLogger("loa.http")

MAX_JSON = 256 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)
TOKEN_ID: web.RequestKey[str] = web.RequestKey("token_id", str)
CSRF: web.RequestKey[str] = web.RequestKey("csrf", str)  # set for a cookie session only
SESSION_COOKIE = "loa_session"
STORE: web.AppKey[Store] = web.AppKey("store", Store)  # set by the app factory

PUBLIC = {
    ("POST", "/api/v1/auth/token"),
    ("POST", "/api/v1/auth/session"),
    ("GET", "/api/v1/openapi.json"),
    ("POST", "/api/v1/devices/provision"),  # a device trades its one-time token for its key
    ("GET", "/api/v1/devices/connect"),  # devices authenticate in their first message
}
PEER_SIGNED = "/api/exchange/"  # peers sign each request (web/api/exchange.py): no token


# The one place a kind of refusal (streamer/errors.py) becomes an HTTP status.
STATUS_OF_KIND: dict[Kind, int] = {
    "invalid": 422, "not_found": 404, "forbidden": 403, "conflict": 409,
    "unavailable": 503, "limit": 429,
}


def status_of(e: LoaError) -> int:
    return STATUS_OF_KIND[e.kind]


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.headers = headers or {}


def error_response(status: int, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    return web.json_response(body, status=status, headers=headers,
                             dumps=lambda o: json.dumps(o, ensure_ascii=False))


def ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status,
                             dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def read_json(request: web.Request, max_bytes: int = MAX_JSON) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413, say("http.body_too_large"))
    ctype = request.headers.get("Content-Type", "")
    if not ctype.startswith("application/json"):
        raise ApiError(415, say("http.json_required"))
    raw = await request.content.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ApiError(413, say("http.body_too_large"))
    try:
        data = json.loads(raw)
        # Lone surrogates parse but cannot be stored or logged: refuse them here.
        json.dumps(data, ensure_ascii=False).encode()
    except (ValueError, RecursionError) as e:  # JSONDecodeError, too deep, huge ints, surrogates
        raise ApiError(400, say("http.malformed_json", error=type(e).__name__)) from None
    if not isinstance(data, dict):
        raise ApiError(400, say("http.json_not_object"))
    return data


def principal(request: web.Request) -> Principal:
    p: Principal = request[PRINCIPAL]
    return p


def field(data: dict[str, Any], name: str, kind: type | tuple[type, ...], *,
          required: bool = True, default: Any = None) -> Any:
    """A typed field of a JSON body, or 422 naming it."""
    if name not in data or data[name] is None:
        if required:
            raise ApiError(422, say("field.missing", name=name), name)
        return default
    value = data[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ApiError(422, say("field.type", name=name, kind=names), name)
    return value


def str_list(data: dict[str, Any], name: str, *, required: bool = True) -> list[str]:
    value = field(data, name, list, required=required, default=[])
    if required and not value:
        raise ApiError(422, say("field.empty_list", name=name), name)
    if not all(isinstance(v, str) and v for v in value):
        raise ApiError(422, say("field.type", name=name, kind="a list of strings"), name)
    return list(dict.fromkeys(value))


def refuse_unknown(data: dict[str, Any], allowed: set[str]) -> None:
    """A write that would silently ignore a field is refused (422 naming it), nothing changes."""
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(422, say("field.unchangeable", fields=", ".join(unknown)), unknown[0])


def scoped_area(p: Principal, tree: AreaTree, code: object, name: str | None = "area",
                missing: int = 422) -> str:
    """An area a request names: known to the tree (else `missing`: 422 for a body field, 404 for
    a path) and inside the caller's subtree (else 403); both name the field `name`."""
    if not isinstance(code, str) or code not in tree:
        raise ApiError(missing, say("area.unknown", area=code), name)
    try:
        p.require_area(tree, code)
    except Forbidden as e:
        raise ApiError(403, str(e), name) from None
    return code


# What `reference` answers, by kind of record: (unknown id, out of the caller's scope).
REF_TEXTS: dict[str, tuple[Callable[[str], str], Callable[[str, str], str]]] = {
    "media": (lambda rid: say("media.unknown_id", media=rid),
              lambda name, rid: say("media.out_of_scope", name=name, media=rid)),
    "programme": (lambda rid: say("programme.unknown_id", programme=rid),
                  lambda name, rid: say("programme.out_of_scope", name=name, programme=rid)),
    "mount": (lambda rid: say("ingest.unknown_mount", mount=rid[:64]),
              lambda name, rid: say("ingest.mount_out_of_scope", name=name, mount=rid[:64])),
}


async def reference(request: web.Request, tree: AreaTree, kind: str, rid: Any, name: str,
                    missing: int = 422) -> Record:
    """A record a request names (a media, a programme): it must exist (`missing` status) and
    lie in the caller's scope, i.e. its area is in the caller's subtree or above it (shared
    down from above, `Principal.related`); another area's record is refused with 403."""
    if not isinstance(rid, str) or not rid:
        raise ApiError(422, say("field.type", name=name, kind=f"a {kind} id"), name)
    unknown, out_of_scope = REF_TEXTS[kind]
    rec = await request.app[STORE].get(kind, rid)
    if rec is None or rec.get("area") not in tree:
        raise ApiError(missing, unknown(rid), name)
    if not principal(request).related(tree, rec["area"]):
        raise ApiError(403, out_of_scope(name, rid), name)
    return rec


async def audit(request: web.Request, action: str, target: str | None = None,
                **details: Any) -> None:
    p: Principal | None = request.get(PRINCIPAL)
    store: Store = request.app[STORE]
    await store.append("audit", {
        "user": p.username if p else None,
        "area": p.area if p else None,
        "action": action,
        "target": target,
        "ip": request.remote,
        "ts": time.time(),
        "details": details,
    })


WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE", "SOURCE"})  # SOURCE: legacy Icecast push


@web.middleware
async def refusal_audit_middleware(request: web.Request, handler: Handler
                                   ) -> web.StreamResponse:
    """Every write refused with 401/403 leaves an audit entry (who if known, area, ip, method,
    path, status, reason), whichever handler refused it. Outermost: it sees final answers."""
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        if e.status in (401, 403) and request.method in WRITES:
            await _audit_refusal(request, e.status, e.text or "")
        raise
    if resp.status in (401, 403) and request.method in WRITES:
        body = resp.body if isinstance(resp, web.Response) else None
        await _audit_refusal(request, resp.status, body)
    return resp


async def _audit_refusal(request: web.Request, status: int, body: Any) -> None:
    reason, name = None, None
    try:
        parsed = json.loads(body) if isinstance(body, (bytes, str)) and body else None
        if isinstance(parsed, dict):
            reason, name = parsed.get("error"), parsed.get("field")
    except ValueError:
        reason = None
    try:  # the refusal answers even when the store cannot record it
        await audit(request, "refused", request.path, method=request.method, status=status,
                    reason=str(reason)[:300] if reason else None, field=name)
    except Exception:  # noqa: BLE001 - logged; the answer to the caller is what matters
        log.warning("refusal not audited event=audit_refusal_failed method=%s path=%s status=%d",
                    request.method, request.path, status, exc_info=True)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except ApiError as e:
        return error_response(e.status, str(e), e.field, e.headers)
    except AuthError as e:
        return error_response(401, str(e), headers={"WWW-Authenticate": "Bearer"})
    except (Forbidden, AuthorityError) as e:
        return error_response(403, str(e))
    except RateLimited as e:
        return error_response(429, str(e), headers={"Retry-After": str(int(e.retry_after) + 1)})
    except NotFound as e:
        return error_response(404, say("http.not_found", error=e))
    except Conflict as e:
        return error_response(409, str(e))
    except StoreUnavailable as e:  # transient: no traceback, the client retries
        log.warning("store unavailable event=http_503 path=%s error=%s", request.path, e)
        return error_response(503, str(e), headers={"Retry-After": str(e.retry_after)})
    except AreaError as e:
        return error_response(422, str(e), "targets")
    except MediaError as e:
        return error_response(422, str(e), "file")
    except LoaError as e:  # a domain refusal no handler mapped itself
        return error_response(status_of(e), str(e), e.field)
    except Exception:
        log.exception("request failed event=http_500 method=%s path=%s", request.method,
                      request.path)
        return error_response(500, say("http.internal_error"))


def body_limit_middleware(limits: dict[str, int]) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Refuse a declared Content-Length over the route's limit (`limits` by path, else MAX_JSON
    for JSON) before reading a byte of the body, and close the connection instead of draining
    what the client keeps sending."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        limit = limits.get(request.path)
        if limit is None and request.content_type == "application/json":
            limit = MAX_JSON
        size = request.content_length
        if limit is None or size is None or size <= limit:
            return await handler(request)
        resp = error_response(413, say("http.body_over_limit", limit=limit // 1024))
        resp.force_close()
        await resp.prepare(request)
        await resp.write_eof()
        request.protocol.force_close()  # no lingering read of the rest of the body
        return resp

    return middleware


async def identify(request: web.Request) -> tuple[Principal, str]:
    """The caller: a bearer header, else the console's session cookie (AuthError: 401). A
    cookie's write without its session's CSRF value is Forbidden (403). Sets PRINCIPAL and
    TOKEN_ID (and CSRF for a cookie session). Used by the API and by WHIP (the console)."""
    store: Store = request.app[STORE]
    header = request.headers.get("Authorization")
    cookie = request.cookies.get(SESSION_COOKIE)
    if header or not cookie:  # a bearer header wins: scripts need no CSRF
        p, tid = await authenticate(store, header)
    else:
        p, tid, csrf = await authenticate_token(store, cookie)
        # A cookie rides along with any cross-site request: a write must prove it comes
        # from the console, which alone read the session's csrf value.
        if request.method in WRITES and not csrf_matches(
                csrf, request.headers.get("X-CSRF-Token")):
            raise Forbidden(say("auth.csrf_missing"))
        if csrf:
            request[CSRF] = csrf
    request[PRINCIPAL] = p
    request[TOKEN_ID] = tid
    return p, tid


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path.startswith("/api/") and (request.method, path) not in PUBLIC \
            and not path.startswith(PEER_SIGNED) and request.method != "OPTIONS":
        try:
            await identify(request)
        except Forbidden as e:
            return error_response(403, str(e))
    return await handler(request)
