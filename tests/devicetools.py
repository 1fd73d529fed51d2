"""Device-side test helpers: a real node on 127.0.0.1 with a 440 Hz tone on air, its admin
token, and waiting for an event. Shared by tests/relay/test_agent.py and tests/relay/test_sim.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from loa.relay.agent.client import provision, register
from loa.streamer.broadcast import Broadcast
from loa.streamer.sources import ToneSource
from loa.web.app import create_app
from loa.web.node import Node
from tests.apiclient import make_config

LOCAL = "127.0.0.1"
AREA = "T01-H1-X1"  # a commune


@dataclass
class Server:
    node: Node
    app: web.Application
    runner: web.AppRunner
    base: str
    http: aiohttp.ClientSession
    token: str
    port: int

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def get(self, path: str) -> Any:
        async with self.http.get(self.base + path, headers=self.headers()) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with self.http.post(self.base + path, json=body, headers=self.headers()) as r:
            return r.status, await r.json()

    async def device(self, area: str = AREA, name: str = "Cụm loa chợ") -> tuple[str, str]:
        """Register (admin) and provision (the device's public exchange): (id, key)."""
        dev, ptoken = await register(self.http, self.base, self.token, name=name,
                                     kind="loudspeaker", area=area)
        return dev, await provision(self.http, self.base, dev, ptoken)


async def start_node(data: Path, configure: Callable[[Any], None], tone_area: str, *,
                     port: int = 0, token: str | None = None) -> Server:
    """A node serving on 127.0.0.1 (`port` 0: any), `tone_area` and its children hearing a
    440 Hz tone; `token` reuses an admin token of a node on the same data directory."""
    data.mkdir(parents=True, exist_ok=True)
    cfg = make_config(data)
    configure(cfg)
    node = Node(cfg, realtime=True)
    await node.start()
    app = create_app(node)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, LOCAL, port).start()
    port = runner.addresses[0][1]
    base = f"http://{LOCAL}:{port}"
    http = aiohttp.ClientSession()
    if token is None:
        async with http.post(f"{base}/api/v1/auth/token",
                             json={"username": "admin",
                                   "password": node.bootstrap_password}) as r:
            assert r.status == 201, await r.text()
            token = (await r.json())["token"]
    node.engine.start(Broadcast(ToneSource(440, 0.3), [tone_area], issuer=tone_area,
                                title="440 Hz"))
    return Server(node, app, runner, base, http, token, port)


async def stop_node(srv: Server) -> None:
    await srv.http.close()
    await srv.runner.cleanup()
    await srv.node.stop()


async def until(cond: Callable[[], Any], what: str, timeout: float = 30.0,
                step: float = 0.05) -> None:
    """Wait for an event (the timeout only ends a hung test; it is no speed check)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        v = cond()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(step)
