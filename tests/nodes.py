"""Real node processes for the level tests: a chain of `loa serve` processes on loopback
(loa.web.nodeproc starts, links and kills them), tone files to air through the API, and an
area's HTTP Opus stream on a node, decoded by FFmpeg (PyAV) to the frequency it carries."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np

from loa.web.nodeproc import Chain, NodeApi, NodeProcess
from tests.apiclient import SAMPLE_CSV, tone_file
from tests.audio import peak_hz, rms

WAIT = 60.0  # bound for waits on events across processes (never a speed check)


@asynccontextmanager
async def chain(tmp_path: Path, areas: list[str], **upstream: Any) -> AsyncIterator[Chain]:
    """Node i serves areas[i], child of node i - 1; killed on leaving, also after a failure."""
    async with aiohttp.ClientSession() as http:
        c = Chain(tmp_path, SAMPLE_CSV, areas, http, {"hold_s": 0.5, **upstream})
        try:
            await c.start()
            await c.linked(WAIT)
            yield c
        finally:
            await c.close()


async def air_tone(api: NodeApi, tmp_path: Path, hz: float, targets: list[str], klass: str,
                   title: str, seconds: float = 120) -> str:
    """Upload a tone as `title` and air it on `targets` in `klass`: the broadcast id."""
    path = await asyncio.to_thread(tone_file, tmp_path / f"tone-{hz:g}-{time.monotonic_ns()}.wav",
                                   hz, seconds)
    media = await api.upload(path, title)
    return await api.air(media, targets, klass)


def _decode_ogg(data: bytes) -> np.ndarray:
    out: list[np.ndarray] = []
    with contextlib.suppress(av.error.InvalidDataError, av.error.EOFError):
        with av.open(io.BytesIO(data), format="ogg") as f:
            for frame in f.decode(audio=0):
                out.append(frame.to_ndarray().reshape(-1).astype(np.float32))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


async def listen(node: NodeProcess, area: str, seconds: float = 0.6) -> tuple[float, float]:
    """(peak Hz, RMS) of the last `seconds` of `area`'s Opus stream on `node`, as a loudspeaker
    pulls it (no burst: what airs from now on)."""
    got = bytearray()
    url = f"{node.url}/streams/{area}.opus?burst_ms=0"
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200, r.status
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds + 0.5  # the encoder's and the batcher's delay
        while loop.time() < end:
            try:
                chunk = await asyncio.wait_for(r.content.readany(), end - loop.time())
            except TimeoutError:
                break
            if not chunk:
                break
            got += chunk
    pcm = await asyncio.to_thread(_decode_ogg, bytes(got))
    pcm = pcm[-int(seconds * 48_000):]
    if pcm.shape[0] < 48_000 * seconds * 0.5:
        return 0.0, 0.0
    return peak_hz(pcm, 48_000), rms(pcm)


async def hears(node: NodeProcess, area: str, hz: float, what: str,
                timeout: float = WAIT) -> None:
    """Wait until `area` on `node` carries a tone of `hz` (within 8 Hz, not silence)."""
    deadline = time.monotonic() + timeout
    heard: tuple[float, float] = (0.0, 0.0)
    while time.monotonic() < deadline:
        heard = await listen(node, area)
        if abs(heard[0] - hz) < 8 and heard[1] > 0.05:
            return
    raise AssertionError(f"{what}: {area} on {node.name} carries {heard[0]:.0f} Hz "
                         f"(rms {heard[1]:.3f}), not {hz:g} Hz")


async def eventually(fn: Any, what: str, timeout: float = WAIT) -> Any:
    """Poll an async predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            if result := await fn():
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def on_air(api: NodeApi, area: str) -> dict[str, Any]:
    """What `area` airs on the node, and the node's on-air broadcast records by id."""
    out = await api.ok("GET", "/api/v1/broadcasts")
    where = next(a for a in out["areas"] if a["area"] == area)
    return {"area": where, "records": {r["id"]: r for r in out["broadcasts"]},
            "all": out["broadcasts"]}
