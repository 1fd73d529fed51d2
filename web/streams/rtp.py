"""Routes and wiring for the rtp transport.

`GET /streams/{area}.sdp[?codec=pcmu]` serves the SDP of the area's multicast stream (the first
configured codec unless `codec` names another): ffmpeg, VLC or a device opens it and plays the
group. 404 with a bilingual reason for an unknown area, a codec that is not served, or when RTP is
off. The file is public like the streams themselves (it only names a group and a port).
`rtp_stats(app)` is the monitor's view: packets, octets, receivers per area and codec.
"""

from __future__ import annotations

import socket
from typing import Any

from aiohttp import web

from loa.relay.rtp.out import RtpConfigError, RtpOut
from loa.web.config import ConfigError
from loa.web.http import error_response
from loa.web.node import NODE, Node

RTP: web.AppKey[RtpOut] = web.AppKey("rtp", RtpOut)


def make_rtp_out(node: Node) -> RtpOut:
    """RtpOut for a started node (cfg.rtp); `ConfigError` for settings that cannot work."""
    try:
        return RtpOut(node.cfg.rtp, node.hub, node.tree, node.station.wall,
                      state_dir=node.cfg.data_dir, cname=f"loa@{socket.gethostname()}",
                      store=node.store if node.bus.shared else None, node_id=node.node_id)
    except RtpConfigError as e:
        raise ConfigError(str(e)) from None


def setup(app: web.Application) -> None:
    """Register routes and start/stop hooks. The node is app[NODE] (started)."""
    node = app[NODE]
    app.router.add_get("/streams/{area}.sdp", sdp_handler)
    if not node.cfg.rtp.enabled:
        return
    out = make_rtp_out(node)
    app[RTP] = out

    async def start(app: web.Application) -> None:
        try:
            await out.start()
        except RtpConfigError as e:
            raise ConfigError(str(e)) from None

    async def stop(app: web.Application) -> None:
        await out.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)


async def sdp_handler(request: web.Request) -> web.StreamResponse:
    area = request.match_info["area"]
    out = request.app.get(RTP)
    if out is None or not out.started:
        return error_response(404, "RTP chưa bật trên máy chủ này / RTP is not enabled on this "
                                   "server")
    codec = request.query.get("codec") or None
    try:
        await out.claim(area)  # a cluster's new area: its groups from the shared store
        text = out.sdp(area, codec)
    except KeyError as e:
        return error_response(404, str(e.args[0]) if e.args else "không có / not found",
                              "codec" if codec and area in out.tree else None)
    return web.Response(text=text, content_type="application/sdp", charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


def rtp_stats(app: web.Application) -> dict[str, Any]:
    """For the monitor: totals and, per area and codec, group, packets, octets, receivers."""
    out = app.get(RTP)
    if out is None:
        return {"enabled": False, "streams": [], "packets": 0, "octets": 0, "receivers": 0,
                "errors": 0, "dropped": 0, "blocked": 0, "rtcp_reports": 0, "rtcp_malformed": 0}
    return out.stats()
