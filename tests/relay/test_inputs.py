"""Relay inputs ("tiếp sóng") from the outside: HTTP/Icecast MP3, HLS and RTP (SDP) relayed on air.

A node runs on the real clock on 127.0.0.1; the outside streams come from local servers (an
Icecast-like aiohttp server pacing an MP3 file in real time, the node's own HLS output, FFmpeg
sending RTP). What is on air is read from the hub's "pcm" channel of the target area.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from aiohttp import ClientSession, web

from loa.codecs.encoders import Packet
from loa.relay.inputs import RelayInput, RelayInputSettings, safe_url
from loa.relay.urlpolicy import FetchSettings
from loa.streamer.broadcast import Broadcast
from loa.streamer.clock import FRAME, SAMPLE_RATE
from loa.streamer.hub import Subscription
from loa.streamer.sources import ToneSource
from loa.web.auth import add_user
from loa.web.node import Node
from loa.web.testing import start_node
from tests.apiclient import PASSWORD, PEOPLE, make_config
from tests.audio import peak_hz, rms
from tests.helpers import until
from tests.origin import Origin, station_mp3

TARGET = "T01-H1"  # the relay airs here
LISTEN = "T01-H1-X1"  # ... and is heard here
OTHER = "T01-H2-X1"  # another area, another programme: must never notice anything
log = logging.getLogger("tests.inputs")


@pytest.fixture(scope="module")
def mp3_bytes(tmp_path_factory) -> bytes:
    """A minute of 440 Hz, 44.1 kHz stereo MP3 at 64 kbit/s CBR (what a radio station sends)."""
    return station_mp3(tmp_path_factory.mktemp("origin") / "live.mp3", 440, 60)


@pytest.fixture
async def origin(mp3_bytes) -> AsyncIterator[Origin]:
    o = Origin(mp3_bytes)
    await o.start()
    try:
        yield o
    finally:
        await o.kill()


@dataclass
class Tap:
    """What an area hears: its "pcm" channel, by media sample."""

    sub: Subscription
    frames: list[tuple[int, np.ndarray]] = field(default_factory=list)

    def on_packets(self, packets: list[Packet]) -> None:
        for p in packets:
            self.frames.append((p.pts, np.frombuffer(p.data, dtype=np.float32)))

    def last(self, seconds: float = 0.5) -> np.ndarray:
        n = int(seconds * SAMPLE_RATE / FRAME)
        if len(self.frames) < n:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate([f for _, f in self.frames[-n:]])

    def since(self, sample: int) -> list[tuple[int, np.ndarray]]:
        return [(s, f) for s, f in self.frames if s >= sample]

    def hears(self, hz: float, seconds: float = 0.5) -> bool:
        x = self.last(seconds)
        return (x.size > 0 and abs(peak_hz(x, SAMPLE_RATE) - hz) < 4
                and all(rms(part) > 0.05 for part in np.array_split(x, 10)))

    def silent(self, seconds: float = 0.5) -> bool:
        x = self.last(seconds)
        return x.size > 0 and rms(x) < 0.005


@dataclass
class LiveNode:
    node: Node
    app: web.Application
    url: str
    tokens: dict[str, str]
    session: ClientSession
    taps: dict[str, Tap]

    def tap(self, area: str) -> Tap:
        sub = self.node.hub.subscribe(area, "pcm")
        tap = Tap(sub)
        sub.on_packets = tap.on_packets
        self.taps[area] = tap
        return tap

    async def call(self, who: str, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.session.request(method, self.url + path, headers={
                "Authorization": f"Bearer {self.tokens[who]}"}, **kw) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body

    async def air_relay(self, url: str, targets: list[str], who: str = "tinh") -> str:
        status, prog = await self.call(who, "POST", "/api/v1/programmes", json={
            "title": "Tiếp sóng VOV1", "type": "relay", "url": url})
        assert status == 201, prog
        status, b = await self.call(who, "POST", "/api/v1/broadcasts", json={
            "programme": prog["id"], "targets": targets})
        assert status == 201, b
        return str(b["id"])


@pytest.fixture
async def live(tmp_path) -> AsyncIterator[LiveNode]:
    cfg = make_config(tmp_path)
    cfg.hls.segment_seconds = 1.0
    cfg.fetch = FetchSettings(allow_networks=["127.0.0.0/8"])  # the outside world is local

    async def people(node: Node) -> None:
        for name in ("tinh", "huyen1"):
            role, area, emergency = PEOPLE[name]
            await add_user(node.store, node.tree, name, role, area, PASSWORD, emergency)

    node_on = await start_node(cfg, prepare=people, shutdown_timeout=0.5)
    node, app, url = node_on.node, node_on.app, node_on.url
    session = ClientSession()
    tokens = {}
    for name in ("tinh", "huyen1"):
        async with session.post(url + "/api/v1/auth/token",
                                json={"username": name, "password": PASSWORD}) as r:
            assert r.status == 201
            tokens[name] = (await r.json())["token"]
    ln = LiveNode(node, app, url, tokens, session, {})
    try:
        yield ln
    finally:
        for tap in ln.taps.values():
            tap.sub.close()
        await session.close()
        await node_on.stop()


def onset(tap: Tap, sample: int, hz: float | None = None) -> int:
    """The first media sample at or after `sample` where sound starts (loud frames follow)."""
    frames = tap.since(sample)
    for i in range(len(frames) - 5):
        if all(rms(f) > 0.05 for _, f in frames[i:i + 5]):
            if hz is not None:
                x = np.concatenate([f for _, f in frames[i:i + 25]])
                assert abs(peak_hz(x, SAMPLE_RATE) - hz) < 4
            return frames[i][0]
    raise AssertionError(f"no onset: {[round(rms(f), 2) for _, f in frames]}")


def quiet_from(tap: Tap, sample: int) -> int:
    """The first media sample at or after `sample` from which the area stays silent a while."""
    frames = tap.since(sample)
    for i in range(len(frames) - 10):
        if all(rms(f) < 0.005 for _, f in frames[i:i + 10]):
            return frames[i][0]
    raise AssertionError("never silent")


def relay_inputs(ln: LiveNode) -> list[RelayInput]:
    return ln.node.inputs.inputs


# ---- HTTP / Icecast ------------------------------------------------------------------------
async def test_http_relay_survives_the_station_going_off_air(live: LiveNode, origin: Origin,
                                                              caplog):
    caplog.set_level(logging.INFO)
    node = live.node
    node.engine.start(Broadcast(ToneSource(660, 0.3), ["T01-H2"], issuer="T01-H2"))
    here, other = live.tap(LISTEN), live.tap(OTHER)
    bid = await live.air_relay(f"http://vov:mat-khau-bi-mat@127.0.0.1:{origin.port}/live.mp3"
                               "?token=bi-mat-nua", [TARGET])
    await until(lambda: here.hears(440), "the relayed tone", 15)
    [inp] = relay_inputs(live)
    assert inp.state == "up" and inp.ups == 1

    # The station goes off the air: silence, the engine keeps ticking, the other area plays on.
    ticks = node.engine.stats["ticks"]
    killed_at = node.engine.n * FRAME
    await origin.kill()
    await until(lambda: here.silent(), "silence after the source died", 10)
    silent_after = (quiet_from(here, killed_at) - killed_at) / SAMPLE_RATE
    await until(lambda: inp.state in ("down", "connecting") and inp.downs >= 1, "input down", 15)
    await asyncio.sleep(1.5)  # down a while: reconnect attempts fail, the backoff grows
    assert inp.attempts >= 2 and node.engine.stats["ticks"] > ticks + 50
    assert here.silent()

    # Back on the air: the relay picks it up again by itself.
    back_at = node.engine.n * FRAME
    await origin.start(origin.port)
    await until(lambda: here.hears(440), "the tone after the source came back", 15)
    heard = onset(here, back_at, 440)
    assert inp.ups == 2 and inp.attempt_at is not None and node.clock is not None
    # The successful attempt on the media clock: how long from connecting to being on air.
    attempt = int((inp.attempt_at - node.clock.t0) * SAMPLE_RATE)
    log.info("relay http timing %s", json.dumps({
        "silence_after_kill_s": round(silent_after, 3),
        "tone_after_source_back_s": round((heard - back_at) / SAMPLE_RATE, 3),
        "tone_after_reconnect_attempt_s": round((heard - attempt) / SAMPLE_RATE, 3),
        "attempts": inp.attempts}))

    # The other area never heard a thing of it: 660 Hz all along.
    x = np.concatenate([f for _, f in other.frames[25:]])
    hop = SAMPLE_RATE // 4
    assert all(abs(peak_hz(x[i:i + hop], SAMPLE_RATE) - 660) < 4 and rms(x[i:i + hop]) > 0.15
               for i in range(0, x.shape[0] - hop + 1, hop))

    logs = caplog.text
    assert "event=relay_input_down" in logs and logs.count("event=relay_input_up") == 2
    assert "mat-khau-bi-mat" not in logs and "bi-mat-nua" not in logs and "vov:" not in logs

    # Stopping the broadcast stops the input's thread.
    status, _ = await live.call("tinh", "DELETE", f"/api/v1/broadcasts/{bid}")
    assert status == 204
    await until(lambda: not relay_inputs(live), "input released", 5)
    assert await asyncio.to_thread(inp.join, 10) and not inp.alive and inp.state == "closed"


async def test_garbage_inputs_are_logged_retried_and_harmless(live: LiveNode, origin: Origin,
                                                              caplog):
    caplog.set_level(logging.INFO)
    node = live.node
    node.engine.start(Broadcast(ToneSource(660, 0.3), ["T01-H2"], issuer="T01-H2"))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    urls = {
        "T01-H1-X1": f"http://127.0.0.1:{origin.port}/garbage.mp3",  # a web page, not audio
        "T01-H1-X2": f"http://127.0.0.1:{dead}/live.mp3",  # connection refused
        "T01-H1-X3": f"http://127.0.0.1:{origin.port}/nothing-here.mp3",  # 404
    }
    taps = {area: live.tap(area) for area in urls}
    other = live.tap(OTHER)
    for area, url in urls.items():
        await live.air_relay(url, [area])
    inputs = relay_inputs(live)
    assert len(inputs) == 3
    # Three failed attempts each, logged (an attempt counts when it starts, its log comes when
    # it fails: under load the third may still be connecting when the count says 3).
    await until(lambda: all(len(re.findall(rf"url={re.escape(u)} .*retry_in=", caplog.text)) >= 3
                            for u in urls.values()), "three failed attempts each", 20)
    assert all(i.ups == 0 and i.alive for i in inputs)
    assert all(tap.silent(1.0) for tap in taps.values())
    assert other.hears(660)
    assert node.engine.stats["source_errors"] == 0
    on_air = [node.engine.on_air(area)["broadcast"] for area in urls]
    assert all(on_air)  # still on air, waiting for the input to come back
    logs = caplog.text
    assert logs.count("event=relay_input_down") == 3  # once per outage...
    assert "event=relay_input_retry" in logs  # ...then quieter retries
    for url in urls.values():  # backing off: 0.5, 1, 1 s (capped), each cut by a jitter
        delays = [float(d) for d in re.findall(rf"url={re.escape(url)} .*retry_in=([0-9.]+)",
                                               logs)]
        assert len(delays) >= 3, delays
        for got, step in zip(delays, (0.5, 1.0, 1.0), strict=False):
            assert 0.75 * step - 0.01 <= got <= step, delays


# ---- HLS -----------------------------------------------------------------------------------
async def test_hls_input_relays_another_streams_hls(live: LiveNode):
    """A district relays the province's HLS (here the node's own HLS of another area)."""
    node = live.node
    node.engine.start(Broadcast(ToneSource(660, 0.3), ["T01-H2"], issuer="T01-H2"))
    here = live.tap(LISTEN)
    await live.air_relay(f"{live.url}/streams/{OTHER}/index.m3u8", [TARGET])
    await until(lambda: here.hears(660, 1.0), "the tone relayed from HLS", 20)
    [inp] = relay_inputs(live)
    assert inp.ups == 1
    # Paced by the engine, not by the download: no overruns, audio keeps flowing.
    await asyncio.sleep(2)
    assert here.hears(660, 2.0) and inp.push.overruns == 0


# ---- RTP (SDP) -----------------------------------------------------------------------------
def free_udp_pair() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port % 2 or port > 65000:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port


async def rtp_sender(port: int, freq: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
        f"sine=frequency={freq}:sample_rate=48000", "-af", "volume=2.4", "-ac", "1",
        "-c:a", "libopus", "-b:a", "32k", "-f", "rtp", f"rtp://127.0.0.1:{port}")


async def test_rtp_input_from_an_sdp_url(live: LiveNode, origin: Origin):
    port = free_udp_pair()
    origin.sdp = ("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=VOV\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                  f"m=audio {port} RTP/AVP 97\r\na=rtpmap:97 opus/48000/2\r\n")
    here = live.tap(LISTEN)
    sender = await rtp_sender(port, 550)
    try:
        await live.air_relay(f"http://127.0.0.1:{origin.port}/in.sdp", [TARGET])
        await until(lambda: here.hears(550), "the tone relayed from RTP", 15)
        [inp] = relay_inputs(live)
        sender.kill()
        await sender.wait()
        await until(lambda: here.silent(), "silence when the RTP sender stops", 10)
        back_at = live.node.engine.n * FRAME
        sender = await rtp_sender(port, 550)
        await until(lambda: here.hears(550), "the tone when the sender is back", 20)
        log.info("relay rtp timing %s", json.dumps({
            "tone_after_sender_back_s": round((onset(here, back_at, 550) - back_at)
                                              / SAMPLE_RATE, 3), "attempts": inp.attempts}))
    finally:
        if sender.returncode is None:
            sender.kill()
        await sender.wait()


# ---- the input on its own ------------------------------------------------------------------
def test_safe_url_hides_credentials_and_queries():
    assert safe_url("http://u:p@host:8000/live.mp3?token=x") == "http://***@host:8000/live.mp3?…"
    assert safe_url("https://radio.example/vov1.m3u8") == "https://radio.example/vov1.m3u8"
    assert safe_url("/srv/relay/in.sdp") == "in.sdp"
    with pytest.raises(ValueError):
        RelayInput("  ")


async def test_close_stops_a_flowing_input_and_a_hung_one(origin: Origin):
    settings = RelayInputSettings(read_timeout=1.0, open_timeout=1.0)
    flowing = RelayInput(f"http://127.0.0.1:{origin.port}/live.mp3", settings).start()
    await until(lambda: flowing.state == "up", "flowing", 10)
    # A server that accepts and then says nothing: the open blocks until its timeout.
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    hung_port = srv.sockets[0].getsockname()[1]
    hung = RelayInput(f"http://127.0.0.1:{hung_port}/x.mp3", settings).start()
    await until(lambda: hung.attempts >= 1, "hung attempt", 5)
    await asyncio.sleep(0.2)  # inside av.open, waiting for an answer
    flowing.close()
    hung.close()
    assert await asyncio.to_thread(flowing.join, 5) and await asyncio.to_thread(hung.join, 5)
    assert flowing.state == "closed" and hung.state == "closed"
    assert flowing.push.finished or flowing.push.closed
    srv.close()
    await srv.wait_closed()


async def test_backoff_doubles_and_resets_after_a_good_connection(origin: Origin, caplog):
    caplog.set_level(logging.INFO, logger="loa.relay.inputs")
    settings = RelayInputSettings(backoff_min=0.1, backoff_max=0.8, good_after=0.6,
                                  backoff_jitter=0.0)
    url = f"http://127.0.0.1:{origin.port}/live.mp3"
    inp = RelayInput(url, settings).start()  # nobody reads it: it must not stall on that
    try:
        await until(lambda: inp.ups == 1, "up", 10)
        await asyncio.sleep(0.8)  # a good connection (longer than good_after)
        await origin.kill()
        await until(lambda: inp.attempts >= 5, "four failed attempts", 10)
        await origin.start(origin.port)
        await until(lambda: inp.ups == 2, "up again", 10)
        downs = inp.downs
        await origin.kill()  # a short connection: the backoff goes on where it was
        await until(lambda: inp.downs > downs, "down again", 10)
        await origin.start(origin.port)
        await until(lambda: inp.ups == 3, "up a third time", 10)
        await asyncio.sleep(0.8)  # a good one again
        downs = inp.downs
        await origin.kill()
        await until(lambda: inp.downs > downs, "down a third time", 10)
    finally:
        inp.close()
        await asyncio.to_thread(inp.join, 5)
    delays = [(m.group(1), float(m.group(2))) for m in re.finditer(
        r"event=relay_input_(down|retry) .*retry_in=([0-9.]+)", caplog.text)]
    first_retries = [d for _, d in delays[:4]]
    assert first_retries == [0.1, 0.2, 0.4, 0.8]
    assert [d for kind, d in delays if kind == "down"] == [0.1, 0.8, 0.1]
    assert inp.samples > 0 and inp.push.overruns > 0  # unread: it kept the newest audio


async def test_a_station_back_after_a_long_outage_is_retried_within_a_second(origin: Origin,
                                                                             caplog):
    """Default settings: ~15 s off the air, every scheduled retry is at most 1 s away (jittered,
    so not all equal), and the input is up again soon after the station returns."""
    caplog.set_level(logging.INFO, logger="loa.relay.inputs")
    inp = RelayInput(f"http://127.0.0.1:{origin.port}/live.mp3").start()
    loop = asyncio.get_running_loop()
    try:
        await until(lambda: inp.ups == 1, "up", 10)
        await origin.kill()
        await until(lambda: inp.downs >= 1, "down", 15)
        down_at = loop.time()
        await asyncio.sleep(15)  # off the air long enough for any backoff to grow
        attempts = inp.attempts
        back_at = loop.time()
        await origin.start(origin.port)
        await until(lambda: inp.ups == 2, "up again", 15)
        up_after = loop.time() - back_at
    finally:
        inp.close()
        await asyncio.to_thread(inp.join, 5)
    retries = [float(m.group(1)) for m in re.finditer(
        r"event=relay_input_(?:down|retry) .*retry_in=([0-9.]+)", caplog.text)]
    log.info("relay back on air %s", json.dumps({
        "outage_s": round(back_at - down_at, 1), "attempts_while_down": attempts,
        "up_after_station_back_s": round(up_after, 3), "max_retry_s": max(retries)}))
    assert attempts >= 10  # kept trying about once a second, not at 8 and 10 s gaps
    assert len(retries) >= 10 and max(retries) <= 1.0
    assert len(set(retries[2:])) > 1  # jittered: many relays do not retry in lockstep
    assert up_after < 5.0  # generous on a loaded machine; the old backoff waited up to 10 s
