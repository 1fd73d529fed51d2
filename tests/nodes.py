"""Loa nodes as real `loa serve` processes on loopback, each with its own directory (config, area
list, data), chained by node keys each parent issues: province -> district -> commune, or
province -> commune (issue 12). A node keeps its port across restarts, so its children find it
again; kill() is SIGKILL (a crash), stop() SIGTERM (a clean shutdown)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from loa.web.auth import add_user
from loa.web.config import Config
from loa.web.node import Node
from loa.web.testing import LiveNode, start_node
from tests.apiclient import PASSWORD, SAMPLE_CSV, make_config

WAIT = 60.0  # a start or a stop that takes longer has hung: no speed check


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(values: list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


class NodeProcess:
    def __init__(self, where: Path, name: str, http: aiohttp.ClientSession,
                 upstream: tuple[str, str, list[str]] | None = None) -> None:
        self.dir = where / name
        self.name = name
        self.http = http
        self.upstream = upstream  # (parent URL, node key, areas)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.output: list[str] = []
        self.password: str | None = None  # the bootstrap admin's (printed on the first start)
        self.token = ""
        self._reader: asyncio.Task[None] | None = None

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def _config(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "areas.csv").write_text(SAMPLE_CSV, encoding="utf-8")
        lines = ["[areas]", f'csv = "{self.dir / "areas.csv"}"',
                 "[http_streams]", "workers = 0", "[webrtc]", "workers = 0"]
        if self.upstream is not None:
            url, key, areas = self.upstream
            lines += ["[upstream]", f'url = "{url}"', f'key = "{key}"',
                      f"areas = {_toml(areas)}", "hold_s = 0.5"]
        path = self.dir / "loa.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    async def start(self) -> NodeProcess:
        self.output = []
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loa.web.cli", "serve", "--config", str(self._config()),
            "--data", str(self.data), "--http", f"127.0.0.1:{self.port}",
            env={**os.environ, "LOA_STORE": "sqlite"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        serving = asyncio.Event()
        self._reader = asyncio.create_task(self._read(serving))
        await asyncio.wait({self._reader, asyncio.create_task(serving.wait())}, timeout=WAIT,
                           return_when=asyncio.FIRST_COMPLETED)
        assert serving.is_set(), f"{self.name} did not start:\n" + "".join(self.output)
        assert self.password, "no bootstrap admin password seen"
        status, body = await self.call("POST", "/api/v1/auth/token",
                                       json={"username": "admin", "password": self.password})
        assert status == 201, body
        self.token = body["token"]
        return self

    async def _read(self, serving: asyncio.Event) -> None:
        assert self.proc and self.proc.stdout
        while line := (await self.proc.stdout.readline()).decode(errors="replace"):
            self.output.append(line)
            if m := re.search(r"bootstrap admin: (\S+) / (\S+)", line):
                self.password = m.group(2)
            if "serving on" in line:
                serving.set()

    async def _end(self, sig: int) -> int:
        assert self.proc
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        rc = await asyncio.wait_for(self.proc.wait(), WAIT)
        if self._reader:
            await asyncio.wait({self._reader}, timeout=5)
        return rc

    async def kill(self) -> int:
        return await self._end(signal.SIGKILL)

    async def stop(self) -> int:
        return await self._end(signal.SIGTERM)

    async def close(self) -> None:
        if self.proc and self.proc.returncode is None:
            await self.kill()

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with self.http.request(method, self.base + path, headers=headers, **kw) as r:
            body: Any = await r.json() if r.content_type == "application/json" \
                else await r.text()
            return r.status, body

    async def issue_key(self, area: str, name: str) -> str:
        status, cred = await self.call("POST", "/api/v1/nodes",
                                       json={"name": name, "area": area})
        assert status == 201, cred
        return str(cred["key"])

    async def link_state(self) -> str | None:
        status, body = await self.call("GET", "/api/v1/nodes")
        assert status == 200, body
        return body["upstream"]["state"] if body["upstream"] else None


async def chain(where: Path, http: aiohttp.ClientSession,
                levels: list[tuple[str, str]]) -> list[NodeProcess]:
    """[(name, area), ...] from the top: the first node is the root, each next one the child of
    the one before it for its area. Started in order; the caller closes them."""
    nodes: list[NodeProcess] = []
    for name, area in levels:
        up = None
        if nodes:
            parent = nodes[-1]
            up = (parent.base, await parent.issue_key(area, f"Nút {name}"), [area])
        nodes.append(NodeProcess(where, name, http, up))
        await nodes[-1].start()
    return nodes


# ---- in-process nodes (loa.web.testing), linked the same way --------------------------------------
# (tests/relay/test_upstream.py holds copies of these; they belong here.)
DISTRICT = "T01-H1"
COMMUNE = "T01-H1-X1"
ADMIN = "qtvtinh"  # the province's admin on every node


async def people(node: Node) -> None:
    if not await node.store.find("user", username=ADMIN):
        await add_user(node.store, node.tree, ADMIN, "admin", "T01", PASSWORD, emergency=True)


async def api(http: aiohttp.ClientSession, base: str, method: str, path: str,
              token: str | None = None, **kw: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, base + path, headers=headers, **kw) as r:
        return r.status, await r.json()


def node_config(where: Path) -> Config:
    where.mkdir()
    return make_config(where)


def child_config(where: Path, url: str, key: str, areas: list[str]) -> Config:
    cfg = node_config(where)
    cfg.upstream.url, cfg.upstream.key, cfg.upstream.areas = url, key, areas
    cfg.upstream.hold_s = 0.5
    return cfg


async def issue_key(http: aiohttp.ClientSession, base: str, area: str) -> tuple[str, Any]:
    """The parent's admin logs in and registers a child node for `area`: (token, record+key)."""
    status, out = await api(http, base, "POST", "/api/v1/auth/token",
                            json={"username": ADMIN, "password": PASSWORD})
    assert status == 201, out
    status, cred = await api(http, base, "POST", "/api/v1/nodes", out["token"],
                             json={"name": f"Nút {area}", "area": area})
    assert status == 201, cred
    return out["token"], cred


@dataclass
class Linked:
    """A parent and a child node in this process, the child linked for DISTRICT."""

    parent: LiveNode
    child: LiveNode
    http: aiohttp.ClientSession
    token: str  # the parent's admin
    cred: Any  # the child's node key record on the parent, with "key"


@asynccontextmanager
async def linked(where: Path, configure: Callable[[Config], None] | None = None,
                 configure_parent: Callable[[Config], None] | None = None
                 ) -> AsyncIterator[Linked]:
    pcfg = node_config(where / "parent")
    if configure_parent is not None:
        configure_parent(pcfg)
    parent = await start_node(pcfg, prepare=people)
    http = aiohttp.ClientSession()
    child: LiveNode | None = None
    try:
        token, cred = await issue_key(http, parent.url, DISTRICT)
        cfg = child_config(where / "child", parent.url, cred["key"], [DISTRICT])
        if configure is not None:
            configure(cfg)
        child = await start_node(cfg, prepare=people)
        yield Linked(parent, child, http, token, cred)
    finally:
        if child is not None:
            await child.stop()
        await parent.stop()
        await http.close()
