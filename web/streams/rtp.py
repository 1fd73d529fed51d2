"""Routes of the rtp transport (the RtpOut is app[NODE].rtp).

`GET /streams/{area}.sdp[?codec=pcmu]` serves the SDP of the area's multicast stream (the first
configured codec unless `codec` names another): ffmpeg, VLC or a device opens it and plays the
group. 404 with a bilingual reason for an unknown area, a codec that is not served, or when RTP is
off. The file is public like the streams themselves (it only names a group and a port).
`rtp_stats(app)` is the monitor's view: packets, octets, receivers per area and codec.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from loa.streamer.messages import say
from loa.web.http import error_response
from loa.web.node import NODE


def setup(app: web.Application) -> None:
    """Register routes. The node is app[NODE] (started)."""
    app.router.add_get("/streams/{area}.sdp", sdp_handler)


async def sdp_handler(request: web.Request) -> web.StreamResponse:
    area = request.match_info["area"]
    out = request.app[NODE].rtp
    if out is None or not out.started:
        return error_response(404, say("rtp.not_enabled"))
    codec = request.query.get("codec") or None
    try:
        await out.claim(area)  # a cluster's new area: its groups from the shared store
        text = out.sdp(area, codec)
    except KeyError as e:
        return error_response(404, str(e.args[0]) if e.args else say("rtp.not_found"),
                              "codec" if codec and area in out.tree else None)
    return web.Response(text=text, content_type="application/sdp", charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


def rtp_stats(app: web.Application) -> dict[str, Any]:
    """For the monitor: totals and, per area and codec, group, packets, octets, receivers."""
    out = app[NODE].rtp
    if out is None:
        return {"enabled": False, "streams": [], "packets": 0, "octets": 0, "receivers": 0,
                "errors": 0, "dropped": 0, "blocked": 0, "rtcp_reports": 0, "rtcp_malformed": 0}
    return out.stats()
