"""Nothing lost: the as-run log and the broadcast records survive crashes, store outages and a
sick disk, with a real `loa serve` process, a real Redis behind a proxy and real mounts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from loa.streamer.broadcast import Broadcast
from loa.streamer.sources import ToneSource
from tests.apiclient import Api, approved_programme, make_config, running_api, tone_file
from tests.faults import TcpProxy, fill, remount, tmpfs
from tests.helpers import delete_prefix, until

WAIT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """`loa serve` as a child process on a data directory (and optionally a store URL)."""

    def __init__(self, data: Path, store: str = "sqlite") -> None:
        self.data = data
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "LOA_STORE": store, "LOA_AREAS_ROOT_CODE": "T01"}
        self.proc: asyncio.subprocess.Process | None = None
        self.output: list[str] = []
        self.password: str | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Serve:
        self.output = []
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loa.web.cli", "serve", "--data", str(self.data),
            "--http", f"127.0.0.1:{self.port}", env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        serving = asyncio.Event()
        self._reader = asyncio.create_task(self._read(serving))
        await asyncio.wait({self._reader, asyncio.create_task(serving.wait())},
                                     timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        assert serving.is_set(), "loa serve did not start:\n" + "".join(self.output)
        return self

    async def _read(self, serving: asyncio.Event) -> None:
        assert self.proc and self.proc.stdout
        while line := (await self.proc.stdout.readline()).decode(errors="replace"):
            self.output.append(line)
            if m := re.search(r"bootstrap admin: (\S+) / (\S+)", line):
                self.password = m.group(2)
            if "serving on" in line:
                serving.set()

    async def stop(self, sig: int) -> int:
        assert self.proc
        self.proc.send_signal(sig)
        rc = await asyncio.wait_for(self.proc.wait(), WAIT)
        if self._reader:
            await asyncio.wait({self._reader}, timeout=5)
        return rc

    async def close(self) -> None:
        if self.proc and self.proc.returncode is None:
            await self.stop(signal.SIGKILL)


class Client:
    def __init__(self, base: str, http: aiohttp.ClientSession) -> None:
        self.base = base
        self.http = http
        self.token = ""

    async def start(self, srv: Serve) -> None:
        """Start the server and log in as its bootstrap admin."""
        await srv.start()
        assert srv.password
        await self.login(srv.password)

    async def login(self, password: str) -> None:
        status, body = await self.call("POST", "/api/v1/auth/token",
                                       json={"username": "admin", "password": password})
        assert status == 201, body
        self.token = body["token"]

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with self.http.request(method, self.base + path, headers=headers, **kw) as r:
            body: Any = await r.json() if r.content_type == "application/json" \
                else await r.text()
            return r.status, body

    async def air(self, audio: Path) -> dict[str, Any]:
        """Upload `audio` and air it on the root area; the broadcast record."""
        form = aiohttp.FormData()
        form.add_field("title", "Bản tin")
        form.add_field("file", audio.read_bytes(), filename=audio.name)
        status, media = await self.call("POST", "/api/v1/media", data=form)
        assert status == 201, media
        status, b = await self.call("POST", "/api/v1/broadcasts",
                                    json={"media": media["id"], "targets": ["T01"]})
        assert status == 201, b
        return dict(b)

    async def entries(self, bid: str) -> list[dict[str, Any]]:
        status, body = await self.call("GET", f"/api/v1/reports/asrun?to={time.time() + 60}")
        assert status == 200, body
        return [e for e in body["entries"] if e["broadcast"] == bid]


async def eventually(fn: Any, what: str, timeout: float = WAIT) -> Any:
    """Poll an async predicate until it returns something truthy; the timeout ends a hang."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            if result := await fn():
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def open_marked(c: Client, bid: str, n: int) -> dict[str, Any]:
    """The n-th entry of `bid`, open and marked on air at least 2 s after it started."""
    async def ready() -> dict[str, Any] | None:
        rows = await c.entries(bid)
        if len(rows) == n and rows[-1].get("on_air") and (rows[-1]["seen"] or 0) > rows[-1]["start"] + 2:
            return rows[-1]
        return None
    result: dict[str, Any] = await eventually(ready, f"as-run entry {n} of {bid} marked on air")
    return result


async def test_every_segment_is_in_the_as_run_log_across_kill_and_sigterm(tmp_path: Path) -> None:
    tone = tone_file(tmp_path / "tone.mp3", 440, 300, ("-b:a", "32k"))
    srv = Serve(tmp_path / "data")
    async with aiohttp.ClientSession() as http:
        c = Client(srv.base, http)
        try:
            await c.start(srv)
            bid = (await c.air(tone))["id"]
            await open_marked(c, bid, 1)
            killed = time.time()
            assert await srv.stop(signal.SIGKILL) == -signal.SIGKILL
            restarted = time.time()
            await c.start(srv)
            await open_marked(c, bid, 2)
            termed = time.time()
            assert await srv.stop(signal.SIGTERM) == 0
            await c.start(srv)
            rows = await eventually(lambda: c.entries(bid), "the third segment")
            status, csv_text = await c.call("GET", f"/api/v1/reports/asrun?format=csv"
                                                   f"&to={time.time() + 60}")
        finally:
            await srv.close()
    assert [r["area"] for r in rows] == ["T01"] * 3, rows
    first, second, third = rows
    # The crash loses at most the seconds since the last "still on air" mark.
    assert first["end_cause"] == "crash"
    assert first["start"] < first["end"] <= killed + 0.5
    assert first["end"] > killed - 10, (first, killed)
    assert second["end_cause"] == "shutdown"
    assert first["end"] <= second["start"] and second["start"] >= restarted - 0.5
    assert termed - 0.5 <= second["end"] <= termed + 10
    assert third["on_air"] is True and third["end"] is None and third["start"] >= second["end"]
    assert "đang phát / on air" in csv_text and csv_text.count(bid) == 3


# ---- store outage during a broadcast -------------------------------------------------------------
@pytest.fixture
async def proxy(redis_url: str) -> AsyncIterator[TcpProxy]:
    p = await TcpProxy.redis(redis_url)
    try:
        yield p
    finally:
        await p.close()


@asynccontextmanager
async def airing(tmp_path: Path, proxy: TcpProxy, prefix: str
                 ) -> AsyncIterator[tuple[Api, dict[str, Any]]]:
    """A node on Redis through `proxy`, airing 7.5 s of an approved programme to one commune
    for 1 s, its writes done."""
    tone = tone_file(tmp_path / "tone.wav", 440, 3)
    async with running_api(make_config(tmp_path, store=proxy.url(), prefix=prefix)) as api:
        prog = await approved_programme(api, tone, author="huyen1")
        status, b = await api.call("huyen1", "POST", "/api/v1/broadcasts",
                                   json={"programme": prog, "targets": ["T01-H1-X1"]})
        assert status == 201, b
        api.run(1.0)
        await api.node.station.flush()
        yield api, b


async def test_a_store_outage_delays_the_as_run_log_and_the_end_of_a_broadcast(
        tmp_path: Path, proxy: TcpProxy, redis_prefix: str) -> None:
    async with airing(tmp_path, proxy, redis_prefix) as (api, b):
        proxy.set("close")  # Redis is gone while the broadcast ends by itself
        api.run(9.0)
        await asyncio.sleep(0)
        assert api.node.engine.live_broadcast(b["id"]) is None
        r = await api.client.get("/api/v1/broadcasts", headers=api.auth("huyen1"))
        assert r.status == 503 and int(r.headers["Retry-After"]) > 0
        assert "kho dữ liệu" in (await r.json())["error"]
        await until(lambda: api.node.station.store_down is not None, "a failed write", timeout=WAIT)
        proxy.set("pass")
        await asyncio.wait_for(api.node.station.flush(), WAIT)
        rec = await api.node.store.get("broadcast", b["id"])
        assert rec is not None and rec["status"] == "ended" and rec["end_cause"] == "finished"
        rows = [e for e in await api.node.store.read_log("asrun") if e["broadcast"] == b["id"]]
        assert [e["area"] for e in rows] == ["T01-H1-X1"]
        assert abs(rows[0]["seconds"] - 7.5) < 0.05 and rows[0]["end_cause"] == "finished"
        assert await api.node.store.find("onair") == []


async def test_a_record_whose_end_was_dropped_is_reconciled_when_the_store_returns(
        tmp_path: Path, proxy: TcpProxy, redis_prefix: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with airing(tmp_path, proxy, redis_prefix) as (api, b):
        monkeypatch.setattr("loa.streamer.station.QUEUE_MAX", 2)  # most writes are dropped
        proxy.set("close")

        def music(area: str) -> None:  # an on-air change, so a write for the queue
            api.node.engine.start(Broadcast(ToneSource(330), [area], issuer=area))
            api.run(0.2)

        music("T01-H1-X2")  # its write is the one in flight, retried
        await asyncio.sleep(0)
        await until(lambda: api.node.station.store_down is not None, "a failed write", timeout=WAIT)
        api.run(9.0)  # the broadcast ends: its as-run entry and its end wait in the queue
        await asyncio.sleep(0)
        music("T01-H1-X3")  # and push them out of the full queue
        await asyncio.sleep(0)
        assert api.node.station.dropped > 0
        proxy.set("pass")
        await asyncio.wait_for(api.node.station.flush(), WAIT)
        rec = await api.node.store.get("broadcast", b["id"])
        assert rec is not None and rec["status"] == "ended", rec
        assert rec["end_cause"] == "reconciled"
        status, body = await api.call("huyen1", "GET", "/api/v1/broadcasts")
        assert status == 200 and body["broadcasts"] == []  # no ghost on air
        # Its as-run entry (its close was dropped) is closed at its last mark, not left open.
        assert {e["area"] for e in await api.node.store.find("onair")} == {"T01-H1-X2",
                                                                          "T01-H1-X3"}
        rows = [e for e in await api.node.store.read_log("asrun") if e["broadcast"] == b["id"]]
        assert [(e["area"], e["end_cause"]) for e in rows] == [("T01-H1-X1", "reconciled")]
        assert rows[0]["start"] <= rows[0]["end"]


# ---- a sick disk at start-up -------------------------------------------------------------------
@pytest.mark.parametrize("sickness", ["full", "read-only"])
async def test_a_node_on_a_full_or_read_only_disk_starts_degraded_and_airs_what_is_stored(
        tmp_path: Path, sickness: str) -> None:
    tone = tone_file(tmp_path / "tone.mp3", 440, 60, ("-b:a", "32k"))
    with tmpfs("24m") as disk:
        srv = Serve(disk / "data")
        async with aiohttp.ClientSession() as http:
            c = Client(srv.base, http)
            try:
                await c.start(srv)  # its token stays valid across the restart
                b = await c.air(tone)
                assert await srv.stop(signal.SIGTERM) == 0
                if sickness == "full":
                    fill(disk)
                else:
                    remount(disk, "ro")
                await srv.start()  # today: the failed write aborts start-up

                async def on_air() -> bool:
                    status, listing = await c.call("GET", "/api/v1/broadcasts")
                    assert status == 200, listing
                    return [a["broadcast"] for a in listing["areas"]] == [b["id"]]
                await eventually(on_air, "the stored broadcast on air again")
                status, health = await c.call("GET", "/healthz")
                assert status == 200 and health["status"] == "degraded", health
                assert health["store"]["writable"] is False and health["store"]["reason"]
                status, ready = await c.call("GET", "/readyz")
                assert status == 503 and ready["ready"] is False, ready
                if sickness == "read-only":
                    assert ready["disk"]["writable"] is False
                else:
                    assert ready["disk"]["free_mb"] < ready["disk"]["min_free_mb"]
                async with http.post(srv.base + "/api/v1/broadcasts",
                                     headers={"Authorization": f"Bearer {c.token}"},
                                     json={"media": b["spec"]["media"], "targets": ["T01"]}) as r:
                    body = await r.json()
                    assert r.status == 503 and int(r.headers["Retry-After"]) > 0, body
                assert "kho dữ liệu không ghi được / store is read-only or full" in body["error"]
                status, mon = await c.call("GET", "/api/v1/monitor")
                assert status == 200 and mon["node"]["store"]["writable"] is False
                status, page = await c.call("GET", "/monitor")
                assert status == 200 and 'id="store-degraded"' in page
            finally:
                await srv.close()
                if sickness == "read-only":
                    remount(disk, "rw")
    assert "Traceback" not in "".join(srv.output), "".join(srv.output)


# ---- a Redis outage with a real server -----------------------------------------------------------
async def test_a_redis_outage_answers_503_and_the_streams_and_the_clock_go_on(
        tmp_path: Path, proxy: TcpProxy, redis_url: str, redis_prefix: str) -> None:
    srv = Serve(tmp_path / "data", store=proxy.url())
    srv.env["LOA_STORE_PREFIX"] = redis_prefix
    received = 0

    async def listen(http: aiohttp.ClientSession) -> None:
        nonlocal received
        async with http.get(srv.base + "/streams/T01.mp3") as r:
            assert r.status == 200
            async for chunk in r.content.iter_any():
                received += len(chunk)

    async def streaming() -> None:  # the listener gets 8 KB more (1/4 s of 32 kbit/s is 1 KB)
        start = received
        await until(lambda: received > start + 8192, "more of the stream", timeout=WAIT)

    async def me(c: Client) -> tuple[int, str, float]:
        t0 = time.monotonic()
        async with c.http.get(c.base + "/api/v1/me",
                              headers={"Authorization": f"Bearer {c.token}"}) as r:
            await r.read()
            return r.status, r.headers.get("Retry-After", ""), time.monotonic() - t0

    async def clock_runs(c: Client) -> None:
        status, first = await c.call("GET", "/healthz")
        assert status == 200
        await eventually(lambda: _later(c, first["media_time"]), "the media clock")

    try:
        async with aiohttp.ClientSession() as http:
            c = Client(srv.base, http)
            await c.start(srv)
            assert (await me(c))[0] == 200
            listener = asyncio.create_task(listen(http))
            await streaming()
            status, ready = await c.call("GET", "/readyz")
            assert status == 200 and ready["ready"] is True, ready
            for mode in ("blackhole", "close"):
                proxy.set(mode)
                status, retry_after, took = await me(c)
                print(f"{mode}: GET /api/v1/me answered {status} in {took:.2f} s")
                assert status == 503 and int(retry_after) > 0
                status, ready = await c.call("GET", "/readyz")
                assert status == 503 and ready["store"]["writable"] is False, ready
                await clock_runs(c)
                await streaming()
                assert not listener.done()
            proxy.set("pass")
            await eventually(lambda: _ok(me(c)), "the API back with the store")
            await eventually(lambda: _ready(c), "ready again")
            listener.cancel()
    finally:
        await srv.close()
        await delete_prefix(redis_url, redis_prefix)
    out = "".join(srv.output)
    assert "Traceback" not in out and "event=http_500" not in out, out


async def _later(c: Client, media_time: float) -> bool:
    status, health = await c.call("GET", "/healthz")
    return status == 200 and health["media_time"] > media_time + 0.5


async def _ok(call: Any) -> bool:
    return bool((await call)[0] == 200)


async def _ready(c: Client) -> bool:
    return (await c.call("GET", "/readyz"))[0] == 200
