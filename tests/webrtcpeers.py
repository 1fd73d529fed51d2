"""WebRTC test peers: a real node on 127.0.0.1 with the people of tests/apiclient.py, aiortc peer
connections offering on loopback only, and a tone as a microphone. Shared by
tests/relay/test_webrtc.py, tests/web/test_whep_access.py and tests/streamer/test_emergency.py."""

from __future__ import annotations

import asyncio
import fractions
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import av
import numpy as np
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender
from aiortc.mediastreams import MediaStreamTrack

from loa.relay.webrtc import use_host_addresses
from loa.web.auth import add_user
from loa.web.node import Node
from loa.web.testing import start_node
from tests.apiclient import PASSWORD, PEOPLE, make_config

# Loopback only: the clients offer 127.0.0.1 host candidates too, and nobody uses STUN.
use_host_addresses(["127.0.0.1"])
NO_STUN = RTCConfiguration(iceServers=[])
SDP = {"Content-Type": "application/sdp"}


@dataclass
class Server:
    node: Node
    app: web.Application
    base: str
    http: aiohttp.ClientSession
    tokens: dict[str, str]

    async def token(self, who: str) -> str:
        if who not in self.tokens:
            async with self.http.post(f"{self.base}/api/v1/auth/token",
                                      json={"username": who, "password": PASSWORD}) as r:
                assert r.status == 201, await r.text()
                self.tokens[who] = (await r.json())["token"]
        return self.tokens[who]

    async def bearer(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.token(who)}", **SDP}


async def start_server(tmp_path: Path, **webrtc: object) -> tuple[Server, web.AppRunner]:
    cfg = make_config(tmp_path)
    cfg.webrtc.ice_addresses = "127.0.0.1"
    for k, v in webrtc.items():
        setattr(cfg.webrtc, k, v)

    async def people(node: Node) -> None:
        for name, (role, area, emergency) in PEOPLE.items():
            await add_user(node.store, node.tree, name, role, area, PASSWORD, emergency)

    live = await start_node(cfg, prepare=people)
    return Server(live.node, live.app, live.url, aiohttp.ClientSession(), {}), live.runner


def offer_pc(direction: str, codec: str | None = None,
             track: MediaStreamTrack | None = None) -> RTCPeerConnection:
    pc = RTCPeerConnection(NO_STUN)
    tr = pc.addTransceiver(track or "audio", direction=direction)
    if codec:
        tr.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                if c.mimeType.lower() == codec])
    return pc


class ToneTrack(MediaStreamTrack):
    """A microphone stand-in: a sine tone in 20 ms s16 frames, paced on absolute deadlines."""

    kind = "audio"

    def __init__(self, hz: float) -> None:
        super().__init__()
        self.hz = hz
        self.n = 0
        self.t0: float | None = None

    async def recv(self) -> av.AudioFrame:
        loop = asyncio.get_running_loop()
        if self.t0 is None:
            self.t0 = loop.time()
        deadline = self.t0 + self.n * 0.02
        await asyncio.sleep(max(0.0, deadline - loop.time()))
        idx = np.arange(self.n * 960, (self.n + 1) * 960)
        pcm = (0.3 * 32767 * np.sin(2 * np.pi * self.hz * idx / 48_000)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 48_000
        frame.pts = self.n * 960
        frame.time_base = fractions.Fraction(1, 48_000)
        self.n += 1
        return frame
