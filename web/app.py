"""The HTTP application of a node: every route module registers on it (routes only route).

The node (web/node.py) is started before and stopped after: it owns every service."""

from __future__ import annotations

from aiohttp import web

from loa.web import board, console, events, monitor, openapi
from loa.web.api import air as api_air
from loa.web.api import airtime as api_airtime
from loa.web.api import archive as api_archive
from loa.web.api import areas as api_areas
from loa.web.api import contacts as api_contacts
from loa.web.api import core as api_core
from loa.web.api import delivery as api_delivery
from loa.web.api import devices as api_devices
from loa.web.api import emergency as api_emergency
from loa.web.api import exchange as api_exchange
from loa.web.api import firmware as api_firmware
from loa.web.api import geo as api_geo
from loa.web.api import inbox as api_inbox
from loa.web.api import media as api_media
from loa.web.api import mounts as api_mounts
from loa.web.api import nodes as api_nodes
from loa.web.api import outages as api_outages
from loa.web.api import overview as api_overview
from loa.web.api import reports as api_reports
from loa.web.api import session as api_session
from loa.web.http import (
    STORE,
    auth_middleware,
    body_limit_middleware,
    error_middleware,
    refusal_audit_middleware,
)
from loa.web.node import NODE, Node
from loa.web.streams import hls as streams_hls
from loa.web.streams import http as streams_http
from loa.web.streams import ingest as streams_ingest
from loa.web.streams import rtp as streams_rtp
from loa.web.streams import webrtc as streams_webrtc

MAX_UPLOAD_OVERHEAD = 1024 * 1024


def create_app(node: Node) -> web.Application:
    max_upload = node.cfg.media.max_mb * 1024 * 1024 + MAX_UPLOAD_OVERHEAD
    limits = body_limit_middleware({"/api/v1/media": max_upload,
                                    "/api/v1/firmware": node.cfg.firmware.max_mb * 2**20
                                    + MAX_UPLOAD_OVERHEAD,
                                    api_exchange.BULLETINS: node.exchange.body_limit})
    app = web.Application(middlewares=[refusal_audit_middleware, error_middleware, limits,
                                       auth_middleware],
                          client_max_size=max_upload)
    app[NODE] = node
    app[STORE] = node.store
    api_core.setup(app)
    api_areas.setup(app)
    api_airtime.setup(app)
    api_session.setup(app)
    api_overview.setup(app)
    events.setup(app)
    api_media.setup(app)
    api_air.setup(app)
    api_inbox.setup(app)
    api_reports.setup(app)
    api_delivery.setup(app)
    api_geo.setup(app)
    api_outages.setup(app)
    api_contacts.setup(app)
    api_devices.setup(app)
    api_firmware.setup(app)
    api_emergency.setup(app)
    api_exchange.setup(app)
    api_nodes.setup(app)
    api_archive.setup(app)
    api_mounts.setup(app)
    monitor.setup(app)
    board.setup(app)
    console.setup(app)
    openapi.setup(app)
    streams_http.setup(app)
    streams_rtp.setup(app)
    streams_hls.setup(app)
    streams_webrtc.setup(app)
    streams_ingest.setup(app)

    async def close_clients(_app: web.Application) -> None:
        await node.close_clients()  # before aiohttp waits for the handlers of streams, links

    app.on_shutdown.append(close_clients)
    return app
