"""Helpers shared by test modules (a test module never imports another one): `until` (wait for an
event), the Prometheus text of /metrics parsed, a test's Redis keys removed, and a real node on
127.0.0.1 with a 440 Hz tone on air and its admin token for device tests (test_agent, test_sim)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from loa.relay.agent.client import provision, register
from loa.streamer.broadcast import Broadcast
from loa.streamer.sources import ToneSource
from loa.web.node import Node
from loa.web.testing import start_node as start_node_on
from tests.apiclient import make_config

# ---- a node for device tests ---------------------------------------------------------------
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
                     port: int = 0, token: str | None = None, store: str = "sqlite",
                     prefix: str = "loa:") -> Server:
    """A node serving on 127.0.0.1 (`port` 0: any), `tone_area` and its children hearing a
    440 Hz tone; `token` reuses an admin token of a node on the same data directory (or the
    same `store`: a node of the same cluster)."""
    data.mkdir(parents=True, exist_ok=True)
    live = await start_node_on(make_config(data, store=store, prefix=prefix),
                               configure=configure, host=LOCAL, port=port, access_log=None)
    node, base = live.node, live.url
    http = aiohttp.ClientSession()
    if token is None:
        async with http.post(f"{base}/api/v1/auth/token",
                             json={"username": "admin",
                                   "password": node.bootstrap_password}) as r:
            assert r.status == 201, await r.text()
            token = (await r.json())["token"]
    node.engine.start(Broadcast(ToneSource(440, 0.3), [tone_area], issuer=tone_area,
                                title="440 Hz"))
    return Server(node, live.app, live.runner, base, http, token, live.port)


async def stop_node(srv: Server) -> None:
    await srv.http.close()
    await srv.runner.cleanup()
    await srv.node.stop()


# ---- waiting ----------------------------------------------------------------------------------
async def until(cond: Callable[[], Any], what: str, timeout: float = 15.0, *,
                step: float = 0.02) -> None:
    """Wait for `cond()` to be true (awaited when it returns a coroutine). The timeout only ends
    a hung test: it is no speed check."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        v = cond()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(step)


# ---- Prometheus text of /metrics ------------------------------------------------------------
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> tuple[Series, dict[str, str]]:
    """Every non-comment line must be `name{labels} value`; HELP and TYPE come before a family's
    samples; no series twice. Returns the series and the declared type of each family."""
    series: Series = {}
    types: dict[str, str] = {}
    helped: set[str] = set()
    assert text.endswith("\n")
    for line in text.splitlines():
        assert line.strip(), "blank line"
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in helped, f"HELP twice for {name}"
            helped.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge"), line
            assert name not in types, f"TYPE twice for {name}"
            types[name] = kind
            continue
        assert not line.startswith("#"), line
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels_text, value = m.groups()
        assert name in types and name in helped, f"{name} sampled before HELP/TYPE"
        labels: set[tuple[str, str]] = set()
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = LABEL.match(labels_text, pos)
                assert lm, f"bad labels in {line!r}"
                raw = lm.group(2)
                labels.add((lm.group(1), re.sub(r"\\(.)", lambda x: {"n": "\n"}.get(
                    x.group(1), x.group(1)), raw)))
                pos = lm.end()
        key = (name, frozenset(labels))
        assert key not in series, f"series twice: {line!r}"
        series[key] = float(value)
    return series, types


def val(series: Series, name: str, **labels: str) -> float | None:
    return series.get((name, frozenset(labels.items())))


async def get_metrics(client: aiohttp.ClientSession | TestClient, url: str = "/metrics"
                      ) -> tuple[Series, dict[str, str]]:
    r = await client.get(url)
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(await r.text())


# ---- Redis ----------------------------------------------------------------------------------
async def delete_prefix(url: str, prefix: str) -> None:
    """Remove a test's keys (under its unique `redis_prefix`) from the shared Redis."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i:i + 1000])
    finally:
        await client.aclose()
