"""Real faults for tests: a TCP proxy the test can black-hole or close (a Redis outage), and small
tmpfs mounts it can fill or make read-only (a sick disk). Needs root for the mounts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target. `mode`: "pass" forwards; "blackhole" accepts and
    reads but forwards nothing either way (a partitioned network); "close" drops every
    connection and refuses new ones (the service is down)."""

    def __init__(self, host: str, port: int, db: int = 0) -> None:
        self.target = (host, port)
        self.db = db
        self.mode = "pass"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @classmethod
    async def redis(cls, url: str) -> TcpProxy:
        """A started proxy to the Redis of `redis://host:port/db`."""
        parts = urlsplit(url)
        return await cls(parts.hostname or "127.0.0.1", parts.port or 6379,
                         int(parts.path.strip("/") or 0)).start()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{self.db}"

    def set(self, mode: str) -> None:
        self.mode = mode
        if mode == "close":
            for w in list(self._writers):
                w.transport.abort()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "close":
            writer.transport.abort()
            return
        self._writers.add(writer)
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_w)
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer),
                             return_exceptions=True)
        for w in (writer, up_w):
            self._writers.discard(w)
            w.transport.abort()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            if self.mode == "pass":
                w.write(data)
                await w.drain()
            # blackhole: swallow; close: the writers were aborted
        w.transport.abort()

    async def close(self) -> None:
        if self._server:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()


@contextlib.contextmanager
def tmpfs(size: str = "4m") -> Iterator[Path]:
    """A fresh tmpfs of `size`, unmounted (lazily, if busy) at the end."""
    path = Path(f"/tmp/loa-tmpfs-{uuid.uuid4().hex[:8]}")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        path.rmdir()


def fill(path: Path) -> Path:
    """Fill the file system under `path` to the last byte; returns the filler to delete."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0")
    os.sync()
    return filler


def remount(path: Path, mode: str) -> None:
    """`ro` or `rw`; fails while a file is open for writing on it."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)
