"""One node on a real socket, for tests, benchmarks and the demo: start it on 127.0.0.1 with a
free port (or the one given), yield its base URL and the node, stop it cleanly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from loa.web.app import create_app
from loa.web.config import Config
from loa.web.node import Node
from loa.web.serve import make_runner

LOCAL = "127.0.0.1"


@dataclass
class LiveNode:
    node: Node
    app: web.Application
    runner: web.AppRunner
    url: str  # http://host:port, no trailing slash
    port: int
    stopped: bool = field(default=False)

    async def stop(self) -> None:
        """HTTP server first (its shutdown closes the clients), then the node. Idempotent."""
        if not self.stopped:
            self.stopped = True
            await self.runner.cleanup()
            await self.node.stop()


async def start_node(cfg: Config, *, realtime: bool = True,
                     configure: Callable[[Config], None] | None = None,
                     prepare: Callable[[Node], Awaitable[None]] | None = None,
                     host: str = LOCAL, port: int = 0, header_timeout: bool = False,
                     backlog: int = 128, **runner: Any) -> LiveNode:
    """A started node serving HTTP on host:port (0: a free port). `configure` overrides the
    config before the node starts; `prepare` runs on the started node before HTTP opens (users,
    seeds). `header_timeout` uses the server's runner (`loa serve`'s keep-alive bound);
    `runner` goes to web.AppRunner (shutdown_timeout, access_log, ...)."""
    if configure is not None:
        configure(cfg)
    node = Node(cfg, realtime=realtime)
    await node.start()
    try:
        if prepare is not None:
            await prepare(node)
        app = create_app(node)
        app_runner = make_runner(app, cfg, **runner) if header_timeout else \
            web.AppRunner(app, **runner)
        await app_runner.setup()
    except BaseException:
        await node.stop()
        raise
    try:
        await web.TCPSite(app_runner, host, port, backlog=backlog).start()
    except BaseException:
        await app_runner.cleanup()
        await node.stop()
        raise
    bound = app_runner.addresses[0][1]
    return LiveNode(node, app, app_runner, f"http://{host}:{bound}", bound)


@asynccontextmanager
async def running_node(cfg: Config, **kw: Any) -> AsyncIterator[LiveNode]:
    """`start_node` as a context: stopped on leaving, also after a failure."""
    live = await start_node(cfg, **kw)
    try:
        yield live
    finally:
        await live.stop()
