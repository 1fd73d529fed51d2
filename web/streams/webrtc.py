"""Routes of the webrtc transport (app[NODE].webrtc): WHEP listen, WHIP go-live.

- `POST /whep/{area}` (application/sdp offer) -> 201, the answer, `Location:
  /whep/{area}/{session}`; `DELETE` that location closes the peer, `GET` it gives the peer's
  figures (RTT, loss, jitter from its receiver reports). Listening needs no token, like
  `/streams/...`, unless `[webrtc] listen_tokens` names the area or one above it: then the
  offer carries that token or a user's (whose subtree holds the area), as `Authorization:
  Bearer` or `?token=`. Offers are limited per client address (token bucket, 429 +
  Retry-After): a peer costs far more than an HTTP listener, and the peer limit is shared.
- `POST /whip/{A,B,...}?class=normal|priority|emergency&title=...` with `Authorization: Bearer`
  or the console's session cookie + `X-CSRF-Token` -> 201, the answer, `Location:
  /whip/session/{id}`, `Loa-Broadcast: {broadcast id}`; the publisher's audio airs live in those
  areas until `DELETE /whip/session/{id}` (same token or session, or an operator above the
  issuer), the peer goes away, or the broadcast is stopped. Refusals name their `field`
  (targets, class) as the API's do.

ICE candidates are gathered before answering (no trickle). Errors are JSON, Vietnamese first.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math

from aiohttp import web

from loa.relay.webrtc import LimitError, OfferError
from loa.streamer.areas import AreaTree
from loa.streamer.engine import AuthorityError
from loa.streamer.messages import say
from loa.streamer.station import Content
from loa.web.auth import AuthError, Forbidden, Principal, authenticate
from loa.web.build import stop_whip_broadcast
from loa.web.http import PRINCIPAL, audit, error_response, identify
from loa.web.node import NODE

log = logging.getLogger("loa.webrtc")

CLASSES = ("normal", "priority", "emergency")
LIVE_TITLE = "Trực tiếp"
MAX_TITLE = 200
MAX_TARGETS = 200
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Location, Accept-Post, Loa-Broadcast",
}


def _error(status: int, message: str, headers: dict[str, str] | None = None,
           field: str | None = None) -> web.Response:
    return error_response(status, message, field, headers={**CORS, **(headers or {})})


async def _options(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={
        **CORS,
        "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": "Authorization, Content-Type",
        "Access-Control-Max-Age": "600",
        "Accept-Post": "application/sdp",
    })


async def _read_offer(request: web.Request, max_bytes: int) -> str | web.Response:
    ctype = request.headers.get("Content-Type", "")
    if not ctype.lower().startswith("application/sdp"):
        return _error(415, say("webrtc.sdp_required"))
    if request.content_length is not None and request.content_length > max_bytes:
        return _error(413, say("webrtc.offer_too_large"))
    raw = await request.content.read(max_bytes + 1)
    if len(raw) > max_bytes:
        return _error(413, say("webrtc.offer_too_large"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _error(400, say("webrtc.offer_bad_encoding"))


def _answer(sdp: str, location: str, extra: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=201, text=sdp, content_type="application/sdp",
                        headers={**CORS, "Location": location, **(extra or {})})


# ---- WHEP ----------------------------------------------------------------------------------------
def listen_token(tokens: list[str], tree: AreaTree, area: str) -> str | None:
    """The token that guards listening to `area`: its own, else the nearest area's above it."""
    by_area = dict(t.split("=", 1) for t in tokens if "=" in t)
    return next((by_area[a] for a in tree.ancestors(area) if by_area.get(a)), None)


async def _may_listen(request: web.Request, area: str) -> web.Response | None:
    """None when the listener may go on; else the 401/403 answer."""
    node = request.app[NODE]
    wanted = listen_token(node.cfg.webrtc.listen_tokens, node.tree, area)
    if wanted is None:
        return None
    header = request.headers.get("Authorization", "")
    given = header[7:].strip() if header.startswith("Bearer ") else request.query.get("token", "")
    if given and hmac.compare_digest(given.encode(), wanted.encode()):
        return None
    if given:
        try:
            p, _ = await authenticate(node.store, f"Bearer {given}")
        except AuthError:
            pass
        else:
            request[PRINCIPAL] = p
            try:
                p.require_area(node.tree, area)
            except Forbidden as e:
                return _error(403, str(e))
            return None
    return _error(401, say("webrtc.listen_token"),
                  {"WWW-Authenticate": "Bearer"})


async def whep_post(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    relay = node.webrtc
    area = request.match_info["area"]
    wait = node.whep_offers.take(request.remote or "?", asyncio.get_running_loop().time())
    if wait > 0:
        return _error(429, say("webrtc.too_many_offers"),
                      {"Retry-After": str(math.ceil(wait))})
    if area not in node.tree:
        return _error(404, say("area.unknown", area=area))
    refused = await _may_listen(request, area)
    if refused is not None:
        return refused
    offer = await _read_offer(request, relay.settings.max_sdp_bytes)
    if isinstance(offer, web.Response):
        return offer
    try:
        session, answer = await relay.open_whep(area, offer)
    except OfferError as e:
        log.info("whep offer refused event=whep_bad_offer area=%s status=%d reason=%s",
                 area, e.status, e)
        return _error(e.status, str(e))
    except LimitError as e:
        log.warning("whep refused event=whep_limit area=%s reason=%s", area, e)
        return _error(503, str(e), {"Retry-After": "30"})
    return _answer(answer, f"/whep/{area}/{session.id}")


def _whep_session(request: web.Request) -> str | None:
    relay = request.app[NODE].webrtc
    sid = request.match_info["session"]
    s = relay.whep.get(sid)
    if s is None or s.area != request.match_info["area"]:
        return None
    return sid


async def whep_delete(request: web.Request) -> web.StreamResponse:
    sid = _whep_session(request)
    if sid is None:
        return _error(404, say("webrtc.unknown_session"))
    await request.app[NODE].webrtc.close_whep(sid, "deleted")
    return web.Response(status=204, headers=CORS)


async def whep_get(request: web.Request) -> web.StreamResponse:
    sid = _whep_session(request)
    if sid is None:
        return _error(404, say("webrtc.unknown_session"))
    stats = await request.app[NODE].webrtc.whep[sid].stats()
    return web.json_response(stats, headers=CORS)


# ---- WHIP ----------------------------------------------------------------------------------------
async def _principal(request: web.Request) -> tuple[Principal, str] | web.Response:
    """A bearer token (OBS, scripts) or the console's session cookie with its CSRF header: the
    console never holds a token the page's scripts could read."""
    try:
        return await identify(request)
    except AuthError as e:
        return _error(401, str(e), {"WWW-Authenticate": "Bearer"})
    except Forbidden as e:
        return _error(403, str(e))


async def whip_post(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    relay = node.webrtc
    who = await _principal(request)
    if isinstance(who, web.Response):
        return who
    principal, tid = who
    if not principal.can("air"):
        return _error(403, say("webrtc.role_not_live", role=principal.role))
    targets = list(dict.fromkeys(
        t.strip() for t in request.match_info["targets"].split(",") if t.strip()))
    if not targets or len(targets) > MAX_TARGETS:
        return _error(400, say("webrtc.bad_targets"), field="targets")
    for t in targets:
        if t not in node.tree:
            return _error(404, say("area.unknown", area=t), field="targets")
        try:
            principal.require_area(node.tree, t)
        except Forbidden as e:
            return _error(403, str(e), field="targets")
    klass = request.query.get("class", "normal").strip().lower()
    if klass not in CLASSES:
        return _error(400, say("webrtc.bad_class", value=klass, classes=" | ".join(CLASSES)),
                      field="class")
    if klass == "emergency" and not principal.emergency:
        return _error(403, say("webrtc.no_emergency_right"), field="class")
    title = " ".join(request.query.get("title", "").split())[:MAX_TITLE] or LIVE_TITLE
    offer = await _read_offer(request, relay.settings.max_sdp_bytes)
    if isinstance(offer, web.Response):
        return offer
    try:
        session, answer = await relay.open_whip(offer, targets)
    except OfferError as e:
        log.info("whip offer refused event=whip_bad_offer user=%s status=%d reason=%s",
                 principal.username, e.status, e)
        return _error(e.status, str(e))
    except LimitError as e:
        log.warning("whip refused event=whip_limit user=%s reason=%s", principal.username, e)
        return _error(503, str(e), {"Retry-After": "30"})
    session.issuer = principal.area
    session.user = principal.username
    session.token_id = tid
    try:
        record = await node.station.air(
            Content(source=session.live, title=title, duration=None), targets=targets,
            klass=klass, issuer=principal.area, user=principal.username,
            spec={"live": "whip"})
    except Exception:
        await relay.close_whip(session.id, "air-failed")
        raise
    session.bid = bid = str(record["id"])
    if session.closed:  # the peer went away while the broadcast was being persisted
        stop_whip_broadcast(node.station, session, "whip-ended")
    await audit(request, "live.whip", session.bid, targets=targets, klass=klass, title=title)
    log.info("whip live on air event=whip_live session=%s broadcast=%s user=%s class=%s "
             "targets=%s", session.id, session.bid, principal.username, klass, ",".join(targets))
    return _answer(answer, f"/whip/session/{session.id}", {"Loa-Broadcast": bid})


async def whip_delete(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    relay = node.webrtc
    s = relay.whip.get(request.match_info["session"])
    if s is None:
        return _error(404, say("webrtc.unknown_session"))
    who = await _principal(request)
    if isinstance(who, web.Response):
        return who
    principal, tid = who
    if tid != s.token_id:
        # Not the publisher's token: an operator at or above the issuer may end it.
        if not principal.can("air") or not node.tree.contains(principal.area, s.issuer):
            return _error(403, say("webrtc.may_not_end"))
    if s.bid is not None:
        try:
            node.station.stop(s.bid, by_area=principal.area, cause="stopped")
        except AuthorityError as e:
            return _error(403, str(e))
        except KeyError:
            pass  # already over
    await relay.close_whip(s.id, "deleted")
    await audit(request, "live.whip.stop", s.bid)
    return web.Response(status=204, headers=CORS)


def setup(app: web.Application) -> None:
    """Register routes. The node is app[NODE] (started): its relay is app[NODE].webrtc."""
    r = app.router
    r.add_route("OPTIONS", "/whep/{area}", _options)
    r.add_post("/whep/{area}", whep_post)
    r.add_route("OPTIONS", "/whep/{area}/{session}", _options)
    r.add_delete("/whep/{area}/{session}", whep_delete)
    r.add_get("/whep/{area}/{session}", whep_get)
    r.add_route("OPTIONS", "/whip/session/{session}", _options)
    r.add_delete("/whip/session/{session}", whip_delete)
    r.add_route("OPTIONS", "/whip/{targets}", _options)
    r.add_post("/whip/{targets}", whip_post)
