"""A running Loa node (embedded SQLite or Redis) with an HTTP client, for API tests."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer
from argon2 import PasswordHasher

from loa.streamer.clock import VirtualClock
from loa.web import auth
from loa.web.app import create_app
from loa.web.auth import add_user
from loa.web.config import Config, load_config
from loa.web.node import Node

SAMPLE_CSV = """code,name,level,parent_code
T01,Tỉnh Mẫu,province,
T01-H1,Huyện 1,district,T01
T01-H1-X1,Xã 1 huyện 1,commune,T01-H1
T01-H1-X2,Xã 2 huyện 1,commune,T01-H1
T01-H1-X3,Xã 3 huyện 1,commune,T01-H1
T01-H2,Huyện 2,district,T01
T01-H2-X1,Xã 1 huyện 2,commune,T01-H2
T01-H2-X2,Xã 2 huyện 2,commune,T01-H2
T01-H2-X3,Xã 3 huyện 2,commune,T01-H2
"""

PASSWORD = "mat-khau-123"

# username -> (role, area, emergency)
PEOPLE = {
    "tinh": ("operator", "T01", True),
    "huyen1": ("operator", "T01-H1", False),
    "huyen2": ("operator", "T01-H2", False),
    "xa11": ("operator", "T01-H1-X1", False),
    "xa12": ("operator", "T01-H1-X2", False),
    "duyet1": ("approver", "T01-H1", False),
    "duyet2": ("approver", "T01-H2", False),
    "bientap11": ("editor", "T01-H1-X1", False),
    "xem11": ("viewer", "T01-H1-X1", False),
    "qtv1": ("admin", "T01-H1", False),
}


def make_config(tmp_path: Path, store: str = "sqlite", prefix: str = "loa:",
                **media: Any) -> Config:
    csv = tmp_path / "areas.csv"
    csv.write_text(SAMPLE_CSV, encoding="utf-8")
    cfg = load_config(None, env={}, data=str(tmp_path / "data"))
    cfg.areas.csv = str(csv)
    cfg.store = store
    cfg.store_prefix = prefix
    for k, v in media.items():
        setattr(cfg.media, k, v)
    return cfg


class Api:
    def __init__(self, node: Node, client: TestClient) -> None:
        self.node = node
        self.client = client
        self.tokens: dict[str, str] = {}
        self.clock = VirtualClock(node.engine.tick)

    async def login(self, username: str, password: str = PASSWORD) -> str:
        r = await self.client.post("/api/v1/auth/token",
                                   json={"username": username, "password": password})
        assert r.status == 201, await r.text()
        self.tokens[username] = (await r.json())["token"]
        return self.tokens[username]

    def auth(self, who: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}

    async def call(self, who: str | None, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {**self.auth(who), **kw.pop("headers", {})}
        r = await self.client.request(method, path, headers=headers, **kw)
        ctype = r.headers.get("Content-Type", "")
        body = await r.json() if ctype.startswith("application/json") else await r.text()
        return r.status, body

    async def upload(self, who: str, path: Path, title: str = "") -> tuple[int, Any]:
        form = FormData()
        form.add_field("title", title or path.stem)
        form.add_field("file", path.read_bytes(), filename=path.name)
        return await self.call(who, "POST", "/api/v1/media", data=form)

    def run(self, seconds: float) -> None:
        self.clock.run(int(seconds * 50))


# Tests hash passwords with cheap argon2 parameters: the product's defaults cost ~50 ms a login.
auth._hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


@asynccontextmanager
async def running_api(cfg: Config) -> AsyncIterator[Api]:
    node = Node(cfg, realtime=False)
    await node.start()
    for name, (role, area, emergency) in PEOPLE.items():
        if not await node.store.find("user", username=name):  # a restarted node has them
            await add_user(node.store, node.tree, name, role, area, PASSWORD, emergency)
    client = TestClient(TestServer(create_app(node)))
    await client.start_server()
    api = Api(node, client)
    try:
        for name in PEOPLE:
            await api.login(name)
        yield api
    finally:
        await client.close()
        await node.stop()


def tone_file(path: Path, freq: float = 440, seconds: float = 3, extra: tuple[str, ...] = ()
              ) -> Path:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency={freq}:duration={seconds}", "-ac", "1", *extra, str(path)],
                   check=True)
    return path


# ---- API flows used by several test modules ------------------------------------------------
async def media_id(api: Api, tone: Path, who: str = "xa11") -> str:
    status, body = await api.upload(who, tone)
    assert status == 201, body
    return body["id"]


async def approved_programme(api: Api, tone: Path, author: str = "bientap11",
                             approver: str = "duyet1") -> str:
    mid = await media_id(api, tone, author)
    status, prog = await api.call(author, "POST", "/api/v1/programmes",
                                  json={"title": "Bản tin sáng", "type": "file", "media": mid,
                                        "repeat": 2, "gap": 1.5})
    assert status == 201, prog
    status, body = await api.call(author, "POST", f"/api/v1/programmes/{prog['id']}/submit")
    assert status == 200 and body["status"] == "pending", body
    status, body = await api.call(approver, "POST", f"/api/v1/programmes/{prog['id']}/approve")
    assert status == 200 and body["status"] == "approved", body
    return str(prog["id"])
