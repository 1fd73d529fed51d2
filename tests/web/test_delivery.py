"""Proof of delivery (issue 13) against a real node on 127.0.0.1 and real devices: the fleet
simulator over the control channel, two of its loudspeakers decoding their area's HTTP Opus
stream. An emergency to a district's loudspeakers where one is offline and one has a broken
amplifier: the proof says k/N and names the missing ones with the reason; the decoders that
claim to have played it hear its attention signal; the proof survives a restart of the node; a
commune sees its own part, another commune's operator gets 403; the CSV holds every loudspeaker."""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from loa.relay.agent.agent import Agent, AgentOptions
from loa.relay.agent.sim import Fleet, recent_audio
from loa.web.auth import add_user
from tests.apiclient import PASSWORD, tone_file
from tests.audio import peak_hz
from tests.helpers import Server, delete_prefix, start_node, stop_node, until

DISTRICT = "T01-H1"
TEXT = "Lũ quét tại thượng nguồn, người dân sơ tán lên cao ngay."


def _settings(cfg: Any) -> None:
    cfg.devices.heartbeat = 2.0
    cfg.devices.retry_interval = 1.0


async def _call(srv: Server, token: str, path: str) -> tuple[int, Any]:
    async with srv.http.get(srv.base + path,
                            headers={"Authorization": f"Bearer {token}"}) as r:
        body = await (r.json() if r.content_type == "application/json" else r.text())
        return r.status, body


async def _login(srv: Server, who: str) -> str:
    async with srv.http.post(f"{srv.base}/api/v1/auth/token",
                             json={"username": who, "password": PASSWORD}) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["token"])


def _hears_attention(pcm: np.ndarray) -> bool:
    """The last 0.2 s are one of the attention signal's tones (800 or 1000 Hz)."""
    if len(pcm) < 9600 or float(np.abs(pcm[-9600:]).max()) < 0.02:
        return False
    hz = peak_hz(pcm[-9600:], 48_000)
    return abs(hz - 800) < 15 or abs(hz - 1000) < 15


async def test_emergency_proof_names_the_missing_survives_restart_and_is_scoped(
        tmp_path: Path) -> None:
    srv = await start_node(tmp_path, _settings, "T01")
    token = srv.token
    for who, area in (("xa11", "T01-H1-X1"), ("xa21", "T01-H2-X1")):
        await add_user(srv.node.store, srv.node.tree, who, "operator", area, password=PASSWORD)
    offline_id, _ = await srv.device(DISTRICT + "-X3", name="Cụm loa mất điện")
    fleet = Fleet(srv.base, token, speakers=6, decode=2, broken=1, area=DISTRICT,
                  fleet_file=tmp_path / "fleet.json", status_every=0)
    await fleet.start()
    try:
        await until(lambda: fleet.counts()["connected"] == 6, "the fleet connected",
                    timeout=60.0, step=0.1)
        decoders = fleet.decoders()
        await until(lambda: all(d.hears_audio() for d in decoders), "the decoders hear the tone",
                    timeout=60.0, step=0.1)
        broken = next(d for d in fleet.devices if d.broken)
        status, em = await srv.post("/api/v1/emergencies", {
            "targets": [DISTRICT], "content": {"text": TEXT}})
        assert status == 201, em
        eid = em["id"]

        # the decoders that will be counted as having played it do hear it
        await until(lambda: all(_hears_attention(recent_audio(d)) for d in decoders),
                    "the decoders hearing the attention signal", timeout=30.0, step=0.05)

        async def delivery() -> dict[str, Any]:
            status, one = await _call(srv, token, f"/api/v1/emergencies/{eid}")
            assert status == 200, one
            return dict(one["delivery"])

        async def settled() -> bool:
            d = await delivery()
            return d["played"] == 5 and all(m["reason"] and "không phát" in m["reason"]
                                            for m in d["missing"] if m["device"] == broken.entry.id)

        await until(settled, "5 loudspeakers proven to have played it", timeout=30.0, step=0.1)
        d = await delivery()
        assert (d["played"], d["total"]) == (5, 7)
        assert d["text"].startswith("đã phát tới 5/7 cụm loa")
        missing = {m["device"]: m for m in d["missing"]}
        assert set(missing) == {offline_id, broken.entry.id}
        assert missing[offline_id]["name"] == "Cụm loa mất điện"
        assert missing[offline_id]["reason"].startswith("mất kết nối")
        assert missing[broken.entry.id]["acked"] and missing[broken.entry.id]["state"] == "idle"
        # the acks are durable too: six devices answered, the offline one could not
        status, one = await _call(srv, token, f"/api/v1/emergencies/{eid}")
        assert one["reach"]["loudspeakers"] == {"acked": 6, "total": 7}

        # a commune sees its own loudspeakers only; another district's commune: 403
        xa11 = await _login(srv, "xa11")
        status, mine = await _call(srv, xa11, f"/api/v1/reports/delivery?emergency={eid}")
        assert status == 200, mine
        assert {r["area"] for r in mine["devices"]} == {"T01-H1-X1"}
        assert mine["total"] == sum(1 for e in fleet.entries if e.area == "T01-H1-X1")
        xa21 = await _login(srv, "xa21")
        status, refused = await _call(srv, xa21, f"/api/v1/reports/delivery?emergency={eid}")
        assert status == 403 and refused["field"] == "emergency", refused
        status, _ = await _call(srv, xa21, "/api/v1/reports/delivery?emergency=nope")
        assert status == 404
        status, refused = await _call(srv, xa21, "/api/v1/reports/delivery")
        assert status == 422 and refused["field"] == "emergency"

        # the CSV: one row per loudspeaker, the played ones with the time, the others why not
        status, text = await _call(srv, token, f"/api/v1/reports/delivery?emergency={eid}"
                                               "&format=csv")
        assert status == 200
        rows = list(csv.DictReader(io.StringIO(text)))
        assert len(rows) == 7 and rows[0].keys() >= {"device", "name", "area", "played",
                                                    "reason"}
        by_id = {r["device"]: r for r in rows}
        assert by_id[offline_id]["played"] == "" and "offline" in by_id[offline_id]["reason"]
        assert by_id[broken.entry.id]["played"] == ""
        played = [r for r in rows if r["played"]]
        assert len(played) == 5 and all(r["played"].endswith("+07:00") for r in played)
        assert all(r["reason"] == "đã phát / played" for r in played)
    finally:
        await fleet.stop()
        await stop_node(srv)

    # a restart: the proof is read back from the store (no device is connected any more)
    srv = await start_node(tmp_path, _settings, "T01", token=token)
    try:
        assert srv.node.devices.connected == 0
        status, one = await _call(srv, token, f"/api/v1/emergencies/{eid}")
        assert status == 200, one
        assert (one["delivery"]["played"], one["delivery"]["total"]) == (5, 7)
        assert {m["device"] for m in one["delivery"]["missing"]} == {offline_id,
                                                                     broken.entry.id}
    finally:
        await stop_node(srv)


async def test_a_device_claiming_an_emergency_its_area_does_not_air_proves_nothing(
        tmp_path: Path) -> None:
    srv = await start_node(tmp_path, _settings, "T01")
    dev, key = await srv.device("T01-H2-X1")
    try:
        status, em = await srv.post("/api/v1/emergencies", {
            "targets": ["T01-H1-X1"], "content": {"text": TEXT}})
        assert status == 201, em
        async with srv.http.ws_connect(srv.base + "/api/v1/devices/connect") as ws:
            await ws.send_json({"v": 1, "type": "hello", "device": dev, "key": key,
                                "firmware": "test"})
            assert (await ws.receive_json(timeout=15))["type"] == "welcome"
            # malformed reports are refused with the field named and change nothing
            await ws.send_json({"v": 1, "type": "playing", "broadcast": em["id"],
                                "state": "loud"})
            err = await ws.receive_json(timeout=15)  # a device that never reported: no onair
            assert err["type"] == "error" and "state" in err["error"]
            await ws.send_json({"v": 1, "type": "playing", "broadcast": em["id"],
                                "state": "playing"})
            await until(lambda: _proof(srv, em["id"], dev), "the report recorded")
        proofs = await srv.node.delivery.proofs(em["id"])
        assert proofs[dev]["state"] == "playing" and proofs[dev]["played"] is None
    finally:
        await stop_node(srv)


async def _proof(srv: Server, eid: str, dev: str) -> bool:
    return dev in await srv.node.delivery.proofs(eid)



async def test_a_cluster_proves_on_every_node_what_one_node_s_devices_played(
        tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    a = await start_node(tmp_path / "a", _settings, "T01", store=redis_url, prefix=redis_prefix)
    b = await start_node(tmp_path / "b", _settings, "T01", store=redis_url, prefix=redis_prefix,
                         token=a.token)
    fleet = Fleet(a.base, a.token, speakers=3, area=DISTRICT,
                  fleet_file=tmp_path / "fleet.json", status_every=0)
    try:
        await fleet.start()
        await until(lambda: fleet.counts()["connected"] == 3, "the fleet connected to node a",
                    timeout=60.0, step=0.1)
        # issued on node b: node a airs it (the bus) and commands the devices connected to it
        status, em = await b.post("/api/v1/emergencies", {
            "targets": [DISTRICT], "content": {"text": TEXT}})
        assert status == 201, em

        async def played_on_b() -> bool:
            status, one = await _call(b, b.token, f"/api/v1/emergencies/{em['id']}")
            assert status == 200, one
            return bool(one["delivery"]["played"] == 3 and one["delivery"]["total"] == 3)

        await until(played_on_b, "node b seeing what node a's devices played", timeout=30.0,
                    step=0.1)
        proofs = await b.node.delivery.proofs(em["id"])
        assert {r["node"] for r in proofs.values()} == {a.node.node_id}
    finally:
        await fleet.stop()
        await stop_node(b)
        await stop_node(a)
        await delete_prefix(redis_url, redis_prefix)


async def test_a_broadcast_s_proof_comes_from_what_the_stream_carries(tmp_path: Path) -> None:
    srv = await start_node(tmp_path, _settings, "T01")
    fleet = Fleet(srv.base, srv.token, speakers=4, decode=1, area=DISTRICT,
                  fleet_file=tmp_path / "fleet.json", status_every=0)
    try:
        await fleet.start()
        await until(lambda: fleet.counts()["connected"] == 4, "the fleet connected",
                    timeout=60.0, step=0.1)
        await until(lambda: all(d.hears_audio() for d in fleet.decoders()),
                    "the decoder hearing its area's stream", timeout=60.0, step=0.1)
        # a minute of 700 Hz from the library, aired at once to two communes
        form = aiohttp.FormData()
        form.add_field("title", "Thông báo tiêm phòng")
        form.add_field("file", tone_file(tmp_path / "tb.wav", 700, 60).read_bytes(),
                       filename="tb.wav")
        async with srv.http.post(srv.base + "/api/v1/media", data=form,
                                 headers=srv.headers()) as r:
            assert r.status == 201, await r.text()
            media = (await r.json())["id"]
        status, b = await srv.post("/api/v1/broadcasts", {
            "media": media, "targets": ["T01-H1-X1", "T01-H1-X2"], "class": "priority"})
        assert status == 201, b
        # the loudspeakers are told what their stream carries, and report playing it
        covered = [d for d in fleet.devices if d.entry.area in ("T01-H1-X1", "T01-H1-X2")]
        await until(lambda: all(d.client.on_air == b["id"] for d in covered),
                    "the covered loudspeakers told what is on air", timeout=30.0, step=0.05)

        async def played() -> bool:
            status, one = await _call(srv, srv.token, f"/api/v1/broadcasts/{b['id']}")
            assert status == 200, one
            return bool(one["delivery"]["played"] == len(covered))

        await until(played, "every covered loudspeaker proven", timeout=30.0, step=0.1)
        status, one = await _call(srv, srv.token, f"/api/v1/broadcasts/{b['id']}")
        assert one["delivery"]["total"] == len(covered) and one["delivery"]["missing"] == []
        # the one outside the targets is not counted, and did not play it
        outside = [d for d in fleet.devices if d not in covered]
        assert outside and all(d.client.on_air != b["id"] for d in outside)
        status, text = await _call(srv, srv.token, f"/api/v1/reports/delivery?broadcast={b['id']}"
                                                   "&format=csv")
        assert status == 200
        rows = list(csv.DictReader(io.StringIO(text)))
        assert sorted(r["device"] for r in rows) == sorted(d.entry.id for d in covered)
        assert all(r["played"] for r in rows)
        xa21 = await _add_and_login(srv, "xa21", "T01-H2-X1")
        status, _ = await _call(srv, xa21, f"/api/v1/reports/delivery?broadcast={b['id']}")
        assert status == 403
        status, _ = await _call(srv, xa21, f"/api/v1/broadcasts/{b['id']}")
        assert status == 404
    finally:
        await fleet.stop()
        await stop_node(srv)


async def _add_and_login(srv: Server, who: str, area: str) -> str:
    await add_user(srv.node.store, srv.node.tree, who, "operator", area, password=PASSWORD)
    return await _login(srv, who)


async def test_the_reference_agent_proves_what_its_decoder_hears(tmp_path: Path) -> None:
    srv = await start_node(tmp_path, _settings, "T01")
    dev, key = await srv.device("T01-H1-X2", name="Loa tham chiếu")
    agent = Agent(AgentOptions(srv.base, dev, key))
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(agent.run(stop))
    try:
        await until(lambda: agent.audible(), "the agent playing its area's tone", timeout=30.0)
        tone = srv.node.engine.on_air("T01-H1-X2")["broadcast"]
        assert tone is not None
        status, em = await srv.post("/api/v1/emergencies", {
            "targets": ["T01-H1-X2"], "content": {"text": TEXT}})
        assert status == 201, em
        await until(lambda: _hears_attention(agent.player.recent_pcm()),
                    "the agent's decoder hearing the attention signal", timeout=30.0, step=0.05)

        async def proven() -> bool:
            status, one = await _call(srv, srv.token, f"/api/v1/emergencies/{em['id']}")
            assert status == 200, one
            return bool(one["delivery"]["played"] == 1)

        await until(proven, "the agent's proof", timeout=30.0, step=0.1)
        assert agent.hearing == em["id"]
        # the emergency ends: the agent names what its stream carries again (the tone)
        status, _ = await srv.post("/api/v1/emergencies", {"targets": []})
        assert status == 422
        async with srv.http.delete(f"{srv.base}/api/v1/emergencies/{em['id']}",
                                   headers=srv.headers()) as r:
            assert r.status == 200

        def back() -> bool:  # the client's on_air follows the node's tick, it may lag a moment
            return (agent.hearing is None and agent.client is not None
                    and agent.client.on_air not in (None, em["broadcast"]))

        await until(back, "the agent back on its area's stream", timeout=30.0)
        assert agent.client is not None and agent.client.on_air == tone
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await stop_node(srv)
