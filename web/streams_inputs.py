"""Wiring of relay inputs ("tiếp sóng"): programmes of type relay air an outside stream."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Set app[NODE].station.relay_factory so relay programmes can air."""
