"""Two nodes in this process (loa.web.testing), each with its own data directory, the child
linked to the parent for a district by a key the parent issued: for the tests of what goes up
the link (tests/nodes.py runs real node processes). tests/relay/test_upstream.py holds copies of
the small helpers here."""

from __future__ import annotations

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
from tests.apiclient import PASSWORD, make_config

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
    assert status == 201 and cred["area"] == area and "key_hash" not in cred, cred
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
