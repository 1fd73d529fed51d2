"""Emergency override end to end: preemption in one tick, devices over the real control channel,
rights, queueing behind a higher authority, natural end, live voice over WHIP, restart within
2 s, and a second node of a cluster airing what the first one started.

Music runs in three communes (300/350/400 Hz). Audio is checked by FFT of what the hub hands the
transports ("pcm" subscriptions, exact samples on the virtual clock) or of what real clients
decode; devices are WebSocket clients speaking docs/device-protocol.md.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription

from loa.streamer.clock import SAMPLE_RATE
from loa.streamer.emergency.service import ATTENTION_TONES, attention_pcm
from loa.streamer.hub import Subscription
from tests.audio import peak_hz
from tests.emergencynode import (
    MUSIC,
    STEP,
    WAIT,
    X1,
    X2,
    X3,
    Srv,
    close_app,
    ended,
    live_config,
    open_node,
    pcm_from,
    serving,
    settle,
    start_music,
    steps_at,
    switch,
)
from tests.helpers import until
from tests.webrtcpeers import NO_STUN, ToneTrack


# ---- the attention signal ------------------------------------------------------------------------
def test_attention_signal_alternates_two_tones_without_clicks() -> None:
    pcm = attention_pcm(3.0)
    assert len(pcm) == 12 * STEP
    steps = [int(round(peak_hz(pcm[k * STEP:(k + 1) * STEP], SAMPLE_RATE))) for k in range(12)]
    assert steps == [int(ATTENTION_TONES[k % 2]) for k in range(12)]
    assert float(np.max(np.abs(pcm))) <= 0.4 + 1e-6
    # Every tone starts and ends at silence: no step between samples larger than the tones'.
    assert abs(float(pcm[0])) < 1e-6 and abs(float(pcm[-1])) < 1e-3
    max_slope = 0.4 * 2 * np.pi * max(ATTENTION_TONES) / SAMPLE_RATE
    assert float(np.max(np.abs(np.diff(pcm)))) <= max_slope * 1.01


# ---- the API, on the virtual clock -----------------------------------------------------------------
async def test_preempts_targets_in_one_tick_devices_follow_and_it_ends_by_itself(
        tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        node = srv.node
        music = start_music(node)
        board = await srv.device(X1, "board")
        speaker = await srv.device(X2)
        bystander = await srv.device(X3)
        subs = {a: node.hub.subscribe(a, "pcm", maxlen=100_000) for a in MUSIC}
        srv.run(0.5)
        status, em = await srv.call("tinh", "POST", "/api/v1/emergencies", json={
            "targets": [X1, X2], "content": {"text": "Bão số năm sắp đổ bộ."}, "volume": 90,
            "text": "BÃO SỐ 5: sơ tán ngay"})
        assert status == 201, em
        # Persisted before the answer, with the leaf areas it reaches.
        rec = await node.store.get("emergency", em["id"])
        assert rec is not None and rec["status"] == "active" and rec["areas"] == [X1, X2]
        assert em["devices"] == {"devices": 2, "online": 2}
        on = await board.command("emergency")
        assert on["args"] == {"on": True, "volume": 90, "text": "BÃO SỐ 5: sơ tán ngay",
                              "broadcast": em["id"]}  # named: the proof of delivery names it
        assert (await speaker.command("emergency"))["args"]["on"] is True
        srv.run(3.5)
        await settle()
        bid = em["broadcast"]
        s1, s2 = switch(node, X1, bid), switch(node, X2, bid)
        assert s1.sample == s2.sample and s1.cause == "preempt"  # same tick, both areas
        assert not any(c.after == bid for c in node.engine.changes if c.area == X3)
        tones = [int(ATTENTION_TONES[k % 2]) for k in range(12)]
        assert steps_at(subs[X1], s1.sample, 12) == tones
        assert steps_at(subs[X2], s2.sample, 12) == tones
        assert set(steps_at(subs[X3], s1.sample, 12)) == {400}  # the third keeps its music
        # GET: listed while active, with what is on air in its areas.
        status, listed = await srv.call("xa11", "GET", "/api/v1/emergencies")
        assert status == 200 and [e["id"] for e in listed["emergencies"]] == [em["id"]]
        status, one = await srv.call("tinh", "GET", f"/api/v1/emergencies/{em['id']}")
        assert {a["broadcast"] for a in one["on_air"]} == {bid}
        status, listed = await srv.call("xa12", "GET", "/api/v1/emergencies")
        assert status == 200 and len(listed["emergencies"]) == 1
        # The message finishes: the emergency ends by itself, devices are told, music resumes.
        srv.run(em["duration"])
        rec = await ended(node, em["id"])
        assert rec["end_cause"] == "finished"
        assert (await board.command("emergency"))["args"] == {"on": False}
        assert (await speaker.command("emergency"))["args"] == {"on": False}
        srv.run(0.1)
        assert node.engine.on_air(X1)["broadcast"] == music[X1]
        assert node.engine.on_air(X2)["broadcast"] == music[X2]
        assert await node.store.find("command", device=bystander.id) == []
        # As-run: one entry per area it reached; audit: who started it, where.
        await node.station.flush()
        runs = [r for r in await node.store.read_log("asrun") if r["broadcast"] == bid]
        assert sorted(r["area"] for r in runs) == [X1, X2]
        assert all(r["class"] == "emergency" and r["issuer"] == "T01" for r in runs)
        audits = [a for a in await node.store.read_log("audit")
                  if a["action"] == "emergency.start"]
        assert audits[0]["target"] == em["id"] and audits[0]["user"] == "tinh"
        assert audits[0]["details"]["areas"] == [X1, X2]
        status, listed = await srv.call("tinh", "GET", "/api/v1/emergencies")
        assert listed["emergencies"] == []
        for d in (board, speaker, bystander):
            await d.close()


async def test_refusals_change_nothing(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        node = srv.node
        start_music(node)
        srv.run(0.2)
        good = {"targets": [X1], "content": {"text": "Thử"}}
        cases: list[tuple[str, dict[str, Any], int]] = [
            ("xa11", good, 403),  # no emergency right
            ("huyen1", good, 403),
            ("xa11em", {**good, "targets": [X2]}, 403),  # outside its area
            ("tinh", {**good, "targets": ["KHONG-CO"]}, 422),
            ("tinh", {**good, "targets": []}, 422),
            ("tinh", {"targets": [X1]}, 422),
            ("tinh", {**good, "content": {"text": "a", "media": "b"}}, 422),
            ("tinh", {**good, "content": {"media": "khong-co"}}, 422),
            ("tinh", {**good, "content": {"live": "yes"}}, 422),
            ("tinh", {**good, "repeat": 11}, 422),
            ("tinh", {**good, "gap": -1}, 422),
            ("tinh", {**good, "volume": 101}, 422),
            ("tinh", {**good, "attention": {"louder": True}}, 422),
            ("tinh", {**good, "attention": {"media": "khong-co"}}, 422),
        ]
        for who, body, want in cases:
            status, got = await srv.call(who, "POST", "/api/v1/emergencies", json=body)
            assert status == want, (who, body, got)
            assert "/" in got["error"]  # Vietnamese / English
        status, _ = await srv.call("tinh", "POST", "/api/v1/emergencies", data=b"{",
                                   headers={"Content-Type": "application/json"})
        assert status == 400
        status, _ = await srv.call(None, "POST", "/api/v1/emergencies", json=good)
        assert status == 401
        srv.run(0.2)
        assert await node.store.find("emergency") == []
        assert all(node.engine.on_air(a)["class"] == "normal" for a in MUSIC)


async def test_only_the_emergency_right_at_or_above_the_issuer_stops_it(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        node = srv.node
        music = start_music(node)
        srv.run(1.0)
        status, em = await srv.call("tinh", "POST", "/api/v1/emergencies", json={
            "targets": ["T01-H1"], "content": {"text": "Cháy rừng."}, "repeat": 3})
        assert status == 201
        srv.run(2.0)
        for who in ("xa11", "xa11em", "huyen1", "huyen1em"):
            status, got = await srv.call(who, "DELETE", f"/api/v1/emergencies/{em['id']}")
            assert status == 403, (who, got)
        srv.run(0.2)
        assert all(node.engine.on_air(a)["broadcast"] == em["broadcast"] for a in MUSIC)
        assert (await node.store.get("emergency", em["id"]))["status"] == "active"
        refused = [a for a in await node.store.read_log("audit")
                   if a["action"] == "refused" and a["details"]["status"] == 403
                   and a["target"] == f"/api/v1/emergencies/{em['id']}"]
        assert len(refused) == 4
        status, _ = await srv.call("huyen2", "DELETE", f"/api/v1/emergencies/{em['id']}")
        assert status == 404  # not its area: not even visible
        status, ended = await srv.call("tinh", "DELETE", f"/api/v1/emergencies/{em['id']}")
        assert status == 200 and ended["status"] == "ended" and ended["end_cause"] == "stopped"
        srv.run(0.1)
        for a in MUSIC:  # each music resumes at the exact sample where it was preempted
            start = switch(node, a, music[a])
            pre = switch(node, a, em["broadcast"])
            back = next(c for c in node.engine.changes if c.area == a and c.after == music[a]
                        and c.before == em["broadcast"])
            assert back.resumed_at == pre.sample - start.sample
        status, _ = await srv.call("tinh", "DELETE", f"/api/v1/emergencies/{em['id']}")
        assert status == 409


async def test_a_lower_authority_waits_behind_the_province(tmp_path: Path) -> None:
    async with serving(live_config(tmp_path)) as srv:
        node = srv.node
        start_music(node)
        board = await srv.device(X1, "board")
        board2 = await srv.device(X2, "board")
        srv.run(0.5)
        status, prov = await srv.call("tinh", "POST", "/api/v1/emergencies", json={
            "targets": [X1], "content": {"text": "Lũ quét."}, "repeat": 5, "text": "TỈNH"})
        assert status == 201
        assert (await board.command("emergency"))["args"]["text"] == "TỈNH"
        srv.run(0.5)
        status, dist = await srv.call("huyen1em", "POST", "/api/v1/emergencies", json={
            "targets": ["T01-H1"], "content": {"text": "Sạt lở."}, "text": "HUYỆN"})
        assert status == 201
        assert (await board2.command("emergency"))["args"]["text"] == "HUYỆN"
        srv.run(0.5)
        assert node.engine.on_air(X1)["broadcast"] == prov["broadcast"]  # province first
        assert node.engine.on_air(X2)["broadcast"] == dist["broadcast"]
        status, _ = await srv.call("tinh", "DELETE", f"/api/v1/emergencies/{prov['id']}")
        assert status == 200
        # X1 now airs the district's emergency from its start, and its board shows it.
        assert (await board.command("emergency"))["args"] == {"on": True, "volume": 100,
                                                              "text": "HUYỆN",
                                                              "broadcast": dist["id"]}
        srv.run(0.1)
        after = next(c for c in node.engine.changes if c.area == X1
                     and c.after == dist["broadcast"])
        assert after.before == prov["broadcast"]
        status, _ = await srv.call("huyen1em", "DELETE", f"/api/v1/emergencies/{dist['id']}")
        assert status == 200
        assert (await board.command("emergency"))["args"] == {"on": False}
        assert (await board2.command("emergency"))["args"] == {"on": False}
        await board.close()
        await board2.close()


# ---- live voice over WHIP (real clock, real aiortc publisher) ---------------------------------------
def recent_hz(sub: Subscription, seconds: float = 0.3) -> float:
    packets = list(sub.queue)[-int(seconds * 50):]
    _, pcm = pcm_from(packets)
    return peak_hz(pcm, SAMPLE_RATE)


async def test_live_emergency_publishes_over_whip_and_ends_with_the_voice(
        tmp_path: Path) -> None:
    async with serving(live_config(tmp_path), realtime=True) as srv:
        node = srv.node
        music = start_music(node)
        sub = node.hub.subscribe(X1, "pcm", maxlen=2000)
        await until(lambda: len(sub.queue) > 20, "music")
        status, em = await srv.call("tinh", "POST", "/api/v1/emergencies", json={
            "targets": [X1], "content": {"live": True}, "attention": {"before": False},
            "title": "Chỉ đạo trực tiếp"})
        assert status == 201, em
        assert em["live"] is True and em["broadcast"] is None
        assert em["whip"].startswith(f"/whip/{X1}?class=emergency")
        pc = RTCPeerConnection(NO_STUN)
        pc.addTransceiver(ToneTrack(700), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        try:
            headers = {"Authorization": f"Bearer {await srv.login('tinh')}",
                       "Content-Type": "application/sdp"}
            async with srv.http.post(srv.base + em["whip"], data=pc.localDescription.sdp,
                                     headers=headers) as r:
                answer = await r.text()
                assert r.status == 201, answer
                location = r.headers["Location"]
            await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
            await until(lambda: node.engine.on_air(X1)["class"] == "emergency", "the live voice")
            await until(lambda: abs(recent_hz(sub) - 700) < 5, "700 Hz from the publisher")
            assert srv.svc._linked  # the voice belongs to the emergency
            # The publisher hangs up: the live emergency is over, the music comes back.
            async with srv.http.delete(srv.base + location, headers=headers) as r:
                assert r.status == 204
            rec = await ended(node, em["id"])
            assert rec["end_cause"] == "live-ended"
            await until(lambda: node.engine.on_air(X1)["broadcast"] == music[X1], "music")
        finally:
            await pc.close()


# ---- restart ---------------------------------------------------------------------------------------
async def test_restart_puts_the_emergency_back_on_air_within_two_seconds(tmp_path: Path) -> None:
    cfg = live_config(tmp_path)
    async with serving(cfg, realtime=True) as srv:
        start_music(srv.node)
        status, em = await srv.call("tinh", "POST", "/api/v1/emergencies", json={
            "targets": [X1, X2], "content": {"text": "Động đất. Ra khỏi nhà ngay."},
            "repeat": 4, "gap": 1.0})
        assert status == 201
        await until(lambda: srv.node.engine.on_air(X1)["class"] == "emergency", "on air")
        await asyncio.sleep(1.0)
        on_air_at = srv.node.station.wall(switch(srv.node, X1, em["broadcast"]).sample)
        aired = time.time() - on_air_at  # seconds of it heard before the process went away
    # The process is gone (nothing ended the emergency). A new one starts on the same data.
    t0 = time.monotonic()
    srv2 = await open_node(cfg, realtime=True)
    node = srv2.node
    try:
        await until(lambda: node.engine.on_air(X1)["class"] == "emergency"
                    and node.engine.on_air(X2)["class"] == "emergency", "back on air", 10.0)
        back = time.monotonic() - t0
        print(f"restart: on air again after {back * 1000:.0f} ms")
        assert back <= 2.0, f"on air again after {back:.2f} s"
        assert em["id"] in srv2.svc.active
        bid = node.engine.on_air(X1)["broadcast"]
        b = await node.store.get("broadcast", bid)
        # It resumed where it would have been: past what had aired, not past now.
        assert aired - 0.001 <= b["offset"] <= time.time() - on_air_at  # (1 ms: rounding)
        assert b["restored_by"] == "emergency" and b["emergency"] == em["id"]
        old = await node.store.get("broadcast", em["broadcast"])
        assert old["status"] == "ended" and old["end_cause"] == "restart"
        status, ended = await srv2.call("tinh", "DELETE", f"/api/v1/emergencies/{em['id']}")
        assert status == 200
        await until(lambda: node.engine.on_air(X1)["class"] != "emergency", "stopped")
    finally:
        await close_app(srv2)


# ---- a cluster: two nodes, one Redis store and bus -------------------------------------------------
async def test_the_second_node_airs_what_the_first_started(tmp_path: Path, redis_url: str,
                                                           redis_prefix: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg_a = live_config(tmp_path / "a", store=redis_url, prefix=redis_prefix)
    cfg_b = live_config(tmp_path / "b", store=redis_url, prefix=redis_prefix)
    async with serving(cfg_a) as a, serving(cfg_b) as b:
        assert a.svc.node_id != b.svc.node_id
        music_b = start_music(b.node)
        board_b = await b.device(X1, "board")  # connected to node B only
        b.run(0.2)
        status, em = await a.call("tinh", "POST", "/api/v1/emergencies", json={
            "targets": [X1, X2], "content": {"text": "Bão."}, "repeat": 3, "text": "BÃO"})
        assert status == 201
        await until(lambda: em["id"] in b.svc.active, "node B to hear of it")
        b.run(0.2)
        assert b.node.engine.on_air(X1)["class"] == "emergency"
        assert b.node.engine.on_air(X1)["title"] == em["title"]
        assert (await board_b.command("emergency"))["args"]["text"] == "BÃO"
        # The same event again (a replay, a restart) changes nothing: idempotent by id.
        await a.node.bus.publish("emergency", {"v": 1, "event": "start", "id": em["id"],
                                               "origin": a.svc.node_id, "record": em})
        await b.node.bus.publish("emergency", {"v": 1, "event": "start", "id": em["id"],
                                               "origin": "elsewhere", "record": em})
        await asyncio.sleep(0.3)
        assert b.svc.stats["remote_started"] == 1
        assert sum(1 for x in b.node.engine.broadcasts.values()
                   if x.b.cls.name == "emergency") == 1
        status, _ = await a.call("tinh", "DELETE", f"/api/v1/emergencies/{em['id']}")
        assert status == 200
        await until(lambda: em["id"] not in b.svc.active, "node B to end it")
        assert (await board_b.command("emergency"))["args"] == {"on": False}
        b.run(0.1)
        assert b.node.engine.on_air(X1)["broadcast"] == music_b[X1]
        await board_b.close()
        mgr = b.node.devices
        await until(lambda: all(d.link is None for d in mgr.devices.values()), "disconnect")
        await quiesce(a)
        await quiesce(b)


async def quiesce(srv: Srv) -> None:
    """Let a node finish its store writes before it shuts down. With redis-py 8 a task cancelled
    in the middle of a Redis command may swallow the cancellation and run on, so the shutdown of
    the Station's and the device manager's writer tasks could wait forever (reported)."""
    await settle()
    await srv.node.station.flush()
    mgr = srv.node.devices
    await mgr._devw.flush()
    await mgr._cmdw.flush()
    if srv.svc._tasks:
        await asyncio.wait(list(srv.svc._tasks), timeout=WAIT)
    await srv.node.station.flush()
