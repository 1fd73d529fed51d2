"""A node for emergency tests on a real port: music in three communes (300/350/400 Hz), the
people of tests/apiclient.py plus operators with the emergency right, devices as WebSocket
clients speaking docs/device-protocol.md, and reading the attention signal's steps from a "pcm"
subscription. Shared by tests/streamer/test_emergency.py, test_cap.py and tests/web/test_media.py."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import WSMsgType, web

from loa.codecs.encoders import Packet
from loa.streamer.broadcast import Broadcast
from loa.streamer.clock import SAMPLE_RATE, VirtualClock
from loa.streamer.hub import Subscription
from loa.streamer.sources import ToneSource
from loa.web.auth import add_user
from loa.web.config import Config
from loa.web.node import Node
from loa.web.testing import start_node
from tests.apiclient import PASSWORD, PEOPLE, make_config
from tests.audio import peak_hz

X1, X2, X3 = "T01-H1-X1", "T01-H1-X2", "T01-H1-X3"
MUSIC = {X1: 300.0, X2: 350.0, X3: 400.0}
STEP = int(0.25 * SAMPLE_RATE)  # one tone of the attention signal
WAIT = 15.0  # bound for waits on events (never a speed check)
EXTRA_PEOPLE = {
    "huyen1em": ("operator", "T01-H1", True),  # district operator with the emergency right
    "xa11em": ("operator", "T01-H1-X1", True),  # commune operator with the emergency right
}


@dataclass
class Srv:
    node: Node
    app: web.Application
    runner: web.AppRunner
    base: str
    http: aiohttp.ClientSession
    clock: VirtualClock | None
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def svc(self) -> Any:
        return self.node.emergency

    async def login(self, who: str) -> str:
        if who not in self.tokens:
            async with self.http.post(f"{self.base}/api/v1/auth/token",
                                      json={"username": who, "password": PASSWORD}) as r:
                assert r.status == 201, await r.text()
                self.tokens[who] = (await r.json())["token"]
        return self.tokens[who]

    async def call(self, who: str | None, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = dict(kw.pop("headers", {}))
        if who:
            headers["Authorization"] = f"Bearer {await self.login(who)}"
        async with self.http.request(method, self.base + path, headers=headers, **kw) as r:
            ctype = r.headers.get("Content-Type", "")
            body = await r.json() if ctype.startswith("application/json") else await r.text()
            return r.status, body

    def run(self, seconds: float) -> None:
        assert self.clock is not None, "virtual clock only"
        self.clock.run(int(round(seconds * 50)))

    async def approved(self, tone: Path, title: str, author: str,
                       approver: str = "duyet1") -> str:
        """A file programme of `author`'s area made of `tone`, submitted and approved: its id."""
        form = aiohttp.FormData()
        form.add_field("title", title)
        form.add_field("file", tone.read_bytes(), filename=tone.name)
        status, media = await self.call(author, "POST", "/api/v1/media", data=form)
        assert status == 201, media
        status, prog = await self.call(author, "POST", "/api/v1/programmes", json={
            "title": title, "type": "file", "media": media["id"]})
        assert status == 201, prog
        for who, action in ((author, "submit"), (approver, "approve")):
            status, body = await self.call(who, "POST",
                                           f"/api/v1/programmes/{prog['id']}/{action}")
            assert status == 200, body
        return str(prog["id"])

    async def device(self, area: str, kind: str = "loudspeaker", **caps: Any) -> DeviceWs:
        dev_id, key = await self.provision(area, kind, **caps)
        d = DeviceWs(self, dev_id)
        await d.connect(key, kind, caps)
        return d

    async def provision(self, area: str, kind: str = "loudspeaker", **caps: Any
                        ) -> tuple[str, str]:
        body: dict[str, Any] = {"name": f"{kind} {area}", "kind": kind, "area": area}
        if caps:
            body["capabilities"] = caps
        status, dev = await self.call("qtv1", "POST", "/api/v1/devices", json=body)
        assert status == 201, dev
        status, got = await self.call(None, "POST", "/api/v1/devices/provision",
                                      json={"device": dev["id"],
                                            "token": dev["provisioning_token"]})
        assert status == 201, got
        return dev["id"], got["key"]


@dataclass
class DeviceWs:
    """A device client: hello, welcome, every command acked, commands kept in order."""

    srv: Srv
    id: str
    ws: aiohttp.ClientWebSocketResponse | None = None
    commands: list[dict[str, Any]] = field(default_factory=list)
    welcome: dict[str, Any] | None = None

    async def connect(self, key: str, kind: str, extra: dict[str, Any] | None = None) -> None:
        self.ws = await self.srv.http.ws_connect(self.srv.base + "/api/v1/devices/connect")
        caps: dict[str, Any] = {"codecs": ["opus"], "transports": ["http"], **(extra or {})}
        if kind == "board":
            caps["display"] = {"width": 1920, "height": 1080}
        await self.ws.send_str(json.dumps({"v": 1, "type": "hello", "device": self.id,
                                           "key": key, "firmware": "test",
                                           "capabilities": caps}))
        msg = await self.ws.receive(timeout=WAIT)
        self.welcome = json.loads(msg.data)
        assert self.welcome["type"] == "welcome", self.welcome

    async def command(self, name: str, timeout: float = WAIT) -> dict[str, Any]:
        """The next command called `name` (acking everything on the way)."""
        assert self.ws is not None
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.receive()
                assert msg.type is WSMsgType.TEXT, (msg.type, msg.data)
                m = json.loads(msg.data)
                if m["type"] != "command":
                    continue
                await self.ws.send_str(json.dumps({"v": 1, "type": "ack", "id": m["id"],
                                                   "ok": True}))
                self.commands.append(m)
                if m["command"] == name:
                    return m

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


def live_config(tmp_path: Path, *, rtp: bool = False, store: str = "sqlite",
                prefix: str = "loa:", data: Path | None = None) -> Config:
    cfg = make_config(tmp_path, store=store, prefix=prefix)
    if data is not None:
        cfg.server.data = str(data)
    cfg.webrtc.ice_addresses = "127.0.0.1"
    cfg.devices.retry_interval = 0.5
    if rtp:
        cfg.rtp.enabled = True
        cfg.rtp.interface = "127.0.0.1"
        cfg.rtp.ttl = 0
        cfg.rtp.port = random.randrange(20_000, 60_000, 2)
        cfg.rtp.group_base = f"239.255.{random.randrange(0, 200)}.0"
        cfg.rtp.pool_size = 64
    return cfg


@asynccontextmanager
async def serving(cfg: Config, *, realtime: bool = False) -> AsyncIterator[Srv]:
    srv = await open_node(cfg, realtime=realtime, prepare=add_people)
    try:
        yield srv
    finally:
        await close_app(srv)


async def add_people(node: Node) -> None:
    """The people of tests/apiclient.py and EXTRA_PEOPLE (a restarted node has them)."""
    for name, (role, area, emergency) in {**PEOPLE, **EXTRA_PEOPLE}.items():
        if not await node.store.find("user", username=name):
            await add_user(node.store, node.tree, name, role, area, PASSWORD, emergency)


async def open_node(cfg: Config, *, realtime: bool,
                    prepare: Callable[[Node], Awaitable[None]] | None = None) -> Srv:
    live = await start_node(cfg, realtime=realtime, prepare=prepare, access_log=None)
    return Srv(live.node, live.app, live.runner, live.url, aiohttp.ClientSession(),
               None if realtime else VirtualClock(live.node.engine.tick))


async def close_app(srv: Srv) -> None:
    await srv.http.close()
    await srv.runner.cleanup()
    await srv.node.stop()


async def ended(node: Node, eid: str, timeout: float = WAIT) -> dict[str, Any]:
    """The emergency record once it is ended (waits for the service to write it)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        rec = await node.store.get("emergency", eid)
        if rec is not None and rec["status"] == "ended":
            return rec
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"emergency {eid} never ended")
        await asyncio.sleep(0.01)


async def settle() -> None:
    """Let the hub's hops to the loop and the service's follow-ups run."""
    for _ in range(5):
        await asyncio.sleep(0.005)


def start_music(node: Node) -> dict[str, str]:
    return {a: node.engine.start(Broadcast(ToneSource(hz, 0.3), [a], issuer=a,
                                           title=f"nhạc {a}"))
            for a, hz in MUSIC.items()}


def pcm_from(packets: list[Packet]) -> tuple[int, np.ndarray]:
    """(first sample, audio) of consecutive pcm packets."""
    return packets[0].pts, np.frombuffer(b"".join(p.data for p in packets), dtype=np.float32)


def steps_at(sub: Subscription, start: int, n: int) -> list[int]:
    """The peak frequency (rounded to 10 Hz) of n 250 ms windows from sample `start`."""
    first, pcm = pcm_from(list(sub.queue))
    out = []
    for k in range(n):
        a = start - first + k * STEP
        win = pcm[a:a + STEP]
        assert len(win) == STEP, "not enough audio captured"
        out.append(int(round(peak_hz(win, SAMPLE_RATE) / 10) * 10))
    return out


def switch(node: Node, area: str, to: str) -> Any:
    return next(c for c in node.engine.changes if c.area == area and c.after == to)
