"""`loa serve` as a child process, each with its own data directory and config file, on
loopback: for the tests and the benchmark that need real node processes (levels linked over the
network, a node killed and restarted on its address).

Robust by construction: a free port is taken at first start and kept across restarts (a child
node's config names it); start waits for `/readyz` to answer 200 (or the process to die, with its
output in the error); kill and stop are by the process's own id; `close` never leaves one behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

LOCAL = "127.0.0.1"
OPERATOR, OPERATOR_PASSWORD = "van-hanh", "mat-khau-van-hanh-1"  # each chain node's operator
START_TIMEOUT = 90.0  # a loaded 2-core machine imports PyAV and aiortc slowly
# One process per node: fan-out and WHEP workers would triple the processes of a chain.
BASE_TOML = """
[http_streams]
workers = 0
[webrtc]
workers = 0
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class NodeProcess:
    """One `loa serve`. `sections` are TOML sections (name -> keys) added to its config file."""

    name: str
    root: Path  # its own directory: config, data, log
    areas_csv: str = ""  # the official units list imported at first start
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    port: int = 0
    proc: asyncio.subprocess.Process | None = None
    password: str | None = None  # the bootstrap admin's, printed once at first start
    output: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCAL}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        lines = [BASE_TOML, "[server]", f'http = "{LOCAL}:{self.port}"',
                 f"data = {toml_value(str(self.root / 'data'))}", "[areas]"]
        if self.areas_csv:
            csv = self.root / "areas.csv"
            csv.write_text(self.areas_csv, encoding="utf-8")
            lines.append(f"csv = {toml_value(str(csv))}")
        for section, keys in self.sections.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
        path = self.root / "loa.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    async def start(self, within: float = START_TIMEOUT) -> NodeProcess:
        """Start (or restart on the same port) and wait until `/readyz` answers 200."""
        assert not self.running, f"{self.name} is running"
        self.port = self.port or free_port()
        config = self.write_config()
        # The node reads its config file only: no LOA_* of this environment leaks into it.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOA_")}
        self.output = []
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loa.web.cli", "serve", "--config", str(config), env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        try:
            await self._ready(within)
        except BaseException:
            await self.kill()
            raise
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        log = (self.root / "output.log").open("a", encoding="utf-8")
        try:
            while line := (await self.proc.stdout.readline()).decode(errors="replace"):
                self.output.append(line)
                log.write(line)
                if m := re.search(r"bootstrap admin: (\S+) / (\S+)", line):
                    self.password = m.group(2)
        finally:
            log.close()

    async def _ready(self, within: float) -> None:
        deadline = time.monotonic() + within
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                if not self.running:
                    raise RuntimeError(f"loa serve {self.name} exited:\n" + self.tail())
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                    async with http.get(self.url + "/readyz") as r:
                        if r.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"loa serve {self.name} not ready:\n" + self.tail())
                await asyncio.sleep(0.1)

    def tail(self, n: int = 40) -> str:
        return "".join(self.output[-n:])

    def logged(self, pattern: str) -> list[str]:
        return [line for line in self.output if re.search(pattern, line)]

    async def _end(self, sig: int, grace: float) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=5)
        return proc.returncode

    async def kill(self) -> int | None:
        """SIGKILL: a crash, nothing cleaned up."""
        return await self._end(signal.SIGKILL, 10.0)

    async def stop(self) -> int | None:
        """SIGTERM: a clean shutdown (killed if it takes longer than 30 s)."""
        return await self._end(signal.SIGTERM, 30.0)

    def cpu_seconds(self) -> float:
        """User + system CPU the process used so far (Linux /proc)."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class NodeApi:
    """The REST API of a node process, as its bootstrap admin (or another user)."""

    def __init__(self, proc: NodeProcess, http: aiohttp.ClientSession) -> None:
        self.proc = proc
        self.http = http
        self.token = ""

    async def login(self, username: str = "admin", password: str | None = None) -> str:
        status, out = await self.call("POST", "/api/v1/auth/token", json={
            "username": username, "password": password or self.proc.password})
        if status != 201:
            raise RuntimeError(f"login on {self.proc.name}: {status} {out}")
        self.token = out["token"]
        return self.token

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with self.http.request(method, self.proc.url + path, headers=headers,
                                     **kw) as r:
            body: Any = await r.json() if r.content_type == "application/json" \
                else await r.text()
            return r.status, body

    async def ok(self, method: str, path: str, **kw: Any) -> Any:
        status, body = await self.call(method, path, **kw)
        if status >= 300:
            raise RuntimeError(f"{method} {path} on {self.proc.name}: {status} {body}")
        return body

    async def node_key(self, area: str, name: str) -> str:
        """Register a child node for `area` here; its key (`<id>.<secret>`)."""
        rec = await self.ok("POST", "/api/v1/nodes", json={"name": name, "area": area})
        return str(rec["key"])

    async def upload(self, path: Path, title: str) -> str:
        form = aiohttp.FormData()
        form.add_field("title", title)
        form.add_field("file", await asyncio.to_thread(path.read_bytes), filename=path.name)
        return str((await self.ok("POST", "/api/v1/media", data=form))["id"])

    async def air(self, media: str, targets: list[str], klass: str) -> str:
        rec = await self.ok("POST", "/api/v1/broadcasts",
                            json={"media": media, "targets": targets, "class": klass})
        return str(rec["id"])

    async def upstream(self) -> dict[str, Any]:
        """This node's link to its parent, as `GET /api/v1/nodes` shows it."""
        return dict((await self.ok("GET", "/api/v1/nodes"))["upstream"] or {})


@dataclass
class Chain:
    """Node processes linked parent to child: node i serves `areas[i]` and is the parent of
    node i + 1, with a key node i issued for it (`POST /api/v1/nodes`)."""

    root: Path
    areas_csv: str
    areas: list[str]
    http: aiohttp.ClientSession
    upstream: dict[str, Any] = field(default_factory=dict)  # more [upstream] keys (hold_s ...)
    # The URL node i reaches its parent at, from the parent's own (a proxy that drops the link)
    via: Callable[[int, str], Awaitable[str]] | None = None
    nodes: list[NodeProcess] = field(default_factory=list)
    apis: list[NodeApi] = field(default_factory=list)  # each node's bootstrap admin (root area)
    ops: list[NodeApi] = field(default_factory=list)  # each node's operator of its own area

    async def start(self) -> Chain:
        for i, area in enumerate(self.areas):
            sections: dict[str, dict[str, Any]] = {}
            if i:
                key = await self.apis[i - 1].node_key(area, f"node {i} {area}")
                url = self.nodes[i - 1].url
                if self.via is not None:
                    url = await self.via(i, url)
                sections["upstream"] = {"url": url, "key": key,
                                        "areas": [area], **self.upstream}
            proc = NodeProcess(f"n{i}-{area}", self.root / f"n{i}", self.areas_csv, sections)
            self.nodes.append(proc)
            await proc.start()
            api = NodeApi(proc, self.http)
            await api.login()
            self.apis.append(api)
            # Airs as its own level: an approver of the node's area holding the emergency right.
            await api.ok("POST", "/api/v1/users", json={
                "username": OPERATOR, "role": "approver", "area": area,
                "password": OPERATOR_PASSWORD, "emergency": True})
            op = NodeApi(proc, self.http)
            await op.login(OPERATOR, OPERATOR_PASSWORD)
            self.ops.append(op)
        return self

    async def linked(self, within: float = 30.0) -> None:
        """Every link up (a node's upstream state, through its API)."""
        deadline = time.monotonic() + within
        while True:
            states = [(await a.upstream()).get("state") for a in self.apis[1:]]
            if all(s == "up" for s in states):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"links not up: {states}")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        for proc in reversed(self.nodes):
            await proc.kill()
