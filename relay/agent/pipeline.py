"""The stream supervisor of a device agent: plays the first stream of its configuration it
supports, falls back to the next after a failure, retries with back-off."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from contextlib import suppress
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from loa.relay.agent.errors import InputError
from loa.relay.agent.impair import Impairment
from loa.relay.agent.inputs import HttpOpusInput, Input, RtpInput, WebRtcInput
from loa.relay.agent.playout import Player

log = logging.getLogger("loa.agent")
CODECS = ["opus", "pcmu", "pcma"]
TRANSPORTS = ["http", "rtp", "webrtc"]
SUPPORTED = {("http", "opus"), ("rtp", "opus"), ("rtp", "pcmu"), ("rtp", "pcma"),
             ("webrtc", "opus")}


def candidates(streams: list[dict[str, Any]], prefer: str | None) -> list[dict[str, str]]:
    """The streams this agent can play, in the server's order, `prefer`'s transport first."""
    ok = [s for s in streams if isinstance(s, dict)
          and (s.get("transport"), s.get("codec")) in SUPPORTED and isinstance(s.get("url"), str)]
    if prefer:
        ok.sort(key=lambda s: s["transport"] != prefer)  # stable: server order otherwise
    return ok


class Pipeline:
    """Keeps the device's stream playing: tries the candidates in order, falls back, retries."""

    def __init__(self, player: Player, session: aiohttp.ClientSession, *,
                 prefer: str | None = None, impair: Impairment | None = None) -> None:
        self.player = player
        self.session = session
        self.prefer = prefer
        self.impair = impair or Impairment()
        self.streams: list[dict[str, str]] = []
        self.url_override: str | None = None
        self.input: Input | None = None
        self.started_at = 0.0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def set_streams(self, streams: list[dict[str, Any]]) -> bool:
        new = candidates(streams, self.prefer)
        changed = new != self.streams
        self.streams = new
        if changed and self.prefer and not any(s["transport"] == self.prefer for s in new):
            log.warning("preferred transport not offered event=agent_transport_unavailable "
                        "transport=%s offered=%s", self.prefer,
                        ",".join(f"{s['transport']}/{s['codec']}" for s in new) or "none")
        return changed

    def start(self, url: str | None = None) -> None:
        self.url_override = url
        self._cancel()
        self.started_at = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        self.player.close_stream()
        self.input = None

    def _targets(self) -> list[dict[str, str]]:
        url = self.url_override
        if url is None:
            return self.streams
        path = urlsplit(url).path
        if path.endswith(".sdp"):
            return [{"transport": "rtp", "codec": "opus", "url": url}]
        if "/whep/" in path:
            return [{"transport": "webrtc", "codec": "opus", "url": url}]
        return [{"transport": "http", "codec": "opus", "url": url}]

    def _make(self, s: dict[str, str]) -> Input:
        if s["transport"] == "rtp":
            return RtpInput(s["url"], s["codec"], self.player, self.session, self.impair)
        if s["transport"] == "webrtc":
            return WebRtcInput(s["url"], s["codec"], self.player, self.session)
        return HttpOpusInput(s["url"], s["codec"], self.player, self.session)

    async def _run(self) -> None:
        backoff = 1.0
        while True:
            targets = self._targets()
            if not targets:
                log.warning("no playable stream event=agent_no_stream streams=%d",
                            len(self.streams))
            for s in targets:
                inp = self._make(s)
                self.input = inp
                began = time.monotonic()
                try:
                    log.info("stream start event=agent_stream transport=%s codec=%s url=%s",
                             s["transport"], s["codec"], s["url"])
                    await inp.run()
                except InputError as e:
                    self.failures += 1
                    log.warning("stream failed event=agent_stream_error transport=%s url=%s "
                                "error=%s", s["transport"], s["url"], e)
                except (OSError, ValueError) as e:
                    self.failures += 1
                    log.warning("stream failed event=agent_stream_error transport=%s url=%s "
                                "error=%s: %s", s["transport"], s["url"], type(e).__name__, e)
                finally:
                    self.player.close_stream()
                if time.monotonic() - began > 30:
                    backoff = 1.0
            self.input = None
            delay = backoff * random.uniform(0.8, 1.2)
            backoff = min(backoff * 2, 30.0)
            await asyncio.sleep(delay)
