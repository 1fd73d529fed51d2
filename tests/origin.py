"""An outside world on 127.0.0.1 for relay inputs: an Icecast-like station sending an MP3 file
in real time (tests/relay/test_inputs.py, tests/web/test_archive.py)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from aiohttp import web


def station_mp3(path: Path, hz: float, seconds: float) -> bytes:
    """`seconds` of `hz`, 44.1 kHz stereo MP3 at 64 kbit/s CBR (what a radio station sends)."""
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency={hz}:duration={seconds}:sample_rate=44100", "-ac", "2",
                    "-af", "volume=2.4", "-c:a", "libmp3lame", "-b:a", "64k", str(path)],
                   check=True)
    return path.read_bytes()


class Origin:
    """An Icecast-like HTTP server: `/live.mp3` sends a CBR MP3 file in real time (with a short
    burst on connect, as Icecast does), plus non-audio content and an SDP file."""

    BYTES_PER_SECOND = 64_000 // 8
    BURST = 0.5
    STEP = 0.1

    def __init__(self, mp3: bytes) -> None:
        self.mp3 = mp3
        self.sdp = ""
        self.port = 0
        self.runner: web.AppRunner | None = None
        self._transports: set[asyncio.BaseTransport] = set()

    async def live(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "audio/mpeg", "icy-name": "test"})
        await resp.prepare(request)
        if request.transport is not None:
            self._transports.add(request.transport)
        loop = asyncio.get_running_loop()
        step = int(self.BYTES_PER_SECOND * self.STEP)
        pos = int(self.BYTES_PER_SECOND * self.BURST)
        try:
            await resp.write(self.mp3[:pos])
            t0 = loop.time()
            k = 0
            while pos < len(self.mp3):
                k += 1
                await asyncio.sleep(max(0.0, t0 + k * self.STEP - loop.time()))
                await resp.write(self.mp3[pos:pos + step])
                pos += step
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            if request.transport is not None:
                self._transports.discard(request.transport)
        return resp

    async def garbage(self, request: web.Request) -> web.Response:
        return web.Response(text="<html><body>Không phải âm thanh</body></html>" * 200,
                            content_type="text/html")

    async def sdp_file(self, request: web.Request) -> web.Response:
        return web.Response(text=self.sdp, content_type="application/sdp")

    async def start(self, port: int = 0) -> int:
        app = web.Application()
        app.router.add_get("/live.mp3", self.live)
        app.router.add_get("/garbage.mp3", self.garbage)
        app.router.add_get("/in.sdp", self.sdp_file)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port or self.port, reuse_address=True)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self.port

    async def kill(self) -> None:
        """The station goes off the air: connections cut, nothing listens on the port."""
        for t in list(self._transports):
            t.abort()  # type: ignore[attr-defined]
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
