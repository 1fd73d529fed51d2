"""Slowloris: a client that never finishes its request headers is disconnected after
`[server] header_timeout`; a long-lived stream is not."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp

from loa.web.serve import serve
from tests.apiclient import make_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def closed(reader: asyncio.StreamReader, limit: float) -> bool:
    """True when the server closes the connection (EOF) within `limit` (which only ends a hung
    test): whatever it sends first (nothing, or a 408/400) is read and ignored."""
    try:
        async with asyncio.timeout(limit):
            while await reader.read(4096):
                pass
        return True
    except TimeoutError:
        return False


async def test_partial_requests_are_cut_streams_are_not(tmp_path: Path):
    cfg = make_config(tmp_path)
    port = free_port()
    cfg.server.http = f"127.0.0.1:{port}"
    cfg.server.header_timeout = 1.0
    ready, stop = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(cfg, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 60)
    try:
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{port}/streams/T01-H1-X1.mp3") as stream:
            opened = asyncio.get_running_loop().time()
            assert stream.status == 200
            # Half a request line, then nothing.
            r1, w1 = await asyncio.open_connection("127.0.0.1", port)
            w1.write(b"GET /healthz HT")
            # Headers trickled one byte at a time, never finished (the slowloris).
            r2, w2 = await asyncio.open_connection("127.0.0.1", port)

            async def trickle() -> None:
                for b in b"GET /healthz HTTP/1.1\r\nHost: loa\r\nX-Slow: " + b"a" * 200:
                    w2.write(bytes([b]))
                    await asyncio.sleep(0.2)

            dribble = asyncio.create_task(trickle())
            try:
                assert await closed(r1, 30), "a half request line held the connection"
                assert await closed(r2, 30), "trickled headers held the connection"
            finally:
                dribble.cancel()
                w1.close()
                w2.close()
            # The stream opened before all this is still flowing, well past the timeout.
            loop = asyncio.get_running_loop()
            until = opened + 3 * cfg.server.header_timeout
            async with asyncio.timeout(60):
                while loop.time() < until:
                    assert await stream.content.readany(), "the stream was cut"
            assert not stream.content.at_eof()
        # A complete request is answered as always.
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert r.status == 200
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
