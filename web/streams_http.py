"""Routes and wiring for the http transport."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Register routes and start/stop hooks. The node is app[NODE] (started)."""
