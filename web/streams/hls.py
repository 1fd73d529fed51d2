"""Routes of the hls transport (the HlsService is app[NODE].hls, None when [hls] is off).

`GET /streams/{area}/index.m3u8` (starts the area's segmenter on the first request and waits for
its first segment) and `GET /streams/{area}/{seq}.ts`, served from memory. Streams are public like
the other `/streams` paths: loudspeakers pull them without a token.
"""

from __future__ import annotations

from aiohttp import web

from loa.relay.hls import HlsService
from loa.streamer.messages import say
from loa.web.http import error_response
from loa.web.node import NODE

PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
SEGMENT_TYPE = "video/mp2t"
FIRST_SEGMENT_WAIT = 3.0  # extra seconds beyond one segment a first request waits


def _service(request: web.Request) -> HlsService:
    hls = request.app[NODE].hls
    assert hls is not None  # the routes exist only when it does
    return hls


def _unknown_area(area: str) -> web.Response:
    return error_response(404, say("area.unknown", area=area))


async def playlist(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    area = request.match_info["area"]
    if area not in node.tree:
        return _unknown_area(area)
    hls = _service(request)
    seg = hls.touch(area)
    if not seg.segments and not await seg.wait_segments(
            hls.settings.segment_seconds * 2 + FIRST_SEGMENT_WAIT):
        return error_response(503, say("hls.not_ready"),
                              headers={"Retry-After": "1"})
    return web.Response(body=seg.playlist(), headers={
        "Content-Type": PLAYLIST_TYPE, "Cache-Control": "no-cache",
        "Access-Control-Allow-Origin": "*"})


async def segment(request: web.Request) -> web.StreamResponse:
    node = request.app[NODE]
    area = request.match_info["area"]
    if area not in node.tree:
        return _unknown_area(area)
    hls = _service(request)
    seg = hls.get(area)
    found = seg.segment(int(request.match_info["seq"])) if seg is not None else None
    if found is None:
        return error_response(404, say("hls.unknown_segment"))
    max_age = int(hls.settings.segment_seconds * (seg.settings.window + 1)) \
        if seg is not None else 0
    return web.Response(body=found.data, headers={
        "Content-Type": SEGMENT_TYPE, "Cache-Control": f"public, max-age={max_age}",
        "Access-Control-Allow-Origin": "*"})


def setup(app: web.Application) -> None:
    """Register routes. The node is app[NODE] (started)."""
    if app[NODE].hls is None:
        return
    app.router.add_get(r"/streams/{area}/index.m3u8", playlist)
    app.router.add_get(r"/streams/{area}/{seq:\d{1,18}}.ts", segment)
