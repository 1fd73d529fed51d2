"""HTTP stream tests' nodes and clients: nodes on 127.0.0.1 serving /streams/ themselves or
through fan-out workers, a raw HTTP/1.1 client, MP3 frame counting, WAV reading. Shared by
tests/relay/test_http_streams.py, tests/relay/test_fanout.py and the console tests (ffmpeg_record)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from loa.relay.icecast import HttpStreamer
from loa.streamer.broadcast import Broadcast
from loa.streamer.sources import ToneSource
from loa.web.node import Node
from loa.web.testing import start_node
from tests.apiclient import make_config

AREA = "T01-H1-X1"


@dataclass
class Server:
    node: Node
    app: web.Application
    runner: web.AppRunner
    port: int

    @property
    def streamer(self) -> HttpStreamer:
        return self.node.http

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def background(self, freq: float = 440, title: str = "Nhạc nền") -> str:
        return self.node.engine.start(Broadcast(ToneSource(freq, 0.3), ["T01-H1"],
                                                issuer="T01-H1", klass="background",
                                                title=title))

    def bulletin(self, freq: float = 1000, title: str = "Bản tin huyện") -> str:
        return self.node.engine.start(Broadcast(ToneSource(freq, 0.3), ["T01-H1"],
                                                issuer="T01-H1", klass="normal", title=title))

    def sent(self, area: str, codec: str) -> int:
        for s in self.streamer.stats()["streams"]:
            if (s["area"], s["codec"]) == (area, codec):
                return int(s["bytes"])
        return 0


Start = Callable[..., Awaitable[Server]]


@contextlib.asynccontextmanager
async def servers(tmp_path: Path, workers: int) -> AsyncIterator[Start]:
    """Start nodes serving HTTP streams themselves (workers = 0) or through fan-out workers."""
    started: list[Server] = []

    async def _start(**settings: Any) -> Server:
        cfg = make_config(tmp_path / f"node{len(started)}")
        cfg.http_streams.workers = workers
        for key, value in settings.items():
            target = cfg.http_streams if hasattr(cfg.http_streams, key) else cfg.encoders
            assert hasattr(target, key), key
            setattr(target, key, value)
        live = await start_node(cfg)
        server = Server(live.node, live.app, live.runner, live.port)
        started.append(server)
        return server

    (tmp_path / "node0").mkdir()
    (tmp_path / "node1").mkdir()
    try:
        yield _start
    finally:
        for s in started:
            await s.runner.cleanup()
            await s.node.stop()


async def open_stream(port: int, path: str, *extra: str, method: str = "GET",
                      user_agent: str = "loa-test"
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str, dict[str, str]]:
    """A raw HTTP/1.1 client: returns the reader after the response head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    req = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"User-Agent: {user_agent}", *extra]
    writer.write(("\r\n".join(req) + "\r\n\r\n").encode())
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("utf-8").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    return reader, writer, lines[0], headers


def mp3_frames(data: bytes) -> int:
    """Count consecutive MPEG-2 layer III frames; fails on any byte that is not a frame."""
    bitrates = [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160]
    rates = [22050, 24000, 16000]
    pos = n = 0
    while pos + 4 <= len(data):
        h = struct.unpack_from(">I", data, pos)[0]
        assert h >> 21 == 0x7FF, f"no MP3 frame sync at byte {pos}"
        assert (h >> 19) & 3 == 2 and (h >> 17) & 3 == 1, "not MPEG-2 layer III"
        br = bitrates[(h >> 12) & 15] * 1000
        sr = rates[(h >> 10) & 3]
        pos += 72 * br // sr + ((h >> 9) & 1)
        n += 1
    return n


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32)
        return pcm / 32768, w.getframerate()


async def ffmpeg_record(url: str, out: Path, seconds: float, timeout: float = 60.0
                        ) -> tuple[np.ndarray, int]:
    """FFmpeg (a real third-party client) records `seconds` of a stream URL to a mono 48 kHz WAV;
    its samples and rate. With ?burst_ms=0 in `url` it hears what airs from now on."""
    proc = await asyncio.create_subprocess_exec(
        "ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", url,
        "-t", str(seconds), "-ac", "1", "-ar", "48000", str(out))
    try:
        assert await asyncio.wait_for(proc.wait(), timeout) == 0, f"ffmpeg failed on {url}"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return read_wav(out)
