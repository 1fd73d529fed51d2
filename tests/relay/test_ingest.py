"""Ingest from real encoders: FFmpeg pushes with its `icecast://` protocol (PUT, and the legacy
SOURCE method) to a node on the real clock; FFmpeg on the area's stream hears the pushed tone.
Refusals (wrong password, another area's mount) air nothing; an encoder that drops gives the air
to the area's fallback, one that comes back within the grace changes nothing on the air."""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from loa.streamer.clock import SAMPLE_RATE
from loa.streamer.sources import ToneSource
from loa.streamer.station import Content
from loa.web.auth import add_user
from loa.web.node import Node
from loa.web.testing import start_node
from tests.apiclient import PASSWORD, PEOPLE, make_config
from tests.audio import peak_hz, rms
from tests.helpers import until
from tests.httpstreams import ffmpeg_record

X1 = "T01-H1-X1"
X2 = "T01-H1-X2"
FALLBACK_HZ = 440.0
HZ_TOL = 10.0  # the tones differ by 60 Hz at least; a glitch under load smears the peak a little


@dataclass
class Rig:
    node: Node
    url: str
    port: int
    session: aiohttp.ClientSession
    tokens: dict[str, str]
    background: str = ""

    async def call(self, who: str, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.session.request(method, self.url + path, headers={
                "Authorization": f"Bearer {self.tokens[who]}"}, **kw) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body

    async def mount(self, **body: Any) -> dict[str, Any]:
        status, out = await self.call("qtv1", "POST", "/api/v1/mounts", json=body)
        assert status == 201, out
        return out

    async def hears(self, area: str, tmp: Path, seconds: float = 2.0) -> float:
        pcm, rate = await ffmpeg_record(f"{self.url}/streams/{area}.mp3?burst_ms=0",
                                        tmp / f"{area}.wav", seconds)
        tail = pcm[int(0.5 * rate):]
        assert rms(tail) > 0.02, "silence"
        return peak_hz(tail, rate)


@pytest.fixture
async def rig(tmp_path) -> AsyncIterator[Rig]:
    async def people(node: Node) -> None:
        for name in ("tinh", "qtv1", "xa11", "xa12"):
            role, area, emergency = PEOPLE[name]
            await add_user(node.store, node.tree, name, role, area, PASSWORD, emergency)

    cfg = make_config(tmp_path)
    cfg.ingest.rtp_address = "127.0.0.1"
    on = await start_node(cfg, prepare=people, shutdown_timeout=0.5)
    session = aiohttp.ClientSession()
    tokens = {}
    for name in ("tinh", "qtv1"):
        async with session.post(on.url + "/api/v1/auth/token",
                                json={"username": name, "password": PASSWORD}) as r:
            tokens[name] = (await r.json())["token"]
    r = Rig(on.node, on.url, on.port, session, tokens)
    rec = await on.node.station.air(Content(ToneSource(FALLBACK_HZ, 0.3), "Nhạc nền", None),
                                    targets=[X1], klass="background", issuer=X1, user="test")
    r.background = rec["id"]
    try:
        yield r
    finally:
        await session.close()
        await on.stop()


def basic(user: str, password: str, ctype: str = "audio/mpeg") -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password), "Content-Type": ctype}


def push(url: str, hz: float, *, fmt: str = "mp3", legacy: bool = False,
         seconds: float = 60) -> subprocess.Popen[bytes]:
    """FFmpeg as the studio's encoder: a tone, in real time, to an icecast:// URL."""
    codec = ["-c:a", "libmp3lame", "-b:a", "64k", "-content_type", "audio/mpeg"] \
        if fmt == "mp3" else ["-c:a", "libopus", "-b:a", "32k", "-content_type", "audio/ogg"]
    return subprocess.Popen([
        "ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
        f"sine=frequency={hz}:duration={seconds}", "-af", "volume=4", *codec,
        *(["-legacy_icecast", "1"] if legacy else []), "-f", fmt, url],
        stderr=subprocess.PIPE)


def ogg_tone(path: Path, hz: float, seconds: float = 20.0) -> bytes:
    """Ogg Opus at a constant 32 kbit/s in 20 ms pages: bytes pace as audio."""
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency={hz}:duration={seconds}", "-af", "volume=4",
                    "-c:a", "libopus", "-b:a", "32k", "-vbr", "off", "-page_duration", "20000",
                    str(path)], check=True)
    return path.read_bytes()


async def raw_source(port: int, mount: str, user: str, password: str, data: bytes,
                     ctype: str, seconds: float = 20.0) -> None:
    """An Icecast legacy source client: SOURCE, the head, then the bytes at the audio's pace."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"SOURCE /ingest/{mount} HTTP/1.0\r\nAuthorization: "
                 f"{aiohttp.encode_basic_auth(user, password)}\r\nContent-Type: {ctype}\r\n"
                 f"\r\n".encode())
    step = len(data) / seconds / 10  # bytes per 100 ms
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        for k in range(int(seconds * 10)):
            await asyncio.sleep(max(0.0, t0 + k / 10 - loop.time()))
            writer.write(data[int(k * step):int((k + 1) * step)])
            await writer.drain()
    finally:
        writer.close()


async def ended(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    rc = await asyncio.to_thread(proc.wait, 30)
    return rc, (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


async def test_ffmpeg_pushes_mp3_to_a_mount_bound_to_an_area_and_the_area_hears_it(rig, tmp_path):
    m = await rig.mount(name="studio-huyen", area="T01-H1", targets=[X1], title="Phòng thu")
    assert "secret_hash" not in m and m["path"] == "/ingest/studio-huyen"
    url = f"icecast://source:{m['password']}@127.0.0.1:{rig.port}/ingest/studio-huyen"
    enc = push(url, 1000)
    try:
        def on_air() -> bool:
            mount = rig.node.ingests.mounts.get(m["id"])
            return mount is not None and mount.auto is not None \
                and rig.node.engine.main_of(X1) == mount.auto

        await until(on_air, "the mount on air")
        assert abs(await rig.hears(X1, tmp_path) - 1000) < HZ_TOL
        status, listed = await rig.call("qtv1", "GET", "/api/v1/mounts")
        [state] = [x["state"] for x in listed["mounts"] if x["id"] == m["id"]]
        assert state["connected"] and state["format"] == "mp3" and state["bytes"] > 0
        bid = rig.node.ingests.mounts[m["id"]].auto
    finally:
        stop(enc)
    # The encoder is gone: after the grace the live broadcast ends, the fallback airs.
    await until(lambda: rig.node.engine.main_of(X1) == rig.background, "fallback on air")
    assert rig.node.engine.live_broadcast(bid) is None
    assert abs(await rig.hears(X1, tmp_path) - FALLBACK_HZ) < HZ_TOL
    audit = [e for e in await rig.node.store.read_log("audit", limit=500)
             if e["action"] == "ingest.connect"]
    assert audit and audit[0]["target"] == m["id"] and m["password"] not in str(audit)


async def test_ogg_opus_over_legacy_source_airs_an_ingest_programme_only_while_connected(
        rig, tmp_path):
    m = await rig.mount(name="xa-phu-thuan", area=X1, title="Đài xã")
    status, prog = await rig.call("tinh", "POST", "/api/v1/programmes", json={
        "title": "Trực tiếp từ xã", "type": "ingest", "mount": m["id"]})
    assert status == 201, prog
    status, b = await rig.call("tinh", "POST", "/api/v1/broadcasts", json={
        "programme": prog["id"], "targets": [X1]})
    assert status == 201, b
    # No encoder yet: the programme is accepted, held; the area keeps its fallback.
    await until(lambda: rig.node.engine.held(b["id"], X1), "held while no encoder")
    assert rig.node.engine.main_of(X1) == rig.background
    # A Loa operator of the commune pushes with their own account, Ogg Opus, legacy SOURCE.
    url = f"icecast://xa11:{PASSWORD}@127.0.0.1:{rig.port}/ingest/xa-phu-thuan"
    enc = push(url, 880, fmt="ogg", legacy=True)
    try:
        await until(lambda: rig.node.engine.main_of(X1) == b["id"], "the ingest on air")
        assert abs(await rig.hears(X1, tmp_path) - 880) < HZ_TOL
        # The encoder reconnects at once (a network cut): nothing changes on the air. (The
        # second connection is a plain socket sending FFmpeg's Ogg: starting FFmpeg again can
        # take longer than the grace on a loaded machine.)
        ogg = await asyncio.to_thread(ogg_tone, tmp_path / "tone.ogg", 880)
        stop(enc)
        again = asyncio.get_running_loop().create_task(
            raw_source(rig.port, "xa-phu-thuan", "xa11", PASSWORD, ogg, "audio/ogg"))
        await asyncio.sleep(2.0)
        assert rig.node.engine.main_of(X1) == b["id"]
        assert not [c for c in rig.node.engine.changes if c.cause == "input-down"]
        assert abs(await rig.hears(X1, tmp_path) - 880) < HZ_TOL
    finally:
        stop(enc)
    again.cancel()
    await asyncio.gather(again, return_exceptions=True)
    await until(lambda: rig.node.engine.main_of(X1) == rig.background, "fallback on air")
    [down] = [c for c in rig.node.engine.changes if c.cause == "input-down" and c.area == X1]
    assert down.before == b["id"] and down.after == rig.background
    assert rig.node.engine.live_broadcast(b["id"]) is not None  # held, not ended


async def test_wrong_password_and_another_areas_mount_are_refused_and_nothing_airs(rig):
    m = await rig.mount(name="xa-1", area=X1, targets=[X1])
    url = f"icecast://source:sai-mat-khau@127.0.0.1:{rig.port}/ingest/xa-1"
    for legacy in (False, True):  # PUT, then the legacy SOURCE method
        rc, err = await ended(push(url, 1000, seconds=3, legacy=legacy))
        # (with SOURCE FFmpeg reads no answer: it only sees the connection closed)
        assert rc != 0 and ("401" in err or legacy), err
    # An operator of the neighbouring commune: a valid account, another area's mount.
    async with rig.session.put(f"{rig.url}/ingest/xa-1", data=b"\xff\xfb" * 100,
                               headers=basic("xa12", PASSWORD, "audio/mpeg")) as r:
        assert r.status == 403
        assert "ngoài khu vực" in (await r.json())["error"]
    async with rig.session.put(f"{rig.url}/ingest/xa-1", data=b"x",
                               headers=basic("source", "sai")) as r:
        assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
    async with rig.session.put(f"{rig.url}/ingest/khong-co", data=b"x",
                               headers=basic("source", "sai")) as r:
        assert r.status == 404
    await asyncio.sleep(0.5)
    assert rig.node.engine.main_of(X1) == rig.background
    assert rig.node.ingests.mounts.get(m["id"]) is None or \
        rig.node.ingests.mounts[m["id"]].connections == 0
    refused = [e for e in await rig.node.store.read_log("audit", limit=500)
               if e["action"] == "refused" and e["target"] == "/ingest/xa-1"]
    assert {e["details"]["status"] for e in refused} == {401, 403}
    assert {e["details"]["method"] for e in refused} == {"PUT", "SOURCE"}
    assert PASSWORD not in str(refused) and m["password"] not in str(refused)


async def test_a_garbage_pusher_is_cut_and_what_is_on_air_goes_on(rig):
    m = await rig.mount(name="rac", area=X1, targets=[X1])
    async with rig.session.put(f"{rig.url}/ingest/rac", data=b"<html>rac</html>" * 20_000,
                               headers=basic("source", m["password"], "audio/mpeg")) as r:
        assert r.status == 200
        await r.read()
    mount = rig.node.ingests.mounts[m["id"]]
    await until(lambda: mount.connection is None and mount.last_error, "the push cut")
    await asyncio.sleep(1.5)
    assert rig.node.engine.main_of(X1) == rig.background
    assert not [c for c in rig.node.engine.changes if c.area == X1 and c.cause == "source-error"]
    tap = rig.node.hub.subscribe(X1, "pcm")
    await asyncio.sleep(0.5)
    pcm = np.frombuffer(b"".join(p.data for p in tap.drain()), np.float32)
    tap.close()
    assert abs(peak_hz(pcm, SAMPLE_RATE) - FALLBACK_HZ) < HZ_TOL


async def test_dead_air_on_a_pushed_stream_airs_the_fallback_and_alerts_until_audio_returns(rig):
    """The area's own level and time, set through the API: a studio that goes quiet for 2 s
    loses the air to the area's background, and gets it back when it speaks again."""
    for bad, name in (({"seconds": 1}, "seconds"), ({"level_db": 0}, "level_db"),
                      ({"seconds": "2"}, "seconds"), ({"x": 1}, "x")):
        status, out = await rig.call("qtv1", "PUT", f"/api/v1/areas/{X1}/dead-air", json=bad)
        assert status == 422 and out["field"] == name, out
    status, out = await rig.call("qtv1", "PUT", f"/api/v1/areas/{X1}/dead-air",
                                 json={"level_db": -45, "seconds": 2})
    assert status == 200 and out == {"area": X1, "level_db": -45.0, "seconds": 2.0,
                                     "enabled": True, "inherited": False}
    status, out = await rig.call("qtv1", "GET", "/api/v1/areas/T01-H1/dead-air")
    assert out["seconds"] == 10.0 and out["inherited"]  # the node's default above X1
    m = await rig.mount(name="studio-im-lang", area=X1, targets=[X1])
    url = f"icecast://source:{m['password']}@127.0.0.1:{rig.port}/ingest/studio-im-lang"
    # Tone for 3 s, silence for 5 s, tone again.
    enc = subprocess.Popen([
        "ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
        "aevalsrc='if(lt(t,3)+gt(t,8),0.5*sin(2*PI*1000*t),0)':d=20:s=44100",
        "-c:a", "libmp3lame", "-b:a", "64k", "-content_type", "audio/mpeg", "-f", "mp3", url])
    try:
        await until(lambda: [c for c in rig.node.engine.changes
                             if c.area == X1 and c.cause == "dead-air"], "dead air")
        mount = rig.node.ingests.mounts[m["id"]]
        assert rig.node.engine.main_of(X1) == rig.background
        [alert] = [a for a in rig.node.alerts.active.values() if a.kind == "dead_air"]
        assert alert.area == X1 and alert.detail["broadcast"] == mount.auto
        assert alert.detail["seconds"] == 2.0 and alert.detail["level_db"] == -45.0
        await until(lambda: rig.node.engine.main_of(X1) == mount.auto, "audio back", 30)
        assert not [a for a in rig.node.alerts.active.values() if a.kind == "dead_air"]
        [back] = [c for c in rig.node.engine.changes if c.area == X1
                  and c.cause == "dead-air-over"]
        assert back.before == rig.background and back.after == mount.auto
    finally:
        stop(enc)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sk:
        sk.bind(("127.0.0.1", 0))
        return int(sk.getsockname()[1])


class Impairer(asyncio.DatagramProtocol):
    """A bad network between the encoder and the node: 5 % of the packets lost, 5 % arrive
    after the packet that followed them."""

    def __init__(self, to: tuple[str, int], seed: int = 7) -> None:
        self.to = to
        self.rng = random.Random(seed)
        self.held: bytes | None = None
        self.sent = self.dropped = self.swapped = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        r = self.rng.random()
        if r < 0.05:
            self.dropped += 1
            return
        if self.held is None and r < 0.10:
            self.held = data  # goes out after the next one
            self.swapped += 1
            return
        self.transport.sendto(data, self.to)
        if self.held is not None:
            self.transport.sendto(self.held, self.to)
            self.held = None
        self.sent += 1


async def test_rtp_push_with_loss_and_reordering_still_plays_without_a_stall(rig, tmp_path):
    port = free_udp_port()
    m = await rig.mount(name="barix", area=X1, targets=[X1],
                        rtp={"port": port, "codec": "opus", "payload_type": 101})
    loop = asyncio.get_running_loop()
    transport, imp = await loop.create_datagram_endpoint(
        lambda: Impairer(("127.0.0.1", port)), local_addr=("127.0.0.1", 0))
    bad_port = transport.get_extra_info("sockname")[1]
    enc = subprocess.Popen([
        "ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
        "sine=frequency=660:duration=60", "-af", "volume=4", "-ac", "1", "-c:a", "libopus",
        "-b:a", "32k", "-frame_duration", "20", "-payload_type", "101", "-f", "rtp",
        f"rtp://127.0.0.1:{bad_port}"], stdout=subprocess.DEVNULL)
    try:
        def on_air() -> bool:
            mount = rig.node.ingests.mounts.get(m["id"])
            return mount is not None and mount.auto is not None \
                and rig.node.engine.main_of(X1) == mount.auto

        await until(on_air, "the RTP push on air")
        await asyncio.sleep(1.0)  # the jitter buffer settles
        tap = rig.node.hub.subscribe(X1, "pcm", maxlen=10_000)
        assert abs(await rig.hears(X1, tmp_path, 3.0) - 660) < HZ_TOL
        pcm = np.frombuffer(b"".join(p.data for p in tap.drain()), np.float32)
        tap.close()
        assert pcm.shape[0] >= 2 * SAMPLE_RATE
        # No stall: every 100 ms carries the tone (losses concealed, order restored).
        windows = pcm[:pcm.shape[0] // 4800 * 4800].reshape(-1, 4800)
        quiet = [i for i, w in enumerate(windows) if rms(w) < 0.05]
        assert not quiet, (quiet, len(windows))
        state = rig.node.ingests.mounts[m["id"]].stats()["rtp"]
        assert imp.dropped and imp.swapped
        assert state["lost"] > 0 and state["reordered"] > 0 and state["late"] == 0, state
        assert not [c for c in rig.node.engine.changes if c.cause == "input-down"]
    finally:
        stop(enc)
        transport.close()
    await until(lambda: rig.node.engine.main_of(X1) == rig.background, "fallback on air")


async def test_rtp_push_described_by_the_encoders_sdp_pcmu_and_bad_settings_refused(
        rig, tmp_path):
    port = free_udp_port()
    for bad in ({"port": 80, "codec": "opus", "payload_type": 96},
                {"port": port, "codec": "mp3", "payload_type": 14},
                {"port": port, "codec": "pcmu", "rate": 16000},
                {"port": port, "codec": "l16", "payload_type": 96, "source": "not-a-net"}):
        status, out = await rig.call("qtv1", "POST", "/api/v1/mounts",
                                     json={"name": "sai", "area": X1, "rtp": bad})
        assert status == 422 and out["field"] == "rtp", (bad, out)
    status, out = await rig.call("qtv1", "POST", "/api/v1/mounts",
                                 json={"name": "sai", "area": X1, "sdp": "v=0\r\nxx"})
    assert status == 422 and out["field"] == "sdp", out
    assert not await rig.node.store.find("mount")
    sdp_file = tmp_path / "encoder.sdp"
    enc = subprocess.Popen([
        "ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
        "sine=frequency=500:duration=60", "-af", "volume=4", "-ac", "1", "-ar", "8000",
        "-c:a", "pcm_mulaw", "-f", "rtp", "-sdp_file", str(sdp_file),
        f"rtp://127.0.0.1:{port}"], stdout=subprocess.DEVNULL)
    try:
        await until(lambda: sdp_file.exists() and "m=audio" in sdp_file.read_text(),
                    "the encoder's SDP")
        m = await rig.mount(name="barix-g711", area=X1, targets=[X1],
                            sdp=sdp_file.read_text())
        assert m["sdp"] and m["state"]["rtp"]["codec"] == "pcmu"
        status, out = await rig.call("qtv1", "POST", "/api/v1/mounts", json={
            "name": "trung-cong", "area": X1, "rtp": {"port": port, "codec": "pcmu"}})
        assert status == 409 and out["field"] == "rtp", out

        def on_air() -> bool:
            mount = rig.node.ingests.mounts.get(m["id"])
            return mount is not None and mount.auto is not None \
                and rig.node.engine.main_of(X1) == mount.auto

        await until(on_air, "the RTP push on air")
        assert abs(await rig.hears(X1, tmp_path) - 500) < HZ_TOL
    finally:
        stop(enc)


async def test_aac_adts_push_is_heard(rig, tmp_path):
    m = await rig.mount(name="studio-aac", area=X1, targets=[X1])
    url = f"icecast://source:{m['password']}@127.0.0.1:{rig.port}/ingest/studio-aac"
    enc = subprocess.Popen([
        "ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
        "sine=frequency=750:duration=60", "-af", "volume=4", "-c:a", "aac", "-b:a", "64k",
        "-content_type", "audio/aac", "-f", "adts", url], stderr=subprocess.PIPE)
    try:
        def on_air() -> bool:
            mount = rig.node.ingests.mounts.get(m["id"])
            return mount is not None and mount.auto is not None \
                and rig.node.engine.main_of(X1) == mount.auto

        await until(on_air, "the AAC push on air")
        assert abs(await rig.hears(X1, tmp_path) - 750) < HZ_TOL
        assert rig.node.ingests.mounts[m["id"]].stats()["format"] == "aac"
    finally:
        stop(enc)
