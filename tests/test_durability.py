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
from pathlib import Path
from typing import Any

import aiohttp

from tests.apiclient import tone_file

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
        if len(rows) == n and rows[-1].get("on_air") and rows[-1]["seen"] > rows[-1]["start"] + 2:
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
            await srv.start()
            assert srv.password
            await c.login(srv.password)
            form = aiohttp.FormData()
            form.add_field("title", "Bản tin dài")
            form.add_field("file", tone.read_bytes(), filename=tone.name)
            status, media = await c.call("POST", "/api/v1/media", data=form)
            assert status == 201, media
            status, b = await c.call("POST", "/api/v1/broadcasts",
                                     json={"media": media["id"], "targets": ["T01"]})
            assert status == 201, b
            bid = b["id"]
            await open_marked(c, bid, 1)
            killed = time.time()
            assert await srv.stop(signal.SIGKILL) == -signal.SIGKILL
            restarted = time.time()
            await srv.start()
            await c.login(srv.password)
            await open_marked(c, bid, 2)
            termed = time.time()
            assert await srv.stop(signal.SIGTERM) == 0
            await srv.start()
            await c.login(srv.password)
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
