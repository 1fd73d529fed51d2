"""Uploads under abuse and at scale: declared sizes, many parts, long files, a full disk, and
content deduplication that never hands one commune's record to another."""

from __future__ import annotations

import asyncio

import pytest

from tests.apiclient import Api, make_config, running_api


@pytest.fixture
async def api(tmp_path):
    async with running_api(make_config(tmp_path, max_mb=1, max_seconds=600)) as a:
        yield a


async def raw_request(api: Api, head: list[str], body: bytes) -> tuple[bytes, bytes]:
    """Send a request head and the first bytes of a body, then only read: the status line and
    what follows until the server closes (b"" at the end means it closed)."""
    port = api.client.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join([*head, "Host: 127.0.0.1"]) + "\r\n\r\n").encode() + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 20.0)  # until the server closes
    finally:
        writer.close()
    status, _, rest = response.partition(b"\r\n")
    return status, rest


@pytest.mark.parametrize("path,ctype", [("/api/v1/media", "multipart/form-data; boundary=x"),
                                        ("/api/v1/tts", "application/json")])
async def test_declared_length_over_the_limit_is_refused_before_the_body(api, path, ctype):
    token = api.tokens["xa11"]
    status, rest = await raw_request(api, [
        f"POST {path} HTTP/1.1", f"Authorization: Bearer {token}", f"Content-Type: {ctype}",
        f"Content-Length: {250 * 2**20}"], b"--x\r\n")
    assert status == b"HTTP/1.1 413 Request Entity Too Large", (status, rest)
    assert b"request body too large" in rest
    assert b"\r\nconnection: close\r\n" in rest.lower()  # closed, the rest never read
    assert await api.node.store.count("media") == 0
