"""The link between nodes (issue 12): two real nodes on loopback, a province parent and a district
child, each with its own data directory; the child's [upstream] names the parent and a key the
parent issued. What the child airs is checked in its engine and heard in its area's Opus stream
(decoded with FFmpeg's libopus through PyAV)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from loa.codecs.encoders import Packet
from loa.relay.link import CLOSE_AREAS, CLOSE_CREDENTIAL, encode_frame
from loa.streamer.broadcast import Broadcast
from loa.streamer.engine import OnAirChange
from loa.streamer.sources import ToneSource
from loa.web.config import Config
from loa.web.node import Node
from loa.web.testing import LOCAL, LiveNode, start_node
from tests import linkpair
from tests.apiclient import PASSWORD
from tests.audio import decode_packets, peak_hz, rms
from tests.helpers import until
from tests.linkpair import ADMIN, COMMUNE, DISTRICT, api, issue_key, node_config, people


@dataclass
class Listener:
    """An area's Opus stream on a node, as a loudspeaker would pull it."""

    packets: list[Packet] = field(default_factory=list)

    def hears(self, hz: float, seconds: float = 0.4) -> bool:
        n = int(seconds / 0.02)
        if len(self.packets) < n + 5:
            return False
        pcm, rate = decode_packets("opus", self.packets[-n - 5:])
        pcm = pcm[-int(seconds * rate):]
        return abs(peak_hz(pcm, rate) - hz) < 8 and rms(pcm) > 0.05


def listen(node: Node, area: str) -> Listener:
    got = Listener()
    sub = node.hub.subscribe(area, "opus")
    sub.on_packets = got.packets.extend
    return got


@dataclass
class Pair:
    parent: LiveNode
    child: LiveNode
    parent_cfg: Config
    http: aiohttp.ClientSession
    token: str
    node_id: str
    key: str

    @property
    def link(self):  # the child's upstream link
        assert self.child.node.upstream is not None
        return self.child.node.upstream


def child_config(tmp_path: Path, url: str, key: str, areas: list[str],
                 name: str = "child") -> Config:
    return linkpair.child_config(tmp_path / name, url, key, areas)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    pcfg = node_config(tmp_path / "parent")
    parent = await start_node(pcfg, prepare=people)
    http = aiohttp.ClientSession()
    token, cred = await issue_key(http, parent.url, DISTRICT)
    child = await start_node(child_config(tmp_path, parent.url, cred["key"], [DISTRICT]),
                             prepare=people)
    p = Pair(parent, child, pcfg, http, token, cred["id"], cred["key"])
    try:
        yield p
    finally:
        await child.stop()
        await p.parent.stop()
        await http.close()


def own_programme(node: Node) -> str:
    return node.engine.start(Broadcast(ToneSource(440, 0.3), [DISTRICT], issuer=DISTRICT,
                                       klass="normal", title="Chương trình huyện"))


def province(node: Node, klass: str, hz: float = 1000, title: str = "Bản tin tỉnh") -> str:
    return node.engine.start(Broadcast(ToneSource(hz, 0.3), ["T01"], issuer="T01",
                                       klass=klass, title=title))


async def test_province_broadcast_preempts_the_districts_own_and_survives_outages(pair: Pair):
    child, parent = pair.child.node, pair.parent.node
    ear = listen(child, DISTRICT)
    await until(lambda: pair.link.state == "up", "the link up")
    own = own_programme(child)
    await until(lambda: ear.hears(440), "the district's own programme")

    switched: dict[str, float] = {}

    def on_change(c: OnAirChange) -> None:
        if c.area == DISTRICT and c.after is not None:
            switched.setdefault(c.after, time.perf_counter())

    child.engine.listeners.append(on_change)
    t0 = time.perf_counter()
    bid = province(parent, "priority")
    await until(lambda: child.engine.main_of(DISTRICT) == bid, "the province on the child")
    print(f"\nparent start -> child on-air switch: {(switched[bid] - t0) * 1000:.1f} ms")
    for area in (DISTRICT, COMMUNE):
        on = child.engine.on_air(area)
        assert (on["broadcast"], on["class"], on["issuer"], on["title"]) == \
            (bid, "priority", "T01", "Bản tin tỉnh"), on
    rec = await child.store.get("broadcast", bid)
    assert rec is not None and rec["class"] == "priority" and rec["issuer"] == "T01"
    assert rec["targets"] == [DISTRICT]  # cut to the child's part of the tree
    await until(lambda: ear.hears(1000), "the province's tone on the child's stream")

    parent.engine.stop(bid)
    await until(lambda: child.engine.main_of(DISTRICT) == own, "the district's own again")
    await until(lambda: ear.hears(440), "the district's own programme heard again")

    # The link drops under a broadcast and returns: held meanwhile, started once, no gap in rank.
    second = province(parent, "priority", 800, "Bản tin tỉnh 2")
    await until(lambda: ear.hears(800), "the second province broadcast")
    started = pair.link.counts["started"]
    connects = pair.link.counts["connects"]
    t_drop = time.perf_counter()
    for feed in list(parent.links.feeds):
        assert feed.end is not None
        feed.end(1001, "test: the network drops")
    await until(lambda: pair.link.counts["connects"] == connects + 1, "the link back")
    print(f"link dropped -> resynced: {(time.perf_counter() - t_drop) * 1000:.0f} ms")
    assert child.engine.main_of(DISTRICT) == second
    assert pair.link.counts["started"] == started  # the hello's broadcast was not started again
    await until(lambda: ear.hears(800), "the second broadcast heard after the reconnect")

    # The parent stops: the child lets the parent's broadcast go after its hold, airs its own.
    await pair.parent.stop()
    await until(lambda: pair.link.state == "down", "the link down")
    await until(lambda: child.engine.main_of(DISTRICT) == own, "the own programme back")
    await until(lambda: ear.hears(440), "the own programme heard while the parent is down")
    status, out = await api(pair.http, pair.child.url, "POST", "/api/v1/auth/token",
                            json={"username": ADMIN, "password": PASSWORD})
    status, mon = await api(pair.http, pair.child.url, "GET", "/api/v1/monitor", out["token"])
    shown = mon["node"]["links"]["upstream"]
    assert status == 200 and shown["state"] == "down" and shown["reason"], shown
    async with pair.http.get(pair.child.url + "/metrics",
                             headers={"Authorization": f"Bearer {out['token']}"}) as r:
        metrics = await r.text()
    assert "\nloa_upstream_up 0\n" in metrics, metrics[-800:]

    # The parent returns on its address: the child reconnects within about a second.
    t_back = time.perf_counter()
    pair.parent = await start_node(pair.parent_cfg, prepare=people, port=pair.parent.port)
    await until(lambda: pair.link.state == "up", "the link up again", timeout=5)
    back = time.perf_counter() - t_back
    print(f"parent restarted -> link up: {back * 1000:.0f} ms")
    assert back < 2.0
    assert child.engine.main_of(DISTRICT) == own and not pair.link.remotes


async def test_refused_credentials_and_areas_and_garbage_leave_the_air_alone(pair: Pair):
    child, parent = pair.child.node, pair.parent.node
    await until(lambda: pair.link.state == "up", "the link up")
    own = own_programme(child)
    held = province(parent, "normal", 600, "Nhạc tỉnh")  # above the district's own there too
    await until(lambda: child.engine.main_of(DISTRICT) == held, "the province's on the child")
    ws_url = pair.parent.url.replace("http", "ws", 1) + "/api/v1/nodes/link"
    auth = {"Authorization": f"Node {pair.key}"}

    async def refusal(url: str, headers: dict[str, str]) -> tuple[int | None, str]:
        async with pair.http.ws_connect(url, headers=headers) as ws:
            msg = await ws.receive()
            return ws.close_code, str(msg.extra)

    code, reason = await refusal(ws_url + "?areas=T01-H2", auth)
    assert code == CLOSE_AREAS and "T01-H2" in reason and "outside" in reason
    code, reason = await refusal(ws_url, {"Authorization": f"Node {pair.node_id}.wrong"})
    assert code == CLOSE_CREDENTIAL and "wrong node key" in reason

    # A child that sends garbage is cut off; the parent's air does not move.
    async with pair.http.ws_connect(ws_url, headers=auth) as ws:
        hello = await ws.receive_json()
        assert hello["type"] == "hello" and hello["areas"] == [DISTRICT]
        await ws.send_bytes(b"\x00garbage")
        while (await ws.receive()).type not in (aiohttp.WSMsgType.CLOSE,
                                                aiohttp.WSMsgType.CLOSED):
            pass
        assert ws.close_code == 1003
    assert parent.engine.main_of(DISTRICT) == held

    # Revoked: the child's link is ended with the reason, it stays refused, its own airs on.
    status, rec = await api(pair.http, pair.parent.url, "POST",
                            f"/api/v1/nodes/{pair.node_id}/revoke", pair.token)
    assert status == 200 and rec["revoked"] is True
    # The state turns "refused" as the close arrives; the parent's broadcasts stop once the
    # socket is closed (up to its 1 s close timeout later).
    await until(lambda: pair.link.state == "refused" and not pair.link.remotes,
                "the child refused, the parent's broadcasts stopped")
    assert "revoked" in pair.link.reason
    await until(lambda: child.engine.main_of(DISTRICT) == own, "the own programme on air")
    status, mon = await api(pair.http, pair.parent.url, "GET", "/api/v1/nodes", pair.token)
    assert status == 200 and mon["nodes"][0]["revoked"] and not mon["nodes"][0]["connected"]
    audit = await parent.store.read_log("audit", limit=100)
    assert any(e["action"] == "node.revoke" and e["target"] == pair.node_id for e in audit)


async def test_garbage_from_the_parent_is_refused_without_disturbing_the_air(tmp_path: Path):
    """A stand-in parent: says hello with an emergency and sends its frames in real time with junk
    between them; then is unreachable (503) past the hold; then returns with nothing on air."""
    from loa.codecs.opus import Opus
    from tests.audio import tone_pcm

    enc = Opus(32000, 5)
    pcm = tone_pcm(3.0, 1000)
    frames = [enc.encode(pcm[i:i + 960]) for i in range(0, pcm.shape[0] - 960, 960)]
    bid = "tinh0000001"
    event = {"id": bid, "class": "emergency", "authority": 0, "issuer": "T01",
             "issuer_path": ["T01"], "title": "Khẩn cấp tỉnh", "policy": "resume",
             "targets": [DISTRICT]}
    stand_in: dict[str, object] = {"mode": "serve"}

    async def link(request: web.Request) -> web.StreamResponse:
        if stand_in["mode"] == "down":
            return web.Response(status=503)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        stand_in["ws"] = ws
        on_air = [event] if stand_in["mode"] == "serve" else []
        await ws.send_str(json.dumps({"type": "hello", "areas": [DISTRICT],
                                      "broadcasts": on_air}))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i, f in enumerate(frames if on_air else []):
            await asyncio.sleep(max(0.0, t0 + i * 0.02 - loop.time()))  # real-time pacing
            if i % 10 == 5:
                await ws.send_bytes(b"\x01\xff" + b"x" * 30)  # an id length past the end
                await ws.send_bytes(encode_frame(bid, i * 960, b""))
                await ws.send_str("{not json")
                await ws.send_str(json.dumps({"type": "explode"}))
                await ws.send_bytes(encode_frame(bid, (i - 3) * 960, f))  # late
            await ws.send_bytes(encode_frame(bid, i * 960, f))
        await ws.receive()  # until either side closes
        return ws

    app = web.Application()
    app.router.add_get("/api/v1/nodes/link", link)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, LOCAL, 0).start()
    port = runner.addresses[0][1]
    child = await start_node(child_config(tmp_path, f"http://{LOCAL}:{port}", "x.y", [DISTRICT]))
    try:
        engine, link = child.node.engine, child.node.upstream
        assert link is not None
        ear = listen(child.node, DISTRICT)
        own = own_programme(child.node)
        await until(lambda: engine.main_of(DISTRICT) == bid, "the stand-in's emergency on air")
        on = engine.on_air(COMMUNE)
        assert (on["class"], on["issuer"], on["title"]) == ("emergency", "T01", "Khẩn cấp tỉnh")
        await until(lambda: ear.hears(1000), "the emergency's tone through the junk")
        await until(lambda: link.counts["bad_events"] >= 4, "junk events counted")
        assert link.counts["bad_frames"] >= 4 and link.counts["late"] >= 2
        assert link.state == "up" and link.counts["started"] == 1
        assert engine.main_of(DISTRICT) == bid

        # Unreachable past the hold: the parent's emergency stays until the parent ends it.
        stand_in["mode"] = "down"
        ws = stand_in["ws"]
        assert isinstance(ws, web.WebSocketResponse)
        await ws.close()
        await until(lambda: link.state == "down" and link.holding, "the link down, holding")
        await until(lambda: not link.holding, "the hold over")
        assert engine.main_of(DISTRICT) == bid and list(link.remotes) == [bid]

        # Back, with nothing on the air: the hello's resync stops it; the district's own returns.
        stand_in["mode"] = "empty"
        await until(lambda: link.state == "up", "the link back", timeout=5)
        await until(lambda: engine.main_of(DISTRICT) == own, "the own programme after the resync")
        assert not link.remotes and link.counts["started"] == 1 and link.counts["stopped"] == 1
        await until(lambda: ear.hears(440), "the own programme heard")
    finally:
        await child.stop()
        await runner.cleanup()


async def test_three_levels_province_district_commune(pair: Pair, tmp_path: Path):
    """The district node is itself a parent: its commune node hears the province through it,
    the district's own above the commune's own, with the same ids, classes and issuers."""
    province_node, district = pair.parent.node, pair.child.node
    _, cred = await issue_key(pair.http, pair.child.url, COMMUNE)
    commune = await start_node(child_config(tmp_path, pair.child.url, cred["key"], [COMMUNE],
                                            "commune"))
    try:
        c = commune.node
        assert c.upstream is not None
        ear = listen(c, COMMUNE)
        await until(lambda: c.upstream.state == "up" and pair.link.state == "up", "both links")
        own = c.engine.start(Broadcast(ToneSource(500, 0.3), [COMMUNE], issuer=COMMUNE,
                                       title="Bản tin xã"))
        await until(lambda: ear.hears(500), "the commune's own")
        districts = own_programme(district)
        await until(lambda: c.engine.main_of(COMMUNE) == districts, "the district's on the commune")
        await until(lambda: ear.hears(440), "the district's heard on the commune")
        switched: dict[str, float] = {}
        c.engine.listeners.append(
            lambda ch: switched.setdefault(ch.after or "", time.perf_counter()))
        t0 = time.perf_counter()
        bid = province(province_node, "emergency", 1000, "Khẩn cấp: lũ")
        await until(lambda: c.engine.main_of(COMMUNE) == bid, "the province on the commune")
        print(f"\nprovince start -> commune on-air switch, 2 hops: "
              f"{(switched[bid] - t0) * 1000:.1f} ms")
        on = c.engine.on_air(COMMUNE)
        assert (on["class"], on["issuer"], on["title"]) == ("emergency", "T01", "Khẩn cấp: lũ")
        await until(lambda: ear.hears(1000), "the province's tone two hops down")
        province_node.engine.stop(bid)
        await until(lambda: c.engine.main_of(COMMUNE) == districts, "the district's back")
        took = []  # measured, not asserted: the province's start to the commune's switch
        for n in range(5):
            t0 = time.perf_counter()
            again = province(province_node, "emergency", 1000, f"Khẩn cấp {n}")
            await until(lambda a=again: c.engine.main_of(COMMUNE) == a, "an emergency",
                        step=0.005)
            took.append((switched[again] - t0) * 1000)
            province_node.engine.stop(again)
            await until(lambda: c.engine.main_of(COMMUNE) == districts, "the district's back")
        print(f"2 hops, 5 emergencies: p50 {sorted(took)[2]:.1f} ms, max {max(took):.1f} ms")
        district.engine.stop(districts)
        await until(lambda: c.engine.main_of(COMMUNE) == own, "the commune's own back")
        await until(lambda: ear.hears(500), "the commune's own heard again")
    finally:
        await commune.stop()


async def test_an_issuer_this_tree_lacks_maps_to_its_nearest_known_ancestor(pair: Pair):
    link = pair.link

    def issuer(path: list[str]) -> str:
        return link.issuer_here({"issuer": path[-1], "issuer_path": path}, [COMMUNE])

    assert issuer(["T01", "T01-H1"]) == "T01-H1"
    assert issuer(["T01", "T01-H9"]) == "T01"  # a district this node does not know
    assert issuer(["VN"]) == "T01"  # above this tree: its root, the highest authority here
