"""Routes of the http transport (app[NODE].http, .fanout): `GET|HEAD /streams/{area}.mp3` and `.opus` (Ogg).

Streams are public like Icecast mounts (loudspeakers and browsers pull them without a token).
The handler checks the area and the listener limits with aiohttp's usual error answers, then
hands the accepted connection to the `HttpStreamer` (loa.relay.icecast), which writes the
close-delimited response itself; the handler only waits, idle, until the listener is gone.
With `[http_streams] workers` > 0 the connection goes instead to a fan-out worker process
(loa.relay.fanout) and the handler returns at once; the limits are still counted here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from loa.relay.icecast import ICY_CODECS, LimitReached
from loa.streamer.areas import AreaError
from loa.streamer.messages import say
from loa.web.http import error_response
from loa.web.node import NODE

log = logging.getLogger("loa.http_streams")

MAX_BURST_MS = 60_000


def http_stats(app: web.Application) -> dict[str, Any]:
    """Listeners, bytes and drops per (area, codec), for the monitor and /metrics."""
    return app[NODE].http.stats()


async def _stream(request: web.Request, codec: str) -> web.StreamResponse:
    app = request.app
    node = app[NODE]
    streamer = node.http
    code = request.match_info["area"]
    try:
        area = node.tree.get(code)
    except AreaError:
        return error_response(404, say("stream.unknown_area", area=code))
    burst_ms = None
    if "burst_ms" in request.query:  # a player that keeps close to live asks for a short burst
        raw = request.query["burst_ms"]
        if not raw.isdigit() or int(raw) > MAX_BURST_MS:
            return error_response(
                422, say("stream.bad_burst", limit=MAX_BURST_MS), field="burst_ms")
        burst_ms = int(raw)
    try:
        streamer.admit(area.code)
    except LimitReached as e:
        log.info("listener refused event=http_listener_refused area=%s codec=%s reason=%r",
                 area.code, codec, str(e))
        return error_response(503, str(e), headers={"Retry-After": str(e.retry_after)})
    transport = request.transport
    if transport is None or transport.is_closing():
        return web.Response()  # the client left before we answered: nothing is sent
    # A browser waits for a burst's worth of bytes before it plays (Chromium's <audio autoplay>
    # about 64 KiB): it gets silence where a young channel has no past audio yet. Players
    # (ffmpeg, VLC, GStreamer, devices) start on what there is, without that silence. Every
    # browser's User-Agent starts "Mozilla/"; Sec-Fetch-Dest is not sent over plain http.
    pad = request.headers.get("User-Agent", "").startswith("Mozilla/")
    icy = codec in ICY_CODECS and request.headers.get("Icy-MetaData", "").strip() == "1"
    head = streamer.head(area.code, area.name, codec, icy)
    if request.method == "HEAD":
        transport.write(head)
        transport.close()
        return web.Response()  # not sent: the connection is closed (aiohttp logs the access)
    pool = node.fanout
    worker = pool.pick() if pool is not None else None
    if pool is not None and worker is not None:  # else (all restarting): served here
        pool.hand_off(worker, area.code, codec, transport, icy, head, burst_ms, pad)
        log.debug("listener handed off event=http_listener_join area=%s codec=%s peer=%s "
                  "icy=%s worker=%d", area.code, codec, request.remote, icy, worker.slot)
        return web.Response()  # not sent: this process closed its copy of the connection
    listener = streamer.attach(area.code, codec, transport, icy, head, burst_ms, pad)
    log.debug("listener joined event=http_listener_join area=%s codec=%s peer=%s icy=%s",
              area.code, codec, request.remote, icy)
    try:
        reason = await asyncio.shield(listener.done)
    except asyncio.CancelledError:
        listener.channel.remove(listener, "cancelled")
        raise
    log.debug("listener left event=http_listener_leave area=%s codec=%s reason=%s bytes=%d",
              area.code, codec, reason, listener.bytes)
    # The body was written on the transport, which is closed now: aiohttp's attempt to send this
    # response finds it closed and only logs the access.
    return web.Response()


async def stream_mp3(request: web.Request) -> web.StreamResponse:
    return await _stream(request, "mp3")


async def stream_opus(request: web.Request) -> web.StreamResponse:
    return await _stream(request, "opus")


def setup(app: web.Application) -> None:
    """Register routes. The node is app[NODE] (started)."""
    app.router.add_get("/streams/{area}.mp3", stream_mp3)
    app.router.add_get("/streams/{area}.opus", stream_opus)
