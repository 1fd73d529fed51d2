"""Levels with real node processes (issue 12): `loa serve` processes on loopback, each with its
own data directory and config, linked province -> district -> commune (and province -> commune)
by keys each parent issued. Everything is driven and checked from outside, as an operator would:
the REST API of each node, and each area's HTTP Opus stream decoded by FFmpeg (PyAV) to the
frequency it carries."""

from __future__ import annotations

from pathlib import Path

from tests.nodes import air_tone, chain, eventually, hears, on_air

P, D, C = "T01", "T01-H1", "T01-H1-X1"
ELSEWHERE = "T01-H2-X1"  # a commune of another district


def shown(rec: dict, klass: str, authority: int, issuer: str, title: str) -> None:
    assert (rec["class"], rec["authority"], rec["issuer"], rec["title"]) == \
        (klass, authority, issuer, title), rec


async def test_province_district_commune(tmp_path: Path) -> None:
    async with chain(tmp_path, [P, D, C]) as c:
        prov, dist, comm = c.nodes
        own = await air_tone(c.ops[2], tmp_path, 500, [C], "normal", "Chương trình xã")
        await hears(comm, C, 500, "the commune's own programme")
        districts = await air_tone(c.ops[1], tmp_path, 440, [D], "normal", "Nhạc huyện")
        await hears(comm, C, 440, "the district's programme above the commune's own")

        # The province airs a normal programme elsewhere while the district's priority bulletin
        # airs in its communes: each where it is sent, the commune shows who sent what.
        music = await air_tone(c.ops[0], tmp_path, 300, ["T01-H2"], "normal", "Nhạc tỉnh")
        bulletin = await air_tone(c.ops[1], tmp_path, 660, [D], "priority",
                                  "Bản tin ưu tiên huyện")
        await hears(comm, C, 660, "the district's priority bulletin on the commune node")
        await hears(prov, ELSEWHERE, 300, "the province's programme elsewhere")
        seen = await on_air(c.ops[2], C)
        shown(seen["records"][bulletin], "priority", 1, D, "Bản tin ưu tiên huyện")
        assert seen["area"]["broadcast"] == bulletin and music not in seen["records"]

        # A province emergency to the whole province: heard on the commune node, over the
        # district's bulletin and the commune's own; class, authority, issuer, title intact.
        alarm = await air_tone(c.ops[0], tmp_path, 1000, [P], "emergency", "Khẩn cấp: lũ")
        await hears(comm, C, 1000, "the province's emergency two hops down")
        await hears(dist, D, 1000, "the province's emergency on the district node")
        seen = await on_air(c.ops[2], C)
        shown(seen["records"][alarm], "emergency", 0, P, "Khẩn cấp: lũ")
        assert seen["area"]["broadcast"] == alarm and seen["area"]["class"] == "emergency"
        assert {own, districts, bulletin} <= set(seen["records"])  # preempted, not ended

        # The province ends it: the district's bulletin resumes on the commune.
        await c.ops[0].ok("DELETE", f"/api/v1/broadcasts/{alarm}")
        await hears(comm, C, 660, "the district's bulletin back after the emergency")
        assert alarm not in (await on_air(c.ops[2], C))["records"]


async def test_province_commune_two_levels(tmp_path: Path) -> None:
    async with chain(tmp_path, [P, C]) as c:
        prov, comm = c.nodes
        own = await air_tone(c.ops[1], tmp_path, 500, [C], "priority", "Bản tin xã")
        await hears(comm, C, 500, "the commune's own")
        music = await air_tone(c.ops[0], tmp_path, 300, ["T01-H2"], "normal", "Nhạc tỉnh")
        await hears(prov, ELSEWHERE, 300, "the province's programme elsewhere")
        assert music not in (await on_air(c.ops[1], C))["records"]
        await hears(comm, C, 500, "the commune's own, untouched by a programme elsewhere")
        alarm = await air_tone(c.ops[0], tmp_path, 1000, [P], "emergency", "Khẩn cấp: bão")
        await hears(comm, C, 1000, "the province's emergency one hop down")
        seen = await on_air(c.ops[1], C)
        shown(seen["records"][alarm], "emergency", 0, P, "Khẩn cấp: bão")
        assert own in seen["records"]
        await c.ops[0].ok("DELETE", f"/api/v1/broadcasts/{alarm}")
        await hears(comm, C, 500, "the commune's own resumes")


async def test_the_district_killed_and_restarted(tmp_path: Path) -> None:
    async with chain(tmp_path, [P, D, C]) as c:
        prov, dist, comm = c.nodes
        own = await air_tone(c.ops[2], tmp_path, 500, [C], "normal", "Chương trình xã")
        districts = await air_tone(c.ops[1], tmp_path, 440, [D], "normal", "Nhạc huyện")
        await hears(comm, C, 440, "the district's programme on the commune")

        await dist.kill()
        await eventually(lambda: _state(c, 2, "down"), "the commune's link down")
        await hears(comm, C, 500, "the commune's own while the district is dead")
        # The province speaks while the district is down: it reaches the commune after.
        alarm = await air_tone(c.ops[0], tmp_path, 1000, [P], "emergency", "Khẩn cấp: cháy")
        await hears(comm, C, 500, "the commune's own: the province cannot reach it yet")

        await dist.start()
        await eventually(lambda: _state(c, 2, "up"), "the commune's link back")
        await hears(comm, C, 1000, "the province's emergency after the district's return")
        seen = await on_air(c.ops[2], C)
        ids = [r["id"] for r in seen["all"]]
        assert sorted(ids) == sorted({own, districts, alarm}), seen["all"]  # none twice
        shown(seen["records"][alarm], "emergency", 0, P, "Khẩn cấp: cháy")

        # Killed again under the emergency: the commune keeps it (a parent's emergency stays
        # until the parent ends it); back, the district says hello only once it knows the
        # province's air again, so the commune neither drops the emergency nor starts it twice.
        await dist.kill()
        await eventually(lambda: _state(c, 2, "down"), "the commune's link down again")
        await eventually(lambda: _holding_nothing(c, 2), "the hold over")
        # Its rank is kept (nothing lower takes the air), its audio waits for the link.
        assert (await on_air(c.ops[2], C))["area"]["broadcast"] == alarm
        before = await c.apis[2].upstream()
        await dist.start()
        await eventually(lambda: _connects(c, 2, before["connects"] + 1), "the link back again")
        after = await c.apis[2].upstream()
        assert after["stopped"] == before["stopped"] and alarm in after["broadcasts"], after
        assert len(comm.logged(f"event=upstream_start id={alarm} ")) == 1  # never twice
        await hears(comm, C, 1000, "the emergency, never interrupted")
        await c.ops[0].ok("DELETE", f"/api/v1/broadcasts/{alarm}")
        await hears(comm, C, 440, "the district's own programme again, resumed")
        seen = await on_air(c.ops[2], C)
        assert seen["area"]["broadcast"] == districts
        assert sorted(r["id"] for r in seen["all"]) == sorted({own, districts})


async def _state(c, i: int, state: str) -> bool:
    return (await c.apis[i].upstream()).get("state") == state


async def test_a_loop_is_refused_and_nothing_on_air_moves(tmp_path: Path) -> None:
    """The province node reconfigured as a child of its own child (province -> district ->
    province): the district refuses it (4508, the reason, its log and monitor), the province's
    link shows `refused` and raises an alert, and both keep airing what they aired."""
    async with chain(tmp_path, [P, D]) as c:
        prov, dist = c.nodes
        music = await air_tone(c.ops[0], tmp_path, 300, [P], "normal", "Nhạc tỉnh")
        await hears(dist, D, 300, "the province's programme on the district node")
        prov_id = (prov.root / "data" / "node-id").read_text().strip()
        key = await c.apis[1].node_key(D, "the province, wrongly below its district")
        await prov.kill()
        prov.sections["upstream"] = {"url": dist.url, "key": key, "areas": [D], "hold_s": 0.5}
        await prov.start()
        await eventually(lambda: _state(c, 0, "refused"), "the province's link refused")
        up = await c.apis[0].upstream()
        assert "loop" in up["reason"] and prov_id in up["reason"], up
        mon = await c.apis[1].ok("GET", "/api/v1/monitor")
        refusal = mon["node"]["links"]["refused"][-1]
        assert (refusal["node"], refusal["code"]) == (prov_id, 4508), refusal
        assert refusal["path"][1] == prov_id  # the district's chain: itself, then the province
        assert dist.logged(f"event=link_refused .*node={prov_id} code=4508")
        assert prov.logged("event=alert_raised kind=link_loop")
        # Nothing on air moved: the province's programme (restored) airs on both nodes.
        await eventually(lambda: _state(c, 1, "up"), "the district's own link back")
        await hears(prov, P, 300, "the province's own programme")
        await hears(dist, D, 300, "the province's programme on the district, as before")
        assert (await on_air(c.ops[1], D))["area"]["broadcast"] == music


async def test_a_node_linked_to_itself_is_refused(tmp_path: Path) -> None:
    async with chain(tmp_path, [P]) as c:
        node, = c.nodes
        own = await air_tone(c.ops[0], tmp_path, 300, [P], "normal", "Nhạc tỉnh")
        key = await c.apis[0].node_key(D, "itself")
        await node.kill()
        node.sections["upstream"] = {"url": node.url, "key": key, "areas": [D]}
        await node.start()
        await eventually(lambda: _state(c, 0, "refused"), "the link to itself refused")
        assert "loop" in (await c.apis[0].upstream())["reason"]
        await hears(node, D, 300, "its own programme, untouched")
        assert (await on_air(c.ops[0], P))["area"]["broadcast"] == own


async def test_a_parent_whose_chain_holds_the_child_is_refused_by_the_child(
        tmp_path: Path) -> None:
    """The child finds the loop itself in the parent's chain (a parent that did not check, or a
    chain that changed since): first in a `path` event (the chain above changed), then in the
    next hello; it closes with 4508 each time, and its own programme keeps the air."""
    from aiohttp import web

    from loa.relay.link import CLOSE_LOOP
    from loa.streamer.broadcast import Broadcast
    from loa.streamer.sources import ToneSource
    from loa.web.testing import LOCAL, start_node
    from tests.apiclient import make_config
    from tests.helpers import until

    closed: list[int | None] = []
    me: dict[str, str] = {}
    event = {"id": "tinh000001", "class": "priority", "authority": 0, "issuer": P,
             "issuer_path": [P], "title": "Bản tin tỉnh", "policy": "resume", "targets": [D]}

    async def link(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        me["id"] = request.query["node"]
        looped = ["tinh", "huyen", me["id"]]
        await ws.send_json({"type": "hello", "areas": [D], "broadcasts": [event],
                            "path": looped if closed else ["tinh"]})
        if not closed:
            await until(lambda: me.get("go"), "the test's go")
            await ws.send_json({"type": "path", "path": looped})  # a chain that changed
        await ws.receive()
        closed.append(ws.close_code)
        return ws

    app = web.Application()
    app.router.add_get("/api/v1/nodes/link", link)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, LOCAL, 0).start()
    (tmp_path / "child").mkdir()
    cfg = make_config(tmp_path / "child")
    cfg.upstream.url, cfg.upstream.key = f"http://{LOCAL}:{runner.addresses[0][1]}", "x.y"
    cfg.upstream.areas = [D]
    child = await start_node(cfg)
    try:
        engine, up = child.node.engine, child.node.upstream
        assert up is not None
        own = engine.start(Broadcast(ToneSource(440, 0.3), [D], issuer=D, title="Nhạc huyện"))
        await until(lambda: engine.main_of(D) == event["id"], "the parent's bulletin on air")
        assert up.path == ["tinh"] and up.state == "up"
        me["go"] = "1"
        await until(lambda: len(closed) >= 2, "refused on the path event, then on hello")
        assert closed[:2] == [CLOSE_LOOP, CLOSE_LOOP] and me["id"] == child.node.node_id
        assert up.state == "refused" and "loop" in up.reason and not up.remotes
        assert up.counts["bad_events"] == 0 and up.counts["started"] == 1
        await until(lambda: engine.main_of(D) == own, "its own programme back on the air")
        assert ("link_loop", cfg.upstream.url) in child.node.alerts.active
    finally:
        await child.stop()
        await runner.cleanup()


async def test_areas_that_hear_different_things_each_get_their_own(tmp_path: Path) -> None:
    """A province broadcast to two communes of a district node, preempted on the province node
    in one of them only: the district node still gets its audio for the other (the link takes
    each frame from an area that hears it, not from one representative area), and airs the
    preempting one where it belongs. In-process nodes: each area's Opus packets read directly."""
    import aiohttp

    from loa.streamer.broadcast import Broadcast
    from loa.streamer.sources import ToneSource
    from loa.web.auth import add_user
    from loa.web.testing import start_node
    from tests.apiclient import PASSWORD, make_config
    from tests.audio import decode_packets, peak_hz, rms
    from tests.helpers import until

    X1, X2 = "T01-H1-X1", "T01-H1-X2"

    async def admin(node) -> None:
        await add_user(node.store, node.tree, "qtv", "admin", P, PASSWORD, emergency=True)

    (tmp_path / "p").mkdir()
    parent = await start_node(make_config(tmp_path / "p"), prepare=admin)
    async with aiohttp.ClientSession() as http:
        async with http.post(parent.url + "/api/v1/auth/token",
                             json={"username": "qtv", "password": PASSWORD}) as r:
            token = (await r.json())["token"]
        async with http.post(parent.url + "/api/v1/nodes", json={"name": "huyện", "area": D},
                             headers={"Authorization": f"Bearer {token}"}) as r:
            key = (await r.json())["key"]
    (tmp_path / "c").mkdir()
    cfg = make_config(tmp_path / "c")
    cfg.upstream.url, cfg.upstream.key, cfg.upstream.areas = parent.url, key, [D]
    child = await start_node(cfg)
    try:
        up, engine = child.node.upstream, child.node.engine
        assert up is not None
        await until(lambda: up.state == "up", "the link up")
        got: dict[str, list] = {X1: [], X2: []}
        for area, packets in got.items():
            child.node.hub.subscribe(area, "opus").on_packets = packets.extend

        def hz(area: str) -> tuple[float, float]:
            if len(got[area]) < 30:
                return 0.0, 0.0
            pcm, rate = decode_packets("opus", got[area][-30:])
            pcm = pcm[-int(0.4 * rate):]
            return peak_hz(pcm, rate), rms(pcm)

        def hears(area: str, f: float) -> bool:
            h, level = hz(area)
            return abs(h - f) < 8 and level > 0.05

        pe = parent.node.engine
        bulletin = pe.start(Broadcast(ToneSource(650, 0.3), [X1, X2], issuer=P,
                                      klass="priority", title="Bản tin tỉnh"))
        await until(lambda: hears(X1, 650) and hears(X2, 650), "the bulletin in both")
        alarm = pe.start(Broadcast(ToneSource(1000, 0.3), [X1], issuer=P, klass="emergency",
                                   title="Khẩn cấp xã 1"))
        await until(lambda: engine.main_of(X1) == alarm, "the emergency in commune 1")
        assert pe.main_of(X2) == bulletin and engine.main_of(X2) == bulletin
        await until(lambda: hears(X1, 1000), "the emergency heard in commune 1")
        got[X2].clear()
        await until(lambda: len(got[X2]) >= 60, "1.2 s of commune 2")
        assert hears(X2, 650), hz(X2)  # the bulletin, not silence, in the other commune
        assert up.counts["concealed"] == 0  # whole: no frame lost at the switch

        # An overlay over it in commune 1 only: commune 2's frames (the bulletin alone) are the
        # ones sent, and the child mixes the overlay itself where it belongs (not twice, not
        # in commune 2).
        pe.stop(alarm)
        over = pe.start(Broadcast(ToneSource(1000, 0.3), [X1], issuer=P, klass="emergency",
                                  policy="overlay", title="Thông báo xã 1"))
        await until(lambda: engine.overlays_of(X1) == (over,), "the overlay in commune 1")
        assert pe.overlays_of(X1) == (over,) and not engine.overlays_of(X2)
        await until(lambda: hears(X1, 1000), "the overlay heard over the bulletin in commune 1")
        got[X2].clear()
        await until(lambda: len(got[X2]) >= 60, "1.2 s of commune 2")
        assert hears(X2, 650), hz(X2)  # the bulletin alone: not the overlay's mix
    finally:
        await child.stop()
        await parent.stop()


async def _connects(c, i: int, n: int) -> bool:
    return (await c.apis[i].upstream()).get("connects", 0) >= n


async def _holding_nothing(c, i: int) -> bool:
    """The hold after a link loss is over: what is left of the parent's is kept for good."""
    up = await c.apis[i].upstream()
    return up["state"] == "down" and up["stopped"] > 0 and len(up["broadcasts"]) == 1
