"""The board player page: what an LED/LCD public bulletin board's browser shows.

`GET /board?device=ID&key=KEY` (or `GET /board` for a login form) serves a static, dependency-free
page that speaks the device protocol over `/api/v1/devices/connect` from JavaScript: hello,
heartbeats, acks, reconnect with back-off, the display content model (items with validity, weekdays
and time windows, full or split layout, ticker) and the emergency overlay. The server keeps no
per-page state: the device key is checked by the WebSocket's `hello` like any device's
(docs/device-protocol.md, sections 3.4.1 and 9).

The query string carries the device key: nothing here logs it, and the page is served with
`Referrer-Policy: no-referrer` so images and videos from other hosts never see it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATIC = Path(__file__).parent / "static"

# Images and videos may come from any host the operator names; scripts, styles and the control
# channel only from this node.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src * data: blob:; "
       "media-src * data: blob:; connect-src 'self' ws: wss:; font-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'self'")

_FILES = {
    "/board": ("board.html", "text/html"),
    "/board/board.js": ("board.js", "text/javascript"),
    "/board/board.css": ("board.css", "text/css"),
}


def _headers(content_type: str) -> dict[str, str]:
    return {"Content-Type": f"{content_type}; charset=utf-8",
            # Boards run for months: revalidate (ETag/Last-Modified) so an upgrade reaches them.
            "Cache-Control": "no-cache",
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": CSP}


def _handler(name: str, content_type: str) -> Handler:
    path = STATIC / name
    headers = _headers(content_type)

    async def serve(request: web.Request) -> web.StreamResponse:
        # FileResponse reads in the executor and answers conditional requests (304).
        return web.FileResponse(path, headers=headers)

    return serve


def setup(app: web.Application) -> None:
    """Register routes. The node is app[NODE] (started)."""
    for route, (name, ctype) in _FILES.items():
        app.router.add_get(route, _handler(name, ctype))
